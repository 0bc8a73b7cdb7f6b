//! Signatures on deliveries, as the Standard Webhooks specification defines them, so teams can
//! verify with any of its libraries: `webhook-signature: v1,<base64 HMAC-SHA256>` over
//! `{webhook-id}.{webhook-timestamp}.{body}`, keyed with the bytes of a `whsec_<base64>` secret.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, KeyInit, Mac};
use rand::Rng;
use sha2::Sha256;

use ketchup_domain::config::Secret;

const PREFIX: &str = "whsec_";
/// The specification asks for 24 to 64 random bytes.
const MIN_KEY_BYTES: usize = 24;

/// A team's decoded signing key.
pub struct SigningKey(Vec<u8>);

impl SigningKey {
    pub fn from_secret(secret: &Secret) -> Result<SigningKey, String> {
        let encoded = secret.expose().strip_prefix(PREFIX).ok_or_else(|| {
            format!("must look like {PREFIX}<base64>, as `ketchup-gateway keygen --webhook-secret` prints")
        })?;
        let key = STANDARD
            .decode(encoded)
            .map_err(|_| format!("the part after {PREFIX} is not base64"))?;
        if key.len() < MIN_KEY_BYTES {
            return Err(format!(
                "holds {} bytes; use at least {MIN_KEY_BYTES} random bytes",
                key.len()
            ));
        }
        Ok(SigningKey(key))
    }

    /// The `webhook-signature` header value for one attempt.
    pub fn sign(&self, id: &str, timestamp: i64, body: &[u8]) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes keys of any size");
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
    }
}

/// Proves every team's webhook secret can be read and used, so a bad one fails start or reload
/// with the team's name instead of failing deliveries later.
pub fn check_team_secrets(config: &ketchup_domain::config::Config) -> Result<(), String> {
    for team in &config.teams {
        if let Some(source) = &team.webhook_secret {
            source
                .resolve("webhook secret")
                .map_err(|e| e.to_string())
                .and_then(|secret| SigningKey::from_secret(&secret))
                .map_err(|e| format!("team {:?}: webhook secret {e}", team.name))?;
        }
    }
    Ok(())
}

/// A new random secret in the `whsec_` form.
pub fn new_secret() -> String {
    let mut key = [0u8; 32];
    rand::rng().fill_bytes(&mut key);
    format!("{PREFIX}{}", STANDARD.encode(key))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_verify_with_the_reference_library() {
        let secret = new_secret();
        let key = SigningKey::from_secret(&Secret::new(secret.clone())).unwrap();
        let body = br#"{"task_id":"ta-1","consumed":"0.500000"}"#;
        let timestamp = chrono::Utc::now().timestamp();
        let signature = key.sign("msg_1", timestamp, body);

        let mut headers = http::HeaderMap::new();
        headers.insert("webhook-id", "msg_1".parse().unwrap());
        headers.insert("webhook-timestamp", timestamp.to_string().parse().unwrap());
        headers.insert("webhook-signature", signature.parse().unwrap());
        let verifier = standardwebhooks::Webhook::new(&secret).unwrap();
        verifier.verify(body, &headers).expect("signature verifies");

        // One changed byte, or another id, and it no longer does.
        let mut tampered = body.to_vec();
        tampered[3] ^= 1;
        assert!(verifier.verify(&tampered, &headers).is_err());
        headers.insert("webhook-id", "msg_2".parse().unwrap());
        assert!(verifier.verify(body, &headers).is_err());
    }

    #[test]
    fn malformed_secrets_are_refused_with_a_reason() {
        let refused = |text: &str| {
            SigningKey::from_secret(&Secret::new(text))
                .err()
                .expect("refused")
        };
        assert!(refused("hunter2").contains("whsec_"));
        assert!(refused("whsec_***").contains("not base64"));
        assert!(refused("whsec_c2hvcnQ=").contains("at least 24"));
        assert!(
            !refused("whsec_c2hvcnQ=").contains("c2hvcnQ"),
            "never echoes the secret"
        );
    }
}
