//! The build actor: one per build. It runs the build's job through an executor, writes the
//! build's log, reports status to the orchestrator, and enforces cancellation and the
//! build timeout.
//!
//! The timeout (`builds.timeout`) measures the build's own work: its clock starts when the
//! build gets a slot (`builds.max_concurrent`), so time spent queued behind other builds
//! never counts against it.
//!
//! What a build needs to survive a crash of its actor is its [`BuildRun`], the build's
//! definition that the supervisor's child spec starts every incarnation with: the job, the
//! cancellation token, and two write-once values (watch channels, set by the first
//! incarnation to get there): the deadline and the verdict. A restarted build actor re-syncs
//! its log offset from the log fan-out (the disk is the truth) and runs the (idempotent) job
//! again; a build whose verdict was already decided only re-delivers it.
//!
//! A build actor announces itself to the orchestrator ([`Announce`]) when it starts and
//! again whenever a new orchestrator incarnation is installed, so a restarted orchestrator
//! knows which builds run and can cancel them. Every call to another actor goes through
//! [`Slot::call_within`]: waits while the other is restarting, gives up at once when it was
//! abandoned, never spins.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use actix::prelude::*;
use bytes::Bytes;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use super::{
    log_fanout::{self, LogFanout},
    orchestrator::{Announce, BuildRequest, Plan, Report, StatusUpdate},
    supervision::{ActorKind, ChildGuard, Crash, Slot, INJECTED_CRASH},
    supervisor::{ChildSpec, RestartMode},
    Directory,
};
use crate::{
    executor::{Executor, Job, Ticket},
    metrics::Metrics,
    model::{
        BuildId, BuildOutcome, BuildSource, BuildStatus, ContextSource, DockerfileSource, GitCredentials,
        Secret,
    },
};

pub use crate::executor::RESTART_NOTICE;

/// Asks a build to stop; it ends `done_failure` ("cancelled").
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "()")]
pub struct CancelRun;

/// What every build actor shares.
#[derive(Clone)]
pub struct BuildDeps {
    pub executor: Executor,
    /// Limits builds running at once (`builds.max_concurrent`).
    pub slots: Arc<Semaphore>,
    pub restart_wait: Duration,
    /// `actors.mailbox_size`.
    pub mailbox_size: usize,
    pub metrics: Metrics,
}

/// The decided end of a build, kept so a restarted actor only re-delivers it.
#[derive(Debug, Clone)]
struct Verdict {
    outcome: BuildOutcome,
    message: String,
}

/// One build's state that outlives any incarnation of its actor.
pub struct BuildRun {
    id: BuildId,
    plan: Plan,
    /// When the build times out: `None` until it first gets a build slot (queue time does
    /// not count), then fixed for every later incarnation.
    deadline: watch::Sender<Option<Instant>>,
    timeout: Duration,
    cancel: CancellationToken,
    /// Secrets of the request, censored from the log.
    secrets: Vec<Secret>,
    /// The span context of the call that created the build: every incarnation's `build`
    /// span is its child.
    trace_parent: Option<opentelemetry::trace::SpanContext>,
    /// The decided end, and the log offset its line is written at (so that every
    /// incarnation can (re)write it exactly once). Written once, by the first incarnation
    /// to decide; read by the later ones.
    verdict: watch::Sender<Option<(Verdict, u64)>>,
}

impl BuildRun {
    pub fn new(id: BuildId, plan: Plan, request: &BuildRequest, timeout: Duration) -> Self {
        use base64::Engine as _;
        let encode = |user: &str, password: &Secret| {
            let pair = format!("{user}:{}", password.expose());
            [
                password.clone(),
                Secret::new(base64::engine::general_purpose::STANDARD.encode(pair)),
            ]
        };
        let mut secrets: Vec<Secret> = request
            .auth
            .additional
            .values()
            .flat_map(|c| encode(&c.username, &c.password))
            .collect();
        if let BuildSource::Dockerfile(DockerfileSource {
            context: ContextSource::Git(git),
            ..
        }) = &request.source
        {
            match &git.credentials {
                Some(GitCredentials::Basic { user, password }) => secrets.extend(encode(user, password)),
                Some(GitCredentials::OneTimeSecret { url, .. }) => secrets.push(url.clone()),
                None => {}
            }
        }
        Self {
            secrets,
            deadline: watch::Sender::new(None),
            trace_parent: request.trace_parent.clone(),
            ..Self::adopted(id, plan, timeout)
        }
    }

    /// A build found running elsewhere (a builder pod in the cluster) that this Kiln
    /// follows; `timeout` is what is left of its time, and its clock runs already.
    pub fn adopted(id: BuildId, plan: Plan, timeout: Duration) -> Self {
        Self {
            id,
            plan,
            deadline: watch::Sender::new(Some(Instant::now() + timeout)),
            timeout,
            cancel: CancellationToken::new(),
            secrets: Vec::new(),
            trace_parent: None,
            verdict: watch::Sender::new(None),
        }
    }

    pub fn id(&self) -> &BuildId {
        &self.id
    }

    fn ticket(&self) -> Ticket<'_> {
        Ticket {
            id: &self.id,
            key: &self.plan.key,
            workspace: &self.plan.refs.workspace,
            timeout: self.timeout,
        }
    }

    /// Starts the timeout clock, once: the first incarnation to get a slot sets it.
    fn start_clock(&self) {
        self.deadline.send_if_modified(|deadline| {
            let unset = deadline.is_none();
            if unset {
                *deadline = Some(Instant::now() + self.timeout);
            }
            unset
        });
    }

    /// Resolves when the build's time is up; never while it waits for a slot.
    async fn timed_out(&self) {
        let mut deadline = self.deadline.subscribe();
        let at = match deadline.wait_for(Option::is_some).await {
            Ok(at) => *at,
            // The sender lives in `self`; it cannot be gone while `self` is borrowed.
            Err(_) => None,
        };
        match at {
            Some(at) => tokio::time::sleep_until(at.into()).await,
            None => std::future::pending().await,
        }
    }

    fn verdict(&self) -> Option<(Verdict, u64)> {
        self.verdict.borrow().clone()
    }

    /// Decides the build's end unless an earlier incarnation did; returns the decided one.
    fn decide(&self, verdict: Verdict, log_at: u64) -> (Verdict, u64) {
        self.verdict.send_if_modified(|decided| {
            let first = decided.is_none();
            if first {
                *decided = Some((verdict, log_at));
            }
            first
        });
        self.verdict().expect("decided above")
    }
}

/// The supervisor's description of a build actor.
pub fn child_spec(run: Arc<BuildRun>, deps: BuildDeps, directory: Arc<Directory>) -> ChildSpec {
    let name: Arc<str> = format!("build-{}", run.id).into();
    // The build's own slot: only the supervisor's spawn and `ListActors` use it (the
    // orchestrator reaches the build through what the actor announces).
    let slot = Slot::<BuildActor>::new(name.clone(), deps.restart_wait);
    let mailbox = slot.clone();
    let on_abandon = {
        let directory = directory.clone();
        let id = run.id.clone();
        Box::new(move || {
            // Delivered even while the orchestrator or the fan-out restarts (the supervisor
            // runs this in its own context: the calls go in a task of their own).
            actix::spawn(async move {
                let report = Report {
                    build: id.clone(),
                    seq: None,
                    update: StatusUpdate {
                        status: BuildStatus::DoneFailure,
                        message: "build actor crashed too often; build abandoned".into(),
                    },
                    outcome: Some(BuildOutcome::Failure),
                };
                if let Err(error) = directory
                    .orchestrator
                    .call_within(report, ACTOR_CALL_PATIENCE)
                    .await
                {
                    tracing::error!(build_id = %id, %error, "could not report the abandoned build's end");
                }
                let finish = log_fanout::Finish { build: id.clone() };
                if let Err(error) = directory.logs.call_within(finish, ACTOR_CALL_PATIENCE).await {
                    tracing::error!(build_id = %id, %error, "could not end the abandoned build's log");
                }
            });
        }) as Box<dyn FnOnce() + Send>
    };
    ChildSpec {
        name,
        kind: ActorKind::Build,
        restart: RestartMode::OnPanic,
        spawn: Arc::new(move |arbiter, guard| {
            let (run, deps, directory) = (run.clone(), deps.clone(), directory.clone());
            let addr = BuildActor::start_in_arbiter(arbiter, move |_| BuildActor {
                run,
                deps,
                directory,
                guard,
            });
            slot.install(addr.clone());
            addr.recipient()
        }),
        mailbox_len: Arc::new(move || mailbox.in_flight()),
        on_abandon: Some(on_abandon),
    }
}

/// The build actor.
pub struct BuildActor {
    run: Arc<BuildRun>,
    deps: BuildDeps,
    directory: Arc<Directory>,
    guard: ChildGuard,
}

impl Actor for BuildActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(self.deps.mailbox_size);
        if self.guard.generation() == 1 {
            // Counted once per build actually started (a restarted actor is not a new build).
            self.deps.metrics.build_started();
        }
        ctx.spawn(actix::fut::wrap_future(announce(
            self.run.clone(),
            self.directory.clone(),
            ctx.address().recipient(),
        )));
        let span =
            tracing::info_span!("build", build_id = %self.run.id, incarnation = self.guard.generation());
        super::trace::continue_trace(&span, self.run.trace_parent.as_ref());
        // For the trace only: log lines have the build id, and the workspace once.
        span.set_attribute("kiln.workspace", self.run.plan.refs.workspace.to_string());
        let drive = drive(
            self.run.clone(),
            self.deps.clone(),
            self.directory.clone(),
            self.guard.generation(),
        )
        .instrument(span);
        ctx.spawn(actix::fut::wrap_future(drive).map(|_, _, ctx: &mut Context<Self>| ctx.stop()));
    }
}

/// Announces the build actor to the orchestrator, and again to each new incarnation of it.
async fn announce(run: Arc<BuildRun>, directory: Arc<Directory>, actor: Recipient<CancelRun>) {
    let mut incarnations = directory.orchestrator.subscribe();
    loop {
        incarnations.borrow_and_update();
        let msg = Announce {
            build: run.id.clone(),
            actor: actor.clone(),
            // The first update (running) is the orchestrator's; a build actor reports only
            // its end, which `drive` delivers itself.
            reported: 1,
            deadline: run.deadline.subscribe(),
        };
        if let Err(error) = directory.orchestrator.call_within(msg, ACTOR_CALL_PATIENCE).await {
            tracing::warn!(build_id = %run.id, %error, "could not announce the build to the orchestrator");
        }
        if incarnations.changed().await.is_err() {
            return;
        }
    }
}

impl Handler<CancelRun> for BuildActor {
    type Result = ();

    fn handle(&mut self, _: CancelRun, _: &mut Self::Context) {
        self.run.cancel.cancel();
    }
}

impl Handler<Crash> for BuildActor {
    type Result = ();

    fn handle(&mut self, _: Crash, _: &mut Self::Context) {
        std::panic::panic_any(INJECTED_CRASH);
    }
}

/// Writes a build's log through the fan-out, exactly once per byte, censoring secrets.
struct LogWriter {
    build: BuildId,
    logs: Arc<Slot<LogFanout>>,
    offset: u64,
    secrets: Vec<Secret>,
}

/// How long a build actor's call (a log write, a report) keeps trying while the actor it
/// calls restarts. An abandoned actor ends the wait at once.
const ACTOR_CALL_PATIENCE: Duration = Duration::from_secs(120);

impl LogWriter {
    /// Continues the build's log where it ends now.
    async fn resume(run: &BuildRun, logs: Arc<Slot<LogFanout>>) -> Self {
        let mut writer = Self {
            build: run.id.clone(),
            logs,
            offset: 0,
            secrets: run.secrets.clone(),
        };
        let open = log_fanout::Open {
            build: writer.build.clone(),
        };
        match writer.logs.call_within(open, ACTOR_CALL_PATIENCE).await {
            Ok(Ok(opened)) => writer.offset = opened.append_at,
            Ok(Err(error)) => tracing::error!(build_id = %writer.build, %error, "cannot open build log"),
            Err(error) => tracing::error!(build_id = %writer.build, %error, "cannot open build log"),
        }
        writer
    }

    /// Replaces every secret in `data` with `***`. Secrets shorter than 4 bytes are left
    /// alone: censoring them would mangle ordinary output and protect nothing.
    fn censor(&self, data: &[u8]) -> Vec<u8> {
        let mut out = data.to_vec();
        for secret in self
            .secrets
            .iter()
            .map(|s| s.expose().as_bytes())
            .filter(|s| s.len() >= 4)
        {
            let mut i = 0;
            while i + secret.len() <= out.len() {
                if &out[i..i + secret.len()] == secret {
                    out.splice(i..i + secret.len(), *b"***");
                    i += 3;
                } else {
                    i += 1;
                }
            }
        }
        out
    }

    /// Appends one line of Kiln's own (a notice, the verdict). Past the log's size cap it
    /// goes to the clipped tail like any output, so a clipped log still ends saying how the
    /// build ended.
    async fn line(&mut self, line: &str) {
        self.append(format!("{line}\n").as_bytes(), true).await;
    }

    /// Appends the build's output (censored), exactly once; the fan-out keeps the head and
    /// the tail of a log past `logs.max_bytes_per_build`.
    async fn write(&mut self, data: &[u8]) {
        self.append(data, false).await;
    }

    async fn append(&mut self, data: &[u8], kiln: bool) {
        let data = Bytes::from(self.censor(data));
        let append = log_fanout::Append {
            build: self.build.clone(),
            offset: self.offset,
            data: data.clone(),
            kiln,
        };
        match self.logs.call_within(append, ACTOR_CALL_PATIENCE).await {
            Ok(Ok(next)) => self.offset = next,
            Ok(Err(error)) => tracing::error!(build_id = %self.build, %error, "build log write failed"),
            Err(error) => {
                tracing::error!(build_id = %self.build, %error, "log fan-out unavailable; log line dropped")
            }
        }
    }

    async fn finish(&self) {
        let finish = log_fanout::Finish {
            build: self.build.clone(),
        };
        if let Err(error) = self.logs.call_within(finish, ACTOR_CALL_PATIENCE).await {
            tracing::error!(build_id = %self.build, %error, "could not end the build log");
        }
    }
}

/// Runs (or resumes) one build to its end.
async fn drive(run: Arc<BuildRun>, deps: BuildDeps, directory: Arc<Directory>, incarnation: u64) {
    let mut log = LogWriter::resume(&run, directory.logs.clone()).await;
    // The header goes at offset 0 in one append, from every incarnation: the fan-out
    // acknowledges it when an earlier incarnation wrote it already.
    log.offset = 0;
    log.write(
        format!(
            "build {} of {}\nbase image {}\n",
            run.id, run.plan.refs.workspace, run.plan.refs.base
        )
        .as_bytes(),
    )
    .await;
    let (verdict, log_at) = match run.verdict() {
        Some(v) => v,
        None => {
            if incarnation > 1 {
                log.line(&format!("{RESTART_NOTICE} (incarnation {incarnation}); resuming"))
                    .await;
            }
            let (verdict, stopped) = tokio::select! {
                v = work(&run, &deps, &mut log) => (v, false),
                _ = run.cancel.cancelled() => (Verdict { outcome: BuildOutcome::Cancelled, message: "build cancelled".into() }, true),
                _ = run.timed_out() => (Verdict {
                    outcome: BuildOutcome::Failure,
                    message: format!("build timed out after {}", humantime::format_duration(run.timeout)),
                }, true),
            };
            if stopped {
                if let Err(error) = deps.executor.abort(&run.ticket(), &run.plan.job).await {
                    log.line(&format!("stopping the build's work failed: {error}"))
                        .await;
                }
            }
            run.decide(verdict, log.offset)
        }
    };
    let span = tracing::Span::current();
    span.set_attribute("kiln.outcome", verdict.outcome.as_str());
    if verdict.outcome != BuildOutcome::Success {
        // Not the verdict's message: a failed RUN's ends with its output, which may show a
        // build secret; the trace leaves the installation.
        span.set_status(opentelemetry::trace::Status::error(verdict.outcome.as_str()));
    }
    // The verdict's line at the offset recorded with it: written once whichever
    // incarnation gets here, however often.
    log.offset = log_at;
    log.line(&verdict.message).await;
    // The end is reported (and so recorded on disk) before the log is ended: a Kiln killed
    // in between restarts with a finished build whose log it only has to end, never with an
    // unfinished build whose log says it ended.
    let status = verdict.outcome.status();
    let report = Report {
        build: run.id.clone(),
        seq: Some(1),
        update: StatusUpdate {
            status,
            message: verdict.message.clone(),
        },
        outcome: Some(verdict.outcome),
    };
    directory
        .orchestrator
        .call_within(report, ACTOR_CALL_PATIENCE)
        .await
        .unwrap_or_else(
            |e| tracing::error!(build_id = %run.id, error = %e, "could not report the build's end"),
        );
    log.finish().await;
}

/// The build's work: wait for a slot, run the job, and say how it went.
async fn work(run: &BuildRun, deps: &BuildDeps, log: &mut LogWriter) -> Verdict {
    let _slot = match deps.slots.clone().try_acquire_owned() {
        Ok(permit) => permit,
        Err(_) => {
            let _queued = deps.metrics.build_queued();
            log.line("waiting for a free build slot (builds.max_concurrent)")
                .await;
            deps.slots
                .clone()
                .acquire_owned()
                .await
                .expect("the build semaphore is never closed")
        }
    };
    let _running = deps.metrics.build_running();
    run.start_clock();
    let started = Instant::now();
    let (output, mut output_rx) = mpsc::unbounded_channel::<Bytes>();
    let job: &Job = &run.plan.job;
    let ticket = run.ticket();
    // One budget for every ARG/ENV expansion of the build (`dockerfile::expand`'s limits).
    let execute = crate::engine::dockerfile::with_expansion_budget(deps.executor.run(
        &ticket,
        job,
        &output,
        run.cancel.child_token(),
    ));
    tokio::pin!(execute);
    let result = loop {
        tokio::select! {
            biased;
            Some(chunk) = output_rx.recv() => log.write(&chunk).await,
            result = &mut execute => break result,
        }
    };
    while let Ok(chunk) = output_rx.try_recv() {
        log.write(&chunk).await;
    }
    match result {
        Ok(output) => Verdict {
            outcome: BuildOutcome::Success,
            message: format!(
                "pushed {}@{} in {:.2}s",
                run.plan.refs.workspace,
                output.digest,
                started.elapsed().as_secs_f64()
            ),
        },
        Err(error) => Verdict {
            outcome: BuildOutcome::Failure,
            message: failure_message(&error),
        },
    }
}

/// The most of a failure's reason a verdict carries: any Dockerfile line a person wrote,
/// not one made to fill a client's message limit (the reason may quote the Dockerfile).
const MAX_REASON_CHARS: usize = 4096;

/// A failed build's verdict. Gitpod's server reads a `done_failure` message that starts with
/// `build failed:` as its user's mistake (shown as such, not alerted on as a system error).
/// Control characters of the reason are escaped (no terminal escapes reach a dashboard) and
/// a reason longer than [`MAX_REASON_CHARS`] is cut.
pub(crate) fn failure_message(reason: &dyn std::fmt::Display) -> String {
    let reason = reason.to_string();
    let mut message = String::from("build failed: ");
    for (i, c) in reason.chars().enumerate() {
        if i == MAX_REASON_CHARS {
            message.push_str(" [cut]");
            break;
        }
        match c {
            '\n' | '\t' => message.push(c),
            c if c.is_control() => message.extend(c.escape_default()),
            c => message.push(c),
        }
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_messages_are_bounded_and_escape_control_characters() {
        assert_eq!(
            failure_message(&"line 2: bad\tthing"),
            "build failed: line 2: bad\tthing"
        );
        assert_eq!(
            failure_message(&"a\x1b[2Jb\0"),
            "build failed: a\\u{1b}[2Jb\\u{0}"
        );
        let long = failure_message(&"x".repeat(1 << 20));
        assert!(long.len() < MAX_REASON_CHARS + 64, "{}", long.len());
        assert!(long.ends_with(" [cut]"));
    }
}
