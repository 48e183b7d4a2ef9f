//! Request IDs: the client's `x-request-id` when it is sane, otherwise a fresh random one. The ID goes back on
//! every response, upstream as `x-ms-client-request-id`, and into every log line about the request.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

const MAX_LEN: usize = 128;

/// The client's ID if it is 1–128 characters of `[A-Za-z0-9._-]`, otherwise a generated one.
pub fn accept_or_generate(client: Option<&[u8]>) -> String {
    match client {
        Some(v) if is_sane(v) => String::from_utf8_lossy(v).into_owned(),
        _ => generate(),
    }
}

fn is_sane(v: &[u8]) -> bool {
    !v.is_empty() && v.len() <= MAX_LEN && v.iter().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(b))
}

/// 32 hex digits. A process-wide random SipHash key (std's `RandomState`) over a counter: unique within the
/// process, unpredictable across processes, and no extra crate or syscall per request.
pub fn generate() -> String {
    static KEYS: OnceLock<(RandomState, RandomState)> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let (a, b) = KEYS.get_or_init(|| (RandomState::new(), RandomState::new()));
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut h1 = a.build_hasher();
    h1.write_u64(n);
    let mut h2 = b.build_hasher();
    h2.write_u64(n);
    let mut id = String::with_capacity(32);
    for half in [h1.finish(), h2.finish()] {
        for shift in (0..16).rev() {
            id.push(char::from(b"0123456789abcdef"[(half >> (shift * 4)) as usize & 0xf]));
        }
    }
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_sane_ids_and_replaces_others() {
        assert_eq!(accept_or_generate(Some(b"abc-123_X.y")), "abc-123_X.y");
        for bad in [&b""[..], b"has space", b"new\nline", b"caf\xc3\xa9", &[b'a'; 129]] {
            let id = accept_or_generate(Some(bad));
            assert_eq!(id.len(), 32, "{bad:?}");
            assert!(id.bytes().all(|b| b.is_ascii_hexdigit()));
        }
        assert_eq!(accept_or_generate(Some(&[b'a'; 128])).len(), 128);
    }

    #[test]
    fn generated_ids_differ() {
        let ids: std::collections::HashSet<String> = (0..1000).map(|_| generate()).collect();
        assert_eq!(ids.len(), 1000);
    }
}
