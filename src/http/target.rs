//! Which request targets the proxy accepts: exactly those it can forward byte for byte, minus the spellings that
//! some upstream server could resolve outside `/openai/` with the instance key attached.
//!
//! The byte sets below are those of the `http` crate's `PathAndQuery` parser, which ureq uses to send the
//! request (a target it refuses fails inside ureq, after the instance was chosen): a unit test holds the two
//! equal byte by byte, and `tests/security.rs` sends accepted targets through the proxy to a loopback sink. On
//! top of that the path refuses what servers treat as separators or traversal: `\` (IIS, .NET), `;` path
//! parameters (`..;/` on Tomcat and Spring), dot segments however they are percent-encoded, and percent-escapes
//! that decode to a separator, a `%` (double encoding), a control byte or an overlong UTF-8 lead byte. No Azure
//! OpenAI route needs any of these. The query is data: it is checked against the parser's set only.

/// Longer targets do not fit the `http` crate's URI limit (64 KiB less one, endpoint included).
pub const MAX_TARGET_BYTES: usize = 60 * 1024;

/// Why a target was refused; each is answered 400 (414 for length) before any attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetError {
    /// Not origin-form (`/path?query`): absolute-form, `*`, or `//` that reads as an authority.
    NotOriginForm,
    /// A byte the upstream client cannot send in that part (control bytes, space, `<`, `>`, `"` in the query, …).
    Byte,
    /// `\` or a `;` parameter in the path.
    Separator,
    /// `.` or `..` as a segment, in any spelling.
    DotSegment,
    /// A `%` not followed by two hex digits, or an escape for a byte the path must not carry.
    Escape,
    /// Longer than [`MAX_TARGET_BYTES`].
    TooLong,
}

impl TargetError {
    pub fn message(self) -> &'static str {
        match self {
            TargetError::NotOriginForm => "only origin-form request targets are accepted",
            TargetError::Byte => "the request target holds a byte that must be percent-encoded",
            TargetError::Separator => "backslashes and ';' parameters are not accepted in the path",
            TargetError::DotSegment => "dot segments are not accepted in the path",
            TargetError::Escape => "the path holds a malformed or forbidden percent-escape",
            TargetError::TooLong => "request target too long",
        }
    }

    pub fn status(self) -> u16 {
        if self == TargetError::TooLong {
            414
        } else {
            400
        }
    }
}

/// Bytes the `http` crate accepts unescaped in a path (its `build_path_map`: the WHATWG path set plus `"`, `{`, `}`).
pub fn http_path_byte(b: u8) -> bool {
    matches!(b, 0x21 | 0x24..=0x3B | 0x3D | 0x40..=0x5F | 0x61..=0x7A | 0x7C | 0x7E | b'"' | b'{' | b'}')
}

/// Bytes the `http` crate accepts in a query (its `build_query_map`).
pub fn http_query_byte(b: u8) -> bool {
    matches!(b, 0x21 | 0x24..=0x3B | 0x3D | 0x3F..=0x7E)
}

/// Checks `target` as described in the module doc.
pub fn check(target: &str) -> Result<(), TargetError> {
    if !target.starts_with('/') || target.starts_with("//") {
        return Err(TargetError::NotOriginForm);
    }
    if target.len() > MAX_TARGET_BYTES {
        return Err(TargetError::TooLong);
    }
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target, None),
    };
    if !path.bytes().all(http_path_byte) || !query.unwrap_or_default().bytes().all(http_query_byte) {
        return Err(TargetError::Byte);
    }
    if path.bytes().any(|b| b == b'\\' || b == b';') {
        return Err(TargetError::Separator);
    }
    for segment in path.split('/') {
        check_segment(segment)?;
    }
    Ok(())
}

/// One path segment: its escapes, then whether it decodes to `.` or `..`.
fn check_segment(segment: &str) -> Result<(), TargetError> {
    let bytes = segment.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'%' {
            decoded.push(bytes[i]);
            i += 1;
            continue;
        }
        let hex = |b: Option<&u8>| b.and_then(|b| (*b as char).to_digit(16));
        let (Some(hi), Some(lo)) = (hex(bytes.get(i + 1)), hex(bytes.get(i + 2))) else {
            return Err(TargetError::Escape);
        };
        let byte = (hi * 16 + lo) as u8;
        // `/` `\` `;` would split or hide segments once decoded; `%` is double encoding; C0/C1 lead overlong
        // UTF-8 forms of `.` and `/` that old decoders accept.
        if byte < 0x20 || matches!(byte, b'/' | b'\\' | b';' | b'%' | 0x7F | 0xC0 | 0xC1) {
            return Err(TargetError::Escape);
        }
        decoded.push(byte);
        i += 3;
    }
    if decoded == b"." || decoded == b".." {
        return Err(TargetError::DotSegment);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ureq::http::uri::PathAndQuery;

    #[test]
    fn the_byte_sets_are_the_http_crate_s() {
        for b in 0u8..=0x7F {
            let c = b as char;
            let in_path = format!("/a{c}b");
            let parsed = in_path.parse::<PathAndQuery>();
            // `?` and `#` end the path; they are not path bytes.
            if b != b'?' && b != b'#' {
                assert_eq!(http_path_byte(b), parsed.is_ok_and(|p| p.as_str() == in_path), "path byte {b:#04x}");
            }
            let in_query = format!("/a?x{c}y");
            let parsed = in_query.parse::<PathAndQuery>();
            if b != b'#' {
                assert_eq!(http_query_byte(b), parsed.is_ok_and(|p| p.as_str() == in_query), "query byte {b:#04x}");
            }
        }
    }

    #[test]
    fn accepted_targets_parse_unchanged() {
        for t in [
            "/openai/deployments/x/chat/completions?api-version=2024-06-01",
            "/openai/x{y}|z^w",
            "/openai/m?",
            "/a?q=`{}|^~\\;",
        ] {
            assert_eq!(check(t), Ok(()), "{t}");
            assert_eq!(t.parse::<PathAndQuery>().expect(t).as_str(), t);
        }
    }

    #[test]
    fn refusals() {
        use TargetError::*;
        for (t, why) in [
            ("http://evil/openai/x", NotOriginForm),
            ("*", NotOriginForm),
            ("//evil/openai", NotOriginForm),
            ("/a#b", Byte),
            ("/a b", Byte),
            ("/a?q=\"x\"", Byte),
            ("/a?q=<x>", Byte),
            ("/a`b", Byte),
            ("/a\u{e9}", Byte),
            ("/openai\\..\\x", Separator),
            ("/openai/..;/x", Separator),
            ("/openai/x;a=b/y", Separator),
            ("/openai/../admin", DotSegment),
            ("/openai/./x", DotSegment),
            ("/openai/%2e%2e/x", DotSegment),
            ("/openai/.%2E/x", DotSegment),
            ("/%2e/openai/x", DotSegment),
            ("/openai/a%2Fb", Escape),
            ("/openai/%5c../x", Escape),
            ("/openai/%5C../x", Escape),
            ("/openai/x%3b/y", Escape),
            ("/openai/%252e%252e/x", Escape),
            ("/openai/x%00", Escape),
            ("/openai/x%0a", Escape),
            ("/openai/x%7f", Escape),
            ("/openai/%c0%ae", Escape),
            ("/openai/x%", Escape),
            ("/openai/x%4", Escape),
            ("/openai/x%zz", Escape),
        ] {
            assert_eq!(check(t), Err(why), "{t}");
        }
        assert_eq!(check(&format!("/{}", "a".repeat(MAX_TARGET_BYTES))), Err(TooLong));
        assert_eq!(check("/openai/a%20b%2e?q=%zz"), Ok(()), "escapes in the query are data; %2e inside a name is fine");
    }
}
