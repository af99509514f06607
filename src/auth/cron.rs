//! Bearer authentication of the cron routes (`/sequencer`, `/poller`, `/fusebox`).

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use secrecy::ExposeSecret;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::routes::AppError;
use crate::routes::AppState;

/// Proof that the request carried `Authorization: Bearer {CRON_SECRET}`. Handlers that
/// take it as an argument cannot run for an unauthenticated request.
#[derive(Debug)]
pub struct CronAuth;

impl FromRequestParts<AppState> for CronAuth {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, AppError> {
        let token = parts
            .headers
            .get(AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(bearer_token)
            .ok_or(AppError::Unauthorized)?;
        if secrets_match(token, state.cron_secret.expose_secret()) {
            Ok(CronAuth)
        } else {
            Err(AppError::Unauthorized)
        }
    }
}

/// The token of an `Authorization` value whose scheme is `Bearer`, in any letter case.
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// Compares in constant time. Hashing first makes both sides the same length, so the
/// comparison reveals neither the secret's content nor its length.
fn secrets_match(given: &str, expected: &str) -> bool {
    let given = Sha256::digest(given.as_bytes());
    let expected = Sha256::digest(expected.as_bytes());
    given.ct_eq(&expected).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_scheme_is_case_insensitive() {
        assert_eq!(bearer_token("Bearer abc"), Some("abc"));
        assert_eq!(bearer_token("bearer abc"), Some("abc"));
        assert_eq!(bearer_token("BEARER  abc "), Some("abc"));
    }

    #[test]
    fn other_schemes_and_empty_tokens_are_rejected() {
        assert_eq!(bearer_token("Basic abc"), None);
        assert_eq!(bearer_token("Bearer"), None);
        assert_eq!(bearer_token("Bearer   "), None);
        assert_eq!(bearer_token("abc"), None);
    }

    #[test]
    fn secrets_are_compared_exactly() {
        assert!(secrets_match("s3cret-value", "s3cret-value"));
        assert!(!secrets_match("s3cret-valuE", "s3cret-value"));
        assert!(!secrets_match("s3cret-value-longer", "s3cret-value"));
        assert!(!secrets_match("", "s3cret-value"));
    }
}
