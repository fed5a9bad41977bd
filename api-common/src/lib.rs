//! What the command and query APIs share: bearer-token authentication ([`auth`]), the one
//! problem+json error type ([`error`]) and request/correlation ids ([`ids`]).

pub mod auth;
pub mod error;
pub mod ids;
