//! `[admin]`: the single token, labelled tokens, and the audit trail's retention.

use super::*;

const ALICE: &str = "2222222222222222222222222222222222222222222222222222222222222222";
const BOB: &str = "3333333333333333333333333333333333333333333333333333333333333333";

fn with_admin(lines: &str) -> String {
    format!("{MINIMAL}\n[admin]\n{lines}\n")
}

#[test]
fn the_admin_api_is_off_without_a_token_and_keeps_its_trail_a_year() {
    let admin = parse(MINIMAL).unwrap().admin;
    assert!(!admin.enabled());
    assert_eq!(admin.keep_audit, Duration::from_secs(365 * 24 * 3600));
}

#[test]
fn the_single_token_and_labelled_tokens_open_it_together() {
    let admin = parse(&with_admin(&format!(
        "token_env = \"KETCHUP_ADMIN_TOKEN\"\nkeep_audit = \"90d\"\n\
         tokens = [{{ sha256 = \"{ALICE}\", label = \"alice@example.com\" }}, \
         {{ sha256 = \"{}\", label = \"bob\" }}]",
        BOB.to_uppercase()
    )))
    .unwrap()
    .admin;
    assert!(admin.enabled());
    assert_eq!(
        admin.token,
        Some(SecretSource::Env("KETCHUP_ADMIN_TOKEN".into()))
    );
    let labels: Vec<(String, &str)> = admin
        .tokens
        .iter()
        .map(|t| (t.digest.to_hex(), t.label.as_str()))
        .collect();
    assert_eq!(
        labels,
        [
            (ALICE.to_owned(), "alice@example.com"),
            (BOB.to_owned(), "bob")
        ]
    );
    assert_eq!(admin.keep_audit, Duration::from_secs(90 * 24 * 3600));

    let only_labelled = parse(&with_admin(&format!(
        "tokens = [{{ sha256 = \"{ALICE}\", label = \"admin\" }}]"
    )))
    .unwrap()
    .admin;
    assert!(only_labelled.enabled());
    assert_eq!(only_labelled.token, None);
}

#[test]
fn a_label_that_cannot_tell_admins_apart_is_refused_at_its_line() {
    let cases = [
        (
            format!(
                "tokens = [{{ sha256 = \"{ALICE}\", label = \"ops\" }}, \
                 {{ sha256 = \"{BOB}\", label = \"ops\" }}]"
            ),
            "[admin] tokens: label \"ops\" is used twice",
        ),
        (
            format!(
                "token_env = \"KETCHUP_ADMIN_TOKEN\"\n\
                 tokens = [{{ sha256 = \"{ALICE}\", label = \"admin\" }}]"
            ),
            "15:[admin] tokens: label \"admin\" is used twice",
        ),
        (
            format!(
                "tokens = [{{ sha256 = \"{ALICE}\", label = \"alice\" }}, \
                 {{ sha256 = \"{ALICE}\", label = \"bob\" }}]"
            ),
            "[admin] tokens: this sha256 is listed twice",
        ),
        (
            format!("tokens = [{{ sha256 = \"{ALICE}\", label = \"\" }}]"),
            "[admin] tokens: label \"\" must be 1 to 64 letters",
        ),
        (
            format!("tokens = [{{ sha256 = \"{ALICE}\", label = \"a b\" }}]"),
            "[admin] tokens: label \"a b\" must be 1 to 64 letters",
        ),
        (
            format!("tokens = [{{ sha256 = \"{ALICE}\" }}]"),
            "missing field `label`",
        ),
        (
            "keep_audit = \"0s\"".to_owned(),
            "[admin] keep_audit must be above zero",
        ),
    ];
    for (lines, expected) in cases {
        let error = error_of(&with_admin(&lines));
        // On the line of the token, the first after the table's header unless the case says.
        let (line, expected) = match expected.split_once(':') {
            Some((line, rest)) if line.parse::<u32>().is_ok() => (line, rest),
            _ => ("14", expected),
        };
        assert!(
            error.starts_with(&format!("gateway.toml:{line}:")),
            "{error}"
        );
        assert!(error.contains(expected), "{error}");
    }
}
