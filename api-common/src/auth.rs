//! Bearer-token authentication: HS256 JWTs with `sub`, `role`, `exp`, `iss = "orderline"` and
//! an `aud` that is `"orderline"` or an array holding it (RFC 7519 §4.1.3); `iat` is optional
//! and `nbf`, when present, is honoured. The algorithm is pinned; tokens signed any other way
//! are refused. The scheme is matched case-insensitively (RFC 9110 §11.1). `orderline token`
//! and the tests mint tokens with [`TokenKeys::mint`], the same code the server verifies
//! against.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::{FromRef, FromRequestParts};
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use aggregates::values::CustomerId;

use crate::error::ApiError;

/// Issuer and audience of every orderline token.
pub const ISSUER: &str = "orderline";

/// What a token holder may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Places and cancels their own orders, reads their own data.
    Customer,
    /// Manages the catalog, stock and every order.
    Admin,
    /// Another system: reads inventory.
    Service,
}

impl Role {
    /// The role as spelled in tokens.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Customer => "customer",
            Self::Admin => "admin",
            Self::Service => "service",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "customer" => Ok(Self::Customer),
            "admin" => Ok(Self::Admin),
            "service" => Ok(Self::Service),
            other => Err(format!(
                "unknown role {other:?}; use customer, admin or service"
            )),
        }
    }
}

/// What [`TokenKeys::mint`] writes.
#[derive(Debug, Serialize)]
struct Claims {
    sub: String,
    role: Role,
    exp: u64,
    iat: u64,
    iss: String,
    aud: String,
}

/// What [`TokenKeys::verify`] reads once the signature and the registered claims (`exp`,
/// `nbf`, `iss`, `aud`) were checked by the validation; every other claim is ignored.
#[derive(Debug, Deserialize)]
struct VerifiedClaims {
    sub: String,
    role: Role,
}

/// The verified caller of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Actor {
    /// The token's `sub`: for customers, their customer id.
    pub sub: String,
    /// The token's role.
    pub role: Role,
}

impl Actor {
    /// The principal: role and subject together, as `role:sub`. Whatever a caller owns
    /// (idempotency keys, their stored answers) is scoped by it, so an admin and a customer who
    /// happen to share a `sub` never share anything.
    pub fn principal(&self) -> String {
        format!("{}:{}", self.role, self.sub)
    }
}

/// Why a token could not be minted.
#[derive(Debug, thiserror::Error)]
pub enum MintError {
    /// `sub` is empty, over 255 characters, has control characters or surrounding blanks.
    #[error("sub must be 1-255 characters, with no control characters or surrounding blanks")]
    InvalidSub,
    /// Signing failed (a bug in the key setup).
    #[error("signing failed: {0}")]
    Signing(#[from] jsonwebtoken::errors::Error),
}

/// Keys to mint and verify tokens with one shared HS256 secret.
#[derive(Clone)]
pub struct TokenKeys(Arc<Keys>);

struct Keys {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
}

impl TokenKeys {
    /// Keys for the HS256 secret `secret`.
    pub fn hs256(secret: &[u8]) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_issuer(&[ISSUER]);
        validation.set_audience(&[ISSUER]);
        validation.set_required_spec_claims(&["exp", "sub", "iss", "aud"]);
        validation.validate_nbf = true;
        validation.leeway = 30;
        Self(Arc::new(Keys {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            validation,
        }))
    }

    /// A token for `sub` with `role`, valid for `ttl` from now.
    ///
    /// # Errors
    /// [`MintError::InvalidSub`] for a `sub` that [`TokenKeys::verify`] would refuse.
    pub fn mint(&self, sub: &str, role: Role, ttl: Duration) -> Result<String, MintError> {
        if CustomerId::parse(sub).is_err() {
            return Err(MintError::InvalidSub);
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let claims = Claims {
            sub: sub.to_owned(),
            role,
            iat: now,
            exp: now.saturating_add(ttl.as_secs()),
            iss: ISSUER.to_owned(),
            aud: ISSUER.to_owned(),
        };
        Ok(jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &self.0.encoding,
        )?)
    }

    /// Verifies a token and returns its holder.
    ///
    /// # Errors
    /// [`ApiError::Unauthorized`] for a token that is malformed, expired, not yet valid
    /// (`nbf`), signed with another key or algorithm, for another issuer or audience, or whose
    /// `sub` is not a subject orderline can tell apart from others (see
    /// [`aggregates::values::CustomerId`]: no control characters, no surrounding blanks).
    pub fn verify(&self, token: &str) -> Result<Actor, ApiError> {
        let data =
            jsonwebtoken::decode::<VerifiedClaims>(token, &self.0.decoding, &self.0.validation)
                .map_err(|e| ApiError::Unauthorized(format!("invalid token: {e}")))?;
        let VerifiedClaims { sub, role } = data.claims;
        CustomerId::parse(&sub)
            .map_err(|e| ApiError::Unauthorized(format!("invalid token: sub {e}")))?;
        Ok(Actor { sub, role })
    }
}

impl<S> FromRequestParts<S> for Actor
where
    TokenKeys: FromRef<S>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let header = parts
            .headers
            .get(AUTHORIZATION)
            .ok_or_else(|| ApiError::Unauthorized("a bearer token is required".into()))?;
        let token =
            header.to_str().ok().and_then(bearer_token).ok_or_else(|| {
                ApiError::Unauthorized("use Authorization: Bearer <token>".into())
            })?;
        TokenKeys::from_ref(state).verify(token)
    }
}

/// The token of an `Authorization` value with the `Bearer` scheme in any case, separated from
/// it by blanks (RFC 9110 §11.1 and §11.4).
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim_matches(' ');
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// Declares an extractor that authenticates and checks the role before the body is read, so a
/// caller with the wrong role gets 403 whatever the body holds.
macro_rules! role_extractor {
    ($(#[$doc:meta])* $name:ident, $needs:literal, $($role:ident)|+) => {
        $(#[$doc])*
        pub struct $name(pub Actor);

        impl<S> FromRequestParts<S> for $name
        where
            TokenKeys: FromRef<S>,
            S: Send + Sync,
        {
            type Rejection = ApiError;

            async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
                let actor = Actor::from_request_parts(parts, state).await?;
                match actor.role {
                    $(Role::$role)|+ => Ok(Self(actor)),
                    _ => Err(ApiError::Forbidden($needs)),
                }
            }
        }
    };
}

role_extractor!(
    /// An authenticated admin.
    Admin, "admin", Admin
);
role_extractor!(
    /// An authenticated customer.
    Customer, "customer", Customer
);
role_extractor!(
    /// An authenticated customer or admin (ownership is checked against the resource).
    CustomerOrAdmin, "customer or admin", Customer | Admin
);
role_extractor!(
    /// An authenticated admin or service (stock levels).
    AdminOrService, "admin or service", Admin | Service
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_minted_token_verifies_with_the_same_secret_only() {
        let keys = TokenKeys::hs256(b"secret-one");
        let token = keys
            .mint("alice", Role::Customer, Duration::from_secs(60))
            .unwrap();
        assert_eq!(
            keys.verify(&token).unwrap(),
            Actor {
                sub: "alice".into(),
                role: Role::Customer
            }
        );
        assert!(TokenKeys::hs256(b"secret-two").verify(&token).is_err());
    }

    #[test]
    fn an_expired_token_is_refused() {
        let keys = TokenKeys::hs256(b"s");
        let token = keys.mint("a", Role::Admin, Duration::ZERO).unwrap();
        // Expired now, but within the leeway; a token a minute old is outside it.
        let mut claims: serde_json::Value = serde_json::json!({
            "sub": "a", "role": "admin", "iat": 0, "exp": 1, "iss": ISSUER, "aud": ISSUER
        });
        let old = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(b"s"),
        )
        .unwrap();
        assert!(keys.verify(&old).is_err());
        assert!(keys.verify(&token).is_ok());
        claims["aud"] = "someone-else".into();
        let foreign = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(b"s"),
        )
        .unwrap();
        assert!(keys.verify(&foreign).is_err());
    }

    #[test]
    fn another_algorithm_is_refused() {
        let keys = TokenKeys::hs256(b"s");
        let claims = serde_json::json!({
            "sub": "a", "role": "admin", "iat": 0, "exp": u64::MAX / 2, "iss": ISSUER, "aud": ISSUER
        });
        let hs512 = jsonwebtoken::encode(
            &Header::new(Algorithm::HS512),
            &claims,
            &EncodingKey::from_secret(b"s"),
        )
        .unwrap();
        assert!(keys.verify(&hs512).is_err());
    }

    fn signed(claims: &serde_json::Value) -> String {
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            claims,
            &EncodingKey::from_secret(b"s"),
        )
        .unwrap()
    }

    fn far() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 3600
    }

    #[test]
    fn iat_is_optional_and_aud_may_be_an_array_holding_orderline() {
        let keys = TokenKeys::hs256(b"s");
        let base = serde_json::json!({
            "sub": "a", "role": "customer", "exp": far(), "iss": ISSUER, "aud": ISSUER
        });
        assert!(keys.verify(&signed(&base)).is_ok(), "no iat");
        let mut listed = base;
        listed["aud"] = serde_json::json!(["shop", ISSUER]);
        assert!(keys.verify(&signed(&listed)).is_ok(), "aud array");
        listed["aud"] = serde_json::json!(["shop"]);
        assert!(
            keys.verify(&signed(&listed)).is_err(),
            "aud array without us"
        );
    }

    #[test]
    fn a_token_not_yet_valid_is_refused() {
        let keys = TokenKeys::hs256(b"s");
        let claims = serde_json::json!({
            "sub": "a", "role": "customer", "exp": far() + 7200, "nbf": far(),
            "iss": ISSUER, "aud": ISSUER
        });
        assert!(keys.verify(&signed(&claims)).is_err());
    }

    #[test]
    fn subjects_with_blanks_around_or_control_characters_are_refused() {
        let keys = TokenKeys::hs256(b"s");
        for sub in ["alice ", " alice", "al\u{0}ice", "a\nb", ""] {
            let claims = serde_json::json!({
                "sub": sub, "role": "customer", "exp": far(), "iss": ISSUER, "aud": ISSUER
            });
            assert!(keys.verify(&signed(&claims)).is_err(), "{sub:?}");
            assert!(keys
                .mint(sub, Role::Customer, Duration::from_secs(9))
                .is_err());
        }
    }

    #[test]
    fn the_bearer_scheme_is_case_insensitive() {
        assert_eq!(bearer_token("Bearer abc"), Some("abc"));
        assert_eq!(bearer_token("bearer abc"), Some("abc"));
        assert_eq!(bearer_token("BEARER  abc "), Some("abc"));
        assert_eq!(bearer_token("Basic abc"), None);
        assert_eq!(bearer_token("Bearer "), None);
        assert_eq!(bearer_token("Bearerabc"), None);
    }
}
