use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};

/// A response as it is kept for replay: status, end-to-end headers, body and
/// trailers.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct StoredResponse {
    /// The status code.
    pub status: StatusCode,
    /// End-to-end headers only; see [`StoredResponse::new`].
    pub headers: HeaderMap,
    /// The whole body.
    pub body: Bytes,
    /// Trailers, if the response had any (gRPC carries its status there).
    pub trailers: Option<HeaderMap>,
}

/// Hop-by-hop headers (RFC 9110 section 7.6.1) describe one connection, not the
/// response, so they are never stored. `content-length` is recomputed from
/// the stored body on replay. `Trailer` is kept: it names the trailer
/// fields, and an HTTP/1.1 server sends only the trailers it names.
static NOT_STORED: [HeaderName; 7] = [
    header::CONNECTION,
    header::TRANSFER_ENCODING,
    header::TE,
    header::UPGRADE,
    header::PROXY_AUTHENTICATE,
    header::CONTENT_LENGTH,
    HeaderName::from_static("keep-alive"),
];

impl StoredResponse {
    /// Builds a record, dropping hop-by-hop headers, the headers that the
    /// `Connection` header names, and `content-length`.
    pub fn new(
        status: StatusCode,
        mut headers: HeaderMap,
        body: Bytes,
        trailers: Option<HeaderMap>,
    ) -> Self {
        let dropped = Dropped::of(&headers);
        // Most responses carry none of these but `content-length`: find the
        // few present in one pass rather than hashing every name to remove.
        let present: Vec<HeaderName> = headers
            .keys()
            .filter(|name| dropped.contains(name))
            .cloned()
            .collect();
        for name in present {
            headers.remove(name);
        }
        Self {
            status,
            headers,
            body,
            trailers,
        }
    }

    /// Encodes the record into a self-describing byte string, for stores that
    /// keep bytes, in one allocation of exactly its length.
    pub fn encode(&self) -> Bytes {
        encode_parts(
            self.status,
            &self.headers,
            &self.body,
            self.trailers.as_ref(),
        )
    }

    /// Decodes what [`StoredResponse::encode`] wrote. The body shares `bytes`.
    pub fn decode(mut bytes: Bytes) -> Result<Self, DecodeError> {
        if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
            return Err(DecodeError("unknown record format"));
        }
        bytes.advance(MAGIC.len());
        let status = StatusCode::from_u16(take_u16(&mut bytes)?)
            .map_err(|_| DecodeError("invalid status code"))?;
        // Room for one header more: a replay adds its own.
        let headers = take_map(&mut bytes, 1)?;
        let trailers = match take_u8(&mut bytes)? {
            0 => None,
            1 => Some(take_map(&mut bytes, 0)?),
            _ => return Err(DecodeError("invalid trailer flag")),
        };
        let len = take_len(&mut bytes)?;
        if bytes.len() != len {
            return Err(DecodeError("body length does not match"));
        }
        Ok(Self {
            status,
            headers,
            body: bytes,
            trailers,
        })
    }
}

/// The headers a record leaves out: the hop-by-hop ones, those the
/// `Connection` header names, and `content-length`.
struct Dropped {
    named: Vec<HeaderName>,
}

impl Dropped {
    fn of(headers: &HeaderMap) -> Self {
        // A walk over the few headers a response has is cheaper than
        // hashing `connection` to look it up.
        let named = headers
            .iter()
            .filter(|(name, _)| *name == header::CONNECTION)
            .filter_map(|(_, v)| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|name| HeaderName::try_from(name.trim()).ok())
            .collect();
        Self { named }
    }

    fn contains(&self, name: &HeaderName) -> bool {
        NOT_STORED.contains(name) || self.named.contains(name) || *name == "proxy-connection"
    }
}

/// Encodes a response as [`StoredResponse::new`] followed by
/// [`StoredResponse::encode`] would, straight from the response's own
/// parts: the layer stores a response this way without copying its header
/// map, and copies the body once, into the record.
pub fn encode_parts(
    status: StatusCode,
    headers: &HeaderMap,
    body: &[u8],
    trailers: Option<&HeaderMap>,
) -> Bytes {
    encode_chunks(status, headers, &[body], trailers)
}

/// [`encode_parts`] for a body captured in chunks, joined as they are
/// copied into the record.
pub(crate) fn encode_chunks<C: AsRef<[u8]>>(
    status: StatusCode,
    headers: &HeaderMap,
    body: &[C],
    trailers: Option<&HeaderMap>,
) -> Bytes {
    let body_len: usize = body.iter().map(|chunk| chunk.as_ref().len()).sum();
    let dropped = Dropped::of(headers);
    let kept = || headers.iter().filter(|(name, _)| !dropped.contains(name));
    let (count, header_bytes) = kept().fold((0, 0), |(count, len), (name, value)| {
        (count + 1, len + 8 + name.as_str().len() + value.len())
    });
    let trailer_bytes = trailers.map_or(0, |map| {
        4 + map
            .iter()
            .map(|(name, value)| 8 + name.as_str().len() + value.len())
            .sum::<usize>()
    });
    let len = MAGIC.len() + 2 + 4 + header_bytes + 1 + trailer_bytes + 8 + body_len;
    let mut out = BytesMut::with_capacity(len);
    out.put_slice(MAGIC);
    out.put_u16(status.as_u16());
    put_fields(&mut out, count, kept());
    match trailers {
        Some(trailers) => {
            out.put_u8(1);
            put_fields(&mut out, trailers.len(), trailers.iter());
        }
        None => out.put_u8(0),
    }
    out.put_u64(body_len as u64);
    for chunk in body {
        out.put_slice(chunk.as_ref());
    }
    debug_assert_eq!(out.len(), len);
    out.freeze()
}

/// A stored record could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct DecodeError(pub(crate) &'static str);

const MAGIC: &[u8] = b"TIR1";

fn put_fields<'a>(
    out: &mut BytesMut,
    count: usize,
    fields: impl Iterator<Item = (&'a HeaderName, &'a HeaderValue)>,
) {
    out.put_u32(count as u32);
    for (name, value) in fields {
        out.put_u32(name.as_str().len() as u32);
        out.put_slice(name.as_str().as_bytes());
        out.put_u32(value.len() as u32);
        out.put_slice(value.as_bytes());
    }
}

fn take_map(bytes: &mut Bytes, spare: usize) -> Result<HeaderMap, DecodeError> {
    let count = take_u32(bytes)? as usize;
    let mut map = HeaderMap::with_capacity(count.min(64) + spare);
    for _ in 0..count {
        let name = take_field(bytes)?;
        let value = take_field(bytes)?;
        let name = HeaderName::from_bytes(&name).map_err(|_| DecodeError("invalid header name"))?;
        let value = HeaderValue::from_maybe_shared(value)
            .map_err(|_| DecodeError("invalid header value"))?;
        // A forged record may name more headers than a map can hold.
        map.try_append(name, value)
            .map_err(|_| DecodeError("too many headers"))?;
    }
    Ok(map)
}

fn take_field(bytes: &mut Bytes) -> Result<Bytes, DecodeError> {
    let len = take_u32(bytes)? as usize;
    if bytes.len() < len {
        return Err(DecodeError("truncated record"));
    }
    Ok(bytes.split_to(len))
}

fn take_len(bytes: &mut Bytes) -> Result<usize, DecodeError> {
    if bytes.len() < 8 {
        return Err(DecodeError("truncated record"));
    }
    usize::try_from(bytes.get_u64()).map_err(|_| DecodeError("body too large"))
}

fn take_u32(bytes: &mut Bytes) -> Result<u32, DecodeError> {
    if bytes.len() < 4 {
        return Err(DecodeError("truncated record"));
    }
    Ok(bytes.get_u32())
}

fn take_u16(bytes: &mut Bytes) -> Result<u16, DecodeError> {
    if bytes.len() < 2 {
        return Err(DecodeError("truncated record"));
    }
    Ok(bytes.get_u16())
}

fn take_u8(bytes: &mut Bytes) -> Result<u8, DecodeError> {
    if bytes.is_empty() {
        return Err(DecodeError("truncated record"));
    }
    Ok(bytes.get_u8())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> StoredResponse {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        headers.append("x-multi", HeaderValue::from_static("a"));
        headers.append("x-multi", HeaderValue::from_static("b"));
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        StoredResponse::new(
            StatusCode::CREATED,
            headers,
            Bytes::from_static(b"{\"id\":1}"),
            Some(trailers),
        )
    }

    #[test]
    fn encoding_round_trips() {
        let record = sample();
        assert_eq!(StoredResponse::decode(record.encode()), Ok(record));
    }

    #[test]
    fn encoding_from_parts_drops_what_a_record_drops() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONNECTION, HeaderValue::from_static("x-private"));
        headers.insert("x-private", HeaderValue::from_static("1"));
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("2"));
        headers.insert("x-kept", HeaderValue::from_static("yes"));
        let body = Bytes::from_static(b"ok");
        let encoded = encode_parts(StatusCode::OK, &headers, &body, None);
        let record = StoredResponse::new(StatusCode::OK, headers, body, None);
        assert_eq!(encoded, record.encode());
        assert_eq!(StoredResponse::decode(encoded), Ok(record));
    }

    #[test]
    fn every_truncation_is_a_decode_error() {
        let encoded = sample().encode();
        for len in 0..encoded.len() {
            assert!(
                StoredResponse::decode(encoded.slice(..len)).is_err(),
                "len {len}"
            );
        }
    }

    #[test]
    fn hop_by_hop_headers_are_not_stored() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, x-private"),
        );
        headers.insert("x-private", HeaderValue::from_static("1"));
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("2"));
        headers.insert("x-kept", HeaderValue::from_static("yes"));
        let record = StoredResponse::new(StatusCode::OK, headers, Bytes::from_static(b"ok"), None);
        assert_eq!(record.headers.len(), 1);
        assert_eq!(record.headers["x-kept"], "yes");
    }
}
