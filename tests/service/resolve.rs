//! ResolveBaseImage against real registries: tags, digests, indexes, missing and malformed
//! references, registry auth (anonymous, `auth.additional`), and an unreachable registry.

use std::collections::HashMap;

use base64::Engine as _;
use kiln::proto::builder::{BuildRegistryAuth, ResolveBaseImageRequest};
use tonic::Code;

use crate::{
    common::{code_of, within, Env, Mode},
    support::{
        docker_registry::DockerRegistry,
        images::{push_image, push_image_with, push_index},
        kiln::free_port,
    },
};

const USER: &str = "kiln-resolve";
const PASSWORD: &str = "s3cret-Resolve-9c1e";

fn request(image: &str) -> ResolveBaseImageRequest {
    ResolveBaseImageRequest {
        r#ref: image.to_owned(),
        ..Default::default()
    }
}

fn with_additional(image: &str, host: &str, user: &str, password: &str) -> ResolveBaseImageRequest {
    let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    ResolveBaseImageRequest {
        r#ref: image.to_owned(),
        auth: Some(BuildRegistryAuth {
            mode: None,
            additional: HashMap::from([(host.to_owned(), encoded)]),
        }),
        use_retry_client: false,
    }
}

async fn resolve_suite(mode: Mode) {
    let env = Env::start(mode);
    let registry = env.registry();
    let mut client = env.builder().await;

    // A tag resolves to the digest form of its manifest.
    let digest = push_image(&registry, "src/app", "v1", 2, 0x5e50_0001).await;
    let expected = format!("{registry}/src/app@{digest}");
    let resolved = client
        .resolve_base_image(request(&format!("{registry}/src/app:v1")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resolved.r#ref, expected);
    // Asked again (now from the cache), the same answer.
    let again = client
        .resolve_base_image(request(&format!("{registry}/src/app:v1")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.r#ref, expected);

    // A digest reference resolves to itself.
    let by_digest = client
        .resolve_base_image(request(&expected))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(by_digest.r#ref, expected);

    // An index resolves to its linux/amd64 manifest, whatever the order of its entries.
    let (index_digest, platforms) =
        push_index(&registry, "src/multi", "v2", &["linux/arm64", "linux/amd64"]).await;
    let amd64 = &platforms.iter().find(|(p, _)| p == "linux/amd64").unwrap().1;
    let resolved = client
        .resolve_base_image(request(&format!("{registry}/src/multi:v2")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resolved.r#ref, format!("{registry}/src/multi@{amd64}"));
    assert!(
        !resolved.r#ref.contains(index_digest.as_str()),
        "{} is the index itself",
        resolved.r#ref
    );

    // Missing tags and repositories are NotFound.
    let missing = code_of(
        client
            .resolve_base_image(request(&format!("{registry}/src/app:nope")))
            .await,
    );
    assert_eq!(missing.code(), Code::NotFound, "{missing:?}");
    let missing = code_of(
        client
            .resolve_base_image(request(&format!("{registry}/src/absent:v1")))
            .await,
    );
    assert_eq!(missing.code(), Code::NotFound, "{missing:?}");

    // Unparsable and empty references are InvalidArgument.
    for bad in [
        "Not A Valid Ref",
        "UPPER/Case:tag",
        "",
        "registry.example/app:bad tag!",
    ] {
        let status = code_of(client.resolve_base_image(request(bad)).await);
        assert_eq!(status.code(), Code::InvalidArgument, "{bad:?}: {status:?}");
    }

    // A registry with htpasswd auth: anonymous is refused, the caller's own credentials work.
    let private = DockerRegistry::start_with_auth(Some((USER, PASSWORD)));
    let private_digest = push_image_with(
        private.addr(),
        Some((USER, PASSWORD)),
        "team/base",
        "1",
        1,
        0x5e50_0002,
        "linux/amd64",
    )
    .await;
    let private_image = format!("{}/team/base:1", private.addr());
    let anonymous = code_of(client.resolve_base_image(request(&private_image)).await);
    assert_eq!(anonymous.code(), Code::Unauthenticated, "{anonymous:?}");
    let resolved = client
        .resolve_base_image(with_additional(&private_image, private.addr(), USER, PASSWORD))
        .await
        .unwrap_or_else(|s| panic!("with credentials: {s:?}\n{}", private.log()))
        .into_inner();
    assert_eq!(
        resolved.r#ref,
        format!("{}/team/base@{private_digest}", private.addr())
    );
    // A wrong password is refused too, and the answer cached for the right one is not
    // handed to callers without credentials.
    let wrong = code_of(
        client
            .resolve_base_image(with_additional(
                &private_image,
                private.addr(),
                USER,
                "wrong-password",
            ))
            .await,
    );
    assert_eq!(wrong.code(), Code::Unauthenticated, "{wrong:?}");
    let anonymous = code_of(client.resolve_base_image(request(&private_image)).await);
    assert_eq!(
        anonymous.code(),
        Code::Unauthenticated,
        "the cache leaked a private digest: {anonymous:?}"
    );
    // The error never carries the password.
    assert!(!wrong.message().contains("wrong-password"), "{wrong:?}");

    // Nothing listens on the port: Unavailable.
    let closed = format!("127.0.0.1:{}/src/app:v1", free_port());
    let status = code_of(client.resolve_base_image(request(&closed)).await);
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");

    // The metric counts hits, misses and errors.
    assert!(
        env.kiln
            .metric("kiln_resolve_requests_total{result=\"miss\"}")
            .await
            >= 3.0
    );
    assert!(
        env.kiln
            .metric("kiln_resolve_requests_total{result=\"hit\"}")
            .await
            >= 1.0
    );
    assert!(
        env.kiln
            .metric("kiln_resolve_requests_total{result=\"error\"}")
            .await
            >= 4.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resolve_base_image_embedded_registry() {
    within(120, resolve_suite(Mode::Embedded)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resolve_base_image_external_registry() {
    within(120, resolve_suite(Mode::External)).await;
}

/// Issue 10, point 5: a digest resolved with the installation's credentials is never served
/// to a request whose auth policy would not have allowed them for that registry, and
/// `selective.any_of` names a registry the way the lookup does (host and port; a scheme
/// is ignored).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn installation_credentials_never_reach_a_request_outside_their_scope() {
    use kiln::proto::builder::{build_registry_auth, BuildRegistryAuthSelective, BuildRegistryAuthTotal};

    use crate::support::kiln::{KilnOptions, KilnServer};

    let private = DockerRegistry::start_with_auth(Some((USER, PASSWORD)));
    let digest = push_image_with(
        private.addr(),
        Some((USER, PASSWORD)),
        "team/scoped",
        "1",
        1,
        0x5e50_0003,
        "linux/amd64",
    )
    .await;
    let image = format!("{}/team/scoped:1", private.addr());
    let pull_secret = crate::support::registry_auth::PullSecret::new(private.addr(), USER, PASSWORD);
    let target = DockerRegistry::start();
    let kiln = KilnServer::start(KilnOptions {
        registry_toml: pull_secret.registry_toml(),
        ..KilnOptions::external(target.addr())
    });
    let mut client = kiln.builder().await;
    let ask = |mode: Option<build_registry_auth::Mode>| ResolveBaseImageRequest {
        r#ref: image.clone(),
        auth: Some(BuildRegistryAuth {
            mode,
            additional: HashMap::new(),
        }),
        ..Default::default()
    };
    let selective = |any_of: &[String]| {
        Some(build_registry_auth::Mode::Selective(BuildRegistryAuthSelective {
            allow_baserep: true,
            allow_workspacerep: true,
            any_of: any_of.to_vec(),
        }))
    };
    let total = |allow_all| {
        Some(build_registry_auth::Mode::Total(BuildRegistryAuthTotal {
            allow_all,
        }))
    };
    let pinned = format!("{}/team/scoped@{digest}", private.addr());
    within(120, async {
        let refused = [
            None,
            total(false),
            selective(&[]),
            selective(&["registry.example.com".to_owned()]),
        ];
        let expect_refused =
            |client: &mut kiln::proto::builder::image_builder_client::ImageBuilderClient<_>,
             when: &'static str| {
                let mut client = client.clone();
                let refused = refused.clone();
                async move {
                    for mode in refused {
                        match client.resolve_base_image(ask(mode.clone())).await {
                            Ok(answer) => panic!("{when}: {mode:?} was answered: {answer:?}"),
                            Err(status) => assert_eq!(
                                status.code(),
                                Code::Unauthenticated,
                                "{when}: {mode:?}: {status:?}"
                            ),
                        }
                    }
                }
            };
        // Before anything is cached: refused by the registry.
        expect_refused(&mut client, "before").await;
        // Allowed: the installation's credentials resolve it (and fill the cache).
        for allowed in [
            selective(&[private.addr().to_owned()]),
            total(true),
            selective(&[format!("http://{}", private.addr())]),
        ] {
            let resolved = client
                .resolve_base_image(ask(allowed.clone()))
                .await
                .unwrap_or_else(|s| panic!("{allowed:?}: {s:?}"))
                .into_inner();
            assert_eq!(resolved.r#ref, pinned, "{allowed:?}");
        }
        // After: still refused, never answered from a cache.
        expect_refused(&mut client, "after").await;
        let anonymous = code_of(client.resolve_base_image(request(&image)).await);
        assert_eq!(anonymous.code(), Code::Unauthenticated, "{anonymous:?}");
    })
    .await;
}
