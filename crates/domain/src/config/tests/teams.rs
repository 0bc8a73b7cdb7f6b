//! Keys with a validity window, and the models a team may use.

use chrono::{TimeZone, Utc};

use super::{MINIMAL, error_of, parse};
use crate::config::KeyWindow;

const KEY: &str = "c3ab8ff13720e8ad9047dd39466b3c8974e592c2fa383d4a3960714caef0c4f2";

/// [`MINIMAL`] with the design team's key written as `key`.
fn with_key(key: &str) -> String {
    MINIMAL.replace(
        &format!("keys = [{{ sha256 = \"{KEY}\", label = \"prod\" }}]"),
        &format!("keys = [{key}]"),
    )
}

#[test]
fn a_key_is_valid_from_not_before_until_just_before_expires_at() {
    let config = parse(&with_key(&format!(
        "{{ sha256 = \"{KEY}\", label = \"contractor\", not_before = \"2026-12-01T00:00:00Z\", \
         expires_at = \"2027-01-01T09:00:00+09:00\" }}"
    )))
    .unwrap();
    // The key hashed in KEY is "foobar".
    let entry = config.key("foobar").unwrap();
    let at = |y, m, d, h, min, s| Utc.with_ymd_and_hms(y, m, d, h, min, s).unwrap();
    assert_eq!(
        entry.window_at(at(2026, 11, 30, 23, 59, 59)),
        KeyWindow::NotYetValid
    );
    assert_eq!(entry.window_at(at(2026, 12, 1, 0, 0, 0)), KeyWindow::Valid);
    assert_eq!(
        entry.window_at(at(2026, 12, 31, 23, 59, 59)),
        KeyWindow::Valid
    );
    // Offsets are honoured: 09:00 in +09:00 is midnight UTC.
    assert_eq!(entry.window_at(at(2027, 1, 1, 0, 0, 0)), KeyWindow::Expired);
}

#[test]
fn a_key_without_a_window_is_always_valid() {
    let config = parse(MINIMAL).unwrap();
    let entry = config.key("foobar").unwrap();
    assert_eq!(entry.window_at(Utc::now()), KeyWindow::Valid);
    assert_eq!((entry.not_before, entry.expires_at), (None, None));
}

#[test]
fn a_window_that_is_not_an_instant_or_is_empty_is_refused_where_written() {
    let cases = [
        (
            with_key(&format!(
                "{{ sha256 = \"{KEY}\", expires_at = \"next friday\" }}"
            )),
            "\"next friday\" is not an RFC 3339 instant",
        ),
        (
            with_key(&format!(
                "{{ sha256 = \"{KEY}\", expires_at = \"2027-01-01T00:00:00\" }}"
            )),
            "is not an RFC 3339 instant",
        ),
        (
            with_key(&format!(
                "{{ sha256 = \"{KEY}\", not_before = \"2027-01-01T00:00:00Z\", \
                 expires_at = \"2027-01-01T00:00:00Z\" }}"
            )),
            "[[teams]] name = \"design\": keys: expires_at must be later than not_before",
        ),
    ];
    for (text, expected) in cases {
        let error = error_of(&text);
        assert!(error.starts_with("gateway.toml:10:"), "{error}");
        assert!(error.contains(expected), "{error}");
    }
}

#[test]
fn a_team_uses_the_models_its_globs_match_and_by_default_every_one() {
    let text = format!(
        "{MINIMAL}\n[models.\"google/nano-banana\"]\nreserve = \"0.10\"\n\n\
         [models.\"wan-2.7-image\"]\nreserve = \"0.20\"\n\n[models.\"sora-2\"]\nreserve = \"2.50\"\n\n\
         [[teams]]\nname = \"interns\"\nkeys = [{{ sha256 = \"{}\" }}]\n\
         models = [\"google/*\", \"wan-2.7-image\"]\n",
        "1".repeat(64)
    );
    let config = parse(&text).unwrap();
    let interns = config.team("interns").unwrap();
    assert!(interns.may_use("google/nano-banana"));
    assert!(interns.may_use("google/gempix2"));
    assert!(interns.may_use("wan-2.7-image"));
    assert!(!interns.may_use("sora-2"));
    assert!(!interns.may_use("wan-2.7-image-pro"));
    assert_eq!(
        interns.models.as_ref().unwrap().patterns(),
        ["google/*", "wan-2.7-image"]
    );
    let design = config.team("design").unwrap();
    assert!(design.models.is_none());
    assert!(design.may_use("sora-2"));
}

#[test]
fn an_allow_list_that_cannot_match_is_refused() {
    let cases = [
        (
            "models = [\"googel/*\"]",
            "gateway.toml:12:11: [[teams]] name = \"design\": models: \"googel/*\" matches no model \
             under [models]",
        ),
        (
            "models = []",
            "gateway.toml:12:10: [[teams]] name = \"design\": models is empty; leave it out to \
             allow every configured model",
        ),
        (
            "models = [\"google/[\"]",
            "gateway.toml:12:11: [[teams]] name = \"design\": models: \"google/[\" is not a glob",
        ),
    ];
    for (line, expected) in cases {
        let error = error_of(&format!("{MINIMAL}{line}\n"));
        assert!(error.starts_with(expected), "{error}");
    }
}
