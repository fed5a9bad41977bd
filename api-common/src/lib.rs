//! What the command and query APIs share: bearer-token authentication ([`auth`]), the one
//! problem+json error type ([`error`]), extractors for path and query parameters that answer
//! under that policy ([`extract`]) and request/correlation ids ([`ids`]).

pub mod auth;
pub mod error;
pub mod extract;
pub mod ids;
pub mod position;
