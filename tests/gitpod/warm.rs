//! The warm cache serves Gitpod's requests (issue 10, point 6). Gitpod resolves base images
//! with the installation's pull secret allowed (`total`, or `selective` naming the
//! registry); the resolver cache is keyed by the credentials a request would use, so the
//! warmer must warm what those requests look up — and the images callers actually use, not
//! only `warmer.refs`. The first request after a warm is a cache hit (metrics).

use std::collections::HashMap;

use kiln::proto::{
    admin::WarmNowRequest,
    builder::{
        build_registry_auth, BuildRegistryAuth, BuildRegistryAuthSelective, BuildRegistryAuthTotal,
        ResolveBaseImageRequest,
    },
};

use crate::{
    common::within,
    support::{
        docker_registry::DockerRegistry,
        images::push_image_with,
        kiln::{KilnOptions, KilnServer},
        registry_auth::PullSecret,
    },
};

const USER: &str = "gitpod";
const PASSWORD: &str = "pull-s3cret";
const HITS: &str = r#"kiln_resolve_requests_total{result="hit"}"#;
const MISSES: &str = r#"kiln_resolve_requests_total{result="miss"}"#;

fn gitpod_resolve(image: &str, mode: build_registry_auth::Mode) -> ResolveBaseImageRequest {
    ResolveBaseImageRequest {
        r#ref: image.to_owned(),
        auth: Some(BuildRegistryAuth {
            mode: Some(mode),
            additional: HashMap::new(),
        }),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_gitpod_request_after_a_warm_is_a_cache_hit() {
    let private = DockerRegistry::start_with_auth(Some((USER, PASSWORD)));
    let target = DockerRegistry::start();
    let pull_secret = PullSecret::new(private.addr(), USER, PASSWORD);
    let listed = format!("{}/team/listed:1", private.addr());
    let popular = format!("{}/team/popular:1", private.addr());
    // A short cache lifetime: an entry this test does not refresh is gone within seconds.
    let kiln = KilnServer::start(KilnOptions {
        registry_toml: pull_secret.registry_toml(),
        ..KilnOptions::external(target.addr()).with_toml(&format!(
            "[warmer]\ninterval = \"1h\"\nrefs = [{listed:?}]\nmost_requested = 5\n\
             [resolver]\ncache_ttl = \"4s\"\n"
        ))
    });
    within(120, async {
        // Pushed after the start-up warm: what is warm below is WarmNow's doing.
        for repo in ["team/listed", "team/popular"] {
            push_image_with(
                private.addr(),
                Some((USER, PASSWORD)),
                repo,
                "1",
                1,
                0x6a17_0301,
                "linux/amd64",
            )
            .await;
        }
        let mut client = kiln.builder().await;
        let mut admin = kiln.admin().await;
        let total = build_registry_auth::Mode::Total(BuildRegistryAuthTotal { allow_all: true });
        let selective = build_registry_auth::Mode::Selective(BuildRegistryAuthSelective {
            allow_baserep: true,
            allow_workspacerep: true,
            any_of: vec![private.addr().to_owned()],
        });

        // A popular tag: asked for (a miss), then its entry expires.
        client
            .resolve_base_image(gitpod_resolve(&popular, total.clone()))
            .await
            .expect("resolve");
        tokio::time::sleep(std::time::Duration::from_secs(5)).await;

        let warmed = admin
            .warm_now(WarmNowRequest {})
            .await
            .expect("WarmNow")
            .into_inner();
        assert_eq!((warmed.images, warmed.failed), (2, 0), "{warmed:?}");

        // Gitpod's requests, each the first after the warm: hits, no registry call.
        let (hits, misses) = (kiln.metric(HITS).await, kiln.metric(MISSES).await);
        for (image, mode) in [
            (&listed, total.clone()),
            (&listed, selective.clone()),
            (&popular, total),
            (&popular, selective),
        ] {
            client
                .resolve_base_image(gitpod_resolve(image, mode.clone()))
                .await
                .unwrap_or_else(|s| panic!("{image} {mode:?}: {s:?}"));
        }
        assert_eq!(
            kiln.metric(MISSES).await,
            misses,
            "a request after the warm asked the registry"
        );
        assert_eq!(kiln.metric(HITS).await, hits + 4.0);
    })
    .await;
}
