//! `redirect run --replace`: the running daemon hands its listening sockets to the new one
//! over the control socket (SCM_RIGHTS): the proxy's, the metrics listener, and those planted
//! in other network namespaces (see `crate::netns`).
//!
//! The same sockets, not new ones on the same ports: a connection queued on one while the old
//! daemon stops stays queued and the new daemon accepts it, on every kernel (sockets that only
//! share a port with SO_REUSEPORT need `net.ipv4.tcp_migrate_req`, Linux 5.14, to move a
//! closing socket's queue), and no third program can slip into the ports meanwhile.
//!
//! The exchange, once `POST /replace/prepare` with `Upgrade: redirect-listeners` is answered
//! `101 Switching Protocols` (`crate::control`): the new daemon writes one byte, from then on
//! it reads only with room for descriptors (a descriptor that reaches a plain `read()` is
//! closed by the kernel, lost); the old daemon writes a JSON line naming each socket's role,
//! then the sockets, at most [`PER_MESSAGE`] per message with a byte each, and closes.

use std::{
    collections::BTreeMap,
    io::{self, Write as _},
    mem::MaybeUninit,
    net::SocketAddr,
    os::{
        fd::{AsFd as _, BorrowedFd, OwnedFd},
        unix::net::UnixStream,
    },
    sync::{Arc, Mutex, PoisonError, Weak},
};

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;

use crate::netns::NetnsId;

/// The `Upgrade` protocol name of the exchange.
pub const PROTOCOL: &str = "redirect-listeners";

/// Descriptors per message: the kernel's SCM_MAX_FD.
const PER_MESSAGE: usize = 253;

/// The most the JSON line may take: 16 MiB is a name for each of ten times more sockets than
/// `max_namespaces` allows.
const MAX_HEADER: usize = 16 << 20;

/// What a handed-over socket is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "role", rename_all = "snake_case")]
pub enum Role {
    /// The proxy's, in the daemon's own network namespace.
    Proxy,
    /// `--metrics-listen`.
    Metrics,
    /// A listener planted in another network namespace.
    Namespace { netns: NetnsId },
}

#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    #[error("the connection to the running daemon failed: {0}")]
    Io(#[from] io::Error),
    #[error("the running daemon's list of sockets is unreadable: {0}")]
    Header(String),
    #[error("{named} sockets named but {marked} sent and {received} received")]
    Mismatch {
        named: usize,
        marked: usize,
        received: usize,
    },
    #[error("descriptors were lost on the way (MSG_CTRUNC: this process's descriptor limit?)")]
    Truncated,
}

#[derive(Serialize, Deserialize)]
struct Header {
    sockets: Vec<Role>,
}

/// The listening sockets a daemon accepts on, each with its role: what it hands over. Held
/// weakly: a socket closes when its accept loop ends (a namespace gone, the daemon stopping),
/// not when this forgets it.
#[derive(Default)]
pub struct Listening(Mutex<Registry>);

#[derive(Default)]
struct Registry {
    sockets: Vec<(Role, Weak<TcpListener>)>,
    /// The length at which closed sockets are dropped from `sockets` next.
    prune_at: usize,
}

impl Listening {
    pub fn add(&self, role: Role, listener: &Arc<TcpListener>) {
        let mut registry = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if registry.sockets.len() >= registry.prune_at {
            registry.sockets.retain(|(_, l)| l.strong_count() > 0);
            registry.prune_at = 2 * registry.sockets.len() + 64;
        }
        registry.sockets.push((role, Arc::downgrade(listener)));
    }

    /// The sockets open now, in the order they were added.
    pub fn live(&self) -> Vec<(Role, Arc<TcpListener>)> {
        let registry = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        registry
            .sockets
            .iter()
            .filter_map(|(role, l)| Some((*role, l.upgrade()?)))
            .collect()
    }
}

/// The old daemon's side: names `sockets` and sends them. `stream` is blocking.
pub fn send(stream: &UnixStream, sockets: &[(Role, Arc<TcpListener>)]) -> io::Result<()> {
    let header = Header {
        sockets: sockets.iter().map(|(role, _)| *role).collect(),
    };
    let mut line = serde_json::to_vec(&header)?;
    line.push(b'\n');
    (&*stream).write_all(&line)?;
    let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(PER_MESSAGE))];
    for chunk in sockets.chunks(PER_MESSAGE) {
        let fds: Vec<BorrowedFd<'_>> = chunk.iter().map(|(_, l)| l.as_fd()).collect();
        let marks = vec![b'S'; fds.len()];
        let mut control = SendAncillaryBuffer::new(&mut space);
        if !control.push(SendAncillaryMessage::ScmRights(&fds)) {
            return Err(io::Error::other(
                "no room for the descriptors in the message",
            ));
        }
        let sent = loop {
            match rustix::net::sendmsg(
                stream,
                &[io::IoSlice::new(&marks)],
                &mut control,
                SendFlags::NOSIGNAL,
            ) {
                Err(rustix::io::Errno::INTR) => continue,
                result => break result?,
            }
        };
        // The descriptors went with the first byte; the rest are only bytes.
        (&*stream).write_all(&marks[sent..])?;
    }
    Ok(())
}

/// The new daemon's side: reads until the old daemon closes, and pairs each descriptor with
/// the role it was named with. `stream` is blocking.
pub fn receive(stream: &UnixStream) -> Result<Vec<(Role, OwnedFd)>, HandoverError> {
    let mut data = Vec::new();
    let mut fds = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(PER_MESSAGE))];
    loop {
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let got = match rustix::net::recvmsg(
            stream,
            &mut [io::IoSliceMut::new(&mut buf)],
            &mut control,
            RecvFlags::CMSG_CLOEXEC,
        ) {
            Err(rustix::io::Errno::INTR) => continue,
            result => result.map_err(io::Error::from)?,
        };
        for message in control.drain() {
            if let RecvAncillaryMessage::ScmRights(received) = message {
                fds.extend(received);
            }
        }
        if got.flags.contains(ReturnFlags::CTRUNC) {
            return Err(HandoverError::Truncated);
        }
        if got.bytes == 0 {
            break;
        }
        data.extend_from_slice(&buf[..got.bytes]);
        if data.len() > MAX_HEADER + fds.len() + PER_MESSAGE {
            return Err(HandoverError::Header("longer than 16 MiB".into()));
        }
    }
    let end = data
        .iter()
        .position(|&b| b == b'\n')
        .ok_or_else(|| HandoverError::Header("no end of line".into()))?;
    let header: Header =
        serde_json::from_slice(&data[..end]).map_err(|e| HandoverError::Header(e.to_string()))?;
    let marked = data.len() - end - 1;
    let (named, received) = (header.sockets.len(), fds.len());
    if named != received || marked != received {
        return Err(HandoverError::Mismatch {
            named,
            marked,
            received,
        });
    }
    Ok(header.sockets.into_iter().zip(fds).collect())
}

/// A listening socket as received, with its address.
pub type Inherit = (SocketAddr, std::net::TcpListener);

/// The sockets handed over, sorted for the parts of the new daemon that take them.
#[derive(Default)]
pub struct Inherited {
    /// The proxy's, in the old daemon's order (its endpoints', worker by worker).
    proxy: Vec<Inherit>,
    metrics: Option<Inherit>,
    namespaces: BTreeMap<NetnsId, Vec<Inherit>>,
}

impl Inherited {
    /// Keeps what is a listening TCP socket; anything else is said and closed.
    pub fn sort(received: Vec<(Role, OwnedFd)>) -> Self {
        let mut inherited = Inherited::default();
        for (role, fd) in received {
            let socket = socket2::Socket::from(fd);
            let listening = socket.r#type().is_ok_and(|t| t == socket2::Type::STREAM)
                && socket.is_listener().unwrap_or(false);
            let addr = socket.local_addr().ok().and_then(|a| a.as_socket());
            let (true, Some(addr)) = (listening, addr) else {
                tracing::warn!(
                    "--replace: a {role:?} socket handed over is no TCP listener; closed"
                );
                continue;
            };
            let listener = std::net::TcpListener::from(socket);
            if let Err(e) = listener.set_nonblocking(true) {
                tracing::warn!("--replace: the socket on {addr} handed over: {e}; closed");
                continue;
            }
            match role {
                Role::Proxy => inherited.proxy.push((addr, listener)),
                Role::Metrics => inherited.metrics = Some((addr, listener)),
                Role::Namespace { netns } => inherited
                    .namespaces
                    .entry(netns)
                    .or_default()
                    .push((addr, listener)),
            }
        }
        inherited
    }

    /// The proxy's sockets for the endpoint `addr` (each worker had one), with the address
    /// they are bound to: `addr` itself or, for a port 0 (the kernel's choice), the next
    /// address of its IP in the old daemon's order, as its endpoints were planned alike.
    pub fn take_proxy(
        &mut self,
        addr: SocketAddr,
    ) -> Option<(SocketAddr, Vec<std::net::TcpListener>)> {
        let bound = self
            .proxy
            .iter()
            .map(|(local, _)| *local)
            .find(|local| *local == addr || (addr.port() == 0 && local.ip() == addr.ip()))?;
        let (taken, rest): (Vec<Inherit>, _) = std::mem::take(&mut self.proxy)
            .into_iter()
            .partition(|(local, _)| *local == bound);
        self.proxy = rest;
        Some((bound, taken.into_iter().map(|(_, l)| l).collect()))
    }

    pub fn take_metrics(&mut self, addr: SocketAddr) -> Option<std::net::TcpListener> {
        match &self.metrics {
            Some((local, _)) if *local == addr => self.metrics.take().map(|(_, l)| l),
            _ => None,
        }
    }

    /// The namespaces' sockets, for the planter.
    pub fn take_namespaces(&mut self) -> BTreeMap<NetnsId, Vec<Inherit>> {
        std::mem::take(&mut self.namespaces)
    }

    /// What was handed over, for the log.
    pub fn summary(&self) -> String {
        let mut proxy: Vec<String> = self.proxy.iter().map(|(a, _)| a.to_string()).collect();
        proxy.dedup();
        let planted: usize = self.namespaces.values().map(Vec::len).sum();
        format!(
            "{} of the proxy (on {}){}, {planted} in {} other network namespace{}",
            self.proxy.len(),
            if proxy.is_empty() {
                "nothing".to_owned()
            } else {
                proxy.join(", ")
            },
            match &self.metrics {
                Some((addr, _)) => format!(", the metrics listener on {addr}"),
                None => String::new(),
            },
            self.namespaces.len(),
            if self.namespaces.len() == 1 { "" } else { "s" }
        )
    }

    /// Closes what nobody took, saying so: endpoints this daemon no longer has.
    pub fn close_rest(self) {
        let Inherited { proxy, metrics, .. } = self;
        for (addr, _) in proxy.iter().chain(metrics.iter()) {
            tracing::info!(
                "--replace: {addr}, handed over, is none of this daemon's endpoints any more; closed"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listener() -> Arc<TcpListener> {
        let std = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        std.set_nonblocking(true).unwrap();
        Arc::new(TcpListener::from_std(std).unwrap())
    }

    /// Sockets go across and come back listening, with their roles, in more than one message.
    #[tokio::test]
    async fn sockets_cross_with_their_roles() {
        let netns = NetnsId::for_test(4, 4_026_531_840);
        let sockets: Vec<(Role, Arc<TcpListener>)> = (0..PER_MESSAGE + 7)
            .map(|i| match i {
                0 => (Role::Metrics, listener()),
                i if i % 2 == 0 => (Role::Namespace { netns }, listener()),
                _ => (Role::Proxy, listener()),
            })
            .collect();
        let addrs: Vec<SocketAddr> = sockets
            .iter()
            .map(|(_, l)| l.local_addr().unwrap())
            .collect();
        let (old, new) = UnixStream::pair().unwrap();
        let sender = {
            let sockets = sockets.clone();
            std::thread::spawn(move || send(&old, &sockets))
        };
        let received = receive(&new).unwrap();
        sender.join().unwrap().unwrap();
        assert_eq!(received.len(), sockets.len());
        for ((role, fd), ((sent, _), addr)) in received.iter().zip(sockets.iter().zip(&addrs)) {
            assert_eq!(role, sent);
            let socket = socket2::SockRef::from(fd);
            assert!(socket.is_listener().unwrap());
            assert_eq!(socket.local_addr().unwrap().as_socket(), Some(*addr));
        }
        let planted = sockets
            .iter()
            .filter(|(r, _)| matches!(r, Role::Namespace { .. }))
            .count();
        let mut inherited = Inherited::sort(received);
        assert!(inherited.take_metrics(addrs[0]).is_some());
        assert_eq!(inherited.take_namespaces()[&netns].len(), planted);
        let (bound, taken) = inherited.take_proxy(addrs[1]).unwrap();
        assert_eq!((bound, taken.len()), (addrs[1], 1));
    }

    /// A socket named but not sent (or the other way round) fails the exchange.
    #[test]
    fn a_count_that_does_not_add_up_is_refused() {
        let (old, new) = UnixStream::pair().unwrap();
        (&old)
            .write_all(b"{\"sockets\":[{\"role\":\"proxy\"}]}\nS")
            .unwrap();
        drop(old);
        let e = receive(&new).unwrap_err();
        assert!(
            matches!(
                e,
                HandoverError::Mismatch {
                    named: 1,
                    marked: 1,
                    received: 0
                }
            ),
            "{e}"
        );
        let (old, new) = UnixStream::pair().unwrap();
        (&old).write_all(b"not json\n").unwrap();
        drop(old);
        assert!(matches!(
            receive(&new).unwrap_err(),
            HandoverError::Header(_)
        ));
    }

    /// Port 0 endpoints take the old daemon's sockets of their IP in order; a listener of
    /// each worker on one address goes together.
    #[test]
    fn port_zero_endpoints_take_the_next_address_of_their_ip() {
        let std = |port| {
            let l = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
            (l.local_addr().unwrap(), l)
        };
        let (a, b) = (std(0), std(0));
        let a2 = (a.0, a.1.try_clone().unwrap());
        let (addr_a, addr_b) = (a.0, b.0);
        let mut inherited = Inherited {
            proxy: vec![a, b, a2],
            ..Default::default()
        };
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let (first, two) = inherited.take_proxy(any).unwrap();
        assert_eq!((first, two.len()), (addr_a, 2));
        let (second, one) = inherited.take_proxy(any).unwrap();
        assert_eq!((second, one.len()), (addr_b, 1));
        assert!(inherited.take_proxy(any).is_none());
        assert!(inherited.take_proxy("[::1]:0".parse().unwrap()).is_none());
    }
}
