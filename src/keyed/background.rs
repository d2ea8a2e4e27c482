//! Work that must finish even when nobody waits for it any more.

use std::{
    future::Future,
    pin::Pin,
    task::{ready, Context, Poll},
};

use tracing::Instrument;

/// Runs `work` to its end in a task of the current Tokio runtime, in the
/// current span. Without a runtime, `work` comes back to the caller, whose
/// fallback decides what becomes of it.
///
/// Every drop path that leaves work behind (a release, a completion, a
/// detached handler, a half-read body) goes through here.
pub(crate) fn finish_in_background<F>(work: F) -> Result<(), F>
where
    F: Future<Output = ()> + Send + 'static,
{
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) => {
            runtime.spawn(work.in_current_span());
            Ok(())
        }
        Err(_) => Err(work),
    }
}

/// A completion or release sent to the store, or (the default) none.
/// Dropped before it lands, it lands from a task: once started, a store
/// write must not depend on the client staying.
#[derive(Default)]
pub(crate) struct StoreWrite {
    future: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
}

impl StoreWrite {
    pub(crate) fn new(future: impl Future<Output = ()> + Send + 'static) -> Self {
        Self {
            future: Some(Box::pin(future)),
        }
    }

    pub(crate) fn is_under_way(&self) -> bool {
        self.future.is_some()
    }
}

impl Future for StoreWrite {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if let Some(future) = self.future.as_mut() {
            ready!(future.as_mut().poll(cx));
            self.future = None;
        }
        Poll::Ready(())
    }
}

impl Drop for StoreWrite {
    fn drop(&mut self) {
        if let Some(future) = self.future.take() {
            // Without a runtime the write is dropped; the lock it carries
            // then says so, and its lease bounds the key.
            let _ = finish_in_background(future);
        }
    }
}
