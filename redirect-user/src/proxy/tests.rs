//! The proxy end to end, in process: hyper's server with our rules and limits on in-memory
//! client connections (every timeout on tokio's paused clock) and, for the upstream mode, a
//! scripted stand-in upstream on loopback. The real-kernel tests drive the same through the
//! redirect with real clients.

use std::{net::SocketAddr, time::Duration};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _, DuplexStream, duplex},
    net::{TcpListener, TcpStream},
    sync::mpsc,
    time::Instant,
};

use super::*;
use crate::{
    caller::Peer,
    config::UpstreamSettings,
    mock::{CloudKind, MockValues, Mocks},
};

const ID: &str = "i-0123456789abcdef0";
const GET_ID: &[u8] =
    b"GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\n";

const LIMITS: Limits = Limits {
    max_connections: 64,
    per_caller: 16,
    timeouts: Timeouts {
        idle: Some(Duration::from_secs(75)),
        request_read: Duration::from_secs(10),
        send: Duration::from_secs(60),
    },
};

fn host() -> Peer {
    Peer {
        caller: Arc::new(Caller::new("net:[1]".to_owned(), true, String::new())),
        pid: None,
    }
}

/// The host's callers, none told apart (no kernel to ask).
fn host_callers() -> Arc<HostCallers> {
    let kernel = crate::host_callers::Kernel {
        diag: None,
        pids: None,
        mount: None,
        proc: crate::netns::Procfs("/proc".into()),
    };
    Arc::new(HostCallers::new(
        "net:[1]".to_owned(),
        Arc::default(),
        kernel,
    ))
}

fn names() -> OwnNames {
    OwnNames::new(["169.254.169.254".to_owned(), "127.0.0.1".to_owned()])
}

fn mock() -> Arc<Shared> {
    let backend = Backend::Mock(Arc::new(Mocks::new(CloudKind::Ec2, &MockValues::default())));
    Shared::new(backend, names(), LIMITS, BODY_BUDGET)
}

fn upstream_settings(addr: SocketAddr) -> UpstreamSettings {
    UpstreamSettings {
        url: format!("http://{addr}").parse().unwrap(),
        router: Default::default(),
        connect_timeout: Duration::from_secs(1),
        timeout: Duration::from_secs(5),
        max_request_body: 64 << 10,
    }
}

fn forwarding_to(addr: SocketAddr) -> Arc<Shared> {
    let backend = Backend::Upstream(Box::new(Forwarder::new(
        upstream_settings(addr),
        None,
        Arc::default(),
    )));
    Shared::new(backend, names(), LIMITS, BODY_BUDGET)
}

/// A client connection to `shared`, served on a task of its own.
fn connect(shared: &Arc<Shared>) -> DuplexStream {
    let (client, server) = duplex(64 << 10);
    let shared = Arc::clone(shared);
    tokio::spawn(async move {
        connection::serve(server, &shared, &CancellationToken::new(), host(), None).await
    });
    client
}

/// Sends `request` and reads everything until the proxy closes the connection (at the idle
/// timeout, on the paused clock, if nothing closes it earlier).
async fn exchange(shared: &Arc<Shared>, request: &[u8]) -> String {
    let mut client = connect(shared);
    let (mut read, mut write) = tokio::io::split(&mut client);
    let send = async {
        // A refusal may close before the whole request is taken.
        let _ = write.write_all(request).await;
    };
    let mut out = Vec::new();
    let receive = read.read_to_end(&mut out);
    let ((), received) = tokio::join!(send, receive);
    received.unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

fn status_of(response: &str) -> u16 {
    response
        .strip_prefix("HTTP/1.1 ")
        .and_then(|r| r.get(..3))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not a response: {response:?}"))
}

#[tokio::test(start_paused = true)]
async fn the_mock_keeps_connections_alive_and_answers_pipelined_requests_in_order() {
    let region = b"GET /latest/meta-data/placement/region HTTP/1.1\r\nHost: x\r\n\r\n";
    let out = exchange(&mock(), &[GET_ID, region].concat()).await;
    let (first, second) = out.split_at(out.rfind("HTTP/1.1 ").unwrap());
    assert!(first.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
    assert!(first.ends_with(&format!("\r\n\r\n{ID}")), "{out}");
    assert!(second.ends_with("\r\n\r\nus-east-1"), "{out}");
    for header in ["content-length: 19\r\n", "server: EC2ws\r\n", "date: "] {
        assert!(first.contains(header), "{header}: {out}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_kept_connection_closes_after_the_idle_timeout() {
    let start = Instant::now();
    let out = exchange(&mock(), GET_ID).await;
    assert_eq!(status_of(&out), 200);
    // Idle from when it was parked, one or two PARK_AFTER periods after the answer.
    let idle = Duration::from_secs(75);
    let park = connection::PARK_AFTER;
    assert!(
        (idle + park..=idle + 2 * park).contains(&start.elapsed()),
        "{:?}",
        start.elapsed()
    );
}

#[tokio::test(start_paused = true)]
async fn a_slow_head_is_cut_off_at_the_request_read_timeout() {
    let client = connect(&mock());
    let (mut read, mut write) = tokio::io::split(client);
    write
        .write_all(b"GET /latest/meta-data/ HTTP/1.1\r\n")
        .await
        .unwrap();
    let start = Instant::now();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            if write.write_all(b"X-Slow: 1\r\n").await.is_err() {
                return;
            }
        }
    });
    let mut out = Vec::new();
    read.read_to_end(&mut out).await.unwrap();
    assert!(out.is_empty(), "no answer to half a head");
    assert_eq!(start.elapsed(), Duration::from_secs(10));
}

#[tokio::test(start_paused = true)]
async fn refusals_get_the_status_nginx_gives() {
    let shared = mock();
    let long_target = format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(9 << 10));
    let long_head = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(MAX_HEAD)
    );
    let many_headers = format!(
        "GET / HTTP/1.1\r\nHost: x\r\n{}\r\n",
        "X-H: 1\r\n".repeat(MAX_HEADERS + 1)
    );
    let cases: &[(&[u8], u16)] = &[
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET / HTTP/2.0\r\nHost: x\r\n\r\n", 400),
        (long_target.as_bytes(), 414),
        (long_head.as_bytes(), 431),
        (many_headers.as_bytes(), 431),
        (b"PUT / HTTP/1.1\r\nHost: x\r\nContent-Length: 1x\r\n\r\n", 400),
        (b"PUT / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab", 400),
        (b"PUT / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", 400),
        (b"PUT / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 501),
        (b"PUT / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
        (b"PUT / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
        // The mock takes no body.
        (b"PUT /latest/api/token HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello", 413),
        (b"PUT /latest/api/token HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n0\r\n\r\n", 413),
        (b"GET / HTTP/1.1\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a@b\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: x\r\nConnection: host\r\n\r\n", 400),
        (b"CONNECT evil:443 HTTP/1.1\r\nHost: evil:443\r\n\r\n", 405),
        (b"GET latest HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"GET 169.254.169.254:80 HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"GET http://evil.example/ HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        // A bare LF or CR where a chunk line must end.
        (b"PUT / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n1\na\r\n0\r\n\r\n", 400),
    ];
    for (request, status) in cases {
        let shown = String::from_utf8_lossy(&request[..request.len().min(70)]).into_owned();
        let out = exchange(&shared, request).await;
        assert_eq!(status_of(&out), *status, "{shown:?}: {:.300}", out);
        assert!(!out.contains("100 Continue"), "{out}");
    }
    assert_eq!(
        shared.stats.refused.load(Ordering::Relaxed),
        15,
        "ours, not hyper's"
    );
}

#[tokio::test(start_paused = true)]
async fn an_absolute_target_for_our_own_name_is_served_as_a_path() {
    let out = exchange(
        &mock(),
        b"GET http://169.254.169.254/latest/meta-data/instance-id HTTP/1.1\r\nHost: evil\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&out), 200, "{out}");
    assert!(out.ends_with(ID), "{out}");
}

/// A client that sends its whole oversized body without waiting reads its 413: the proxy
/// lingers, reading, instead of closing on unread bytes (which on TCP is a reset).
#[tokio::test(start_paused = true)]
async fn an_oversized_body_sent_in_full_is_read_off_and_answered() {
    let mut client = connect(&mock());
    let body = vec![b'x'; 512 << 10];
    let head = format!(
        "PUT /latest/api/token HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let (mut read, mut write) = tokio::io::split(&mut client);
    let send = async {
        write.write_all(head.as_bytes()).await?;
        write.write_all(&body).await?;
        write.shutdown().await
    };
    let mut out = Vec::new();
    let (sent, received) = tokio::join!(send, read.read_to_end(&mut out));
    sent.expect("the whole body was taken");
    received.unwrap();
    let out = String::from_utf8(out).unwrap();
    assert_eq!(status_of(&out), 413, "{out}");
}

#[tokio::test(start_paused = true)]
async fn head_responses_carry_the_length_and_no_body() {
    let head = b"HEAD /latest/meta-data/instance-id HTTP/1.1\r\nHost: x\r\n\r\n";
    let out = exchange(&mock(), &[&head[..], GET_ID].concat()).await;
    let (first, second) = out.split_at(out.rfind("HTTP/1.1 ").unwrap());
    assert!(first.contains("content-length: 19\r\n"), "{out}");
    assert!(first.ends_with("\r\n\r\n"), "no body: {out}");
    assert!(second.ends_with(ID), "{out}");
}

#[tokio::test(start_paused = true)]
async fn http_1_0_keep_alive_is_answered_in_kind() {
    let request = b"GET /latest/meta-data/instance-id HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n";
    let out = exchange(&mock(), &[&request[..], &request[..]].concat()).await;
    assert_eq!(
        out.matches("connection: keep-alive\r\n").count(),
        2,
        "{out}"
    );
    assert_eq!(out.matches(ID).count(), 2, "{out}");
}

/// At the connection limit, the connection idle longest is closed to admit the new one.
#[tokio::test]
async fn at_the_limit_the_longest_idle_connection_makes_room() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    let mock = Arc::new(Mocks::new(CloudKind::Ec2, &MockValues::default()));
    let limits = Limits {
        max_connections: 2,
        ..LIMITS
    };
    let proxy = Proxy::spawn(
        vec![vec![listener]],
        &host_callers(),
        || Backend::Mock(Arc::clone(&mock)),
        names(),
        limits,
        &CancellationToken::new(),
        Duration::from_secs(5),
    )
    .unwrap();
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut c = TcpStream::connect(addr).await.unwrap();
        assert!(get(&mut c).await.ends_with(ID));
        held.push(c);
    }
    let mut third = TcpStream::connect(addr).await.unwrap();
    assert!(get(&mut third).await.ends_with(ID), "served at once");
    assert_eq!(
        held[0].read(&mut [0; 16]).await.unwrap(),
        0,
        "the oldest was closed"
    );
    assert!(
        get(&mut held[1]).await.ends_with(ID),
        "the younger one kept"
    );
    assert_eq!(proxy.stats().evicted.load(Ordering::Relaxed), 1);
}

/// At the limit with every connection busy, the new one waits, and is admitted as soon as
/// one of them is idle again (not when the idle timeout closes one).
#[tokio::test]
async fn at_the_limit_with_every_connection_busy_the_first_to_be_idle_makes_room() {
    let slow = vec![
        Reply::After(Duration::from_millis(100), OK),
        Reply::Send(OK),
    ];
    let (upstream, mut seen) = stand_in(vec![slow.clone(), slow, vec![Reply::Send(OK)]]).await;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    // Without the wait, the new connection would be admitted only when this closes one.
    let limits = Limits {
        max_connections: 2,
        timeouts: Timeouts {
            idle: Some(Duration::from_secs(30)),
            ..LIMITS.timeouts
        },
        ..LIMITS
    };
    let proxy = Proxy::spawn(
        vec![vec![listener]],
        &host_callers(),
        || {
            Backend::Upstream(Box::new(Forwarder::new(
                upstream_settings(upstream),
                None,
                Arc::default(),
            )))
        },
        names(),
        limits,
        &CancellationToken::new(),
        Duration::from_secs(5),
    )
    .unwrap();
    const GET: &[u8] = b"GET /x HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\n";
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(GET).await.unwrap();
        held.push(c);
    }
    for _ in 0..2 {
        seen.recv().await.unwrap(); // both requests are upstream: both connections busy
    }
    let mut third = TcpStream::connect(addr).await.unwrap();
    third.write_all(GET).await.unwrap();
    let answer = read_response(&mut third).await;
    assert!(
        answer.starts_with("HTTP/1.1 200") && answer.ends_with("ok"),
        "{answer}"
    );
    assert_eq!(proxy.stats().evicted.load(Ordering::Relaxed), 1);
    let mut kept = 0;
    for mut c in held {
        let answer = read_response(&mut c).await;
        assert!(
            answer.ends_with("ok"),
            "its own request was answered: {answer}"
        );
        // The one closed for the new connection ends; the other serves its next request.
        if c.write_all(GET).await.is_ok() && read_response(&mut c).await.ends_with("ok") {
            kept += 1;
        }
    }
    assert_eq!(kept, 1, "one of the two was closed for the new one");
}

/// Reads one response with a 2-byte body, or what came before the connection ended.
async fn read_response(c: &mut TcpStream) -> String {
    let mut out = Vec::new();
    while !out.ends_with(b"ok") {
        let mut buf = [0; 1024];
        match c.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// One keep-alive GET for the instance id on `c`; the response as read.
async fn get(c: &mut TcpStream) -> String {
    c.write_all(GET_ID).await.unwrap();
    let mut out = Vec::new();
    while !out.ends_with(ID.as_bytes()) {
        let mut buf = [0; 1024];
        let n = c.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&out));
        out.extend_from_slice(&buf[..n]);
    }
    String::from_utf8(out).unwrap()
}

/// What a stand-in upstream does on one connection, request by request.
#[derive(Clone)]
enum Reply {
    Send(&'static str),
    /// Sends, then closes the connection.
    SendAndClose(&'static str),
    /// Closes without answering.
    Close,
    /// Answers after a pause (on the paused clock).
    After(Duration, &'static str),
    /// Reads on without answering, and reports when the proxy closes the connection.
    Hold,
}

/// An upstream on 127.0.0.1 whose connection n plays `scripts[n]`; each request it receives
/// (head and body, as bytes) comes out of the channel with its connection's number, and a
/// connection closed by the proxy as `(n, "closed")`.
async fn stand_in(
    scripts: Vec<Vec<Reply>>,
) -> (SocketAddr, mpsc::UnboundedReceiver<(usize, String)>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (seen, received) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        for (n, script) in scripts.into_iter().enumerate() {
            let (mut stream, _) = listener.accept().await.unwrap();
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut pending = Vec::new();
                for reply in script {
                    let Some(request) = read_request(&mut stream, &mut pending).await else {
                        let _ = seen.send((n, "closed".to_owned()));
                        return;
                    };
                    let _ = seen.send((n, request));
                    match reply {
                        Reply::Send(r) => stream.write_all(r.as_bytes()).await.unwrap(),
                        Reply::SendAndClose(r) => {
                            stream.write_all(r.as_bytes()).await.unwrap();
                            return;
                        }
                        Reply::Close => return,
                        Reply::After(pause, r) => {
                            tokio::time::sleep(pause).await;
                            stream.write_all(r.as_bytes()).await.unwrap();
                        }
                        Reply::Hold => {
                            let _ = stream.read(&mut [0; 64]).await;
                            let _ = seen.send((n, "closed".to_owned()));
                            return;
                        }
                    }
                }
            });
        }
    });
    (addr, received)
}

/// Reads one request (a head and a Content-Length body) from `stream`; `None` at its end.
async fn read_request(stream: &mut TcpStream, pending: &mut Vec<u8>) -> Option<String> {
    loop {
        if let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&pending[..end]).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .map_or(0, |v| v.trim().parse().unwrap());
            if pending.len() >= end + 4 + length {
                let request: Vec<u8> = pending.drain(..end + 4 + length).collect();
                return Some(String::from_utf8_lossy(&request).into_owned());
            }
        }
        let mut buf = [0; 4096];
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => pending.extend_from_slice(&buf[..n]),
        }
    }
}

const OK: &str = "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
const OK2: &str = "HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok2";

/// Sends `request` on a fresh client connection and reads one response with a body ending in
/// `end` (or until the proxy closes).
async fn ask(shared: &Arc<Shared>, request: &[u8], end: &str) -> String {
    let mut client = connect(shared);
    client.write_all(request).await.unwrap();
    let mut out = Vec::new();
    while !(out.ends_with(end.as_bytes()) && out.windows(4).any(|w| w == b"\r\n\r\n")) {
        let mut buf = [0; 4096];
        match client.read(&mut buf).await.unwrap() {
            0 => break,
            n => out.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8(out).unwrap()
}

#[tokio::test]
async fn requests_go_upstream_as_sent_less_hop_by_hop_and_underscored_headers() {
    let (addr, mut seen) = stand_in(vec![vec![Reply::Send(
        "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nconnection: keep-alive, x-hop\r\n\
         x-hop: 1\r\nx-end: 2\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )]])
    .await;
    let shared = forwarding_to(addr);
    let out = ask(
        &shared,
        b"POST /x?y=%2F HTTP/1.1\r\nHost: md\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue\r\n\
          Connection: keep-alive, X-Drop\r\nX-Drop: 1\r\nKeep-Alive: 5\r\nX-Keep: K\r\n\
          Transfer_Encoding: chunked\r\nX_Forwarded_For: 1.2.3.4\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        "hello",
    )
    .await;
    let (interim, last) = out.split_once("\r\n\r\n").unwrap();
    assert_eq!(interim, "HTTP/1.1 100 Continue", "{out}");
    assert!(last.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
    assert!(last.contains("\r\ncontent-length: 5\r\n"), "{out}");
    assert!(last.contains("\r\nx-end: 2\r\n"), "{out}");
    for gone in ["transfer-encoding", "x-hop", "connection: keep-alive"] {
        assert!(!last.contains(gone), "{gone}: {out}");
    }
    let (_, request) = seen.recv().await.unwrap();
    assert_eq!(
        request,
        "POST /x?y=%2F HTTP/1.1\r\nhost: md\r\nx-keep: K\r\ncontent-length: 3\r\n\r\nabc"
    );
}

#[tokio::test]
async fn upstream_connections_are_reused_and_a_dropped_one_is_replaced_for_idempotent_requests() {
    let (addr, mut seen) = stand_in(vec![
        vec![Reply::Send(OK), Reply::Send(OK), Reply::Close],
        vec![Reply::Send(OK2), Reply::Close],
    ])
    .await;
    let shared = forwarding_to(addr);
    let mut client = connect(&shared);
    for expected in ["ok", "ok", "ok2"] {
        client.write_all(GET_ID).await.unwrap();
        let got = read_one(&mut client).await;
        assert!(got.ends_with(&format!("\r\n\r\n{expected}")), "{got}");
    }
    let connections: Vec<usize> = std::iter::from_fn(|| seen.try_recv().ok())
        .map(|(n, _)| n)
        .collect();
    assert_eq!(
        connections,
        [0, 0, 0, 1],
        "the third GET, dropped unanswered, sent again"
    );
    // A POST is not repeated.
    client
        .write_all(b"POST /p HTTP/1.1\r\nHost: md\r\nContent-Length: 0\r\n\r\n")
        .await
        .unwrap();
    let got = read_one(&mut client).await;
    assert!(got.starts_with("HTTP/1.1 502 "), "{got}");
}

/// One response with a Content-Length body.
async fn read_one(client: &mut DuplexStream) -> String {
    let mut out = Vec::new();
    loop {
        if let Some(end) = out.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&out[..end]).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .map_or(0, |v| v.trim().parse().unwrap());
            if out.len() >= end + 4 + length {
                return String::from_utf8(out).unwrap();
            }
        }
        let mut buf = [0; 4096];
        let n = client.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed after {}", String::from_utf8_lossy(&out));
        out.extend_from_slice(&buf[..n]);
    }
}

#[tokio::test]
async fn upstream_responses_the_proxy_cannot_pass_on_faithfully_are_502() {
    let too_long = format!(
        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n",
        forward::MAX_RESPONSE_BODY + 1
    );
    let too_long: &'static str = Box::leak(too_long.into_boxed_str());
    let big_head = format!(
        "HTTP/1.1 200 OK\r\nx-big: {}\r\n\r\n",
        "a".repeat(upstream::MAX_RESPONSE_HEAD)
    );
    let big_head: &'static str = Box::leak(big_head.into_boxed_str());
    for (reply, why) in [
        (
            "HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
            "transfer coding",
        ),
        (
            "HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\nok",
            "transfer coding",
        ),
        (too_long, "larger than"),
        (big_head, "failed"),
        ("SSH-2.0-OpenSSH\r\n\r\n", "failed"),
        ("HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc", "failed"),
    ] {
        let (addr, _seen) = stand_in(vec![vec![Reply::SendAndClose(reply)]]).await;
        let got = ask(&forwarding_to(addr), GET_ID, "\n").await;
        assert!(got.starts_with("HTTP/1.1 502 "), "{reply:.60?}: {got:.300}");
        assert!(got.contains(why), "{reply:.60?}: {got:.300}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_silent_upstream_is_a_504_after_the_upstream_timeout() {
    let (addr, _seen) = stand_in(vec![vec![Reply::Hold]]).await;
    let start = Instant::now();
    let got = ask(&forwarding_to(addr), GET_ID, "\n").await;
    assert!(got.starts_with("HTTP/1.1 504 "), "{got}");
    assert_eq!(start.elapsed(), Duration::from_secs(5));
}

/// GCE's `wait_for_change` holds a request open by design: under `/computeMetadata/` it
/// gets its `timeout_sec` and a margin instead of the upstream timeout; elsewhere it is an
/// ordinary request.
#[tokio::test(start_paused = true)]
async fn a_long_poll_is_bounded_by_its_own_timeout() {
    let poll = b"GET /computeMetadata/v1/instance/tags?wait_for_change=true&timeout_sec=30 HTTP/1.1\r\nHost: md\r\n\r\n";
    // Far beyond the idle timeout too: a request in progress is never idle.
    let (addr, _seen) = stand_in(vec![vec![Reply::After(Duration::from_secs(29), OK)]]).await;
    let backend = Backend::Upstream(Box::new(Forwarder::new(
        upstream_settings(addr),
        None,
        Arc::default(),
    )));
    let mut limits = LIMITS;
    limits.timeouts.idle = Some(Duration::from_secs(1));
    let got = ask(
        &Shared::new(backend, names(), limits, BODY_BUDGET),
        poll,
        "ok",
    )
    .await;
    assert!(got.starts_with("HTTP/1.1 200 "), "{got}");

    let (addr, _seen) = stand_in(vec![vec![Reply::Hold]]).await;
    let start = Instant::now();
    let got = ask(&forwarding_to(addr), poll, "\n").await;
    assert!(got.starts_with("HTTP/1.1 504 "), "{got}");
    assert_eq!(
        start.elapsed(),
        Duration::from_secs(30) + forward::LONG_POLL_MARGIN
    );

    let elsewhere = b"GET /latest/x?wait_for_change=true HTTP/1.1\r\nHost: md\r\n\r\n";
    let (addr, _seen) = stand_in(vec![vec![Reply::Hold]]).await;
    let start = Instant::now();
    let got = ask(&forwarding_to(addr), elsewhere, "\n").await;
    assert!(got.starts_with("HTTP/1.1 504 "), "{got}");
    assert_eq!(start.elapsed(), Duration::from_secs(5));
}

#[tokio::test(start_paused = true)]
async fn a_client_that_hangs_up_cancels_its_upstream_request() {
    let (addr, mut seen) = stand_in(vec![vec![Reply::Hold]]).await;
    let shared = forwarding_to(addr);
    let mut client = connect(&shared);
    client
        .write_all(b"GET /computeMetadata/v1/?wait_for_change=true HTTP/1.1\r\nHost: md\r\n\r\n")
        .await
        .unwrap();
    assert_ne!(
        seen.recv().await.unwrap().1,
        "closed",
        "the request went upstream"
    );
    let hung_up = Instant::now();
    drop(client);
    // Guards a hang on the paused clock: it only advances while nothing else can run.
    let closed = tokio::time::timeout(Duration::from_secs(3600), seen.recv()).await;
    assert_eq!(closed.unwrap().unwrap().1, "closed");
    assert_eq!(hung_up.elapsed(), Duration::ZERO, "at once");
}

#[tokio::test]
async fn request_bodies_over_the_limit_are_refused_unsent() {
    let (addr, mut seen) = stand_in(vec![vec![Reply::Send(OK)]]).await;
    let shared = forwarding_to(addr);
    let request = format!(
        "PUT /big HTTP/1.1\r\nHost: md\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
        (64 << 10) + 1
    );
    let got = ask(&shared, request.as_bytes(), "\n").await;
    assert!(got.starts_with("HTTP/1.1 413 "), "{got}");
    assert!(got.contains("connection: close\r\n"), "{got}");
    assert!(seen.try_recv().is_err(), "nothing went upstream");
}

/// The bodies in flight share one budget: beyond it, a 503 at once, and nothing is lost
/// once the budget is free again.
#[tokio::test]
async fn request_bodies_beyond_the_shared_budget_get_503() {
    let (addr, _seen) = stand_in(vec![vec![Reply::Hold], vec![Reply::Send(OK)]]).await;
    let backend = Backend::Upstream(Box::new(Forwarder::new(
        upstream_settings(addr),
        None,
        Arc::default(),
    )));
    let shared = Shared::new(backend, names(), LIMITS, 100);
    let put = |n: usize| {
        format!(
            "PUT /p HTTP/1.1\r\nHost: md\r\nContent-Length: {n}\r\n\r\n{}",
            "x".repeat(n)
        )
    };
    // Holds 60 bytes of the budget while the upstream keeps it waiting.
    let mut holding = connect(&shared);
    holding.write_all(put(60).as_bytes()).await.unwrap();
    tokio::task::yield_now().await;
    while shared.budget.available() > 40 {
        tokio::task::yield_now().await;
    }
    let got = ask(&shared, put(50).as_bytes(), "\n").await;
    assert!(got.starts_with("HTTP/1.1 503 "), "{got}");
    assert!(got.contains("retry-after: 1\r\n"), "{got}");
    drop(holding);
    while shared.budget.available() < 100 {
        tokio::task::yield_now().await;
    }
    let got = ask(&shared, put(50).as_bytes(), "ok").await;
    assert!(got.starts_with("HTTP/1.1 200 "), "{got}");
}

/// A kept-alive connection idle past `PARK_AFTER` gives hyper's buffers back and is served
/// again at its next request, even one whose head was arriving when it was parked.
#[tokio::test(start_paused = true)]
async fn a_parked_connection_serves_its_next_request() {
    let mut client = connect(&mock());
    client.write_all(GET_ID).await.unwrap();
    let first = read_one(&mut client).await;
    assert!(!first.contains("connection: close"), "{first}");
    tokio::time::sleep(Duration::from_secs(5)).await;
    client
        .write_all(b"GET /latest/meta-data/instance-id HTTP/1.1\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    client.write_all(b"Host: x\r\n\r\n").await.unwrap();
    let second = read_one(&mut client).await;
    assert!(
        second.starts_with("HTTP/1.1 200 OK\r\n") && second.ends_with(ID),
        "{second}"
    );
}

/// A parked connection costs its task and its socket; the task is the size of the serving
/// future, so nothing large may live in it (hyper's state does not, once parked: see
/// `connection`). 10,000 idle connections must stay well under 100 MB.
#[tokio::test]
async fn a_connection_task_stays_small() {
    let shared = mock();
    let (_client, server) = duplex(64);
    let shutdown = CancellationToken::new();
    let serving = connection::serve(server, &shared, &shutdown, host(), None);
    let size = size_of_val(&serving);
    assert!(size <= 2 << 10, "{size} bytes");
}
