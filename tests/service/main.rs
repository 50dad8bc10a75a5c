//! The whole service, as its clients see it: the real `kiln serve` binary as a child process
//! (see `support::kiln`), driven over gRPC, its metrics endpoint and its CLI, against its
//! embedded registry and against an external docker-registry.

#[path = "../support/mod.rs"]
mod support;

mod admin;
mod build;
mod cancel;
mod cli;
mod common;
mod dashboard;
mod dedup;
mod deploy_queries;
mod errors;
mod knobs;
mod logs;
mod resolve;
mod restart;
mod warm;

#[test]
fn metric_samples_are_found_by_name_and_labels() {
    use support::kiln::sample;
    let text = "# TYPE kiln_builds_started counter\nkiln_builds_started_total 3\n\
                # TYPE kiln_builds_completed counter\n\
                kiln_builds_completed_total{outcome=\"cancelled\"} 1\n\
                # TYPE kiln_x counter\nkiln_x_total 2.5\n";
    assert_eq!(sample(text, "kiln_builds_started_total"), 3.0);
    assert_eq!(
        sample(text, "kiln_builds_completed_total{outcome=\"cancelled\"}"),
        1.0
    );
    // A label set not observed yet is 0; the family is declared.
    assert_eq!(
        sample(text, "kiln_builds_completed_total{outcome=\"success\"}"),
        0.0
    );
    assert_eq!(sample(text, "kiln_x_total"), 2.5);
    // A metric that is not exposed at all fails instead of reading 0.
    let missing = std::panic::catch_unwind(|| sample(text, "kiln_builds_strated_total"));
    assert!(missing.is_err(), "a misspelt metric must fail the test");
}
