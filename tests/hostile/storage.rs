//! Issue 13, point 6: garbage collection against hostile cache mounts. A Dockerfile fills
//! its cache mounts with symlinks out of the store (to a sentinel directory and file on the
//! host, absolute and as `..` chains) and names them with ids that climb (`../…`, `/..`);
//! `kiln admin prune --all` then removes those cache mounts, and nothing else: the sentinel
//! is untouched and the data dir's other contents are still there.

use kiln::proto::{admin::PruneRequest, builder::BuildStatus};

use super::{build_dockerfile, busybox_in, within, KilnOptions, KilnServer, Sentinel};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_of_hostile_cache_mounts_removes_only_inside_the_store() {
    let sentinel = Sentinel::new();
    let kiln = KilnServer::start(KilnOptions::embedded());
    let base = busybox_in(&kiln);
    let abs = sentinel.abs();
    let climb = sentinel.climb_to("victim");
    within(300, async {
        let mut client = kiln.builder().await;
        let dockerfile = format!(
            "FROM {base}\n\
             RUN --mount=type=cache,id=../../../..{abs},target=/c \
                 ln -s {abs} /c/dir && ln -s {abs}/victim /c/file && ln -s {climb} /c/climb \
                 && mkdir -p /c/sub && ln -s {abs} /c/sub/deep && echo x > /c/sub/data\n\
             RUN --mount=type=cache,id=/..,target=/d ln -s / /d/root && ln -s .. /d/up\n"
        );
        let outcome = build_dockerfile(&mut client, &dockerfile).await;
        assert_eq!(
            outcome.messages.last().map(|m| m.status()),
            Some(BuildStatus::DoneSuccess),
            "{}",
            outcome.text()
        );
        let data = kiln.data_dir();
        let mounts = data.join("engine/cache-mounts");
        let count = || std::fs::read_dir(&mounts).unwrap().count();
        assert_eq!(count(), 2, "one directory per cache id, inside the store");

        let mut admin = kiln.admin().await;
        let pruned = admin
            .prune(PruneRequest {
                all: true,
                keep_bytes: 0,
            })
            .await
            .expect("Admin.Prune")
            .into_inner();
        let removed_mounts = pruned
            .removed
            .iter()
            .find(|k| k.kind == "cache_mounts")
            .map(|k| k.bytes);
        assert!(removed_mounts.is_some_and(|b| b > 0), "{pruned:?}");
        assert_eq!(count(), 0, "the hostile cache mounts are gone");
        sentinel.assert_untouched("prune --all of cache mounts full of symlinks");
        for kept in [
            "registry",
            "builds",
            "logs",
            "engine/layers",
            "engine/cache",
            "contexts",
        ] {
            assert!(data.join(kept).is_dir(), "{kept} is still there");
        }
        // The service still builds (from a store prune emptied).
        let again = build_dockerfile(&mut client, &format!("FROM {base}\nRUN echo again > /again\n")).await;
        assert_eq!(
            again.messages.last().map(|m| m.status()),
            Some(BuildStatus::DoneSuccess),
            "{}",
            again.text()
        );
    })
    .await;
}
