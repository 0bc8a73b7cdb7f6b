//! Team keys: random, shown once, stored by the gateway only as their SHA-256 digest.

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

/// The line to paste into a team's `keys` list.
pub fn config_line(key: &str, label: &str) -> String {
    format!(
        "{{ sha256 = \"{}\", label = \"{}\" }}",
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
        let line = config_line(&a, "design-prod");
        assert!(!line.contains(&a[PREFIX.len()..]));
        assert!(line.contains(&KeyDigest::of(&a).to_hex()));
        assert!(line.ends_with("label = \"design-prod\" }"));
    }
}
