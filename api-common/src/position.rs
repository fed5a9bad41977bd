//! `X-Orderline-Position`: how far the read model behind an answer had got. Every query and
//! admin read carries it, so a client can pass it back as `?min_position=`.

use axum::http::{HeaderName, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;

/// The header naming the position a read model has reached.
pub static POSITION_HEADER: HeaderName = HeaderName::from_static("x-orderline-position");

/// A query answer: JSON plus `X-Orderline-Position`.
pub struct Read<T> {
    /// Position the read model had reached when it was read.
    pub position: i64,
    /// The body.
    pub body: T,
}

impl<T: Serialize> IntoResponse for Read<T> {
    fn into_response(self) -> Response {
        let mut response = Json(self.body).into_response();
        response
            .headers_mut()
            .insert(POSITION_HEADER.clone(), HeaderValue::from(self.position));
        response
    }
}
