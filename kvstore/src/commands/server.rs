//! Connection and server commands: PING, INFO, COMMAND (COUNT/DOCS/INFO/
//! LIST), CLIENT (ID/SETNAME/GETNAME/SETINFO), CONFIG (GET/SET/RESETSTAT),
//! HELLO and AUTH — enough for redis-cli and redis-benchmark to talk to us.

use alloc::vec::Vec;

use super::{lookup, wrong_arity, Args, Cmd, Ctx, Res, ALL};
use crate::glob::glob_match_nocase;
use crate::num::{eq_nocase, lowercase, parse_i64};
use crate::store::{Oom, Stats, Store};

/// The Redis version we answer to (clients gate features on it).
pub(crate) const REDIS_VERSION: &str = "7.2.4";

pub(super) fn ping(c: &mut Ctx, a: &Args) -> Res {
    match a.len() {
        1 => c.out.simple(b"PONG"),
        2 => c.out.bulk(a.get(1)),
        _ => wrong_arity(c.out, "ping"),
    }
    Ok(())
}

/// A text buffer that fails instead of aborting when it cannot grow.
struct Text {
    buf: Vec<u8>,
    failed: bool,
}

impl Text {
    fn push(&mut self, parts: &[&[u8]]) {
        let n = parts.iter().map(|p| p.len()).sum();
        if self.failed || self.buf.try_reserve(n).is_err() {
            self.failed = true;
            return;
        }
        for p in parts {
            self.buf.extend_from_slice(p);
        }
    }

    fn field(&mut self, name: &str, value: &[u8]) {
        self.push(&[name.as_bytes(), b":", value, b"\r\n"]);
    }

    fn num(&mut self, name: &str, value: u64) {
        let mut b = itoa::Buffer::new();
        self.field(name, b.format(value).as_bytes());
    }
}

/// `1.50M`-style sizes like Redis's `bytesToHuman`.
fn human(bytes: u64, out: &mut [u8; 32]) -> &[u8] {
    const UNITS: [(u64, u8); 5] = [
        (1 << 50, b'P'),
        (1 << 40, b'T'),
        (1 << 30, b'G'),
        (1 << 20, b'M'),
        (1 << 10, b'K'),
    ];
    let mut b = itoa::Buffer::new();
    let Some(&(unit, suffix)) = UNITS.iter().find(|(u, _)| bytes >= *u) else {
        let s = b.format(bytes).as_bytes();
        out[..s.len()].copy_from_slice(s);
        out[s.len()] = b'B';
        return &out[..s.len() + 1];
    };
    let hundredths = (u128::from(bytes) * 100 / u128::from(unit)) as u64;
    let whole = b.format(hundredths / 100).as_bytes();
    let mut n = whole.len();
    out[..n].copy_from_slice(whole);
    let frac = hundredths % 100;
    out[n..n + 4].copy_from_slice(&[
        b'.',
        b'0' + (frac / 10) as u8,
        b'0' + (frac % 10) as u8,
        suffix,
    ]);
    n += 4;
    &out[..n]
}

const SECTIONS: [&[u8]; 4] = [b"server", b"memory", b"stats", b"keyspace"];

fn info_section(t: &mut Text, section: &[u8], store: &Store, now: u64) {
    let s: &Stats = &store.stats;
    match section {
        b"server" => {
            let up = now.saturating_sub(s.start_ms.unwrap_or(now)) / 1000;
            t.push(&[b"# Server\r\n"]);
            t.field("redis_version", REDIS_VERSION.as_bytes());
            t.field("redis_git_sha1", b"00000000");
            t.field("redis_mode", b"standalone");
            t.field("os", b"nvhv guest");
            t.field("arch_bits", b"64");
            t.field("server_name", b"nvhv-kvstore");
            t.field("kvstore_version", env!("CARGO_PKG_VERSION").as_bytes());
            t.num("uptime_in_seconds", up);
            t.num("uptime_in_days", up / 86400);
        }
        b"memory" => {
            let (used, limit) = (store.used_bytes() as u64, store.mem_limit() as u64);
            let limit = if limit == u64::MAX { 0 } else { limit };
            let mut h = [0u8; 32];
            t.push(&[b"# Memory\r\n"]);
            t.num("used_memory", used);
            t.field("used_memory_human", human(used, &mut h));
            t.num("maxmemory", limit);
            t.field("maxmemory_human", human(limit, &mut h));
            t.field("maxmemory_policy", b"noeviction");
        }
        b"stats" => {
            t.push(&[b"# Stats\r\n"]);
            t.num("total_commands_processed", s.commands);
            t.num("rejected_calls", s.rejected);
            t.num("expired_keys", s.expired);
            t.num("evicted_keys", 0);
            t.num("keyspace_hits", s.hits);
            t.num("keyspace_misses", s.misses);
        }
        _ => {
            t.push(&[b"# Keyspace\r\n"]);
            if !store.is_empty() {
                let (mut k, mut e) = (itoa::Buffer::new(), itoa::Buffer::new());
                t.push(&[
                    b"db0:keys=",
                    k.format(store.len()).as_bytes(),
                    b",expires=",
                    e.format(store.expires_len()).as_bytes(),
                    b",avg_ttl=0\r\n",
                ]);
            }
        }
    }
}

/// INFO [section ...]: `server`, `memory`, `stats`, `keyspace`, or
/// `default`/`all`/`everything` for all of them; unknown names are ignored.
pub(super) fn info(c: &mut Ctx, a: &Args) -> Res {
    let mut wanted = [a.len() == 1; 4];
    for j in 1..a.len() {
        let arg = a.get(j);
        if [&b"default"[..], b"all", b"everything"]
            .iter()
            .any(|n| eq_nocase(arg, n))
        {
            wanted = [true; 4];
        }
        for (w, name) in wanted.iter_mut().zip(SECTIONS) {
            *w |= eq_nocase(arg, name);
        }
    }
    let mut t = Text {
        buf: Vec::new(),
        failed: false,
    };
    for (name, _) in SECTIONS.iter().zip(wanted).filter(|(_, w)| *w) {
        if !t.buf.is_empty() {
            t.push(&[b"\r\n"]);
        }
        info_section(&mut t, name, c.store, c.now);
    }
    if t.failed {
        return Err(Oom);
    }
    c.out.bulk(&t.buf);
    Ok(())
}

/// One COMMAND INFO entry in Redis 7's 10-element shape.
fn command_info(c: &mut Ctx, cmd: Cmd) {
    let s = cmd.spec();
    c.out.array(10);
    c.out.bulk(s.name.as_bytes());
    c.out.int(i64::from(s.arity));
    c.out.array(s.flags.len());
    for f in s.flags {
        c.out.simple(f.as_bytes());
    }
    c.out.int(i64::from(s.first_key));
    c.out.int(i64::from(s.last_key));
    c.out.int(i64::from(s.step));
    for _ in 0..4 {
        c.out.array(0); // ACL categories, tips, key specs, subcommands
    }
}

fn unknown_subcommand(c: &mut Ctx, sub: &[u8], container: &[u8]) {
    let sub = &sub[..sub.len().min(128)];
    c.out.err_parts(&[
        b"unknown subcommand '",
        sub,
        b"'. Try ",
        container,
        b" HELP.",
    ]);
}

/// Checks a subcommand's Redis arity, replying the error for `container|sub`.
fn sub_arity(c: &mut Ctx, a: &Args, arity: i32, full: &str) -> bool {
    let ok = if arity >= 0 {
        a.len() == arity as usize
    } else {
        a.len() >= arity.unsigned_abs() as usize
    };
    if !ok {
        wrong_arity(c.out, full);
    }
    ok
}

fn find_command(name: &[u8]) -> Option<Cmd> {
    let mut lower = [0u8; 24];
    lowercase(name, &mut lower).and_then(lookup)
}

pub(super) fn command(c: &mut Ctx, a: &Args) -> Res {
    if a.len() == 1 {
        c.out.array(ALL.len());
        for &cmd in ALL {
            command_info(c, cmd);
        }
        return Ok(());
    }
    let sub = a.get(1);
    if eq_nocase(sub, b"count") {
        if sub_arity(c, a, 2, "command|count") {
            c.out.int(ALL.len() as i64);
        }
    } else if eq_nocase(sub, b"docs") {
        // redis-cli 7 asks for docs to build its hints; none is fine.
        c.out.array(0);
    } else if eq_nocase(sub, b"info") {
        if a.len() == 2 {
            c.out.array(ALL.len());
            for &cmd in ALL {
                command_info(c, cmd);
            }
        } else {
            c.out.array(a.len() - 2);
            for j in 2..a.len() {
                match find_command(a.get(j)) {
                    Some(cmd) => command_info(c, cmd),
                    None => c.out.null(),
                }
            }
        }
    } else if eq_nocase(sub, b"list") {
        c.out.array(ALL.len());
        for &cmd in ALL {
            c.out.bulk(cmd.spec().name.as_bytes());
        }
    } else {
        unknown_subcommand(c, sub, b"COMMAND");
    }
    Ok(())
}

/// Redis's `validateClientName`: printable ASCII without spaces.
fn valid_name(name: &[u8]) -> bool {
    name.iter().all(|&b| (b'!'..=b'~').contains(&b))
}

fn set_name(c: &mut Ctx, name: &[u8]) -> Result<bool, Oom> {
    if !valid_name(name) {
        c.out
            .err(b"Client names cannot contain spaces, newlines or special characters.");
        return Ok(false);
    }
    c.client.name = crate::store::try_copy(name)?;
    Ok(true)
}

fn client_id(c: &mut Ctx) -> u64 {
    if c.client.id == 0 {
        c.store.stats.clients += 1;
        c.client.id = c.store.stats.clients;
    }
    c.client.id
}

pub(super) fn client(c: &mut Ctx, a: &Args) -> Res {
    let sub = a.get(1);
    if eq_nocase(sub, b"id") {
        if sub_arity(c, a, 2, "client|id") {
            let id = client_id(c);
            c.out.int(id as i64);
        }
    } else if eq_nocase(sub, b"setname") {
        if sub_arity(c, a, 3, "client|setname") && set_name(c, a.get(2))? {
            c.out.ok();
        }
    } else if eq_nocase(sub, b"getname") {
        if sub_arity(c, a, 2, "client|getname") {
            if c.client.name.is_empty() {
                c.out.null();
            } else {
                c.out.bulk(&c.client.name);
            }
        }
    } else if eq_nocase(sub, b"setinfo") {
        if sub_arity(c, a, 4, "client|setinfo") {
            let attr = a.get(2);
            if eq_nocase(attr, b"lib-name") || eq_nocase(attr, b"lib-ver") {
                c.out.ok();
            } else {
                let attr = &attr[..attr.len().min(128)];
                c.out.err_parts(&[b"Unrecognized option '", attr, b"'"]);
            }
        }
    } else {
        unknown_subcommand(c, sub, b"CLIENT");
    }
    Ok(())
}

/// The configuration CONFIG GET reports (read-only).
fn config_params<'a>(
    store: &Store,
    limit_buf: &'a mut itoa::Buffer,
) -> [(&'static [u8], &'a [u8]); 6] {
    let limit = store.mem_limit();
    let limit = if limit == usize::MAX { 0 } else { limit };
    [
        (b"save", b""),
        (b"appendonly", b"no"),
        (b"appendfsync", b"everysec"),
        (b"maxmemory", limit_buf.format(limit).as_bytes()),
        (b"maxmemory-policy", b"noeviction"),
        (b"databases", b"1"),
    ]
}

pub(super) fn config(c: &mut Ctx, a: &Args) -> Res {
    let sub = a.get(1);
    if eq_nocase(sub, b"get") {
        if !sub_arity(c, a, -3, "config|get") {
            return Ok(());
        }
        let mut buf = itoa::Buffer::new();
        let params = config_params(c.store, &mut buf);
        let mut hit = [false; 6];
        for j in 2..a.len() {
            for (h, (name, _)) in hit.iter_mut().zip(&params) {
                *h |= glob_match_nocase(a.get(j), name);
            }
        }
        c.out.array(2 * hit.iter().filter(|h| **h).count());
        for (h, (name, value)) in hit.iter().zip(&params) {
            if *h {
                c.out.bulk(name);
                c.out.bulk(value);
            }
        }
    } else if eq_nocase(sub, b"set") {
        if sub_arity(c, a, -4, "config|set") {
            let name = a.get(2);
            let name = &name[..name.len().min(128)];
            c.out.err_parts(&[
                b"Unknown option or number of arguments for CONFIG SET - '",
                name,
                b"'",
            ]);
        }
    } else if eq_nocase(sub, b"resetstat") {
        if sub_arity(c, a, 2, "config|resetstat") {
            let s = &mut c.store.stats;
            (s.commands, s.rejected, s.expired, s.hits, s.misses) = (0, 0, 0, 0, 0);
            c.out.ok();
        }
    } else {
        unknown_subcommand(c, sub, b"CONFIG");
    }
    Ok(())
}

/// HELLO [2 [AUTH user pass] [SETNAME name]]: RESP3 is not spoken.
pub(super) fn hello(c: &mut Ctx, a: &Args) -> Res {
    let mut j = 1;
    if a.len() >= 2 {
        let Some(ver) = parse_i64(a.get(1)) else {
            c.out
                .err(b"Protocol version is not an integer or out of range");
            return Ok(());
        };
        if ver != 2 {
            c.out.raw(b"-NOPROTO unsupported protocol version\r\n");
            return Ok(());
        }
        j = 2;
    }
    let mut name = None;
    while j < a.len() {
        let opt = a.get(j);
        let more = a.len() - 1 - j;
        if eq_nocase(opt, b"auth") && more >= 2 {
            if !auth_ok(c, a.get(j + 1)) {
                return Ok(());
            }
            j += 3;
        } else if eq_nocase(opt, b"setname") && more >= 1 {
            name = Some(a.get(j + 1));
            j += 2;
        } else {
            let opt = &opt[..opt.len().min(128)];
            c.out
                .err_parts(&[b"Syntax error in HELLO option '", opt, b"'"]);
            return Ok(());
        }
    }
    if let Some(name) = name {
        if !set_name(c, name)? {
            return Ok(());
        }
    }
    let id = client_id(c);
    c.out.array(14);
    for (k, v) in [
        (&b"server"[..], &b"redis"[..]),
        (b"version", REDIS_VERSION.as_bytes()),
    ] {
        c.out.bulk(k);
        c.out.bulk(v);
    }
    c.out.bulk(b"proto");
    c.out.int(2);
    c.out.bulk(b"id");
    c.out.int(id as i64);
    c.out.bulk(b"mode");
    c.out.bulk(b"standalone");
    c.out.bulk(b"role");
    c.out.bulk(b"master");
    c.out.bulk(b"modules");
    c.out.array(0);
    Ok(())
}

/// There is no password: like Redis's passwordless `default` user, any
/// password is accepted for `default` and no other user exists.
fn auth_ok(c: &mut Ctx, user: &[u8]) -> bool {
    if user == b"default" {
        return true;
    }
    c.out
        .raw(b"-WRONGPASS invalid username-password pair or user is disabled.\r\n");
    false
}

pub(super) fn auth(c: &mut Ctx, a: &Args) -> Res {
    match a.len() {
        2 => c.out.err(
            b"AUTH <password> called without any password configured for the default user. \
              Are you sure your configuration is correct?",
        ),
        3 => {
            if auth_ok(c, a.get(1)) {
                c.out.ok();
            }
        }
        _ => super::syntax_error(c.out),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::human;

    #[test]
    fn human_sizes() {
        let mut b = [0u8; 32];
        assert_eq!(human(0, &mut b), b"0B");
        assert_eq!(human(1023, &mut b), b"1023B");
        assert_eq!(human(1536, &mut b), b"1.50K");
        assert_eq!(human(3 << 20, &mut b), b"3.00M");
        assert_eq!(human((1 << 30) + (1 << 29), &mut b), b"1.50G");
    }
}
