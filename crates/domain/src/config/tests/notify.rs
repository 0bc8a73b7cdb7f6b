//! Budget notifications: `budget.notify_at`, the team's `notify_url`, and the secret that signs
//! them.

use super::{MINIMAL, error_of, parse};
use crate::config::Thresholds;
use crate::credits::Credits;

const BUDGET: &str = r#"budget = { credits = "250.00", period = "monthly", max_in_flight = 50 }"#;

/// [`MINIMAL`] with design's budget given `notify_at` (as written, `None` for none) and `lines`
/// added to the team.
fn team(notify_at: Option<&str>, lines: &str) -> String {
    let budget = match notify_at {
        Some(list) => {
            format!(r#"budget = {{ credits = "250.00", period = "monthly", notify_at = {list} }}"#)
        }
        None => BUDGET.to_owned(),
    };
    format!("{}{lines}\n", MINIMAL.replace(BUDGET, &budget))
}

const SIGNED: &str = "webhook_secret_env = \"KETCHUP_WEBHOOK_SECRET_DESIGN\"";
const URL: &str = "notify_url = \"https://hooks.design.example/budget\"";

#[test]
fn notify_at_and_notify_url_configure_signed_notifications() {
    let config = parse(&team(Some("[50, 80, 100]"), &format!("{URL}\n{SIGNED}"))).unwrap();
    let design = config.team("design").unwrap();
    let budget = design.budget.unwrap();
    assert_eq!(budget.notify_at.iter().collect::<Vec<_>>(), [50, 80, 100]);
    assert_eq!(
        design.notify_url.as_deref(),
        Some("https://hooks.design.example/budget")
    );
    // Without them: nothing.
    let plain = parse(MINIMAL).unwrap();
    let design = plain.team("design").unwrap();
    assert!(design.budget.unwrap().notify_at.is_empty());
    assert_eq!(design.notify_url, None);
}

#[test]
fn a_wrong_notify_at_is_refused_naming_the_key_and_the_value() {
    let signed = format!("{URL}\n{SIGNED}");
    let cases = [
        ("[]", "budget.notify_at is empty"),
        (
            "[0, 50]",
            "budget.notify_at: 0 is not a whole percentage from 1 to 100",
        ),
        (
            "[50, 101]",
            "budget.notify_at: 101 is not a whole percentage from 1 to 100",
        ),
        ("[-5]", "budget.notify_at: -5 is not a whole percentage"),
        ("[50, 50]", "budget.notify_at: 50 is listed twice"),
        ("[80, 50]", "budget.notify_at: 50 comes after a larger one"),
        (
            "[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]",
            "budget.notify_at lists 11 percentages; at most 10",
        ),
    ];
    for (list, expected) in cases {
        let error = error_of(&team(Some(list), &signed));
        assert!(error.starts_with("gateway.toml:11:"), "{list}: {error}");
        assert!(
            error.contains(&format!("[[teams]] name = \"design\": {expected}")),
            "{list}: {error}"
        );
    }
    // A fraction is no whole percentage: the reader refuses it at the key.
    let error = error_of(&team(Some("[50.5]"), &signed));
    assert!(error.contains("notify_at"), "{error}");
}

#[test]
fn notify_at_needs_a_budget_above_zero() {
    let text = team(Some("[50]"), &format!("{URL}\n{SIGNED}"))
        .replace(r#"credits = "250.00""#, r#"credits = "0""#);
    let error = error_of(&text);
    assert!(
        error.contains("budget.notify_at needs a budget above zero credits"),
        "{error}"
    );
}

#[test]
fn notify_at_notify_url_and_the_secret_go_together() {
    let cases = [
        (
            team(Some("[50]"), SIGNED),
            "gateway.toml:11:",
            "budget.notify_at needs notify_url",
        ),
        (
            team(None, &format!("{URL}\n{SIGNED}")),
            "gateway.toml:12:",
            "notify_url needs budget.notify_at",
        ),
        (
            team(Some("[50]"), URL),
            "gateway.toml:12:",
            "notify_url needs webhook_secret_env or webhook_secret_file",
        ),
    ];
    for (text, place, expected) in cases {
        let error = error_of(&text);
        assert!(error.starts_with(place), "{error}");
        assert!(error.contains(expected), "{error}");
    }
    let error = error_of(&team(
        Some("[50]"),
        &format!("notify_url = \"ftp://hooks.design.example/\"\n{SIGNED}"),
    ));
    assert!(error.contains("is not an absolute http(s) URL"), "{error}");
}

#[test]
fn a_threshold_is_reached_at_exactly_its_share_of_the_budget() {
    let set = Thresholds::of([50, 80, 100]).unwrap();
    let credits = |text: &str| text.parse::<Credits>().unwrap();
    let reached = |used: &str| {
        set.reached(credits("3.00"), credits(used))
            .iter()
            .collect::<Vec<_>>()
    };
    assert_eq!(reached("1.49999999"), Vec::<u8>::new());
    assert_eq!(reached("1.50"), [50]);
    assert_eq!(reached("2.39999999"), [50]);
    assert_eq!(reached("2.40"), [50, 80]);
    assert_eq!(reached("3.00"), [50, 80, 100]);
    assert_eq!(reached("9.00"), [50, 80, 100]);
    // The largest budgets compute without overflow.
    let huge = Credits::from_units(i64::MAX);
    assert_eq!(set.reached(huge, huge).iter().count(), 3);
    assert_eq!(set.reached(huge, Credits::ZERO).iter().count(), 0);
    assert_eq!(Thresholds::of([0]), None);
    assert_eq!(Thresholds::of([101]), None);
    let claimed = Thresholds::of([50]).unwrap();
    assert_eq!(set.without(claimed).iter().collect::<Vec<_>>(), [80, 100]);
    assert_eq!(claimed.with(set), set);
}
