//! The supervisor: starts every other actor, restarts the ones that crash, and answers
//! `ListActors` / `RestartActor`.
//!
//! Children are described by a [`ChildSpec`] whose `spawn` function starts one incarnation
//! on an arbiter. When a child's [`ChildGuard`] reports its death, the supervisor starts the
//! next incarnation after an exponential backoff, unless the child used up its restart
//! budget (`supervision.max_restarts` within `supervision.window`); then it is abandoned.
//! A long-lived child abandoned turns health NOT_SERVING. Builds are transient children: a
//! build actor that stops normally is forgotten, one that panics is restarted like any
//! other, and one abandoned is ended (`on_abandon`) and forgotten too, so it does not hold
//! health down.
//!
//! The supervisor itself is an actix `Supervised` actor: `RestartActor("supervisor")` stops
//! it, actix restarts it in place with its fields intact, and `started()` re-arms the
//! restart timers that the stop dropped.

use std::{
    collections::{BTreeMap, VecDeque},
    sync::Arc,
    time::{Duration, Instant},
};

use actix::prelude::*;
use tokio::sync::oneshot;

use super::{
    chaos::{self, Candidate},
    supervision::{ActorKind, ChildDied, ChildGuard, Crash},
};
use crate::{config::SupervisionConfig, metrics::Metrics};

/// Starts one incarnation of a child on the given arbiter and returns how to crash it.
pub type SpawnFn = Arc<dyn Fn(&ArbiterHandle, ChildGuard) -> Recipient<Crash> + Send + Sync>;

/// When a child is restarted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartMode {
    /// Whenever it stops: long-lived actors.
    Always,
    /// Only when it panicked: build actors, which stop by themselves when the build ends.
    OnPanic,
}

/// Everything the supervisor needs to run one child.
pub struct ChildSpec {
    pub name: Arc<str>,
    pub kind: ActorKind,
    pub restart: RestartMode,
    pub spawn: SpawnFn,
    /// Reads the child's in-flight call count (its slot's), for `ListActors`.
    pub mailbox_len: Arc<dyn Fn() -> u64 + Send + Sync>,
    /// Called once if the child is abandoned after exhausting its restart budget, so that
    /// whoever waits on it gets an answer (a build ends `done_failure`).
    pub on_abandon: Option<Box<dyn FnOnce() + Send>>,
}

/// One row of `ListActors`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActorSummary {
    pub name: String,
    pub kind: ActorKind,
    pub restarts: u64,
    pub mailbox_len: u64,
}

/// Why `RestartActor` failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RestartError {
    #[error("no actor named {0:?}; see ListActors")]
    NotFound(String),
    #[error("actor {0:?} did not come back in time")]
    NotRestarted(String),
}

/// Starts (and from then on supervises) a child.
#[derive(Message)]
#[rtype(result = "()")]
pub struct StartChild(pub ChildSpec);

/// Lists every child and the supervisor itself.
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "Vec<ActorSummary>")]
pub struct ListActors;

/// Makes the named actor crash and waits until it is back; replies its restart count.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<u64, RestartError>")]
pub struct RestartActor {
    pub name: String,
}

/// Whether every child is up or coming back (no child was abandoned).
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "bool")]
pub struct IsHealthy;

/// Crashes one random live actor of `kinds` (chaos mode, see [`chaos`]); replies its name,
/// or `None` when no actor qualifies. An actor whose next crash would exhaust its restart
/// budget is spared.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Option<String>")]
pub struct InjectCrash {
    pub kinds: Vec<ActorKind>,
}

/// The names of the live children of one kind: running, or down and about to be restarted
/// (not abandoned). A new orchestrator incarnation asks for the build actors this way.
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "Vec<Arc<str>>")]
pub struct LiveChildren(pub ActorKind);

/// Stops restarting children: the process is shutting down.
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "()")]
pub struct ShutDown;

enum ChildState {
    Running {
        crash: Recipient<Crash>,
    },
    /// Waiting for its restart timer.
    Down,
    Abandoned,
}

struct Child {
    kind: ActorKind,
    restart: RestartMode,
    spawn: SpawnFn,
    mailbox_len: Arc<dyn Fn() -> u64 + Send + Sync>,
    on_abandon: Option<Box<dyn FnOnce() + Send>>,
    generation: u64,
    restarts: u64,
    /// Crash times within the current window, for the restart budget and the backoff.
    recent: VecDeque<Instant>,
    state: ChildState,
    /// `RestartActor` callers waiting for the next incarnation.
    waiters: Vec<oneshot::Sender<u64>>,
}

/// The root of the actor tree.
pub struct Supervisor {
    policy: SupervisionConfig,
    arbiters: Vec<ArbiterHandle>,
    next_arbiter: usize,
    children: BTreeMap<Arc<str>, Child>,
    restarts: u64,
    shutting_down: bool,
    /// `actors.mailbox_size`.
    mailbox_size: usize,
    metrics: Metrics,
}

/// How long `RestartActor` waits for the crashed actor to come back.
const RESTART_REPLY_TIMEOUT: Duration = Duration::from_secs(30);

impl Supervisor {
    pub fn new(
        policy: SupervisionConfig,
        arbiters: Vec<ArbiterHandle>,
        mailbox_size: usize,
        metrics: Metrics,
    ) -> Self {
        assert!(!arbiters.is_empty(), "the supervisor needs at least one arbiter");
        Self {
            policy,
            arbiters,
            next_arbiter: 0,
            children: BTreeMap::new(),
            restarts: 0,
            shutting_down: false,
            mailbox_size,
            metrics,
        }
    }

    fn next_arbiter(&mut self) -> ArbiterHandle {
        let a = self.arbiters[self.next_arbiter % self.arbiters.len()].clone();
        self.next_arbiter = self.next_arbiter.wrapping_add(1);
        a
    }

    /// Starts the next incarnation of `name`.
    fn spawn_child(&mut self, name: &Arc<str>, ctx: &mut Context<Self>) {
        let arbiter = self.next_arbiter();
        let me = ctx.address().recipient();
        let Some(child) = self.children.get_mut(name) else {
            return;
        };
        if !matches!(child.state, ChildState::Down) {
            return;
        }
        child.generation += 1;
        let guard = ChildGuard::new(name.clone(), child.generation, me);
        let crash = (child.spawn)(&arbiter, guard);
        child.state = ChildState::Running { crash };
        for w in child.waiters.drain(..) {
            let _ = w.send(child.restarts);
        }
    }

    fn schedule_restart(&mut self, name: Arc<str>, delay: Duration, ctx: &mut Context<Self>) {
        ctx.run_later(delay, move |act, ctx| act.spawn_child(&name, ctx));
    }
}

impl Actor for Supervisor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(self.mailbox_size);
        // After an in-place restart, the restart timers of children that were down are gone.
        let down: Vec<_> = self
            .children
            .iter()
            .filter(|(_, c)| matches!(c.state, ChildState::Down))
            .map(|(n, _)| n.clone())
            .collect();
        for name in down {
            let delay = self.policy.backoff_initial;
            self.schedule_restart(name, delay, ctx);
        }
    }
}

impl actix::Supervised for Supervisor {
    fn restarting(&mut self, _ctx: &mut Self::Context) {
        self.restarts += 1;
        self.metrics.actor_restarted(ActorKind::Supervisor);
        tracing::warn!(restarts = self.restarts, "supervisor restarted in place");
    }
}

impl Handler<StartChild> for Supervisor {
    type Result = ();

    fn handle(&mut self, StartChild(spec): StartChild, ctx: &mut Self::Context) {
        let name = spec.name.clone();
        if self
            .children
            .get(&name)
            .is_some_and(|c| !matches!(c.state, ChildState::Abandoned))
        {
            // Idempotent: a child of that name runs (or restarts) already; never two.
            tracing::warn!(actor = %name, "StartChild for a live child ignored");
            return;
        }
        self.children.insert(
            name.clone(),
            Child {
                kind: spec.kind,
                restart: spec.restart,
                spawn: spec.spawn,
                mailbox_len: spec.mailbox_len,
                on_abandon: spec.on_abandon,
                generation: 0,
                restarts: 0,
                recent: VecDeque::new(),
                state: ChildState::Down,
                waiters: Vec::new(),
            },
        );
        self.spawn_child(&name, ctx);
    }
}

impl Handler<ChildDied> for Supervisor {
    type Result = ();

    fn handle(&mut self, died: ChildDied, ctx: &mut Self::Context) {
        if self.shutting_down {
            return;
        }
        let Some(child) = self.children.get_mut(&died.name) else {
            return;
        };
        if child.generation != died.generation || !matches!(child.state, ChildState::Running { .. }) {
            return; // a stale report from an earlier incarnation
        }
        if !died.panicked && child.restart == RestartMode::OnPanic {
            self.children.remove(&died.name);
            return;
        }
        let now = Instant::now();
        child.restarts += 1;
        child.recent.push_back(now);
        while child
            .recent
            .front()
            .is_some_and(|t| now.duration_since(*t) > self.policy.window)
        {
            child.recent.pop_front();
        }
        let kind = child.kind;
        self.metrics.actor_restarted(kind);
        if child.recent.len() > self.policy.max_restarts as usize {
            tracing::error!(actor = %died.name, %kind, restarts = child.restarts, "restart budget exhausted; actor abandoned");
            child.state = ChildState::Abandoned;
            child.waiters.clear();
            if let Some(on_abandon) = child.on_abandon.take() {
                on_abandon();
            }
            if child.restart == RestartMode::OnPanic {
                // A transient child (a build) ends with its abandonment: forgotten, so it
                // neither holds health down nor shows in ListActors for good.
                self.children.remove(&died.name);
            }
            return;
        }
        child.state = ChildState::Down;
        let crashes = child.recent.len();
        tracing::warn!(actor = %died.name, %kind, panicked = died.panicked, restarts = child.restarts, "actor died; restarting");
        let delay = self.policy.backoff(crashes);
        self.schedule_restart(died.name, delay, ctx);
    }
}

impl Handler<ListActors> for Supervisor {
    type Result = MessageResult<ListActors>;

    fn handle(&mut self, _: ListActors, _: &mut Self::Context) -> Self::Result {
        let mut rows = vec![ActorSummary {
            name: "supervisor".into(),
            kind: ActorKind::Supervisor,
            restarts: self.restarts,
            mailbox_len: 0,
        }];
        rows.extend(self.children.iter().map(|(name, c)| ActorSummary {
            name: name.to_string(),
            kind: c.kind,
            restarts: c.restarts,
            mailbox_len: (c.mailbox_len)(),
        }));
        MessageResult(rows)
    }
}

impl Handler<RestartActor> for Supervisor {
    type Result = ResponseFuture<Result<u64, RestartError>>;

    fn handle(&mut self, msg: RestartActor, ctx: &mut Self::Context) -> Self::Result {
        if msg.name == "supervisor" {
            // Stopping a Supervised actor restarts it in place; `restarting()` counts it.
            ctx.stop();
            let restarts = self.restarts + 1;
            return Box::pin(async move { Ok(restarts) });
        }
        let Some(child) = self.children.get_mut(msg.name.as_str()) else {
            return Box::pin(async move { Err(RestartError::NotFound(msg.name)) });
        };
        let (tx, rx) = oneshot::channel();
        child.waiters.push(tx);
        if let ChildState::Running { crash } = &child.state {
            crash.do_send(Crash);
        }
        Box::pin(async move {
            match tokio::time::timeout(RESTART_REPLY_TIMEOUT, rx).await {
                Ok(Ok(restarts)) => Ok(restarts),
                _ => Err(RestartError::NotRestarted(msg.name)),
            }
        })
    }
}

impl Handler<IsHealthy> for Supervisor {
    type Result = bool;

    fn handle(&mut self, _: IsHealthy, _: &mut Self::Context) -> bool {
        !self
            .children
            .values()
            .any(|c| matches!(c.state, ChildState::Abandoned))
    }
}

impl Handler<LiveChildren> for Supervisor {
    type Result = MessageResult<LiveChildren>;

    fn handle(&mut self, LiveChildren(kind): LiveChildren, _: &mut Self::Context) -> Self::Result {
        MessageResult(
            self.children
                .iter()
                .filter(|(_, c)| c.kind == kind && !matches!(c.state, ChildState::Abandoned))
                .map(|(name, _)| name.clone())
                .collect(),
        )
    }
}

impl Handler<ShutDown> for Supervisor {
    type Result = ();

    fn handle(&mut self, _: ShutDown, _: &mut Self::Context) {
        self.shutting_down = true;
    }
}

impl Handler<InjectCrash> for Supervisor {
    type Result = Option<String>;

    fn handle(&mut self, msg: InjectCrash, ctx: &mut Self::Context) -> Option<String> {
        if self.shutting_down {
            return None;
        }
        let now = Instant::now();
        let (window, budget) = (self.policy.window, self.policy.max_restarts as usize);
        let victim = {
            let mut candidates = vec![Candidate {
                name: "supervisor",
                kind: ActorKind::Supervisor,
            }];
            candidates.extend(
                self.children
                    .iter()
                    .filter(|(_, c)| {
                        matches!(c.state, ChildState::Running { .. })
                            && c.recent
                                .iter()
                                .filter(|t| now.duration_since(**t) <= window)
                                .count()
                                < budget
                    })
                    .map(|(name, c)| Candidate { name, kind: c.kind }),
            );
            chaos::pick(&candidates, &msg.kinds, &mut rand::rng())?.to_owned()
        };
        if victim == "supervisor" {
            // As RestartActor("supervisor"): actix restarts it in place.
            ctx.stop();
        } else if let Some(Child {
            state: ChildState::Running { crash },
            ..
        }) = self.children.get(victim.as_str())
        {
            crash.do_send(Crash);
        }
        Some(victim)
    }
}
