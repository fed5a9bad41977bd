//! Request and correlation ids: every request gets both, they are echoed in the response
//! headers, stored on the events a command writes, and logged with the request.

use axum::extract::{FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderName, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;
use uuid::Uuid;

use crate::error::ApiError;

/// Ids that tie a request to its events and log lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestIds {
    /// `X-Request-Id` as sent (if printable and at most 200 bytes), else a new UUID.
    pub request_id: String,
    /// `X-Correlation-Id` as sent (if a UUID), else a new UUID.
    pub correlation_id: Uuid,
}

static REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static CORRELATION_ID: HeaderName = HeaderName::from_static("x-correlation-id");

impl RequestIds {
    fn from_headers(headers: &HeaderMap) -> Self {
        let request_id = headers
            .get(&REQUEST_ID)
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty() && v.len() <= 200)
            .map_or_else(|| Uuid::new_v4().to_string(), str::to_owned);
        let correlation_id = headers
            .get(&CORRELATION_ID)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| Uuid::parse_str(v).ok())
            .unwrap_or_else(Uuid::new_v4);
        Self {
            request_id,
            correlation_id,
        }
    }
}

/// Middleware: gives every request its [`RequestIds`], echoes them in the response headers and
/// logs the request once it is answered (server errors at `warn`).
pub async fn assign_ids(mut req: Request, next: Next) -> Response {
    let ids = RequestIds::from_headers(req.headers());
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    req.extensions_mut().insert(ids.clone());
    let started = std::time::Instant::now();
    let mut response = next.run(req).await;
    let status = response.status();
    let elapsed_ms = started.elapsed().as_secs_f64() * 1000.0;
    if status.is_server_error() {
        tracing::warn!(request_id = %ids.request_id, %method, %path, %status, elapsed_ms, "request");
    } else {
        tracing::debug!(request_id = %ids.request_id, %method, %path, %status, elapsed_ms, "request");
    }
    let headers = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&ids.request_id) {
        headers.insert(REQUEST_ID.clone(), v);
    }
    if let Ok(v) = HeaderValue::from_str(&ids.correlation_id.to_string()) {
        headers.insert(CORRELATION_ID.clone(), v);
    }
    response
}

impl<S: Send + Sync> FromRequestParts<S> for RequestIds {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        // Routers without the middleware (unit tests) still get ids.
        Ok(parts
            .extensions
            .get::<RequestIds>()
            .cloned()
            .unwrap_or_else(|| RequestIds::from_headers(&parts.headers)))
    }
}
