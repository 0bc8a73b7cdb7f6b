//! Team keys: random, shown once, stored by the gateway only as their SHA-256 digest.

use chrono::{DateTime, SecondsFormat, Utc};
use rand::Rng;

use ketchup_domain::config::KeyDigest;

/// Prefix that makes a leaked key recognisable to secret scanners.
const PREFIX: &str = "kgw_";

/// A new key with 256 bits from the operating system's CSPRNG.
pub fn new_key() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    format!("{PREFIX}{}", hex::encode(bytes))
}

/// The line to paste into a team's `keys` list, with the key's end of validity if it has one.
pub fn config_line(key: &str, label: &str, expires_at: Option<DateTime<Utc>>) -> String {
    let expiry = expires_at
        .map(|at| {
            format!(
                ", expires_at = \"{}\"",
                at.to_rfc3339_opts(SecondsFormat::Secs, true)
            )
        })
        .unwrap_or_default();
    format!(
        "{{ sha256 = \"{}\", label = \"{}\"{expiry} }}",
        KeyDigest::of(key).to_hex(),
        label.replace(['"', '\\'], "")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_fresh_and_their_line_holds_only_the_digest() {
        let (a, b) = (new_key(), new_key());
        assert_ne!(a, b);
        assert_eq!(a.len(), PREFIX.len() + 64);
        let line = config_line(&a, "design-prod", None);
        assert!(!line.contains(&a[PREFIX.len()..]));
        assert!(line.contains(&KeyDigest::of(&a).to_hex()));
        assert!(line.ends_with("label = \"design-prod\" }"));
    }

    #[test]
    fn a_key_that_expires_says_when_in_rfc_3339() {
        let at = DateTime::parse_from_rfc3339("2027-01-01T12:30:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let line = config_line(&new_key(), "contractor", Some(at));
        assert!(
            line.ends_with("label = \"contractor\", expires_at = \"2027-01-01T12:30:00Z\" }"),
            "{line}"
        );
    }
}
