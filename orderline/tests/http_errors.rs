//! The error mapping of the whole router, request by request through `app().oneshot(...)`: no
//! server, no port, and a database that does not answer, so every case here is decided before
//! (or by the failure of) the first statement. Each answer must be the problem+json the
//! contract (`../shared/API.md`) promises, with the request id and the protective headers.

#![expect(
    clippy::unwrap_used,
    reason = "a test that cannot go on should fail loudly"
)]

use std::time::Duration;

use axum::body::Body;
use axum::http::{header, Method, Request, StatusCode};
use axum::Router;
use serde_json::Value;
use sqlx::postgres::PgPoolOptions;
use tower::ServiceExt;

use api_common::auth::{Role, TokenKeys};
use query_api::live::LiveUpdates;

const SECRET: &[u8] = b"http-error-test-secret-that-is-long-enough";

/// The application over a database nobody listens for (port 1 on loopback refuses at once).
fn app() -> Router {
    let pool = PgPoolOptions::new()
        .acquire_timeout(Duration::from_millis(500))
        .connect_lazy("postgres://orderline@127.0.0.1:1/unreachable")
        .unwrap();
    let (updates, _handle) = LiveUpdates::spawn(pool.clone());
    orderline::app(pool, TokenKeys::hs256(SECRET), updates, "test:0:process")
}

fn token(role: Role) -> String {
    TokenKeys::hs256(SECRET)
        .mint("customer-1", role, Duration::from_secs(600))
        .unwrap()
}

/// One request of a case: method, path, role of the bearer token (none: no header), content
/// type and body.
struct Case {
    name: &'static str,
    method: Method,
    path: &'static str,
    auth: Auth,
    content_type: Option<&'static str>,
    body: Vec<u8>,
    extra: Option<(&'static str, String)>,
    status: StatusCode,
    problem: &'static str,
    /// A field the `errors` list must name.
    field: Option<&'static str>,
}

#[derive(Clone, Copy)]
enum Auth {
    None,
    Garbage,
    As(Role),
}

fn case(name: &'static str, method: Method, path: &'static str, auth: Auth) -> Case {
    Case {
        name,
        method,
        path,
        auth,
        content_type: None,
        body: Vec::new(),
        extra: None,
        status: StatusCode::OK,
        problem: "",
        field: None,
    }
}

impl Case {
    fn json(mut self, body: &str) -> Self {
        self.content_type = Some("application/json");
        self.body = body.as_bytes().to_vec();
        self
    }

    fn typed(mut self, kind: &'static str) -> Self {
        self.content_type = Some(kind);
        self
    }

    fn header(mut self, name: &'static str, value: String) -> Self {
        self.extra = Some((name, value));
        self
    }

    fn answers(mut self, status: StatusCode, problem: &'static str) -> Self {
        self.status = status;
        self.problem = problem;
        self
    }

    fn naming(mut self, field: &'static str) -> Self {
        self.field = Some(field);
        self
    }
}

const ORDER: &str = r#"{"lines":[{"sku":"A-1","quantity":1}],"payment":{"token":"tok_visa"}}"#;

fn cases() -> Vec<Case> {
    use StatusCode as S;
    let customer = Auth::As(Role::Customer);
    let admin = Auth::As(Role::Admin);
    let big = format!(
        r#"{{"lines":[{{"sku":"A-1","quantity":1}}],"payment":{{"token":"tok_visa"}},"shipping_address":"{}"}}"#,
        "x".repeat(70 * 1024)
    );
    vec![
        case("unknown route", Method::GET, "/api/v1/nowhere", customer)
            .answers(S::NOT_FOUND, "not-found"),
        case("wrong method", Method::DELETE, "/api/v1/products", admin)
            .answers(S::METHOD_NOT_ALLOWED, "method-not-allowed"),
        case("no token", Method::POST, "/api/v1/orders", Auth::None)
            .json(ORDER)
            .answers(S::UNAUTHORIZED, "unauthorized"),
        case("a token that is no JWT", Method::POST, "/api/v1/orders", Auth::Garbage)
            .json(ORDER)
            .answers(S::UNAUTHORIZED, "unauthorized"),
        case("a customer on an admin command", Method::POST, "/api/v1/products", customer)
            .json(r#"{"sku":"A-1","name":"A","price":{"amount_minor":100,"currency":"EUR"}}"#)
            .answers(S::FORBIDDEN, "forbidden"),
        case("a customer on an admin read", Method::GET, "/api/v1/admin/events", customer)
            .answers(S::FORBIDDEN, "forbidden"),
        case("a body that is not JSON by its type", Method::POST, "/api/v1/orders", customer)
            .json(ORDER)
            .typed("text/plain")
            .answers(S::UNSUPPORTED_MEDIA_TYPE, "unsupported-media-type"),
        case("a body that is not JSON", Method::POST, "/api/v1/orders", customer)
            .json("{")
            .answers(S::BAD_REQUEST, "validation")
            .naming("body"),
        case("a field of the wrong shape", Method::POST, "/api/v1/orders", customer)
            .json(r#"{"lines":"many","payment":{"token":"tok_visa"}}"#)
            .answers(S::BAD_REQUEST, "validation")
            .naming("lines"),
        case("an unknown field", Method::POST, "/api/v1/orders", customer)
            .json(r#"{"lines":[{"sku":"A-1","quantity":1}],"payment":{"token":"tok_visa"},"coupon":"FREE"}"#)
            .answers(S::BAD_REQUEST, "validation"),
        case("a value out of range", Method::POST, "/api/v1/orders", customer)
            .json(r#"{"lines":[{"sku":"A-1","quantity":0}],"payment":{"token":"tok_visa"}}"#)
            .answers(S::BAD_REQUEST, "validation")
            .naming("lines[0].quantity"),
        case("a body over the limit", Method::POST, "/api/v1/orders", customer)
            .json(&big)
            .answers(S::PAYLOAD_TOO_LARGE, "too-large"),
        case("an idempotency key too long", Method::POST, "/api/v1/orders", customer)
            .json(ORDER)
            .header("idempotency-key", "k".repeat(256))
            .answers(S::BAD_REQUEST, "validation")
            .naming("Idempotency-Key"),
        case("readiness without a database", Method::GET, "/health/ready", Auth::None)
            .answers(S::SERVICE_UNAVAILABLE, "unavailable"),
        case("a read the database cannot answer", Method::GET, "/api/v1/products", customer)
            .answers(S::INTERNAL_SERVER_ERROR, "internal"),
        case("a command the database cannot take", Method::POST, "/api/v1/orders", customer)
            .json(ORDER)
            .answers(S::INTERNAL_SERVER_ERROR, "internal"),
    ]
}

#[tokio::test]
async fn every_error_is_the_problem_the_contract_promises() {
    let app = app();
    let mut wrong = Vec::new();
    for case in cases() {
        let mut request = Request::builder()
            .method(case.method.clone())
            .uri(case.path);
        match case.auth {
            Auth::None => {}
            Auth::Garbage => request = request.header(header::AUTHORIZATION, "Bearer not-a-jwt"),
            Auth::As(role) => {
                request = request.header(header::AUTHORIZATION, format!("Bearer {}", token(role)));
            }
        }
        if let Some(kind) = case.content_type {
            request = request.header(header::CONTENT_TYPE, kind);
        }
        if let Some((name, value)) = &case.extra {
            request = request.header(*name, value);
        }
        let response = app
            .clone()
            .oneshot(request.body(Body::from(case.body.clone())).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        let mut faults = Vec::new();
        if status != case.status {
            faults.push(format!("status {status}, wanted {}", case.status));
        }
        if headers.get(header::CONTENT_TYPE).map(|v| v.as_bytes())
            != Some(b"application/problem+json")
        {
            faults.push(format!(
                "content type {:?}",
                headers.get(header::CONTENT_TYPE)
            ));
        }
        let kind = format!("urn:orderline:problem:{}", case.problem);
        if body["type"] != kind.as_str() {
            faults.push(format!("type {}, wanted {kind}", body["type"]));
        }
        if body["status"] != status.as_u16() || !body["title"].is_string() {
            faults.push("status or title missing from the body".into());
        }
        if !body["detail"].is_string() {
            faults.push("no detail".into());
        }
        if let Some(field) = case.field {
            let named = body["errors"]
                .as_array()
                .is_some_and(|errors| errors.iter().any(|e| e["field"] == field));
            if !named {
                faults.push(format!("errors do not name {field}: {}", body["errors"]));
            }
        }
        if headers.get("x-request-id").is_none() {
            faults.push("no x-request-id".into());
        }
        if headers.get(header::CACHE_CONTROL).map(|v| v.as_bytes()) != Some(b"no-store") {
            faults.push("not no-store".into());
        }
        if status == StatusCode::UNAUTHORIZED
            && headers.get(header::WWW_AUTHENTICATE).map(|v| v.as_bytes())
                != Some(b"Bearer realm=\"orderline\"")
        {
            faults.push("401 without WWW-Authenticate".into());
        }
        if status == StatusCode::SERVICE_UNAVAILABLE && headers.get(header::RETRY_AFTER).is_none() {
            faults.push("503 without Retry-After".into());
        }
        // A server error says nothing of its cause: no address, no driver error.
        let text = String::from_utf8_lossy(&bytes);
        if status.is_server_error()
            && ["127.0.0.1", "refused", "pool", "sqlx"]
                .iter()
                .any(|leak| text.contains(leak))
        {
            faults.push(format!("the answer leaks its cause: {text}"));
        }
        if !faults.is_empty() {
            wrong.push(format!("{}: {} ({text})", case.name, faults.join("; ")));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[tokio::test]
async fn a_success_that_needs_no_database_is_plain_json() {
    let response = app()
        .oneshot(
            Request::builder()
                .uri("/health/live")
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.headers().get(header::CONTENT_TYPE).unwrap(),
        "application/json"
    );
}
