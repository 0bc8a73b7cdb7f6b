//! Webhooks, both ways.
//!
//! Inbound: with `server.public_url` set, a generation's `callback_url` is swapped for the
//! gateway's own `{public_url}/callbacks/{token}` (see `routes::callbacks`), so the upstream's
//! callback, once a status read upstream confirms it, settles the task's credits without any
//! polling. Outbound: the task's confirmed state is then delivered to the team's own URL from a
//! durable outbox in the ledger (`delivery`), signed the
//! Standard Webhooks way (`signing`), and only to addresses the team may reach (`target`).
//! Finished deliveries are deleted once they have been kept long enough (`retention`). Budget
//! notifications (`notices`) go through the same outbox, signing and guard.

pub mod delivery;
pub mod notices;
pub mod retention;
pub mod signing;
pub mod target;

use rand::Rng;
use sha2::{Digest, Sha256};

/// A fresh, unguessable callback token (256 bits, URL-safe) and the digest the ledger keeps.
pub fn new_callback_token() -> (String, String) {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    let token = hex::encode(bytes);
    let digest = token_digest(&token);
    (token, digest)
}

/// What the ledger stores in place of a callback token.
pub fn token_digest(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}
