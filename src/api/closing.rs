//! Streams open when Kiln stops. A Build or Logs stream still open at shutdown ends with
//! `Unavailable` — never a clean end without the build's `done_*` message, which Gitpod's
//! server would take for a broken build — so the caller calls again and reaches the restarted
//! Kiln, where the build goes on.

use std::pin::Pin;

use futures::{Stream, StreamExt as _};
use tokio::sync::watch;
use tonic::Status;

/// A stream of replies or a status.
pub type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// What a stream cut by a shutdown ends with.
pub const CLOSING: &str =
    "Kiln is restarting: this stream ends here but the build goes on; call again to follow it";

/// Whether Kiln is closing its streams: `true` once it is (set by the server at shutdown,
/// after the grace for running builds).
#[derive(Debug, Clone)]
pub struct Closing(watch::Receiver<bool>);

impl Closing {
    pub fn new(closing: watch::Receiver<bool>) -> Self {
        Self(closing)
    }

    /// Resolves once Kiln closes its streams (or the server is gone).
    pub async fn closed(&self) {
        let mut closing = self.0.clone();
        // An error means the sender is gone: the server is, too.
        let _ = closing.wait_for(|closing| *closing).await;
    }

    /// `inner` until it ends, or until Kiln closes its streams: then one `Unavailable`.
    /// An item `inner` has ready goes out first.
    pub fn guard<T: Send + 'static>(&self, inner: ResponseStream<T>) -> ResponseStream<T> {
        let state = Some((inner, self.0.clone()));
        Box::pin(futures::stream::unfold(state, |state| async move {
            let (mut inner, mut closing) = state?;
            let next = tokio::select! {
                biased;
                item = inner.next() => Some(item),
                // A dropped sender means the server is gone: closing as well.
                _ = closing.wait_for(|closing| *closing) => None,
            };
            match next {
                Some(item) => item.map(|item| (item, Some((inner, closing)))),
                None => Some((Err(Status::unavailable(CLOSING)), None)),
            }
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_stream_cut_by_closing_ends_unavailable_and_an_ended_one_is_left_alone() {
        let (tx, rx) = watch::channel(false);
        let closing = Closing::new(rx);

        let ended: ResponseStream<u32> = Box::pin(futures::stream::iter([Ok(1), Ok(2)]));
        let items: Vec<_> = closing.guard(ended).collect().await;
        assert_eq!(
            items.iter().map(|i| *i.as_ref().unwrap()).collect::<Vec<_>>(),
            [1, 2]
        );

        let (item_tx, item_rx) = tokio::sync::mpsc::unbounded_channel();
        let open: ResponseStream<u32> =
            Box::pin(tokio_stream::wrappers::UnboundedReceiverStream::new(item_rx));
        let mut guarded = closing.guard(open);
        item_tx.send(Ok(7)).unwrap();
        assert_eq!(guarded.next().await.unwrap().unwrap(), 7);
        tx.send_replace(true);
        let status = guarded.next().await.unwrap().unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert!(guarded.next().await.is_none(), "nothing after the Unavailable");

        // A stream opened after closing ends at once.
        let late: ResponseStream<u32> = Box::pin(futures::stream::pending());
        let first = closing.guard(late).next().await.unwrap();
        assert_eq!(first.unwrap_err().code(), tonic::Code::Unavailable);
    }
}
