//! Keyspace commands: DEL/UNLINK, EXISTS/TOUCH, KEYS, SCAN, DBSIZE,
//! FLUSHALL/FLUSHDB, TTL/PTTL/EXPIRETIME/PEXPIRETIME, EXPIRE/PEXPIRE/
//! EXPIREAT/PEXPIREAT (with NX/XX/GT/LT), PERSIST, TYPE and SELECT,
//! following Redis 7's db.c and expire.c.

use super::{int_arg, now_i64, syntax_error, Args, Ctx, Res};
use crate::glob::glob_match;
use crate::num::{eq_nocase, parse_u64};
use crate::store::Lookup;

pub(super) fn del(c: &mut Ctx, a: &Args) -> Res {
    let mut n = 0;
    for j in 1..a.len() {
        if c.store.remove(a.get(j), c.now) {
            n += 1;
        }
    }
    c.out.int(n);
    Ok(())
}

/// EXISTS and TOUCH: how many of the keys (repeats counted) exist.
pub(super) fn exists(c: &mut Ctx, a: &Args) -> Res {
    let mut n = 0;
    for j in 1..a.len() {
        if let Lookup::Found(_) = c.store.lookup(a.get(j), c.now) {
            n += 1;
        }
    }
    c.out.int(n);
    Ok(())
}

pub(super) fn keys(c: &mut Ctx, a: &Args) -> Res {
    let pattern = a.get(1);
    let all = pattern == b"*";
    let mark = c.out.mark();
    let mut n = 0usize;
    let out = &mut *c.out;
    c.store.for_each_key(c.now, |k| {
        if all || glob_match(pattern, k) {
            out.bulk(k);
            n += 1;
        }
    });
    c.out.insert_array_header(mark, n);
    Ok(())
}

/// Whether SCAN's TYPE argument names a Redis type; only "string" exists here.
fn type_filter(c: &mut Ctx, name: &[u8]) -> Option<bool> {
    const OTHERS: [&[u8]; 5] = [b"list", b"set", b"zset", b"hash", b"stream"];
    if eq_nocase(name, b"string") {
        return Some(true);
    }
    if OTHERS.iter().any(|t| eq_nocase(name, t)) {
        return Some(false);
    }
    c.out.err_parts(&[b"unknown type name '", name, b"'"]);
    None
}

pub(super) fn scan(c: &mut Ctx, a: &Args) -> Res {
    let Some(cursor) = parse_u64(a.get(1)) else {
        c.out.err(b"invalid cursor");
        return Ok(());
    };
    let mut count = 10usize;
    let mut pattern: Option<&[u8]> = None;
    let mut type_ok = true;
    let mut i = 2;
    while i < a.len() {
        let opt = a.get(i);
        let more = a.len() - i >= 2;
        if eq_nocase(opt, b"count") && more {
            let Some(n) = int_arg(c.out, a.get(i + 1)) else {
                return Ok(());
            };
            if n < 1 {
                syntax_error(c.out);
                return Ok(());
            }
            count = usize::try_from(n).unwrap_or(usize::MAX);
        } else if eq_nocase(opt, b"match") && more {
            let p = a.get(i + 1);
            pattern = (p != b"*").then_some(p);
        } else if eq_nocase(opt, b"type") && more {
            match type_filter(c, a.get(i + 1)) {
                Some(ok) => type_ok = ok,
                None => return Ok(()),
            }
        } else {
            syntax_error(c.out);
            return Ok(());
        }
        i += 2;
    }
    let mark = c.out.mark();
    let mut n = 0usize;
    let out = &mut *c.out;
    let next = c.store.scan(cursor, count, c.now, |k| {
        if type_ok && pattern.is_none_or(|p| glob_match(p, k)) {
            out.bulk(k);
            n += 1;
        }
    });
    let mut cur = itoa::Buffer::new();
    let cur = cur.format(next).as_bytes();
    let mut len = itoa::Buffer::new();
    let len = len.format(cur.len()).as_bytes();
    let mut cnt = itoa::Buffer::new();
    let cnt = cnt.format(n).as_bytes();
    let mut header = [0u8; 64];
    let mut h = 0;
    for part in [&b"*2\r\n$"[..], len, b"\r\n", cur, b"\r\n*", cnt, b"\r\n"] {
        header[h..h + part.len()].copy_from_slice(part);
        h += part.len();
    }
    c.out.insert_at(mark, &header[..h]);
    Ok(())
}

pub(super) fn dbsize(c: &mut Ctx) -> Res {
    c.out.int(c.store.len() as i64);
    Ok(())
}

/// FLUSHALL / FLUSHDB [SYNC|ASYNC] (both are synchronous here).
pub(super) fn flush(c: &mut Ctx, a: &Args) -> Res {
    if a.len() > 2
        || (a.len() == 2 && !eq_nocase(a.get(1), b"sync") && !eq_nocase(a.get(1), b"async"))
    {
        syntax_error(c.out);
        return Ok(());
    }
    c.store.flush();
    c.out.ok();
    Ok(())
}

/// TTL, PTTL (`ms`), EXPIRETIME, PEXPIRETIME (`abs`).
pub(super) fn ttl(c: &mut Ctx, a: &Args, ms: bool, abs: bool) -> Res {
    let i = match c.store.lookup(a.get(1), c.now) {
        Lookup::Found(i) => i,
        Lookup::Absent(_) => {
            c.out.int(-2);
            return Ok(());
        }
    };
    let Some(at) = c.store.expire_at(i) else {
        c.out.int(-1);
        return Ok(());
    };
    let t = if abs { at } else { at.saturating_sub(c.now) };
    let t = i64::try_from(t).unwrap_or(i64::MAX);
    c.out.int(if ms { t } else { t.saturating_add(500) / 1000 });
    Ok(())
}

const E_NX: u8 = 1;
const E_XX: u8 = 2;
const E_GT: u8 = 4;
const E_LT: u8 = 8;

/// EXPIRE family: `seconds` unit, `relative` to now (EXPIRE/PEXPIRE) or absolute.
pub(super) fn expire(c: &mut Ctx, a: &Args, name: &str, seconds: bool, relative: bool) -> Res {
    let mut flags = 0u8;
    for j in 3..a.len() {
        let opt = a.get(j);
        flags |= if eq_nocase(opt, b"nx") {
            E_NX
        } else if eq_nocase(opt, b"xx") {
            E_XX
        } else if eq_nocase(opt, b"gt") {
            E_GT
        } else if eq_nocase(opt, b"lt") {
            E_LT
        } else {
            c.out.err_parts(&[b"Unsupported option ", opt]);
            return Ok(());
        };
    }
    if flags & E_NX != 0 && flags & (E_XX | E_GT | E_LT) != 0 {
        c.out
            .err(b"NX and XX, GT or LT options at the same time are not compatible");
        return Ok(());
    }
    if flags & E_GT != 0 && flags & E_LT != 0 {
        c.out
            .err(b"GT and LT options at the same time are not compatible");
        return Ok(());
    }
    let Some(mut when) = int_arg(c.out, a.get(2)) else {
        return Ok(());
    };
    let invalid = |c: &mut Ctx| {
        c.out
            .err_parts(&[b"invalid expire time in '", name.as_bytes(), b"' command"]);
        Ok(())
    };
    if seconds {
        match when.checked_mul(1000) {
            Some(v) => when = v,
            None => return invalid(c),
        }
    }
    if relative {
        match when.checked_add(now_i64(c)) {
            Some(v) => when = v,
            None => return invalid(c),
        }
    }
    let Lookup::Found(i) = c.store.lookup(a.get(1), c.now) else {
        c.out.int(0);
        return Ok(());
    };
    if flags != 0 {
        let current = c
            .store
            .expire_at(i)
            .map(|t| i64::try_from(t).unwrap_or(i64::MAX));
        let refuse = match current {
            Some(cur) => {
                flags & E_NX != 0
                    || (flags & E_GT != 0 && when <= cur)
                    || (flags & E_LT != 0 && when >= cur)
            }
            // No TTL counts as infinite: XX and GT fail, LT succeeds.
            None => flags & (E_XX | E_GT) != 0,
        };
        if refuse {
            c.out.int(0);
            return Ok(());
        }
    }
    if when <= now_i64(c) {
        c.store.remove_idx(i);
    } else {
        c.store.set_expire(i, when as u64)?;
    }
    c.out.int(1);
    Ok(())
}

pub(super) fn persist(c: &mut Ctx, a: &Args) -> Res {
    let done = match c.store.lookup(a.get(1), c.now) {
        Lookup::Found(i) => c.store.persist(i),
        Lookup::Absent(_) => false,
    };
    c.out.int(i64::from(done));
    Ok(())
}

pub(super) fn key_type(c: &mut Ctx, a: &Args) -> Res {
    match c.store.lookup(a.get(1), c.now) {
        Lookup::Found(_) => c.out.simple(b"string"),
        Lookup::Absent(_) => c.out.simple(b"none"),
    }
    Ok(())
}

/// SELECT: only database 0 exists.
pub(super) fn select(c: &mut Ctx, a: &Args) -> Res {
    let Some(db) = int_arg(c.out, a.get(1)) else {
        return Ok(());
    };
    if i32::try_from(db).is_err() {
        c.out
            .err(b"value is out of range, value must between -2147483648 and 2147483647");
    } else if db != 0 {
        c.out.err(b"DB index is out of range");
    } else {
        c.out.ok();
    }
    Ok(())
}
