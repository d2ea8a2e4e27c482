//! The request and response body types of [`Idempotency`](crate::Idempotency).

use std::{
    fmt,
    future::Future,
    pin::Pin,
    task::{ready, Context, Poll},
};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{HeaderMap, Response};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use crate::{keyed::capture::CaptureState, BoxError};

pin_project! {
    /// The request body the inner service receives: the buffered body of a
    /// request with a key, or the untouched body of any other request.
    pub struct RequestBody<B> {
        #[pin]
        kind: RequestKind<B>,
    }
}

pin_project! {
    #[project = RequestProj]
    enum RequestKind<B> {
        Buffered { data: Option<Bytes> },
        Streaming { #[pin] body: B },
    }
}

impl<B> RequestBody<B> {
    pub(crate) fn buffered(data: Bytes) -> Self {
        Self {
            kind: RequestKind::Buffered {
                data: (!data.is_empty()).then_some(data),
            },
        }
    }

    pub(crate) fn streaming(body: B) -> Self {
        Self {
            kind: RequestKind::Streaming { body },
        }
    }
}

impl<B> fmt::Debug for RequestBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            RequestKind::Buffered { data } => f
                .debug_struct("RequestBody::Buffered")
                .field("len", &data.as_ref().map_or(0, Bytes::len))
                .finish(),
            RequestKind::Streaming { .. } => f.write_str("RequestBody::Streaming"),
        }
    }
}

impl<B> Body for RequestBody<B>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        match self.project().kind.project() {
            RequestProj::Buffered { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            RequestProj::Streaming { body } => poll_mapped(body, cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            RequestKind::Buffered { data } => data.is_none(),
            RequestKind::Streaming { body } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            RequestKind::Buffered { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, Bytes::len) as u64)
            }
            RequestKind::Streaming { body } => body.size_hint(),
        }
    }
}

pin_project! {
    /// The response body: the inner service's body, streamed while it is
    /// captured on first use, a replayed or problem body, or the untouched
    /// body of a pass-through.
    pub struct ResponseBody<B> {
        #[pin]
        kind: ResponseKind<B>,
    }
}

pin_project! {
    #[project = ResponseProj]
    enum ResponseKind<B> {
        Inner { #[pin] body: B },
        // Trailers are rare: boxed, they keep every response small to move.
        Full { data: Option<Bytes>, trailers: Option<Box<HeaderMap>> },
        // Boxed: the capture state is several hundred bytes, and every
        // response is moved up through a few futures on its way out.
        Capturing { state: Box<CaptureState<B>> },
    }
}

impl<B> ResponseBody<B> {
    pub(crate) fn inner(body: B) -> Self {
        Self {
            kind: ResponseKind::Inner { body },
        }
    }

    pub(crate) fn full(data: Bytes, trailers: Option<HeaderMap>) -> Self {
        Self {
            kind: ResponseKind::Full {
                data: (!data.is_empty()).then_some(data),
                trailers: trailers.map(Box::new),
            },
        }
    }

    pub(crate) fn capturing(state: Box<CaptureState<B>>) -> Self {
        Self {
            kind: ResponseKind::Capturing { state },
        }
    }

    /// The capture of a body still being stored, if this is one.
    pub(crate) fn into_capture(self) -> Option<Box<CaptureState<B>>> {
        match self.kind {
            ResponseKind::Capturing { state } => Some(state),
            ResponseKind::Inner { .. } | ResponseKind::Full { .. } => None,
        }
    }
}

impl<B> fmt::Debug for ResponseBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match &self.kind {
            ResponseKind::Inner { .. } => "ResponseBody::Inner",
            ResponseKind::Full { .. } => "ResponseBody::Full",
            ResponseKind::Capturing { .. } => "ResponseBody::Capturing",
        })
    }
}

impl<B> Body for ResponseBody<B>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        match self.project().kind.project() {
            ResponseProj::Inner { body } => poll_mapped(body, cx),
            ResponseProj::Full { data, trailers } => Poll::Ready(match data.take() {
                Some(data) => Some(Ok(Frame::data(data))),
                None => trailers.take().map(|t| Ok(Frame::trailers(*t))),
            }),
            ResponseProj::Capturing { state } => state.poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            ResponseKind::Inner { body } => body.is_end_stream(),
            ResponseKind::Full { data, trailers } => data.is_none() && trailers.is_none(),
            ResponseKind::Capturing { state } => state.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            ResponseKind::Inner { body } => body.size_hint(),
            ResponseKind::Full { data, trailers } => {
                let len = data.as_ref().map_or(0, Bytes::len) as u64;
                // A body with trailers must not look exact: an HTTP/1.1
                // server would send it with `Content-Length`, which leaves
                // no room for trailers, instead of chunked.
                if trailers.is_some() {
                    let mut hint = SizeHint::new();
                    hint.set_lower(len);
                    hint
                } else {
                    SizeHint::with_exact(len)
                }
            }
            ResponseKind::Capturing { state } => state.size_hint(),
        }
    }
}

/// A response whose body is already whole, such as a problem document.
pub(crate) fn whole<B>(response: Response<Bytes>) -> Response<ResponseBody<B>> {
    response.map(|body| ResponseBody::full(body, None))
}

fn poll_mapped<B>(
    body: Pin<&mut B>,
    cx: &mut Context<'_>,
) -> Poll<Option<Result<Frame<Bytes>, BoxError>>>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    Poll::Ready(match ready!(body.poll_frame(cx)) {
        Some(Ok(frame)) => Some(Ok(frame.map_data(|mut d| d.copy_to_bytes(d.remaining())))),
        Some(Err(err)) => Some(Err(err.into())),
        None => None,
    })
}

pin_project! {
    /// Reads a request body whole: a body that arrives in one chunk is kept
    /// as that chunk, one in several is joined once.
    pub(crate) struct Buffer<B> {
        #[pin]
        body: B,
        first: Option<Bytes>,
        joined: BytesMut,
    }
}

impl<B> Buffer<B> {
    pub(crate) fn new(body: B) -> Self {
        Self {
            body,
            first: None,
            joined: BytesMut::new(),
        }
    }
}

impl<B: Body> Future for Buffer<B> {
    type Output = Result<Bytes, B::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        while let Some(frame) = ready!(this.body.as_mut().poll_frame(cx)?) {
            // Request trailers are not part of what is fingerprinted or
            // passed on.
            let Ok(mut data) = frame.into_data() else {
                continue;
            };
            match this.first.take() {
                None if this.joined.is_empty() => {
                    *this.first = Some(data.copy_to_bytes(data.remaining()));
                }
                first => {
                    if let Some(first) = first {
                        this.joined.put(first);
                    }
                    this.joined.put(data);
                }
            }
        }
        Poll::Ready(Ok(match this.first.take() {
            Some(first) => first,
            None => std::mem::take(this.joined).freeze(),
        }))
    }
}
