//! Keeping configured secrets (instance keys, client keys) out of what the proxy says: log lines get
//! `[REDACTED]` in place of a key; relayed response headers and non-2xx bodies get a mask of the same length, so
//! that a relayed `Content-Length` stays true and a body can be masked as it streams, read by read.
//!
//! Only text from outside is scrubbed (upstream error bodies and headers, which a debug upstream or an egress
//! proxy may fill with the key it received). A 2xx body is relayed untouched: it is the model's output, and
//! holding back bytes of a live stream to look for keys would delay every event.

use crate::bytes::find;

/// What a key becomes in a relayed body or header: as long as the key, recognisable to a human.
const MASK: &[u8] = b"[REDACTED]";

/// The secrets, longest first (a key that contains another is masked whole).
#[derive(Default, Clone)]
pub struct Secrets {
    keys: Vec<String>,
}

impl Secrets {
    pub fn new(mut keys: Vec<String>) -> Secrets {
        keys.retain(|k| !k.is_empty());
        keys.sort_by_key(|k| std::cmp::Reverse(k.len()));
        keys.dedup();
        Secrets { keys }
    }

    /// These secrets and `extra` (an Entra ID token, known only at run time).
    pub fn with_extra(&self, extra: &str) -> Secrets {
        let mut keys = self.keys.clone();
        keys.push(extra.to_string());
        Secrets::new(keys)
    }

    /// The longest secret's length (0 when there is none).
    pub fn longest(&self) -> usize {
        self.keys.first().map_or(0, String::len)
    }

    /// `text` with every secret replaced by `[REDACTED]`, for log lines.
    pub fn redact(&self, text: &str) -> String {
        let mut out = text.to_string();
        for key in &self.keys {
            if out.contains(key.as_str()) {
                out = out.replace(key.as_str(), "[REDACTED]");
            }
        }
        out
    }

    /// Masks every secret in `bytes` in place (same length); whether anything was masked.
    pub fn mask(&self, bytes: &mut [u8]) -> bool {
        let mut masked = false;
        for key in self.keys.iter().map(String::as_bytes) {
            let mut at = 0;
            while let Some(i) = find(&bytes[at..], key) {
                let start = at + i;
                for (j, b) in bytes[start..start + key.len()].iter_mut().enumerate() {
                    *b = if key.len() >= MASK.len() { MASK.get(j).copied().unwrap_or(b'*') } else { b'*' };
                }
                masked = true;
                at = start + key.len();
            }
        }
        masked
    }

    /// `value` with every secret masked, copied only when it holds one (response headers: nearly never).
    pub fn masked<'v>(&self, value: &'v [u8]) -> std::borrow::Cow<'v, [u8]> {
        if self.keys.iter().any(|k| find(value, k.as_bytes()).is_some()) {
            let mut owned = value.to_vec();
            self.mask(&mut owned);
            std::borrow::Cow::Owned(owned)
        } else {
            std::borrow::Cow::Borrowed(value)
        }
    }

    /// A masker for a body that arrives in pieces.
    pub fn stream(&self) -> StreamMask<'_> {
        StreamMask { secrets: self, held: Vec::new() }
    }
}

/// Masks secrets in a body read piece by piece: a key split across two reads is still found, because the last
/// `longest - 1` bytes of each piece are held back until the next one (or the end) shows how they continue.
pub struct StreamMask<'a> {
    secrets: &'a Secrets,
    held: Vec<u8>,
}

impl StreamMask<'_> {
    /// Takes the next piece; returns the bytes that are safe to send now (the same total length as went in,
    /// once `finish` has returned the rest).
    pub fn push(&mut self, piece: &[u8]) -> Vec<u8> {
        let mut buf = std::mem::take(&mut self.held);
        buf.extend_from_slice(piece);
        self.secrets.mask(&mut buf);
        // A key that is not whole in `buf` starts within its last `longest - 1` bytes.
        let keep = self.secrets.longest().saturating_sub(1).min(buf.len());
        self.held = buf.split_off(buf.len() - keep);
        buf
    }

    /// The most bytes `push` can return beyond the piece it was given.
    pub fn holds_at_most(&self) -> usize {
        self.secrets.longest().saturating_sub(1)
    }

    /// The held-back tail, at the end of the body.
    pub fn finish(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secrets() -> Secrets {
        Secrets::new(vec!["KEYabcdefghijklmnop".into(), "short".into(), String::new()])
    }

    #[test]
    fn log_text_gets_redacted_and_bodies_keep_their_length() {
        let s = secrets();
        assert_eq!(s.redact("a KEYabcdefghijklmnop b short"), "a [REDACTED] b [REDACTED]");
        let mut body = b"x KEYabcdefghijklmnop y short z".to_vec();
        let len = body.len();
        assert!(s.mask(&mut body));
        assert_eq!(body.len(), len);
        assert_eq!(&body[..], &b"x [REDACTED]********* y ***** z"[..]);
        let mut clean = b"nothing here".to_vec();
        assert!(!s.mask(&mut clean));
    }

    #[test]
    fn a_key_split_across_every_possible_read_boundary_is_masked() {
        let s = secrets();
        let body = b"head KEYabcdefghijklmnop middle short tail KEYabcdefghijklmnop".to_vec();
        let mut whole = body.clone();
        s.mask(&mut whole);
        for size in 1..body.len() {
            let mut m = s.stream();
            let mut out = Vec::new();
            for piece in body.chunks(size) {
                out.extend(m.push(piece));
            }
            out.extend(m.finish());
            assert_eq!(out, whole, "pieces of {size}");
        }
    }
}
