//! No silent skips: a test that cannot run here fails, unless the environment variable
//! `KILN_TEST_ALLOW_SKIP` (a comma-separated list) names what it needs, or is `all`.
//! A permitted skip is printed, so a green run still says what did not run.

/// Returns when `KILN_TEST_ALLOW_SKIP` names `what` (the caller then skips, printing
/// `reason`); panics otherwise, saying how to allow it.
pub fn allow_or_fail(what: &str, reason: &str) {
    let allowed = std::env::var("KILN_TEST_ALLOW_SKIP").unwrap_or_default();
    if allowed.split(',').map(str::trim).any(|a| a == what || a == "all") {
        eprintln!("SKIPPED ({what}, allowed by KILN_TEST_ALLOW_SKIP): {reason}");
        return;
    }
    panic!("{reason}; this test cannot run here (set KILN_TEST_ALLOW_SKIP={what} to skip it knowingly)");
}
