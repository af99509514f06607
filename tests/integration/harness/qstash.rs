//! Signing webhook deliveries the way QStash does: an HS256 JWT over claims naming the
//! issuer, the called URL, a validity window and the body's SHA-256 (base64url).
//! Written independently of the service's verifier, from QStash's documentation, so the
//! two check each other.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

pub const CURRENT_SIGNING_KEY: &str = "sig_test_current_3f9a1c";
pub const NEXT_SIGNING_KEY: &str = "sig_test_next_7b2e4d";

/// The claims QStash puts in a token for a delivery of `body` to `url`.
pub fn claims(url: &str, body: &[u8]) -> Value {
    let now = chrono::Utc::now().timestamp();
    json!({
        "iss": "Upstash",
        "sub": url,
        "exp": now + 300,
        "nbf": now,
        "iat": now,
        "jti": format!("jwt_{}", uuid::Uuid::new_v4().simple()),
        "body": URL_SAFE_NO_PAD.encode(Sha256::digest(body)),
    })
}

/// The `Upstash-Signature` value for `claims`, signed with `key`.
pub fn sign(claims: &Value, key: &str) -> String {
    let mut header = Header::new(Algorithm::HS256);
    header.typ = Some("JWT".to_owned());
    jsonwebtoken::encode(&header, claims, &EncodingKey::from_secret(key.as_bytes())).unwrap()
}
