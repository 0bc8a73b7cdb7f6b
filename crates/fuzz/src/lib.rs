//! Fuzz targets for what the gateway reads from outside: credit amounts, request bodies and the
//! routes that check them, reservations, final task states and the configuration file.
//!
//! Each target is one function, `run(data)`, that turns arbitrary bytes into an input (raw, or
//! built from the bytes so that most of them are well-formed) and asserts a property of the
//! domain's answer: a round trip, a second, independent reading that must agree, or "never
//! panics and an error names what is wrong". A failed property panics, which libFuzzer reports
//! as a crash.
//!
//! The same functions run in two ways: coverage-guided by libFuzzer (`bench/fuzz`, the binaries
//! in `fuzz_targets/`, for minutes to hours) and on random bytes in `cargo test` (`tests/`),
//! which also replays every input kept in `regressions/`.

pub mod body;
pub mod config;
pub mod credits;
pub mod generate;
pub mod pricing;
pub mod routes;
pub mod settlement;

/// A target: its name (its binary's and its `regressions/` folder's) and its function.
pub type Target = (&'static str, fn(&[u8]));

/// Every target, as the tests call them.
pub const TARGETS: [Target; 6] = [
    ("credits", credits::run),
    ("body", body::run),
    ("routes", routes::run),
    ("pricing", pricing::run),
    ("settlement", settlement::run),
    ("config", config::run),
];
