//! Client admission: the client-key check (constant time) and the block table that shuts out an IP after
//! `max_bad_keys` consecutive wrong keys for `block_duration`.
//!
//! The table's mutex is held only for a hash-map lookup or update, never across I/O. It is bounded by
//! `max_tracked_clients`: when full, a client that blocks nothing is forgotten to make room, so a flood from many
//! addresses cannot switch blocking off for new offenders; blocks in force are never dropped. Stale entries are also
//! swept every `SWEEP_EVERY` strikes.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::config::{Config, KeyDigest};
use crate::http::parse::Head;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The client may go on; `key` is the index of its key in `client_keys` (`None` when there is no allowlist).
    Allowed { key: Option<usize> },
    /// 403 with `Retry-After: retry_after_secs`.
    Blocked { retry_after_secs: u64 },
    /// 401: no key header (does not count as a strike: that is a misconfigured client, not a guess).
    MissingKey,
    /// 401: a key that is not in the allowlist (a strike).
    BadKey,
}

#[derive(Debug, Clone, Copy)]
struct Strikes {
    consecutive_bad: u32,
    blocked_until: Option<Instant>,
    last_strike: Instant,
}

impl Strikes {
    /// Whether the entry still matters: a block in force, or strikes recent enough to add up to one.
    fn is_live(&self, now: Instant, memory: Duration) -> bool {
        self.blocked_until.is_some_and(|u| u > now) || now.duration_since(self.last_strike) < memory
    }
}

/// A sweep of stale entries runs every this many strikes, so the table does not wait to be full to shrink.
const SWEEP_EVERY: u64 = 1024;

pub struct Guard {
    /// The SHA-256 of each client key, in `client_keys` order.
    keys: Vec<KeyDigest>,
    max_bad_keys: u32,
    block_duration: Duration,
    max_tracked: usize,
    table: Arc<Mutex<Table>>,
}

/// The block table, shared across configuration reloads so that a reload does not unblock anyone.
#[derive(Default)]
pub struct Table {
    clients: HashMap<IpAddr, Strikes>,
    strikes_since_sweep: u64,
    /// Whether "table full" was logged since the last sweep (once per sweep period, not once per request).
    warned_full: bool,
}

impl Guard {
    pub fn new(config: &Config) -> Guard {
        Guard::with_table(config, Arc::default())
    }

    /// A guard for a new configuration that keeps the strikes and blocks of `previous`.
    pub fn carry_over(config: &Config, previous: &Guard) -> Guard {
        Guard::with_table(config, Arc::clone(&previous.table))
    }

    fn with_table(config: &Config, table: Arc<Mutex<Table>>) -> Guard {
        Guard {
            keys: config.client_keys.iter().map(|k| k.digest).collect(),
            max_bad_keys: config.max_bad_keys,
            block_duration: config.block_duration,
            max_tracked: config.max_tracked_clients,
            table,
        }
    }

    /// Decides whether a request from `ip` presenting `keys` (the forms of one key, see `presented_keys`) may go
    /// on, and records the outcome.
    pub fn check(&self, ip: IpAddr, keys: &[&[u8]]) -> Verdict {
        let now = Instant::now();
        if let Some(secs) = self.blocked_for(ip, now) {
            return Verdict::Blocked { retry_after_secs: secs };
        }
        if keys.is_empty() {
            return Verdict::MissingKey;
        }
        if self.keys.is_empty() {
            return Verdict::Allowed { key: None };
        }
        // Keys are compared as SHA-256 digests (some are configured only as one). Every form is compared with
        // every key, always, so that the time taken does not tell which one nearly matched.
        let presented: Vec<KeyDigest> = keys.iter().map(|k| KeyDigest::of(k)).collect();
        let mut matched = None;
        for (i, k) in self.keys.iter().enumerate() {
            let hit = presented.iter().fold(false, |hit, p| hit | constant_time_eq(&k.0, &p.0));
            if hit {
                matched = Some(i);
            }
        }
        match matched {
            Some(i) => {
                self.forgive(ip);
                Verdict::Allowed { key: Some(i) }
            }
            None => self.strike(ip, now),
        }
    }

    fn blocked_for(&self, ip: IpAddr, now: Instant) -> Option<u64> {
        let table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        let until = table.clients.get(&ip)?.blocked_until?;
        let left = until.checked_duration_since(now)?;
        Some(left.as_secs() + u64::from(left.subsec_nanos() > 0))
    }

    fn forgive(&self, ip: IpAddr) {
        let mut table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        // Entries exist only for clients with strikes, so the happy path is one lookup on a small map.
        if !table.clients.is_empty() {
            table.clients.remove(&ip);
        }
    }

    fn strike(&self, ip: IpAddr, now: Instant) -> Verdict {
        if self.max_bad_keys == 0 {
            return Verdict::BadKey;
        }
        let mut table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        // Strikes older than one block period are forgotten: they can no longer add up to a block worth having.
        let memory = self.block_duration.max(Duration::from_secs(60));
        table.strikes_since_sweep += 1;
        if table.strikes_since_sweep >= SWEEP_EVERY {
            table.strikes_since_sweep = 0;
            table.warned_full = false;
            table.clients.retain(|_, s| s.is_live(now, memory));
        }
        if !table.clients.contains_key(&ip) && table.clients.len() >= self.max_tracked {
            // Full of recent strikes (a flood from many addresses): forget one client that blocks nothing, so that
            // a new offender is still counted; blocks in force are never dropped.
            let victim =
                table.clients.iter().find(|(_, s)| s.blocked_until.is_none_or(|u| u <= now)).map(|(ip, _)| *ip);
            if !table.warned_full {
                table.warned_full = true;
                log::warn!(
                    "block table full ({} clients, max_tracked_clients); forgetting strikes of unblocked clients to make room",
                    table.clients.len()
                );
            }
            match victim {
                Some(v) => {
                    table.clients.remove(&v);
                }
                None => return Verdict::BadKey,
            }
        }
        let entry =
            table.clients.entry(ip).or_insert(Strikes { consecutive_bad: 0, blocked_until: None, last_strike: now });
        entry.last_strike = now;
        if entry.blocked_until.is_some_and(|u| u <= now) {
            entry.blocked_until = None;
        }
        entry.consecutive_bad += 1;
        if entry.consecutive_bad >= self.max_bad_keys {
            entry.consecutive_bad = 0;
            entry.blocked_until = Some(now + self.block_duration);
            log::warn!(
                "client {ip} blocked for {}s after {} consecutive bad keys",
                self.block_duration.as_secs(),
                self.max_bad_keys
            );
        }
        Verdict::BadKey
    }

    /// Addresses blocked right now.
    pub fn blocked_clients(&self) -> usize {
        let now = Instant::now();
        let table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        table.clients.values().filter(|s| s.blocked_until.is_some_and(|u| u > now)).count()
    }

    pub fn tracked_clients(&self) -> usize {
        self.table.lock().unwrap_or_else(|p| p.into_inner()).clients.len()
    }
}

/// Equal-length comparison whose time depends only on the lengths, not on where the first difference is.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = u8::from(a.len() != b.len());
    for (i, x) in a.iter().enumerate() {
        diff |= x ^ b.get(i).copied().unwrap_or(0);
    }
    diff == 0
}

/// Why a request's client key could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyConflict {
    /// `client_header_name` and `Authorization: Bearer` carry different keys.
    TwoKeys,
}

/// The client key a request presents, in the forms to compare: from `client_header_name` (default `api-key`,
/// what `AzureOpenAI` clients send) or from `Authorization: Bearer <key>` (what `OpenAI` clients of the v1 API
/// send; the scheme in any case). Both may come (an SDK configured both ways) if they carry the same key.
/// When `client_header_name` is `authorization` itself (an old configuration listing `"Bearer <key>"` in
/// `client_keys`), the whole value and the bearer token are both forms of the one key.
pub fn presented_keys<'a>(head: &'a Head, client_header_name: &str) -> Result<Vec<&'a [u8]>, KeyConflict> {
    let named = head.header(client_header_name).filter(|v| !v.is_empty());
    let bearer = head.header("authorization").and_then(bearer_token);
    Ok(match (named, bearer) {
        (Some(n), Some(b)) if client_header_name == "authorization" => vec![n, b],
        (Some(n), Some(b)) if !constant_time_eq(n, b) => return Err(KeyConflict::TwoKeys),
        (Some(k), _) | (None, Some(k)) => vec![k],
        (None, None) => Vec::new(),
    })
}

/// The token of an `Authorization: Bearer <token>` value (RFC 6750 §2.1; the scheme is case-insensitive).
fn bearer_token(value: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = value.split_at(value.iter().position(|b| *b == b' ')?);
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return None;
    }
    let token = rest.trim_ascii();
    (!token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Overrides, ProcessEnv};
    use std::path::Path;

    fn guard(extra: &str) -> Guard {
        let text = format!(
            r#"{{"instances": [{{"endpoint": "https://a.example", "api_key": "k"}}], "client_keys": ["good", "also"] {extra}}}"#
        );
        Guard::new(&Config::from_json(&text, Path::new("t"), &Overrides::default(), &ProcessEnv).expect("config"))
    }

    #[test]
    fn constant_time_eq_edges() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
        assert!(!constant_time_eq(b"ab", b"abc"));
        assert!(constant_time_eq(b"", b""));
    }

    #[test]
    fn strikes_block_and_good_key_resets() {
        let g = guard(r#", "max_bad_keys": 3, "block_seconds": 60"#);
        let ip: IpAddr = "10.0.0.1".parse().expect("ip");
        assert_eq!(g.check(ip, &[b"bad"]), Verdict::BadKey);
        assert_eq!(g.check(ip, &[b"bad"]), Verdict::BadKey);
        assert_eq!(g.check(ip, &[b"good"]), Verdict::Allowed { key: Some(0) });
        assert_eq!(g.tracked_clients(), 0);
        for _ in 0..3 {
            assert_eq!(g.check(ip, &[b"bad"]), Verdict::BadKey);
        }
        assert!(matches!(g.check(ip, &[b"good"]), Verdict::Blocked { retry_after_secs: 60 }));
        let other: IpAddr = "10.0.0.2".parse().expect("ip");
        assert_eq!(g.check(other, &[b"also"]), Verdict::Allowed { key: Some(1) });
        assert_eq!(g.check(other, &[]), Verdict::MissingKey);
    }

    #[test]
    fn a_full_table_still_blocks_new_offenders_and_keeps_blocks() {
        let g = guard(r#", "max_tracked_clients": 10, "max_bad_keys": 2"#);
        let first: IpAddr = "10.9.9.9".parse().expect("ip");
        g.check(first, &[b"bad"]);
        g.check(first, &[b"bad"]);
        for i in 0..1000u32 {
            g.check(IpAddr::from(i.to_be_bytes()), &[b"bad"]);
        }
        assert!(g.tracked_clients() <= 10);
        assert!(matches!(g.check(first, &[b"good"]), Verdict::Blocked { .. }), "a block in force survives");
        let late: IpAddr = "10.8.8.8".parse().expect("ip");
        g.check(late, &[b"bad"]);
        g.check(late, &[b"bad"]);
        assert!(matches!(g.check(late, &[b"good"]), Verdict::Blocked { .. }), "new offenders are still counted");
    }

    #[test]
    fn table_is_bounded() {
        let g = guard(r#", "max_tracked_clients": 10"#);
        for i in 0..100u32 {
            g.check(IpAddr::from(i.to_be_bytes()), &[b"bad"]);
        }
        assert!(g.tracked_clients() <= 10);
    }

    fn head(text: &str) -> Head {
        crate::http::parse::parse_head(text.as_bytes(), 65536, 100).expect("parses").expect("complete")
    }

    #[test]
    fn keys_from_the_named_header_or_a_bearer_token() {
        let keys = |extra: &str, named: &str| {
            let h = head(&format!("GET / HTTP/1.1\r\nHost: h\r\n{extra}\r\n"));
            presented_keys(&h, named)
                .map(|v| v.iter().map(|k| String::from_utf8_lossy(k).into_owned()).collect::<Vec<_>>())
        };
        assert_eq!(keys("api-key: k1\r\n", "api-key"), Ok(vec!["k1".to_string()]));
        assert_eq!(keys("Authorization: Bearer k1\r\n", "api-key"), Ok(vec!["k1".to_string()]));
        assert_eq!(keys("Authorization: bearer   k1 \r\n", "api-key"), Ok(vec!["k1".to_string()]));
        assert_eq!(keys("Authorization: BEARER k1\r\n", "api-key"), Ok(vec!["k1".to_string()]));
        assert_eq!(keys("api-key: k1\r\nAuthorization: Bearer k1\r\n", "api-key"), Ok(vec!["k1".to_string()]));
        assert_eq!(keys("api-key: k1\r\nAuthorization: Bearer k2\r\n", "api-key"), Err(KeyConflict::TwoKeys));
        assert_eq!(keys("Authorization: Basic dTpw\r\n", "api-key"), Ok(vec![]));
        assert_eq!(keys("Authorization: Bearer\r\n", "api-key"), Ok(vec![]));
        assert_eq!(keys("api-key:\r\n", "api-key"), Ok(vec![]));
        // The old way to take v1 clients: client_header_name "Authorization" with "Bearer <key>" in client_keys.
        assert_eq!(
            keys("Authorization: Bearer k1\r\n", "authorization"),
            Ok(vec!["Bearer k1".to_string(), "k1".to_string()])
        );
    }
}
