//! Connection and server commands, and what redis-cli / redis-benchmark send.

mod common;
use common::{parse_all, Client, Value};

#[test]
fn ping_echo() {
    let mut c = Client::new();
    assert_eq!(c.q("PING"), "+PONG\r\n");
    assert_eq!(c.q("ping hi"), "$2\r\nhi\r\n");
    assert_eq!(
        c.q("PING a b"),
        "-ERR wrong number of arguments for 'ping' command\r\n"
    );
    assert_eq!(c.q("ECHO hello"), "$5\r\nhello\r\n");
    assert_eq!(
        c.q("ECHO"),
        "-ERR wrong number of arguments for 'echo' command\r\n"
    );
    assert_eq!(c.raw(b"PING\r\n"), b"+PONG\r\n", "inline");
}

#[test]
fn unknown_command_wording() {
    let mut c = Client::new();
    assert_eq!(
        c.q("foo a b"),
        "-ERR unknown command 'foo', with args beginning with: 'a' 'b' \r\n"
    );
    assert_eq!(
        c.q("FOO"),
        "-ERR unknown command 'FOO', with args beginning with: \r\n"
    );
    // Newlines from arguments become spaces.
    assert_eq!(
        c.cmd(&[b"x\r\ny", b"a\nb"]),
        b"-ERR unknown command 'x  y', with args beginning with: 'a b' \r\n"
    );
    // The argument list stops once it reaches 128 bytes.
    let long = "z".repeat(200);
    let reply = c.q(&format!("nope {long} second"));
    let expected = format!(
        "-ERR unknown command 'nope', with args beginning with: '{}' \r\n",
        "z".repeat(128)
    );
    assert_eq!(reply, expected);
    let reply = c.q(&format!("nope {} b c", "y".repeat(125)));
    let expected = format!(
        "-ERR unknown command 'nope', with args beginning with: '{}' \r\n",
        "y".repeat(125)
    );
    assert_eq!(reply, expected, "125 bytes + quotes and space reach 128");
    let reply = c.q(&format!("nope {} b c", "y".repeat(124)));
    let expected = format!(
        "-ERR unknown command 'nope', with args beginning with: '{}' 'b' \r\n",
        "y".repeat(124)
    );
    assert_eq!(reply, expected, "at 127 bytes one more (cut) argument fits");
    let name = "n".repeat(300);
    let reply = c.q(&name);
    assert!(reply.starts_with(&format!("-ERR unknown command '{}', ", "n".repeat(128))));
    let info = c.v("INFO stats").text();
    assert!(info.contains("rejected_calls:7\r\n"), "{info}");
}

#[test]
fn info_sections() {
    let mut c = Client::new();
    c.q("SET a 1");
    c.q("SET b 2 EX 100");
    c.now += 5_000;
    let all = c.v("INFO").text();
    for needle in [
        "# Server\r\n",
        "redis_version:7.2.4\r\n",
        "uptime_in_seconds:5\r\n",
        "# Memory\r\n",
        &format!("used_memory:{}\r\n", c.store.used_bytes()),
        "maxmemory:0\r\n",
        "# Stats\r\n",
        "total_commands_processed:2\r\n",
        "# Keyspace\r\n",
        "db0:keys=2,expires=1,avg_ttl=0\r\n",
    ] {
        assert!(all.contains(needle), "missing {needle:?} in {all}");
    }
    assert!(
        all.contains("\r\n\r\n# Memory\r\n"),
        "sections are separated by a blank line"
    );
    assert!(all.ends_with("\r\n"));
    let mem = c.v("INFO memory").text();
    assert!(
        mem.starts_with("# Memory\r\n") && !mem.contains("# Server"),
        "{mem}"
    );
    let two = c.v("INFO SERVER keyspace").text();
    assert!(two.contains("# Server") && two.contains("# Keyspace") && !two.contains("# Stats"));
    assert_eq!(c.q("INFO nosuchsection"), "$0\r\n\r\n");
    c.q("FLUSHALL");
    assert_eq!(
        c.v("INFO keyspace").text(),
        "# Keyspace\r\n",
        "empty db0 is omitted"
    );
    let limited = Client::with_limit(3 << 20).v("INFO memory").text();
    assert!(
        limited.contains("maxmemory:3145728\r\nmaxmemory_human:3.00M\r\n"),
        "{limited}"
    );
}

#[test]
fn command_introspection() {
    let mut c = Client::new();
    assert_eq!(c.q("COMMAND DOCS"), "*0\r\n");
    assert_eq!(c.q("COMMAND DOCS get set"), "*0\r\n");
    let count = match c.v("COMMAND COUNT") {
        Value::Int(n) => n as usize,
        other => panic!("{other:?}"),
    };
    assert!(count >= 40);
    assert_eq!(c.v("COMMAND").items().len(), count);
    assert_eq!(c.v("COMMAND LIST").items().len(), count);
    let info = c.v("COMMAND INFO get nosuch");
    let items = info.items();
    assert_eq!(items.len(), 2);
    let get = items[0].items();
    assert_eq!(get.len(), 10);
    assert_eq!(get[0], Value::bulk("get"));
    assert_eq!(get[1], Value::Int(2));
    assert_eq!(get[3..6], [Value::Int(1), Value::Int(1), Value::Int(1)]);
    assert_eq!(items[1], Value::Bulk(None));
    assert_eq!(
        c.q("COMMAND FOO"),
        "-ERR unknown subcommand 'FOO'. Try COMMAND HELP.\r\n"
    );
    assert_eq!(
        c.q("COMMAND COUNT x"),
        "-ERR wrong number of arguments for 'command|count' command\r\n"
    );
}

#[test]
fn client_subcommands() {
    let mut c = Client::new();
    assert_eq!(c.q("CLIENT GETNAME"), "$-1\r\n");
    assert_eq!(c.q("CLIENT SETNAME conn1"), "+OK\r\n");
    assert_eq!(c.q("CLIENT GETNAME"), "$5\r\nconn1\r\n");
    assert_eq!(
        c.cmd(&[b"CLIENT", b"SETNAME", b"a b"]),
        b"-ERR Client names cannot contain spaces, newlines or special characters.\r\n"
    );
    assert_eq!(c.q("CLIENT GETNAME"), "$5\r\nconn1\r\n");
    assert_eq!(c.q("CLIENT SETINFO LIB-NAME redis-py"), "+OK\r\n");
    assert_eq!(c.q("CLIENT SETINFO lib-ver 5.0.0"), "+OK\r\n");
    assert_eq!(
        c.q("CLIENT SETINFO foo x"),
        "-ERR Unrecognized option 'foo'\r\n"
    );
    assert_eq!(c.q("CLIENT ID"), ":1\r\n");
    assert_eq!(c.q("CLIENT ID"), ":1\r\n");
    assert_eq!(
        c.q("CLIENT"),
        "-ERR wrong number of arguments for 'client' command\r\n"
    );
    assert_eq!(
        c.q("CLIENT SETNAME"),
        "-ERR wrong number of arguments for 'client|setname' command\r\n"
    );
    assert_eq!(
        c.q("CLIENT bogus"),
        "-ERR unknown subcommand 'bogus'. Try CLIENT HELP.\r\n"
    );
    // A second connection gets the next id.
    let mut out = Vec::new();
    let mut other = nvhv_kvstore::Conn::new();
    nvhv_kvstore::feed(&mut c.store, &mut other, b"CLIENT ID\r\n", c.now, &mut out);
    assert_eq!(out, b":2\r\n");
}

#[test]
fn config_get_set() {
    let mut c = Client::new();
    assert_eq!(c.q("CONFIG GET save"), "*2\r\n$4\r\nsave\r\n$0\r\n\r\n");
    assert_eq!(
        c.q("CONFIG GET appendonly"),
        "*2\r\n$10\r\nappendonly\r\n$2\r\nno\r\n"
    );
    assert_eq!(c.q("CONFIG GET SAVE"), "*2\r\n$4\r\nsave\r\n$0\r\n\r\n");
    let both = c.v("CONFIG GET maxmemory*");
    assert_eq!(
        both.items(),
        [
            Value::bulk("maxmemory"),
            Value::bulk("0"),
            Value::bulk("maxmemory-policy"),
            Value::bulk("noeviction")
        ]
    );
    assert_eq!(
        c.v("CONFIG GET save save").items().len(),
        2,
        "no duplicates"
    );
    assert_eq!(c.q("CONFIG GET nothing"), "*0\r\n");
    assert_eq!(
        c.q("CONFIG GET"),
        "-ERR wrong number of arguments for 'config|get' command\r\n"
    );
    assert_eq!(
        c.q("CONFIG SET save x"),
        "-ERR Unknown option or number of arguments for CONFIG SET - 'save'\r\n"
    );
    c.q("GET x");
    assert_eq!(c.q("CONFIG RESETSTAT"), "+OK\r\n");
    let info = c.v("INFO stats").text();
    assert!(info.contains("total_commands_processed:1\r\n"), "{info}");
    assert!(info.contains("keyspace_misses:0\r\n"), "{info}");
    assert_eq!(
        c.q("CONFIG foo"),
        "-ERR unknown subcommand 'foo'. Try CONFIG HELP.\r\n"
    );
}

#[test]
fn hello_and_auth() {
    let mut c = Client::new();
    let hello = c.v("HELLO");
    let items = hello.items();
    assert_eq!(items.len(), 14);
    assert_eq!(items[0], Value::bulk("server"));
    assert_eq!(items[4..6], [Value::bulk("proto"), Value::Int(2)]);
    assert_eq!(items[13], Value::Array(Some(vec![])));
    assert_eq!(c.v("HELLO 2").items().len(), 14);
    assert_eq!(c.q("HELLO 3"), "-NOPROTO unsupported protocol version\r\n");
    assert_eq!(
        c.q("HELLO abc"),
        "-ERR Protocol version is not an integer or out of range\r\n"
    );
    assert_eq!(
        c.q("HELLO 2 FOO"),
        "-ERR Syntax error in HELLO option 'FOO'\r\n"
    );
    assert_eq!(c.v("HELLO 2 SETNAME me").items().len(), 14);
    assert_eq!(c.q("CLIENT GETNAME"), "$2\r\nme\r\n");
    assert_eq!(c.v("HELLO 2 AUTH default pw").items().len(), 14);
    assert_eq!(
        c.q("HELLO 2 AUTH bob pw"),
        "-WRONGPASS invalid username-password pair or user is disabled.\r\n"
    );
    assert_eq!(
        c.q("AUTH pw"),
        "-ERR AUTH <password> called without any password configured for the default user. \
         Are you sure your configuration is correct?\r\n"
    );
    assert_eq!(c.q("AUTH default pw"), "+OK\r\n");
    assert_eq!(c.q("AUTH a b c"), "-ERR syntax error\r\n");
}

#[test]
fn quit_closes_and_ignores_the_rest() {
    let mut c = Client::new();
    assert_eq!(c.raw(b"PING\r\nQUIT\r\nSET a b\r\n"), b"+PONG\r\n+OK\r\n");
    assert!(c.conn.closing());
    assert_eq!(c.raw(b"PING\r\n"), b"");
    assert!(c.store.is_empty(), "commands after QUIT did not run");
}

#[test]
fn redis_cli_and_benchmark_handshakes() {
    let mut c = Client::new();
    // redis-cli 7 on connect.
    assert_eq!(c.q("COMMAND DOCS"), "*0\r\n");
    // redis-benchmark 7 on connect, pipelined like it does.
    let mut input = Vec::new();
    for args in [
        &[&b"CONFIG"[..], b"GET", b"save"][..],
        &[b"CONFIG", b"GET", b"appendonly"],
        &[b"CLIENT", b"SETINFO", b"LIB-NAME", b"redis-benchmark"],
        &[b"CLIENT", b"SETINFO", b"LIB-VER", b"7.2.4"],
        &[b"SET", b"key:__rand_int__", b"xxx"],
        &[b"GET", b"key:__rand_int__"],
    ] {
        input.extend(common::enc(args));
    }
    let replies = parse_all(&c.raw(&input));
    assert_eq!(
        replies,
        [
            Value::Array(Some(vec![Value::bulk("save"), Value::bulk("")])),
            Value::Array(Some(vec![Value::bulk("appendonly"), Value::bulk("no")])),
            Value::Simple("OK".into()),
            Value::Simple("OK".into()),
            Value::Simple("OK".into()),
            Value::bulk("xxx"),
        ]
    );
}
