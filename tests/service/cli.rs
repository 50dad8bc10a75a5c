//! The `kiln` client commands against a running service: build, list, logs, status,
//! resolve, admin.

use std::process::Output;

use kiln::proto::builder::ResolveWorkspaceImageRequest;

use crate::{
    common::{logs_by_id, read_logs, ref_source, within, Env, Mode},
    support::images::push_image,
};

/// Runs `kiln ARGS…` and returns its output.
async fn kiln(args: &[&str]) -> Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .env_remove("KILN_ADDR")
        .kill_on_drop(true)
        .output()
        .await
        .expect("running kiln")
}

#[track_caller]
fn success(args: &[&str], output: &Output) -> String {
    assert!(
        output.status.success(),
        "kiln {args:?} exited with {}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout.clone()).expect("UTF-8 output")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_builds_lists_and_shows_logs() {
    within(90, async {
        let env = Env::start(Mode::Embedded);
        let registry = env.registry();
        let addr = env.kiln.grpc_addr().to_string();
        let digest = push_image(&registry, "src/cli", "1", 2, 0xc11_0001).await;
        let image = format!("{registry}/src/cli:1");
        let mut client = env.builder().await;
        let workspace = client
            .resolve_workspace_image(ResolveWorkspaceImageRequest {
                source: ref_source(&image),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .r#ref;

        // kiln build: status lines, the log, then `done: REF`; exit 0.
        let args = ["build", "--ref", &image, "--addr", &addr];
        let out = success(&args, &kiln(&args).await);
        assert_eq!(
            out.lines().last(),
            Some(format!("done: {workspace}").as_str()),
            "{out}"
        );
        let running = out
            .lines()
            .find(|l| l.starts_with("status: running"))
            .unwrap_or_else(|| panic!("{out}"));
        let build_id = running
            .split_whitespace()
            .find_map(|w| w.strip_prefix("build="))
            .unwrap_or_else(|| panic!("no build id in {running:?}"))
            .to_owned();
        assert!(out.contains("copying "), "the log is shown: {out}");

        // Again, quietly: only the ref (the image exists).
        let args = ["build", "--ref", &image, "--addr", &addr, "--quiet"];
        assert_eq!(success(&args, &kiln(&args).await), format!("{workspace}\n"));

        // kiln list: the table and the JSON.
        let args = ["list", "--addr", &addr];
        let table = success(&args, &kiln(&args).await);
        let row = table
            .lines()
            .find(|l| l.starts_with(&build_id))
            .unwrap_or_else(|| panic!("{build_id} not in\n{table}"));
        assert!(row.contains("done_success") && row.contains(&workspace), "{row}");
        let args = ["list", "--addr", &addr, "--json"];
        let json: serde_json::Value = serde_json::from_str(&success(&args, &kiln(&args).await)).unwrap();
        assert_eq!(json[0]["build_id"], build_id.as_str());
        assert_eq!(json[0]["status"], "done_success");
        assert_eq!(json[0]["ref"], workspace.as_str());

        // kiln logs: the raw log, as the Logs RPC gives it; from an offset, its suffix.
        let log = read_logs(&mut client, logs_by_id(&build_id, 0)).await;
        let args = ["logs", &build_id, "--addr", &addr];
        let output = kiln(&args).await;
        success(&args, &output);
        assert_eq!(output.stdout, log);
        let args = ["logs", "--ref", &workspace, "--offset", "10", "--addr", &addr];
        let output = kiln(&args).await;
        success(&args, &output);
        assert_eq!(output.stdout, log[10..]);

        // kiln status and resolve.
        let args = ["status", &build_id, "--addr", &addr, "--json"];
        let status: serde_json::Value = serde_json::from_str(&success(&args, &kiln(&args).await)).unwrap();
        assert_eq!(status["status"], "done_success");
        let args = ["resolve", &image, "--addr", &addr];
        assert_eq!(
            success(&args, &kiln(&args).await),
            format!("{registry}/src/cli@{digest}\n")
        );
        let args = ["resolve", "--workspace", "--ref", &image, "--addr", &addr];
        let out = success(&args, &kiln(&args).await);
        assert!(out.contains(&workspace) && out.contains("done_success"), "{out}");

        // kiln admin actors.
        let args = ["admin", "actors", "--addr", &addr, "--json"];
        let actors: serde_json::Value = serde_json::from_str(&success(&args, &kiln(&args).await)).unwrap();
        let names: Vec<_> = actors
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["name"].as_str().unwrap().to_owned())
            .collect();
        assert!(names.iter().any(|n| n == "orchestrator"), "{names:?}");

        // Failures: exit 1 with the gRPC code on stderr.
        let args = ["logs", "3f2a9c1e-5b7d-4e0f-9a8b-0c1d2e3f4a5b", "--addr", &addr];
        let output = kiln(&args).await;
        assert_eq!(output.status.code(), Some(1), "{output:?}");
        assert!(
            String::from_utf8_lossy(&output.stderr).contains("NotFound"),
            "{output:?}"
        );
        let missing = format!("{registry}/src/cli:missing");
        let args = ["build", "--ref", &missing, "--addr", &addr];
        let output = kiln(&args).await;
        assert_eq!(output.status.code(), Some(1), "{output:?}");
        assert!(
            String::from_utf8_lossy(&output.stderr).contains("NotFound"),
            "{output:?}"
        );
    })
    .await;
}
