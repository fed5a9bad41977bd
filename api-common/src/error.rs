//! The one error type of the HTTP layer and its one mapping to `application/problem+json`
//! (RFC 9457). Error policy:
//! - 400: the request is malformed (not JSON, unknown or missing field, a value of the wrong
//!   form); `errors` names each field.
//! - 401/403/404: authentication, role, and anything the caller may not see.
//! - 409: a conflict with the current state (duplicate, a transition the lifecycle forbids,
//!   contention that outlasted the retries, an idempotent request still running).
//! - 422: well-formed but refused by a business rule, or an idempotency key reused for another
//!   request.
//! - 500: anything else; the cause is never sent. It travels in the response's extensions
//!   ([`InternalCause`]) to the request middleware ([`crate::ids::assign_ids`]), which logs it
//!   once, in one line with the request id, the correlation id, the route and the status.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use aggregates::inventory::ProductError;
use aggregates::order::OrderError;
use aggregates::payment::PaymentError;
use event_store::StoreError;

/// One invalid field of a request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FieldError {
    /// Path of the field in the body (`lines[2].quantity`), or a header or path parameter name.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl FieldError {
    /// A field error.
    pub fn new(field: impl Into<String>, message: impl ToString) -> Self {
        Self {
            field: field.into(),
            message: message.to_string(),
        }
    }
}

/// Everything a handler can answer instead of success.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// No token, or one that does not verify: 401 with `WWW-Authenticate`.
    #[error("{0}")]
    Unauthorized(String),
    /// The token's role may not do this: 403.
    #[error("this action needs the {0} role")]
    Forbidden(&'static str),
    /// Nothing there, or nothing the caller may see: 404.
    #[error("{0}")]
    NotFound(String),
    /// The request is malformed: 400, with the offending fields.
    #[error("{detail}")]
    BadRequest {
        /// What is wrong, in one sentence (the problem's `detail`).
        detail: String,
        /// Each bad field.
        errors: Vec<FieldError>,
    },
    /// The body is not JSON: 415.
    #[error("the body must be application/json")]
    UnsupportedMediaType,
    /// The body is over the size limit: 413.
    #[error("the body is larger than {0} bytes")]
    PayloadTooLarge(usize),
    /// Conflicts with the current state: 409.
    #[error("{0}")]
    Conflict(String),
    /// Refused by a business rule: 422, optionally naming fields.
    #[error("{detail}")]
    Unprocessable {
        /// Which rule.
        detail: String,
        /// Fields involved, if any.
        errors: Vec<FieldError>,
    },
    /// The route exists but not for this method: 405.
    #[error("method not allowed")]
    MethodNotAllowed,
    /// A dependency is not ready (the database): 503.
    #[error("{0}")]
    Unavailable(String),
    /// A bug or an infrastructure failure: 500. The text is logged, never sent.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    /// A 400 for one field.
    pub fn field(field: impl Into<String>, message: impl ToString) -> Self {
        Self::BadRequest {
            detail: "the request is invalid".into(),
            errors: vec![FieldError::new(field, message)],
        }
    }

    /// A 422 for one field.
    pub fn rule(field: impl Into<String>, message: impl ToString) -> Self {
        let error = FieldError::new(field, message);
        Self::Unprocessable {
            detail: error.message.clone(),
            errors: vec![error],
        }
    }

    fn parts(&self) -> (StatusCode, &'static str, &'static str) {
        use StatusCode as S;
        match self {
            Self::Unauthorized(_) => (S::UNAUTHORIZED, "unauthorized", "Unauthorized"),
            Self::Forbidden(_) => (S::FORBIDDEN, "forbidden", "Forbidden"),
            Self::NotFound(_) => (S::NOT_FOUND, "not-found", "Not found"),
            Self::BadRequest { .. } => (S::BAD_REQUEST, "validation", "Invalid request"),
            Self::UnsupportedMediaType => (
                S::UNSUPPORTED_MEDIA_TYPE,
                "unsupported-media-type",
                "Unsupported media type",
            ),
            Self::PayloadTooLarge(_) => (S::PAYLOAD_TOO_LARGE, "too-large", "Body too large"),
            Self::Conflict(_) => (S::CONFLICT, "conflict", "Conflict"),
            Self::Unprocessable { .. } => (
                S::UNPROCESSABLE_ENTITY,
                "business-rule",
                "Refused by a business rule",
            ),
            Self::MethodNotAllowed => (
                S::METHOD_NOT_ALLOWED,
                "method-not-allowed",
                "Method not allowed",
            ),
            Self::Unavailable(_) => (S::SERVICE_UNAVAILABLE, "unavailable", "Unavailable"),
            Self::Internal(_) => (S::INTERNAL_SERVER_ERROR, "internal", "Internal error"),
        }
    }
}

/// The cause of a 500, attached to the response for the request middleware to log (never sent).
#[derive(Debug, Clone)]
pub struct InternalCause(pub String);

/// The problem+json body.
#[derive(Serialize)]
struct Problem<'a> {
    #[serde(rename = "type")]
    kind: String,
    title: &'a str,
    status: u16,
    detail: String,
    #[serde(skip_serializing_if = "<[FieldError]>::is_empty")]
    errors: &'a [FieldError],
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, slug, title) = self.parts();
        let detail = match &self {
            Self::Internal(_) => {
                "something went wrong on our side; the request may be retried".to_owned()
            }
            other => other.to_string(),
        };
        let errors = match &self {
            Self::BadRequest { errors, .. } | Self::Unprocessable { errors, .. } => &errors[..],
            _ => &[],
        };
        let problem = Problem {
            kind: format!("urn:orderline:problem:{slug}"),
            title,
            status: status.as_u16(),
            detail,
            errors,
        };
        let body = serde_json::to_vec(&problem).unwrap_or_default();
        let mut response = (status, body).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if status == StatusCode::UNAUTHORIZED {
            headers.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"orderline\""),
            );
        }
        if status == StatusCode::SERVICE_UNAVAILABLE {
            headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if let Self::Internal(cause) = self {
            response.extensions_mut().insert(InternalCause(cause));
        }
        response
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::Conflict => {
                Self::Conflict("the resource was changed concurrently; retry".into())
            }
            other => Self::Internal(other.to_string()),
        }
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(error: sqlx::Error) -> Self {
        Self::Internal(error.to_string())
    }
}

impl From<ProductError> for ApiError {
    fn from(error: ProductError) -> Self {
        use ProductError as E;
        match error {
            E::AlreadyRegistered | E::ReservationMismatch { .. } | E::OutOfStock { .. } => {
                Self::Conflict(error.to_string())
            }
            E::NotRegistered => Self::NotFound(error.to_string()),
            E::BelowReserved { .. } | E::ZeroDelta => Self::rule("delta", error),
            E::UnknownReservation | E::StockOverflow => Self::Unprocessable {
                detail: error.to_string(),
                errors: vec![],
            },
            E::SkuMismatch => Self::Internal(error.to_string()),
        }
    }
}

impl From<OrderError> for ApiError {
    fn from(error: OrderError) -> Self {
        use OrderError as E;
        match &error {
            E::AlreadyPlaced
            | E::CannotConfirm(_)
            | E::CannotReject(_)
            | E::CannotCancel(_)
            | E::CannotShip(_) => Self::Conflict(error.to_string()),
            E::NotFound => Self::NotFound(error.to_string()),
            E::LineCount => Self::rule("lines", &error),
            E::LineQuantity { index } => Self::rule(format!("lines[{index}].quantity"), &error),
            E::DuplicateSku { index, .. } => Self::rule(format!("lines[{index}].sku"), &error),
            E::Total(_) => Self::rule("lines", &error),
            E::IdMismatch => Self::Internal(error.to_string()),
        }
    }
}

impl From<PaymentError> for ApiError {
    fn from(error: PaymentError) -> Self {
        use PaymentError as E;
        match error {
            E::NotFound => Self::NotFound(error.to_string()),
            E::AlreadyRequested | E::WrongStatus { .. } => Self::Conflict(error.to_string()),
            E::CurrencyMismatch
            | E::ZeroAmount
            | E::CaptureExceedsAuthorized { .. }
            | E::RefundExceedsCaptured { .. } => Self::rule("amount", error),
        }
    }
}
