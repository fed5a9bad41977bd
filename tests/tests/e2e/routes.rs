//! Every route against every kind of caller and every kind of bad input: the exact status for
//! each role, 401 for each token defect, and for malformed or oversized path values, query
//! values and bodies a 4xx `application/problem+json` answer, never a 5xx and never text/plain.

use std::time::{SystemTime, UNIX_EPOCH};

use api_common::auth::ISSUER;
use orderline::Parts;
use reqwest::{Method, Response, StatusCode};
use serde_json::{json, Value};
use testkit::TestApp;

const SECRET: &str = "a-route-matrix-secret-of-32-bytes-or-more";

/// Who calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Caller {
    /// The customer who owns the order under test.
    Owner,
    /// Another customer.
    Stranger,
    Admin,
    Service,
}

const CALLERS: [Caller; 4] = [
    Caller::Owner,
    Caller::Stranger,
    Caller::Admin,
    Caller::Service,
];

/// One route with a request that reaches its handler, and what each caller gets.
struct Route {
    method: Method,
    path: String,
    body: Option<Value>,
    /// Status for Owner, Stranger, Admin, Service.
    expect: [u16; 4],
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn sign(claims: &Value, secret: &str, algorithm: jsonwebtoken::Algorithm) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(algorithm),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

fn token(sub: &str, role: &str) -> String {
    let claims =
        json!({ "sub": sub, "role": role, "exp": now() + 3600, "iss": ISSUER, "aud": ISSUER });
    sign(&claims, SECRET, jsonwebtoken::Algorithm::HS256)
}

async fn send(
    app: &TestApp,
    method: &Method,
    path: &str,
    authorization: Option<&str>,
    body: Option<&[u8]>,
) -> Response {
    let mut request = app
        .client
        .request(method.clone(), format!("{}{path}", app.address));
    if let Some(value) = authorization {
        request = request.header("authorization", value);
    }
    if let Some(body) = body {
        request = request
            .header("content-type", "application/json")
            .body(body.to_vec());
    }
    request.send().await.unwrap()
}

/// Fails unless `response` is `status` (or, with `None`, any 4xx) as problem+json.
async fn assert_problem(response: Response, status: Option<u16>, what: &str) {
    let got = response.status();
    match status {
        Some(status) => assert_eq!(got.as_u16(), status, "{what}"),
        None => assert!(got.is_client_error(), "{what}: {got}"),
    }
    let kind = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert_eq!(kind, "application/problem+json", "{what}: {got}");
    if got == StatusCode::UNAUTHORIZED {
        assert!(
            response.headers().contains_key("www-authenticate"),
            "{what}"
        );
    }
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["status"], got.as_u16(), "{what}");
}

/// A shop with one order of the owner, a product and a saga: every route has something real.
async fn shop() -> (TestApp, Vec<Route>) {
    let app = TestApp::spawn_with_secret(Parts::ALL, SECRET).await;
    let admin = token("ops", "admin");
    let created = send(
        &app,
        &Method::POST,
        "/api/v1/products",
        Some(&format!("Bearer {admin}")),
        Some(
            json!({"sku": "MUG", "name": "Mug", "price": {"amount_minor": 100, "currency": "EUR"},
                   "initial_stock": 5})
            .to_string()
            .as_bytes(),
        ),
    )
    .await;
    assert_eq!(created.status(), StatusCode::CREATED);
    let placed = send(
        &app,
        &Method::POST,
        "/api/v1/orders",
        Some(&format!("Bearer {}", token("alice", "customer"))),
        Some(
            json!({"lines": [{"sku": "MUG", "quantity": 1}], "payment": {"token": "tok_visa"}})
                .to_string()
                .as_bytes(),
        ),
    )
    .await;
    assert_eq!(placed.status(), StatusCode::ACCEPTED);
    let order: Value = placed.json().await.unwrap();
    let order = order["order_id"].as_str().unwrap().to_owned();
    app.caught_up().await;
    let unknown = "00000000-0000-0000-0000-000000000000";
    // method, path, and the status for the owner, a stranger, an admin and a service.
    let table = "
        POST /api/v1/products                              403 403 400 403
        POST /api/v1/inventory/MUG/restock                 403 403 400 403
        POST /api/v1/inventory/MUG/adjust                  403 403 400 403
        POST /api/v1/orders                                400 400 403 403
        POST /api/v1/orders/ORDER/cancel                   400 400 400 403
        POST /api/v1/orders/ORDER/ship                     403 403 400 403
        GET  /api/v1/orders/ORDER                          200 404 200 403
        GET  /api/v1/orders                                200 200 200 403
        GET  /api/v1/orders/ORDER/events                   200 404 200 403
        GET  /api/v1/products                              200 200 200 200
        GET  /api/v1/products/MUG                          200 200 200 200
        GET  /api/v1/inventory                             403 403 200 200
        GET  /api/v1/inventory/MUG                         403 403 200 200
        GET  /api/v1/payments/ORDER                        200 404 200 403
        GET  /api/v1/admin/events                          403 403 200 403
        GET  /api/v1/admin/projections                     403 403 200 403
        POST /api/v1/admin/projections/nope/rebuild        403 403 404 403
        GET  /api/v1/admin/streams/order/ORDER             403 403 200 403
        GET  /api/v1/admin/notifications                   403 403 200 403
        POST /api/v1/admin/notifications/UNKNOWN/retry     403 403 404 403
        GET  /api/v1/admin/sagas                           403 403 200 403
        GET  /api/v1/admin/sagas/ORDER                     403 403 200 403
        POST /api/v1/admin/sagas/ORDER/retry               403 403 409 403
        GET  /api/v1/admin/parked                          403 403 200 403
        POST /api/v1/admin/parked/fulfillment/ORDER/retry  403 403 404 403
        POST /api/v1/admin/parked/fulfillment/ORDER/skip   403 403 404 403";
    // Every POST carries a body its handler refuses (400) or ignores, so no call changes the
    // state the others meet.
    let routes = table
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let words: Vec<&str> = line.split_whitespace().collect();
            let method: Method = words[0].parse().unwrap();
            let expect: Vec<u16> = words[2..].iter().map(|w| w.parse().unwrap()).collect();
            Route {
                body: (method == Method::POST).then(|| json!({ "unknown": true })),
                method,
                path: words[1]
                    .replace("ORDER", &order)
                    .replace("UNKNOWN", unknown),
                expect: expect.try_into().unwrap(),
            }
        })
        .collect();
    (app, routes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_role_on_every_route_gets_its_exact_status() {
    let (app, routes) = shop().await;
    for route in &routes {
        for (caller, expected) in CALLERS.iter().zip(route.expect) {
            let bearer = format!(
                "Bearer {}",
                match caller {
                    Caller::Owner => token("alice", "customer"),
                    Caller::Stranger => token("mallory", "customer"),
                    Caller::Admin => token("ops", "admin"),
                    Caller::Service => token("warehouse", "service"),
                }
            );
            let body = route.body.as_ref().map(Value::to_string);
            let response = send(
                &app,
                &route.method,
                &route.path,
                Some(&bearer),
                body.as_deref().map(str::as_bytes),
            )
            .await;
            let what = format!("{} {} as {caller:?}", route.method, route.path);
            if expected < 400 {
                assert_eq!(response.status().as_u16(), expected, "{what}");
            } else {
                assert_problem(response, Some(expected), &what).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_token_defect_is_a_401_on_every_route() {
    let (app, routes) = shop().await;
    let hs256 = jsonwebtoken::Algorithm::HS256;
    let signed = |change: &dyn Fn(&mut Value), secret: &str, algorithm| {
        let mut claims = json!({
            "sub": "ops", "role": "admin", "exp": now() + 3600, "iss": ISSUER, "aud": ISSUER
        });
        change(&mut claims);
        format!("Bearer {}", sign(&claims, secret, algorithm))
    };
    let unchanged = |_: &mut Value| {};
    let claim = |name: &'static str, value: Value| {
        move |c: &mut Value| {
            c[name] = value.clone();
        }
    };
    let mut defects: Vec<(&str, String)> = vec![
        ("a scheme with no token", "Bearer".into()),
        ("another scheme", "Basic b3BzOm9wcw==".into()),
        ("not a JWT", "Bearer not.a.jwt".into()),
        (
            "another secret",
            signed(&unchanged, "another-secret-of-32-bytes-or-longer!", hs256),
        ),
        (
            "another algorithm",
            signed(&unchanged, SECRET, jsonwebtoken::Algorithm::HS512),
        ),
        (
            "no expiry",
            signed(
                &|c| drop(c.as_object_mut().unwrap().remove("exp")),
                SECRET,
                hs256,
            ),
        ),
    ];
    for (defect, name, value) in [
        ("expired", "exp", json!(now() - 3600)),
        ("not yet valid", "nbf", json!(now() + 3600)),
        ("another issuer", "iss", json!("else")),
        ("another audience", "aud", json!("else")),
        ("an unknown role", "role", json!("root")),
        ("a sub with blanks", "sub", json!(" ops")),
        ("a sub with NUL", "sub", json!("o\u{0}ps")),
        ("an empty sub", "sub", json!("")),
        ("a sub that is a number", "sub", json!(7)),
    ] {
        defects.push((defect, signed(&claim(name, value), SECRET, hs256)));
    }
    for route in &routes {
        let body = route.body.as_ref().map(Value::to_string);
        let body = body.as_deref().map(str::as_bytes);
        let none = send(&app, &route.method, &route.path, None, body).await;
        assert_problem(
            none,
            Some(401),
            &format!("{} {} without a token", route.method, route.path),
        )
        .await;
        for (defect, header) in &defects {
            let response = send(&app, &route.method, &route.path, Some(header), body).await;
            let what = format!("{} {} with {defect}", route.method, route.path);
            assert_problem(response, Some(401), &what).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn malformed_and_oversized_input_on_every_route_is_a_problem_never_a_5xx() {
    let (app, routes) = shop().await;
    let admin = format!("Bearer {}", token("ops", "admin"));
    let owner = format!("Bearer {}", token("alice", "customer"));
    let long = "x".repeat(5000);
    let path_values = [
        "%FF",
        "%00",
        "%2F",
        "..",
        "%20x",
        "%F0%9F%98%80",
        long.as_str(),
    ];
    let query_values = [
        "abc",
        "-1",
        "99999999999999999999",
        "",
        "%00",
        "%FF",
        "true",
        long.as_str(),
    ];
    let query_names = [
        "limit",
        "cursor",
        "status",
        "customer_id",
        "min_position",
        "low_stock",
        "after",
        "at",
        "version",
        "state",
        "unknown",
    ];
    for route in &routes {
        let authorization = if route.path.starts_with("/api/v1/orders")
            && route.method == Method::POST
            && route.path == "/api/v1/orders"
        {
            owner.as_str()
        } else {
            admin.as_str()
        };
        // Each path segment that is a value, replaced by each malformed value.
        let segments: Vec<&str> = route.path.split('/').collect();
        for (i, segment) in segments.iter().enumerate() {
            let is_value = segment.len() >= 3
                && (segment.contains('-') || *segment == "MUG" || *segment == "nope");
            if !is_value || i < 3 {
                continue;
            }
            for value in path_values {
                let mut changed = segments.clone();
                changed[i] = value;
                let path = changed.join("/");
                let body = route.body.as_ref().map(Value::to_string);
                let response = send(
                    &app,
                    &route.method,
                    &path,
                    Some(authorization),
                    body.as_deref().map(str::as_bytes),
                )
                .await;
                assert_problem(response, None, &format!("{} {path}", route.method)).await;
            }
        }
        // Every query parameter any route knows, with every malformed value.
        for name in query_names {
            for value in query_values {
                let path = format!("{}?{name}={value}", route.path);
                let body = route.body.as_ref().map(Value::to_string);
                let response = send(
                    &app,
                    &route.method,
                    &path,
                    Some(authorization),
                    body.as_deref().map(str::as_bytes),
                )
                .await;
                let status = response.status();
                assert!(
                    !status.is_server_error(),
                    "{} {path}: {status}",
                    route.method
                );
                if !status.is_success() {
                    assert_problem(response, None, &format!("{} {path}", route.method)).await;
                }
            }
        }
        // Bodies only where the route reads one: a route that takes none (the admin actions)
        // may answer before the client has written it all and close the connection, which a
        // client then sees as a broken pipe, not as an answer.
        if route.method == Method::POST && !route.path.starts_with("/api/v1/admin/") {
            let huge = format!("{{\"note\": \"{}\"}}", "x".repeat(70 * 1024));
            for (what, body) in [
                ("an oversized body", huge.as_bytes()),
                ("a body that is not JSON", b"{not json".as_slice()),
                ("a JSON array", b"[1, 2]".as_slice()),
                ("deeply nested JSON", "[".repeat(10_000).as_bytes()),
            ] {
                let response = send(
                    &app,
                    &route.method,
                    &route.path,
                    Some(authorization),
                    Some(body),
                )
                .await;
                let status = response.status();
                assert!(
                    !status.is_server_error(),
                    "{} {} with {what}: {status}",
                    route.method,
                    route.path
                );
                if !status.is_success() {
                    assert_problem(
                        response,
                        None,
                        &format!("{} {} with {what}", route.method, route.path),
                    )
                    .await;
                }
            }
        }
    }
}
