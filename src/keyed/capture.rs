//! The response body of a first use, streamed to the client while a copy
//! is kept for the store.

use std::{
    collections::VecDeque,
    future::Future,
    pin::Pin,
    task::{ready, Context, Poll},
};

use bytes::{Buf, Bytes};
use http_body::{Body, Frame, SizeHint};

use super::{
    background::{finish_in_background, StoreWrite},
    copy::ResponseCopy,
    lock::LockGuard,
};
use crate::{store::Completion, BoxError};

/// The handler's body with its copy and its lock. Its end completes the
/// key, its failure releases it; dropped before either (the client hung
/// up), it hands the rest of the stream to a task whatever the disconnect
/// policy: the handler has answered, so its work is done, and a retry
/// must find its response rather than run it again.
pub(crate) struct CaptureState<B> {
    body: Option<Pin<Box<B>>>,
    /// Frames read and copied, not yet handed to the client.
    pub(crate) ready: VecDeque<Frame<Bytes>>,
    copy: Option<ResponseCopy>,
    lock: Option<LockGuard>,
    pub(crate) write: StoreWrite,
    error: Option<BoxError>,
    /// Whether a drop hands the rest to a task: not for the rest itself.
    finish_on_drop: bool,
    /// Made where the bounds are known, since `Drop` cannot ask for them.
    finish: fn(CaptureState<B>),
}

/// How many bytes of a streaming body are read without the client: ahead
/// of its head, or on the spot when it is abandoned (a frame counts at
/// least one). A body that is always ready must not be read whole, or for
/// ever, in one poll or one drop.
pub(crate) const READ_AHEAD_LIMIT: usize = 64 * 1024;

/// What a frame counts against [`READ_AHEAD_LIMIT`]: its bytes, and at
/// least one, so that endless empty frames are bounded too.
pub(crate) fn read_ahead_weight(frame: &Frame<Bytes>) -> usize {
    frame.data_ref().map_or(0, Bytes::len).max(1)
}

/// Reads the rest of an abandoned body into the store. Most bodies are
/// already whole and the memory store answers at once, so this first tries
/// to finish on the spot, up to [`READ_AHEAD_LIMIT`], which lets a retry
/// right after see the replay; the rest goes on in a task.
fn finish_body<B>(mut rest: CaptureState<B>)
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let mut cx = Context::from_waker(std::task::Waker::noop());
    let mut read = 0;
    while read < READ_AHEAD_LIMIT {
        match rest.poll_frame(&mut cx) {
            Poll::Ready(Some(Ok(frame))) => {
                read += read_ahead_weight(&frame);
            }
            Poll::Ready(Some(Err(_))) => {}
            Poll::Ready(None) => return,
            Poll::Pending => break,
        }
    }
    // Without a runtime the rest is dropped; its lock then stays until its
    // lease runs out, since nothing can release it.
    let _ = finish_in_background(rest.read_to_end());
}

impl<B> CaptureState<B>
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    /// Reads the body to its end in the background, yielding as it goes.
    /// A body still running when its key has been held for the longest
    /// holding time is given up on: the key is marked done but not
    /// replayable, never released, since the handler has run.
    pub(crate) async fn read_to_end(mut self) {
        let mut frames = 0_u32;
        while std::future::poll_fn(|cx| self.poll_frame(cx))
            .await
            .is_some()
        {
            frames = frames.wrapping_add(1);
            if frames % 64 == 0 {
                tokio::task::yield_now().await;
                if self.lock.as_ref().is_some_and(LockGuard::held_too_long) {
                    self.give_up();
                }
            }
        }
    }

    fn give_up(&mut self) {
        self.body = None;
        self.copy = None;
        if let Some(lock) = self.lock.take() {
            tracing::warn!("a response body outlived the longest holding time; its key is kept as not replayable");
            self.write = StoreWrite::new(lock.complete(Completion::NotReplayable));
        }
    }
}

impl<B> CaptureState<B> {
    pub(crate) fn new(body: Pin<Box<B>>, copy: ResponseCopy, lock: LockGuard) -> Self
    where
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
        Self {
            body: Some(body),
            ready: VecDeque::new(),
            copy: Some(copy),
            lock: Some(lock),
            write: StoreWrite::default(),
            error: None,
            finish_on_drop: true,
            finish: finish_body::<B>,
        }
    }

    pub(crate) fn is_end_stream(&self) -> bool {
        self.body.is_none()
            && self.ready.is_empty()
            && !self.write.is_under_way()
            && self.error.is_none()
    }

    /// Copies a frame read before this state existed, to be sent next.
    pub(crate) fn accept(&mut self, frame: Option<Frame<Bytes>>) {
        if let Some(frame) = frame {
            if let Some(copy) = self.copy.as_mut() {
                copy.record(&frame);
            }
            self.ready.push_back(frame);
        }
    }

    /// Has the lease keeper renew the lock while the body is unfinished.
    pub(crate) fn keep_alive(&mut self) {
        if let Some(lock) = self.lock.as_mut() {
            lock.keep_alive();
        }
    }

    /// The body failed: the key is released and the client gets the error.
    pub(crate) fn fail(&mut self, err: BoxError) {
        self.body = None;
        self.error = Some(err);
        if let Some(lock) = self.lock.take() {
            self.write = StoreWrite::new(lock.release());
        }
    }
}

impl<B> CaptureState<B>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    pub(crate) fn size_hint(&self) -> SizeHint {
        let ready: u64 = self
            .ready
            .iter()
            .filter_map(Frame::data_ref)
            .map(|data| data.len() as u64)
            .sum();
        let rest = self
            .body
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), |body| body.size_hint());
        let mut hint = SizeHint::new();
        hint.set_lower(rest.lower() + ready);
        // Trailers still to come leave the size open, as for a replay: an
        // exact size would go out as `Content-Length`, with no room for
        // them on HTTP/1.1.
        let trailers = self.ready.iter().any(Frame::is_trailers);
        if let Some(upper) = rest.upper().filter(|_| !trailers) {
            hint.set_upper(upper + ready);
        }
        hint
    }

    pub(crate) fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        loop {
            if let Some(frame) = self.ready.pop_front() {
                return Poll::Ready(Some(Ok(frame)));
            }
            if self.body.is_none() {
                // The completion or release under way, if any, lands first.
                ready!(Pin::new(&mut self.write).poll(cx));
                return Poll::Ready(self.error.take().map(Err));
            }
            if let Some(frame) = ready!(self.poll_body(cx)) {
                return Poll::Ready(Some(Ok(frame)));
            }
        }
    }

    /// The next frame of the handler's body, copied. At its end (or
    /// failure) the body is gone and the completion (or release) starts.
    pub(crate) fn poll_body(&mut self, cx: &mut Context<'_>) -> Poll<Option<Frame<Bytes>>> {
        let Some(body) = self.body.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = body.as_mut().poll_frame(cx);
        if polled.is_pending() {
            if let Some(lock) = self.lock.as_mut() {
                lock.keep_alive();
            }
        }
        match ready!(polled) {
            Some(Ok(frame)) => {
                let frame = frame.map_data(|mut data| data.copy_to_bytes(data.remaining()));
                if let Some(copy) = self.copy.as_mut() {
                    copy.record(&frame);
                }
                Poll::Ready(Some(frame))
            }
            Some(Err(err)) => {
                self.fail(err.into());
                Poll::Ready(None)
            }
            None => {
                self.body = None;
                if let (Some(lock), Some(copy)) = (self.lock.take(), self.copy.take()) {
                    self.write = StoreWrite::new(lock.complete(copy.finish()));
                }
                Poll::Ready(None)
            }
        }
    }
}

impl<B> Drop for CaptureState<B> {
    fn drop(&mut self) {
        // A completion or release under way lands on its own when dropped.
        // Not even while panicking: a panic elsewhere (an outer layer) must
        // not release a key whose handler has answered. A body that panics
        // again when read on fails that task, and only then is its key
        // released, as for a body that returns an error.
        if self.write.is_under_way() || !self.finish_on_drop {
            return;
        }
        let (Some(body), Some(lock)) = (self.body.take(), self.lock.take()) else {
            return;
        };
        (self.finish)(CaptureState {
            body: Some(body),
            ready: VecDeque::new(),
            copy: self.copy.take(),
            lock: Some(lock),
            write: StoreWrite::default(),
            error: None,
            finish_on_drop: false,
            finish: self.finish,
        });
    }
}
