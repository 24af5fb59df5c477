//! The framing and smuggling corpus: each case is sent verbatim through the real redirect
//! (connect4 rewrite, our proxy in upstream mode) to a recording upstream in the test's
//! namespace, followed by a probe request that closes the connection. Per case, the client
//! must get exactly the answers listed, and the upstream must receive exactly the requests
//! listed: a refusal sends nothing on, and what is sent on means what the client sent (the
//! same method, target and body), framed by Content-Length alone, with one Host, no header
//! name with `_`, nothing added.
//!
//! The cases are our own, in the classes that http-garden's TROPHIES list and
//! defparam/smuggler's Transfer-Encoding mutations document, and every rule of
//! `proxy::admission`.

use super::*;

pub const TESTS: &[(&str, TestFn)] = &[(
    "framing_corpus_is_refused_or_passed_on_faithfully",
    framing_corpus_is_refused_or_passed_on_faithfully,
)];

const PROBE: &[u8] = b"GET /probe HTTP/1.1\r\nHost: 169.254.169.254\r\nConnection: close\r\n\r\n";

/// What the upstream should receive: (method, target, body).
type Sent = (&'static str, &'static str, &'static str);

const PROBED: Sent = ("GET", "/probe", "");

struct Case {
    name: &'static str,
    bytes: std::borrow::Cow<'static, [u8]>,
    /// The statuses of the answers the client gets, in order.
    answers: &'static [u16],
    upstream: &'static [Sent],
}

/// A case whose request, whatever it is, the proxy refuses with `status` and then closes:
/// nothing goes upstream, the probe is never read.
const fn refused(name: &'static str, bytes: &'static [u8], status: u16) -> Case {
    let answers: &'static [u16] = match status {
        400 => &[400],
        405 => &[405],
        413 => &[413],
        414 => &[414],
        431 => &[431],
        501 => &[501],
        _ => panic!("a refusal status of the corpus"),
    };
    Case {
        name,
        bytes: std::borrow::Cow::Borrowed(bytes),
        answers,
        upstream: &[],
    }
}

/// A case whose request is passed on as `sent`, followed by the probe.
const fn passed(name: &'static str, bytes: &'static [u8], sent: &'static [Sent]) -> Case {
    let answers: &'static [u16] = match sent.len() {
        2 => &[200, 200],
        3 => &[200, 200, 200],
        _ => &[200],
    };
    Case {
        name,
        bytes: std::borrow::Cow::Borrowed(bytes),
        answers,
        upstream: sent,
    }
}

const CASES: &[Case] = &[
    // --- baselines
    passed(
        "plain GET",
        b"GET /a HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\n",
        &[("GET", "/a", ""), PROBED],
    ),
    passed(
        "Content-Length body",
        b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc",
        &[("POST", "/a", "abc"), PROBED],
    ),
    passed(
        "chunked body, extension and trailer",
        b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3;x=y\r\nabc\r\n1\r\nd\r\n0\r\nX-Trailer: t\r\n\r\n",
        &[("POST", "/a", "abcd"), PROBED],
    ),
    passed(
        "GET with a body",
        b"GET /a HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc",
        &[("GET", "/a", "abc"), PROBED],
    ),
    passed(
        "pipelined",
        b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n\r\n",
        &[("GET", "/a", ""), ("GET", "/b", ""), PROBED],
    ),
    passed(
        "bare LF line ends (RFC 9112 §2.2 lets a recipient accept them)",
        b"GET /a HTTP/1.1\nHost: x\n\n",
        &[("GET", "/a", ""), PROBED],
    ),
    // --- request targets
    passed(
        "absolute form, our own name: made origin-form",
        b"GET http://169.254.169.254/a?b=1 HTTP/1.1\r\nHost: other\r\n\r\n",
        &[("GET", "/a?b=1", ""), PROBED],
    ),
    refused("absolute form, another host", b"GET http://evil.example/a HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    refused("absolute form, https", b"GET https://169.254.169.254/a HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    refused("relative target", b"GET latest HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    refused("authority form", b"GET 169.254.169.254:80 HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    refused("CONNECT", b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n", 405),
    refused("asterisk form", b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    refused("target that is not a token", b"GET ! HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    refused("bare LF in the request line", b"GET /a\nHTTP/1.1\r\nHost: x\r\n\r\n", 400),
    refused("two spaces in the request line", b"GET  /a HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    refused("method with separators", b"G=\":<>(e),[T];?\" /a HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    refused("version 1.32", b"GET /a HTTP/1.32\r\nHost: x\r\n\r\n", 400),
    refused("version with CR", b"GET /a HTTP/\r\r1.1\r\nHost: x\r\n\r\n", 400),
    refused("version 2.0", b"GET /a HTTP/2.0\r\nHost: x\r\n\r\n", 400),
    // --- Host (RFC 9112 §3.2)
    refused("HTTP/1.1 without Host", b"GET /a HTTP/1.1\r\n\r\n", 400),
    passed(
        "HTTP/1.0 without Host: the upstream gets one",
        b"GET /a HTTP/1.0\r\n\r\n",
        &[("GET", "/a", "")],
    ),
    refused("two Host lines", b"GET /a HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    refused("empty Host", b"GET /a HTTP/1.1\r\nHost: \r\n\r\n", 400),
    refused("Host with userinfo", b"GET /a HTTP/1.1\r\nHost: user@x\r\n\r\n", 400),
    refused("Host with a bad port", b"GET /a HTTP/1.1\r\nHost: x:http\r\n\r\n", 400),
    refused("NUL in Host", b"GET /a HTTP/1.1\r\nHost: google.com\x00.example\r\n\r\n", 400),
    refused("Connection naming Host", b"GET /a HTTP/1.1\r\nHost: x\r\nConnection: host\r\n\r\n", 400),
    // --- header syntax (http-garden)
    refused("NUL in a value", b"GET /a HTTP/1.1\r\nHost: x\r\nX: v\x00alue\r\n\r\n", 400),
    refused("CR in a value", b"GET /a HTTP/1.1\r\nHost: x\r\nX: v\ralue\r\n\r\n", 400),
    refused("bare CR ends a line", b"GET /a HTTP/1.1\r\nHost: x\r\nVisible: :/\rSmuggled: :)\r\n\r\n", 400),
    refused("space before the colon", b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length : 3\r\n\r\nabc", 400),
    refused("whitespace before the first name", b"POST /a HTTP/1.1\r\n\tContent-Length: 3\r\nHost: x\r\n\r\nabc", 400),
    refused("obs-fold", b"GET /a HTTP/1.1\r\nHost: x\r\nX: a\r\n b\r\n\r\n", 400),
    refused("high byte at the end of a name", b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length\x85: 3\r\n\r\nabc", 400),
    refused("separator in a name", b"GET /a HTTP/1.1\r\nHost: x\r\nX(y): z\r\n\r\n", 400),
    refused("empty name", b"GET /a HTTP/1.1\r\nHost: x\r\n: ignored\r\n\r\n", 400),
    refused("line without a colon", b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length 3\r\n\r\nabc", 400),
    refused("name split over two lines", b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-\r\nEncoding: chunked\r\n\r\n0\r\n\r\n", 400),
    refused("head ended by CRLF CR", b"GET /a HTTP/1.1\r\nHost: x\r\n\rZGET /evil HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    passed(
        "underscored names are dropped, not read as framing",
        b"POST /a HTTP/1.1\r\nHost: x\r\nContent_Length: 3\r\nTransfer_Encoding: chunked\r\nContent-Length: 3\r\n\r\nabc",
        &[("POST", "/a", "abc"), PROBED],
    ),
    // --- Content-Length (http-garden)
    refused("Content-Length +3", b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: +3\r\n\r\nabc", 400),
    refused("Content-Length 0x3", b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 0x3\r\n\r\nabc", 400),
    refused("Content-Length 3Z", b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 3Z\r\n\r\nabc", 400),
    refused("Content-Length -3", b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: -3\r\n\r\nabc", 400),
    refused("Content-Length 1_0", b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 1_0\r\n\r\nabc", 400),
    refused("empty Content-Length", b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: \r\n\r\nabc", 400),
    refused("two different Content-Lengths", b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 0\r\n\r\nabc", 400),
    passed(
        "Content-Length with a leading zero is that number",
        b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 03\r\n\r\nabc",
        &[("POST", "/a", "abc"), PROBED],
    ),
    passed(
        "two equal Content-Lengths are one",
        b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
        &[("POST", "/a", "abc"), PROBED],
    ),
    // Both framings: the transfer coding wins (RFC 9112 §6.1) and the connection closes after
    // the answer, so the bytes after the chunked body (here a request to smuggle) are never
    // read. nginx refuses this with 400; neither lets the two framings disagree.
    Case {
        name: "Content-Length and Transfer-Encoding",
        bytes: std::borrow::Cow::Borrowed(b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 40\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"),
        answers: &[200],
        upstream: &[("POST", "/a", "")],
    },
    // --- Transfer-Encoding (smuggler's mutations; nginx: exactly `chunked`, else 501)
    refused("HTTP/1.0 with Transfer-Encoding", b"POST /a HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    refused("two Transfer-Encoding lines", b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    refused("Transfer-Encoding cow, then chunked", b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: cow\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    refused("gzip, chunked", b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 501),
    refused(",chunked", b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: ,chunked\r\n\r\n0\r\n\r\n", 501),
    refused("chunked, cow", b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, cow\r\n\r\n0\r\n\r\n", 400),
    refused("an unknown coding", b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: blegh\r\n\r\n0\r\n\r\n", 400),
    refused("quoted chunked", b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: \"chunked\"\r\n\r\n0\r\n\r\n", 400),
    refused("chunk, truncated", b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunk\r\n\r\n0\r\n\r\n", 400),
    refused("words around chunked", b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: cow chunked bar\r\n\r\n0\r\n\r\n", 400),
    refused("space before the colon", b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n", 400),
    refused("tabs around the colon", b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding\t:\tchunked\r\n\r\n0\r\n\r\n", 400),
    refused("space in the name", b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    refused("leading space (a fold)", b"POST /a HTTP/1.1\r\nHost: x\r\n Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    refused("folded with a bare LF", b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding:\n chunked\r\n\r\n0\r\n\r\n", 400),
    refused("vertical tab", b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding:\x0bchunked\r\n\r\n0\r\n\r\n", 400),
    refused("NBSP around chunked", b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: \xa0chunked\xa0\r\n\r\n0\r\n\r\n", 400),
    refused("0xff before chunked", b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding:\xffchunked\r\n\r\n0\r\n\r\n", 400),
    refused("high byte inside chunked", b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: ch\x96nked\r\n\r\n0\r\n\r\n", 400),
    refused("high byte in the name", b"POST /a HTTP/1.1\r\nHost: x\r\nTransf\x82r-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    refused("CR in the name", b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer\r-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    refused("trailing CR", b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\r\n\r\n0\r\n\r\n", 400),
    refused("hidden after a bare CR", b"POST /a HTTP/1.1\r\nHost: x\r\nX: X\rTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    passed(
        "hidden after a bare LF is a line of its own",
        b"POST /a HTTP/1.1\r\nHost: x\r\nX: X\nTransfer-Encoding: chunked\r\n\r\n1\r\nz\r\n0\r\n\r\n",
        &[("POST", "/a", "z"), PROBED],
    ),
    passed(
        "tab after the colon",
        b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding:\tchunked\r\n\r\n1\r\nz\r\n0\r\n\r\n",
        &[("POST", "/a", "z"), PROBED],
    ),
    passed(
        "trailing tab",
        b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\t\r\n\r\n1\r\nz\r\n0\r\n\r\n",
        &[("POST", "/a", "z"), PROBED],
    ),
    passed(
        "mixed case",
        b"POST /a HTTP/1.1\r\nHost: x\r\nTrAnSFer-EnCODinG: cHuNkeD\r\n\r\n1\r\nz\r\n0\r\n\r\n",
        &[("POST", "/a", "z"), PROBED],
    ),
    // Not framing at all: the body is the next request, which does not parse.
    Case {
        name: "Content-Encoding: chunked is not a transfer coding",
        bytes: std::borrow::Cow::Borrowed(b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Encoding: chunked\r\n\r\n1\r\nz\r\n0\r\n\r\n"),
        answers: &[200, 400],
        upstream: &[("POST", "/a", "")],
    },
    // --- chunk lines (http-garden): 400, and the connection ends
    refused("chunk size 0_2e", b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0_2e\r\n\r\n", 400),
    refused("chunk size -0x0", b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n-0x0\r\n\r\n", 400),
    refused("junk after the size", b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n1these-bytes-never-get-validated\r\nz\r\n0\r\n\r\n", 400),
    refused("empty chunk size", b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n\r\n\r\n", 400),
    refused("whitespace before the size", b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n   0\r\n\r\n", 400),
    refused("bare CR in the size line", b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\r;ABCD\r\nabcde\r\n0\r\n\r\n", 400),
    refused("bare CR in an extension", b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2;a\rb\r\nab\r\n0\r\n\r\n", 400),
    refused("bare LF in an extension", b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2;a\nb\r\nab\r\n0\r\n\r\n", 400),
    refused("bare LF ends the size line", b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2\nab\r\n0\r\n\r\n", 400),
    refused("bare LF after the data", b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\na\r\n0123456789\n0\r\n\r\n", 400),
    refused("junk instead of CRLF after the data", b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcXX0\r\n\r\n", 400),
    refused("chunk size overflows", b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nf0000000000000003\r\nabc\r\n0\r\n\r\n", 400),
    passed(
        "whitespace after the size is allowed before an extension",
        b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n1 ;e\r\nz\r\n0\r\n\r\n",
        &[("POST", "/a", "z"), PROBED],
    ),
    passed(
        "a trailer that looks like a request line",
        b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX:POST /smuggled HTTP/1.1\r\n\r\n",
        &[("POST", "/a", ""), PROBED],
    ),
    // --- sizes
    refused("a body over the limit", b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 65537\r\n\r\n", 413),
    // --- hop-by-hop and added headers
    passed(
        "hop-by-hop headers stay behind, nothing is added",
        b"GET /a HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\nKeep-Alive: 5\r\nTE: trailers\r\nUpgrade: h2c\r\nProxy-Authorization: secret\r\n\r\n",
        &[("GET", "/a", ""), PROBED],
    ),
    passed(
        "Expect: 100-continue is answered here, not sent on",
        b"POST /a HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\nabc",
        &[("POST", "/a", "abc"), PROBED],
    ),
];

/// One request as the recording upstream parsed it.
#[derive(Debug)]
struct Received {
    method: String,
    target: String,
    body: String,
    /// Header lines as (lower-case name, value).
    headers: Vec<(String, String)>,
}

/// A strict recording upstream: it reads requests framed by Content-Length only (what the
/// proxy must send) and answers each with 200 `ok` and its Content-Length.
struct Recorder(support::TestServer<Received>);

impl Recorder {
    fn start(ns: &NetNs, addr: SocketAddr) -> Result<Self> {
        support::TestServer::start(ns, addr, record).map(Recorder)
    }

    fn take(&self) -> Vec<Received> {
        self.0.take()
    }
}

fn record(mut stream: TcpStream, log: &Mutex<Vec<Received>>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let head_end = loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break end;
            }
            match stream.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        let mut lines = head.split("\r\n");
        let mut request_line = lines.next().unwrap_or_default().split(' ');
        let (method, target) = (
            request_line.next().unwrap_or_default().to_owned(),
            request_line.next().unwrap_or_default().to_owned(),
        );
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        let length: usize = headers
            .iter()
            .find(|(n, _)| n == "content-length")
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0);
        while buf.len() < head_end + 4 + length {
            match stream.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let body = String::from_utf8_lossy(&buf[head_end + 4..head_end + 4 + length]).into_owned();
        buf.drain(..head_end + 4 + length);
        log.lock().unwrap().push(Received {
            method,
            target,
            body,
            headers,
        });
        if stream
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            .is_err()
        {
            return;
        }
    }
}

/// The statuses of the responses in `answer`, in order (the proxy's answers carry a
/// Content-Length, or are the last thing before the close).
fn statuses(answer: &[u8]) -> Vec<u16> {
    let mut out = Vec::new();
    let mut rest = answer;
    while let Some(end) = rest.windows(4).position(|w| w == b"\r\n\r\n") {
        let head = String::from_utf8_lossy(&rest[..end]).to_ascii_lowercase();
        let status = head
            .strip_prefix("http/1.1 ")
            .or_else(|| head.strip_prefix("http/1.0 "))
            .and_then(|r| r.get(..3))
            .and_then(|s| s.parse().ok());
        let Some(status) = status else { break };
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        if status != 100 {
            out.push(status);
        }
        rest = &rest[(end + 4 + length).min(rest.len())..];
    }
    out
}

fn framing_corpus_is_refused_or_passed_on_faithfully() -> Result<()> {
    let ns = NetNs::new()?;
    let recorder = Recorder::start(&ns, "127.0.0.1:9080".parse()?)?;
    let cg = TestCgroup::new()?;
    let client = cg.child("client")?;
    let _daemon = Daemon::start(
        &[
            "--upstream",
            "http://127.0.0.1:9080",
            "--cgroup",
            client.to_str().unwrap(),
        ],
        &ns,
        None,
    )?;
    let mut failures = Vec::new();
    let too_many = format!(
        "GET /a HTTP/1.1\r\nHost: x\r\n{}\r\n",
        "A: 1\r\n".repeat(101)
    );
    let too_long = format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(9 << 10));
    let too_big = format!(
        "GET /a HTTP/1.1\r\nHost: x\r\nA: {}\r\n\r\n",
        "a".repeat(33 << 10)
    );
    let sized = [
        ("more than 100 header lines", too_many, 431),
        ("a target over 8 KiB", too_long, 414),
        ("a head over 32 KiB", too_big, 431),
    ]
    .map(|(name, bytes, status)| Case {
        bytes: std::borrow::Cow::Owned(bytes.into_bytes()),
        ..refused(name, b"", status)
    });
    for case in CASES.iter().chain(&sized) {
        let mut raw = command_in(std::env::current_exe()?, Some(&client), Some(&ns))?
            .env(child::ROLE_ENV, "raw")
            .arg("169.254.169.254:80")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()?;
        let mut stdin = raw.stdin.take().context("stdin")?;
        stdin.write_all(&[&case.bytes[..], PROBE].concat())?;
        drop(stdin);
        let out = raw.wait_with_output()?;
        ensure!(out.status.success(), "{}: the raw client failed", case.name);
        let got: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        let answer = got["answer"].as_str().context("answer")?;
        let answers = statuses(answer.as_bytes());
        let received = recorder.take();
        let sent: Vec<(&str, &str, &str)> = received
            .iter()
            .map(|r| (r.method.as_str(), r.target.as_str(), r.body.as_str()))
            .collect();
        let mut wrong = Vec::new();
        if answers != case.answers {
            wrong.push(format!("answers {answers:?}, want {:?}", case.answers));
        }
        if sent != case.upstream {
            wrong.push(format!("upstream got {sent:?}, want {:?}", case.upstream));
        }
        for r in &received {
            let hosts = r.headers.iter().filter(|(n, _)| n == "host").count();
            let bad = r.headers.iter().find(|(n, _)| {
                n.contains('_')
                    || [
                        "transfer-encoding",
                        "x-forwarded-for",
                        "forwarded",
                        "via",
                        "expect",
                    ]
                    .contains(&n.as_str())
            });
            let body_framed = r.body.is_empty()
                || r.headers
                    .iter()
                    .any(|(n, v)| n == "content-length" && *v == r.body.len().to_string());
            if hosts != 1 || bad.is_some() || !body_framed {
                wrong.push(format!("forwarded as {r:?}"));
            }
        }
        if !wrong.is_empty() {
            failures.push(format!("{}: {}", case.name, wrong.join("; ")));
        }
    }
    ensure!(
        failures.is_empty(),
        "{} of {} cases:\n{}",
        failures.len(),
        CASES.len(),
        failures.join("\n")
    );
    Ok(())
}
