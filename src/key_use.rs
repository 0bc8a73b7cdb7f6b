//! Team keys as operators watch them: when each was last used, when it expires, and how often one
//! was presented outside its validity window. The last use lives in memory (a replica knows its
//! own callers; the alert joins every replica's series), one slot per configured key, so its size
//! is bounded by the configuration.

use std::sync::atomic::{AtomicI64, Ordering};

use chrono::{DateTime, Utc};
use dashmap::DashMap;
use nohash_hasher::BuildNoHashHasher;
use prometheus::{IntCounterVec, IntGaugeVec, Opts, Registry};

use ketchup_domain::config::{Config, KeyDigest, KeyEntry, KeyWindow};

pub struct KeyUse {
    last_used: DashMap<KeyDigest, AtomicI64, BuildNoHashHasher<KeyDigest>>,
    expiry: IntGaugeVec,
    last_used_gauge: IntGaugeVec,
    refusals: IntCounterVec,
}

impl KeyUse {
    pub fn register(registry: &Registry) -> Self {
        let opts = |name: &str, help: &str| Opts::new(name, help).namespace("ketchup_gateway");
        let labels = &["team", "key"];
        let key_use = KeyUse {
            last_used: DashMap::default(),
            expiry: IntGaugeVec::new(
                opts(
                    "key_expiry_timestamp_seconds",
                    "When a team key stops being valid (its expires_at), for keys that have one.",
                ),
                labels,
            )
            .expect("valid metric"),
            last_used_gauge: IntGaugeVec::new(
                opts(
                    "key_last_used_timestamp_seconds",
                    "When a team key last authenticated a request on this replica.",
                ),
                labels,
            )
            .expect("valid metric"),
            refusals: IntCounterVec::new(
                opts(
                    "key_refusals_total",
                    "Requests refused because their key is outside its validity window.",
                ),
                &["team", "key", "reason"],
            )
            .expect("valid metric"),
        };
        for metric in [&key_use.expiry, &key_use.last_used_gauge] {
            registry
                .register(Box::new(metric.clone()))
                .expect("registered once");
        }
        registry
            .register(Box::new(key_use.refusals.clone()))
            .expect("registered once");
        key_use
    }

    /// Notes that a valid key was used. Written only when the second changes, so a busy key's
    /// callers do not all write the same cache line.
    pub fn used(&self, digest: &KeyDigest, now: DateTime<Utc>) {
        let second = now.timestamp();
        if let Some(slot) = self.last_used.get(digest) {
            if slot.load(Ordering::Relaxed) != second {
                slot.store(second, Ordering::Relaxed);
            }
            return;
        }
        self.last_used.insert(*digest, AtomicI64::new(second));
    }

    pub fn refused(&self, digest: &KeyDigest, entry: &KeyEntry, window: KeyWindow) {
        self.refusals
            .with_label_values(&[
                entry.team.name.as_str(),
                &entry.name(digest),
                window.as_str(),
            ])
            .inc();
    }

    /// Sets the gauges from the configuration and the uses seen, at scrape time. Keys a reload
    /// removed lose their series and their slot.
    pub fn refresh(&self, config: &Config) {
        self.last_used
            .retain(|digest, _| config.key_by_digest(digest).is_some());
        self.expiry.reset();
        self.last_used_gauge.reset();
        for (digest, entry) in config.key_entries() {
            let labels = [entry.team.name.as_str(), &entry.name(digest)];
            if let Some(end) = entry.expires_at {
                self.expiry.with_label_values(&labels).set(end.timestamp());
            }
            if let Some(slot) = self.last_used.get(digest) {
                self.last_used_gauge
                    .with_label_values(&labels)
                    .set(slot.load(Ordering::Relaxed));
            }
        }
    }
}
