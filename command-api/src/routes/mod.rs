//! One module per resource; each handler parses its body into domain types, checks the role,
//! and hands a command to [`crate::executor::execute`].

pub mod inventory;
pub mod orders;
pub mod products;

use std::fmt::Display;

use api_common::error::{ApiError, FieldError};

/// Collects every invalid field of a body so that one answer names them all.
#[derive(Default)]
pub(crate) struct Fields(Vec<FieldError>);

impl Fields {
    /// Keeps the value, or records `field` as invalid with the error's message.
    pub(crate) fn check<T, E: Display>(
        &mut self,
        field: impl Into<String>,
        parsed: Result<T, E>,
    ) -> Option<T> {
        parsed
            .map_err(|e| self.0.push(FieldError::new(field, e)))
            .ok()
    }

    /// `Ok` if no field was invalid, else a 400 naming them.
    pub(crate) fn finish(self) -> Result<(), ApiError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(ApiError::BadRequest {
                detail: "the request is invalid".into(),
                errors: self.0,
            })
        }
    }
}

/// Unwraps a value [`Fields::check`] returned once [`Fields::finish`] passed.
pub(crate) fn checked<T>(value: Option<T>) -> Result<T, ApiError> {
    value.ok_or_else(|| ApiError::Internal("field checked but missing".into()))
}
