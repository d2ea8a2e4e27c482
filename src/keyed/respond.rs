//! What becomes of the response of a first use.

use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use http::Response;
use http_body::{Body, Frame};

use super::{
    background::StoreWrite,
    capture::{read_ahead_weight, CaptureState, READ_AHEAD_LIMIT},
    copy::ResponseCopy,
    lock::LockGuard,
};
use crate::{body::ResponseBody, http_date, store::encode_parts, store::Completion, BoxError};

/// Releases the key for a response the keep policy refuses; otherwise
/// stores the response: at once if its body is already whole, or as it
/// streams. The store write under way comes back with the response, to be
/// awaited before the response is returned, so that no retry can overtake
/// it.
pub(crate) fn respond<B>(
    response: Response<B>,
    lock: LockGuard,
) -> (Response<ResponseBody<B>>, StoreWrite)
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let (mut head, body) = response.into_parts();
    let config = &lock.shared.config;
    if !config.keep.keeps(&head) {
        return (
            Response::from_parts(head, ResponseBody::inner(body)),
            StoreWrite::new(lock.release()),
        );
    }
    if let Some(name) = &config.expiry_header {
        // Stored with the response, so every replay says the same.
        let expires = std::time::SystemTime::now() + config.ttl;
        head.headers
            .insert(name.clone(), http_date::header_value(expires));
    }
    let mut body = Box::pin(body);
    // What the body has ready now. A body not ready is polled again by the
    // client, which registers its own waker then.
    let mut cx = Context::from_waker(std::task::Waker::noop());
    let mut first = None;
    let at_head = loop {
        if first.is_some() && body.is_end_stream() {
            break BodyAtHead::Whole;
        }
        break match body.as_mut().poll_frame(&mut cx) {
            Poll::Ready(None) => BodyAtHead::Whole,
            Poll::Ready(Some(Ok(frame))) => {
                let frame = frame.map_data(|mut data| data.copy_to_bytes(data.remaining()));
                match frame.into_data() {
                    Ok(data) if first.is_none() => {
                        first = Some(data);
                        continue;
                    }
                    Ok(data) => BodyAtHead::More(Frame::data(data)),
                    Err(trailers) => BodyAtHead::More(trailers),
                }
            }
            Poll::Ready(Some(Err(err))) => BodyAtHead::Failed(err.into()),
            Poll::Pending => BodyAtHead::Pending,
        };
    };
    // Most handlers answer with a body that is already whole: it is stored
    // as it is and goes out as it was stored.
    if let BodyAtHead::Whole = at_head {
        let data = first.unwrap_or_default();
        let completion = if data.len() > config.response_limit {
            Completion::NotReplayable
        } else {
            Completion::Response(encode_parts(head.status, &head.headers, &data, None))
        };
        return (
            Response::from_parts(head, ResponseBody::full(data, None)),
            StoreWrite::new(lock.complete(completion)),
        );
    }
    // A body still being produced is copied as it streams.
    let copy = ResponseCopy::new(head.status, head.headers.clone(), config.response_limit);
    let mut state = Box::new(CaptureState::new(body, copy, lock));
    state.accept(first.map(Frame::data));
    match at_head {
        BodyAtHead::More(frame) => state.accept(Some(frame)),
        BodyAtHead::Failed(err) => state.fail(err),
        BodyAtHead::Whole | BodyAtHead::Pending => {}
    }
    // Frames that are ready go out with the head, up to a bound: a body
    // that is always ready (a stream over memory, an endless one) must not
    // be read whole before the client sees a byte.
    let mut read_ahead = 0;
    while read_ahead < READ_AHEAD_LIMIT {
        let Poll::Ready(Some(frame)) = state.poll_body(&mut cx) else {
            break;
        };
        read_ahead += read_ahead_weight(&frame);
        state.ready.push_back(frame);
    }
    // The rest is read at the client's pace, which may be slower than a
    // lease: the lock is renewed until the body ends.
    state.keep_alive();
    // A body that ended here settles before the response is returned.
    let write = std::mem::take(&mut state.write);
    (
        Response::from_parts(head, ResponseBody::capturing(state)),
        write,
    )
}

/// What a response body had ready when the handler returned its head.
enum BodyAtHead {
    /// At most one data frame, and the end.
    Whole,
    /// A frame beyond the first data frame, or trailers.
    More(Frame<Bytes>),
    /// The body failed.
    Failed(BoxError),
    /// The rest is still being produced.
    Pending,
}
