//! Number parsing exactly as Redis does it (`string2ll`, `string2ull`) and
//! small byte-string helpers shared by the parser and the commands.

/// Longest decimal an `i64` can need, sign included (Redis's `LONG_STR_SIZE` is 21).
const LONG_STR_SIZE: usize = 21;

/// Parses a strict decimal `i64` like Redis's `string2ll`: no spaces, no `+`,
/// no leading zeros (except `0` itself), no `-0`, nothing after the digits.
pub(crate) fn parse_i64(s: &[u8]) -> Option<i64> {
    if s.is_empty() || s.len() >= LONG_STR_SIZE {
        return None;
    }
    if s == b"0" {
        return Some(0);
    }
    let (negative, digits) = match s.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, s),
    };
    let (&first, rest) = digits.split_first()?;
    if !(b'1'..=b'9').contains(&first) {
        return None;
    }
    let mut v = u64::from(first - b'0');
    for &c in rest {
        if !c.is_ascii_digit() {
            return None;
        }
        v = v.checked_mul(10)?.checked_add(u64::from(c - b'0'))?;
    }
    if negative {
        if v > i64::MAX as u64 + 1 {
            return None;
        }
        // v is at most 2^63 here, so the wrapping negation is exact.
        Some((v as i64).wrapping_neg())
    } else {
        i64::try_from(v).ok()
    }
}

/// Parses a SCAN cursor like Redis's `string2ull`: a non-negative `string2ll`
/// value, or else plain decimal digits up to `u64::MAX`.
pub(crate) fn parse_u64(s: &[u8]) -> Option<u64> {
    if let Some(v) = parse_i64(s) {
        return u64::try_from(v).ok();
    }
    if s.is_empty() || !s.iter().all(u8::is_ascii_digit) {
        return None;
    }
    s.iter().try_fold(0u64, |acc, &c| {
        acc.checked_mul(10)?.checked_add(u64::from(c - b'0'))
    })
}

/// ASCII case-insensitive equality with a lowercase literal.
#[inline]
pub(crate) fn eq_nocase(a: &[u8], lower: &[u8]) -> bool {
    a.eq_ignore_ascii_case(lower)
}

/// Lowercases `name` into `buf`, returning the lowercase slice, or `None`
/// when it does not fit (no command name is that long).
#[inline]
pub(crate) fn lowercase<'a>(name: &[u8], buf: &'a mut [u8; 24]) -> Option<&'a [u8]> {
    let dst = buf.get_mut(..name.len())?;
    for (d, s) in dst.iter_mut().zip(name) {
        *d = s.to_ascii_lowercase();
    }
    Some(dst)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn string2ll_cases() {
        assert_eq!(parse_i64(b"0"), Some(0));
        assert_eq!(parse_i64(b"12345"), Some(12345));
        assert_eq!(parse_i64(b"-1"), Some(-1));
        assert_eq!(parse_i64(b"9223372036854775807"), Some(i64::MAX));
        assert_eq!(parse_i64(b"-9223372036854775808"), Some(i64::MIN));
        for bad in [
            &b""[..],
            b"-",
            b"-0",
            b"00",
            b"01",
            b"+1",
            b" 1",
            b"1 ",
            b"1a",
            b"9223372036854775808",
            b"-9223372036854775809",
            b"99999999999999999999",
            b"1.5",
        ] {
            assert_eq!(parse_i64(bad), None, "{:?}", core::str::from_utf8(bad));
        }
    }

    #[test]
    fn cursor_parsing() {
        assert_eq!(parse_u64(b"0"), Some(0));
        assert_eq!(parse_u64(b"18446744073709551615"), Some(u64::MAX));
        assert_eq!(parse_u64(b"18446744073709551616"), None);
        assert_eq!(parse_u64(b"-1"), None);
        assert_eq!(parse_u64(b"abc"), None);
        assert_eq!(parse_u64(b"007"), Some(7));
    }

    #[test]
    fn lowercase_fits_or_not() {
        let mut buf = [0u8; 24];
        assert_eq!(lowercase(b"GeT", &mut buf), Some(&b"get"[..]));
        let mut buf = [0u8; 24];
        assert_eq!(lowercase(&[b'A'; 25], &mut buf), None);
        assert!(eq_nocase(b"KeepTTL", b"keepttl"));
        assert!(!eq_nocase(b"KeepTT", b"keepttl"));
    }
}
