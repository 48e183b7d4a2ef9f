//! The request to one instance: which headers go (hop-by-hop and key headers never do), where it goes (the
//! instance's endpoint, its deployment name, its pinned api-version), how it is sent (ureq, per-instance
//! timeouts), and how its failures and retry hints are read back.

use std::borrow::Cow;
use std::io::{self, Read};
use std::time::{Duration, SystemTime};

use ureq::http::header::{HeaderMap, HeaderName, HeaderValue};
use ureq::http::{self, Method};
use ureq::AsSendBody;

use crate::config::Instance;
use crate::exchange::Exchange;
use crate::http::parse::{Framing, Head};
use crate::http::HOP_BY_HOP;
use crate::state::State;

/// Request headers not forwarded besides those: framing (ureq sets it from the body), `Expect` (already
/// answered by us; forwarding it would make ureq wait for a 100), the ID we set ourselves, and every header that
/// can carry a client credential: whatever `client_header_name` is, an SDK may send its proxy key as
/// `Authorization: Bearer` as well, and `Proxy-Authorization` is for the hop it was sent to. When an instance's
/// key travels in `Authorization`, the proxy sets it itself for each attempt.
const REQUEST_DROP: &[&str] =
    &["content-length", "expect", "x-ms-client-request-id", "authorization", "proxy-authorization"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    Timeout,
    Connect,
    Dns,
    Tls,
    Io,
    /// The instance answered something that is not a usable HTTP response (an unsolicited protocol switch, a
    /// malformed head or body framing).
    Protocol,
    /// This process ran out of something (file descriptors, memory): not the instance's fault.
    Local,
    /// The request could not be put on the wire (a builder or header error): the request's fault or the
    /// proxy's, the same on every instance.
    Request,
    /// No Entra ID token could be had for the instance's identity (the token endpoint failed).
    Auth,
    Other,
}

impl FailureKind {
    /// The `outcome` label in metrics.
    pub fn label(self) -> &'static str {
        match self {
            FailureKind::Timeout => "timeout",
            FailureKind::Connect => "connect",
            FailureKind::Dns => "dns",
            FailureKind::Tls => "tls",
            FailureKind::Io => "io",
            FailureKind::Protocol => "protocol",
            FailureKind::Local => "local",
            FailureKind::Request => "request",
            FailureKind::Auth => "auth",
            FailureKind::Other => "other",
        }
    }

    /// Whether the failure says something about the instance. Only these count against its circuit and
    /// appear in its attempt metrics; the others are this process's or the request's own.
    pub fn is_instance_fault(self) -> bool {
        !matches!(self, FailureKind::Local | FailureKind::Request | FailureKind::Auth)
    }
}

/// The client's headers minus hop-by-hop ones, those named in `Connection`, the client key and any instance-key
/// header the client sent; plus our request ID. The instance key is added per attempt.
pub fn forward_headers(state: &State, ex: &Exchange) -> Result<HeaderMap, String> {
    let cfg = &state.config;
    let named_in_connection = ex.head.tokens("connection");
    let mut map = HeaderMap::with_capacity(ex.head.headers.len() + 2);
    for (name, value) in &ex.head.headers {
        let n = name.as_str();
        if HOP_BY_HOP.contains(&n)
            || REQUEST_DROP.contains(&n)
            || n == cfg.client_header_name
            || n == cfg.header_name
            || named_in_connection.iter().any(|c| c == n)
        {
            continue;
        }
        let name = HeaderName::from_bytes(n.as_bytes()).map_err(|_| n.to_string())?;
        let value = HeaderValue::from_bytes(value).map_err(|_| n.to_string())?;
        map.append(name, value);
    }
    let id = HeaderValue::from_str(ex.request_id).map_err(|_| "x-request-id".to_string())?;
    map.insert("x-ms-client-request-id", id);
    Ok(map)
}

/// One attempt's request, as it goes to one instance.
pub struct Outgoing<'a> {
    pub method: &'a Method,
    /// The client's headers as `forward_headers` made them.
    pub headers: &'a HeaderMap,
    /// Path and query, as `target_for` made them.
    pub target: &'a str,
    pub body: &'a [u8],
    pub framing: Framing,
    /// The instance's key header, or `Authorization` with a token (`State::credential`).
    pub credential: &'a (HeaderName, HeaderValue),
}

pub fn send(state: &State, idx: usize, out: Outgoing) -> Result<http::Response<ureq::Body>, ureq::Error> {
    let mut req = http::Request::builder()
        .method(out.method.clone())
        .uri(format!("{}{}", state.config.instances[idx].endpoint, out.target))
        .body(())
        .map_err(ureq::Error::from)?;
    *req.headers_mut() = out.headers.clone();
    let (name, value) = out.credential;
    req.headers_mut().insert(name.clone(), value.clone());
    let (parts, ()) = req.into_parts();
    let body = out.body;
    // A request that had no body framing goes out with none; otherwise the exact bytes, with a Content-Length.
    match out.framing {
        Framing::None => run(state, idx, http::Request::from_parts(parts, ())),
        Framing::Length(_) | Framing::Chunked => run(state, idx, http::Request::from_parts(parts, body)),
    }
}

fn run<B: AsSendBody>(
    state: &State,
    idx: usize,
    req: http::Request<B>,
) -> Result<http::Response<ureq::Body>, ureq::Error> {
    let inst = &state.config.instances[idx];
    let agent = state.agents.get(idx, head_len(&req));
    if !inst.has_timeout_overrides() {
        return agent.run(req);
    }
    // Per-instance timeouts: a request-level copy of the agent's configuration, made only for such instances.
    let cfg = &state.config;
    let req = agent
        .configure_request(req)
        .timeout_connect(Some(inst.connect_timeout.unwrap_or(cfg.connect_timeout)))
        .timeout_recv_response(Some(inst.upstream_response_timeout.unwrap_or(cfg.upstream_response_timeout)))
        .timeout_per_read(Some(inst.upstream_read_timeout.unwrap_or(cfg.upstream_read_timeout)))
        .build();
    agent.run(req)
}

/// About how long the request's head will be on the wire: request line and header lines.
fn head_len<B>(req: &http::Request<B>) -> usize {
    let line = req.method().as_str().len() + req.uri().path_and_query().map_or(1, |p| p.as_str().len()) + 12;
    line + req.headers().iter().map(|(n, v)| n.as_str().len() + v.len() + 4).sum::<usize>() + 2
}

/// The deployment a request names: the path segment after `/openai/deployments/`, or, on the routes that name it
/// in the body (`/openai/v1/…`, `/openai/responses`), the `model` field of its JSON body. Only that one field is
/// parsed out (the rest is skipped, not built), since every such request is read for it: per-key allowlists and
/// the token metrics' `deployment` label need it, as does routing.
pub fn requested_deployment(head: &Head, body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct ModelOnly<'a> {
        #[serde(borrow)]
        model: Option<Cow<'a, str>>,
    }
    let path = head.path();
    if let Some(rest) = path.strip_prefix("/openai/deployments/") {
        return rest.split('/').next().filter(|d| !d.is_empty()).map(str::to_string);
    }
    if !model_in_body(path) || body.trim_ascii_start().first() != Some(&b'{') {
        return None;
    }
    let parsed: ModelOnly = serde_json::from_slice(body).ok()?;
    parsed.model.filter(|m| !m.is_empty()).map(Cow::into_owned)
}

/// Whether requests on `path` name their deployment in the body's `model` field.
fn model_in_body(path: &str) -> bool {
    path.starts_with("/openai/v1/") || path == "/openai/responses" || path.starts_with("/openai/responses/")
}

/// Whether `inst` may serve a request for `deployment`: always, unless it is `deployments_only` and does not
/// list the name. A request that names no deployment (e.g. listing models) may go anywhere.
pub fn eligible(inst: &Instance, deployment: Option<&str>) -> bool {
    !inst.deployments_only || deployment.is_none_or(|d| inst.deployments.contains_key(d))
}

/// The target as this instance needs it: the deployment segment renamed, the `api-version` pinned.
pub fn target_for<'a>(inst: &Instance, target: &'a str, deployment: Option<&str>) -> Cow<'a, str> {
    let mut out = Cow::Borrowed(target);
    if let (Some(from), Some(rest)) = (deployment, target.strip_prefix("/openai/deployments/")) {
        if let (Some(to), Some(tail)) = (inst.deployments.get(from), rest.strip_prefix(from)) {
            out = Cow::Owned(format!("/openai/deployments/{to}{tail}"));
        }
    }
    if let Some(version) = &inst.api_version {
        out = Cow::Owned(pin_api_version(&out, version));
    }
    out
}

fn pin_api_version(target: &str, version: &str) -> String {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let mut params: Vec<String> =
        query.split('&').filter(|p| !p.is_empty() && !p.starts_with("api-version=")).map(str::to_string).collect();
    // The v1 routes take no api-version; the deployment routes require one.
    if query.split('&').any(|p| p.starts_with("api-version=")) || !path.starts_with("/openai/v1/") {
        params.push(format!("api-version={version}"));
    }
    if params.is_empty() {
        path.to_string()
    } else {
        format!("{path}?{}", params.join("&"))
    }
}

/// The body as this instance needs it: where the body names the deployment (`/openai/v1/`, `/openai/responses`),
/// the `model` renamed when the instance maps it.
pub fn body_for<'a>(inst: &Instance, head: &Head, body: &'a [u8], deployment: Option<&str>) -> Cow<'a, [u8]> {
    let mapped = deployment.and_then(|d| inst.deployments.get(d));
    match mapped {
        Some(to) if model_in_body(head.path()) => {
            let Ok(mut value) = serde_json::from_slice::<serde_json::Value>(body) else { return Cow::Borrowed(body) };
            value["model"] = serde_json::Value::String(to.clone());
            serde_json::to_vec(&value).map(Cow::Owned).unwrap_or(Cow::Borrowed(body))
        }
        _ => Cow::Borrowed(body),
    }
}

/// `retry-after-ms` / `x-ms-retry-after-ms` (milliseconds, Azure's), else `Retry-After` in seconds or as an
/// HTTP date.
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim);
    let num = |name: &str| text(name)?.parse::<f64>().ok().filter(|v| v.is_finite() && *v >= 0.0);
    if let Some(ms) = num("retry-after-ms").or_else(|| num("x-ms-retry-after-ms")) {
        return Some(Duration::from_secs_f64(ms.min(1e9) / 1000.0));
    }
    if let Some(secs) = num("retry-after") {
        return Some(Duration::from_secs_f64(secs.min(1e9)));
    }
    let at = parse_http_date(text("retry-after")?)?;
    Some(at.duration_since(SystemTime::now()).unwrap_or_default())
}

/// IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`), the only form RFC 9110 requires senders to use.
fn parse_http_date(s: &str) -> Option<SystemTime> {
    let parts: Vec<&str> = s.split_whitespace().collect();
    let [_, day, month, year, time, "GMT"] = parts[..] else { return None };
    let month = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]
        .iter()
        .position(|m| *m == month)? as i64
        + 1;
    let (day, year): (i64, i64) = (day.parse().ok()?, year.parse().ok()?);
    let hms: Vec<i64> = time.split(':').map(|t| t.parse().ok()).collect::<Option<_>>()?;
    let [h, m, sec] = hms[..] else { return None };
    if !(1..=31).contains(&day) || h > 23 || m > 59 || sec > 60 {
        return None;
    }
    // Days since 1970-01-01 for a proleptic Gregorian date (Howard Hinnant's days_from_civil).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (month + if month > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = u64::try_from(days * 86_400 + h * 3600 + m * 60 + sec).ok()?;
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
}

/// The first `max` bytes of an error body, for the log line; the rest is not read.
pub fn error_snippet(resp: http::Response<ureq::Body>, max: usize) -> String {
    let mut bytes = Vec::new();
    let _ = resp.into_body().into_reader().take(max as u64).read_to_end(&mut bytes);
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Sorts a ureq error into the kind that decides the fallback status, with a detail for humans.
pub fn classify(e: &ureq::Error) -> (FailureKind, String) {
    match e {
        ureq::Error::Timeout(t) => (FailureKind::Timeout, format!("timeout: {t}")),
        ureq::Error::HostNotFound => (FailureKind::Dns, "host not found".into()),
        ureq::Error::Rustls(t) => (FailureKind::Tls, format!("tls: {t}")),
        ureq::Error::Tls(t) => (FailureKind::Tls, format!("tls: {t}")),
        ureq::Error::Io(io) => {
            if let Some(tls) = io.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
                return (FailureKind::Tls, format!("tls: {tls}"));
            }
            let text = io.to_string();
            let local = [libc::EMFILE, libc::ENFILE, libc::ENOBUFS, libc::ENOMEM];
            let kind = match io.kind() {
                _ if io.raw_os_error().is_some_and(|c| local.contains(&c)) => FailureKind::Local,
                io::ErrorKind::ConnectionRefused => FailureKind::Connect,
                io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => FailureKind::Timeout,
                _ if text.contains("failed to lookup address") => FailureKind::Dns,
                _ => FailureKind::Io,
            };
            (kind, text)
        }
        ureq::Error::Protocol(p) => (protocol_kind(p), format!("protocol: {p}")),
        ureq::Error::Http(_)
        | ureq::Error::BadUri(_)
        | ureq::Error::InvalidProxyUrl
        | ureq::Error::RequireHttpsOnly(_)
        | ureq::Error::TlsRequired
        | ureq::Error::Pem(_)
        | ureq::Error::BodyExceedsLimit(_)
        | ureq::Error::StatusCode(_) => (FailureKind::Request, e.to_string()),
        ureq::Error::ConnectionFailed | ureq::Error::ConnectProxyFailed(_) => (FailureKind::Connect, e.to_string()),
        ureq::Error::LargeResponseHeader(..) => (FailureKind::Protocol, e.to_string()),
        other => (FailureKind::Other, other.to_string()),
    }
}

/// Errors about the request ureq was asked to send are `Request`; errors about what came back are the instance's.
fn protocol_kind(e: &ureq_proto::Error) -> FailureKind {
    use ureq_proto::Error as P;
    match e {
        P::BadHeader(_)
        | P::UnsupportedVersion
        | P::MethodVersionMismatch(..)
        | P::TooManyHostHeaders
        | P::BadHostHeader
        | P::BadAuthorizationHeader
        | P::ConflictingBodyHeaders
        | P::OutputOverflow
        | P::BodyContentAfterFinish
        | P::BodyLargerThanContentLength
        | P::BodyNotAllowed
        | P::BodyIsChunked => FailureKind::Request,
        _ => FailureKind::Protocol,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_dates() {
        let t = parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT").expect("valid");
        assert_eq!(t.duration_since(SystemTime::UNIX_EPOCH).expect("after").as_secs(), 784_111_777);
        let t = parse_http_date("Thu, 29 Feb 2024 00:00:00 GMT").expect("leap day");
        assert_eq!(t.duration_since(SystemTime::UNIX_EPOCH).expect("after").as_secs(), 1_709_164_800);
        for bad in ["", "Sun, 06 Nov 1994 08:49:37", "Sun, 32 Nov 1994 08:49:37 GMT", "Sun, 06 Foo 1994 08:49:37 GMT"] {
            assert!(parse_http_date(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn retry_after_forms() {
        let h = |pairs: &[(&'static str, &str)]| {
            let mut m = HeaderMap::new();
            for (k, v) in pairs {
                m.insert(*k, HeaderValue::from_str(v).expect("value"));
            }
            retry_after(&m)
        };
        assert_eq!(h(&[("retry-after-ms", "1500"), ("retry-after", "9")]), Some(Duration::from_millis(1500)));
        assert_eq!(h(&[("x-ms-retry-after-ms", "20")]), Some(Duration::from_millis(20)));
        assert_eq!(h(&[("retry-after", "3")]), Some(Duration::from_secs(3)));
        assert_eq!(h(&[("retry-after", "Sun, 06 Nov 1994 08:49:37 GMT")]), Some(Duration::ZERO));
        assert_eq!(h(&[("retry-after", "soon")]), None);
        assert_eq!(h(&[]), None);
    }

    #[test]
    fn api_version_pinning() {
        assert_eq!(
            pin_api_version("/openai/deployments/x/chat?api-version=2023-05-15&a=1", "2024-06-01"),
            "/openai/deployments/x/chat?a=1&api-version=2024-06-01"
        );
        assert_eq!(pin_api_version("/openai/deployments/x/chat", "v"), "/openai/deployments/x/chat?api-version=v");
        assert_eq!(pin_api_version("/openai/v1/responses", "v"), "/openai/v1/responses");
        assert_eq!(
            pin_api_version("/openai/v1/responses?api-version=preview", "v"),
            "/openai/v1/responses?api-version=v"
        );
    }
}
