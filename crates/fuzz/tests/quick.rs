//! The fuzz targets' quick form, in the test suite: every input kept in `regressions/` (what
//! the fuzzer once found, and what it took to reach deep paths), then random bytes through each
//! target. `bench/fuzz` runs the long, coverage-guided form.

use std::fs;
use std::path::Path;

use ketchup_fuzz::TARGETS;
use proptest::collection::vec;
use proptest::prelude::*;

#[test]
fn every_kept_input_passes_its_target() {
    let kept = Path::new(env!("CARGO_MANIFEST_DIR")).join("regressions");
    let mut replayed = 0;
    for (name, run) in TARGETS {
        let Ok(entries) = fs::read_dir(kept.join(name)) else {
            continue;
        };
        for entry in entries {
            let path = entry.expect("a readable directory").path();
            let data = fs::read(&path).expect("a readable input");
            let outcome = std::panic::catch_unwind(|| run(&data));
            assert!(outcome.is_ok(), "{name}: {} fails again", path.display());
            replayed += 1;
        }
    }
    assert!(replayed > 0, "no input kept in {}", kept.display());
}

fn target(name: &str) -> fn(&[u8]) {
    TARGETS
        .iter()
        .find(|(target, _)| *target == name)
        .map(|(_, run)| *run)
        .expect("a target by that name")
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2048, ..ProptestConfig::default() })]

    #[test]
    fn credits(data in vec(any::<u8>(), 0..256)) {
        target("credits")(&data);
    }

    #[test]
    fn body(data in vec(any::<u8>(), 0..2048)) {
        target("body")(&data);
    }

    #[test]
    fn routes(data in vec(any::<u8>(), 0..2048)) {
        target("routes")(&data);
    }

    #[test]
    fn pricing(data in vec(any::<u8>(), 0..512)) {
        target("pricing")(&data);
    }

    #[test]
    fn settlement(data in vec(any::<u8>(), 0..1024)) {
        target("settlement")(&data);
    }

    #[test]
    fn config(data in vec(any::<u8>(), 0..1024)) {
        target("config")(&data);
    }
}
