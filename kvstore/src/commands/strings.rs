//! String commands: SET (with EX/PX/EXAT/PXAT/NX/XX/GET/KEEPTTL), SETNX,
//! SETEX, PSETEX, GET, GETSET, GETDEL, GETEX, INCR/DECR/INCRBY/DECRBY,
//! APPEND, STRLEN, MSET, MSETNX and MGET, following Redis 7's t_string.c.

use super::{int_arg, not_integer, now_i64, read, syntax_error, wrong_arity, Args, Ctx, Res};
use crate::num::{eq_nocase, parse_i64};
use crate::resp::MAX_BULK;
use crate::store::{Lookup, Ttl, ENTRY_OVERHEAD};

const NX: u16 = 1;
const XX: u16 = 2;
const GET: u16 = 4;
const KEEPTTL: u16 = 8;
const PERSIST: u16 = 16;
const EX: u16 = 32;
const PX: u16 = 64;
const EXAT: u16 = 128;
const PXAT: u16 = 256;
const ANY_EXPIRE: u16 = EX | PX | EXAT | PXAT;

/// Parses SET's (`set == true`, options from argument 3) or GETEX's
/// (options from argument 2) options with Redis's exact exclusivity rules.
/// Replies a syntax error and returns `None` on failure.
fn parse_options<'a>(c: &mut Ctx, a: &Args<'a>, set: bool) -> Option<(u16, Option<&'a [u8]>)> {
    let mut flags = 0u16;
    let mut expire = None;
    let mut j = if set { 3 } else { 2 };
    while j < a.len() {
        let opt = a.get(j);
        let next = (j + 1 < a.len()).then(|| a.get(j + 1));
        let timed = |f: u16, excl: u16| f & (excl | KEEPTTL | PERSIST) == 0 && next.is_some();
        let new = if set && eq_nocase(opt, b"nx") && flags & XX == 0 {
            NX
        } else if set && eq_nocase(opt, b"xx") && flags & NX == 0 {
            XX
        } else if set && eq_nocase(opt, b"get") {
            GET
        } else if set && eq_nocase(opt, b"keepttl") && flags & (PERSIST | ANY_EXPIRE) == 0 {
            KEEPTTL
        } else if !set && eq_nocase(opt, b"persist") && flags & (ANY_EXPIRE | KEEPTTL) == 0 {
            PERSIST
        } else if eq_nocase(opt, b"ex") && timed(flags, EXAT | PX | PXAT) {
            EX
        } else if eq_nocase(opt, b"px") && timed(flags, EX | EXAT | PXAT) {
            PX
        } else if eq_nocase(opt, b"exat") && timed(flags, EX | PX | PXAT) {
            EXAT
        } else if eq_nocase(opt, b"pxat") && timed(flags, EX | EXAT | PX) {
            PXAT
        } else {
            syntax_error(c.out);
            return None;
        };
        if new & ANY_EXPIRE != 0 {
            expire = next;
            j += 1;
        }
        flags |= new;
        j += 1;
    }
    Some((flags, expire))
}

/// Turns an EX/PX/EXAT/PXAT argument into an absolute time in ms, replying
/// Redis's error (`cmd` names the command) when invalid.
fn expire_ms(c: &mut Ctx, arg: &[u8], flags: u16, cmd: &str) -> Option<u64> {
    let v = int_arg(c.out, arg)?;
    let seconds = flags & (EX | EXAT) != 0;
    let invalid = |c: &mut Ctx| {
        c.out
            .err_parts(&[b"invalid expire time in '", cmd.as_bytes(), b"' command"]);
        None
    };
    if v <= 0 || (seconds && v > i64::MAX / 1000) {
        return invalid(c);
    }
    let mut ms = if seconds { v * 1000 } else { v };
    if flags & (EX | PX) != 0 {
        match ms.checked_add(now_i64(c)) {
            Some(t) => ms = t,
            None => return invalid(c),
        }
    }
    Some(ms as u64)
}

/// The common part of SET, SETNX, SETEX and PSETEX.
fn set_generic(
    c: &mut Ctx,
    key: &[u8],
    val: &[u8],
    flags: u16,
    expire_at: Option<u64>,
    ok_reply: &[u8],
    abort_reply: &[u8],
) -> Res {
    if flags & GET != 0 {
        match read(c, key) {
            Some(i) => c.out.bulk(c.store.value(i)),
            None => c.out.null(),
        }
    }
    let found = c.store.lookup(key, c.now);
    let exists = matches!(found, Lookup::Found(_));
    if (flags & NX != 0 && exists) || (flags & XX != 0 && !exists) {
        if flags & GET == 0 {
            c.out.raw(abort_reply);
        }
        return Ok(());
    }
    let ttl = match expire_at {
        Some(t) => Ttl::At(t),
        None if flags & KEEPTTL != 0 => Ttl::Keep,
        None => Ttl::Clear,
    };
    match found {
        Lookup::Found(i) => c.store.overwrite(i, val, ttl)?,
        Lookup::Absent(h) => {
            c.store.insert(h, key, val, ttl)?;
        }
    }
    if flags & GET == 0 {
        c.out.raw(ok_reply);
    }
    Ok(())
}

pub(super) fn set(c: &mut Ctx, a: &Args) -> Res {
    let (key, val) = (a.get(1), a.get(2));
    if a.len() == 3 {
        // The common case, with a single lookup.
        match c.store.lookup(key, c.now) {
            Lookup::Found(i) => c.store.overwrite(i, val, Ttl::Clear)?,
            Lookup::Absent(h) => {
                c.store.insert(h, key, val, Ttl::Clear)?;
            }
        }
        c.out.ok();
        return Ok(());
    }
    let Some((flags, expire)) = parse_options(c, a, true) else {
        return Ok(());
    };
    let at = match expire {
        Some(arg) => match expire_ms(c, arg, flags, "set") {
            Some(t) => Some(t),
            None => return Ok(()),
        },
        None => None,
    };
    set_generic(c, key, val, flags, at, b"+OK\r\n", b"$-1\r\n")
}

pub(super) fn setnx(c: &mut Ctx, a: &Args) -> Res {
    set_generic(c, a.get(1), a.get(2), NX, None, b":1\r\n", b":0\r\n")
}

/// SETEX (`seconds`) and PSETEX.
pub(super) fn setex(c: &mut Ctx, a: &Args, seconds: bool) -> Res {
    let (flags, name) = if seconds {
        (EX, "setex")
    } else {
        (PX, "psetex")
    };
    let Some(at) = expire_ms(c, a.get(2), flags, name) else {
        return Ok(());
    };
    set_generic(
        c,
        a.get(1),
        a.get(3),
        flags,
        Some(at),
        b"+OK\r\n",
        b"$-1\r\n",
    )
}

pub(super) fn get(c: &mut Ctx, a: &Args) -> Res {
    match read(c, a.get(1)) {
        Some(i) => c.out.bulk(c.store.value(i)),
        None => c.out.null(),
    }
    Ok(())
}

pub(super) fn getset(c: &mut Ctx, a: &Args) -> Res {
    set_generic(c, a.get(1), a.get(2), GET, None, b"", b"")
}

pub(super) fn getdel(c: &mut Ctx, a: &Args) -> Res {
    match read(c, a.get(1)) {
        Some(i) => {
            c.out.bulk(c.store.value(i));
            c.store.remove_idx(i);
        }
        None => c.out.null(),
    }
    Ok(())
}

pub(super) fn getex(c: &mut Ctx, a: &Args) -> Res {
    let Some((flags, expire)) = parse_options(c, a, false) else {
        return Ok(());
    };
    let at = match expire {
        Some(arg) => match expire_ms(c, arg, flags, "getex") {
            Some(t) => Some(t),
            None => return Ok(()),
        },
        None => None,
    };
    let Some(i) = read(c, a.get(1)) else {
        c.out.null();
        return Ok(());
    };
    c.out.bulk(c.store.value(i));
    match at {
        // Redis deletes a key whose new expiry time is already past.
        Some(t) if t <= c.now => c.store.remove_idx(i),
        Some(t) => c.store.set_expire(i, t)?,
        None if flags & PERSIST != 0 => {
            c.store.persist(i);
        }
        None => {}
    }
    Ok(())
}

/// INCR/DECR/INCRBY/DECRBY on `key` by `incr`.
pub(super) fn incr_by(c: &mut Ctx, key: &[u8], incr: i64) -> Res {
    let found = c.store.lookup(key, c.now);
    let old = match found {
        Lookup::Found(i) => match parse_i64(c.store.value(i)) {
            Some(v) => v,
            None => {
                not_integer(c.out);
                return Ok(());
            }
        },
        Lookup::Absent(_) => 0,
    };
    let Some(new) = old.checked_add(incr) else {
        c.out.err(b"increment or decrement would overflow");
        return Ok(());
    };
    let mut buf = itoa::Buffer::new();
    let digits = buf.format(new).as_bytes();
    match found {
        Lookup::Found(i) => c.store.overwrite(i, digits, Ttl::Keep)?,
        Lookup::Absent(h) => {
            c.store.insert(h, key, digits, Ttl::Clear)?;
        }
    }
    c.out.int(new);
    Ok(())
}

/// INCRBY, or DECRBY when `negate`.
pub(super) fn incrby(c: &mut Ctx, a: &Args, negate: bool) -> Res {
    let Some(by) = int_arg(c.out, a.get(2)) else {
        return Ok(());
    };
    if !negate {
        return incr_by(c, a.get(1), by);
    }
    match by.checked_neg() {
        Some(by) => incr_by(c, a.get(1), by),
        None => {
            c.out.err(b"decrement would overflow");
            Ok(())
        }
    }
}

pub(super) fn append(c: &mut Ctx, a: &Args) -> Res {
    let (key, data) = (a.get(1), a.get(2));
    let len = match c.store.lookup(key, c.now) {
        Lookup::Found(i) => {
            if c.store.value(i).len() + data.len() > MAX_BULK {
                c.out
                    .err(b"string exceeds maximum allowed size (proto-max-bulk-len)");
                return Ok(());
            }
            c.store.append(i, data)?
        }
        Lookup::Absent(h) => {
            c.store.insert(h, key, data, Ttl::Clear)?;
            data.len()
        }
    };
    c.out.int(len as i64);
    Ok(())
}

pub(super) fn strlen(c: &mut Ctx, a: &Args) -> Res {
    let n = read(c, a.get(1)).map_or(0, |i| c.store.value(i).len());
    c.out.int(n as i64);
    Ok(())
}

/// MSET, or MSETNX when `nx`.
pub(super) fn mset(c: &mut Ctx, a: &Args, nx: bool) -> Res {
    if a.len() % 2 == 0 {
        wrong_arity(c.out, if nx { "msetnx" } else { "mset" });
        return Ok(());
    }
    // Check existence (MSETNX) and the memory the whole command needs before
    // writing anything, so that it is refused as a whole.
    let mut grow = 0usize;
    for j in (1..a.len()).step_by(2) {
        let (key, val) = (a.get(j), a.get(j + 1));
        match c.store.lookup(key, c.now) {
            Lookup::Found(_) if nx => {
                c.out.int(0);
                return Ok(());
            }
            Lookup::Found(i) => grow += val.len().saturating_sub(c.store.value(i).len()),
            Lookup::Absent(_) => grow += key.len() + val.len() + ENTRY_OVERHEAD,
        }
    }
    if c.store.would_exceed(grow) {
        return Err(crate::store::Oom);
    }
    for j in (1..a.len()).step_by(2) {
        let (key, val) = (a.get(j), a.get(j + 1));
        match c.store.lookup(key, c.now) {
            Lookup::Found(i) => c.store.overwrite(i, val, Ttl::Clear)?,
            Lookup::Absent(h) => {
                c.store.insert(h, key, val, Ttl::Clear)?;
            }
        }
    }
    if nx {
        c.out.int(1);
    } else {
        c.out.ok();
    }
    Ok(())
}

pub(super) fn mget(c: &mut Ctx, a: &Args) -> Res {
    c.out.array(a.len() - 1);
    for j in 1..a.len() {
        match read(c, a.get(j)) {
            Some(i) => c.out.bulk(c.store.value(i)),
            None => c.out.null(),
        }
    }
    Ok(())
}
