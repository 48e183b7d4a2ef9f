//! Per-client-key rate limits (`requests_per_minute`, `tokens_per_minute`), as token buckets: each holds up to a
//! minute's allowance and refills continuously at allowance/60 per second, so a key may burst its whole minute
//! at once and then goes at the steady rate.
//!
//! Requests are taken when a request is admitted. Tokens cannot be known before the answer, so a request is
//! admitted while the key's token bucket is not empty, and the tokens the answer used (its `usage`, streamed
//! answers included) are taken when it ends: one large answer may take the bucket below zero, and the key then
//! waits until it has refilled above zero. A refusal takes nothing.
//!
//! Buckets live across configuration reloads for keys whose name and key are unchanged (`Quotas::carry_over`).

use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::config::ClientKey;

/// The limit a request ran into, and how long until it would pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limited {
    RequestsPerMinute { retry_after_secs: u64 },
    TokensPerMinute { retry_after_secs: u64 },
}

/// The limits of one client key.
pub struct Quota {
    buckets: Mutex<Buckets>,
}

struct Buckets {
    requests: Option<Bucket>,
    tokens: Option<Bucket>,
}

struct Bucket {
    per_minute: f64,
    level: f64,
    at: Instant,
}

impl Bucket {
    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.level = (self.level + elapsed * self.per_minute / 60.0).min(self.per_minute);
        self.at = now;
    }

    /// Whole seconds until the level reaches `need` (at least 1: `Retry-After: 0` would invite a retry loop).
    fn wait_for(&self, need: f64) -> u64 {
        let secs = (need - self.level) * 60.0 / self.per_minute;
        (secs.ceil() as u64).max(1)
    }

    /// The bucket for `limit`: `old` with the new limit, keeping its level (up to the new allowance: a reload
    /// must not hand out a fresh minute), or a full one when there was none; none without a limit.
    fn relimited(old: Option<Bucket>, limit: Option<u64>, now: Instant) -> Option<Bucket> {
        let per_minute = limit? as f64;
        Some(match old {
            Some(b) => Bucket { per_minute, level: b.level.min(per_minute), at: b.at },
            None => Bucket { per_minute, level: per_minute, at: now },
        })
    }
}

impl Quota {
    fn new(key: &ClientKey) -> Quota {
        let quota = Quota { buckets: Mutex::new(Buckets { requests: None, tokens: None }) };
        quota.relimit(key);
        quota
    }

    fn relimit(&self, key: &ClientKey) {
        let now = Instant::now();
        let mut b = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        b.requests = Bucket::relimited(b.requests.take(), key.requests_per_minute.map(u64::from), now);
        b.tokens = Bucket::relimited(b.tokens.take(), key.tokens_per_minute, now);
    }

    /// Takes one request if both limits allow it now; otherwise takes nothing and says which limit and for how
    /// long.
    pub fn admit(&self) -> Result<(), Limited> {
        self.admit_at(Instant::now())
    }

    fn admit_at(&self, now: Instant) -> Result<(), Limited> {
        let mut b = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = &mut b.tokens {
            t.refill(now);
            if t.level <= 0.0 {
                // Above zero again: any positive level admits a request.
                return Err(Limited::TokensPerMinute { retry_after_secs: t.wait_for(f64::MIN_POSITIVE) });
            }
        }
        if let Some(r) = &mut b.requests {
            r.refill(now);
            if r.level < 1.0 {
                return Err(Limited::RequestsPerMinute { retry_after_secs: r.wait_for(1.0) });
            }
            r.level -= 1.0;
        }
        Ok(())
    }

    /// Takes the tokens an answer used.
    pub fn spend_tokens(&self, tokens: u64) {
        let mut b = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = &mut b.tokens {
            t.refill(Instant::now());
            t.level -= tokens as f64;
        }
    }
}

/// The quota of each client key, in `client_keys` order; `None` for a key without limits.
#[derive(Default)]
pub struct Quotas {
    per_key: Vec<Option<Arc<Quota>>>,
}

impl Quotas {
    pub fn new(keys: &[ClientKey]) -> Quotas {
        Quotas::carry_over(keys, &[], &Quotas::default())
    }

    /// The quotas for `keys`, keeping the buckets of `previous` (for `previous_keys`) for every key whose name
    /// and key are unchanged, with its limits updated.
    pub fn carry_over(keys: &[ClientKey], previous_keys: &[ClientKey], previous: &Quotas) -> Quotas {
        let per_key = keys.iter().map(|key| {
            if key.requests_per_minute.is_none() && key.tokens_per_minute.is_none() {
                return None;
            }
            let same = previous_keys.iter().position(|p| p.name == key.name && p.digest == key.digest);
            match same.and_then(|i| previous.per_key.get(i)).and_then(Option::as_ref) {
                Some(q) => {
                    q.relimit(key);
                    Some(Arc::clone(q))
                }
                None => Some(Arc::new(Quota::new(key))),
            }
        });
        Quotas { per_key: per_key.collect() }
    }

    pub fn get(&self, key: usize) -> Option<&Quota> {
        self.per_key.get(key).and_then(|q| q.as_deref())
    }
}

impl Limited {
    pub fn retry_after_secs(&self) -> u64 {
        match self {
            Limited::RequestsPerMinute { retry_after_secs } | Limited::TokensPerMinute { retry_after_secs } => {
                *retry_after_secs
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::KeyDigest;
    use std::time::Duration;

    fn key(name: &str, rpm: Option<u32>, tpm: Option<u64>) -> ClientKey {
        ClientKey {
            name: name.to_string(),
            digest: KeyDigest::of(name.as_bytes()),
            plain: None,
            deployments: None,
            requests_per_minute: rpm,
            tokens_per_minute: tpm,
        }
    }

    #[test]
    fn requests_burst_a_minute_then_refill_at_the_steady_rate() {
        let q = Quota::new(&key("a", Some(60), None));
        let t0 = Instant::now();
        for _ in 0..60 {
            assert_eq!(q.admit_at(t0), Ok(()));
        }
        assert_eq!(q.admit_at(t0), Err(Limited::RequestsPerMinute { retry_after_secs: 1 }));
        // One request per second comes back.
        assert_eq!(q.admit_at(t0 + Duration::from_millis(1000)), Ok(()));
        assert!(q.admit_at(t0 + Duration::from_millis(1000)).is_err());
        // Never more than a minute's allowance, however long the pause.
        let later = t0 + Duration::from_secs(3600);
        for _ in 0..60 {
            assert_eq!(q.admit_at(later), Ok(()));
        }
        assert!(q.admit_at(later).is_err());
    }

    #[test]
    fn tokens_are_taken_after_the_answer_and_may_go_into_debt() {
        let q = Quota::new(&key("a", Some(1000), Some(600)));
        let t0 = Instant::now();
        assert_eq!(q.admit_at(t0), Ok(()));
        q.spend_tokens(1200);
        // 600 in debt at 10 per second: about 60 s until above zero.
        match q.admit_at(Instant::now()) {
            Err(Limited::TokensPerMinute { retry_after_secs }) => assert!((59..=61).contains(&retry_after_secs)),
            other => panic!("{other:?}"),
        }
        // A refusal for tokens took no request.
        let b = q.buckets.lock().unwrap();
        assert!(b.requests.as_ref().unwrap().level >= 998.9);
    }

    #[test]
    fn a_reload_keeps_the_buckets_of_unchanged_keys_only() {
        let old_keys = [key("a", Some(2), None), key("b", Some(2), None)];
        let old = Quotas::new(&old_keys);
        for q in [old.get(0).unwrap(), old.get(1).unwrap()] {
            q.admit().unwrap();
            q.admit().unwrap();
            assert!(q.admit().is_err());
        }
        let mut b_changed = key("b", Some(2), None);
        b_changed.digest = KeyDigest::of(b"another key");
        let new_keys = [key("c", None, None), key("a", Some(5), None), b_changed];
        let new = Quotas::carry_over(&new_keys, &old_keys, &old);
        assert!(new.get(0).is_none(), "no limits, no quota");
        assert!(new.get(1).unwrap().admit().is_err(), "a: still spent after the reload");
        assert_eq!(new.get(2).unwrap().admit(), Ok(()), "b has a new key: a new bucket");
    }
}
