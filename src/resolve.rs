//! Upstream host names, looked up once and kept. ureq resolves the host of every request before it looks in its
//! connection pool, so without this module every request cost a `getaddrinfo` (two DNS queries) even on a reused
//! connection, and while the DNS resolver was down every request failed although connections were open. Here the
//! addresses of each (host, port) are kept and refreshed in the background once they are older than
//! `dns_refresh_ms` (`getaddrinfo` gives no TTL), or sooner after a connect to them failed. A request waits for a
//! lookup only the first time its host is seen; when a refresh fails, the last known addresses stay in use.
//!
//! It deliberately does not: keep failures (a name that never resolved is looked up again by the next request),
//! read DNS TTLs, or reorder addresses (ureq tries them in the order `getaddrinfo` gave). IP literals bypass it.

use std::collections::HashMap;
use std::fmt::{self, Write as _};
use std::io;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError};
use ureq::http::Uri;
use ureq::unversioned::resolver::{DefaultResolver, ResolvedSocketAddrs, Resolver};
use ureq::unversioned::transport::{ConnectionDetails, Connector, NextTimeout, Transport};

/// Hosts kept at most. The hosts are the configured instances' (and the egress proxy's), so this is only a
/// bound against a configuration with thousands of endpoints; past it the least recently used host is dropped.
pub const MAX_HOSTS: usize = 256;
/// Threads that run background refreshes. Two, so that one refresh stuck on an unreachable name server (up to
/// resolv.conf's `timeout` × `attempts`) does not hold up the others' refreshes.
const REFRESH_THREADS: usize = 2;
/// A failed connect refreshes its host's addresses only if they are at least this old, so that an instance that
/// is down (refusing every connect) costs at most one lookup per second, not one per attempt.
const CONNECT_FAILURE_MIN_AGE: Duration = Duration::from_secs(1);
/// `getaddrinfo` with glibc's DNS code needs more than the 64 KiB some threads here get.
const REFRESH_STACK_BYTES: usize = 256 * 1024;
/// ureq keeps at most this many addresses per lookup (`resolver::MAX_ADDRS`, not exported).
const MAX_ADDRS: usize = 16;

/// The name lookup: `getaddrinfo` in the proxy; scripted in the unit tests below.
type Lookup = dyn Fn(&str, u16) -> io::Result<Vec<SocketAddr>> + Send + Sync;

/// The cache of upstream addresses, shared by both agents (cheap to clone) and kept across reloads. It is ureq's
/// `Resolver`; `RefreshOnFailure` is the connector that tells it about failed connects.
#[derive(Clone)]
pub struct DnsCache {
    shared: Arc<Shared>,
    /// Hosts due for a background refresh. Bounded by `MAX_HOSTS`: a host is queued at most once at a time.
    jobs: Sender<Key>,
}

type Key = (String, u16);

struct Shared {
    /// Invariants: at most `MAX_HOSTS` entries; every entry has at least one address; an entry is in `jobs` (or
    /// being refreshed) exactly when its `refreshing` is set. Held only for map operations, never across a lookup.
    table: Mutex<HashMap<Key, Entry>>,
    refresh_ms: AtomicU64,
    lookup: Box<Lookup>,
    /// For the refresh threads, which start with the first refresh (a proxy of IP-literal endpoints has none).
    jobs: Receiver<Key>,
    threads: Mutex<usize>,
    metrics: DnsMetrics,
}

struct Entry {
    addrs: Arc<[SocketAddr]>,
    /// When the last lookup for this host finished, whether it found addresses or not.
    looked_up: Instant,
    /// A refresh is queued or running.
    refreshing: bool,
    /// The last refresh failed: `addrs` are from an earlier lookup.
    stale: bool,
    last_used: Instant,
}

/// Counters for `/metrics`, since start (they survive reloads with the cache).
#[derive(Default)]
pub struct DnsMetrics {
    lookups_ok: AtomicU64,
    lookups_failed: AtomicU64,
    stale_answers: AtomicU64,
}

impl DnsCache {
    /// A cache that looks names up with the system resolver (`getaddrinfo`: /etc/hosts, then DNS, as
    /// nsswitch.conf says) and refreshes them after `refresh`.
    pub fn new(refresh: Duration) -> DnsCache {
        DnsCache::with_lookup(refresh, Box::new(|host, port| (host, port).to_socket_addrs().map(Vec::from_iter)))
    }

    fn with_lookup(refresh: Duration, lookup: Box<Lookup>) -> DnsCache {
        let (tx, rx) = crossbeam_channel::bounded(MAX_HOSTS);
        let shared = Shared {
            table: Mutex::new(HashMap::new()),
            refresh_ms: AtomicU64::new(millis(refresh)),
            lookup,
            jobs: rx,
            threads: Mutex::new(0),
            metrics: DnsMetrics::default(),
        };
        DnsCache { shared: Arc::new(shared), jobs: tx }
    }

    /// A reload may change `dns_refresh_ms`; the addresses already known are kept.
    pub fn set_refresh(&self, refresh: Duration) {
        self.shared.refresh_ms.store(millis(refresh), Ordering::Relaxed);
    }

    pub fn metrics(&self) -> &DnsMetrics {
        &self.shared.metrics
    }

    /// Whether `self` and `other` are clones of one cache.
    #[cfg(test)]
    pub fn same_cache(&self, other: &DnsCache) -> bool {
        Arc::ptr_eq(&self.shared, &other.shared)
    }

    /// The addresses of `host`, in the resolver's order: at once from the cache if known (queueing a refresh
    /// if they are due one), else from a lookup made now.
    pub fn addresses(&self, host: &str, port: u16) -> io::Result<Arc<[SocketAddr]>> {
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Ok(Arc::from([SocketAddr::new(ip, port)]));
        }
        let key = (host.to_ascii_lowercase(), port);
        if let Some(addrs) = self.cached(&key) {
            return Ok(addrs);
        }
        // First sight of this host: there is nothing to answer with, so this request waits for the lookup.
        let addrs = self.shared.lookup(host, port)?;
        self.insert(key, Arc::clone(&addrs));
        Ok(addrs)
    }

    /// A connect to `host`'s addresses failed: they may have moved, so refresh them (in the background).
    pub fn connect_failed(&self, host: &str, port: u16) {
        let key = (host.to_ascii_lowercase(), port);
        let due = match self.shared.table().get_mut(&key) {
            Some(e) if !e.refreshing && e.looked_up.elapsed() >= CONNECT_FAILURE_MIN_AGE => {
                e.refreshing = true;
                true
            }
            _ => false,
        };
        if due {
            log::info!("dns: a connect to {host}:{port} failed; refreshing its addresses");
            self.queue(key);
        }
    }

    fn cached(&self, key: &Key) -> Option<Arc<[SocketAddr]>> {
        let now = Instant::now();
        let refresh = Duration::from_millis(self.shared.refresh_ms.load(Ordering::Relaxed));
        let mut table = self.shared.table();
        let e = table.get_mut(key)?;
        e.last_used = now;
        if e.stale {
            self.shared.metrics.stale_answers.fetch_add(1, Ordering::Relaxed);
        }
        let due = !e.refreshing && now.saturating_duration_since(e.looked_up) >= refresh;
        e.refreshing |= due;
        let addrs = Arc::clone(&e.addrs);
        drop(table);
        if due {
            self.queue(key.clone());
        }
        Some(addrs)
    }

    fn insert(&self, key: Key, addrs: Arc<[SocketAddr]>) {
        let now = Instant::now();
        let mut table = self.shared.table();
        if table.len() >= MAX_HOSTS && !table.contains_key(&key) {
            // Not one being refreshed: its refresh would find no entry and be lost, harmlessly, but keep it simple.
            let oldest = table.iter().filter(|(_, e)| !e.refreshing).min_by_key(|(_, e)| e.last_used);
            if let Some(old) = oldest.map(|(k, _)| k.clone()) {
                log::warn!("dns: more than {MAX_HOSTS} upstream hosts; forgetting {}:{}", old.0, old.1);
                table.remove(&old);
            }
        }
        let entry = Entry { addrs, looked_up: now, refreshing: false, stale: false, last_used: now };
        table.insert(key, entry);
    }

    /// Hands `key` (whose `refreshing` is set) to the refresh threads, starting them if needed.
    fn queue(&self, key: Key) {
        let started = self.start_threads();
        let sent = match started {
            true => self.jobs.try_send(key.clone()),
            false => Err(TrySendError::Disconnected(key.clone())),
        };
        if sent.is_err() {
            // Cannot happen while the invariant holds (queue as large as the table, threads running); if it does,
            // the entry is left as it was, to be tried again by a later request.
            if let Some(e) = self.shared.table().get_mut(&key) {
                e.refreshing = false;
            }
        }
    }

    /// Whether at least one refresh thread runs. They hold the shared state and the job queue, not a sender:
    /// when the last `DnsCache` clone goes, the queue disconnects and they end.
    fn start_threads(&self) -> bool {
        let mut running = self.shared.threads.lock().unwrap_or_else(|p| p.into_inner());
        while *running < REFRESH_THREADS {
            let shared = Arc::clone(&self.shared);
            let spawned = std::thread::Builder::new()
                .name("dns-refresh".into())
                .stack_size(REFRESH_STACK_BYTES)
                .spawn(move || shared.jobs.iter().for_each(|key| shared.refresh(&key)));
            match spawned {
                Ok(_) => *running += 1,
                Err(e) => {
                    log::error!("dns: cannot start a refresh thread: {e}");
                    break;
                }
            }
        }
        *running > 0
    }
}

impl Shared {
    fn table(&self) -> MutexGuard<'_, HashMap<Key, Entry>> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// One lookup, counted; "no address" is an error like any other failed lookup.
    fn lookup(&self, host: &str, port: u16) -> io::Result<Arc<[SocketAddr]>> {
        let found = (self.lookup)(host, port).and_then(|addrs| match addrs.is_empty() {
            true => Err(io::Error::new(io::ErrorKind::NotFound, "failed to lookup address information: no address")),
            false => Ok(Arc::from(addrs)),
        });
        let counter = if found.is_ok() { &self.metrics.lookups_ok } else { &self.metrics.lookups_failed };
        counter.fetch_add(1, Ordering::Relaxed);
        found
    }

    /// The background refresh of one host: new addresses replace the old; on failure the old stay, marked stale,
    /// and the next refresh is due after the usual interval.
    fn refresh(&self, key: &Key) {
        let found = self.lookup(&key.0, key.1);
        let mut table = self.table();
        let Some(e) = table.get_mut(key) else { return };
        e.refreshing = false;
        e.looked_up = Instant::now();
        match found {
            Ok(addrs) => {
                let moved = (addrs != e.addrs).then(|| (Addrs(&e.addrs).to_string(), Addrs(&addrs).to_string()));
                e.addrs = addrs;
                e.stale = false;
                drop(table);
                if let Some((old, new)) = moved {
                    log::info!("dns: {}:{} now resolves to {new} (was {old})", key.0, key.1);
                }
            }
            Err(err) => {
                e.stale = true;
                let kept = Addrs(&e.addrs).to_string();
                drop(table);
                log::warn!("dns: refreshing {}:{} failed ({err}); still using {kept}", key.0, key.1);
            }
        }
    }
}

impl DnsMetrics {
    /// Appends the DNS counters in Prometheus text format.
    pub fn render(&self, out: &mut String) {
        let (ok, failed) = (self.lookups_ok.load(Ordering::Relaxed), self.lookups_failed.load(Ordering::Relaxed));
        let name = "azure_proxy_dns_lookups_total";
        let _ = writeln!(out, "# HELP {name} Upstream host name lookups (first sight and refreshes), by outcome.");
        let _ = writeln!(
            out,
            "# TYPE {name} counter\n{name}{{outcome=\"ok\"}} {ok}\n{name}{{outcome=\"failed\"}} {failed}"
        );
        let name = "azure_proxy_dns_stale_answers_total";
        let _ = writeln!(out, "# HELP {name} Upstream addresses used although their last refresh failed.");
        let _ = writeln!(out, "# TYPE {name} counter\n{name} {}", self.stale_answers.load(Ordering::Relaxed));
    }
}

impl Resolver for DnsCache {
    /// The timeout is not used: a first lookup is bounded by resolv.conf (`timeout` × `attempts`), and later ones
    /// are not waited for.
    fn resolve(
        &self,
        uri: &Uri,
        config: &ureq::config::Config,
        timeout: NextTimeout,
    ) -> Result<ResolvedSocketAddrs, ureq::Error> {
        let Some((host, port)) = host_and_port(uri) else {
            // Not an http(s) URI with a host: whatever it is, ureq's own resolver knows what to say.
            return DefaultResolver::default().resolve(uri, config, timeout);
        };
        let addrs = self.addresses(host, port)?;
        let mut out = self.empty();
        for addr in config.ip_family().keep_wanted(addrs.iter().copied()).take(MAX_ADDRS) {
            out.push(addr);
        }
        match out.is_empty() {
            true => Err(ureq::Error::HostNotFound),
            false => Ok(out),
        }
    }
}

/// The host (IPv6 literals without brackets) and port of an http or https URI.
fn host_and_port(uri: &Uri) -> Option<(&str, u16)> {
    let authority = uri.authority()?;
    let port = match (authority.port_u16(), uri.scheme_str()?) {
        (Some(port), _) => port,
        (None, "https") => 443,
        (None, "http") => 80,
        (None, _) => return None,
    };
    let host = authority.host();
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    (!host.is_empty()).then_some((host, port))
}

impl fmt::Debug for DnsCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DnsCache").field("hosts", &self.shared.table().len()).finish()
    }
}

/// An upstream connector (`transport::Upstream`: TCP, rustls, CONNECT proxy), plus one thing: a failed connect
/// makes the cache refresh that host's addresses. ureq gives the resolver no word about connects, so this is
/// where the failure is seen.
#[derive(Debug)]
pub struct RefreshOnFailure<C> {
    inner: C,
    dns: DnsCache,
}

impl<C> RefreshOnFailure<C> {
    pub fn new(inner: C, dns: DnsCache) -> RefreshOnFailure<C> {
        RefreshOnFailure { inner, dns }
    }
}

impl<C: Connector<(), Out = Box<dyn Transport>>> Connector<()> for RefreshOnFailure<C> {
    type Out = Box<dyn Transport>;

    fn connect(&self, details: &ConnectionDetails, chained: Option<()>) -> Result<Option<Self::Out>, ureq::Error> {
        let result = self.inner.connect(details, chained);
        // Only a failure to reach the addresses says they may be wrong; with a CONNECT proxy the target is not
        // resolved here (`addrs` is empty) and the proxy's own connect comes through this connector too.
        if matches!(result, Err(ureq::Error::Io(_) | ureq::Error::Timeout(_))) && !details.addrs.is_empty() {
            if let Some((host, port)) = host_and_port(details.uri) {
                self.dns.connect_failed(host, port);
            }
        }
        result
    }
}

/// Addresses as a log shows them: `127.0.0.1:443, [::1]:443`.
struct Addrs<'a>(&'a [SocketAddr]);

impl fmt::Display for Addrs<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, a) in self.0.iter().enumerate() {
            write!(f, "{}{a}", if i == 0 { "" } else { ", " })?;
        }
        Ok(())
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
#[path = "resolve_tests.rs"]
mod tests;
