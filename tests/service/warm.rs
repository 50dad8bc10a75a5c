//! `Admin.WarmNow` and `kiln admin warm`: the cache warmer warms its configured references on
//! request (re-resolved through the resolvers, layers pre-fetched into the layer store),
//! answers how many it warmed, and is an operator RPC (the admin token is needed when one is
//! configured).

use std::{path::Path, process::Output};

use kiln::proto::admin::{admin_client::AdminClient, RestartActorRequest, WarmNowRequest};
use tonic::{metadata::MetadataValue, service::interceptor::InterceptedService, Code, Request};

use crate::{
    common::within,
    support::{
        docker_registry::DockerRegistry,
        images::push_image,
        kiln::{KilnOptions, KilnServer},
    },
};

const TOKEN: &str = "warm-t0ken-4f1a";

async fn kiln_cli(args: &[&str]) -> Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .env_remove("KILN_ADDR")
        .env_remove("KILN_TOKEN")
        .kill_on_drop(true)
        .output()
        .await
        .expect("running kiln")
}

/// Blobs in the layer store's index (`by-digest/`).
fn stored_layers(data_dir: &Path) -> usize {
    std::fs::read_dir(data_dir.join("engine/layers/by-digest")).map_or(0, |d| d.count())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_now_resolves_and_prefetches_the_configured_refs() {
    within(120, async {
        let registry = DockerRegistry::start();
        let reg = registry.addr().to_owned();
        // Not pushed yet: the warm at start-up finds nothing, so what is warmed below is
        // WarmNow's doing.
        let refs = [
            format!("{reg}/warm/a:1"),
            format!("{reg}/warm/b:1"),
            format!("{reg}/warm/missing:1"),
        ];
        let kiln = KilnServer::start(KilnOptions {
            grpc_toml: format!("admin_token = {TOKEN:?}\n"),
            ..KilnOptions::external(&reg)
                .with_toml(&format!("[warmer]\ninterval = \"1h\"\nrefs = {refs:?}\n"))
        });
        push_image(&reg, "warm/a", "1", 2, 0x3a_0001).await;
        push_image(&reg, "warm/b", "1", 1, 0x3a_0002).await;
        let addr = kiln.grpc_addr().to_string();

        // An operator RPC: without the token, Unauthenticated.
        let err = kiln.admin().await.warm_now(WarmNowRequest {}).await.unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");

        let token: MetadataValue<_> = format!("Bearer {TOKEN}").parse().unwrap();
        let mut admin = AdminClient::new(InterceptedService::new(
            kiln.channel().await,
            move |mut request: Request<()>| {
                request.metadata_mut().insert("authorization", token.clone());
                Ok(request)
            },
        ));
        let misses = r#"kiln_resolve_requests_total{result="miss"}"#;
        let misses_before = kiln.metric(misses).await;
        let layers_before = stored_layers(&kiln.data_dir());
        let warmed = admin.warm_now(WarmNowRequest {}).await.unwrap().into_inner();
        assert_eq!((warmed.images, warmed.failed), (2, 1), "{warmed:?}");
        // Each reference was asked of the registry again (a refresh is a miss), and the
        // layers of both images (three blobs) are in the layer store.
        assert!(kiln.metric(misses).await >= misses_before + 2.0);
        assert!(
            stored_layers(&kiln.data_dir()) >= layers_before + 3,
            "layers stored: {} before, {} after",
            layers_before,
            stored_layers(&kiln.data_dir())
        );

        // A restarted warmer answers too.
        admin
            .restart_actor(RestartActorRequest {
                name: "cache_warmer".into(),
            })
            .await
            .unwrap();
        let warmed = admin.warm_now(WarmNowRequest {}).await.unwrap().into_inner();
        assert_eq!((warmed.images, warmed.failed), (2, 1), "{warmed:?}");

        // kiln admin warm: the same, and the token is needed.
        let args = ["admin", "warm", "--addr", &addr, "--token", TOKEN];
        let out = kiln_cli(&args).await;
        assert!(out.status.success(), "{out:?}");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "2 images warmed, 1 failed (see the service's log)\n"
        );
        let out = kiln_cli(&["admin", "warm", "--addr", &addr]).await;
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("Unauthenticated"), "{stderr}");
        drop(kiln);
    })
    .await;
}
