//! The command table and dispatch: name lookup (case-insensitive, no
//! allocation), arity checks and the Redis 7 wording of their errors,
//! per-command statistics, and turning a failed write or an unallocatable
//! reply into `-OOM`. The commands themselves live in `strings`, `keys` and
//! `server`.

mod keys;
mod server;
mod strings;

use alloc::vec::Vec;

use crate::num::{self, parse_i64};
use crate::reply::{Out, OOM};
use crate::store::{Lookup, Oom, Store};

/// The arguments of one command, as ranges into the bytes they were parsed from.
pub(crate) struct Args<'a> {
    data: &'a [u8],
    ranges: &'a [(usize, usize)],
}

impl<'a> Args<'a> {
    pub(crate) fn new(data: &'a [u8], ranges: &'a [(usize, usize)]) -> Self {
        Args { data, ranges }
    }

    #[inline]
    pub(crate) fn len(&self) -> usize {
        self.ranges.len()
    }

    #[inline]
    pub(crate) fn get(&self, i: usize) -> &'a [u8] {
        let (a, b) = self.ranges[i];
        &self.data[a..b]
    }
}

/// Per-connection attributes that commands read or change.
#[derive(Default)]
pub(crate) struct Client {
    /// Set by QUIT or a protocol error: the connection should be closed.
    pub(crate) closing: bool,
    /// CLIENT SETNAME (empty: no name).
    pub(crate) name: Vec<u8>,
    /// CLIENT ID, assigned on first use.
    pub(crate) id: u64,
    /// The newest state version a reply sent so far depends on (a running
    /// maximum, [`crate::Conn::dep`]).
    pub(crate) dep: u64,
}

/// What a command runs with.
pub(crate) struct Ctx<'a, 'b> {
    pub(crate) store: &'a mut Store,
    pub(crate) client: &'a mut Client,
    pub(crate) out: &'a mut Out<'b>,
    pub(crate) now: u64,
}

/// A command's result: `Err` means a write was refused for memory.
pub(crate) type Res = Result<(), Oom>;

/// Static description of a command, as COMMAND reports it.
pub(crate) struct Spec {
    pub(crate) name: &'static str,
    /// Redis arity: `n` exactly n arguments (name included), `-n` at least n.
    pub(crate) arity: i32,
    pub(crate) flags: &'static [&'static str],
    pub(crate) first_key: i32,
    pub(crate) last_key: i32,
    pub(crate) step: i32,
}

const WRITE: &[&str] = &["write", "denyoom"];
const WRITE_FAST: &[&str] = &["write", "denyoom", "fast"];
const DEL: &[&str] = &["write", "fast"];
const READ: &[&str] = &["readonly", "fast"];
const SLOW_READ: &[&str] = &["readonly"];
const ADMIN: &[&str] = &["loading", "stale"];
const CONN: &[&str] = &["noscript", "loading", "stale", "fast"];

macro_rules! commands {
    ($($variant:ident $name:literal $arity:literal $flags:ident $first:literal $last:literal $step:literal,)*) => {
        #[derive(Clone, Copy, PartialEq, Eq, Debug)]
        pub(crate) enum Cmd { $($variant,)* }

        /// Every command, in COMMAND's order.
        pub(crate) const ALL: &[Cmd] = &[$(Cmd::$variant,)*];

        impl Cmd {
            pub(crate) fn spec(self) -> Spec {
                match self {
                    $(Cmd::$variant => Spec {
                        name: const {
                            match core::str::from_utf8($name) {
                                Ok(s) => s,
                                Err(_) => panic!("command names are ASCII"),
                            }
                        },
                        arity: $arity,
                        flags: $flags,
                        first_key: $first,
                        last_key: $last,
                        step: $step,
                    },)*
                }
            }
        }

        /// Finds a command by its lowercase name.
        #[inline]
        pub(crate) fn lookup(lower: &[u8]) -> Option<Cmd> {
            // A `match` on byte strings compiles to a length switch plus a
            // few comparisons: no hashing, no allocation.
            Some(match lower {
                $($name => Cmd::$variant,)*
                _ => return None,
            })
        }
    };
}

commands! {
    Get b"get" 2 READ 1 1 1,
    Set b"set" -3 WRITE 1 1 1,
    Ping b"ping" -1 CONN 0 0 0,
    Incr b"incr" 2 WRITE_FAST 1 1 1,
    MGet b"mget" -2 READ 1 -1 1,
    MSet b"mset" -3 WRITE 1 -1 2,
    Del b"del" -2 DEL 1 -1 1,
    Echo b"echo" 2 CONN 0 0 0,
    SetNx b"setnx" 3 WRITE_FAST 1 1 1,
    SetEx b"setex" 4 WRITE 1 1 1,
    PSetEx b"psetex" 4 WRITE 1 1 1,
    GetSet b"getset" 3 WRITE_FAST 1 1 1,
    GetDel b"getdel" 2 DEL 1 1 1,
    GetEx b"getex" -2 DEL 1 1 1,
    Unlink b"unlink" -2 DEL 1 -1 1,
    Exists b"exists" -2 READ 1 -1 1,
    Touch b"touch" -2 READ 1 -1 1,
    IncrBy b"incrby" 3 WRITE_FAST 1 1 1,
    Decr b"decr" 2 WRITE_FAST 1 1 1,
    DecrBy b"decrby" 3 WRITE_FAST 1 1 1,
    Append b"append" 3 WRITE_FAST 1 1 1,
    Strlen b"strlen" 2 READ 1 1 1,
    MSetNx b"msetnx" -3 WRITE 1 -1 2,
    Keys b"keys" 2 SLOW_READ 0 0 0,
    Scan b"scan" -2 SLOW_READ 0 0 0,
    DbSize b"dbsize" 1 READ 0 0 0,
    FlushAll b"flushall" -1 WRITE 0 0 0,
    FlushDb b"flushdb" -1 WRITE 0 0 0,
    Ttl b"ttl" 2 READ 1 1 1,
    PTtl b"pttl" 2 READ 1 1 1,
    ExpireTime b"expiretime" 2 READ 1 1 1,
    PExpireTime b"pexpiretime" 2 READ 1 1 1,
    Expire b"expire" -3 DEL 1 1 1,
    PExpire b"pexpire" -3 DEL 1 1 1,
    ExpireAt b"expireat" -3 DEL 1 1 1,
    PExpireAt b"pexpireat" -3 DEL 1 1 1,
    Persist b"persist" 2 DEL 1 1 1,
    Type b"type" 2 READ 1 1 1,
    Select b"select" 2 CONN 0 0 0,
    Info b"info" -1 ADMIN 0 0 0,
    Command b"command" -1 ADMIN 0 0 0,
    Client b"client" -2 ADMIN 0 0 0,
    Config b"config" -2 ADMIN 0 0 0,
    Hello b"hello" -1 CONN 0 0 0,
    Auth b"auth" -2 CONN 0 0 0,
    Quit b"quit" -1 CONN 0 0 0,
}

#[inline]
fn arity_ok(arity: i32, argc: usize) -> bool {
    if arity >= 0 {
        argc == arity as usize
    } else {
        argc >= arity.unsigned_abs() as usize
    }
}

/// Runs one complete command and appends its reply.
pub(crate) fn execute(
    store: &mut Store,
    client: &mut Client,
    args: &Args,
    now: u64,
    out: &mut Out,
) {
    let mut lower = [0u8; 24];
    let Some(cmd) = num::lowercase(args.get(0), &mut lower).and_then(lookup) else {
        store.stats.rejected += 1;
        unknown_command(args, out);
        return;
    };
    let spec = cmd.spec();
    if !arity_ok(spec.arity, args.len()) {
        store.stats.rejected += 1;
        wrong_arity(out, spec.name);
        return;
    }
    let mark = out.mark();
    let mut c = Ctx {
        store,
        client,
        out,
        now,
    };
    c.store.read_dep = 0;
    let res = run(cmd, &mut c, args);
    c.store.stats.commands += 1;
    // The state version moves with every write command (even one that
    // failed) and CONFIG; connection state (SELECT, CLIENT SETNAME, …) and
    // INFO's counters are not state a later reply must find after a crash.
    let write = spec.flags.first() == Some(&"write");
    if write || matches!(cmd, Cmd::Config) {
        c.store.version += 1;
    }
    // What the reply depends on: a key read, the keys it looked up (or the
    // last deletion, for a miss); a write, itself; a reply about no stored
    // state, nothing; anything else (KEYS, SCAN, DBSIZE, INFO, CONFIG), the
    // whole keyspace as it is now.
    use Cmd::*;
    let dep = match cmd {
        _ if write => c.store.version,
        Get | MGet | Exists | Touch | Strlen | Ttl | PTtl | ExpireTime | PExpireTime | Type => {
            c.store.read_dep
        }
        Ping | Echo | Select | Hello | Auth | Quit | Client | Command => 0,
        _ => c.store.version,
    };
    c.client.dep = c.client.dep.max(dep);
    if res.is_err() || out.failed() {
        out.rollback(mark);
        out.raw(OOM);
    }
}

fn run(cmd: Cmd, c: &mut Ctx, a: &Args) -> Res {
    use Cmd::*;
    match cmd {
        Get => strings::get(c, a),
        Set => strings::set(c, a),
        SetNx => strings::setnx(c, a),
        SetEx => strings::setex(c, a, true),
        PSetEx => strings::setex(c, a, false),
        GetSet => strings::getset(c, a),
        GetDel => strings::getdel(c, a),
        GetEx => strings::getex(c, a),
        Incr => strings::incr_by(c, a.get(1), 1),
        Decr => strings::incr_by(c, a.get(1), -1),
        IncrBy => strings::incrby(c, a, false),
        DecrBy => strings::incrby(c, a, true),
        Append => strings::append(c, a),
        Strlen => strings::strlen(c, a),
        MSet => strings::mset(c, a, false),
        MSetNx => strings::mset(c, a, true),
        MGet => strings::mget(c, a),
        Del | Unlink => keys::del(c, a),
        Exists | Touch => keys::exists(c, a),
        Keys => keys::keys(c, a),
        Scan => keys::scan(c, a),
        DbSize => keys::dbsize(c),
        FlushAll | FlushDb => keys::flush(c, a),
        Ttl => keys::ttl(c, a, false, false),
        PTtl => keys::ttl(c, a, true, false),
        ExpireTime => keys::ttl(c, a, false, true),
        PExpireTime => keys::ttl(c, a, true, true),
        Expire => keys::expire(c, a, "expire", true, true),
        PExpire => keys::expire(c, a, "pexpire", false, true),
        ExpireAt => keys::expire(c, a, "expireat", true, false),
        PExpireAt => keys::expire(c, a, "pexpireat", false, false),
        Persist => keys::persist(c, a),
        Type => keys::key_type(c, a),
        Select => keys::select(c, a),
        Ping => server::ping(c, a),
        Echo => {
            c.out.bulk(a.get(1));
            Ok(())
        }
        Info => server::info(c, a),
        Command => server::command(c, a),
        Client => server::client(c, a),
        Config => server::config(c, a),
        Hello => server::hello(c, a),
        Auth => server::auth(c, a),
        Quit => {
            c.out.ok();
            c.client.closing = true;
            Ok(())
        }
    }
}

/// `-ERR unknown command 'name', with args beginning with: 'a' 'b' `, built
/// like Redis: the name and the argument list each cut at 128 bytes.
fn unknown_command(args: &Args, out: &mut Out) {
    let name = args.get(0);
    let name = &name[..name.len().min(128)];
    let mut list = [0u8; 140];
    let mut n = 0;
    for i in 1..args.len() {
        if n >= 128 {
            break;
        }
        let arg = args.get(i);
        let take = arg.len().min(128 - n);
        list[n] = b'\'';
        list[n + 1..n + 1 + take].copy_from_slice(&arg[..take]);
        list[n + 1 + take..n + 3 + take].copy_from_slice(b"' ");
        n += take + 3;
    }
    out.err_parts(&[
        b"unknown command '",
        name,
        b"', with args beginning with: ",
        &list[..n],
    ]);
}

pub(crate) fn wrong_arity(out: &mut Out, name: &str) {
    out.err_parts(&[
        b"wrong number of arguments for '",
        name.as_bytes(),
        b"' command",
    ]);
}

pub(crate) fn syntax_error(out: &mut Out) {
    out.err(b"syntax error");
}

pub(crate) fn not_integer(out: &mut Out) {
    out.err(b"value is not an integer or out of range");
}

/// Parses an integer argument, replying the Redis error when it is not one.
pub(crate) fn int_arg(out: &mut Out, arg: &[u8]) -> Option<i64> {
    let v = parse_i64(arg);
    if v.is_none() {
        not_integer(out);
    }
    v
}

/// Looks a key up for reading, counting keyspace hits and misses.
#[inline]
pub(crate) fn read(c: &mut Ctx, key: &[u8]) -> Option<u32> {
    match c.store.lookup(key, c.now) {
        Lookup::Found(i) => {
            c.store.stats.hits += 1;
            Some(i)
        }
        Lookup::Absent(_) => {
            c.store.stats.misses += 1;
            None
        }
    }
}

/// The caller's clock as Redis's signed milliseconds.
#[inline]
pub(crate) fn now_i64(c: &Ctx) -> i64 {
    i64::try_from(c.now).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_round_trip() {
        for &cmd in ALL {
            let spec = cmd.spec();
            assert_eq!(lookup(spec.name.as_bytes()), Some(cmd), "{}", spec.name);
            assert!(spec.name.len() <= 24);
            assert_eq!(spec.name, spec.name.to_ascii_lowercase());
        }
        assert_eq!(lookup(b"nope"), None);
    }

    #[test]
    fn arity_rules() {
        assert!(arity_ok(2, 2));
        assert!(!arity_ok(2, 3));
        assert!(arity_ok(-3, 3));
        assert!(arity_ok(-3, 7));
        assert!(!arity_ok(-3, 2));
    }
}
