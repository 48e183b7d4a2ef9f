//! Which instances a request tries, in which order, and what each attempt taught us about the instance.
//!
//! - **Tiers**: instances are grouped by `priority` (lower first). A request walks the best tier first and falls
//!   to the next only when every instance of the tier is unavailable or has failed for this request.
//! - **Weights**: inside a tier, smooth weighted round-robin (nginx's algorithm). The sequence it produces is
//!   precomputed at start-up, one slot per unit of weight, so picking is one atomic increment: no lock on the
//!   happy path. With every weight 1 it is plain round-robin, the original proxy's behaviour.
//! - **Cooldown**: a 429 or 503 takes the instance out until its `retry-after-ms` / `x-ms-retry-after-ms` /
//!   `Retry-After` time (default `cooldown_ms`, capped at `max_cooldown_ms`).
//! - **Circuit breaker**: `circuit_failures` consecutive connection failures or timeouts open the circuit for
//!   `circuit_open_ms`, doubling on each failed probe up to `circuit_max_open_ms`. When the interval is over, one
//!   real request probes the instance (half-open); any HTTP answer closes the circuit. No background traffic.
//!
//! State is per instance, in atomics; it is never held across I/O.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::config::{Instance, Routing};

/// What an attempt told us about an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Observation {
    /// An HTTP answer; `retry_after` is the retry time the instance named, if any (honoured for 429/503).
    Answered { status: u16, retry_after: Option<Duration> },
    /// Connection refused/reset, DNS, TLS, a timeout before the response head, or an answer that is not usable
    /// HTTP (an unsolicited 101, a malformed head).
    Unreachable,
}

/// Why an instance cannot take a request now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unavailable {
    CoolingDown(Duration),
    CircuitOpen(Duration),
}

impl Unavailable {
    pub fn remaining(self) -> Duration {
        match self {
            Unavailable::CoolingDown(d) | Unavailable::CircuitOpen(d) => d,
        }
    }
}

/// The attempt order for one request, or why there is none.
#[derive(Debug)]
pub enum Plan {
    /// Instance indexes to try, in order (each at most once); already cut to `max_attempts`.
    Try(Vec<usize>),
    /// Every eligible instance is unavailable; `all_cooling` when none of them is merely circuit-open.
    NoneAvailable { retry_after: Duration, all_cooling: bool },
    /// No instance serves the requested deployment (`deployments_only` everywhere).
    NoneEligible,
}

struct Tier {
    /// Instance indexes in smooth-weighted-round-robin order, one slot per unit of weight.
    sequence: Vec<usize>,
    next: AtomicUsize,
}

/// Per-instance health. Times are milliseconds since the balancer's origin; 0 means "not set".
#[derive(Default)]
struct Health {
    cooldown_until: AtomicU64,
    open_until: AtomicU64,
    open_for_ms: AtomicU64,
    failures: AtomicU32,
    probing: AtomicBool,
}

pub struct Balancer {
    tiers: Vec<Tier>,
    health: Vec<Health>,
    names: Vec<String>,
    /// (name, endpoint) per instance: what makes an instance "the same" across a reload.
    keys: Vec<(String, String)>,
    routing: Routing,
    origin: Instant,
}

impl Balancer {
    pub fn new(instances: &[Instance], routing: &Routing) -> Balancer {
        let mut priorities: Vec<u32> = instances.iter().map(|i| i.priority).collect();
        priorities.sort_unstable();
        priorities.dedup();
        let tiers = priorities
            .into_iter()
            .map(|p| {
                let members: Vec<(usize, u32)> =
                    instances.iter().enumerate().filter(|(_, i)| i.priority == p).map(|(n, i)| (n, i.weight)).collect();
                Tier { sequence: smooth_weighted_sequence(&members), next: AtomicUsize::new(0) }
            })
            .collect();
        Balancer {
            tiers,
            health: instances.iter().map(|_| Health::default()).collect(),
            names: instances.iter().map(|i| i.name.clone()).collect(),
            keys: instances.iter().map(|i| (i.name.clone(), i.endpoint.clone())).collect(),
            routing: routing.clone(),
            // One tick back, so that no real time is ever 0 ("not set").
            origin: Instant::now() - Duration::from_millis(1),
        }
    }

    fn now_ms(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64
    }

    /// A balancer for a reloaded configuration: instances with the same name and endpoint keep their cooldown
    /// and circuit state, and a tier made of the same instances keeps its round-robin position.
    pub fn carry_over(instances: &[Instance], routing: &Routing, previous: &Balancer) -> Balancer {
        let mut next = Balancer::new(instances, routing);
        next.origin = previous.origin;
        for (i, inst) in instances.iter().enumerate() {
            let same = previous.keys.iter().position(|k| *k == (inst.name.clone(), inst.endpoint.clone()));
            if let Some(j) = same {
                let (old, new) = (&previous.health[j], &next.health[i]);
                new.cooldown_until.store(old.cooldown_until.load(Ordering::Relaxed), Ordering::Relaxed);
                new.open_until.store(old.open_until.load(Ordering::Relaxed), Ordering::Relaxed);
                new.open_for_ms.store(old.open_for_ms.load(Ordering::Relaxed), Ordering::Relaxed);
                new.failures.store(old.failures.load(Ordering::Relaxed), Ordering::Relaxed);
            }
        }
        for tier in &next.tiers {
            let names: Vec<&(String, String)> = tier.sequence.iter().map(|i| &next.keys[*i]).collect();
            let twin =
                previous.tiers.iter().find(|t| t.sequence.iter().map(|i| &previous.keys[*i]).eq(names.iter().copied()));
            if let Some(t) = twin {
                tier.next.store(t.next.load(Ordering::Relaxed), Ordering::Relaxed);
            }
        }
        next
    }

    /// The instances to try for one request, among those for which `eligible` holds.
    pub fn plan(&self, eligible: impl Fn(usize) -> bool) -> Plan {
        let now = self.now_ms();
        let mut order = Vec::new();
        let mut seen = vec![false; self.health.len()];
        let mut soonest: Option<Duration> = None;
        let mut all_cooling = true;
        let mut any_eligible = false;
        for tier in &self.tiers {
            let len = tier.sequence.len();
            let start = tier.next.fetch_add(1, Ordering::Relaxed) % len;
            for i in 0..len {
                let idx = tier.sequence[(start + i) % len];
                if seen[idx] || !eligible(idx) {
                    continue;
                }
                seen[idx] = true;
                any_eligible = true;
                match self.unavailable(idx, now) {
                    None => order.push(idx),
                    Some(why) => {
                        all_cooling &= matches!(why, Unavailable::CoolingDown(_));
                        soonest = Some(soonest.map_or(why.remaining(), |s| s.min(why.remaining())));
                    }
                }
            }
        }
        if !any_eligible {
            return Plan::NoneEligible;
        }
        if order.is_empty() {
            return Plan::NoneAvailable { retry_after: soonest.unwrap_or_default(), all_cooling };
        }
        order.truncate(self.routing.max_attempts);
        Plan::Try(order)
    }

    /// Why instance `idx` cannot take a request now, if it cannot. A circuit whose open interval is over is
    /// available (half-open) unless its one probe is already in flight.
    pub fn unavailable_now(&self, idx: usize) -> Option<Unavailable> {
        self.unavailable(idx, self.now_ms())
    }

    fn unavailable(&self, idx: usize, now: u64) -> Option<Unavailable> {
        let h = &self.health[idx];
        let cooldown = h.cooldown_until.load(Ordering::Relaxed);
        if cooldown > now {
            return Some(Unavailable::CoolingDown(Duration::from_millis(cooldown - now)));
        }
        let open = h.open_until.load(Ordering::Relaxed);
        if open > now {
            return Some(Unavailable::CircuitOpen(Duration::from_millis(open - now)));
        }
        if open != 0 && h.probing.load(Ordering::Relaxed) {
            return Some(Unavailable::CircuitOpen(Duration::from_millis(self.routing.circuit_open.as_millis() as u64)));
        }
        None
    }

    /// Claims instance `idx` for an attempt that is about to start. False when it became unavailable since the
    /// plan was made, or when it is half-open and another request already holds the one probe.
    pub fn acquire(&self, idx: usize) -> bool {
        let now = self.now_ms();
        let h = &self.health[idx];
        if h.cooldown_until.load(Ordering::Relaxed) > now {
            return false;
        }
        match h.open_until.load(Ordering::Relaxed) {
            0 => true,
            open if open > now => false,
            _ => h.probing.compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed).is_ok(),
        }
    }

    /// Records what an attempt on `idx` showed.
    pub fn observe(&self, idx: usize, what: Observation) {
        let h = &self.health[idx];
        let now = self.now_ms();
        match what {
            Observation::Answered { status, retry_after } => {
                if (status == 429 || status == 503) && !self.routing.max_cooldown.is_zero() {
                    let wait = retry_after.unwrap_or(self.routing.default_cooldown).min(self.routing.max_cooldown);
                    h.cooldown_until.fetch_max(now + wait.as_millis() as u64, Ordering::Relaxed);
                    log::info!("instance {} cooling down for {} ms after {status}", self.names[idx], wait.as_millis());
                }
                h.failures.store(0, Ordering::Relaxed);
                if h.open_until.swap(0, Ordering::Relaxed) != 0 {
                    log::info!("instance {} answered again; circuit closed", self.names[idx]);
                }
                h.open_for_ms.store(0, Ordering::Relaxed);
                h.probing.store(false, Ordering::Release);
            }
            Observation::Unreachable => {
                let failures = h.failures.fetch_add(1, Ordering::Relaxed) + 1;
                let was_probe = h.probing.swap(false, Ordering::AcqRel);
                let threshold = self.routing.circuit_failures;
                if threshold == 0 || (!was_probe && failures < threshold) {
                    return;
                }
                let base = self.routing.circuit_open.as_millis() as u64;
                let max = self.routing.circuit_max_open.as_millis() as u64;
                let previous = h.open_for_ms.load(Ordering::Relaxed);
                let open_for = if was_probe && previous > 0 { (previous * 2).min(max) } else { base.min(max) };
                h.open_for_ms.store(open_for, Ordering::Relaxed);
                h.open_until.store(now + open_for, Ordering::Relaxed);
                log::warn!(
                    "instance {} unreachable {failures} times in a row; circuit open for {open_for} ms",
                    self.names[idx]
                );
            }
        }
    }

    /// Gives back a probe claimed by `acquire` when the attempt ended for a reason that says nothing about the
    /// instance (this process ran out of file descriptors, say).
    pub fn release(&self, idx: usize) {
        self.health[idx].probing.store(false, Ordering::Release);
    }

    /// Each instance's name and, if it cannot take requests now, why.
    pub fn snapshot(&self) -> Vec<(&str, Option<Unavailable>)> {
        let now = self.now_ms();
        self.names.iter().enumerate().map(|(i, n)| (n.as_str(), self.unavailable(i, now))).collect()
    }
}

/// nginx's smooth weighted round-robin, unrolled: each round every member gains its weight, the largest is
/// picked and loses the total. One full cycle has exactly `weight` slots per member, evenly spread.
fn smooth_weighted_sequence(members: &[(usize, u32)]) -> Vec<usize> {
    let total: i64 = members.iter().map(|(_, w)| i64::from(*w)).sum();
    let mut current = vec![0i64; members.len()];
    let mut sequence = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = 0;
        for (k, (_, w)) in members.iter().enumerate() {
            current[k] += i64::from(*w);
            if current[k] > current[best] {
                best = k;
            }
        }
        current[best] -= total;
        sequence.push(members[best].0);
    }
    sequence
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, Overrides, ProcessEnv};
    use std::path::Path;

    fn balancer(instances: &str, extra: &str) -> Balancer {
        let text = format!(r#"{{"instances": [{instances}] {extra}}}"#);
        let c = Config::from_json(&text, Path::new("t"), &Overrides::default(), &ProcessEnv).expect("config");
        Balancer::new(&c.instances, &c.routing)
    }

    fn inst(name: &str, more: &str) -> String {
        format!(r#"{{"endpoint": "https://{name}.example", "api_key": "k", "name": "{name}" {more}}}"#)
    }

    fn order(b: &Balancer) -> Vec<usize> {
        match b.plan(|_| true) {
            Plan::Try(o) => o,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn equal_weights_are_plain_round_robin() {
        let b = balancer(&[inst("a", ""), inst("b", ""), inst("c", "")].join(","), "");
        assert_eq!(order(&b), [0, 1, 2]);
        assert_eq!(order(&b), [1, 2, 0]);
        assert_eq!(order(&b), [2, 0, 1]);
        assert_eq!(order(&b), [0, 1, 2]);
    }

    #[test]
    fn weights_hold_within_five_percent_over_10000_picks() {
        let b = balancer(&[inst("a", r#", "weight": 5"#), inst("b", r#", "weight": 3"#), inst("c", "")].join(","), "");
        let mut counts = [0usize; 3];
        for _ in 0..10_000 {
            counts[order(&b)[0]] += 1;
        }
        for (got, weight) in counts.iter().zip([5.0, 3.0, 1.0]) {
            let expected = 10_000.0 * weight / 9.0;
            assert!((*got as f64 - expected).abs() <= expected * 0.05, "{counts:?}");
        }
        // Smooth: the heavy instance is never picked more than twice in a row for 5:3:1.
        let seq = smooth_weighted_sequence(&[(0, 5), (1, 3), (2, 1)]);
        assert_eq!(seq, [0, 1, 0, 2, 0, 1, 0, 1, 0]);
    }

    #[test]
    fn tiers_fall_through_only_when_the_best_tier_is_out() {
        let b = balancer(&[inst("ptu", ""), inst("paygo", r#", "priority": 1"#)].join(","), "");
        assert_eq!(order(&b), [0, 1], "the better tier first, the next as overflow");
        b.observe(0, Observation::Answered { status: 429, retry_after: Some(Duration::from_secs(30)) });
        assert_eq!(order(&b), [1]);
        b.observe(0, Observation::Answered { status: 200, retry_after: None });
        assert_eq!(order(&b), [1], "an answer does not end a cooldown early");
    }

    #[test]
    fn cooldown_is_capped_and_zero_cap_disables_it() {
        let b = balancer(&[inst("a", ""), inst("b", "")].join(","), r#", "max_cooldown_ms": 50"#);
        b.observe(0, Observation::Answered { status: 429, retry_after: Some(Duration::from_secs(3600)) });
        match b.unavailable_now(0) {
            Some(Unavailable::CoolingDown(d)) => assert!(d <= Duration::from_millis(50), "{d:?}"),
            other => panic!("{other:?}"),
        }
        let off = balancer(&[inst("a", ""), inst("b", "")].join(","), r#", "max_cooldown_ms": 0"#);
        off.observe(0, Observation::Answered { status: 429, retry_after: Some(Duration::from_secs(5)) });
        assert_eq!(off.unavailable_now(0), None);
    }

    #[test]
    fn all_cooling_means_none_available_with_the_shortest_wait() {
        let b = balancer(&[inst("a", ""), inst("b", "")].join(","), "");
        b.observe(0, Observation::Answered { status: 429, retry_after: Some(Duration::from_secs(20)) });
        b.observe(1, Observation::Answered { status: 503, retry_after: Some(Duration::from_secs(7)) });
        match b.plan(|_| true) {
            Plan::NoneAvailable { retry_after, all_cooling: true } => {
                assert!(
                    retry_after <= Duration::from_secs(7) && retry_after > Duration::from_secs(6),
                    "{retry_after:?}"
                )
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(b.plan(|i| i == 5), Plan::NoneEligible));
    }

    #[test]
    fn breaker_opens_probes_once_and_closes() {
        let b =
            balancer(&[inst("a", ""), inst("b", "")].join(","), r#", "circuit_failures": 2, "circuit_open_ms": 30"#);
        b.observe(0, Observation::Unreachable);
        assert_eq!(b.unavailable_now(0), None, "one failure is not a pattern");
        b.observe(0, Observation::Unreachable);
        assert!(matches!(b.unavailable_now(0), Some(Unavailable::CircuitOpen(_))));
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(b.unavailable_now(0), None, "half-open after the interval");
        assert!(b.acquire(0), "the first request gets the probe");
        assert!(!b.acquire(0), "only one probe at a time");
        b.observe(0, Observation::Unreachable);
        match b.unavailable_now(0) {
            Some(Unavailable::CircuitOpen(d)) => assert!(d > Duration::from_millis(30), "interval doubled: {d:?}"),
            other => panic!("{other:?}"),
        }
        std::thread::sleep(Duration::from_millis(70));
        assert!(b.acquire(0));
        b.observe(0, Observation::Answered { status: 500, retry_after: None });
        assert_eq!(b.unavailable_now(0), None);
        assert!(b.acquire(0) && b.acquire(0), "closed: no probe gate any more");
    }

    #[test]
    fn max_attempts_cuts_the_order() {
        let b = balancer(&[inst("a", ""), inst("b", ""), inst("c", "")].join(","), r#", "max_attempts": 2"#);
        assert_eq!(order(&b).len(), 2);
    }
}
