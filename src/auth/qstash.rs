//! Verification of QStash's `Upstash-Signature` on the `/sync-engine` webhook.
//!
//! QStash signs every delivery with a JWT (HS256, keyed by the UTF-8 bytes of a signing
//! key) whose claims name the issuer (`"Upstash"`), the URL it called (`sub`), a validity
//! window (`nbf`, `exp`) and the SHA-256 of the raw body (`body`, base64url). Keys are
//! rotated by publishing a "next" key first, so a token is accepted if it verifies with
//! the current key or, failing that, the next one.
//!
//! Verification works on the raw bytes, before any JSON parsing, and its only output is a
//! [`VerifiedBody`]: code that needs a verified request cannot be handed anything else.

use std::time::Duration;

use axum::body::Bytes;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The header QStash puts its token in.
pub const SIGNATURE_HEADER: &str = "Upstash-Signature";

/// Why a delivery was not accepted. Every variant answers 401; the distinction is for
/// logs and tests.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("the Upstash-Signature header is missing")]
    Missing,
    #[error("the Upstash-Signature header is not a well-formed JWT")]
    Malformed,
    #[error("the signature matches neither signing key")]
    BadSignature,
    #[error("the token was not issued by Upstash")]
    WrongIssuer,
    #[error("the token was issued for another URL")]
    WrongSubject,
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet")]
    NotYetValid,
    #[error("the token lacks the {0} claim")]
    MissingClaim(String),
    #[error("the body does not match the token's body hash")]
    BodyMismatch,
}

/// A request body whose signature checked out. Only [`Verifier::verify`] makes one.
#[derive(Debug)]
pub struct VerifiedBody(Bytes);

impl VerifiedBody {
    pub fn bytes(&self) -> &[u8] {
        &self.0
    }
}

/// The claims this service relies on; `iss`, `sub`, `exp` and `nbf` are checked by
/// [`jsonwebtoken`] itself.
#[derive(Deserialize)]
struct Claims {
    body: String,
}

/// Checks signatures for one URL with the configured keys.
pub struct Verifier {
    keys: Vec<DecodingKey>,
    validation: Validation,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("keys", &self.keys.len())
            .field("subject", &self.validation.sub)
            .finish()
    }
}

impl Verifier {
    /// A verifier for deliveries to `url`, or `None` when no signing key is configured
    /// (the webhook then refuses everything).
    pub fn new(
        current_key: Option<&SecretString>,
        next_key: Option<&SecretString>,
        url: &str,
        clock_tolerance: Duration,
    ) -> Option<Self> {
        let keys: Vec<DecodingKey> = [current_key, next_key]
            .into_iter()
            .flatten()
            .map(|key| DecodingKey::from_secret(key.expose_secret().as_bytes()))
            .collect();
        if keys.is_empty() {
            return None;
        }
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_issuer(&["Upstash"]);
        validation.sub = Some(url.to_owned());
        validation.set_required_spec_claims(&["exp", "nbf", "iss", "sub"]);
        validation.validate_nbf = true;
        validation.validate_aud = false;
        validation.leeway = clock_tolerance.as_secs();
        Some(Self { keys, validation })
    }

    /// Verifies `token` (the header's value, if any) against `body`.
    pub fn verify(&self, token: Option<&str>, body: Bytes) -> Result<VerifiedBody, SignatureError> {
        let token = token.map(str::trim).filter(|token| !token.is_empty());
        let token = token.ok_or(SignatureError::Missing)?;
        let claims = self.decode(token)?;
        let expected = URL_SAFE_NO_PAD.encode(Sha256::digest(&body));
        let claimed = claims.body.trim_end_matches('=');
        if bool::from(claimed.as_bytes().ct_eq(expected.as_bytes())) {
            Ok(VerifiedBody(body))
        } else {
            Err(SignatureError::BodyMismatch)
        }
    }

    /// Tries each key in turn. A token whose signature matched a key but whose claims are
    /// wrong is rejected with that reason; only a signature mismatch moves on to the
    /// next key.
    fn decode(&self, token: &str) -> Result<Claims, SignatureError> {
        let mut outcome = Err(SignatureError::BadSignature);
        for key in &self.keys {
            outcome = jsonwebtoken::decode::<Claims>(token, key, &self.validation)
                .map(|data| data.claims)
                .map_err(|error| classify(error.kind()));
            if !matches!(outcome, Err(SignatureError::BadSignature)) {
                break;
            }
        }
        outcome
    }
}

fn classify(kind: &ErrorKind) -> SignatureError {
    match kind {
        ErrorKind::InvalidSignature | ErrorKind::InvalidAlgorithm => SignatureError::BadSignature,
        ErrorKind::InvalidIssuer => SignatureError::WrongIssuer,
        ErrorKind::InvalidSubject => SignatureError::WrongSubject,
        ErrorKind::ExpiredSignature => SignatureError::Expired,
        ErrorKind::ImmatureSignature => SignatureError::NotYetValid,
        ErrorKind::MissingRequiredClaim(claim) => SignatureError::MissingClaim(claim.clone()),
        _ => SignatureError::Malformed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header};
    use serde_json::{json, Value};

    const URL: &str = "https://sync.example.com/api/latest/internal/external-db-sync/sync-engine";
    const CURRENT: &str = "sig_current_key_1234";
    const NEXT: &str = "sig_next_key_5678";
    const BODY: &[u8] = br#"{"tenancyId":"7f1c2c5e-93c4-4c55-a0cf-3d0c7b1c1f10"}"#;

    fn now() -> i64 {
        chrono::Utc::now().timestamp()
    }

    fn verifier() -> Verifier {
        Verifier::new(
            Some(&SecretString::from(CURRENT)),
            Some(&SecretString::from(NEXT)),
            URL,
            Duration::from_secs(5),
        )
        .unwrap()
    }

    /// Claims as QStash writes them.
    fn claims(body: &[u8]) -> Value {
        json!({
            "iss": "Upstash",
            "sub": URL,
            "exp": now() + 300,
            "nbf": now(),
            "iat": now(),
            "jti": "jwt_1",
            "body": URL_SAFE_NO_PAD.encode(Sha256::digest(body)),
        })
    }

    fn sign(claims: &Value, key: &str) -> String {
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            claims,
            &EncodingKey::from_secret(key.as_bytes()),
        )
        .unwrap()
    }

    fn verify(claims: &Value, key: &str) -> Result<VerifiedBody, SignatureError> {
        verifier().verify(Some(&sign(claims, key)), Bytes::from_static(BODY))
    }

    fn with(mut claims: Value, field: &str, value: Value) -> Value {
        claims[field] = value;
        claims
    }

    #[test]
    fn accepts_the_current_key() {
        let verified = verify(&claims(BODY), CURRENT).unwrap();
        assert_eq!(verified.bytes(), BODY);
    }

    #[test]
    fn accepts_the_next_key() {
        assert!(verify(&claims(BODY), NEXT).is_ok());
    }

    #[test]
    fn accepts_a_padded_body_hash() {
        let padded = format!("{}=", URL_SAFE_NO_PAD.encode(Sha256::digest(BODY)));
        assert!(verify(&with(claims(BODY), "body", json!(padded)), CURRENT).is_ok());
    }

    #[test]
    fn rejects_another_key() {
        let error = verify(&claims(BODY), "some_other_key").unwrap_err();
        assert_eq!(error, SignatureError::BadSignature);
    }

    #[test]
    fn rejects_a_tampered_body() {
        let token = sign(&claims(BODY), CURRENT);
        let tampered =
            Bytes::from_static(br#"{"tenancyId":"00000000-0000-0000-0000-000000000000"}"#);
        let error = verifier().verify(Some(&token), tampered).unwrap_err();
        assert_eq!(error, SignatureError::BodyMismatch);
    }

    #[test]
    fn rejects_another_subject() {
        let claims = with(claims(BODY), "sub", json!("https://evil.example.com/hook"));
        assert_eq!(
            verify(&claims, CURRENT).unwrap_err(),
            SignatureError::WrongSubject
        );
    }

    #[test]
    fn rejects_another_issuer() {
        let claims = with(claims(BODY), "iss", json!("NotUpstash"));
        assert_eq!(
            verify(&claims, CURRENT).unwrap_err(),
            SignatureError::WrongIssuer
        );
    }

    #[test]
    fn rejects_an_expired_token_beyond_the_tolerance() {
        let claims = with(claims(BODY), "exp", json!(now() - 60));
        assert_eq!(
            verify(&claims, CURRENT).unwrap_err(),
            SignatureError::Expired
        );
        let just_expired = with(self::claims(BODY), "exp", json!(now() - 2));
        assert!(
            verify(&just_expired, CURRENT).is_ok(),
            "within the tolerance"
        );
    }

    #[test]
    fn rejects_a_token_that_is_not_valid_yet() {
        let claims = with(claims(BODY), "nbf", json!(now() + 60));
        assert_eq!(
            verify(&claims, CURRENT).unwrap_err(),
            SignatureError::NotYetValid
        );
    }

    #[test]
    fn rejects_a_token_without_a_body_claim() {
        let mut claims = claims(BODY);
        claims.as_object_mut().unwrap().remove("body");
        assert_eq!(
            verify(&claims, CURRENT).unwrap_err(),
            SignatureError::Malformed
        );
    }

    #[test]
    fn rejects_a_token_without_exp() {
        let mut claims = claims(BODY);
        claims.as_object_mut().unwrap().remove("exp");
        assert_eq!(
            verify(&claims, CURRENT).unwrap_err(),
            SignatureError::MissingClaim("exp".to_owned())
        );
    }

    #[test]
    fn rejects_a_missing_or_garbage_header() {
        let body = || Bytes::from_static(BODY);
        assert_eq!(
            verifier().verify(None, body()).unwrap_err(),
            SignatureError::Missing
        );
        assert_eq!(
            verifier().verify(Some("  "), body()).unwrap_err(),
            SignatureError::Missing
        );
        assert_eq!(
            verifier().verify(Some("not-a-jwt"), body()).unwrap_err(),
            SignatureError::Malformed
        );
    }

    #[test]
    fn rejects_other_algorithms() {
        let token = jsonwebtoken::encode(
            &Header::new(Algorithm::HS512),
            &claims(BODY),
            &EncodingKey::from_secret(CURRENT.as_bytes()),
        )
        .unwrap();
        let error = verifier()
            .verify(Some(&token), Bytes::from_static(BODY))
            .unwrap_err();
        assert_eq!(error, SignatureError::BadSignature);
    }

    #[test]
    fn no_keys_means_no_verifier() {
        assert!(Verifier::new(None, None, URL, Duration::ZERO).is_none());
        let only_next = SecretString::from(NEXT);
        assert!(Verifier::new(None, Some(&only_next), URL, Duration::ZERO).is_some());
    }
}

/// Properties over arbitrary deliveries (`proptest`, a bounded number of cases).
#[cfg(test)]
mod properties {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header};
    use proptest::prelude::*;

    const URL: &str = "https://sync.example.com/api/latest/internal/external-db-sync/sync-engine";
    const KEY: &str = "sig_current_key_1234";

    fn verifier() -> Verifier {
        Verifier::new(
            Some(&SecretString::from(KEY)),
            None,
            URL,
            Duration::from_secs(5),
        )
        .unwrap()
    }

    fn signed(body: &[u8]) -> String {
        let now = chrono::Utc::now().timestamp();
        let claims = serde_json::json!({
            "iss": "Upstash", "sub": URL, "exp": now + 300, "nbf": now,
            "body": URL_SAFE_NO_PAD.encode(Sha256::digest(body)),
        });
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(KEY.as_bytes()),
        )
        .unwrap()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Any header value and body: refused with one of the documented reasons,
        /// never a panic, never accepted.
        #[test]
        fn an_arbitrary_signature_is_refused(
            token in prop_oneof![
                "\\PC{0,300}",
                "[A-Za-z0-9_-]{1,40}\\.[A-Za-z0-9_-]{1,80}\\.[A-Za-z0-9_-]{0,60}",
            ],
            body in prop::collection::vec(any::<u8>(), 0..256),
        ) {
            prop_assert!(verifier().verify(Some(&token), Bytes::from(body)).is_err());
        }

        /// A genuine signature accepts exactly its own body: one changed byte is a
        /// body mismatch.
        #[test]
        fn a_signature_covers_every_byte_of_its_body(
            body in prop::collection::vec(any::<u8>(), 1..256),
            at in any::<prop::sample::Index>(),
            flip in 1u8..=255,
        ) {
            let token = signed(&body);
            prop_assert!(verifier().verify(Some(&token), Bytes::from(body.clone())).is_ok());
            let mut changed = body;
            let at = at.index(changed.len());
            changed[at] ^= flip;
            prop_assert!(matches!(
                verifier().verify(Some(&token), Bytes::from(changed)),
                Err(SignatureError::BodyMismatch)
            ));
        }
    }
}
