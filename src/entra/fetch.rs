//! One token request, as each flow makes it (the same requests as azure-identity), and the parsing of the
//! answer. Nothing here is cached or retried: that is `cell.rs`'s business.
//!
//! Errors are for the log: they carry the endpoint's own error code and description, never the token, the
//! client secret, the federated assertion or the identity header.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ureq::Agent;

use crate::config::{EntraAuth, EntraFlow, ManagedIdentityEndpoint};

/// A token and how long it is valid from now.
pub struct Fetched {
    pub token: String,
    pub lifetime: Duration,
}

/// Asks the identity endpoint for a token. `direct` never goes through an egress proxy (the metadata service and
/// App Service's identity endpoint are local to the host); `proxied` takes the instance's egress settings.
pub fn fetch(auth: &EntraAuth, direct: &Agent, proxied: &Agent) -> Result<Fetched, String> {
    let scope = auth.scope.as_str();
    let response = match &auth.flow {
        EntraFlow::ClientSecret { authority, tenant_id, client_id, secret } => {
            let form = form(&[
                ("grant_type", "client_credentials"),
                ("client_id", client_id),
                ("scope", scope),
                ("client_secret", secret.expose()),
            ]);
            post_form(proxied, &token_url(authority, tenant_id), form)
        }
        EntraFlow::WorkloadIdentity { authority, tenant_id, client_id, token_file } => {
            // Re-read every time: Kubernetes rotates the projected token (about hourly).
            let assertion = std::fs::read_to_string(token_file)
                .map_err(|e| format!("cannot read the federated token file {}: {e}", token_file.display()))?;
            let assertion = assertion.trim();
            if assertion.is_empty() {
                return Err(format!("the federated token file {} is empty", token_file.display()));
            }
            let form = form(&[
                ("grant_type", "client_credentials"),
                ("client_id", client_id),
                ("scope", scope),
                ("client_assertion_type", "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"),
                ("client_assertion", assertion),
            ]);
            post_form(proxied, &token_url(authority, tenant_id), form)
        }
        EntraFlow::ManagedIdentity { client_id, endpoint } => {
            let mut params = vec![("resource", auth.resource())];
            if let Some(id) = client_id {
                params.push(("client_id", id));
            }
            match endpoint {
                ManagedIdentityEndpoint::AppService { url, header } => {
                    params.insert(0, ("api-version", "2019-08-01"));
                    let sep = if url.contains('?') { '&' } else { '?' };
                    let url = format!("{url}{sep}{}", form(&params));
                    let req = direct.get(&url).header("X-IDENTITY-HEADER", header.expose());
                    req.call().map_err(|e| format!("identity endpoint {}: {e}", without_query(&url)))
                }
                ManagedIdentityEndpoint::Imds { base } => {
                    params.insert(0, ("api-version", "2018-02-01"));
                    let url = format!("{base}/metadata/identity/oauth2/token?{}", form(&params));
                    let req = direct.get(&url).header("Metadata", "true");
                    req.call().map_err(|e| format!("metadata service {}: {e}", without_query(&url)))
                }
            }
        }
    }?;
    parse_answer(response)
}

fn token_url(authority: &str, tenant: &str) -> String {
    format!("{authority}/{tenant}/oauth2/v2.0/token")
}

fn post_form(agent: &Agent, url: &str, form: String) -> Result<http::Response<ureq::Body>, String> {
    agent
        .post(url)
        .header("Content-Type", "application/x-www-form-urlencoded")
        .send(form)
        .map_err(|e| format!("token endpoint {url}: {e}"))
}

use ureq::http;

/// The token and its lifetime from a 200 answer; the endpoint's error otherwise.
fn parse_answer(response: http::Response<ureq::Body>) -> Result<Fetched, String> {
    let status = response.status().as_u16();
    let text = response
        .into_body()
        .with_config()
        .limit(64 * 1024)
        .read_to_string()
        .map_err(|e| format!("status {status}, body unreadable: {e}"))?;
    let json: Option<serde_json::Value> = serde_json::from_str(&text).ok();
    if status != 200 {
        return Err(describe_error(status, json.as_ref()));
    }
    let json = json.ok_or_else(|| format!("status 200 but the body is not JSON ({} bytes)", text.len()))?;
    let token = json.get("access_token").and_then(|t| t.as_str()).filter(|t| !t.is_empty());
    let token = token.ok_or("status 200 but no access_token in the answer")?;
    if !token.bytes().all(|b| (0x21..0x7f).contains(&b)) {
        return Err("the access_token holds characters not allowed in a header".to_string());
    }
    let lifetime = lifetime(&json).ok_or("status 200 but neither expires_in nor expires_on in the answer")?;
    Ok(Fetched { token: token.to_string(), lifetime })
}

/// `expires_in` (seconds from now) or `expires_on` (Unix seconds); numbers or strings, as both appear.
fn lifetime(json: &serde_json::Value) -> Option<Duration> {
    let number = |key: &str| -> Option<u64> {
        match json.get(key)? {
            serde_json::Value::Number(n) => n.as_u64(),
            serde_json::Value::String(s) => s.trim().parse().ok(),
            _ => None,
        }
    };
    if let Some(secs) = number("expires_in") {
        return Some(Duration::from_secs(secs));
    }
    let on = number("expires_on")?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH).ok()?.as_secs();
    Some(Duration::from_secs(on.saturating_sub(now)))
}

/// The endpoint's error in words: Entra's `error` and the first line of `error_description` (it starts with the
/// AADSTS code that tells what is wrong), or the metadata service's `error`/`message`. Cut short; printable only.
fn describe_error(status: u16, json: Option<&serde_json::Value>) -> String {
    let field = |k: &str| json.and_then(|j| j.get(k)).and_then(|v| v.as_str()).unwrap_or_default();
    let code = field("error");
    let description = [field("error_description"), field("message")].into_iter().find(|d| !d.is_empty());
    let description = description.unwrap_or_default().lines().next().unwrap_or_default();
    let mut text = format!("status {status}");
    if !code.is_empty() {
        text.push_str(&format!(", error {code}"));
    }
    if !description.is_empty() {
        let short: String =
            description.chars().take(300).map(|c| if c.is_ascii_graphic() || c == ' ' { c } else { '?' }).collect();
        text.push_str(&format!(": {short}"));
    }
    text
}

/// `application/x-www-form-urlencoded` (also a query string): unreserved bytes as they are, the rest `%XX`.
fn form(pairs: &[(&str, &str)]) -> String {
    let enc = |s: &str| {
        s.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
                _ => format!("%{b:02X}"),
            })
            .collect::<String>()
    };
    pairs.iter().map(|(k, v)| format!("{}={}", enc(k), enc(v))).collect::<Vec<_>>().join("&")
}

/// A URL for the log: its query may carry a client ID, never a secret, but keep logs short.
fn without_query(url: &str) -> &str {
    url.split('?').next().unwrap_or(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifetimes_in_every_shape() {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
        let j = |v: serde_json::Value| lifetime(&v);
        assert_eq!(j(serde_json::json!({"expires_in": 3599})), Some(Duration::from_secs(3599)));
        assert_eq!(j(serde_json::json!({"expires_in": "86399"})), Some(Duration::from_secs(86399)));
        let on = j(serde_json::json!({"expires_on": (now + 600).to_string()})).unwrap();
        assert!((598..=600).contains(&on.as_secs()), "{on:?}");
        let on = j(serde_json::json!({"expires_on": now + 600})).unwrap();
        assert!((598..=600).contains(&on.as_secs()), "{on:?}");
        assert_eq!(j(serde_json::json!({"expires_on": "11/28/2026 12:00:00 PM +00:00"})), None);
        assert_eq!(j(serde_json::json!({})), None);
    }

    #[test]
    fn forms_are_encoded() {
        assert_eq!(
            form(&[("scope", "https://x/.default"), ("a b", "c&d=e")]),
            "scope=https%3A%2F%2Fx%2F.default&a%20b=c%26d%3De"
        );
    }

    #[test]
    fn errors_keep_the_code_and_first_line() {
        let j = serde_json::json!({"error": "invalid_client", "error_description": "AADSTS7000215: Invalid client secret provided.\r\nTrace ID: 1"});
        assert_eq!(
            describe_error(401, Some(&j)),
            "status 401, error invalid_client: AADSTS7000215: Invalid client secret provided."
        );
        assert_eq!(describe_error(500, None), "status 500");
    }
}
