//! An instance's `auth` object: Microsoft Entra ID tokens instead of a key, for resources with key
//! authentication disabled. The settings follow Azure's own SDKs (azure-identity), so that a pod or VM set up
//! for them works unchanged: the same environment variables, read once when the configuration is loaded
//! (the federated token file is re-read at every token request, since Kubernetes rotates it).
//!
//! This module only validates; `crate::entra` gets and caches the tokens.

use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;

use super::json::Object;
use super::{ConfigError, Env, Secret};

pub(super) const FIELDS: &[&str] =
    &["type", "client_id", "tenant_id", "client_secret_env", "scope", "authority_host", "federated_token_file"];
pub(super) const EXAMPLE: &str = r#"{"type": "managed_identity"}"#;

pub const DEFAULT_SCOPE: &str = "https://cognitiveservices.azure.com/.default";
pub const DEFAULT_AUTHORITY: &str = "https://login.microsoftonline.com";
pub const DEFAULT_IMDS: &str = "http://169.254.169.254";

/// How an instance gets its Entra ID token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EntraAuth {
    pub flow: EntraFlow,
    /// The token's scope (`…/.default`); the managed-identity `resource` is the scope without `/.default`.
    pub scope: String,
    /// Where each setting came from (environment variables included), for `--check-config`.
    pub sources: Vec<String>,
}

impl EntraAuth {
    /// Whether two instances can share tokens: the same identity asking for the same scope.
    pub fn same_identity(&self, other: &EntraAuth) -> bool {
        self.flow == other.flow && self.scope == other.scope
    }

    /// The managed-identity `resource`: the scope without `/.default`.
    pub fn resource(&self) -> &str {
        self.scope.strip_suffix("/.default").unwrap_or(&self.scope)
    }

    /// A short name for logs and metrics labels: the flow and the client ID, never a secret.
    /// IDs are checked to be `[A-Za-z0-9._-]`, so the label needs no escaping.
    pub fn label(&self) -> String {
        match &self.flow {
            EntraFlow::ManagedIdentity { client_id: None, .. } => "managed_identity".to_string(),
            EntraFlow::ManagedIdentity { client_id: Some(id), .. } => format!("managed_identity:{id}"),
            EntraFlow::WorkloadIdentity { client_id, .. } => format!("workload_identity:{client_id}"),
            EntraFlow::ClientSecret { client_id, .. } => format!("client_secret:{client_id}"),
        }
    }
}

#[derive(Clone, PartialEq, Eq)]
pub enum EntraFlow {
    ManagedIdentity { client_id: Option<String>, endpoint: ManagedIdentityEndpoint },
    WorkloadIdentity { authority: String, tenant_id: String, client_id: String, token_file: PathBuf },
    ClientSecret { authority: String, tenant_id: String, client_id: String, secret: Secret },
}

impl fmt::Debug for EntraFlow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EntraFlow::ManagedIdentity { client_id, endpoint } => {
                write!(f, "ManagedIdentity {{ client_id: {client_id:?}, endpoint: {endpoint:?} }}")
            }
            EntraFlow::WorkloadIdentity { authority, tenant_id, client_id, token_file } => write!(
                f,
                "WorkloadIdentity {{ authority: {authority:?}, tenant_id: {tenant_id:?}, client_id: {client_id:?}, \
                 token_file: {token_file:?} }}"
            ),
            EntraFlow::ClientSecret { authority, tenant_id, client_id, .. } => write!(
                f,
                "ClientSecret {{ authority: {authority:?}, tenant_id: {tenant_id:?}, client_id: {client_id:?}, \
                 secret: *** }}"
            ),
        }
    }
}

/// Where a managed identity's tokens come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ManagedIdentityEndpoint {
    /// App Service, Container Apps, Functions: `IDENTITY_ENDPOINT` with the `IDENTITY_HEADER` secret.
    AppService { url: String, header: Secret },
    /// A VM, VM scale set or AKS node: the instance metadata service (`AZURE_POD_IDENTITY_AUTHORITY_HOST`, else
    /// 169.254.169.254).
    Imds { base: String },
}

/// The `auth` object as written.
pub(super) struct FileAuth {
    kind: Option<String>,
    client_id: Option<String>,
    tenant_id: Option<String>,
    client_secret_env: Option<String>,
    scope: Option<String>,
    authority_host: Option<String>,
    federated_token_file: Option<String>,
}

impl FileAuth {
    pub(super) fn read(mut o: Object<'_>) -> Result<FileAuth, ConfigError> {
        Ok(FileAuth {
            kind: o.string("type")?,
            client_id: o.string("client_id")?,
            tenant_id: o.string("tenant_id")?,
            client_secret_env: o.string("client_secret_env")?,
            scope: o.string("scope")?,
            authority_host: o.string("authority_host")?,
            federated_token_file: o.string("federated_token_file")?,
        })
    }
}

/// Validates `auth` of instance `i`. `error(field, problem, fix)` names the file; `field` is relative to the
/// `auth` object. No error shows a secret.
pub(super) fn check(
    auth: &FileAuth,
    env: &dyn Env,
    error: &dyn Fn(&str, &str, &str) -> ConfigError,
) -> Result<EntraAuth, ConfigError> {
    let mut sources = Vec::new();
    let scope = auth.scope.clone().unwrap_or_else(|| DEFAULT_SCOPE.to_string());
    if scope.is_empty() || scope.contains(char::is_whitespace) || !scope.is_ascii() {
        return Err(error("scope", "is not a scope", &format!("use e.g. \"{DEFAULT_SCOPE}\", or remove it")));
    }
    let flow = match auth.kind.as_deref().unwrap_or_default() {
        "managed_identity" => managed_identity(auth, env, &mut sources, error)?,
        kind @ ("workload_identity" | "client_secret") => tenant_flow(kind, auth, env, &mut sources, error)?,
        "" => {
            return Err(error(
                "type",
                "is missing",
                "give \"type\": one of \"managed_identity\", \"workload_identity\", \"client_secret\"",
            ))
        }
        other => {
            return Err(error(
                "type",
                &format!("{other:?} is not an auth type"),
                "use one of \"managed_identity\", \"workload_identity\", \"client_secret\"",
            ))
        }
    };
    Ok(EntraAuth { flow, scope, sources })
}

/// `managed_identity`: App Service's identity endpoint when `IDENTITY_ENDPOINT` and `IDENTITY_HEADER` are set,
/// else the metadata service.
fn managed_identity(
    auth: &FileAuth,
    env: &dyn Env,
    sources: &mut Vec<String>,
    error: &dyn Fn(&str, &str, &str) -> ConfigError,
) -> Result<EntraFlow, ConfigError> {
    for field in ["tenant_id", "client_secret_env", "authority_host", "federated_token_file"] {
        if field_given(auth, field) {
            return Err(error(field, "is not used by managed_identity", "remove it"));
        }
    }
    let is_url = |u: &str| u.starts_with("http://") || u.starts_with("https://");
    let endpoint = match (env.var("IDENTITY_ENDPOINT"), env.var("IDENTITY_HEADER")) {
        (Some(url), Some(header)) if !url.trim().is_empty() => {
            sources.push("endpoint from IDENTITY_ENDPOINT, secret header from IDENTITY_HEADER".to_string());
            let url = url.trim().to_string();
            if !is_url(&url) {
                return Err(error(
                    "type",
                    "environment variable IDENTITY_ENDPOINT is not an http(s) URL",
                    "unset it, or set it to the identity endpoint's URL",
                ));
            }
            ManagedIdentityEndpoint::AppService { url, header: Secret::new(header) }
        }
        _ => {
            let base = match env.var("AZURE_POD_IDENTITY_AUTHORITY_HOST").filter(|v| !v.trim().is_empty()) {
                Some(v) => {
                    sources.push("metadata service from AZURE_POD_IDENTITY_AUTHORITY_HOST".to_string());
                    v.trim().trim_end_matches('/').to_string()
                }
                None => DEFAULT_IMDS.to_string(),
            };
            if !is_url(&base) {
                return Err(error(
                    "type",
                    "environment variable AZURE_POD_IDENTITY_AUTHORITY_HOST is not an http(s) URL",
                    "set it to e.g. http://169.254.169.254, or unset it",
                ));
            }
            ManagedIdentityEndpoint::Imds { base }
        }
    };
    let client_id = auth.client_id.clone().filter(|c| !c.is_empty());
    if client_id.as_deref().is_some_and(|c| !is_id(c)) {
        return Err(error("client_id", "is not an ID", "use the identity's client ID (a GUID)"));
    }
    Ok(EntraFlow::ManagedIdentity { client_id, endpoint })
}

/// `workload_identity` and `client_secret`: a token from the tenant's authority.
fn tenant_flow(
    kind: &str,
    auth: &FileAuth,
    env: &dyn Env,
    sources: &mut Vec<String>,
    error: &dyn Fn(&str, &str, &str) -> ConfigError,
) -> Result<EntraFlow, ConfigError> {
    let authority = authority(auth, env, sources).map_err(|(problem, fix)| error("authority_host", &problem, &fix))?;
    let mut from_env = |file: &Option<String>, field: &str, var: &str| {
        setting(file, field, var, env, sources).map_err(|(problem, fix)| error(field, &problem, &fix))
    };
    let tenant_id = from_env(&auth.tenant_id, "tenant_id", "AZURE_TENANT_ID")?;
    let client_id = from_env(&auth.client_id, "client_id", "AZURE_CLIENT_ID")?;
    for (v, field) in [(&tenant_id, "tenant_id"), (&client_id, "client_id")] {
        if !is_id(v) {
            return Err(error(field, "is not an ID", "use the GUID (or tenant domain) the Azure portal shows"));
        }
    }
    if kind == "workload_identity" {
        if auth.client_secret_env.is_some() {
            return Err(error("client_secret_env", "is not used by workload_identity", "remove it"));
        }
        let file = from_env(&auth.federated_token_file, "federated_token_file", "AZURE_FEDERATED_TOKEN_FILE")?;
        return Ok(EntraFlow::WorkloadIdentity { authority, tenant_id, client_id, token_file: PathBuf::from(file) });
    }
    if auth.federated_token_file.is_some() {
        return Err(error("federated_token_file", "is not used by client_secret", "remove it"));
    }
    let var = auth.client_secret_env.clone().unwrap_or_else(|| "AZURE_CLIENT_SECRET".to_string());
    let secret = env.var(&var).filter(|v| !v.is_empty()).ok_or_else(|| {
        error(
            "client_secret_env",
            &format!("environment variable {var} is not set"),
            &format!("export {var} with the service principal's client secret"),
        )
    })?;
    sources.push(format!("client secret from {var}"));
    Ok(EntraFlow::ClientSecret { authority, tenant_id, client_id, secret: Secret::new(secret) })
}

/// A setting from the file, else from the environment variable azure-identity reads (noted in `sources`).
fn setting(
    file: &Option<String>,
    field: &str,
    var: &str,
    env: &dyn Env,
    sources: &mut Vec<String>,
) -> Result<String, (String, String)> {
    if let Some(v) = file.as_ref().filter(|v| !v.trim().is_empty()) {
        return Ok(v.trim().to_string());
    }
    match env.var(var).filter(|v| !v.trim().is_empty()) {
        Some(v) => {
            sources.push(format!("{field} from {var}"));
            Ok(v.trim().to_string())
        }
        None => Err((
            format!("is missing, and environment variable {var} is not set"),
            format!("give {field} in the auth object, or set {var}"),
        )),
    }
}

/// A tenant or client ID (a GUID, or a tenant's domain): safe in a URL path, a form and a metrics label.
fn is_id(v: &str) -> bool {
    !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

fn field_given(auth: &FileAuth, field: &str) -> bool {
    match field {
        "tenant_id" => auth.tenant_id.is_some(),
        "client_secret_env" => auth.client_secret_env.is_some(),
        "authority_host" => auth.authority_host.is_some(),
        "federated_token_file" => auth.federated_token_file.is_some(),
        _ => false,
    }
}

/// The authority host: the file's, else `AZURE_AUTHORITY_HOST` (the AKS webhook sets it with a trailing `/`),
/// else the public cloud's. `https://` only, except on loopback addresses (tests, local token servers).
fn authority(auth: &FileAuth, env: &dyn Env, sources: &mut Vec<String>) -> Result<String, (String, String)> {
    let raw = match auth.authority_host.as_deref().filter(|v| !v.trim().is_empty()) {
        Some(v) => v.trim().to_string(),
        None => match env.var("AZURE_AUTHORITY_HOST").filter(|v| !v.trim().is_empty()) {
            Some(v) => {
                sources.push("authority from AZURE_AUTHORITY_HOST".to_string());
                v.trim().to_string()
            }
            None => DEFAULT_AUTHORITY.to_string(),
        },
    };
    let base = raw.trim_end_matches('/').to_string();
    let fix = format!("use an https:// URL such as {DEFAULT_AUTHORITY} (plain http:// only on a loopback address)");
    if base.starts_with("https://") && base.len() > "https://".len() {
        return Ok(base);
    }
    match base.strip_prefix("http://") {
        Some(rest) if is_loopback_host(rest) => Ok(base),
        _ => Err((format!("{base:?} is not an https:// URL"), fix)),
    }
}

/// Whether `authority` (`host[:port][/path]`) names a loopback address.
fn is_loopback_host(authority: &str) -> bool {
    let hostport = authority.split('/').next().unwrap_or_default();
    let host = match hostport.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None => hostport.rsplit_once(':').map_or(hostport, |(h, _)| h),
    };
    host.eq_ignore_ascii_case("localhost") || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hosts() {
        for ok in ["127.0.0.1:8080", "localhost", "[::1]:9", "127.9.9.9/x"] {
            assert!(is_loopback_host(ok), "{ok}");
        }
        for bad in ["10.0.0.1", "example.com", "169.254.169.254", "127.0.0.1.evil.com"] {
            assert!(!is_loopback_host(bad), "{bad}");
        }
    }
}
