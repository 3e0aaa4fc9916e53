//! Which endpoint a request head asks for: the daemon's small routing table, with 404
//! for unknown paths and 405 (plus the `Allow` value) for a wrong method.

use super::openai::ApiError;
use super::request::Head;

/// The endpoints of the HTTP API.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// `POST /v1/chat/completions`.
    ChatCompletions,
    /// `GET /v1/models`.
    Models,
    /// `GET /health`: 200 when ready, 503 while loading or draining.
    Health,
    /// `GET /metrics`: Prometheus text format.
    Metrics,
}

impl Endpoint {
    /// The methods the endpoint's path allows, as an `Allow` header value.
    pub fn allow(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "POST",
            Endpoint::Models | Endpoint::Health | Endpoint::Metrics => "GET, HEAD",
        }
    }

    /// Whether the endpoint runs a generation (and so waits for readiness and takes a
    /// place in admission).
    pub fn generates(self) -> bool {
        self == Endpoint::ChatCompletions
    }
}

/// Why a head routes nowhere: the error to answer with and, for 405, the `Allow` value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NoRoute {
    /// The OpenAI-shaped error (404 or 405).
    pub error: ApiError,
    /// The methods the path allows, for the `Allow` header of a 405.
    pub allow: Option<&'static str>,
}

/// The endpoint `head` asks for. The query string is ignored; `HEAD` is accepted
/// wherever `GET` is (the caller sends the head without the body).
pub fn route(head: &Head) -> Result<Endpoint, NoRoute> {
    let path = head.route();
    let endpoint = match path {
        "/v1/chat/completions" => Endpoint::ChatCompletions,
        "/v1/models" => Endpoint::Models,
        "/health" => Endpoint::Health,
        "/metrics" => Endpoint::Metrics,
        _ => return Err(NoRoute { error: ApiError::not_found(path), allow: None }),
    };
    let ok = match endpoint {
        Endpoint::ChatCompletions => head.method == "POST",
        _ => head.method == "GET" || head.method == "HEAD",
    };
    if ok {
        Ok(endpoint)
    } else {
        Err(NoRoute {
            error: ApiError::method_not_allowed(&head.method, path),
            allow: Some(endpoint.allow()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::request::{Event, Limits, RequestReader};
    use crate::http::response::Status;

    fn head(method: &str, path: &str) -> Head {
        let mut r = RequestReader::new(Limits::with_max_body(0));
        r.push(format!("{method} {path} HTTP/1.1\r\n\r\n").as_bytes());
        match r.poll() {
            Some(Event::Head(h)) => h,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn known_paths() {
        assert_eq!(route(&head("POST", "/v1/chat/completions")), Ok(Endpoint::ChatCompletions));
        assert_eq!(route(&head("GET", "/v1/models?limit=1")), Ok(Endpoint::Models));
        assert_eq!(route(&head("HEAD", "/health")), Ok(Endpoint::Health));
        assert_eq!(route(&head("GET", "/metrics")), Ok(Endpoint::Metrics));
        assert!(Endpoint::ChatCompletions.generates() && !Endpoint::Models.generates());
    }

    #[test]
    fn unknown_paths_and_wrong_methods() {
        for path in ["/", "/v1/completions", "/v1/chat/completions/", "/V1/models", "/healthz"] {
            let e = route(&head("GET", path)).unwrap_err();
            assert_eq!((e.error.status, e.allow), (Status::NotFound, None), "{path}");
        }
        let e = route(&head("GET", "/v1/chat/completions")).unwrap_err();
        assert_eq!((e.error.status, e.allow), (Status::MethodNotAllowed, Some("POST")));
        let e = route(&head("post", "/v1/chat/completions")).unwrap_err();
        assert_eq!(e.error.status, Status::MethodNotAllowed, "methods are case-sensitive");
        let e = route(&head("DELETE", "/v1/models")).unwrap_err();
        assert_eq!((e.error.status, e.allow), (Status::MethodNotAllowed, Some("GET, HEAD")));
    }
}
