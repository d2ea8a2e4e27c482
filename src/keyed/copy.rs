//! The copy of a streaming response kept for the store.

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use http_body::Frame;

use crate::store::{encode_chunks, Completion};

/// What the client was sent, up to the response limit: past it, only the
/// fact that the response is too large to replay.
pub(crate) struct ResponseCopy {
    status: StatusCode,
    headers: HeaderMap,
    chunks: Vec<Bytes>,
    len: usize,
    limit: usize,
    overflowed: bool,
    trailers: Option<HeaderMap>,
}

impl ResponseCopy {
    pub(crate) fn new(status: StatusCode, headers: HeaderMap, limit: usize) -> Self {
        Self {
            status,
            headers,
            chunks: Vec::new(),
            len: 0,
            limit,
            overflowed: false,
            trailers: None,
        }
    }

    /// Adds a frame the client is about to receive.
    pub(crate) fn record(&mut self, frame: &Frame<Bytes>) {
        if self.overflowed {
            return;
        }
        if let Some(data) = frame.data_ref() {
            self.len += data.len();
            if self.len > self.limit {
                self.overflowed = true;
                self.chunks = Vec::new();
                return;
            }
            self.chunks.push(data.clone());
        } else if let Some(trailers) = frame.trailers_ref() {
            self.trailers
                .get_or_insert_with(HeaderMap::new)
                .extend(trailers.iter().map(|(n, v)| (n.clone(), v.clone())));
        }
    }

    /// What the store keeps once the body has ended.
    pub(crate) fn finish(self) -> Completion {
        if self.overflowed {
            return Completion::NotReplayable;
        }
        Completion::Response(encode_chunks(
            self.status,
            &self.headers,
            &self.chunks,
            self.trailers.as_ref(),
        ))
    }
}
