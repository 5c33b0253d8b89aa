//! The request parser: RESP multibulk requests and inline commands, with Redis's limits and
//! Redis's exact error texts.
//!
//! The parser is incremental: it keeps the progress of a half-received multibulk request between
//! reads, so a request with many arguments arriving in small pieces costs linear time. Arguments
//! are split off the read buffer without copying.

use bytes::{Buf, Bytes, BytesMut};
use std::fmt;

/// Longest inline request, and longest length line, Redis accepts (`PROTO_INLINE_MAX_SIZE`).
pub const MAX_INLINE_SIZE: usize = 64 * 1024;
/// Most arguments an unauthenticated client may announce (Redis's rule against memory abuse).
const UNAUTHENTICATED_MAX_ARGS: i64 = 10;
/// Longest argument an unauthenticated client may announce.
const UNAUTHENTICATED_MAX_BULK: i64 = 16 * 1024;

/// Size limits applied while parsing; `CONFIG SET` can change them at run time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestLimits {
    /// Most arguments in one multibulk request.
    pub max_multibulk_len: usize,
    /// Longest single argument (`proto-max-bulk-len`).
    pub max_bulk_len: usize,
}

impl Default for RequestLimits {
    fn default() -> Self {
        RequestLimits {
            max_multibulk_len: 1024 * 1024,
            max_bulk_len: 512 * 1024 * 1024,
        }
    }
}

/// A malformed request. The connection replies with the error text and closes, as Redis does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProtocolError {
    /// `*<n>` is not a number, or too large.
    InvalidMultibulkLength,
    /// `$<n>` is not a number, negative, or over `proto-max-bulk-len`.
    InvalidBulkLength,
    /// An argument did not start with `$`.
    ExpectedDollar(u8),
    /// An inline request with an unterminated or misplaced quote.
    UnbalancedQuotes,
    /// An inline request longer than 64 KiB.
    TooBigInlineRequest,
    /// A `*` line longer than 64 KiB.
    TooBigMultibulkCount,
    /// A `$` line longer than 64 KiB.
    TooBigBulkCount,
    /// More than 10 arguments before authentication.
    UnauthenticatedMultibulkLength,
    /// An argument over 16 KiB before authentication.
    UnauthenticatedBulkLength,
}

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Protocol error: ")?;
        match self {
            ProtocolError::InvalidMultibulkLength => f.write_str("invalid multibulk length"),
            ProtocolError::InvalidBulkLength => f.write_str("invalid bulk length"),
            // As Redis prints it: a CR or LF (an error line cannot hold one) shows as a space.
            ProtocolError::ExpectedDollar(b'\r' | b'\n') => f.write_str("expected '$', got ' '"),
            ProtocolError::ExpectedDollar(got) => write!(f, "expected '$', got '{}'", *got as char),
            ProtocolError::UnbalancedQuotes => f.write_str("unbalanced quotes in request"),
            ProtocolError::TooBigInlineRequest => f.write_str("too big inline request"),
            ProtocolError::TooBigMultibulkCount => f.write_str("too big mbulk count string"),
            ProtocolError::TooBigBulkCount => f.write_str("too big bulk count string"),
            ProtocolError::UnauthenticatedMultibulkLength => {
                f.write_str("unauthenticated multibulk length")
            }
            ProtocolError::UnauthenticatedBulkLength => f.write_str("unauthenticated bulk length"),
        }
    }
}

impl std::error::Error for ProtocolError {}

/// Progress of a multibulk request whose arguments have not all arrived.
#[derive(Debug)]
struct Partial {
    expected: usize,
    args: Vec<Bytes>,
    /// Length of the argument being received, once its `$` line was read.
    bulk_len: Option<usize>,
}

/// Splits a connection's byte stream into requests (argument vectors).
#[derive(Debug, Default)]
pub struct RequestParser {
    partial: Option<Partial>,
}

impl RequestParser {
    /// Creates a parser at the start of a stream.
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes the next complete request off `buf`.
    ///
    /// Returns `Ok(None)` when more bytes are needed. Empty requests (`*0`, `*-1`, a blank
    /// inline line) are skipped, as Redis skips them. `authenticated` selects the stricter
    /// limits Redis applies before `AUTH`.
    pub fn next_request(
        &mut self,
        buf: &mut BytesMut,
        limits: &RequestLimits,
        authenticated: bool,
    ) -> Result<Option<Vec<Bytes>>, ProtocolError> {
        loop {
            if self.partial.is_none() {
                if buf.is_empty() {
                    return Ok(None);
                }
                if buf[0] != b'*' {
                    match parse_inline(buf)? {
                        None => return Ok(None),
                        Some(args) if args.is_empty() => continue,
                        Some(args) => return Ok(Some(args)),
                    }
                }
                let Some(line) = take_line(buf, ProtocolError::TooBigMultibulkCount)? else {
                    return Ok(None);
                };
                let count = parse_strict_i64(&line[1..])
                    .filter(|&n| n <= limits.max_multibulk_len as i64)
                    .ok_or(ProtocolError::InvalidMultibulkLength)?;
                if count > UNAUTHENTICATED_MAX_ARGS && !authenticated {
                    return Err(ProtocolError::UnauthenticatedMultibulkLength);
                }
                if count <= 0 {
                    continue;
                }
                let expected = count as usize;
                self.partial = Some(Partial {
                    expected,
                    args: Vec::with_capacity(expected.min(1024)),
                    bulk_len: None,
                });
            }
            let partial = self.partial.as_mut().expect("partial request present");
            while partial.args.len() < partial.expected {
                let len = match partial.bulk_len {
                    Some(len) => len,
                    None => {
                        let Some(line) = take_line(buf, ProtocolError::TooBigBulkCount)? else {
                            return Ok(None);
                        };
                        // An empty line is a CR where the `$` belongs.
                        let first = line.first().copied().unwrap_or(b'\r');
                        if first != b'$' {
                            return Err(ProtocolError::ExpectedDollar(first));
                        }
                        let len = parse_strict_i64(&line[1..])
                            .filter(|&n| n >= 0 && n as u64 <= limits.max_bulk_len as u64)
                            .ok_or(ProtocolError::InvalidBulkLength)?;
                        if len > UNAUTHENTICATED_MAX_BULK && !authenticated {
                            return Err(ProtocolError::UnauthenticatedBulkLength);
                        }
                        partial.bulk_len = Some(len as usize);
                        len as usize
                    }
                };
                if buf.len() < len + 2 {
                    // Make room once for the whole argument instead of growing step by step.
                    buf.reserve(len + 2 - buf.len());
                    return Ok(None);
                }
                let arg = buf.split_to(len).freeze();
                // Like Redis, the two bytes after an argument are skipped, not checked.
                buf.advance(2);
                partial.args.push(arg);
                partial.bulk_len = None;
            }
            let done = self.partial.take().expect("partial request present");
            return Ok(Some(done.args));
        }
    }
}

/// Takes one `\r\n`-terminated line (returned without the terminator) off `buf`.
fn take_line(
    buf: &mut BytesMut,
    too_big: ProtocolError,
) -> Result<Option<BytesMut>, ProtocolError> {
    match memchr::memchr(b'\r', buf) {
        None if buf.len() > MAX_INLINE_SIZE => Err(too_big),
        None => Ok(None),
        Some(cr) if cr + 1 >= buf.len() => Ok(None),
        Some(cr) => {
            let line = buf.split_to(cr);
            buf.advance(2);
            Ok(Some(line))
        }
    }
}

/// Parses an inline command (`PING`, `SUBSCRIBE "a b" c`): what telnet and redis-cli's raw mode send.
fn parse_inline(buf: &mut BytesMut) -> Result<Option<Vec<Bytes>>, ProtocolError> {
    let Some(newline) = memchr::memchr(b'\n', buf) else {
        if buf.len() > MAX_INLINE_SIZE {
            return Err(ProtocolError::TooBigInlineRequest);
        }
        return Ok(None);
    };
    let mut line = buf.split_to(newline + 1);
    line.truncate(newline);
    if line.last() == Some(&b'\r') {
        line.truncate(newline - 1);
    }
    split_args(&line)
        .map(Some)
        .ok_or(ProtocolError::UnbalancedQuotes)
}

/// Splits a line into arguments the way Redis's `sdssplitargs` does: whitespace separates,
/// `"..."` understands `\n \r \t \b \a \\ \" \xHH`, `'...'` understands `\'`, and a closing
/// quote must be followed by whitespace or the end. `None` for unbalanced quotes.
pub fn split_args(line: &[u8]) -> Option<Vec<Bytes>> {
    // Redis works on C strings here: a NUL byte ends the line.
    let line = &line[..memchr::memchr(0, line).unwrap_or(line.len())];
    let mut args = Vec::new();
    let mut i = 0;
    loop {
        while i < line.len() && is_space(line[i]) {
            i += 1;
        }
        if i >= line.len() {
            return Some(args);
        }
        let mut current = Vec::new();
        let mut in_double = false;
        let mut in_single = false;
        loop {
            let Some(&c) = line.get(i) else {
                if in_double || in_single {
                    return None;
                }
                break;
            };
            if in_double {
                if c == b'\\'
                    && line.get(i + 1) == Some(&b'x')
                    && line.get(i + 2).is_some_and(u8::is_ascii_hexdigit)
                    && line.get(i + 3).is_some_and(u8::is_ascii_hexdigit)
                {
                    current.push(hex_value(line[i + 2]) * 16 + hex_value(line[i + 3]));
                    i += 3;
                } else if c == b'\\' && i + 1 < line.len() {
                    i += 1;
                    current.push(match line[i] {
                        b'n' => b'\n',
                        b'r' => b'\r',
                        b't' => b'\t',
                        b'b' => 0x08,
                        b'a' => 0x07,
                        other => other,
                    });
                } else if c == b'"' {
                    if line.get(i + 1).is_some_and(|&n| !is_space(n)) {
                        return None;
                    }
                    i += 1;
                    break;
                } else {
                    current.push(c);
                }
            } else if in_single {
                if c == b'\\' && line.get(i + 1) == Some(&b'\'') {
                    i += 1;
                    current.push(b'\'');
                } else if c == b'\'' {
                    if line.get(i + 1).is_some_and(|&n| !is_space(n)) {
                        return None;
                    }
                    i += 1;
                    break;
                } else {
                    current.push(c);
                }
            } else {
                match c {
                    b' ' | b'\n' | b'\r' | b'\t' => break,
                    b'"' => in_double = true,
                    b'\'' => in_single = true,
                    _ => current.push(c),
                }
            }
            i += 1;
        }
        args.push(Bytes::from(current));
    }
}

fn is_space(c: u8) -> bool {
    matches!(c, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c)
}

fn hex_value(c: u8) -> u8 {
    match c {
        b'0'..=b'9' => c - b'0',
        b'a'..=b'f' => c - b'a' + 10,
        _ => c - b'A' + 10,
    }
}

/// Parses a decimal integer as strictly as Redis's `string2ll`: optional `-`, no `+`, no
/// spaces, no leading zeros, no overflow.
pub fn parse_strict_i64(s: &[u8]) -> Option<i64> {
    let (negative, digits) = match s {
        [] => return None,
        [b'0'] => return Some(0),
        [b'-', rest @ ..] => (true, rest),
        _ => (false, s),
    };
    match digits.first() {
        Some(b'1'..=b'9') => {}
        _ => return None,
    }
    let mut value: i64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        let digit = (d - b'0') as i64;
        value = if negative {
            value.checked_mul(10)?.checked_sub(digit)?
        } else {
            value.checked_mul(10)?.checked_add(digit)?
        };
    }
    Some(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_all(input: &[u8], authenticated: bool) -> Result<Vec<Vec<Bytes>>, ProtocolError> {
        let mut parser = RequestParser::new();
        let mut buf = BytesMut::from(input);
        let mut out = Vec::new();
        while let Some(req) =
            parser.next_request(&mut buf, &RequestLimits::default(), authenticated)?
        {
            out.push(req);
        }
        Ok(out)
    }

    fn args(list: &[&str]) -> Vec<Bytes> {
        list.iter()
            .map(|s| Bytes::copy_from_slice(s.as_bytes()))
            .collect()
    }

    #[test]
    fn multibulk_inline_and_pipelining() {
        let reqs = parse_all(
            b"*2\r\n$4\r\nECHO\r\n$3\r\na\r\n\r\nPING\r\nSUBSCRIBE a  b\n",
            true,
        )
        .unwrap();
        assert_eq!(
            reqs,
            vec![
                args(&["ECHO", "a\r\n"]),
                args(&["PING"]),
                args(&["SUBSCRIBE", "a", "b"])
            ]
        );
    }

    #[test]
    fn empty_requests_are_skipped_like_redis() {
        assert_eq!(
            parse_all(b"*-10\r\n*0\r\n\r\n   \r\nPING\r\n", true).unwrap(),
            vec![args(&["PING"])]
        );
    }

    #[test]
    fn redis_protocol_errors() {
        use ProtocolError::*;
        let cases: &[(&[u8], ProtocolError)] = &[
            (b"*20000000\r\n", InvalidMultibulkLength),
            (b"*3000000000\r\n", InvalidMultibulkLength),
            (b"*abc\r\n", InvalidMultibulkLength),
            (b"*3\r\n$3\r\nSET\r\n$1\r\nx\r\n$-10\r\n", InvalidBulkLength),
            (
                b"*3\r\n$3\r\nSET\r\n$1\r\nx\r\n$2000000000\r\n",
                InvalidBulkLength,
            ),
            (
                b"*3\r\n$3\r\nSET\r\n$1\r\nx\r\n$blabla\r\n",
                InvalidBulkLength,
            ),
            (b"*1\r\nfoo\r\n", ExpectedDollar(b'f')),
            (b"*1\r\n\r\n", ExpectedDollar(b'\r')),
            (b"*2\r\n$1\r\na\r\n\r\n", ExpectedDollar(b'\r')),
            (b"set \"\"\"test-key\"\"\" test-value\r\n", UnbalancedQuotes),
            (b"echo \"abc\r\n", UnbalancedQuotes),
        ];
        for (input, expected) in cases {
            assert_eq!(
                parse_all(input, true).unwrap_err(),
                *expected,
                "{}",
                String::from_utf8_lossy(input)
            );
        }
        assert_eq!(
            ProtocolError::ExpectedDollar(b'f').to_string(),
            "Protocol error: expected '$', got 'f'"
        );
        assert_eq!(
            ProtocolError::ExpectedDollar(b'\r').to_string(),
            "Protocol error: expected '$', got ' '"
        );
    }

    #[test]
    fn unauthenticated_clients_get_small_limits() {
        assert_eq!(
            parse_all(b"*100\r\n", false).unwrap_err(),
            ProtocolError::UnauthenticatedMultibulkLength
        );
        assert_eq!(
            parse_all(b"*1\r\n$100000\r\n", false).unwrap_err(),
            ProtocolError::UnauthenticatedBulkLength
        );
        assert!(parse_all(b"*100\r\n", true).unwrap().is_empty());
    }

    #[test]
    fn overlong_lines_are_refused() {
        let long = vec![b'a'; MAX_INLINE_SIZE + 1];
        assert_eq!(
            parse_all(&long, true).unwrap_err(),
            ProtocolError::TooBigInlineRequest
        );
        let mut mbulk = b"*".to_vec();
        mbulk.extend_from_slice(&long);
        assert_eq!(
            parse_all(&mbulk, true).unwrap_err(),
            ProtocolError::TooBigMultibulkCount
        );
    }

    #[test]
    fn requests_split_across_reads_resume() {
        let input = b"*3\r\n$7\r\nPUBLISH\r\n$2\r\nch\r\n$5\r\nhello\r\n";
        let mut parser = RequestParser::new();
        let mut buf = BytesMut::new();
        let mut got = None;
        for &b in input.iter() {
            buf.extend_from_slice(&[b]);
            if let Some(req) = parser
                .next_request(&mut buf, &RequestLimits::default(), true)
                .unwrap()
            {
                got = Some(req);
            }
        }
        assert_eq!(got.unwrap(), args(&["PUBLISH", "ch", "hello"]));
        assert!(buf.is_empty());
    }

    #[test]
    fn inline_quoting_matches_sdssplitargs() {
        assert_eq!(
            split_args(br#"a "b c" 'd e' "\x41\n" 'it\'s'"#).unwrap(),
            args(&["a", "b c", "d e", "A\n", "it's"])
        );
        assert_eq!(split_args(b"  ").unwrap(), Vec::<Bytes>::new());
        assert!(split_args(br#""a"b"#).is_none());
        assert!(split_args(b"'abc").is_none());
        assert_eq!(
            split_args(b"a\0b c").unwrap(),
            args(&["a"]),
            "NUL ends the line, as in Redis"
        );
    }

    #[test]
    fn strict_integers() {
        assert_eq!(parse_strict_i64(b"0"), Some(0));
        assert_eq!(parse_strict_i64(b"-12"), Some(-12));
        assert_eq!(parse_strict_i64(b"012"), None);
        assert_eq!(parse_strict_i64(b"+1"), None);
        assert_eq!(parse_strict_i64(b"-0"), None);
        assert_eq!(parse_strict_i64(b"99999999999999999999"), None);
        assert_eq!(parse_strict_i64(b"-9223372036854775808"), Some(i64::MIN));
    }

    proptest::proptest! {
        #[test]
        fn any_bytes_never_panic(input in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let _ = parse_all(&input, false);
            let _ = parse_all(&input, true);
        }
    }
}
