//! Tasks an actor owns, and replies those tasks send later.
//!
//! actix polls every future in an actor's context whenever any one of them is woken. A
//! thousand callers each waiting in one context (a `ResponseActFuture` per call) therefore
//! cost a million polls while they wait. Instead, a handler hands its slow work to a task
//! the actor owns ([`OwnedTasks::reply_later`]) and answers with [`Later`]: the task sends
//! the reply itself and is polled only when it is woken.
//!
//! The tasks belong to one incarnation: they are aborted when it is dropped (a crash or a
//! stop), so their callers see the mailbox closed — exactly as if the work had been a future
//! in the context — and their `Slot` asks the next incarnation. No work of a dead
//! incarnation goes on beside the next one's. A panic in a task crashes its owner
//! ([`TaskPanicked`]), as a panic in a handler would.

use std::{future::Future, panic::AssertUnwindSafe};

use actix::{
    dev::{MessageResponse, OneshotSender},
    prelude::*,
};
use futures::FutureExt as _;
use tokio::{sync::oneshot, task::JoinSet};

/// A handler's answer: a value now, or a reply sent later by whoever holds its [`Replier`]
/// (a task of the actor, or the actor itself when a later message completes the work).
pub struct Later<T>(Reply<T>);

enum Reply<T> {
    Now(T),
    Deferred(oneshot::Sender<OneshotSender<T>>),
}

/// Sends the reply of a deferred [`Later`]. Dropping it unsent closes the caller's request
/// (`MailboxError::Closed`), as a crash of the actor would.
pub struct Replier<T>(oneshot::Receiver<OneshotSender<T>>);

impl<T> Later<T> {
    /// An answer known at once.
    pub fn now(value: T) -> Self {
        Self(Reply::Now(value))
    }

    /// An answer to be sent with the returned [`Replier`].
    pub fn deferred() -> (Self, Replier<T>) {
        let (caller_to, caller) = oneshot::channel();
        (Self(Reply::Deferred(caller_to)), Replier(caller))
    }
}

impl<T> Replier<T> {
    /// Sends the reply from the actor's context. actix hands the caller's end over right
    /// after the handler that made the pair returns, before the actor handles anything
    /// else, so a later message always finds it.
    pub fn send(mut self, value: T) {
        if let Ok(tx) = self.0.try_recv() {
            let _ = tx.send(value);
        }
    }

    /// Sends the reply from a task, waiting for the caller's end if need be.
    async fn send_from_task(self, value: T) {
        if let Ok(tx) = self.0.await {
            let _ = tx.send(value);
        }
    }
}

impl<A, M> MessageResponse<A, M> for Later<M::Result>
where
    A: Actor,
    M: Message,
{
    fn handle(self, _: &mut A::Context, tx: Option<OneshotSender<M::Result>>) {
        // `None` for `do_send`: nobody waits, the result is dropped.
        let Some(tx) = tx else { return };
        match self.0 {
            Reply::Now(value) => {
                let _ = tx.send(value);
            }
            Reply::Deferred(caller_to) => {
                let _ = caller_to.send(tx);
            }
        }
    }
}

/// A panic caught in a task, as an error.
#[derive(Debug, thiserror::Error)]
#[error("panicked: {0}")]
pub struct Panicked(String);

/// Runs `work`, turning a panic in it into [`Panicked`].
pub async fn catch_panic<T>(work: impl Future<Output = T>) -> Result<T, Panicked> {
    AssertUnwindSafe(work)
        .catch_unwind()
        .await
        .map_err(|payload| Panicked(panic_message(payload.as_ref())))
}

/// Sent to an actor by one of its tasks that panicked; the actor's handler panics with
/// the same message, so the supervisor restarts it.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct TaskPanicked(pub String);

impl TaskPanicked {
    /// Re-raises the task's panic in the actor.
    pub fn resume(self) -> ! {
        std::panic::panic_any(self.0)
    }
}

/// The tasks of one actor incarnation; dropping it aborts them.
#[derive(Default)]
pub struct OwnedTasks {
    tasks: JoinSet<()>,
}

impl OwnedTasks {
    /// Runs `work` as a task of the actor; the returned [`Later`] is the handler's answer,
    /// sent when `work` ends.
    pub fn reply_later<A, T>(
        &mut self,
        ctx: &mut Context<A>,
        work: impl Future<Output = T> + 'static,
    ) -> Later<T>
    where
        A: Actor<Context = Context<A>> + Handler<TaskPanicked>,
        T: 'static,
    {
        let (later, replier) = Later::deferred();
        self.spawn(ctx, async move { replier.send_from_task(work.await).await });
        later
    }

    /// Runs `work` as a task of the actor.
    pub fn spawn<A>(&mut self, ctx: &mut Context<A>, work: impl Future<Output = ()> + 'static)
    where
        A: Actor<Context = Context<A>> + Handler<TaskPanicked>,
    {
        // Finished tasks stay in the set until joined: reap them as new ones come, so the
        // set holds only what runs (amortised O(1)).
        while self.tasks.try_join_next().is_some() {}
        let owner = ctx.address().recipient();
        self.tasks.spawn_local(async move {
            if let Err(Panicked(message)) = catch_panic(work).await {
                owner.do_send(TaskPanicked(message));
            }
        });
    }

    /// Tasks not yet reaped (running, or finished since the last spawn).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.tasks.len()
    }
}

/// A panic payload as text.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a task panicked".to_owned())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// Answers `Slow` after the given time from a task it owns.
    #[derive(Default)]
    struct Owner {
        tasks: OwnedTasks,
    }

    impl Actor for Owner {
        type Context = Context<Self>;
    }

    #[derive(Message)]
    #[rtype(result = "u32")]
    struct Slow(u32, Duration);

    impl Handler<Slow> for Owner {
        type Result = Later<u32>;

        fn handle(&mut self, Slow(n, after): Slow, ctx: &mut Context<Self>) -> Later<u32> {
            self.tasks.reply_later(ctx, async move {
                tokio::time::sleep(after).await;
                n
            })
        }
    }

    #[derive(Message)]
    #[rtype(result = "()")]
    struct PanicInTask;

    impl Handler<PanicInTask> for Owner {
        type Result = ();

        fn handle(&mut self, _: PanicInTask, ctx: &mut Context<Self>) {
            self.tasks.spawn(ctx, async { panic!("boom in a task") });
        }
    }

    #[derive(Message)]
    #[rtype(result = "()")]
    struct Stop;

    impl Handler<Stop> for Owner {
        type Result = ();

        fn handle(&mut self, _: Stop, ctx: &mut Context<Self>) {
            ctx.stop();
        }
    }

    #[derive(Message)]
    #[rtype(result = "usize")]
    struct Pending;

    impl Handler<Pending> for Owner {
        type Result = usize;

        fn handle(&mut self, _: Pending, _: &mut Context<Self>) -> usize {
            self.tasks.len()
        }
    }

    impl Handler<TaskPanicked> for Owner {
        type Result = ();

        fn handle(&mut self, msg: TaskPanicked, ctx: &mut Context<Self>) {
            // A supervised actor re-raises it (`msg.resume()`); here the test only needs to
            // see it arrive, so the actor stops instead.
            assert_eq!(msg.0, "boom in a task");
            ctx.stop();
        }
    }

    #[actix::test]
    async fn replies_come_from_the_tasks_in_any_order_and_finished_tasks_are_reaped() {
        let owner = Owner::default().start();
        let slow = owner.send(Slow(1, Duration::from_millis(200)));
        let fast = owner.send(Slow(2, Duration::from_millis(1)));
        let (slow, fast) = futures::join!(slow, fast);
        assert_eq!((slow.unwrap(), fast.unwrap()), (1, 2));
        // Both finished; the next spawn reaps them.
        owner.send(Slow(3, Duration::ZERO)).await.unwrap();
        assert_eq!(owner.send(Pending).await.unwrap(), 1);
    }

    #[actix::test]
    async fn a_stopped_owner_aborts_its_tasks_and_its_callers_see_the_mailbox_closed() {
        let owner = Owner::default().start();
        let waiting = owner.send(Slow(1, Duration::from_secs(3600)));
        let waiting = actix::spawn(waiting);
        tokio::time::sleep(Duration::from_millis(20)).await;
        owner.do_send(Stop);
        let answer = tokio::time::timeout(Duration::from_secs(10), waiting)
            .await
            .expect("the caller is answered when the owner stops")
            .unwrap();
        assert!(matches!(answer, Err(MailboxError::Closed)), "{answer:?}");
    }

    #[actix::test]
    async fn a_panicking_task_is_reported_to_its_owner() {
        let owner = Owner::default().start();
        owner.send(PanicInTask).await.unwrap();
        let stopped = async {
            while owner.connected() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), stopped)
            .await
            .expect("the owner heard of the panic and stopped");
    }
}
