//! The ureq agents that carry every upstream request: configured as a proxy needs them, on the project's own
//! resolver (`resolve`) and socket layer (`transport`).

use std::time::Duration;

use ureq::Agent;

use super::{TlsClient, Upstream};
use crate::config::{Config, EgressProxy};
use crate::error::Error;
use crate::resolve::{DnsCache, RefreshOnFailure};

/// ureq's input buffer per upstream connection: it holds a response head (it grows by itself for a larger one)
/// and each piece of body handed over. 4 KiB: an SSE event is well under 1 KiB. (ureq grows it to 10 KiB while it
/// sends a request body, which it reads through the buffer's free space; that is ureq's own minimum.)
const UPSTREAM_INPUT_BYTES: usize = 4 * 1024;
/// ureq's output buffer per upstream connection of the small agent: the request head must fit it whole (ureq
/// refuses a larger one); a body goes out through it in pieces of this size. SDK requests carry about 1 KiB of
/// head; measured per open stream, every KiB here is a KiB of each stream's memory.
pub const SMALL_OUTPUT_BYTES: usize = 4 * 1024;

/// Per instance, two agents that differ only in their output buffer. ureq allocates it, zero-filled, per
/// connection and keeps it for the connection's life, and it must hold the whole request head: sized for
/// `max_head_bytes` (32 KiB) it was the largest part of every open stream's memory, while real heads are around
/// 1 KiB. So requests whose head fits `SMALL_OUTPUT_BYTES` (all but odd ones) use the small one, the others the
/// large one, each with its own pool.
///
/// Agents (and so connection pools) are per instance because ureq's pool, on every checkout, ranks each pooled
/// connection among those of its host by comparing host names pairwise (`Pool::purge`): with one pool for all
/// instances that was 8 % of the proxy's CPU at 16 connections to 3 instances (`http::uri::Authority::eq` in
/// `perf report`). With one host per pool it is one pass.
///
/// All resolve upstream hosts through one `DnsCache`, and make TLS connections from one `TlsClient` (one session
/// store, so any connection to a host can resume a session another one made).
#[derive(Clone)]
pub struct Agents {
    /// (small, large) per instance, in configuration order.
    per_instance: Vec<(Agent, Agent)>,
    pub dns: DnsCache,
}

impl Agents {
    pub fn new(config: &Config, dns: DnsCache) -> Result<Agents, Error> {
        // A ticket per connection the two pools may hold for a host: after a lull each reconnect can resume.
        let tls = TlsClient::new(config.upstream_roots.as_deref(), 2 * config.upstream_idle_per_instance)
            .map_err(Error::Unusable)?;
        let large = SMALL_OUTPUT_BYTES.max(config.max_head_bytes + 1024);
        let per_instance = (0..config.instances.len())
            .map(|_| (build_agent(config, SMALL_OUTPUT_BYTES, &dns, &tls), build_agent(config, large, &dns, &tls)))
            .collect();
        Ok(Agents { per_instance, dns })
    }

    /// The agent for a request to instance `instance` whose head (request line and headers) is about
    /// `head_bytes` long.
    pub fn get(&self, instance: usize, head_bytes: usize) -> &Agent {
        let (small, large) = &self.per_instance[instance];
        // Room for what ureq adds (Host, Content-Length) and rounding in the estimate.
        if head_bytes + 512 <= SMALL_OUTPUT_BYTES {
            small
        } else {
            large
        }
    }
}

/// An upstream client set up as a proxy needs it: statuses are answers, not errors; redirects go back to the
/// client; no environment proxy; nothing added to the client's headers; connect, response-head and per-read
/// timeouts only, because a whole-body timeout would cut long streams; idle connections kept for
/// `upstream_idle_timeout_ms`. Host names are resolved through `dns` (cached, see `resolve`); connections are
/// made by `transport`, TLS ones from `tls`.
fn build_agent(config: &Config, output_bytes: usize, dns: &DnsCache, tls: &TlsClient) -> Agent {
    let idle_per_host = config.upstream_idle_per_instance;
    let proxy = egress_proxy(config);
    // No tls_config: `tls` holds the roots (ureq's TLS settings are not used by our connector).
    let agent_config = Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(0)
        .max_redirects_will_error(false)
        .allow_non_standard_methods(true)
        .user_agent("")
        .accept("")
        .proxy(proxy)
        .no_delay(true)
        .timeout_connect(Some(config.connect_timeout))
        // No timeout_resolve: ureq's own resolver would run every lookup on a new thread (measured: one clone3
        // per request, throughput down 60 %), and ours does not use it. `DnsCache` bounds lookups instead: a
        // request waits only for the first lookup of a host (bounded by resolv.conf's timeout and attempts; the
        // connect timeout starts after it), later ones run on its two refresh threads while the cached addresses
        // are used.
        .timeout_recv_response(Some(config.upstream_response_timeout))
        .timeout_per_read(Some(config.upstream_read_timeout))
        // 128 KiB each by default, per upstream connection: 256 open streams held 84 MiB (see `Agents`).
        .input_buffer_size(UPSTREAM_INPUT_BYTES)
        .output_buffer_size(output_bytes)
        // One instance per agent: its pool holds that instance's idle connections only.
        .max_idle_connections(idle_per_host)
        .max_idle_connections_per_host(idle_per_host)
        .max_idle_age(config.upstream_idle_timeout)
        .build();
    let connector = RefreshOnFailure::new(Upstream::new(tls.clone()), dns.clone());
    Agent::with_parts(agent_config, connector, dns.clone())
}

/// How every upstream connection leaves the host and whom it trusts: the instances' agents and the Entra ID token
/// clients are both built from these, so a reload that changes any of them must replace both (a kept client
/// would go on trusting the old `ca_bundle` or using the old `egress_proxy` until restart).
#[derive(PartialEq)]
struct Egress {
    /// The DER of each extra root certificate (`ca_bundle` plus the system's bundle); None: the built-in roots.
    roots: Option<Vec<Vec<u8>>>,
    proxy: EgressProxy,
    connect_timeout: Duration,
}

impl Egress {
    fn of(c: &Config) -> Egress {
        Egress {
            roots: c.upstream_roots.as_ref().map(|certs| certs.iter().map(|cert| cert.der().to_vec()).collect()),
            proxy: c.egress_proxy.clone(),
            connect_timeout: c.connect_timeout,
        }
    }
}

/// What the agents are built from; a reload that leaves all of it alone keeps them and their open connections.
#[derive(PartialEq)]
pub struct AgentSettings {
    egress: Egress,
    idle_per_instance: usize,
    instances: usize,
    max_head_bytes: usize,
    timeouts: [Duration; 3],
}

impl AgentSettings {
    pub fn of(c: &Config) -> AgentSettings {
        AgentSettings {
            egress: Egress::of(c),
            idle_per_instance: c.upstream_idle_per_instance,
            instances: c.instances.len(),
            max_head_bytes: c.max_head_bytes,
            timeouts: [c.upstream_response_timeout, c.upstream_read_timeout, c.upstream_idle_timeout],
        }
    }

    /// Whether the token clients (built from the `Egress` part alone) can be kept.
    pub fn same_egress(&self, other: &AgentSettings) -> bool {
        self.egress == other.egress
    }
}

/// The egress CONNECT proxy the configuration asks for, if any (shared with the Entra ID token clients).
pub fn egress_proxy(config: &Config) -> Option<ureq::Proxy> {
    match &config.egress_proxy {
        EgressProxy::Direct => None,
        EgressProxy::FromEnvironment => ureq::Proxy::try_from_env(),
        EgressProxy::Url(url) => ureq::Proxy::new(url.expose()).ok(),
    }
}
