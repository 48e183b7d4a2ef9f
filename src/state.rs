//! The state every worker shares. `State` is everything derived from one configuration; `Shared` holds the
//! current `State` and swaps it whole on a reload, so a request in flight keeps the `State` it started with
//! (an `Arc`), and the next request sees the new one.

use std::borrow::Cow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use ureq::http::header::{HeaderName, HeaderValue, AUTHORIZATION};

use crate::balancer::Balancer;
use crate::config::{Config, Credential};
use crate::entra::Tokens;
use crate::error::Error;
use crate::guard::Guard;
use crate::metrics::Metrics;
use crate::quota::Quotas;
use crate::redact::Secrets;
use crate::resolve::DnsCache;
use crate::transport::agents::{AgentSettings, Agents};

pub struct State {
    pub config: Config,
    /// The upstream agents: their connection pools are shared, so upstream TCP/TLS connections are reused across
    /// workers; one pair of agents per instance (see `Agents`).
    pub agents: Agents,
    pub balancer: Balancer,
    pub guard: Guard,
    /// Counters since start; the same `Metrics` across reloads.
    pub metrics: Arc<Metrics>,
    /// The rate limits of each client key (`client_keys` order); kept across reloads for unchanged keys.
    pub quotas: Quotas,
    /// `config.header_name`, parsed once.
    pub key_header: HeaderName,
    /// Each instance's key as a header value, parsed once and marked sensitive (hidden from `Debug`); `None`
    /// for an instance that uses Entra ID tokens.
    pub instance_keys: Vec<Option<HeaderValue>>,
    /// The Entra ID tokens of the instances configured with `auth`; kept across reloads per identity.
    pub tokens: Tokens,
    /// Every configured key, for scrubbing text from outside (upstream error bodies and headers) before it is
    /// logged or relayed.
    pub secrets: Secrets,
}

impl State {
    /// The state of a configuration with fresh metrics (no server's counters behind them).
    pub fn new(config: Config) -> Result<State, Error> {
        State::build(config, None, Arc::default())
    }

    /// The first state of a server, counting into `metrics` (which carries the server's probes).
    pub fn with_metrics(config: Config, metrics: Arc<Metrics>) -> Result<State, Error> {
        State::build(config, None, metrics)
    }

    /// The state for a reloaded configuration: unchanged instances keep their cooldown, circuit and round-robin
    /// state, the block table is kept, and the upstream agent (its pool of open connections) is kept unless a
    /// setting it depends on changed.
    pub fn reloaded(config: Config, previous: &State) -> Result<State, Error> {
        State::build(config, Some(previous), Arc::clone(&previous.metrics))
    }

    fn build(config: Config, previous: Option<&State>, metrics: Arc<Metrics>) -> Result<State, Error> {
        let key_header = HeaderName::from_bytes(config.header_name.as_bytes())
            .map_err(|_| Error::Unusable(format!("header_name {:?} is not a valid header name", config.header_name)))?;
        let mut instance_keys = Vec::with_capacity(config.instances.len());
        for inst in &config.instances {
            let Credential::Key(key) = &inst.credential else {
                instance_keys.push(None);
                continue;
            };
            let mut v = HeaderValue::from_str(key.expose()).map_err(|_| {
                Error::Unusable(format!("the api_key of instance {} is not a valid header value", inst.name))
            })?;
            v.set_sensitive(true);
            instance_keys.push(Some(v));
        }
        let secrets = Secrets::new(config.secrets());
        // The address cache outlives agents: a reload that rebuilds them must not look every host up again (and
        // fail every request if DNS is down at that moment).
        let dns = match previous {
            Some(p) => p.agents.dns.clone(),
            None => DnsCache::new(config.dns_refresh),
        };
        dns.set_refresh(config.dns_refresh);
        // On a reload: what the agents were built from, and what they would be built from now.
        let settings = previous.map(|p| (AgentSettings::of(&p.config), AgentSettings::of(&config)));
        let agents = match (previous, &settings) {
            (Some(p), Some((before, now))) if before == now => p.agents.clone(),
            _ => Agents::new(&config, dns)?,
        };
        let balancer = match previous {
            Some(p) => Balancer::carry_over(&config.instances, &config.routing, &p.balancer),
            None => Balancer::new(&config.instances, &config.routing),
        };
        let guard = match previous {
            Some(p) => Guard::carry_over(&config, &p.guard),
            None => Guard::new(&config),
        };
        let quotas = match previous {
            Some(p) => Quotas::carry_over(&config.client_keys, &p.config.client_keys, &p.quotas),
            None => Quotas::new(&config.client_keys),
        };
        // Last, after everything that can fail: new identities start fetching a token at once.
        let same_egress = settings.as_ref().is_some_and(|(before, now)| before.same_egress(now));
        let kept = previous.map(|p| (&p.tokens, same_egress));
        let tokens = Tokens::new(&config, kept);
        Ok(State { agents, balancer, metrics, quotas, guard, key_header, instance_keys, tokens, secrets, config })
    }

    /// The header that authenticates the proxy to instance `idx`: its key in `header_name`, or `Authorization`
    /// with its identity's Entra ID token (waiting up to `connect_timeout` when there is none yet). `Err` says
    /// why no token can be had.
    pub fn credential(&self, idx: usize) -> Result<(HeaderName, HeaderValue), String> {
        if let Some(key) = &self.instance_keys[idx] {
            return Ok((self.key_header.clone(), key.clone()));
        }
        match self.tokens.for_instance(idx) {
            Some(cell) => cell.get(self.config.connect_timeout).map(|v| (AUTHORIZATION, v)),
            None => Err("the instance has neither a key nor an identity".to_string()),
        }
    }

    /// The secrets to scrub from what instance `idx` sends back: every configured key, and for an instance with
    /// Entra ID its current token (an upstream or an egress proxy may echo the `Authorization` it received).
    pub fn secrets_for(&self, idx: usize) -> Cow<'_, Secrets> {
        match self.tokens.for_instance(idx).and_then(|cell| cell.current_token()) {
            Some(token) => Cow::Owned(self.secrets.with_extra(&token)),
            None => Cow::Borrowed(&self.secrets),
        }
    }

    /// How much of an upstream error body to read for the log: the logged length plus the longest secret, so
    /// that a secret straddling the cut is read whole and redacted, not half-logged.
    pub fn error_read_bytes(&self, secrets: &Secrets) -> usize {
        self.config.error_body_max_bytes + secrets.longest()
    }

    /// An upstream error body as it may be logged: `secrets` redacted first, then cut at `error_body_max_bytes`.
    pub fn error_excerpt(&self, secrets: &Secrets, body: String) -> String {
        let mut clean = secrets.redact(&body);
        let mut cut = self.config.error_body_max_bytes.min(clean.len());
        while !clean.is_char_boundary(cut) {
            cut -= 1;
        }
        clean.truncate(cut);
        clean
    }
}

/// Holds the current `State`; see the module doc.
pub struct Shared {
    current: RwLock<Arc<State>>,
    /// Set once a stop was asked for: answers carry `Connection: close` and no connection is kept.
    pub draining: AtomicBool,
    /// `Server::stop` was called (or a stop signal arrived for this server).
    pub stop_requested: AtomicBool,
    /// The front thread has exited: the server has stopped, and the admin listener closes too.
    pub stopped: AtomicBool,
    /// This server's place in the signal table, once it takes signals (`Server::handle_signals`).
    pub signals: std::sync::Mutex<Option<crate::lifecycle::SignalSlot>>,
}

impl Shared {
    pub fn new(state: State) -> Shared {
        Shared {
            current: RwLock::new(Arc::new(state)),
            draining: AtomicBool::new(false),
            stop_requested: AtomicBool::new(false),
            stopped: AtomicBool::new(false),
            signals: std::sync::Mutex::new(None),
        }
    }

    /// The state to serve one request with.
    pub fn state(&self) -> Arc<State> {
        Arc::clone(&self.current.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Validates `config` fully, then swaps it in. On error the running configuration stays.
    pub fn reload(&self, config: Config) -> Result<(), Error> {
        let previous = self.state();
        if config.listen != previous.config.listen
            || config.workers != previous.config.workers
            || config.queue_size != previous.config.queue_size
            || config.idle_workers != previous.config.idle_workers
            || config.worker_idle != previous.config.worker_idle
            || config.listen_backlog != previous.config.listen_backlog
        {
            log::warn!(
                "listen, listen_backlog, workers, idle_workers, worker_idle_ms and queue_size are read at start \
                 only; restart to change them"
            );
        }
        let next = State::reloaded(config, &previous)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(next);
        Ok(())
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// What was asked of this server since the last call, by `Server::stop` or by signals: (reload, stop).
    pub fn take_requests(&self) -> (bool, bool) {
        let slot = *self.signals.lock().unwrap_or_else(|p| p.into_inner());
        let (reload, stop) = slot.map(|s| s.take()).unwrap_or_default();
        if stop {
            self.stop_requested.store(true, Ordering::SeqCst);
        }
        (reload, self.stop_requested.load(Ordering::SeqCst))
    }

    /// Gives up this server's place in the signal table (it has stopped).
    pub fn release_signals(&self) {
        if let Some(slot) = self.signals.lock().unwrap_or_else(|p| p.into_inner()).take() {
            slot.release();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Env, Overrides};

    struct NoEnv;
    impl Env for NoEnv {
        fn var(&self, _: &str) -> Option<String> {
            None
        }
    }

    fn config(extra: &str) -> Config {
        let text = format!(r#"{{"instances": [{{"endpoint": "https://a.example", "api_key": "k"}}]{extra}}}"#);
        Config::from_json(&text, std::path::Path::new("t.json"), &Overrides::default(), &NoEnv).expect("valid")
    }

    #[test]
    fn a_reload_keeps_the_address_cache_even_when_the_agents_are_rebuilt() {
        let first = State::new(config("")).expect("state");
        let same = State::reloaded(config(r#", "dns_refresh_ms": 5"#), &first).expect("reloaded");
        let rebuilt = State::reloaded(config(r#", "connect_timeout_ms": 5"#), &same).expect("reloaded");
        assert!(first.agents.dns.same_cache(&same.agents.dns));
        assert!(first.agents.dns.same_cache(&rebuilt.agents.dns));
    }
}
