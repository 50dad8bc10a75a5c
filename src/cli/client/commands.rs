//! The one-call commands: `list`, `status`, `resolve`, `cancel` and `admin`.

use super::*;

/// `kiln list`.
pub async fn list(args: ListArgs) -> Result<(), ClientError> {
    let mut client = builder(&args.client).await?;
    let builds = client
        .list_builds(ListBuildsRequest {})
        .await?
        .into_inner()
        .builds;
    let text = if args.json {
        pretty(&builds_json(&builds))
    } else {
        builds_table(&builds)
    };
    print_out(&text)
}

/// `kiln status`.
pub async fn status(args: StatusArgs) -> Result<(), ClientError> {
    let mut client = builder(&args.client).await?;
    let request = BuildStatusRequest {
        build_id: args.build.build_id.clone().unwrap_or_default(),
        build_ref: args.build.build_ref.clone().unwrap_or_default(),
    };
    let resp = client.build_status(request).await?.into_inner();
    let text = if args.json {
        pretty(&build_response_json(&resp))
    } else {
        build_response_text(&resp)
    };
    print_out(&text)
}

/// `kiln resolve`.
pub async fn resolve(args: ResolveArgs) -> Result<(), ClientError> {
    let mut client = builder(&args.client).await?;
    if args.workspace {
        let image = args.workspace_ref.clone().unwrap_or_default();
        let request = ResolveWorkspaceImageRequest {
            source: Some(BuildSource {
                from: Some(build_source::From::Ref(BuildSourceReference { r#ref: image })),
            }),
            ..Default::default()
        };
        let resp = client.resolve_workspace_image(request).await?.into_inner();
        print_out(&key_values(&[
            ("ref", resp.r#ref.clone()),
            ("base_ref", resp.base_ref.clone()),
            ("status", resp.status().as_str_name().to_owned()),
        ]))
    } else {
        let image = args.image.clone().unwrap_or_default();
        let request = ResolveBaseImageRequest {
            r#ref: image,
            ..Default::default()
        };
        let resp = client.resolve_base_image(request).await?.into_inner();
        print_out(&format!("{}\n", resp.r#ref))
    }
}

/// `kiln cancel`.
pub async fn cancel(args: CancelArgs) -> Result<(), ClientError> {
    let mut client = builder(&args.client).await?;
    client
        .cancel_build(CancelBuildRequest {
            build_id: args.build_id.clone(),
        })
        .await?;
    print_out(&format!("cancelled {}\n", args.build_id))
}

// ---------------------------------------------------------------------------------------
// kiln admin

/// `kiln admin actors`.
pub async fn admin_actors(client: ClientArgs, json: bool) -> Result<(), ClientError> {
    let mut admin = AdminClient::new(connect(&client).await?);
    let actors = admin.list_actors(ListActorsRequest {}).await?.into_inner().actors;
    let text = if json {
        pretty(&actors_json(&actors))
    } else {
        actors_table(&actors)
    };
    print_out(&text)
}

/// `kiln admin restart NAME`: prints the actor's restart count afterwards.
pub async fn admin_restart(client: ClientArgs, name: String) -> Result<(), ClientError> {
    let mut admin = AdminClient::new(connect(&client).await?);
    let resp = admin
        .restart_actor(RestartActorRequest { name })
        .await?
        .into_inner();
    print_out(&format!("{}\n", resp.restarts))
}

/// `kiln admin chaos on|off`: prints how many crashes chaos mode has injected so far.
pub async fn admin_chaos(
    client: ClientArgs,
    enabled: bool,
    kinds: Vec<String>,
    interval: Option<Duration>,
) -> Result<(), ClientError> {
    let mut admin = AdminClient::new(connect(&client).await?);
    let request = SetChaosRequest {
        enabled,
        kinds,
        interval_ms: interval.map_or(0, |i| i.as_millis().max(1) as u64),
    };
    let resp = admin.set_chaos(request).await?.into_inner();
    print_out(&format!(
        "chaos {}; {} crashes injected so far\n",
        if enabled { "on" } else { "off" },
        resp.injected_so_far
    ))
}

/// `kiln admin warm`: warms the service's `warmer.refs` now; prints how many were warmed.
pub async fn admin_warm(client: ClientArgs) -> Result<(), ClientError> {
    let mut admin = AdminClient::new(connect(&client).await?);
    let resp = admin.warm_now(WarmNowRequest {}).await?.into_inner();
    print_out(&warm_summary(resp.images, resp.failed))
}

/// `kiln admin du`: bytes per kind of store entry, with budgets.
pub async fn admin_du(client: ClientArgs, json: bool) -> Result<(), ClientError> {
    let mut admin = AdminClient::new(connect(&client).await?);
    let usage = admin.disk_usage(DiskUsageRequest {}).await?.into_inner();
    let text = if json {
        pretty(&disk_usage_json(&usage))
    } else {
        disk_usage_table(&usage)
    };
    print_out(&text)
}

/// `kiln admin prune [--all|--keep SIZE]`: prints what was removed.
pub async fn admin_prune(client: ClientArgs, all: bool, keep: Option<u64>) -> Result<(), ClientError> {
    let mut admin = AdminClient::new(connect(&client).await?);
    let request = PruneRequest {
        all,
        keep_bytes: keep.unwrap_or(0),
    };
    let resp = admin.prune(request).await?.into_inner();
    print_out(&prune_summary(&resp))
}
