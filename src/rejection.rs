//! Why the proxy itself refuses a request, before any instance is tried: one type that knows each reason's status,
//! OpenAI error type, message and whether the connection must close, and the one place that writes a refusal.
//!
//! Whether a refusal closes the connection: a request whose body was not read must close it (the unread bytes
//! would be taken for the next request); a refusal that leaves the stream in doubt (bad framing, a blocked
//! client, a broken body) always closes it.

use std::borrow::Cow;

use crate::exchange::{respond_json, Relayed};
use crate::guard::Verdict;
use crate::http::body::BodyError;
use crate::http::parse::FramingError;
use crate::http::target::TargetError;
use crate::http::write::{self, Persist};
use crate::http::ClientStream;
use crate::quota::Limited;

const INVALID: &str = "invalid_request_error";

#[derive(Debug)]
pub enum Rejection {
    /// Ambiguous or malformed body framing (400).
    Framing(&'static str),
    /// A transfer coding other than `chunked` (501).
    UnsupportedCoding(String),
    /// The body is larger than `max_body_bytes` (413), declared or found while reading.
    BodyTooLarge { max: u64 },
    /// A target that is not forwarded (400, 414 for length); see `http::target`.
    Target(TargetError),
    /// No, several or an invalid `Host` (400).
    Host(&'static str),
    /// Outside `/openai/` (404).
    NotFound,
    /// Too many bad keys from this address (403 + `Retry-After`).
    Blocked { retry_after_secs: u64 },
    /// No client key (401).
    MissingKey { header: String },
    /// A key not in the allowlist (401).
    BadKey,
    /// Two different keys, in `client_header_name` and `Authorization: Bearer` (401; not a strike: the request
    /// is refused whatever the keys, so it tells a guesser nothing).
    TwoKeys,
    /// An `Expect` other than `100-continue` (417).
    Expectation,
    /// Broken chunked framing in the body (400).
    BodyMalformed(&'static str),
    /// The body stopped arriving (408).
    BodyTimeout,
    /// The client key's `deployments` does not list the deployment the request names, or the request names
    /// none the proxy can read (403).
    DeploymentNotAllowed { deployment: Option<String> },
    /// The client key is over its `requests_per_minute` or `tokens_per_minute` (429 + `Retry-After`; not a
    /// strike, and no instance is called).
    ClientLimit(Limited),
}

impl Rejection {
    pub fn status(&self) -> u16 {
        match self {
            Rejection::Framing(_) | Rejection::Host(_) | Rejection::BodyMalformed(_) => 400,
            Rejection::Target(t) => t.status(),
            Rejection::UnsupportedCoding(_) => 501,
            Rejection::BodyTooLarge { .. } => 413,
            Rejection::NotFound => 404,
            Rejection::Blocked { .. } | Rejection::DeploymentNotAllowed { .. } => 403,
            Rejection::ClientLimit(_) => 429,
            Rejection::MissingKey { .. } | Rejection::BadKey | Rejection::TwoKeys => 401,
            Rejection::Expectation => 417,
            Rejection::BodyTimeout => 408,
        }
    }

    /// The OpenAI error `type`.
    fn kind(&self) -> &'static str {
        match self {
            Rejection::NotFound => "not_found_error",
            Rejection::Blocked { .. } | Rejection::DeploymentNotAllowed { .. } => "permission_error",
            Rejection::ClientLimit(_) => "rate_limit_error",
            Rejection::MissingKey { .. } | Rejection::BadKey | Rejection::TwoKeys => "authentication_error",
            _ => INVALID,
        }
    }

    fn message(&self) -> Cow<'static, str> {
        match self {
            Rejection::Framing(why) | Rejection::Host(why) | Rejection::BodyMalformed(why) => Cow::Borrowed(why),
            Rejection::UnsupportedCoding(te) => {
                Cow::Owned(format!("unsupported transfer-encoding {te:?}; only chunked is accepted"))
            }
            Rejection::BodyTooLarge { max } => Cow::Owned(format!("request body larger than {max} bytes")),
            Rejection::Target(t) => Cow::Borrowed(t.message()),
            Rejection::NotFound => Cow::Borrowed("not found: only /openai/ routes are proxied"),
            Rejection::Blocked { .. } => Cow::Borrowed("too many invalid keys from this address; blocked for now"),
            Rejection::MissingKey { header } => {
                Cow::Owned(format!("missing client key: send it in header {header} or as Authorization: Bearer <key>"))
            }
            Rejection::TwoKeys => Cow::Borrowed("two different client keys (api-key header and Authorization)"),
            Rejection::BadKey => Cow::Borrowed("invalid client key"),
            Rejection::Expectation => Cow::Borrowed("unsupported Expect value"),
            Rejection::BodyTimeout => Cow::Borrowed("request body not received in time"),
            Rejection::DeploymentNotAllowed { deployment: Some(d) } => {
                Cow::Owned(format!("this client key may not use deployment {d:?}"))
            }
            Rejection::DeploymentNotAllowed { deployment: None } => Cow::Borrowed(
                "this client key may use only some deployments, and the request names none (in its path or the \
                 model field of its JSON body)",
            ),
            Rejection::ClientLimit(Limited::RequestsPerMinute { .. }) => {
                Cow::Borrowed("this client key is over its requests_per_minute limit at the proxy; retry later")
            }
            Rejection::ClientLimit(Limited::TokensPerMinute { .. }) => {
                Cow::Borrowed("this client key is over its tokens_per_minute limit at the proxy; retry later")
            }
        }
    }

    /// The OpenAI error `code`: the proxy's own name for the refusals a client may want to tell apart from an
    /// upstream's (Azure's 429 says `429`), otherwise the status, as Azure's errors do.
    fn code(&self) -> Cow<'static, str> {
        match self {
            Rejection::DeploymentNotAllowed { .. } => Cow::Borrowed("client_deployment_not_allowed"),
            Rejection::ClientLimit(Limited::RequestsPerMinute { .. }) => {
                Cow::Borrowed("client_requests_per_minute_exceeded")
            }
            Rejection::ClientLimit(Limited::TokensPerMinute { .. }) => {
                Cow::Borrowed("client_tokens_per_minute_exceeded")
            }
            _ => Cow::Owned(self.status().to_string()),
        }
    }

    /// Whether the refusal comes after the body was read, so that the connection may carry another request.
    pub fn after_body(&self) -> bool {
        matches!(self, Rejection::DeploymentNotAllowed { .. } | Rejection::ClientLimit(_))
    }

    /// Whether the connection closes whatever else holds: the request's framing or body is in doubt, or the
    /// client is blocked.
    fn closes(&self) -> bool {
        !matches!(
            self,
            Rejection::NotFound
                | Rejection::MissingKey { .. }
                | Rejection::BadKey
                | Rejection::TwoKeys
                | Rejection::DeploymentNotAllowed { .. }
                | Rejection::ClientLimit(_)
        )
    }

    /// Writes the refusal. `unread` is how the connection ends when the refusal itself does not close it: closed
    /// while a body is still unread, the request's own keep-alive otherwise.
    pub fn respond(self, client: &mut ClientStream, rid: &str, unread: Persist) -> Relayed {
        let persist = if self.closes() { Persist::Close } else { unread };
        let retry_after = match &self {
            Rejection::Blocked { retry_after_secs } => Some(retry_after_secs.to_string()),
            Rejection::ClientLimit(limited) => Some(limited.retry_after_secs().to_string()),
            _ => None,
        };
        let extra: Vec<(&str, &str)> = retry_after.iter().map(|s| ("Retry-After", s.as_str())).collect();
        let body = write::error_json(&self.message(), self.kind(), &self.code(), rid);
        respond_json(client, rid, self.status(), &body, &extra, persist)
    }
}

/// The framing's refusal; `max` is `max_body_bytes`, for the message.
pub fn from_framing(e: FramingError, max: u64) -> Rejection {
    match e {
        FramingError::Bad(why) => Rejection::Framing(why),
        FramingError::Unsupported(te) => Rejection::UnsupportedCoding(te),
        FramingError::TooLarge(_) => Rejection::BodyTooLarge { max },
    }
}

impl From<TargetError> for Rejection {
    fn from(e: TargetError) -> Rejection {
        Rejection::Target(e)
    }
}

/// The guard's verdict as a refusal; `Ok` when the client may go on.
pub fn from_verdict(v: Verdict, header: &str) -> Result<(), Rejection> {
    match v {
        Verdict::Allowed { .. } => Ok(()),
        Verdict::Blocked { retry_after_secs } => Err(Rejection::Blocked { retry_after_secs }),
        Verdict::MissingKey => Err(Rejection::MissingKey { header: header.to_string() }),
        Verdict::BadKey => Err(Rejection::BadKey),
    }
}

/// A body that could not be read; `None` when the client simply went away (nothing to answer).
pub fn from_body_error(e: BodyError, max: u64) -> Option<Rejection> {
    match e {
        BodyError::TooLarge => Some(Rejection::BodyTooLarge { max }),
        BodyError::Malformed(why) => Some(Rejection::BodyMalformed(why)),
        e if e.is_timeout() => Some(Rejection::BodyTimeout),
        BodyError::Closed | BodyError::Io(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_types_and_closing() {
        let cases = [
            (Rejection::Framing("x"), 400, INVALID, true),
            (Rejection::UnsupportedCoding("gzip".into()), 501, INVALID, true),
            (Rejection::BodyTooLarge { max: 5 }, 413, INVALID, true),
            (Rejection::Target(TargetError::TooLong), 414, INVALID, true),
            (Rejection::Host("h"), 400, INVALID, true),
            (Rejection::NotFound, 404, "not_found_error", false),
            (Rejection::Blocked { retry_after_secs: 3 }, 403, "permission_error", true),
            (Rejection::MissingKey { header: "api-key".into() }, 401, "authentication_error", false),
            (Rejection::BadKey, 401, "authentication_error", false),
            (Rejection::TwoKeys, 401, "authentication_error", false),
            (Rejection::Expectation, 417, INVALID, true),
            (Rejection::BodyMalformed("m"), 400, INVALID, true),
            (Rejection::BodyTimeout, 408, INVALID, true),
            (Rejection::DeploymentNotAllowed { deployment: None }, 403, "permission_error", false),
            (
                Rejection::ClientLimit(Limited::RequestsPerMinute { retry_after_secs: 2 }),
                429,
                "rate_limit_error",
                false,
            ),
        ];
        for (r, status, kind, closes) in cases {
            assert_eq!((r.status(), r.kind(), r.closes()), (status, kind, closes), "{r:?}");
            assert!(!r.message().is_empty());
        }
        assert_eq!(Rejection::BodyTooLarge { max: 7 }.message(), "request body larger than 7 bytes");
        assert_eq!(
            Rejection::MissingKey { header: "api-key".into() }.message(),
            "missing client key: send it in header api-key or as Authorization: Bearer <key>"
        );
    }
}
