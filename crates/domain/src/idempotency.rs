//! The `Idempotency-Key` request header (draft-ietf-httpapi-idempotency-key-header): what a key
//! may be, and the fingerprint that tells whether a repeat is the same request.
//!
//! The draft makes the value a Structured Field String (RFC 8941: `"…"`, with `\"` and `\\` as
//! the only escapes); most clients send a bare value instead (a UUID, say), so both are taken. A
//! key is at most [`MAX_KEY_LENGTH`] printable ASCII characters: it is stored with its claim, and
//! anything longer or stranger is a client bug better refused (400) than stored.

use sha2::{Digest, Sha256};

/// Longest key taken, in characters (all ASCII).
pub const MAX_KEY_LENGTH: usize = 255;

/// The key in a header value: the content of a quoted string, or the value as sent.
pub fn parse_key(value: &[u8]) -> Result<String, String> {
    let refused = || {
        format!(
            "Idempotency-Key must be 1 to {MAX_KEY_LENGTH} printable ASCII characters, bare or \
             as a quoted string"
        )
    };
    let key = match value {
        [b'"', quoted @ .., b'"'] => unquote(quoted).ok_or_else(refused)?,
        bare if bare.iter().all(|b| (0x21..=0x7e).contains(b)) && !bare.starts_with(b"\"") => {
            bare.to_vec()
        }
        _ => return Err(refused()),
    };
    if key.is_empty() || key.len() > MAX_KEY_LENGTH {
        return Err(refused());
    }
    String::from_utf8(key).map_err(|_| refused())
}

/// The content of an RFC 8941 String between its quotes: visible ASCII and space, `"` and `\`
/// only escaped.
fn unquote(quoted: &[u8]) -> Option<Vec<u8>> {
    let mut key = Vec::with_capacity(quoted.len());
    let mut bytes = quoted.iter();
    while let Some(&byte) = bytes.next() {
        match byte {
            b'\\' => match bytes.next() {
                Some(&escaped @ (b'"' | b'\\')) => key.push(escaped),
                _ => return None,
            },
            b'"' => return None,
            0x20..=0x7e => key.push(byte),
            _ => return None,
        }
    }
    Some(key)
}

/// SHA-256 (hex) of the route's path and the body as the client sent them: one key names one
/// request, and a repeat is the same request only if both are byte for byte the same. A path
/// holds no NUL byte, so the two parts cannot run into each other.
pub fn fingerprint(path: &str, body: &[u8]) -> String {
    let mut digest = Sha256::new();
    digest.update(path.as_bytes());
    digest.update([0]);
    digest.update(body);
    hex::encode(digest.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_bare_and_quoted_keys() {
        let uuid = "8e03978e-40d5-43e8-bc93-6894a57f9324";
        assert_eq!(parse_key(uuid.as_bytes()).unwrap(), uuid);
        assert_eq!(parse_key(format!("\"{uuid}\"").as_bytes()).unwrap(), uuid);
        assert_eq!(parse_key(br#""a b \"c\" \\d""#).unwrap(), r#"a b "c" \d"#);
        let longest = "k".repeat(MAX_KEY_LENGTH);
        assert_eq!(parse_key(longest.as_bytes()).unwrap(), longest);
    }

    #[test]
    fn refuses_what_is_no_key() {
        let too_long = "k".repeat(MAX_KEY_LENGTH + 1);
        for value in [
            &b""[..],
            b"\"\"",
            b"\"",
            b"\"unclosed",
            b"two words",
            b"tab\there",
            b"caf\xc3\xa9",
            b"\x7f",
            br#""bad \x escape""#,
            br#""inner " quote""#,
            too_long.as_bytes(),
            format!("\"{too_long}\"").as_bytes(),
        ] {
            let refused = parse_key(value);
            assert!(
                refused
                    .as_ref()
                    .is_err_and(|e| e.starts_with("Idempotency-Key must be 1 to 255")),
                "{:?}: {refused:?}",
                String::from_utf8_lossy(value)
            );
        }
    }

    #[test]
    fn the_fingerprint_tells_route_and_body_apart() {
        let image = fingerprint("/api/image/gen", br#"{"prompt":"a"}"#);
        assert_eq!(image, fingerprint("/api/image/gen", br#"{"prompt":"a"}"#));
        assert_eq!(image.len(), 64);
        assert_ne!(image, fingerprint("/api/sora2/gen", br#"{"prompt":"a"}"#));
        assert_ne!(image, fingerprint("/api/image/gen", br#"{"prompt": "a"}"#));
        assert_ne!(
            fingerprint("/a", b"b/c"),
            fingerprint("/ab", b"/c"),
            "where the path ends is part of it"
        );
    }
}
