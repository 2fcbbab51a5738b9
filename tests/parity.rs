//! Parity with the official implementation (qwen-tts 0.1.1) on every fixture directory:
//! the committed `tests/fixtures/*` plus each directory in `KOE_PARITY_DIRS`.
//! Prints one line per fixture, case and tensor (relative L2 error, max abs error, bound).

mod parity {
    pub mod common;
    pub mod decoder;
    pub mod e2e;
    pub mod encoder;
    pub mod speaker;
    pub mod talker;
}

use parity::common::{fixture_dirs, Fixture};

/// Fixture tensors that no check compares yet, each with its reason. The test fails if
/// fixtures.json lists a tensor outside this list that no check used. Empty: every tensor the
/// kit writes is compared or consumed.
const NOT_COMPARED: &[(&str, &str)] = &[];

fn not_compared_reason(name: &str) -> Option<&'static str> {
    NOT_COMPARED
        .iter()
        .find(|(prefix, _)| name.starts_with(prefix))
        .map(|(_, why)| *why)
}

#[test]
fn parity_with_official_implementation() {
    let mut all_failures = Vec::new();
    for dir in fixture_dirs() {
        let fx = Fixture::load(&dir);
        println!("== fixture {} ({})", fx.name, dir.display());
        parity::talker::check(&fx);
        parity::speaker::check(&fx);
        parity::encoder::check(&fx);
        parity::decoder::check(&fx);
        parity::e2e::check(&fx);
        for unused in fx.unused() {
            match not_compared_reason(&unused) {
                Some(why) => println!("{:<14} {unused:<34} not compared: {why}", fx.name),
                None => fx.fail(format!(
                    "{unused}: listed in fixtures.json but no check compares or uses it"
                )),
            }
        }
        all_failures.extend(fx.failures().into_iter().map(|f| format!("{}: {f}", fx.name)));
    }
    assert!(all_failures.is_empty(), "parity failures:\n{}", all_failures.join("\n"));
}
