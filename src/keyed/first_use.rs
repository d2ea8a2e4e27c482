//! The first use of a key: the inner service's call, driven while the
//! lock is held.

use std::{future::Future, pin::Pin};

use http::Response;
use http_body::Body;

use super::{
    background::{finish_in_background, StoreWrite},
    lock::LockGuard,
    respond::respond,
};
use crate::{body::ResponseBody, policy::ClientDisconnect, BoxError};

/// Drives the inner service's call for a held key, boxed by the caller so
/// that neither it nor the request is carried in this future's state. The
/// work runs inside the caller's own future and response body; only if the
/// client goes away before the response is stored does the rest move to a
/// task of its own (or, with [`ClientDisconnect::Cancel`], get dropped and
/// the key released).
pub(crate) async fn first_use<F, B, E>(
    call: Pin<Box<F>>,
    lock: LockGuard,
) -> Result<Response<ResponseBody<B>>, E>
where
    F: Future<Output = Result<Response<B>, E>> + Send + 'static,
    E: Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let detach = lock.shared.config.on_disconnect == ClientDisconnect::Detach;
    let mut pending = PendingCall {
        call: Some(call),
        lock: Some(lock),
        detach,
        finish: finish_call::<F, B, E>,
    };
    let result = std::future::poll_fn(|cx| match pending.call.as_mut() {
        Some(call) => {
            let poll = call.as_mut().poll(cx);
            if poll.is_pending() {
                if let Some(lock) = pending.lock.as_mut() {
                    lock.keep_alive();
                }
            }
            poll
        }
        None => unreachable!("the call is only taken once it is done"),
    })
    .await;
    pending.call = None;
    let lock = pending
        .lock
        .take()
        .expect("the lock stays until the call is done");
    match result {
        Ok(response) => {
            let (response, write) = respond(response, lock);
            write.await;
            Ok(response)
        }
        Err(err) => {
            StoreWrite::new(lock.release()).await;
            Err(err)
        }
    }
}

/// The inner service's future for a held key, until it yields the response
/// head. Dropped early (the client hung up), it finishes in a task of its
/// own so the response is still stored, unless the policy is to cancel or
/// the drop comes from a panic.
struct PendingCall<F> {
    call: Option<Pin<Box<F>>>,
    lock: Option<LockGuard>,
    detach: bool,
    /// Made where the bounds are known, since `Drop` cannot ask for them.
    finish: fn(Pin<Box<F>>, LockGuard),
}

/// Runs an abandoned call to its end from a task, and stores its response.
fn finish_call<F, B, E>(call: Pin<Box<F>>, mut lock: LockGuard)
where
    F: Future<Output = Result<Response<B>, E>> + Send + 'static,
    E: Send,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let rest = async move {
        lock.keep_alive();
        match call.await {
            Ok(response) => {
                let (response, write) = respond(response, lock);
                write.await;
                // Only a body being stored needs reading; nobody reads the
                // rest of one that is not.
                if let Some(capture) = response.into_body().into_capture() {
                    capture.read_to_end().await;
                }
            }
            Err(_) => lock.release().await,
        }
    };
    // Without a runtime the call is dropped, and its lock released.
    let _ = finish_in_background(rest);
}

impl<F> Drop for PendingCall<F> {
    fn drop(&mut self) {
        let (Some(call), Some(lock)) = (self.call.take(), self.lock.take()) else {
            return;
        };
        if self.detach && !std::thread::panicking() {
            (self.finish)(call, lock);
        }
    }
}
