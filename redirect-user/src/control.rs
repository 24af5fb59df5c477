//! The daemon's control API: HTTP over a unix socket (root only, 0600).
//!
//! A unix socket in the filesystem works from any network namespace that sees the file, and is
//! not reachable over the network. `curl --unix-socket /run/redirect/control.sock
//! http://localhost/status` works as well as `redirect status`; `POST
//! /simulate?event=spot-interruption&after=30s` as well as `redirect simulate`.

use std::{
    io,
    os::unix::fs::{FileTypeExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::{
    Method, Request, Response, StatusCode, header, server::conn::http1, service::service_fn,
};
use hyper_util::rt::TokioIo;
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

use crate::{
    handover::{self, Listening, Role},
    mock::ec2::events::Event,
    status::Status,
};

/// Simulates an EC2 instance event (`None`: clears them) after a delay; says what it did, or
/// why it cannot (no mock served).
pub type Simulate = dyn Fn(Option<Event>, Duration) -> Result<String, String> + Send + Sync;

/// What the control API answers with.
pub struct Handlers {
    pub status: Arc<dyn Fn() -> Status + Send + Sync>,
    pub simulate: Box<Simulate>,
    /// `/readyz`: `Ok(what is ready)`, or what is not.
    pub ready: Box<dyn Fn() -> Result<String, String> + Send + Sync>,
    /// `/metrics`.
    pub metrics: prometheus_client::registry::Registry,
    /// `POST /replace/prepare`, `/replace/finish` and `/replace/abort` (`redirect run --replace`).
    pub replace: Box<dyn Fn(ReplaceStep) -> Result<String, String> + Send + Sync>,
    /// The listening sockets handed to a daemon replacing this one.
    pub listening: Arc<Listening>,
}

/// Serves `handlers` on a TCP listener (`--metrics-listen`: `/metrics`, `/healthz`, `/readyz`
/// and `/status`; `/simulate` and `/replace` only on the control socket) until `shutdown`.
pub async fn serve_tcp(
    listener: Arc<tokio::net::TcpListener>,
    handlers: Arc<Handlers>,
    shutdown: CancellationToken,
) {
    serve_on(listener, handlers, shutdown, Reach::Tcp).await;
}

/// Where a request came in: what may be asked there.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Reach {
    /// The control socket (root only): everything.
    Control,
    /// A loopback TCP address: reading only.
    Tcp,
}

/// A listener whose connections the control API is served on.
trait Accept {
    type Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static;
    fn accept_one(&self) -> impl Future<Output = io::Result<Self::Stream>> + Send;
}

impl Accept for UnixListener {
    type Stream = UnixStream;
    async fn accept_one(&self) -> io::Result<UnixStream> {
        self.accept().await.map(|(stream, _)| stream)
    }
}

/// Shared with the registry of sockets to hand over (`crate::handover`).
impl Accept for Arc<tokio::net::TcpListener> {
    type Stream = tokio::net::TcpStream;
    async fn accept_one(&self) -> io::Result<tokio::net::TcpStream> {
        self.accept().await.map(|(stream, _)| stream)
    }
}

/// Accepts on `listener` until `shutdown`, each connection served by hyper on a task of its
/// own; a failed accept (descriptors exhausted) is said and retried after a pause.
async fn serve_on<L: Accept + Sync>(
    listener: L,
    handlers: Arc<Handlers>,
    shutdown: CancellationToken,
    reach: Reach,
) {
    loop {
        let stream = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = listener.accept_one() => match accepted {
                Ok(stream) => stream,
                Err(e) => {
                    let what = match reach {
                        Reach::Control => "control socket",
                        Reach::Tcp => "metrics listener",
                    };
                    tracing::warn!("{what} accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let handlers = Arc::clone(&handlers);
        let service = service_fn(move |mut req: Request<hyper::body::Incoming>| {
            let handlers = Arc::clone(&handlers);
            async move {
                let resp = match reach == Reach::Control && asks_for_listeners(&req) {
                    true => prepare_with_listeners(&mut req, &handlers),
                    false => route(&req, &handlers, reach),
                };
                Ok::<_, std::convert::Infallible>(resp)
            }
        });
        tokio::spawn(async move {
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades()
                .await;
        });
    }
}

fn text(code: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body.to_owned())));
    *resp.status_mut() = code;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain"),
    );
    resp
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(
        "another redirect daemon is running (its control socket {} answers); stop it, or give this one another --control-socket",
        .0.display()
    )]
    AlreadyRunning(PathBuf),
    #[error("{} exists and is not a socket", .0.display())]
    NotASocket(PathBuf),
    #[error("cannot create control socket {}", path.display())]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "no redirect daemon is answering at {} (is `redirect run` running? give --control-socket if it uses another path)",
        path.display()
    )]
    NotRunning {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("talking to the daemon at {}: {message}", path.display())]
    Protocol { path: PathBuf, message: String },
}

/// The bound control socket; removes its file when dropped.
pub struct ControlSocket {
    path: PathBuf,
    /// The socket file's inode: a daemon that replaced this one may have bound the path anew
    /// by the time this one is dropped, and its file must stay.
    inode: u64,
    listener: Option<UnixListener>,
}

impl ControlSocket {
    /// Binds `path`, replacing a stale socket file but refusing one a live daemon answers on.
    pub fn bind(path: &Path) -> Result<Self, ControlError> {
        let bind_err = |source| ControlError::Bind {
            path: path.to_owned(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(bind_err)?;
        }
        match std::fs::symlink_metadata(path) {
            Ok(meta) if !meta.file_type().is_socket() => {
                return Err(ControlError::NotASocket(path.to_owned()));
            }
            Ok(_) => {
                if std::os::unix::net::UnixStream::connect(path).is_ok() {
                    return Err(ControlError::AlreadyRunning(path.to_owned()));
                }
                std::fs::remove_file(path).map_err(bind_err)?;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(bind_err(e)),
        }
        let listener = std::os::unix::net::UnixListener::bind(path).map_err(bind_err)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(bind_err)?;
        listener.set_nonblocking(true).map_err(bind_err)?;
        let listener = UnixListener::from_std(listener).map_err(bind_err)?;
        let inode =
            std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(path).map_err(bind_err)?);
        Ok(ControlSocket {
            path: path.to_owned(),
            inode,
            listener: Some(listener),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Answers `GET /status` and `POST /simulate` until `shutdown` is cancelled.
    pub async fn serve(&mut self, handlers: Arc<Handlers>, shutdown: CancellationToken) {
        let Some(listener) = self.listener.take() else {
            return;
        };
        serve_on(listener, handlers, shutdown, Reach::Control).await;
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        let ours = std::fs::metadata(&self.path)
            .is_ok_and(|m| std::os::unix::fs::MetadataExt::ino(&m) == self.inode);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// `redirect run --replace`'s steps, asked of the daemon being replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplaceStep {
    /// Let go of the pin directory's lock (the new daemon adopts the pins), hand the
    /// listening sockets over (asked with `Upgrade: redirect-listeners`, see
    /// `crate::handover`), keep serving.
    Prepare,
    /// Stop accepting (the new daemon accepts on the same sockets, or on its own on the same
    /// ports), close the control socket, finish the requests in flight, exit.
    Finish,
    /// The new daemon failed between `Prepare` and `Finish`: take the pins back (lock, and
    /// our programs in their links again) and serve on as before.
    Abort,
}

impl ReplaceStep {
    fn path(self) -> &'static str {
        match self {
            ReplaceStep::Prepare => "/replace/prepare",
            ReplaceStep::Finish => "/replace/finish",
            ReplaceStep::Abort => "/replace/abort",
        }
    }

    fn from_path(path: &str) -> Option<ReplaceStep> {
        [
            ReplaceStep::Prepare,
            ReplaceStep::Finish,
            ReplaceStep::Abort,
        ]
        .into_iter()
        .find(|step| step.path() == path)
    }
}

/// `POST /replace/prepare` with `Upgrade: redirect-listeners`: a new daemon that takes the
/// listening sockets too.
fn asks_for_listeners(req: &Request<hyper::body::Incoming>) -> bool {
    req.method() == Method::POST
        && ReplaceStep::from_path(req.uri().path()) == Some(ReplaceStep::Prepare)
        && req.headers().get(header::UPGRADE).is_some_and(|p| {
            p.as_bytes()
                .eq_ignore_ascii_case(handover::PROTOCOL.as_bytes())
        })
}

/// Releases the pins, answers 101, and hands the listening sockets over the connection once
/// hyper lets go of it.
fn prepare_with_listeners(
    req: &mut Request<hyper::body::Incoming>,
    handlers: &Arc<Handlers>,
) -> Response<Full<Bytes>> {
    if let Err(why) = (handlers.replace)(ReplaceStep::Prepare) {
        return text(StatusCode::CONFLICT, &format!("{why}\n"));
    }
    let upgrade = hyper::upgrade::on(req);
    let listening = Arc::clone(&handlers.listening);
    tokio::spawn(async move {
        let sent = async {
            let (stream, read) = raw_stream(upgrade.await.map_err(io::Error::other)?)?;
            let ready = read.first().copied();
            let sockets = listening.live();
            tokio::task::spawn_blocking(move || {
                // The new daemon's byte says it reads with room for descriptors from now on.
                if ready.is_none() {
                    io::Read::read_exact(&mut &stream, &mut [0u8])?;
                }
                handover::send(&stream, &sockets).map(|()| describe(&sockets))
            })
            .await
            .map_err(io::Error::other)?
        };
        match sent.await {
            Ok(what) => tracing::info!("--replace: handed over {what}"),
            Err(e) => tracing::warn!(
                "--replace: the listening sockets were not handed over ({e}); the new daemon joins the ports instead"
            ),
        }
    });
    let mut resp = text(StatusCode::SWITCHING_PROTOCOLS, "");
    let headers = resp.headers_mut();
    headers.insert(
        header::CONNECTION,
        header::HeaderValue::from_static("upgrade"),
    );
    headers.insert(
        header::UPGRADE,
        header::HeaderValue::from_static(handover::PROTOCOL),
    );
    resp
}

/// How many sockets of which role, for the log.
fn describe(sockets: &[(Role, Arc<tokio::net::TcpListener>)]) -> String {
    let count = |f: fn(&Role) -> bool| sockets.iter().filter(|(r, _)| f(r)).count();
    format!(
        "{} listening sockets: {} of the proxy, {} metrics, {} in other network namespaces",
        sockets.len(),
        count(|r| *r == Role::Proxy),
        count(|r| *r == Role::Metrics),
        count(|r| matches!(r, Role::Namespace { .. })),
    )
}

/// What the daemon being replaced answered to `POST /replace/prepare`.
pub struct Prepared {
    pub said: String,
    /// Its listening sockets; `None` from a daemon that does not hand them over (an earlier
    /// version), or when they did not arrive.
    pub sockets: Option<Vec<(Role, std::os::fd::OwnedFd)>>,
}

/// `--replace`'s first step: the daemon at `path` releases its pins and hands over its
/// listening sockets.
pub async fn prepare_replace(path: &Path) -> Result<Prepared, ControlError> {
    let target = ReplaceStep::Prepare.path();
    let resp = send(path, Method::POST, target, Some(handover::PROTOCOL)).await?;
    let code = resp.status();
    if code != StatusCode::SWITCHING_PROTOCOLS {
        let said = body_text(path, resp).await?.trim().to_owned();
        if !code.is_success() {
            return Err(ControlError::Protocol {
                path: path.to_owned(),
                message: said,
            });
        }
        return Ok(Prepared {
            said,
            sockets: None,
        });
    }
    // The pins are released from here on: a failure to receive is not the replace's end.
    let received = async {
        // The old daemon sends nothing before this daemon's byte: hyper read nothing ahead.
        let (stream, _) = raw_stream(hyper::upgrade::on(resp).await.map_err(io::Error::other)?)?;
        tokio::task::spawn_blocking(move || {
            io::Write::write_all(&mut &stream, b"R")?;
            handover::receive(&stream).map_err(io::Error::other)
        })
        .await
        .map_err(io::Error::other)?
    };
    Ok(match received.await {
        Ok(sockets) => Prepared {
            said: format!(
                "pins released, {} listening sockets handed over",
                sockets.len()
            ),
            sockets: Some(sockets),
        },
        Err(e) => {
            tracing::warn!(
                "--replace: the running daemon's listening sockets did not arrive ({e}); joining its ports instead"
            );
            Prepared {
                said: "pins released".to_owned(),
                sockets: None,
            }
        }
    })
}

/// Asks the daemon at `path` for `step` of a replace.
pub async fn post_replace(path: &Path, step: ReplaceStep) -> Result<String, ControlError> {
    let (code, body) = request(path, Method::POST, step.path()).await?;
    if !code.is_success() {
        return Err(ControlError::Protocol {
            path: path.to_owned(),
            message: body.trim().to_owned(),
        });
    }
    Ok(body.trim().to_owned())
}

/// Whether a daemon answers on `path`.
pub async fn answers(path: &Path) -> bool {
    request(path, Method::GET, "/healthz").await.is_ok()
}

fn route(
    req: &Request<hyper::body::Incoming>,
    handlers: &Handlers,
    reach: Reach,
) -> Response<Full<Bytes>> {
    let replace_step = ReplaceStep::from_path(req.uri().path());
    let control_only = req.uri().path() == "/simulate" || replace_step.is_some();
    if control_only && reach == Reach::Tcp {
        return text(StatusCode::NOT_FOUND, "not here: use the control socket\n");
    }
    if let Some(step) = replace_step
        && req.method() == Method::POST
    {
        return match (handlers.replace)(step) {
            Ok(done) => text(StatusCode::OK, &format!("{done}\n")),
            Err(why) => text(StatusCode::CONFLICT, &format!("{why}\n")),
        };
    }
    let (code, content_type, body) = match (req.method(), req.uri().path()) {
        (&Method::POST, "/simulate") => {
            let (code, text) = simulate(req.uri().query(), handlers);
            (code, "text/plain", format!("{text}\n").into_bytes())
        }
        (_, "/simulate") => (
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            b"use POST\n".to_vec(),
        ),
        (&Method::GET, "/metrics") => (
            StatusCode::OK,
            "text/plain; version=0.0.4",
            crate::metrics::encode(&handlers.metrics).into_bytes(),
        ),
        (&Method::GET, "/healthz") => (StatusCode::OK, "text/plain", b"ok\n".to_vec()),
        (&Method::GET, "/readyz") => match (handlers.ready)() {
            Ok(what) => (StatusCode::OK, "text/plain", format!("ready: {what}\n").into_bytes()),
            Err(why) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!("not ready: {why}\n").into_bytes(),
            ),
        },
        (&Method::GET, "/status") => match serde_json::to_vec_pretty(&(handlers.status)()) {
            Ok(json) => (StatusCode::OK, "application/json", json),
            Err(e) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/plain",
                e.to_string().into_bytes(),
            ),
        },
        (_, "/status") => (
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            b"use GET\n".to_vec(),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            b"not found; try GET /status, /metrics, /healthz, /readyz or POST /simulate?event=EVENT\n"
                .to_vec(),
        ),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = code;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    resp
}

/// `event=NAME|clear` and `after=DURATION` (default 0s).
fn simulate(query: Option<&str>, handlers: &Handlers) -> (StatusCode, String) {
    let mut event = None;
    let mut after = Duration::ZERO;
    for (key, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        match &*key {
            "event" => event = Some(value.into_owned()),
            "after" => match crate::config::parse_duration(&value) {
                Ok(d) => after = d,
                Err(e) => return (StatusCode::BAD_REQUEST, format!("after: {e}")),
            },
            other => {
                return (
                    StatusCode::BAD_REQUEST,
                    format!("unknown parameter {other:?}"),
                );
            }
        }
    }
    let names: Vec<&str> = Event::ALL.iter().map(|e| e.name()).collect();
    let event = match event.as_deref() {
        Some("clear") => None,
        Some(name) => match Event::parse(name) {
            Some(event) => Some(event),
            None => {
                return (
                    StatusCode::BAD_REQUEST,
                    format!(
                        "unknown event {name:?}: expected clear or one of {}",
                        names.join(", ")
                    ),
                );
            }
        },
        None => {
            return (
                StatusCode::BAD_REQUEST,
                format!("give event=clear or one of {}", names.join(", ")),
            );
        }
    };
    match (handlers.simulate)(event, after) {
        Ok(done) => (StatusCode::OK, done),
        Err(why) => (StatusCode::CONFLICT, why),
    }
}

/// Asks the daemon listening on `path` to simulate `event` (`None`: clear) after `after`;
/// what it did.
pub async fn post_simulate(
    path: &Path,
    event: Option<Event>,
    after: Duration,
) -> Result<String, ControlError> {
    let name = event.map_or("clear", Event::name);
    let target = format!("/simulate?event={name}&after={}ms", after.as_millis());
    let (code, body) = request(path, Method::POST, &target).await?;
    if !code.is_success() {
        return Err(ControlError::Protocol {
            path: path.to_owned(),
            message: body.trim().to_owned(),
        });
    }
    Ok(body.trim().to_owned())
}

/// One request to the daemon at `path`: its status and body.
async fn request(
    path: &Path,
    method: Method,
    target: &str,
) -> Result<(StatusCode, String), ControlError> {
    let resp = send(path, method, target, None).await?;
    let code = resp.status();
    Ok((code, body_text(path, resp).await?))
}

/// Sends one request without a body to the daemon at `path`, asking to switch to the
/// `upgrade` protocol if given; its response, the body still to read.
async fn send(
    path: &Path,
    method: Method,
    target: &str,
    upgrade: Option<&'static str>,
) -> Result<Response<hyper::body::Incoming>, ControlError> {
    let protocol = |message: String| ControlError::Protocol {
        path: path.to_owned(),
        message,
    };
    let stream = UnixStream::connect(path)
        .await
        .map_err(|source| ControlError::NotRunning {
            path: path.to_owned(),
            source,
        })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| protocol(e.to_string()))?;
    tokio::spawn(conn.with_upgrades());
    let mut req = Request::builder()
        .method(method)
        .uri(target)
        .header(header::HOST, "redirect");
    if let Some(upgrade) = upgrade {
        req = req
            .header(header::CONNECTION, "upgrade")
            .header(header::UPGRADE, upgrade);
    }
    let req = req
        .body(Full::new(Bytes::new()))
        .map_err(|e| protocol(e.to_string()))?;
    sender
        .send_request(req)
        .await
        .map_err(|e| protocol(e.to_string()))
}

/// The body of a response from the daemon at `path`, as text.
async fn body_text(
    path: &Path,
    resp: Response<hyper::body::Incoming>,
) -> Result<String, ControlError> {
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| ControlError::Protocol {
            path: path.to_owned(),
            message: e.to_string(),
        })?
        .to_bytes();
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// The control connection hyper let go of after a `101`, blocking, and what hyper had read
/// of it beyond the HTTP exchange.
fn raw_stream(
    upgraded: hyper::upgrade::Upgraded,
) -> io::Result<(std::os::unix::net::UnixStream, Bytes)> {
    let parts = upgraded
        .downcast::<TokioIo<UnixStream>>()
        .map_err(|_| io::Error::other("not the control socket"))?;
    let stream = parts.io.into_inner().into_std()?;
    stream.set_nonblocking(false)?;
    Ok((stream, parts.read_buf))
}

/// Asks the daemon listening on `path` for its status.
pub async fn fetch_status(path: &Path) -> Result<Status, ControlError> {
    let protocol = |message: String| ControlError::Protocol {
        path: path.to_owned(),
        message,
    };
    let (code, body) = request(path, Method::GET, "/status").await?;
    if !code.is_success() {
        return Err(protocol(format!("{code}: {}", body.trim())));
    }
    serde_json::from_str(&body).map_err(|e| protocol(format!("unreadable status: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replace_steps_are_known_by_their_paths() {
        for step in [
            ReplaceStep::Prepare,
            ReplaceStep::Finish,
            ReplaceStep::Abort,
        ] {
            assert_eq!(ReplaceStep::from_path(step.path()), Some(step));
        }
        assert_eq!(ReplaceStep::from_path("/replace/"), None);
        assert_eq!(ReplaceStep::from_path("/replace/abort/"), None);
    }
}
