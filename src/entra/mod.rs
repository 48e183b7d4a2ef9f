//! Microsoft Entra ID tokens for instances configured with `auth` instead of a key: one cached token per
//! identity and scope (`cell.rs`), shared by every instance that uses that identity and kept across reloads, and
//! the token requests of each flow (`fetch.rs`).

mod cell;
mod fetch;

use std::fmt::Write;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use ureq::tls::{RootCerts, TlsConfig};
use ureq::Agent;

pub use cell::TokenCell;

use crate::config::{Config, Credential};
use crate::transport::agents::egress_proxy;

/// How long one token request may take in all.
const TOKEN_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// The token cells of a configuration.
#[derive(Default)]
pub struct Tokens {
    cells: Vec<Arc<TokenCell>>,
    /// Per instance (config order): its cell in `cells`, for instances with `auth`.
    by_instance: Vec<Option<usize>>,
}

impl Tokens {
    /// The cells for `config`'s instances: one per distinct identity and scope, taken over from `previous` (a
    /// reload) when the identity is unchanged, so that a reload does not fetch tokens again. New cells start
    /// fetching at once. `previous` comes with whether the token clients' settings (`Egress`) are unchanged; when
    /// they changed, each kept cell gets new clients (and a failing one tries again at once).
    pub fn new(config: &Config, previous: Option<(&Tokens, bool)>) -> Tokens {
        let mut tokens = Tokens::default();
        let mut agents: Option<(Agent, Agent)> = None;
        for inst in &config.instances {
            let Credential::Entra(auth) = &inst.credential else {
                tokens.by_instance.push(None);
                continue;
            };
            let at = match tokens.cells.iter().position(|c| c.auth.same_identity(auth)) {
                Some(at) => at,
                None => {
                    let kept = previous.and_then(|(p, same_egress)| {
                        p.cells.iter().find(|c| c.auth.same_identity(auth)).map(|c| (c, same_egress))
                    });
                    let cell = match kept {
                        Some((c, true)) => Arc::clone(c),
                        Some((c, false)) => {
                            let (direct, proxied) = agents.get_or_insert_with(|| token_agents(config)).clone();
                            c.use_clients(direct, proxied);
                            Arc::clone(c)
                        }
                        None => {
                            let (direct, proxied) = agents.get_or_insert_with(|| token_agents(config)).clone();
                            let cell = Arc::new(TokenCell::new(auth.clone(), direct, proxied));
                            cell.prefetch();
                            cell
                        }
                    };
                    tokens.cells.push(cell);
                    tokens.cells.len() - 1
                }
            };
            tokens.by_instance.push(Some(at));
        }
        tokens
    }

    pub fn for_instance(&self, instance: usize) -> Option<&Arc<TokenCell>> {
        self.by_instance.get(instance).copied().flatten().map(|i| &self.cells[i])
    }

    /// Prometheus text: token requests by outcome, and each identity's token state.
    pub fn render(&self, out: &mut String) {
        if self.cells.is_empty() {
            return;
        }
        let _ = writeln!(
            out,
            "# HELP azure_proxy_entra_token_requests_total Entra ID token requests, by identity and outcome.\n\
             # TYPE azure_proxy_entra_token_requests_total counter"
        );
        for c in &self.cells {
            for (outcome, n) in [("ok", &c.fetched_ok), ("error", &c.fetch_failed)] {
                let n = n.load(Ordering::Relaxed);
                let _ = writeln!(
                    out,
                    "azure_proxy_entra_token_requests_total{{identity=\"{}\",outcome=\"{outcome}\"}} {n}",
                    c.label
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP azure_proxy_entra_token_valid 1 when the identity has a valid token now.\n\
             # TYPE azure_proxy_entra_token_valid gauge"
        );
        let statuses: Vec<_> = self.cells.iter().map(|c| (c, c.status())).collect();
        for (c, s) in &statuses {
            let _ = writeln!(
                out,
                "azure_proxy_entra_token_valid{{identity=\"{}\"}} {}",
                c.label,
                u8::from(s.state == "valid")
            );
        }
        let _ = writeln!(
            out,
            "# HELP azure_proxy_entra_token_expires_in_seconds Seconds until the identity's current token expires.\n\
             # TYPE azure_proxy_entra_token_expires_in_seconds gauge"
        );
        for (c, s) in &statuses {
            let secs = s.expires_in.map_or(0, |d| d.as_secs());
            let _ = writeln!(out, "azure_proxy_entra_token_expires_in_seconds{{identity=\"{}\"}} {secs}", c.label);
        }
    }

    /// Each identity's token state for `/readyz`.
    pub fn readiness(&self) -> Vec<serde_json::Value> {
        self.cells
            .iter()
            .map(|c| {
                let s = c.status();
                serde_json::json!({
                    "identity": c.label,
                    "state": s.state,
                    "expires_in_s": s.expires_in.map(|d| d.as_secs()),
                    "last_error": s.last_error,
                })
            })
            .collect()
    }
}

/// The clients for token requests: `direct` for the host-local identity endpoints (never through an egress
/// proxy), `proxied` for the Entra authority (the instances' egress settings). Both trust the instances' roots.
fn token_agents(config: &Config) -> (Agent, Agent) {
    let build = |proxy: Option<ureq::Proxy>| -> Agent {
        let roots = match &config.upstream_roots {
            Some(certs) => RootCerts::new_with_certs(certs),
            None => RootCerts::WebPki,
        };
        Agent::config_builder()
            .tls_config(TlsConfig::builder().root_certs(roots).build())
            .http_status_as_error(false)
            .max_redirects(0)
            .user_agent("azure-proxy")
            .proxy(proxy)
            .timeout_connect(Some(config.connect_timeout))
            .timeout_global(Some(TOKEN_REQUEST_TIMEOUT))
            .build()
            .into()
    };
    (build(None), build(egress_proxy(config)))
}
