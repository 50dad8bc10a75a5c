//! The machinery that lets one actor crash without losing anything: child guards, the
//! directory of current addresses, and calls that survive a restart.
//!
//! actix's own `Supervisor` does not restart an actor whose handler panicked, so Kiln
//! supervises by hand:
//! - every supervised actor owns a [`ChildGuard`]; when the actor is dropped (normally or
//!   during a panic's unwind) the guard tells the supervisor, which starts a new incarnation;
//! - callers never keep an `Addr`: they go through a [`Slot`], which always holds the current
//!   incarnation's address and, when a call finds the actor gone, waits for the restart and
//!   retries, then gives up with [`Unavailable`];
//! - state that must outlive a crash is kept by the actor in a `State` object that the
//!   supervisor hands, untouched, to the next incarnation (actix's `Supervised` keeps the
//!   struct in the same way).
//!
//! Messages sent through a slot must be idempotent: a message whose reply was lost may be
//! delivered again to the next incarnation.

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, RwLock,
    },
    time::Duration,
};

use actix::{dev::ToEnvelope, prelude::*};
use tokio::sync::watch;

pub use crate::model::ActorKind;

/// The reply of an actor that is down and did not come back in time. Retryable.
#[derive(Debug, Clone, thiserror::Error)]
#[error("actor {actor} is unavailable (restarting); retry")]
pub struct Unavailable {
    pub actor: String,
}

/// Makes an actor fail as if it had crashed (`Admin.RestartActor`, chaos tests). Every
/// supervised actor handles it by panicking, which exercises the real crash path.
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "()")]
pub struct Crash;

/// The panic payload of an injected [`Crash`], so the panic hook can tell it from a bug.
pub const INJECTED_CRASH: &str = "kiln: injected crash (RestartActor)";

/// Sent by a [`ChildGuard`] when its actor is gone.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct ChildDied {
    pub name: Arc<str>,
    pub generation: u64,
    /// True when the actor died in a panic's unwind; false for a normal stop.
    pub panicked: bool,
}

/// Held by every supervised actor; reports the actor's end to its supervisor on drop.
pub struct ChildGuard {
    name: Arc<str>,
    generation: u64,
    supervisor: Recipient<ChildDied>,
}

impl ChildGuard {
    pub(super) fn new(name: Arc<str>, generation: u64, supervisor: Recipient<ChildDied>) -> Self {
        Self {
            name,
            generation,
            supervisor,
        }
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        // do_send never panics (a second panic during unwind would abort the process).
        self.supervisor.do_send(ChildDied {
            name: self.name.clone(),
            generation: self.generation,
            panicked: std::thread::panicking(),
        });
    }
}

/// The current address of one supervised actor, replaced on every restart.
pub struct Slot<A: Actor> {
    name: Arc<str>,
    addr: RwLock<Option<Addr<A>>>,
    /// Bumped on every (re)start so waiting callers wake up.
    generation: watch::Sender<u64>,
    /// Calls sent and not yet answered: the `mailbox_len` of `ListActors`.
    in_flight: AtomicU64,
    /// How long a call waits for a crashed actor to come back before answering Unavailable.
    restart_wait: Duration,
    /// Set when the supervisor gave up on the actor: calls fail at once instead of waiting
    /// for a restart that will not come.
    abandoned: AtomicBool,
}

impl<A: Actor> Slot<A> {
    pub fn new(name: impl Into<Arc<str>>, restart_wait: Duration) -> Arc<Self> {
        Arc::new(Self {
            name: name.into(),
            addr: RwLock::new(None),
            generation: watch::Sender::new(0),
            in_flight: AtomicU64::new(0),
            restart_wait,
            abandoned: AtomicBool::new(false),
        })
    }

    /// The supervisor abandoned this actor (restart budget exhausted).
    pub fn mark_abandoned(&self) {
        self.abandoned.store(true, Ordering::Relaxed);
        self.generation.send_modify(|g| *g += 1);
    }

    pub fn is_abandoned(&self) -> bool {
        self.abandoned.load(Ordering::Relaxed)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Installs the address of a new incarnation.
    pub fn install(&self, addr: Addr<A>) {
        *self.addr.write().unwrap_or_else(|e| e.into_inner()) = Some(addr);
        self.generation.send_modify(|g| *g += 1);
    }

    fn current(&self) -> Option<Addr<A>> {
        self.addr
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .filter(|a| a.connected())
    }

    /// Waits until a live incarnation newer than `seen` is installed.
    async fn wait_for_restart(&self, seen: u64) -> bool {
        let mut rx = self.generation.subscribe();
        let wait = async {
            loop {
                if *rx.borrow_and_update() > seen && self.current().is_some() {
                    return;
                }
                if rx.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        };
        tokio::time::timeout(self.restart_wait, wait).await.is_ok()
    }

    /// Sends `msg` to the current incarnation. If the actor is gone (crashed before or
    /// while handling it), waits for its restart and sends it again.
    pub async fn call<M>(&self, msg: M) -> Result<M::Result, Unavailable>
    where
        M: Message + Send + Clone + 'static,
        M::Result: Send,
        A: Handler<M>,
        A::Context: ToEnvelope<A, M>,
    {
        const ATTEMPTS: usize = 4;
        for _ in 0..ATTEMPTS {
            if self.is_abandoned() {
                break;
            }
            let seen = *self.generation.borrow();
            let Some(addr) = self.current() else {
                if !self.wait_for_restart(seen).await {
                    break;
                }
                continue;
            };
            self.in_flight.fetch_add(1, Ordering::Relaxed);
            let reply = addr.send(msg.clone()).await;
            self.in_flight.fetch_sub(1, Ordering::Relaxed);
            match reply {
                Ok(value) => return Ok(value),
                Err(MailboxError::Closed) | Err(MailboxError::Timeout) => {
                    if !self.wait_for_restart(seen).await {
                        break;
                    }
                }
            }
        }
        Err(Unavailable {
            actor: self.name.to_string(),
        })
    }

    /// Sends without waiting for a reply; dropped if the actor is down.
    pub fn tell<M>(&self, msg: M)
    where
        M: Message + Send + 'static,
        M::Result: Send,
        A: Handler<M>,
        A::Context: ToEnvelope<A, M>,
    {
        if let Some(addr) = self.current() {
            addr.do_send(msg);
        }
    }
}
