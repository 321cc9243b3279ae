//! Redis glob-style pattern matching (`stringmatchlen` in Redis's util.c),
//! used by KEYS, SCAN MATCH and CONFIG GET: `*`, `?`, `[abc]`, `[^a]`,
//! `[a-z]` and `\x` escapes, with the same quirks (an unterminated `[` class
//! runs to the end of the pattern) and the same protection against
//! exponential patterns (nesting limit plus "skip longer matches").

/// Whether `string` matches the glob `pattern` (byte-wise, case-sensitive).
pub fn glob_match(pattern: &[u8], string: &[u8]) -> bool {
    let mut skip_longer = false;
    matches(pattern, string, false, &mut skip_longer, 0)
}

/// Like [`glob_match`] but ASCII case-insensitive (CONFIG GET uses this).
pub(crate) fn glob_match_nocase(pattern: &[u8], string: &[u8]) -> bool {
    let mut skip_longer = false;
    matches(pattern, string, true, &mut skip_longer, 0)
}

#[inline]
fn fold(c: u8, nocase: bool) -> u8 {
    if nocase {
        c.to_ascii_lowercase()
    } else {
        c
    }
}

fn matches(pat: &[u8], s: &[u8], nocase: bool, skip_longer: &mut bool, nesting: u32) -> bool {
    if nesting > 1000 {
        return false;
    }
    // `p`/`i` index the pattern and the string; reads past the pattern's end
    // yield 0 like the C code's NUL terminator.
    let at = |k: usize| pat.get(k).copied().unwrap_or(0);
    let mut p = 0usize;
    let mut i = 0usize;
    while p < pat.len() && i < s.len() {
        match pat[p] {
            b'*' => {
                while p < pat.len() && at(p + 1) == b'*' {
                    p += 1;
                }
                if p + 1 == pat.len() {
                    return true;
                }
                while i < s.len() {
                    if matches(&pat[p + 1..], &s[i..], nocase, skip_longer, nesting + 1) {
                        return true;
                    }
                    if *skip_longer {
                        return false;
                    }
                    i += 1;
                }
                *skip_longer = true;
                return false;
            }
            b'?' => i += 1,
            b'[' => {
                p += 1;
                let not = at(p) == b'^';
                if not {
                    p += 1;
                }
                let c = fold(s[i], nocase);
                let mut hit = false;
                loop {
                    let remaining = pat.len().saturating_sub(p);
                    if at(p) == b'\\' && remaining >= 2 {
                        p += 1;
                        if fold(pat[p], nocase) == c {
                            hit = true;
                        }
                    } else if at(p) == b']' {
                        break;
                    } else if remaining == 0 {
                        p -= 1;
                        break;
                    } else if remaining >= 3 && pat[p + 1] == b'-' {
                        let (mut lo, mut hi) = (pat[p], pat[p + 2]);
                        if lo > hi {
                            core::mem::swap(&mut lo, &mut hi);
                        }
                        p += 2;
                        if (fold(lo, nocase)..=fold(hi, nocase)).contains(&c) {
                            hit = true;
                        }
                    } else if fold(pat[p], nocase) == c {
                        hit = true;
                    }
                    p += 1;
                }
                if not {
                    hit = !hit;
                }
                if !hit {
                    return false;
                }
                i += 1;
            }
            b'\\' => {
                if pat.len() - p >= 2 {
                    p += 1;
                }
                if fold(pat[p], nocase) != fold(s[i], nocase) {
                    return false;
                }
                i += 1;
            }
            c => {
                if fold(c, nocase) != fold(s[i], nocase) {
                    return false;
                }
                i += 1;
            }
        }
        p += 1;
        if i == s.len() {
            while at(p) == b'*' {
                p += 1;
            }
            break;
        }
    }
    p >= pat.len() && i == s.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(p: &str, s: &str) -> bool {
        glob_match(p.as_bytes(), s.as_bytes())
    }

    #[test]
    fn literals_and_wildcards() {
        assert!(m("", ""));
        assert!(!m("", "a"));
        assert!(!m("a", ""));
        // Like Redis's stringmatchlen, an empty string matches no pattern
        // but the empty one (KEYS * and SCAN MATCH * skip matching anyway).
        assert!(!m("*", ""));
        assert!(m("*", "anything"));
        assert!(m("hello", "hello"));
        assert!(!m("hello", "hellO"));
        assert!(m("h?llo", "hallo"));
        assert!(!m("h?llo", "hllo"));
        assert!(m("h*llo", "hllo"));
        assert!(m("h*llo", "heeeello"));
        assert!(!m("h*llo", "heeeellx"));
        assert!(m("user:*", "user:1000"));
        assert!(!m("user:*", "usr:1000"));
        assert!(m("*:*:*", "a:b:c"));
        assert!(!m("*:*:*", "a:b"));
        assert!(m("a**b", "ab"));
        assert!(m("a*", "a"));
        assert!(m("a*b*", "ab"));
    }

    #[test]
    fn classes_and_escapes() {
        assert!(m("h[ae]llo", "hello"));
        assert!(m("h[ae]llo", "hallo"));
        assert!(!m("h[ae]llo", "hillo"));
        assert!(m("h[^e]llo", "hallo"));
        assert!(!m("h[^e]llo", "hello"));
        assert!(m("h[a-b]llo", "hbllo"));
        assert!(!m("h[a-b]llo", "hcllo"));
        assert!(m("h[b-a]llo", "hallo"), "reversed range");
        assert!(m("[\\]]", "]"));
        assert!(m("[\\-]", "-"));
        assert!(m("\\*", "*"));
        assert!(!m("\\*", "x"));
        assert!(m("\\?x", "?x"));
        assert!(m("a\\", "a\\"), "trailing backslash is literal");
        // An unterminated class runs to the end of the pattern.
        assert!(m("[abc", "b"));
        assert!(!m("[abc", "d"));
        assert!(!m("[", "a"));
        assert!(m("[^", "a"));
    }

    #[test]
    fn nocase_variant() {
        assert!(glob_match_nocase(b"SAVE", b"save"));
        assert!(glob_match_nocase(b"max*", b"MAXMEMORY"));
        assert!(glob_match_nocase(b"[A-Z]x", b"qX"));
        assert!(!glob_match(b"SAVE", b"save"));
    }

    #[test]
    fn pathological_pattern_is_fast() {
        let pat = "a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*b";
        let s = "a".repeat(4000);
        assert!(!m(pat, &s));
        let deep = "*".to_string() + &"a*".repeat(2000);
        assert!(
            !m(&deep, &"a".repeat(1500)),
            "nesting limit stops deep recursion"
        );
    }
}
