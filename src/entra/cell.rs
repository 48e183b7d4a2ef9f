//! One identity's token: cached, refreshed ahead of expiry by one thread while requests go on with the current
//! token, and fetched while requests wait only when there is no valid token at all.
//!
//! A refresh starts when 5 minutes or half the token's lifetime remain, whichever is sooner, on the first
//! request after that point (and once at start). A failed fetch is logged once, with the endpoint's error, and
//! the next one waits 1 s, 2 s, 4 s… up to 60 s; meanwhile a still-valid token is used, and without one the
//! instance's attempts fail at once with that error, so that other instances are tried.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ureq::http::HeaderValue;
use ureq::Agent;

use super::fetch;
use crate::config::EntraAuth;

const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// A `401` from an instance forces a new token at most this often (a missing role gives 401 with any token).
const FORCED_REFRESH_EVERY: Duration = Duration::from_secs(30);

pub struct TokenCell {
    pub auth: EntraAuth,
    /// The label for logs and metrics (flow and client ID).
    pub label: String,
    /// The token clients: (direct, through the egress proxy). Replaced by a reload that changes `ca_bundle`,
    /// `egress_proxy` or `connect_timeout`.
    clients: Mutex<(Agent, Agent)>,
    slot: Mutex<Slot>,
    changed: Condvar,
    pub fetched_ok: AtomicU64,
    pub fetch_failed: AtomicU64,
}

#[derive(Default)]
struct Slot {
    token: Option<Token>,
    refreshing: bool,
    failures: u32,
    /// No fetch before this, after a failure.
    retry_at: Option<Instant>,
    last_error: Option<String>,
    forced_at: Option<Instant>,
}

struct Token {
    header: HeaderValue,
    expires: Instant,
    refresh_at: Instant,
}

/// What `/readyz` and `/metrics` show of a token.
pub struct Status {
    /// `valid`, `refreshing` (a fetch in flight, no valid token), `failing` (none valid, last fetch failed) or
    /// `none` (never fetched yet).
    pub state: &'static str,
    pub expires_in: Option<Duration>,
    pub last_error: Option<String>,
}

impl TokenCell {
    pub fn new(auth: EntraAuth, direct: Agent, proxied: Agent) -> TokenCell {
        TokenCell {
            label: auth.label(),
            auth,
            clients: Mutex::new((direct, proxied)),
            slot: Mutex::new(Slot::default()),
            changed: Condvar::new(),
            fetched_ok: AtomicU64::new(0),
            fetch_failed: AtomicU64::new(0),
        }
    }

    /// New token clients after a reload changed how they connect. A backoff after failures is dropped, since
    /// the change may be what fixes them, and a fetch starts now if there is no valid token.
    pub fn use_clients(self: &Arc<Self>, direct: Agent, proxied: Agent) {
        *self.clients.lock().unwrap_or_else(|p| p.into_inner()) = (direct, proxied);
        let mut slot = self.lock();
        slot.retry_at = None;
        slot.failures = 0;
        let valid = slot.token.as_ref().is_some_and(|t| Instant::now() < t.expires);
        if !valid && !slot.refreshing {
            slot.refreshing = self.spawn_fetch();
        }
    }

    fn lock(&self) -> MutexGuard<'_, Slot> {
        self.slot.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts a fetch now if there is no token and none is in flight (at start, so that the first request does
    /// not wait).
    pub fn prefetch(self: &Arc<Self>) {
        let mut slot = self.lock();
        if slot.token.is_none() && !slot.refreshing {
            slot.refreshing = self.spawn_fetch();
        }
    }

    /// The `Authorization` value to send: the current token, refreshing it in the background when due; or, with
    /// no valid token, waits up to `wait` for one. `Err` says why there is none.
    pub fn get(self: &Arc<Self>, wait: Duration) -> Result<HeaderValue, String> {
        let now = Instant::now();
        let mut slot = self.lock();
        let may_fetch = |s: &Slot| !s.refreshing && s.retry_at.is_none_or(|r| now >= r);
        if let Some(t) = slot.token.as_ref().filter(|t| now < t.expires) {
            let header = t.header.clone();
            if now >= t.refresh_at && may_fetch(&slot) {
                slot.refreshing = self.spawn_fetch();
            }
            return Ok(header);
        }
        if !slot.refreshing {
            if !may_fetch(&slot) {
                return Err(self.no_token(&slot));
            }
            slot.refreshing = self.spawn_fetch();
            if !slot.refreshing {
                return Err(format!("no Entra ID token for {}: cannot start the token request", self.label));
            }
        }
        let deadline = now + wait;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!(
                    "no token for {} within {} ms (token request in flight)",
                    self.label,
                    wait.as_millis()
                ));
            }
            slot = self.changed.wait_timeout(slot, left).unwrap_or_else(|p| p.into_inner()).0;
            if let Some(t) = slot.token.as_ref().filter(|t| Instant::now() < t.expires) {
                return Ok(t.header.clone());
            }
            if !slot.refreshing {
                return Err(self.no_token(&slot));
            }
        }
    }

    fn no_token(&self, slot: &Slot) -> String {
        let why = slot.last_error.as_deref().unwrap_or("no token request has completed yet");
        format!("no Entra ID token for {}: {why}", self.label)
    }

    /// An instance answered `401` to a request carrying `sent`: that token may have been revoked, so the next
    /// request waits for a new one (at most once per `FORCED_REFRESH_EVERY`).
    pub fn rejected(&self, sent: &HeaderValue) {
        let now = Instant::now();
        let mut slot = self.lock();
        if slot.forced_at.is_some_and(|f| now.duration_since(f) < FORCED_REFRESH_EVERY) {
            return;
        }
        if let Some(t) = slot.token.as_mut().filter(|t| t.header == *sent) {
            t.expires = now;
            slot.forced_at = Some(now);
            slot.retry_at = None;
            log::warn!("Entra ID token for {} was refused (401); getting a new one before its next use", self.label);
        }
    }

    pub fn status(&self) -> Status {
        let now = Instant::now();
        let slot = self.lock();
        let valid = slot.token.as_ref().filter(|t| now < t.expires);
        let state = match (valid, slot.refreshing, &slot.last_error) {
            (Some(_), _, _) => "valid",
            (None, true, _) => "refreshing",
            (None, false, Some(_)) => "failing",
            (None, false, None) => "none",
        };
        Status {
            state,
            expires_in: valid.map(|t| t.expires.saturating_duration_since(now)),
            last_error: slot.last_error.clone(),
        }
    }

    /// The current token itself (no `Bearer `), for scrubbing echoes of it from upstream answers; never logged.
    pub fn current_token(&self) -> Option<String> {
        let slot = self.lock();
        let value = slot.token.as_ref()?.header.to_str().ok()?;
        value.strip_prefix("Bearer ").map(str::to_string)
    }

    /// Starts a fetch on its own thread (the caller holds the slot and marks it refreshing); false if no thread
    /// could be started.
    fn spawn_fetch(self: &Arc<Self>) -> bool {
        let cell = Arc::clone(self);
        match std::thread::Builder::new().name("entra-token".into()).spawn(move || cell.fetch_now()) {
            Ok(_) => true,
            Err(e) => {
                log::warn!("cannot start a thread to fetch the Entra ID token for {}: {e}", self.label);
                false
            }
        }
    }

    fn fetch_now(&self) {
        let started = Instant::now();
        let (direct, proxied) = self.clients.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let result = fetch::fetch(&self.auth, &direct, &proxied);
        let mut slot = self.lock();
        slot.refreshing = false;
        match result {
            Ok(f) => {
                self.fetched_ok.fetch_add(1, Ordering::Relaxed);
                let mut header = match HeaderValue::try_from(format!("Bearer {}", f.token)) {
                    Ok(h) => h,
                    Err(_) => {
                        drop(slot);
                        return self.failed("the token is not a valid header value".to_string());
                    }
                };
                header.set_sensitive(true);
                // Ahead of expiry: when 5 minutes or half the lifetime remain, whichever is sooner.
                let ahead = (f.lifetime / 2).min(Duration::from_secs(300));
                slot.token =
                    Some(Token { header, expires: started + f.lifetime, refresh_at: started + f.lifetime - ahead });
                slot.failures = 0;
                slot.retry_at = None;
                slot.last_error = None;
                log::info!("Entra ID token for {} obtained; valid for {} s", self.label, f.lifetime.as_secs());
                self.changed.notify_all();
            }
            Err(e) => {
                drop(slot);
                self.failed(e);
            }
        }
    }

    fn failed(&self, error: String) {
        self.fetch_failed.fetch_add(1, Ordering::Relaxed);
        let mut slot = self.lock();
        slot.refreshing = false;
        slot.failures += 1;
        let backoff = Duration::from_secs(1u64 << (slot.failures - 1).min(6)).min(MAX_BACKOFF);
        slot.retry_at = Some(Instant::now() + backoff);
        let still_valid = slot.token.as_ref().is_some_and(|t| Instant::now() < t.expires);
        log::warn!(
            "Entra ID token request for {} failed (failure {} in a row; next try in {} s{}): {error}",
            self.label,
            slot.failures,
            backoff.as_secs(),
            if still_valid { "; the current token is still valid" } else { "; no valid token" }
        );
        slot.last_error = Some(error);
        self.changed.notify_all();
    }
}
