//! Request and correlation ids: every request gets both, they are echoed in the response
//! headers, stored on the events a command writes, and logged with the request.

use axum::extract::{FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderName, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use uuid::Uuid;

use crate::error::{ApiError, InternalCause};

/// Ids that tie a request to its events and log lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestIds {
    /// `X-Request-Id` as sent (see [`RequestIds::from_headers`] for what is accepted), else a
    /// new UUID. Stored as sent in the metadata of the events the request writes.
    pub request_id: String,
    /// `X-Correlation-Id` as sent (a UUID), else a new UUID.
    pub correlation_id: Uuid,
}

/// Longest `X-Request-Id` accepted.
pub const MAX_REQUEST_ID_LEN: usize = 128;

/// The prefix of the ids the saga gives its own commands (`saga:{order}/{step}`); no client id
/// may start with it, so the audit trail never shows a client's command as the saga's.
pub const RESERVED_PREFIX: &str = "saga:";

static REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static CORRELATION_ID: HeaderName = HeaderName::from_static("x-correlation-id");

impl RequestIds {
    /// The ids a request sent, or new ones where it sent none.
    ///
    /// # Errors
    /// A 400 naming the header when `X-Request-Id` is not 1-128 characters of ASCII letters,
    /// digits and `-_.:/+=@`, or starts with [`RESERVED_PREFIX`] (in any case), or when
    /// `X-Correlation-Id` is not a UUID.
    pub fn from_headers(headers: &HeaderMap) -> Result<Self, ApiError> {
        let request_id = match headers.get(&REQUEST_ID) {
            None => Uuid::new_v4().to_string(),
            Some(value) => {
                let allowed = |b: u8| b.is_ascii_alphanumeric() || b"-_.:/+=@".contains(&b);
                let bytes = value.as_bytes();
                if bytes.is_empty()
                    || bytes.len() > MAX_REQUEST_ID_LEN
                    || !bytes.iter().copied().all(allowed)
                {
                    return Err(ApiError::field(
                        "X-Request-Id",
                        format!(
                            "must be 1-{MAX_REQUEST_ID_LEN} characters of A-Z, a-z, 0-9 and -_.:/+=@"
                        ),
                    ));
                }
                let id = String::from_utf8_lossy(bytes).into_owned();
                if id
                    .get(..RESERVED_PREFIX.len())
                    .is_some_and(|p| p.eq_ignore_ascii_case(RESERVED_PREFIX))
                {
                    return Err(ApiError::field(
                        "X-Request-Id",
                        format!("must not start with {RESERVED_PREFIX:?}, which orderline keeps for its own commands"),
                    ));
                }
                id
            }
        };
        let correlation_id = match headers.get(&CORRELATION_ID) {
            None => Uuid::new_v4(),
            Some(value) => value
                .to_str()
                .ok()
                .and_then(|v| Uuid::parse_str(v).ok())
                .ok_or_else(|| ApiError::field("X-Correlation-Id", "must be a UUID"))?,
        };
        Ok(Self {
            request_id,
            correlation_id,
        })
    }
}

/// Middleware: gives every request its [`RequestIds`], runs it in a `request` span carrying
/// them (so every line logged while it runs names the request), echoes them in the response
/// headers, and logs the request once it is answered: a server error once, at `error`, with
/// its cause ([`InternalCause`]), everything else at `debug`. A request whose ids are malformed
/// is answered 400 before anything else runs.
pub async fn assign_ids(mut req: Request, next: Next) -> Response {
    use tracing::Instrument;
    let ids = match RequestIds::from_headers(req.headers()) {
        Ok(ids) => ids,
        Err(refused) => return refused.into_response(),
    };
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    req.extensions_mut().insert(ids.clone());
    let span = tracing::info_span!(
        "request",
        request_id = %ids.request_id,
        correlation_id = %ids.correlation_id,
        %method,
        %path,
    );
    let started = std::time::Instant::now();
    let mut response = next.run(req).instrument(span.clone()).await;
    let status = response.status();
    let elapsed_ms = started.elapsed().as_secs_f64() * 1000.0;
    let _in_request = span.enter();
    if status.is_server_error() {
        let cause = response
            .extensions_mut()
            .remove::<InternalCause>()
            .map_or_else(|| "no cause recorded".to_owned(), |c| c.0);
        // The ids are on the line itself, not only on the span: at `RUST_LOG=error` the
        // info-level span is off, and the line must still say which request failed.
        tracing::error!(
            request_id = %ids.request_id,
            correlation_id = %ids.correlation_id,
            %method,
            %path,
            %status,
            elapsed_ms,
            cause,
            "request failed"
        );
    } else {
        tracing::debug!(%status, elapsed_ms, "request");
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
        match parts.extensions.get::<RequestIds>() {
            Some(ids) => Ok(ids.clone()),
            None => RequestIds::from_headers(&parts.headers),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(name: &'static str, value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(name, HeaderValue::from_str(value).unwrap());
        headers
    }

    #[test]
    fn ids_are_kept_as_sent_when_well_formed() {
        let ids = RequestIds::from_headers(&with("x-request-id", "checkout/42:a=b")).unwrap();
        assert_eq!(ids.request_id, "checkout/42:a=b");
        assert!(RequestIds::from_headers(&HeaderMap::new()).is_ok());
    }

    #[test]
    fn malformed_or_impersonating_ids_are_refused() {
        for bad in [
            "saga:123/confirm",
            "SAGA:x",
            "a b",
            "",
            &"x".repeat(129),
            "tab\tin",
        ] {
            let headers = HeaderMap::from_iter(
                HeaderValue::from_str(bad)
                    .ok()
                    .map(|v| (REQUEST_ID.clone(), v)),
            );
            if headers.is_empty() {
                continue;
            }
            assert!(RequestIds::from_headers(&headers).is_err(), "{bad:?}");
        }
        assert!(RequestIds::from_headers(&with("x-correlation-id", "nope")).is_err());
    }

    /// Captures what the middleware logs.
    #[derive(Clone, Default)]
    struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn a_server_error_is_logged_once_with_its_request_id_and_cause() {
        use tower::ServiceExt;
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            // As at `RUST_LOG=error`: the info-level request span is off, and the line must
            // still name the request by itself.
            .with_max_level(tracing::Level::ERROR)
            .finish();
        let _default = tracing::subscriber::set_default(subscriber);
        let app = axum::Router::new()
            .route(
                "/boom",
                axum::routing::get(|| async {
                    Err::<(), _>(ApiError::Internal("the disk is on fire".into()))
                }),
            )
            .layer(axum::middleware::from_fn(assign_ids));
        let request = axum::http::Request::get("/boom")
            .header("x-request-id", "req-42")
            .body(axum::body::Body::empty())
            .unwrap();
        let response = app.oneshot(request).await.unwrap();
        assert_eq!(response.status(), 500);
        let body = axum::body::to_bytes(response.into_body(), 4096)
            .await
            .unwrap();
        assert!(
            !String::from_utf8_lossy(&body).contains("fire"),
            "the cause is never sent"
        );
        let log = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        let failures: Vec<&str> = log.lines().filter(|l| l.contains("fire")).collect();
        assert_eq!(failures.len(), 1, "{log}");
        assert!(failures[0].contains("req-42"), "{log}");
        assert!(failures[0].contains("ERROR"), "{log}");
    }
}
