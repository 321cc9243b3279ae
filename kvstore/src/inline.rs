//! Splitting of inline commands (`PING\r\n`, `set "a b" 'c'` as typed into
//! telnet) into arguments, exactly like Redis's `sdssplitargs`: blanks
//! separate arguments, "double quotes" understand `\n \r \t \b \a \\ \xHH`,
//! 'single quotes' understand `\'`, and a closing quote must be followed by a
//! blank or the end of the line.

use alloc::vec::Vec;

/// Why a line could not be split.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum SplitError {
    /// Unterminated quotes, or a closing quote followed by something else.
    Unbalanced,
    /// The scratch buffers could not grow.
    Oom,
}

fn is_space(c: u8) -> bool {
    matches!(c, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c)
}

fn hex(c: u8) -> Option<u8> {
    (c as char).to_digit(16).map(|d| d as u8)
}

/// Splits `line` into `scratch` (the unescaped argument bytes) and `args`
/// (ranges into `scratch`). Both are cleared first. Like the C original,
/// the line ends at its first NUL byte.
pub(crate) fn split(
    line: &[u8],
    scratch: &mut Vec<u8>,
    args: &mut Vec<(usize, usize)>,
) -> Result<(), SplitError> {
    scratch.clear();
    args.clear();
    let line = match memchr::memchr(0, line) {
        Some(n) => &line[..n],
        None => line,
    };
    // Unescaped arguments are never longer than the line.
    scratch
        .try_reserve(line.len())
        .map_err(|_| SplitError::Oom)?;
    let at = |k: usize| line.get(k).copied().unwrap_or(0);
    let mut p = 0;
    loop {
        while p < line.len() && is_space(line[p]) {
            p += 1;
        }
        if p >= line.len() {
            return Ok(());
        }
        let start = scratch.len();
        let (mut inq, mut insq) = (false, false);
        loop {
            let c = at(p);
            if inq {
                if c == b'\\' && at(p + 1) == b'x' {
                    if let (Some(h), Some(l)) = (hex(at(p + 2)), hex(at(p + 3))) {
                        scratch.push(h * 16 + l);
                        p += 4;
                        continue;
                    }
                }
                if c == b'\\' && at(p + 1) != 0 {
                    p += 1;
                    scratch.push(match at(p) {
                        b'n' => b'\n',
                        b'r' => b'\r',
                        b't' => b'\t',
                        b'b' => 0x08,
                        b'a' => 0x07,
                        other => other,
                    });
                } else if c == b'"' {
                    if at(p + 1) != 0 && !is_space(at(p + 1)) {
                        return Err(SplitError::Unbalanced);
                    }
                    p += 1;
                    break;
                } else if c == 0 {
                    return Err(SplitError::Unbalanced);
                } else {
                    scratch.push(c);
                }
            } else if insq {
                if c == b'\\' && at(p + 1) == b'\'' {
                    p += 1;
                    scratch.push(b'\'');
                } else if c == b'\'' {
                    if at(p + 1) != 0 && !is_space(at(p + 1)) {
                        return Err(SplitError::Unbalanced);
                    }
                    p += 1;
                    break;
                } else if c == 0 {
                    return Err(SplitError::Unbalanced);
                } else {
                    scratch.push(c);
                }
            } else {
                match c {
                    b' ' | b'\n' | b'\r' | b'\t' | 0 => break,
                    b'"' => inq = true,
                    b'\'' => insq = true,
                    _ => scratch.push(c),
                }
            }
            p += 1;
        }
        args.try_reserve(1).map_err(|_| SplitError::Oom)?;
        args.push((start, scratch.len()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(line: &[u8]) -> Result<Vec<Vec<u8>>, SplitError> {
        let (mut s, mut a) = (Vec::new(), Vec::new());
        split(line, &mut s, &mut a)?;
        Ok(a.iter().map(|&(x, y)| s[x..y].to_vec()).collect())
    }

    fn v(items: &[&str]) -> Vec<Vec<u8>> {
        items.iter().map(|s| s.as_bytes().to_vec()).collect()
    }

    #[test]
    fn plain_and_quoted() {
        assert_eq!(run(b"PING").unwrap(), v(&["PING"]));
        assert_eq!(run(b"  set  a   b ").unwrap(), v(&["set", "a", "b"]));
        assert_eq!(run(b"").unwrap(), v(&[]));
        assert_eq!(run(b"   \t ").unwrap(), v(&[]));
        assert_eq!(
            run(br#"set "a b" 'c d'"#).unwrap(),
            v(&["set", "a b", "c d"])
        );
        assert_eq!(
            run(br#"echo "x\ny\x41\"""#).unwrap(),
            v(&["echo", "x\ny\u{41}\""])
        );
        assert_eq!(run(br#"echo 'it\'s'"#).unwrap(), v(&["echo", "it's"]));
        assert_eq!(run(br#"echo "\xZZ""#).unwrap(), v(&["echo", "xZZ"]));
        assert_eq!(run(br#"echo ab"c d"e"#), Err(SplitError::Unbalanced));
        assert_eq!(run(br#"echo a"b c" d"#).unwrap(), v(&["echo", "ab c", "d"]));
        assert_eq!(run(b"echo \"\"").unwrap(), v(&["echo", ""]));
        assert_eq!(run(b"a\0b c").unwrap(), v(&["a"]), "NUL ends the line");
    }

    #[test]
    fn unbalanced() {
        assert_eq!(run(br#"set "a"#), Err(SplitError::Unbalanced));
        assert_eq!(run(br#"set 'a"#), Err(SplitError::Unbalanced));
        assert_eq!(run(br#"set "a"b"#), Err(SplitError::Unbalanced));
        assert_eq!(run(br#"set 'a'b"#), Err(SplitError::Unbalanced));
    }
}
