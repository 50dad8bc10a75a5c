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
mod dedup;
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
                kiln_builds_completed_total{outcome=\"cancelled\"} 1\nkiln_x_total 2.5\n";
    assert_eq!(sample(text, "kiln_builds_started_total"), 3.0);
    assert_eq!(
        sample(text, "kiln_builds_completed_total{outcome=\"cancelled\"}"),
        1.0
    );
    assert_eq!(
        sample(text, "kiln_builds_completed_total{outcome=\"success\"}"),
        0.0
    );
    assert_eq!(sample(text, "kiln_x"), 0.0);
    assert_eq!(sample(text, "kiln_x_total"), 2.5);
}
