//! `kiln serve --config image-builder.json`: the file Gitpod's installer renders for mk3,
//! unchanged. Kiln reads it (detected by format), serves on mk3's gRPC address, pushes to
//! mk3's workspace repository, and names every key it ignores in one start-up line.

use std::{process::Stdio, time::Duration};

use kiln::proto::builder::BuildStatus;

use crate::{
    calls::start,
    common::{build_request, statuses, within},
    support::{docker_registry::DockerRegistry, images::push_image, kiln::free_port},
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kiln_serves_with_mk3s_configuration_file() {
    let registry = DockerRegistry::start();
    let reg = registry.addr().to_owned();
    let dir = tempfile::tempdir().unwrap();
    let (grpc, metrics) = (free_port(), free_port());
    // As configmap.go renders it (a workspace cluster's, without TLS).
    let json = format!(
        r#"{{"orchestrator":{{"wsman":{{"address":"ws-manager-mk2:8080","tls":{{"ca":"/wsman-certs/ca.crt","crt":"/wsman-certs/tls.crt","key":"/wsman-certs/tls.key"}}}},
            "pullSecret":"builtin-registry-auth","baseImageRepository":"{reg}/base-images",
            "workspaceImageRepository":"{reg}/workspace-images","builderImage":"bob:commit-1",
            "enableAdditionalECRAuth":false}},
          "refCache":{{"interval":"6h0m0s","refs":[]}},
          "server":{{"services":{{"grpc":{{"address":"127.0.0.1:{grpc}"}}}}}}}}"#
    );
    let config = dir.path().join("image-builder.json");
    std::fs::write(&config, json).unwrap();
    let log = dir.path().join("kiln.log");
    let out = std::fs::File::create(&log).unwrap();
    let mut child = KillOnDrop(
        std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(["serve", "--config"])
            .arg(&config)
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args(["--metrics-addr", &format!("127.0.0.1:{metrics}")])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("spawning kiln serve"),
    );
    within(120, async {
        push_image(&reg, "team/app", "1", 1, 0x6a17_0501).await;
        let endpoint = format!("http://127.0.0.1:{grpc}");
        let channel = loop {
            match tonic::transport::Endpoint::from_shared(endpoint.clone())
                .unwrap()
                .connect()
                .await
            {
                Ok(channel) => break channel,
                Err(_) => {
                    assert!(
                        child.0.try_wait().unwrap().is_none(),
                        "kiln exited:\n{}",
                        std::fs::read_to_string(&log).unwrap()
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        };
        let mut client = kiln::proto::builder::image_builder_client::ImageBuilderClient::new(channel);
        let messages = start(&mut client, build_request(&format!("{reg}/team/app:1"))).await;
        assert_eq!(
            statuses(&messages).last(),
            Some(&BuildStatus::DoneSuccess),
            "{messages:#?}"
        );
        let workspace = &messages.last().unwrap().r#ref;
        assert!(
            workspace.starts_with(&format!("{reg}/workspace-images:")),
            "{workspace}"
        );
    })
    .await;
    let text = std::fs::read_to_string(&log).unwrap();
    let line = text
        .lines()
        .find(|l| l.contains("image-builder-mk3 configuration read"))
        .unwrap_or_else(|| panic!("no start-up line naming the ignored keys:\n{text}"));
    for key in [
        "orchestrator.wsman",
        "orchestrator.pullSecret",
        "orchestrator.builderImage",
    ] {
        assert!(line.contains(key), "{key} not named: {line}");
    }
}

/// Kills the child when the test ends, however it ends.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A taken address stops `kiln serve` with a message that names the flag and the config key
/// that move it, for each listener.
#[test]
fn a_taken_port_names_the_setting_that_moves_it() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_addr = taken.local_addr().unwrap().to_string();
    let free = || format!("127.0.0.1:{}", free_port());
    for (flag, key) in [
        ("--registry-addr", "registry.embedded_addr"),
        ("--metrics-addr", "metrics.addr"),
        ("--grpc-addr", "grpc.addr"),
    ] {
        let mut args = vec![
            ("--registry-addr", free()),
            ("--metrics-addr", free()),
            ("--grpc-addr", free()),
        ];
        for (f, addr) in &mut args {
            if *f == flag {
                *addr = taken_addr.clone();
            }
        }
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"));
        command
            .arg("serve")
            .arg("--data-dir")
            .arg(dir.path().join("data"));
        for (f, addr) in &args {
            command.args([f, addr.as_str()]);
        }
        let out = command.stdin(Stdio::null()).output().unwrap();
        let text = String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
        assert!(!out.status.success(), "{flag}: kiln serve started:\n{text}");
        assert!(
            text.contains(&taken_addr) && text.contains(flag) && text.contains(key),
            "{flag}: the error does not name {taken_addr}, {flag} and {key}:\n{text}"
        );
    }
    drop(taken);
}
