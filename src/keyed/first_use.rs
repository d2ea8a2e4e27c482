//! The first use of a key: the inner service's call, driven while the
//! lock is held, and the store write of its response.

use std::{
    future::Future,
    pin::Pin,
    task::{ready, Context, Poll},
};

use http::Response;
use http_body::Body;
use pin_project_lite::pin_project;

use super::{
    background::{finish_in_background, StoreWrite},
    lock::LockGuard,
    respond::respond,
};
use crate::{body::ResponseBody, policy::ClientDisconnect, BoxError};

type FirstUseResult<B, E> = Result<Response<ResponseBody<B>>, E>;

type BoxRun<B, E> = Pin<Box<dyn Future<Output = FirstUseResult<B, E>> + Send>>;

/// The inner service's call for a held key, and the storing of its
/// response, in one allocation with the call inside it. The work runs
/// inside the caller's own future and response body; only if the client
/// goes away before the response is stored does the rest move to a task of
/// its own. With [`ClientDisconnect::Cancel`] a call still running is
/// dropped instead and the key released; once the handler has answered,
/// its store write lands whatever the policy.
pub(crate) struct FirstUse<B, E> {
    run: Option<BoxRun<B, E>>,
    detach: bool,
    /// Made where the bounds are known, since `Drop` cannot ask for them.
    finish: fn(BoxRun<B, E>),
}

impl<B, E> FirstUse<B, E>
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
    E: Send + 'static,
{
    pub(crate) fn new<F>(call: F, lock: LockGuard) -> Self
    where
        F: Future<Output = Result<Response<B>, E>> + Send + 'static,
    {
        let detach = lock.shared.config.on_disconnect == ClientDisconnect::Detach;
        Self {
            run: Some(Box::pin(Run::Calling {
                call,
                lock: Some(lock),
            })),
            detach,
            finish: finish::<B, E>,
        }
    }
}

impl<B, E> Future for FirstUse<B, E> {
    type Output = FirstUseResult<B, E>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let run = self.run.as_mut().expect("FirstUse polled after completion");
        let output = ready!(run.as_mut().poll(cx));
        self.run = None;
        Poll::Ready(output)
    }
}

pin_project! {
    /// The call, renewing the lease while it waits, then the store write of
    /// its response (or the release of the key if it failed), awaited
    /// before the response is handed back so that no retry can overtake it.
    #[project = RunProj]
    enum Run<F, B, E> {
        Calling { #[pin] call: F, lock: Option<LockGuard> },
        Storing { response: Option<Response<ResponseBody<B>>>, write: StoreWrite },
        Releasing { err: Option<E>, write: StoreWrite },
        Done,
    }
}

impl<F, B, E> Future for Run<F, B, E>
where
    F: Future<Output = Result<Response<B>, E>>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    type Output = FirstUseResult<B, E>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            let next = match self.as_mut().project() {
                RunProj::Calling { call, lock } => {
                    let Poll::Ready(result) = call.poll(cx) else {
                        if let Some(lock) = lock {
                            lock.keep_alive();
                        }
                        return Poll::Pending;
                    };
                    let lock = lock.take().expect("the lock stays until the call is done");
                    // The call goes before its response is looked at: what
                    // it still holds (a permit, a body's sender) is let go.
                    self.set(Run::Done);
                    match result {
                        Ok(response) => {
                            let (response, write) = respond(response, lock);
                            Run::Storing {
                                response: Some(response),
                                write,
                            }
                        }
                        Err(err) => Run::Releasing {
                            err: Some(err),
                            write: StoreWrite::new(lock.release()),
                        },
                    }
                }
                RunProj::Storing { response, write } => {
                    ready!(Pin::new(write).poll(cx));
                    let response = response.take().expect("stored once");
                    self.set(Run::Done);
                    return Poll::Ready(Ok(response));
                }
                RunProj::Releasing { err, write } => {
                    ready!(Pin::new(write).poll(cx));
                    let err = err.take().expect("released once");
                    self.set(Run::Done);
                    return Poll::Ready(Err(err));
                }
                RunProj::Done => panic!("first use polled after completion"),
            };
            self.set(next);
        }
    }
}

/// Runs an abandoned first use to its end from a task, and reads the rest
/// of a body being stored.
fn finish<B, E>(run: BoxRun<B, E>)
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
    E: Send + 'static,
{
    let rest = async move {
        // Only a body being stored needs reading; nobody reads the rest of
        // one that is not.
        if let Ok(response) = run.await {
            if let Some(capture) = response.into_body().into_capture() {
                capture.read_to_end().await;
            }
        }
    };
    // Without a runtime the run is dropped, and its lease bounds the key.
    let _ = finish_in_background(rest);
}

impl<B, E> Drop for FirstUse<B, E> {
    fn drop(&mut self) {
        let Some(run) = self.run.take() else {
            return;
        };
        // A panic out of the call unwinds through the keyed future that
        // awaits this one, which drops it then: it is never run on.
        if self.detach && !std::thread::panicking() {
            (self.finish)(run);
        }
    }
}
