//! String commands, byte for byte against Redis 7's replies.

mod common;
use common::Client;

#[test]
fn set_get_basic() {
    let mut c = Client::new();
    assert_eq!(c.q("SET k v"), "+OK\r\n");
    assert_eq!(c.q("GET k"), "$1\r\nv\r\n");
    assert_eq!(c.q("GET missing"), "$-1\r\n");
    assert_eq!(c.q("set k longer-value"), "+OK\r\n");
    assert_eq!(c.q("gEt k"), "$12\r\nlonger-value\r\n");
    // Binary-safe keys and values.
    assert_eq!(c.cmd(&[b"SET", b"\0k\r\n", b"a\r\nb\0"]), b"+OK\r\n");
    assert_eq!(c.cmd(&[b"GET", b"\0k\r\n"]), b"$5\r\na\r\nb\0\r\n");
    assert_eq!(c.cmd(&[b"SET", b"", b""]), b"+OK\r\n");
    assert_eq!(c.cmd(&[b"GET", b""]), b"$0\r\n\r\n");
    assert_eq!(c.store.len(), 3);
}

#[test]
fn arity_errors() {
    let mut c = Client::new();
    assert_eq!(
        c.q("GET"),
        "-ERR wrong number of arguments for 'get' command\r\n"
    );
    assert_eq!(
        c.q("GET a b"),
        "-ERR wrong number of arguments for 'get' command\r\n"
    );
    assert_eq!(
        c.q("SET a"),
        "-ERR wrong number of arguments for 'set' command\r\n"
    );
    assert_eq!(
        c.q("INCRBY a"),
        "-ERR wrong number of arguments for 'incrby' command\r\n"
    );
    assert_eq!(
        c.q("MSET a"),
        "-ERR wrong number of arguments for 'mset' command\r\n"
    );
    assert_eq!(
        c.q("MSET a 1 b"),
        "-ERR wrong number of arguments for 'mset' command\r\n"
    );
    assert_eq!(
        c.q("MSETNX a 1 b"),
        "-ERR wrong number of arguments for 'msetnx' command\r\n"
    );
    assert!(c.store.is_empty());
}

#[test]
fn set_nx_xx_get() {
    let mut c = Client::new();
    assert_eq!(c.q("SET k v NX"), "+OK\r\n");
    assert_eq!(c.q("SET k w NX"), "$-1\r\n");
    assert_eq!(c.q("GET k"), "$1\r\nv\r\n");
    assert_eq!(c.q("SET k w xx"), "+OK\r\n");
    assert_eq!(c.q("SET nokey v XX"), "$-1\r\n");
    assert_eq!(c.q("GET nokey"), "$-1\r\n");
    assert_eq!(c.q("SET k v NX XX"), "-ERR syntax error\r\n");
    assert_eq!(c.q("SET k v XX NX"), "-ERR syntax error\r\n");
    assert_eq!(c.q("SET k v BOGUS"), "-ERR syntax error\r\n");
    // GET returns the old value whether or not the write happens.
    assert_eq!(c.q("SET k v2 GET"), "$1\r\nw\r\n");
    assert_eq!(c.q("SET new v GET"), "$-1\r\n");
    assert_eq!(c.q("GET new"), "$1\r\nv\r\n");
    assert_eq!(c.q("SET k x NX GET"), "$2\r\nv2\r\n");
    assert_eq!(c.q("GET k"), "$2\r\nv2\r\n");
    assert_eq!(c.q("SET absent x XX GET"), "$-1\r\n");
    assert_eq!(c.q("EXISTS absent"), ":0\r\n");
}

#[test]
fn set_expiry_options() {
    let mut c = Client::new();
    assert_eq!(c.q("SET k v EX 10"), "+OK\r\n");
    assert_eq!(c.q("TTL k"), ":10\r\n");
    assert_eq!(c.q("SET k v PX 1500"), "+OK\r\n");
    assert_eq!(c.q("PTTL k"), ":1500\r\n");
    assert_eq!(c.q("TTL k"), ":2\r\n", "rounded like Redis");
    let at = c.now + 5000;
    assert_eq!(c.q(&format!("SET k v PXAT {at}")), "+OK\r\n");
    assert_eq!(c.q("PTTL k"), ":5000\r\n");
    assert_eq!(
        c.q(&format!("SET k v EXAT {}", c.now / 1000 + 7)),
        "+OK\r\n"
    );
    assert_eq!(c.q("TTL k"), ":7\r\n");
    assert_eq!(c.q("SET k v2 KEEPTTL"), "+OK\r\n");
    assert_eq!(c.q("TTL k"), ":7\r\n");
    assert_eq!(c.q("SET k v3"), "+OK\r\n");
    assert_eq!(c.q("TTL k"), ":-1\r\n", "plain SET clears the TTL");
    assert_eq!(c.q("SET k v ex 5 GET"), "$2\r\nv3\r\n");
    assert_eq!(c.q("TTL k"), ":5\r\n");
    // A later EX overrides an earlier one, as in Redis.
    assert_eq!(c.q("SET k v EX 1 EX 9"), "+OK\r\n");
    assert_eq!(c.q("TTL k"), ":9\r\n");
}

#[test]
fn set_expiry_errors() {
    let mut c = Client::new();
    let bad = "-ERR invalid expire time in 'set' command\r\n";
    assert_eq!(c.q("SET k v EX 0"), bad);
    assert_eq!(c.q("SET k v EX -1"), bad);
    assert_eq!(c.q("SET k v PX 0"), bad);
    assert_eq!(c.q("SET k v EX 9223372036854775807"), bad);
    assert_eq!(
        c.q("SET k v PX 9223372036854775807"),
        bad,
        "overflows when added to now"
    );
    assert_eq!(
        c.q("SET k v EX abc"),
        "-ERR value is not an integer or out of range\r\n"
    );
    assert_eq!(c.q("SET k v EX"), "-ERR syntax error\r\n");
    assert_eq!(c.q("SET k v EX 1 PX 1"), "-ERR syntax error\r\n");
    assert_eq!(c.q("SET k v KEEPTTL EX 1"), "-ERR syntax error\r\n");
    assert_eq!(c.q("SET k v EX 1 KEEPTTL"), "-ERR syntax error\r\n");
    assert_eq!(c.q("SET k v PERSIST"), "-ERR syntax error\r\n");
    assert_eq!(c.q("EXISTS k"), ":0\r\n", "no failed SET wrote anything");
}

#[test]
fn setnx_setex_psetex() {
    let mut c = Client::new();
    assert_eq!(c.q("SETNX k v"), ":1\r\n");
    assert_eq!(c.q("SETNX k w"), ":0\r\n");
    assert_eq!(c.q("GET k"), "$1\r\nv\r\n");
    assert_eq!(c.q("SETEX k 10 x"), "+OK\r\n");
    assert_eq!(c.q("TTL k"), ":10\r\n");
    assert_eq!(c.q("GET k"), "$1\r\nx\r\n");
    assert_eq!(
        c.q("SETEX k 0 x"),
        "-ERR invalid expire time in 'setex' command\r\n"
    );
    assert_eq!(c.q("PSETEX k 250 y"), "+OK\r\n");
    assert_eq!(c.q("PTTL k"), ":250\r\n");
    assert_eq!(
        c.q("PSETEX k -5 y"),
        "-ERR invalid expire time in 'psetex' command\r\n"
    );
    assert_eq!(
        c.q("SETEX k x y"),
        "-ERR value is not an integer or out of range\r\n"
    );
    assert_eq!(
        c.q("SETEX k 10"),
        "-ERR wrong number of arguments for 'setex' command\r\n"
    );
}

#[test]
fn getset_getdel_getex() {
    let mut c = Client::new();
    assert_eq!(c.q("GETSET k v"), "$-1\r\n");
    assert_eq!(c.q("SET k v EX 100"), "+OK\r\n");
    assert_eq!(c.q("GETSET k w"), "$1\r\nv\r\n");
    assert_eq!(c.q("TTL k"), ":-1\r\n", "GETSET clears the TTL");
    assert_eq!(c.q("GETDEL k"), "$1\r\nw\r\n");
    assert_eq!(c.q("GETDEL k"), "$-1\r\n");
    assert_eq!(c.q("EXISTS k"), ":0\r\n");
    assert_eq!(c.q("SET k v"), "+OK\r\n");
    assert_eq!(c.q("GETEX k"), "$1\r\nv\r\n");
    assert_eq!(c.q("GETEX k EX 50"), "$1\r\nv\r\n");
    assert_eq!(c.q("TTL k"), ":50\r\n");
    assert_eq!(c.q("GETEX k PERSIST"), "$1\r\nv\r\n");
    assert_eq!(c.q("TTL k"), ":-1\r\n");
    assert_eq!(c.q("GETEX k PX 10 PERSIST"), "-ERR syntax error\r\n");
    assert_eq!(c.q("GETEX k NX"), "-ERR syntax error\r\n");
    assert_eq!(
        c.q("GETEX k EX 0"),
        "-ERR invalid expire time in 'getex' command\r\n"
    );
    assert_eq!(c.q("GETEX nokey EX 5"), "$-1\r\n");
    // An absolute time in the past deletes the key after returning it.
    assert_eq!(c.q("GETEX k PXAT 1"), "$1\r\nv\r\n");
    assert_eq!(c.q("EXISTS k"), ":0\r\n");
}

#[test]
fn incr_decr_family() {
    let mut c = Client::new();
    assert_eq!(c.q("INCR n"), ":1\r\n");
    assert_eq!(c.q("INCRBY n 10"), ":11\r\n");
    assert_eq!(c.q("DECR n"), ":10\r\n");
    assert_eq!(c.q("DECRBY n 20"), ":-10\r\n");
    assert_eq!(c.q("GET n"), "$3\r\n-10\r\n");
    assert_eq!(c.q("INCRBY n -5"), ":-15\r\n");
    assert_eq!(c.q("DECR fresh"), ":-1\r\n");
    let notint = "-ERR value is not an integer or out of range\r\n";
    assert_eq!(c.q("SET s abc"), "+OK\r\n");
    assert_eq!(c.q("INCR s"), notint);
    assert_eq!(c.q("SET s 007"), "+OK\r\n");
    assert_eq!(c.q("INCR s"), notint, "leading zeros are not integers");
    assert_eq!(c.cmd(&[b"SET", b"s", b" 1"]), b"+OK\r\n");
    assert_eq!(c.q("INCR s"), notint);
    assert_eq!(c.q("INCRBY n abc"), notint);
    assert_eq!(c.q("INCRBY n 1.5"), notint);
    assert_eq!(c.q("INCRBY n 9223372036854775808"), notint);
    assert_eq!(c.q("SET big 9223372036854775807"), "+OK\r\n");
    let overflow = "-ERR increment or decrement would overflow\r\n";
    assert_eq!(c.q("INCR big"), overflow);
    assert_eq!(c.q("GET big"), "$19\r\n9223372036854775807\r\n");
    assert_eq!(c.q("SET small -9223372036854775808"), "+OK\r\n");
    assert_eq!(c.q("DECR small"), overflow);
    assert_eq!(
        c.q("DECRBY n -9223372036854775808"),
        "-ERR decrement would overflow\r\n"
    );
    assert_eq!(c.q("INCRBY small 9223372036854775807"), ":-1\r\n");
    // INCR keeps the TTL.
    assert_eq!(c.q("SET t 5 EX 100"), "+OK\r\n");
    assert_eq!(c.q("INCR t"), ":6\r\n");
    assert_eq!(c.q("TTL t"), ":100\r\n");
}

#[test]
fn append_and_strlen() {
    let mut c = Client::new();
    assert_eq!(c.q("APPEND k ab"), ":2\r\n");
    assert_eq!(c.q("APPEND k cd"), ":4\r\n");
    assert_eq!(c.q("GET k"), "$4\r\nabcd\r\n");
    assert_eq!(c.q("STRLEN k"), ":4\r\n");
    assert_eq!(c.q("STRLEN nokey"), ":0\r\n");
    for i in 0..1000 {
        assert_eq!(c.q("APPEND k x"), format!(":{}\r\n", 5 + i));
    }
    assert_eq!(c.q("STRLEN k"), ":1004\r\n");
    assert_eq!(c.q("EXPIRE k 100"), ":1\r\n");
    assert_eq!(c.q("APPEND k y"), ":1005\r\n");
    assert_eq!(c.q("TTL k"), ":100\r\n", "APPEND keeps the TTL");
    assert_eq!(c.q("SET n 41"), "+OK\r\n");
    assert_eq!(c.q("APPEND n 9"), ":3\r\n");
    assert_eq!(c.q("INCR n"), ":420\r\n");
}

#[test]
fn mset_mget_msetnx() {
    let mut c = Client::new();
    assert_eq!(c.q("MSET a 1 b 2"), "+OK\r\n");
    assert_eq!(c.q("MGET a b c"), "*3\r\n$1\r\n1\r\n$1\r\n2\r\n$-1\r\n");
    assert_eq!(c.q("MSET a 3 a 4"), "+OK\r\n");
    assert_eq!(
        c.q("GET a"),
        "$1\r\n4\r\n",
        "the last value of a repeated key wins"
    );
    assert_eq!(c.q("MSETNX a 9 z 1"), ":0\r\n");
    assert_eq!(c.q("EXISTS z"), ":0\r\n", "MSETNX is all or nothing");
    assert_eq!(c.q("MSETNX y 1 z 2"), ":1\r\n");
    assert_eq!(c.q("MGET y z"), "*2\r\n$1\r\n1\r\n$1\r\n2\r\n");
    assert_eq!(c.q("SET t v EX 10"), "+OK\r\n");
    assert_eq!(c.q("MSET t w"), "+OK\r\n");
    assert_eq!(c.q("TTL t"), ":-1\r\n", "MSET clears TTLs");
    assert_eq!(
        c.q("MGET"),
        "-ERR wrong number of arguments for 'mget' command\r\n"
    );
}

#[test]
fn keyspace_hits_and_misses_are_counted() {
    let mut c = Client::new();
    c.q("SET a 1");
    c.q("GET a");
    c.q("GET a");
    c.q("GET b");
    c.q("MGET a b c");
    let info = c.v("INFO stats").text();
    assert!(info.contains("keyspace_hits:3\r\n"), "{info}");
    assert!(info.contains("keyspace_misses:3\r\n"), "{info}");
}
