//! The machinery that lets one actor crash without losing anything: child guards, the
//! directory of current addresses, and calls that survive a restart.
//!
//! actix's own `Supervisor` does not restart an actor whose handler panicked, so Kiln
//! supervises by hand:
//! - every supervised actor owns a [`ChildGuard`]; when the actor is dropped (normally or
//!   during a panic's unwind) the guard tells the supervisor, which starts a new incarnation;
//! - callers never keep an `Addr`: they go through a [`Slot`], a watch of the current
//!   incarnation's address that the supervisor publishes; a call that finds the actor gone
//!   waits for the next incarnation and sends again ([`Slot::call_within`], the one retry
//!   loop for calls to actors: backoff between attempts, a deadline, and no wait at all once
//!   the supervisor abandoned the actor), then gives up with [`Unavailable`];
//! - state that must outlive a crash is on disk (the build journal, the logs) or is
//!   announced again by its owners to the next incarnation (build actors re-register with a
//!   new orchestrator); watchers of a slot see each new incarnation ([`Slot::subscribe`]).
//!
//! Messages sent through a slot must be idempotent: a message whose reply was lost may be
//! delivered again to the next incarnation.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
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

/// One incarnation of a supervised actor, as its [`Slot`] publishes it.
pub struct Incarnation<A: Actor> {
    /// Bumped on every (re)start, and when the actor is abandoned.
    generation: u64,
    addr: Option<Addr<A>>,
    /// The supervisor gave up on the actor (restart budget exhausted): no incarnation follows.
    abandoned: bool,
}

impl<A: Actor> Incarnation<A> {
    #[cfg(test)]
    fn generation(&self) -> u64 {
        self.generation
    }

    /// The address, if this incarnation is still alive.
    fn live(&self) -> Option<Addr<A>> {
        self.addr.clone().filter(|a| a.connected())
    }
}

/// Delays between the attempts of a retried call: doubling from `initial` up to `max`.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self { next: initial, max }
    }

    /// The delay before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(self.max);
        delay
    }
}

/// The first pause between two attempts of a call through a [`Slot`].
const RETRY_INITIAL: Duration = Duration::from_millis(5);
/// The longest pause between two attempts of a call through a [`Slot`].
const RETRY_MAX: Duration = Duration::from_millis(500);

/// The current address of one supervised actor, replaced on every restart: a watch the
/// supervisor publishes each new incarnation in (no lock: readers borrow the latest value).
pub struct Slot<A: Actor> {
    name: Arc<str>,
    current: watch::Sender<Incarnation<A>>,
    /// Calls sent and not yet answered: the `mailbox_len` of `ListActors`.
    in_flight: AtomicU64,
    /// How long [`Slot::call`] waits for a crashed actor to come back before answering
    /// Unavailable.
    restart_wait: Duration,
}

impl<A: Actor> Slot<A> {
    pub fn new(name: impl Into<Arc<str>>, restart_wait: Duration) -> Arc<Self> {
        Arc::new(Self {
            name: name.into(),
            current: watch::Sender::new(Incarnation {
                generation: 0,
                addr: None,
                abandoned: false,
            }),
            in_flight: AtomicU64::new(0),
            restart_wait,
        })
    }

    /// The supervisor abandoned this actor (restart budget exhausted): calls fail at once
    /// instead of waiting for a restart that will not come.
    pub fn mark_abandoned(&self) {
        self.current.send_modify(|c| {
            c.generation += 1;
            c.addr = None;
            c.abandoned = true;
        });
    }

    pub fn is_abandoned(&self) -> bool {
        self.current.borrow().abandoned
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Publishes the address of a new incarnation.
    pub fn install(&self, addr: Addr<A>) {
        self.current.send_modify(|c| {
            c.generation += 1;
            c.addr = Some(addr);
        });
    }

    /// Follows the incarnations: the receiver changes whenever a new one is installed (or the
    /// actor is abandoned).
    pub fn subscribe(&self) -> watch::Receiver<Incarnation<A>> {
        self.current.subscribe()
    }

    fn unavailable(&self) -> Unavailable {
        Unavailable {
            actor: self.name.to_string(),
        }
    }

    /// Sends `msg` to the current incarnation; if the actor is gone (crashed before or while
    /// handling it), waits for its restart and sends it again, for up to the slot's restart
    /// wait. See [`Slot::call_within`].
    pub async fn call<M>(&self, msg: M) -> Result<M::Result, Unavailable>
    where
        M: Message + Send + Clone + 'static,
        M::Result: Send,
        A: Handler<M>,
        A::Context: ToEnvelope<A, M>,
    {
        self.call_within(msg, self.restart_wait).await
    }

    /// The one retry loop for calls to actors: sends `msg` to the current incarnation and,
    /// while the actor is down, waits for the next one (and at least a backoff delay, so a
    /// crash loop is not fed as fast as it crashes) and sends again, for up to `patience`.
    /// Gives up at once when the actor is abandoned. Never spins: every wait is on the
    /// slot's watch or a timer.
    pub async fn call_within<M>(&self, msg: M, patience: Duration) -> Result<M::Result, Unavailable>
    where
        M: Message + Send + Clone + 'static,
        M::Result: Send,
        A: Handler<M>,
        A::Context: ToEnvelope<A, M>,
    {
        let deadline = tokio::time::Instant::now() + patience;
        let mut backoff = Backoff::new(RETRY_INITIAL, RETRY_MAX);
        let mut current = self.current.subscribe();
        loop {
            let (seen, addr) = {
                let c = current.borrow_and_update();
                if c.abandoned {
                    return Err(self.unavailable());
                }
                (c.generation, c.live())
            };
            if let Some(addr) = addr {
                self.in_flight.fetch_add(1, Ordering::Relaxed);
                let reply = addr.send(msg.clone()).await;
                self.in_flight.fetch_sub(1, Ordering::Relaxed);
                // Closed: that incarnation died before answering; Timeout is not set.
                if let Ok(value) = reply {
                    return Ok(value);
                }
            }
            let pause = tokio::time::sleep(backoff.next_delay());
            // Wait for a live incarnation newer than the one that failed (or abandonment).
            let newer = async {
                loop {
                    {
                        let c = current.borrow_and_update();
                        if c.abandoned {
                            return true;
                        }
                        if c.generation > seen && c.live().is_some() {
                            return false;
                        }
                    }
                    if current.changed().await.is_err() {
                        // The slot itself is gone: nothing will be installed any more.
                        std::future::pending::<()>().await;
                    }
                }
            };
            match tokio::time::timeout_at(deadline, newer).await {
                Ok(false) => {}
                Ok(true) | Err(_) => return Err(self.unavailable()),
            }
            if tokio::time::timeout_at(deadline, pause).await.is_err() {
                return Err(self.unavailable());
            }
        }
    }

    /// Sends without waiting for a reply; dropped if the actor is down.
    pub fn tell<M>(&self, msg: M)
    where
        M: Message + Send + 'static,
        M::Result: Send,
        A: Handler<M>,
        A::Context: ToEnvelope<A, M>,
    {
        if let Some(addr) = self.current.borrow().live() {
            addr.do_send(msg);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;

    use super::*;

    /// Echoes a number; `Crash` panics it.
    struct Echo;

    impl Actor for Echo {
        type Context = Context<Self>;
    }

    #[derive(Debug, Clone, Message)]
    #[rtype(result = "u32")]
    struct Ping(u32);

    impl Handler<Ping> for Echo {
        type Result = u32;

        fn handle(&mut self, Ping(n): Ping, _: &mut Self::Context) -> u32 {
            n
        }
    }

    impl Handler<Crash> for Echo {
        type Result = ();

        fn handle(&mut self, _: Crash, _: &mut Self::Context) {
            std::panic::panic_any(INJECTED_CRASH);
        }
    }

    /// Forwards every death notice to a channel.
    struct Deaths(mpsc::Sender<(Arc<str>, u64, bool)>);

    impl Actor for Deaths {
        type Context = Context<Self>;
    }

    impl Handler<ChildDied> for Deaths {
        type Result = ();

        fn handle(&mut self, d: ChildDied, _: &mut Self::Context) {
            let _ = self.0.send((d.name, d.generation, d.panicked));
        }
    }

    /// An actor holding a guard, for the guard's tests.
    struct Guarded(#[allow(dead_code)] ChildGuard);

    impl Actor for Guarded {
        type Context = Context<Self>;
    }

    impl Handler<Crash> for Guarded {
        type Result = ();

        fn handle(&mut self, _: Crash, _: &mut Self::Context) {
            std::panic::panic_any(INJECTED_CRASH);
        }
    }

    #[test]
    fn a_child_guard_reports_a_normal_end_and_a_panic() {
        let (tx, rx) = mpsc::channel();
        actix::System::new().block_on(async move {
            let deaths = Deaths(tx).start().recipient();
            // Dropped normally: not panicked.
            drop(ChildGuard::new("a".into(), 3, deaths.clone()));
            // Dropped in a crashed actor's unwind: panicked.
            let guard = ChildGuard::new("b".into(), 7, deaths);
            assert_eq!(guard.generation(), 7);
            let crashed = Guarded(guard).start();
            assert!(crashed.send(Crash).await.is_err(), "the crash answers Closed");
            tokio::task::yield_now().await;
        });
        let mut got: Vec<_> = rx.try_iter().collect();
        got.sort();
        assert_eq!(got, vec![("a".into(), 3, false), ("b".into(), 7, true)]);
    }

    #[test]
    fn a_slot_call_reaches_the_current_incarnation_and_waits_for_a_restart() {
        actix::System::new().block_on(async {
            let slot = Slot::<Echo>::new("echo", Duration::from_secs(30));
            assert_eq!(slot.name(), "echo");
            slot.install(Echo.start());
            assert_eq!(slot.call(Ping(1)).await.unwrap(), 1);
            let first = slot.subscribe().borrow().generation();

            // The actor crashes; a call made meanwhile is answered by the next incarnation.
            let old = slot.subscribe().borrow().live().unwrap();
            assert!(old.send(Crash).await.is_err());
            let call = {
                let slot = slot.clone();
                actix::spawn(async move { slot.call(Ping(2)).await })
            };
            tokio::task::yield_now().await;
            assert!(!call.is_finished(), "the call waits for the restart");
            slot.install(Echo.start());
            assert_eq!(call.await.unwrap().unwrap(), 2);
            assert_eq!(slot.subscribe().borrow().generation(), first + 1);
            assert_eq!(slot.in_flight(), 0);
        });
    }

    #[test]
    fn a_slot_call_gives_up_after_its_patience_and_at_once_when_abandoned() {
        actix::System::new().block_on(async {
            tokio::time::pause();
            let slot = Slot::<Echo>::new("echo", Duration::from_secs(30));
            // Never started: Unavailable once the patience is spent (virtual time).
            let started = tokio::time::Instant::now();
            assert!(slot.call_within(Ping(1), Duration::from_secs(10)).await.is_err());
            assert!(started.elapsed() >= Duration::from_secs(10));

            // Abandoned: no wait at all, however patient the caller.
            let waiting = {
                let slot = slot.clone();
                actix::spawn(async move {
                    let at = tokio::time::Instant::now();
                    let result = slot.call_within(Ping(2), Duration::from_secs(3600)).await;
                    (result.is_err(), at.elapsed())
                })
            };
            tokio::task::yield_now().await;
            slot.mark_abandoned();
            assert!(slot.is_abandoned());
            let (failed, waited) = waiting.await.unwrap();
            assert!(failed);
            assert!(waited < Duration::from_secs(1), "waited {waited:?}");
            let at = tokio::time::Instant::now();
            assert!(slot.call(Ping(3)).await.is_err());
            assert_eq!(at.elapsed(), Duration::ZERO);
            // `tell` to a slot without a live actor drops the message.
            slot.tell(Ping(4));
        });
    }

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        let mut b = Backoff::new(Duration::from_millis(5), Duration::from_millis(30));
        let delays: Vec<_> = (0..5).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(delays, [5, 10, 20, 30, 30]);
    }
}
