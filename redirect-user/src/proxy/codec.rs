//! HTTP/1.1 message pieces shared by the server side (`connection`) and the upstream client
//! (`upstream`): header sections that share the head's bytes, body framing headers and the
//! chunked decoder (RFC 9112).

use std::ops::Range;

use bytes::{Buf as _, Bytes, BytesMut};
use hyper::{
    HeaderMap,
    header::{self, HeaderName, HeaderValue},
};

/// Heads larger than this are refused (nginx allows 1 KiB plus up to four 8 KiB buffers; hyper
/// about 400 KiB).
pub const MAX_HEAD: usize = 64 << 10;
/// Header lines per head (hyper's default is 100).
pub const MAX_HEADERS: usize = 128;
/// A chunk-size line or trailer line longer than this is refused.
const MAX_LINE: usize = 4 << 10;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CodecError {
    #[error("{0}")]
    Invalid(String),
    #[error("body larger than {0} bytes")]
    TooLarge(usize),
}

/// Where a parsed header's name and value lie in the head.
pub type Span = (Range<usize>, Range<usize>);

/// Records where each of `headers` (parsed out of `head`) lies in `head`, so that the values
/// can later share the head's bytes instead of each being copied.
pub fn record_spans(head: &[u8], headers: &[httparse::Header<'_>], spans: &mut Vec<Span>) {
    let base = head.as_ptr() as usize;
    let offset = |field: &[u8]| {
        // An empty field may point anywhere.
        let start = if field.is_empty() {
            0
        } else {
            field.as_ptr() as usize - base
        };
        start..start + field.len()
    };
    spans.clear();
    spans.extend(
        headers
            .iter()
            .map(|h| (offset(h.name.as_bytes()), offset(h.value))),
    );
}

/// Metadata headers outside `http`'s standard set. `HeaderName::from_bytes` allocates (and
/// lower-cases) every other name on every message that carries it; these are shared instead.
static METADATA_HEADERS: [HeaderName; 4] = [
    HeaderName::from_static("metadata"),
    HeaderName::from_static("metadata-flavor"),
    HeaderName::from_static("x-aws-ec2-metadata-token"),
    HeaderName::from_static("x-aws-ec2-metadata-token-ttl-seconds"),
];

fn header_name(name: &[u8]) -> Option<HeaderName> {
    // By length first: this runs for every header of every message.
    let known = match name.len() {
        8 => &METADATA_HEADERS[0],
        15 => &METADATA_HEADERS[1],
        24 => &METADATA_HEADERS[2],
        36 => &METADATA_HEADERS[3],
        _ => return HeaderName::from_bytes(name).ok(),
    };
    if known.as_str().as_bytes().eq_ignore_ascii_case(name) {
        Some(known.clone())
    } else {
        HeaderName::from_bytes(name).ok()
    }
}

/// The header section located by `spans` in `head`; the values share `head`'s bytes.
///
/// `spans` must be where httparse found the header lines: their values are not checked again.
pub fn header_map(head: &Bytes, spans: &[Span]) -> Result<HeaderMap, CodecError> {
    let mut headers = HeaderMap::with_capacity(spans.len());
    for (name, value) in spans {
        let name = &head[name.clone()];
        let parsed = header_name(name).ok_or_else(|| {
            CodecError::Invalid(format!("header name {:?}", String::from_utf8_lossy(name)))
        })?;
        // SAFETY: httparse accepts in a header value only tab, 0x20..=0x7e and 0x80..=0xff,
        // all of which `HeaderValue` allows (`httparse_values_are_header_values` checks every
        // byte). Checking again cost about 450 instructions per proxied request.
        let value = unsafe { HeaderValue::from_maybe_shared_unchecked(head.slice(value.clone())) };
        headers.append(parsed, value);
    }
    Ok(headers)
}

/// Whether the `Connection` header (all its lines) lists `token`, case-insensitively.
pub fn connection_lists(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Writes one header line in wire form.
pub fn put_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Writes every header of `headers` that `skip` does not name, in wire form.
pub fn put_headers(out: &mut Vec<u8>, headers: &HeaderMap, skip: impl Fn(&HeaderName) -> bool) {
    for (name, value) in headers {
        if !skip(name) {
            put_header(out, name.as_str().as_bytes(), value.as_bytes());
        }
    }
}

/// `None` without `Transfer-Encoding`; otherwise whether chunked is the final coding (the last
/// one of the last line), which is what frames the body (RFC 9112 §6.3).
pub fn chunked(headers: &HeaderMap) -> Option<bool> {
    // One lookup: a header that is present has at least one line.
    let last_line = headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .next_back()?;
    let last = last_line
        .to_str()
        .ok()
        .and_then(|v| v.split(',').map(str::trim).rfind(|t| !t.is_empty()));
    Some(last.is_some_and(|coding| coding.eq_ignore_ascii_case("chunked")))
}

/// Whether every transfer coding listed is `chunked` (with [`chunked`]: whether the body is
/// chunked and nothing else).
pub fn only_chunked(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
        .all(|t| t.eq_ignore_ascii_case(b"chunked"))
}

/// The `Content-Length`, if any. A list of equal values is one length (RFC 9110 §8.6);
/// anything else is an error.
pub fn content_length(headers: &HeaderMap) -> Result<Option<u64>, CodecError> {
    let mut length = None;
    for value in headers.get_all(header::CONTENT_LENGTH) {
        for item in value.as_bytes().split(|&b| b == b',') {
            let item = item.trim_ascii();
            let parsed =
                (!item.is_empty() && item.len() <= 19 && item.iter().all(u8::is_ascii_digit))
                    .then(|| item.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0')));
            match (parsed, length) {
                (Some(n), None) => length = Some(n),
                (Some(n), Some(m)) if n == m => {}
                _ => {
                    return Err(CodecError::Invalid(format!(
                        "Content-Length {:?}",
                        String::from_utf8_lossy(value.as_bytes())
                    )));
                }
            }
        }
    }
    Ok(length)
}

/// An incremental decoder of a chunked body (RFC 9112 §7.1): consumes what has arrived,
/// keeps its place between reads. Chunk extensions and trailer fields are read and dropped.
pub struct Chunked {
    state: ChunkState,
    body: BytesMut,
    limit: usize,
    trailer_bytes: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    Size,
    Data(u64),
    DataEnd,
    Trailers,
    Done,
}

impl Chunked {
    /// A decoder that refuses bodies longer than `limit`.
    pub fn new(limit: usize) -> Self {
        Chunked {
            state: ChunkState::Size,
            body: BytesMut::new(),
            limit,
            trailer_bytes: 0,
        }
    }

    /// Consumes bytes from the front of `buf`; true once the final chunk and the trailer
    /// section are complete (what follows stays in `buf`).
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<bool, CodecError> {
        let invalid = |what: &str| CodecError::Invalid(format!("chunked body: {what}"));
        loop {
            match self.state {
                ChunkState::Size => {
                    let Some(line) = take_line(buf)? else {
                        return Ok(false);
                    };
                    let digits = line
                        .split(|&b| b == b';')
                        .next()
                        .unwrap_or_default()
                        .trim_ascii();
                    if digits.is_empty() || digits.len() > 15 {
                        return Err(invalid("chunk size"));
                    }
                    let mut size = 0u64;
                    for &d in digits {
                        let v = char::from(d)
                            .to_digit(16)
                            .ok_or_else(|| invalid("chunk size"))?;
                        size = size * 16 + u64::from(v);
                    }
                    if size > (self.limit - self.body.len()) as u64 {
                        return Err(CodecError::TooLarge(self.limit));
                    }
                    self.state = if size == 0 {
                        ChunkState::Trailers
                    } else {
                        ChunkState::Data(size)
                    };
                }
                ChunkState::Data(left) => {
                    if buf.is_empty() {
                        return Ok(false);
                    }
                    let take = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                    self.body.extend_from_slice(&buf[..take]);
                    buf.advance(take);
                    let left = left - take as u64;
                    self.state = if left == 0 {
                        ChunkState::DataEnd
                    } else {
                        ChunkState::Data(left)
                    };
                }
                ChunkState::DataEnd => {
                    let Some(line) = take_line(buf)? else {
                        return Ok(false);
                    };
                    if !line.is_empty() {
                        return Err(invalid("no line end after a chunk's data"));
                    }
                    self.state = ChunkState::Size;
                }
                ChunkState::Trailers => {
                    let Some(line) = take_line(buf)? else {
                        return Ok(false);
                    };
                    if line.is_empty() {
                        self.state = ChunkState::Done;
                    } else {
                        self.trailer_bytes += line.len();
                        if self.trailer_bytes > MAX_HEAD {
                            return Err(invalid("trailer section too large"));
                        }
                    }
                }
                ChunkState::Done => return Ok(true),
            }
        }
    }

    /// The decoded body (complete once `decode` returned true).
    pub fn into_body(self) -> Bytes {
        self.body.freeze()
    }
}

/// Takes one line (without its CRLF, or a bare LF) off the front of `buf`, if complete.
fn take_line(buf: &mut BytesMut) -> Result<Option<Bytes>, CodecError> {
    match buf.iter().position(|&b| b == b'\n') {
        Some(end) => {
            let mut line = buf.split_to(end + 1).freeze();
            line.truncate(end);
            if line.last() == Some(&b'\r') {
                line.truncate(end - 1);
            }
            Ok(Some(line))
        }
        None if buf.len() > MAX_LINE => Err(CodecError::Invalid(
            "chunked body: line too long".to_owned(),
        )),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(lines: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in lines {
            map.append(*name, HeaderValue::from_static(value));
        }
        map
    }

    #[test]
    fn chunked_decoding_survives_any_split() {
        let wire = b"4;a=b\r\nWiki\r\n5\r\npedia\r\nE\r\n in\r\n\r\nchunks.\r\n0\nt: 1\r\n\r\nNEXT";
        for split in 0..wire.len() {
            let mut decoder = Chunked::new(1 << 10);
            let mut buf = BytesMut::from(&wire[..split]);
            let mut done = decoder.decode(&mut buf).unwrap();
            buf.extend_from_slice(&wire[split..]);
            done = done || decoder.decode(&mut buf).unwrap();
            assert!(done, "split at {split}");
            assert_eq!(&buf[..], b"NEXT", "what follows is left, split at {split}");
            assert_eq!(
                &decoder.into_body()[..],
                b"Wikipedia in\r\n\r\nchunks.",
                "split at {split}"
            );
        }
    }

    #[test]
    fn chunked_decoding_refuses_bad_input() {
        for (wire, error) in [
            (&b"g\r\n"[..], "chunk size"),
            (b"\r\n", "chunk size"),
            (b"1234567890abcdef0\r\n", "chunk size"),
            (b"3\r\nabcX\r\n", "no line end"),
        ] {
            let mut buf = BytesMut::from(wire);
            let err = Chunked::new(1 << 10).decode(&mut buf).unwrap_err();
            assert!(err.to_string().contains(error), "{wire:?}: {err}");
        }
        let mut buf = BytesMut::from(&b"3\r\nabc\r\n2\r\n"[..]);
        assert_eq!(
            Chunked::new(4).decode(&mut buf),
            Err(CodecError::TooLarge(4))
        );
        let mut buf = BytesMut::from(&[b'1'; MAX_LINE + 1][..]);
        assert!(
            Chunked::new(4).decode(&mut buf).is_err(),
            "endless size line"
        );
    }

    #[test]
    fn framing_headers() {
        assert_eq!(chunked(&headers(&[])), None);
        assert_eq!(
            chunked(&headers(&[
                ("transfer-encoding", "gzip"),
                ("transfer-encoding", "Chunked"),
            ])),
            Some(true)
        );
        assert_eq!(
            chunked(&headers(&[("transfer-encoding", "chunked, gzip")])),
            Some(false)
        );
        assert_eq!(
            content_length(&headers(&[
                ("content-length", "7"),
                ("content-length", "7 , 7")
            ])),
            Ok(Some(7))
        );
        assert_eq!(content_length(&headers(&[])), Ok(None));
        for bad in ["+7", "7 7", "", "7, 8", "99999999999999999999"] {
            assert!(
                content_length(&headers(&[("content-length", bad)])).is_err(),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn metadata_header_names_are_shared_and_lower_case() {
        let head = Bytes::from_static(b"X-aws-ec2-metadata-token: t\r\nX-Other: o\r\n");
        let spans = [(0..24, 26..27), (29..36, 38..39)];
        let map = header_map(&head, &spans).unwrap();
        let names: Vec<&str> = map.keys().map(HeaderName::as_str).collect();
        assert_eq!(names, ["x-aws-ec2-metadata-token", "x-other"]);
        assert_eq!(map["x-aws-ec2-metadata-token"], "t");
        assert!(header_name(b"x y").is_none());
    }

    /// What `header_map` relies on to skip checking values: a byte httparse lets through in a
    /// header value (request or response) is one `HeaderValue` accepts.
    #[test]
    fn httparse_values_are_header_values() {
        let mut accepted_bytes = 0;
        for b in 0..=255u8 {
            let mut request = b"GET / HTTP/1.1\r\nx: a".to_vec();
            request.extend([b, b'z', b'\r', b'\n', b'\r', b'\n']);
            let mut lines = [httparse::EMPTY_HEADER; 4];
            let accepted = httparse::Request::new(&mut lines).parse(&request).is_ok();
            let mut response = b"HTTP/1.1 200 OK\r\nx: a".to_vec();
            response.extend([b, b'z', b'\r', b'\n', b'\r', b'\n']);
            let mut lines = [httparse::EMPTY_HEADER; 4];
            let accepted_in_response = httparse::Response::new(&mut lines).parse(&response).is_ok();
            if accepted || accepted_in_response {
                accepted_bytes += 1;
                assert!(
                    HeaderValue::from_bytes(&[b'a', b, b'z']).is_ok(),
                    "httparse accepts byte {b:#04x}, HeaderValue does not"
                );
            }
        }
        // Tab, 0x20..=0x7e and 0x80..=0xff.
        assert_eq!(accepted_bytes, 1 + 95 + 128);
    }

    #[test]
    fn connection_tokens() {
        let h = headers(&[("connection", "Upgrade, Close"), ("connection", "x")]);
        assert!(connection_lists(&h, "close"));
        assert!(connection_lists(&h, "upgrade"));
        assert!(!connection_lists(&h, "keep-alive"));
    }
}
