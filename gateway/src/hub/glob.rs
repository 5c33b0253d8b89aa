//! Redis glob patterns (`PSUBSCRIBE news.*`), compiled once and matched without recursion.
//!
//! Semantics follow Redis's `stringmatchlen`: `*` any run of bytes, `?` one byte, `[abc]`,
//! `[^a-z]` (reversed ranges are swapped, an unterminated class ends at the end of the pattern),
//! and `\` escapes the next byte. As in Redis, an empty channel name matches only an empty pattern.
//!
//! Redis's matcher is recursive and was twice a denial-of-service vector (CVE-2022-36021,
//! CVE-2024-31228). This one compiles the pattern into tokens and matches with the classic
//! single-backtrack-point algorithm: `O(pattern × channel)` time in the worst case, constant
//! stack, whatever the pattern. Patterns are further capped at [`MAX_PATTERN_LEN`] bytes.

/// Longest pattern `PSUBSCRIBE` accepts; bounds the per-publish cost of one pattern.
pub const MAX_PATTERN_LEN: usize = 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    /// `*`: any run of bytes (consecutive stars are collapsed).
    Star,
    /// `?`: exactly one byte.
    Any,
    /// A byte that must match exactly.
    Byte(u8),
    /// `[...]`: one byte that is (or with `negated`, is not) in the class.
    Class {
        negated: bool,
        items: Vec<ClassItem>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum ClassItem {
    Byte(u8),
    Range(u8, u8),
}

impl Token {
    fn matches(&self, c: u8) -> bool {
        match self {
            Token::Star => true,
            Token::Any => true,
            Token::Byte(b) => *b == c,
            Token::Class { negated, items } => {
                let hit = items.iter().any(|item| match *item {
                    ClassItem::Byte(b) => b == c,
                    ClassItem::Range(lo, hi) => lo <= c && c <= hi,
                });
                hit != *negated
            }
        }
    }
}

/// A compiled glob pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Glob {
    tokens: Vec<Token>,
}

impl Glob {
    /// Compiles `pattern`. Every byte string is a valid pattern, as in Redis.
    pub fn new(pattern: &[u8]) -> Glob {
        let mut tokens = Vec::new();
        let mut i = 0;
        while i < pattern.len() {
            match pattern[i] {
                b'*' => {
                    if tokens.last() != Some(&Token::Star) {
                        tokens.push(Token::Star);
                    }
                }
                b'?' => tokens.push(Token::Any),
                b'\\' if i + 1 < pattern.len() => {
                    i += 1;
                    tokens.push(Token::Byte(pattern[i]));
                }
                b'[' => {
                    let (token, next) = compile_class(pattern, i + 1);
                    tokens.push(token);
                    i = next;
                    continue;
                }
                b => tokens.push(Token::Byte(b)),
            }
            i += 1;
        }
        Glob { tokens }
    }

    /// Whether `name` matches the pattern.
    pub fn matches(&self, name: &[u8]) -> bool {
        if name.is_empty() {
            return self.tokens.is_empty();
        }
        let tokens = &self.tokens;
        let (mut t, mut s) = (0, 0);
        // Where to resume after the last `*`: the token after it, and the next start in `name`.
        let mut backtrack: Option<(usize, usize)> = None;
        while s < name.len() {
            match tokens.get(t) {
                Some(Token::Star) => {
                    backtrack = Some((t + 1, s));
                    t += 1;
                }
                Some(token) if token.matches(name[s]) => {
                    t += 1;
                    s += 1;
                }
                _ => match backtrack {
                    // Let the last star swallow one more byte and retry from there.
                    Some((after_star, start)) => {
                        t = after_star;
                        s = start + 1;
                        backtrack = Some((after_star, start + 1));
                    }
                    None => return false,
                },
            }
        }
        tokens[t..].iter().all(|token| *token == Token::Star)
    }
}

/// Compiles a `[...]` class starting after the `[`; returns the token and the index after it.
fn compile_class(pattern: &[u8], mut i: usize) -> (Token, usize) {
    let negated = pattern.get(i) == Some(&b'^');
    if negated {
        i += 1;
    }
    let mut items = Vec::new();
    loop {
        let remaining = pattern.len().saturating_sub(i);
        if remaining == 0 {
            // Unterminated class: it ends with the pattern.
            return (Token::Class { negated, items }, pattern.len());
        }
        let c = pattern[i];
        if c == b'\\' && remaining >= 2 {
            items.push(ClassItem::Byte(pattern[i + 1]));
            i += 2;
        } else if c == b']' {
            return (Token::Class { negated, items }, i + 1);
        } else if remaining >= 3 && pattern[i + 1] == b'-' {
            let (a, b) = (c, pattern[i + 2]);
            items.push(ClassItem::Range(a.min(b), a.max(b)));
            i += 3;
        } else {
            items.push(ClassItem::Byte(c));
            i += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn m(pattern: &str, name: &str) -> bool {
        Glob::new(pattern.as_bytes()).matches(name.as_bytes())
    }

    #[test]
    fn redis_glob_semantics() {
        assert!(m("*", "anything"));
        assert!(m("h?llo", "hello") && m("h?llo", "hallo") && !m("h?llo", "hllo"));
        assert!(m("h*llo", "hllo") && m("h*llo", "heeeello"));
        assert!(m("h[ae]llo", "hello") && !m("h[ae]llo", "hillo"));
        assert!(m("h[^e]llo", "hallo") && !m("h[^e]llo", "hello"));
        assert!(m("h[a-b]llo", "hbllo") && !m("h[a-b]llo", "hcllo"));
        assert!(m("h[b-a]llo", "hallo"), "reversed ranges are swapped");
        assert!(m("job\\*", "job*") && !m("job\\*", "jobs"));
        assert!(m("[\\]]", "]"));
        assert!(m("news.*", "news.") && m("news.*", "news.tech"));
        assert!(m("a*b*c", "axxbyyc") && !m("a*b*c", "axxbyy"));
        assert!(m("*:*", "job_progress:job_1") && !m("*:*", "plain"));
        assert!(
            m("ab[c", "abc"),
            "unterminated class ends at the end of the pattern"
        );
        assert!(m("a\\", "a\\"), "a trailing backslash is literal");
        assert!(
            !m("*", ""),
            "an empty name matches only an empty pattern, as in Redis"
        );
        assert!(m("", ""));
    }

    #[test]
    fn crafted_patterns_stay_fast() {
        // The CVE-2022-36021 shape: many stars against a long non-matching string.
        let pattern = format!("{}b", "*a".repeat(500));
        let name = "a".repeat(100_000);
        let started = Instant::now();
        assert!(!Glob::new(pattern.as_bytes()).matches(name.as_bytes()));
        // The CVE-2024-31228 shape: deep nesting of classes and stars.
        let pattern = format!("*{}*c", "a]".repeat(400));
        assert!(!Glob::new(pattern.as_bytes()).matches("a]".repeat(5000).as_bytes()));
        // A generous bound: this is a hang detector, not a benchmark.
        assert!(started.elapsed() < Duration::from_secs(20));
    }

    /// A direct transcription of Redis's recursive matcher, as the reference for proptest.
    fn reference(p: &[u8], s: &[u8]) -> bool {
        fn go(p: &[u8], s: &[u8], skip_longer: &mut bool) -> bool {
            let (mut p, mut s) = (p, s);
            while !p.is_empty() && !s.is_empty() {
                match p[0] {
                    b'*' => {
                        while p.len() > 1 && p[1] == b'*' {
                            p = &p[1..];
                        }
                        if p.len() == 1 {
                            return true;
                        }
                        while !s.is_empty() {
                            if go(&p[1..], s, skip_longer) {
                                return true;
                            }
                            if *skip_longer {
                                return false;
                            }
                            s = &s[1..];
                        }
                        *skip_longer = true;
                        return false;
                    }
                    b'?' => s = &s[1..],
                    b'[' => {
                        p = &p[1..];
                        let not = p.first() == Some(&b'^');
                        if not {
                            p = &p[1..];
                        }
                        let mut hit = false;
                        loop {
                            if p.first() == Some(&b'\\') && p.len() >= 2 {
                                p = &p[1..];
                                hit |= p[0] == s[0];
                            } else if p.first() == Some(&b']') || p.is_empty() {
                                break;
                            } else if p.len() >= 3 && p[1] == b'-' {
                                let (a, b) = (p[0].min(p[2]), p[0].max(p[2]));
                                hit |= a <= s[0] && s[0] <= b;
                                p = &p[2..];
                            } else {
                                hit |= p[0] == s[0];
                            }
                            p = &p[1..];
                        }
                        if hit == not {
                            return false;
                        }
                        s = &s[1..];
                        if p.is_empty() {
                            // Unterminated class: the pattern is used up.
                            return s.is_empty();
                        }
                    }
                    b'\\' if p.len() >= 2 => {
                        p = &p[1..];
                        if p[0] != s[0] {
                            return false;
                        }
                        s = &s[1..];
                    }
                    c => {
                        if c != s[0] {
                            return false;
                        }
                        s = &s[1..];
                    }
                }
                p = &p[1..];
                if s.is_empty() {
                    while p.first() == Some(&b'*') {
                        p = &p[1..];
                    }
                    break;
                }
            }
            p.is_empty() && s.is_empty()
        }
        go(p, s, &mut false)
    }

    proptest::proptest! {
        #[test]
        fn agrees_with_the_redis_algorithm(
            pattern in "[ab*?\\[\\]^\\\\-]{0,10}",
            name in "[ab\\]\\-^]{0,10}",
        ) {
            proptest::prop_assert_eq!(
                Glob::new(pattern.as_bytes()).matches(name.as_bytes()),
                reference(pattern.as_bytes(), name.as_bytes()),
                "pattern {:?} name {:?}", pattern, name
            );
        }
    }
}
