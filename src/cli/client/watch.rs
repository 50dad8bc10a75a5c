//! `kiln build` and `kiln logs`: submitting a build, then following its status and log to
//! the end, resuming the log stream where it broke off.

use super::*;

/// What `kiln build` shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Display {
    /// Status lines, the build log as it is written, the final `done:` line.
    Follow,
    /// Status lines and the final `done:` line (`--no-follow`).
    StatusOnly,
    /// Only the workspace image ref, on success (`--quiet`).
    Quiet,
}

/// `kiln build`: start or join the build, show its status and log, end with its ref.
pub async fn build(args: BuildArgs) -> Result<(), ClientError> {
    let mut client = builder(&args.client).await?;
    let request = match &args.dir {
        None => build_request(&args)?,
        Some(dir) => {
            let dockerfile = args.dockerfile.as_deref().unwrap_or("Dockerfile");
            let digest = upload_dir(&mut client, dir, dockerfile, args.quiet).await?;
            BuildRequest {
                source: Some(build_source_with(&args, Some(digest))?),
                auth: registry_auth(&args.auth_additional, args.allow_all_auth)?,
                force_rebuild: args.force,
                ..Default::default()
            }
        }
    };
    let display = if args.quiet {
        Display::Quiet
    } else if args.no_follow {
        Display::StatusOnly
    } else {
        Display::Follow
    };
    run_build(client, request, display, io::stdout()).await
}

/// Sends `request`, then reads the status stream and, with [`Display::Follow`], the build's
/// log stream at the same time, writing to `out` until both have ended.
pub async fn run_build<W: Write>(
    mut client: ImageBuilderClient<Transport>,
    request: BuildRequest,
    display: Display,
    out: W,
) -> Result<(), ClientError> {
    let mut builds = client.build(request).await?.into_inner();
    let mut printer = ProgressPrinter::new(out);
    let mut view = BuildView::default();

    let mut build_open = true;
    let mut logs: Option<Streaming<LogsResponse>> = None;
    let mut logs_requested = false;
    let mut log_deadline: Option<Instant> = None;

    while build_open || logs.is_some() {
        tokio::select! {
            message = builds.message(), if build_open => match message? {
                Some(resp) => {
                    if view.update(&resp) && display != Display::Quiet {
                        printer.line(&view.status_line())?;
                    }
                    let running = view.status == Some(BuildStatus::Running);
                    if display == Display::Follow && running && !logs_requested && !view.build_id.is_empty() {
                        logs_requested = true;
                        let request = LogsRequest { build_id: view.build_id.clone(), offset: 0, ..Default::default() };
                        match client.logs(request).await {
                            Ok(response) => logs = Some(response.into_inner()),
                            Err(status) => log_unavailable(&mut printer, &status)?,
                        }
                    }
                    if view.is_done() {
                        // The terminal message: stop reading the status stream.
                        build_open = false;
                        log_deadline = Some(Instant::now() + LOG_IDLE_AFTER_BUILD);
                    }
                }
                None => {
                    printer.finish_line()?;
                    return Err(ClientError::BuildFailed(
                        "the service ended the build stream before the build finished".into(),
                    ));
                }
            },
            chunk = next_log(&mut logs) => match chunk {
                Ok(Some(chunk)) => {
                    printer.log_bytes(&chunk.content)?;
                    if log_deadline.is_some() {
                        log_deadline = Some(Instant::now() + LOG_IDLE_AFTER_BUILD);
                    }
                }
                Ok(None) => logs = None,
                Err(status) => {
                    logs = None;
                    log_unavailable(&mut printer, &status)?;
                }
            },
            () = sleep_until(log_deadline) => logs = None,
        }
    }
    printer.finish_line()?;

    match view.status {
        Some(BuildStatus::DoneSuccess) if display == Display::Quiet => Ok(printer.line(&view.workspace_ref)?),
        Some(BuildStatus::DoneSuccess) => Ok(printer.line(&format!("done: {}", view.workspace_ref))?),
        _ if view.message.is_empty() => Err(ClientError::BuildFailed("no message from the service".into())),
        _ => Err(ClientError::BuildFailed(view.message)),
    }
}

/// The next log chunk, or never when there is no log stream (a disabled `select!` branch).
pub(super) async fn next_log(
    logs: &mut Option<Streaming<LogsResponse>>,
) -> Result<Option<LogsResponse>, Status> {
    match logs {
        Some(stream) => stream.message().await,
        None => std::future::pending().await,
    }
}

pub(super) async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// The log could not be followed; the build goes on, so say so and carry on.
pub(super) fn log_unavailable<W: Write>(printer: &mut ProgressPrinter<W>, status: &Status) -> io::Result<()> {
    printer.finish_line()?;
    eprintln!(
        "kiln: not following the build log: {:?}: {}",
        status.code(),
        status.message()
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// kiln logs

pub(super) fn logs_request(build: &BuildSelectorArgs, offset: u64, censored: bool) -> LogsRequest {
    LogsRequest {
        build_ref: build.build_ref.clone().unwrap_or_default(),
        censored,
        build_id: build.build_id.clone().unwrap_or_default(),
        offset,
    }
}

/// `kiln logs`: the log's raw bytes to stdout until the stream ends.
pub async fn logs(args: LogsArgs) -> Result<(), ClientError> {
    let mut client = builder(&args.client).await?;
    let request = logs_request(&args.build, args.offset, args.censored);
    copy_logs(&mut client, request, io::stdout()).await
}

/// Writes a `Logs` stream's bytes to `out` as they arrive, until the stream ends.
pub async fn copy_logs<W: Write>(
    client: &mut ImageBuilderClient<Transport>,
    request: LogsRequest,
    mut out: W,
) -> Result<(), ClientError> {
    let mut stream = client.logs(request).await?.into_inner();
    while let Some(chunk) = stream.message().await? {
        out.write_all(&chunk.content)?;
        out.flush()?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// kiln list / status
