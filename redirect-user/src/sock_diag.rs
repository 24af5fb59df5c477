//! The kernel's description of the other end of a loopback connection, from sock_diag
//! (NETLINK_SOCK_DIAG, as `ss` asks it): the peer socket's cookie, owner uid and cgroup.
//!
//! Why sock_diag and not a sockops program recording each 4-tuple: sockops would run on every
//! TCP socket of the attached cgroups (each connect, each established connection), while this
//! costs one netlink round trip per connection accepted from the daemon's own namespace, and
//! nothing on any other socket. The peer is found by the exact 4-tuple of a socket that exists
//! now (the kernel's own lookup), so a caller cannot name another: a closed socket is not found.

use std::{
    net::{IpAddr, SocketAddr},
    sync::{Mutex, PoisonError},
};

use netlink_packet_core::{NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload};
use netlink_packet_sock_diag::{
    SockDiagMessage,
    constants::{AF_INET, AF_INET6, IPPROTO_TCP},
    inet::{ExtensionFlags, InetRequest, SocketId, StateFlags, nlas::Nla},
};
use netlink_sys::{Socket, SocketAddr as NetlinkAddr, protocols::NETLINK_SOCK_DIAG};

/// `INET_DIAG_CGROUP_ID` (linux/inet_diag.h, since 5.7): the socket's cgroup v2 id, which the
/// kernel adds to every answer. The crate predates it.
const INET_DIAG_CGROUP_ID: u16 = 21;
/// `INET_DIAG_NOCOOKIE`: "any cookie" in a request.
const NO_COOKIE: [u8; 8] = [0xff; 8];

/// What the kernel says of a socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerSocket {
    /// Its cookie (what SO_COOKIE returns inside its owner).
    pub cookie: u64,
    pub uid: u32,
    /// Its cgroup v2 id (the inode number of the cgroup's directory); `None` on kernels
    /// before 5.7.
    pub cgroup_id: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum DiagError {
    #[error("sock_diag: {0}")]
    Io(#[from] std::io::Error),
    #[error("sock_diag: no socket {local} -> {remote} in this namespace")]
    NotFound {
        local: SocketAddr,
        remote: SocketAddr,
    },
    #[error("sock_diag: unreadable answer: {0}")]
    Decode(String),
}

/// A sock_diag socket of the namespace it was opened in.
pub struct SockDiag(Mutex<Socket>);

impl SockDiag {
    pub fn open() -> Result<Self, DiagError> {
        let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
        socket.bind_auto()?;
        socket.connect(&NetlinkAddr::new(0, 0))?;
        Ok(SockDiag(Mutex::new(socket)))
    }

    /// The TCP socket whose local address is `local` and remote address `remote`, in this
    /// namespace: for an accepted connection, `local` is its peer address and `remote` its
    /// local one.
    pub fn find(&self, local: SocketAddr, remote: SocketAddr) -> Result<PeerSocket, DiagError> {
        let family = match (local.ip(), remote.ip()) {
            (IpAddr::V4(_), IpAddr::V4(_)) => AF_INET,
            _ => AF_INET6,
        };
        let mut header = NetlinkHeader::default();
        // No NLM_F_DUMP: the exact lookup (inet_diag_find_one_icsk), one answer or ENOENT.
        header.flags = NLM_F_REQUEST;
        let mut packet = NetlinkMessage::new(
            header,
            SockDiagMessage::InetRequest(InetRequest {
                family,
                protocol: IPPROTO_TCP,
                extensions: ExtensionFlags::empty(),
                states: StateFlags::all(),
                socket_id: SocketId {
                    source_port: local.port(),
                    destination_port: remote.port(),
                    source_address: same_family(local.ip(), family),
                    destination_address: same_family(remote.ip(), family),
                    interface_id: 0,
                    cookie: NO_COOKIE,
                },
            })
            .into(),
        );
        packet.finalize();
        // A header and an inet_diag_req_v2: 72 bytes.
        let mut request = [0u8; 128];
        let request = &mut request[..packet.buffer_len().min(128)];
        packet.serialize(request);
        // The kernel answers within send(): the lock covers one exchange, a few microseconds.
        let socket = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        socket.send(request, 0)?;
        // One answer: a header, the socket, a few attributes (under 512 bytes), or an error.
        let mut buffer = [0u8; 4096];
        let n = socket.recv(&mut &mut buffer[..], 0)?;
        drop(socket);
        let message = NetlinkMessage::<SockDiagMessage>::deserialize(&buffer[..n])
            .map_err(|e| DiagError::Decode(e.to_string()))?;
        match message.payload {
            NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(response)) => {
                let c = response.header.socket_id.cookie;
                // idiag_cookie is two u32s in host byte order, low half first.
                let low = u32::from_ne_bytes([c[0], c[1], c[2], c[3]]);
                let high = u32::from_ne_bytes([c[4], c[5], c[6], c[7]]);
                let cgroup_id = response.nlas.iter().find_map(|nla| match nla {
                    Nla::Other(other)
                        if netlink_packet_core::Nla::kind(other) == INET_DIAG_CGROUP_ID
                            && netlink_packet_core::Nla::value_len(other) == 8 =>
                    {
                        let mut value = [0; 8];
                        netlink_packet_core::Nla::emit_value(other, &mut value);
                        Some(u64::from_ne_bytes(value))
                    }
                    _ => None,
                });
                Ok(PeerSocket {
                    cookie: u64::from(low) | (u64::from(high) << 32),
                    uid: response.header.uid,
                    cgroup_id,
                })
            }
            NetlinkPayload::Error(e) if e.code.is_some() => match e.to_io().raw_os_error() {
                Some(libc::ENOENT) => Err(DiagError::NotFound { local, remote }),
                _ => Err(DiagError::Io(e.to_io())),
            },
            other => Err(DiagError::Decode(format!("{other:?}"))),
        }
    }
}

/// An IPv4 address as an AF_INET6 request spells it (IPv4-mapped) when the other is IPv6.
fn same_family(ip: IpAddr, family: u8) -> IpAddr {
    match (ip, family) {
        (IpAddr::V4(v4), AF_INET6) => IpAddr::V6(v4.to_ipv6_mapped()),
        (ip, _) => ip,
    }
}

#[cfg(test)]
mod tests {
    use std::net::{TcpListener, TcpStream};

    use super::*;

    /// The real kernel: the peer of an accepted loopback connection is the client's socket,
    /// with its cookie, owner and cgroup; once closed, it is not found.
    #[test]
    fn the_peer_of_a_loopback_connection_is_its_client_socket() {
        let diag = SockDiag::open().unwrap();
        for any in ["127.0.0.1:0", "[::1]:0"] {
            let Ok(listener) = TcpListener::bind(any) else {
                continue; // no IPv6 loopback here
            };
            let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
            let (accepted, peer) = listener.accept().unwrap();
            let local = accepted.local_addr().unwrap();
            let found = diag.find(peer, local).unwrap();
            assert_eq!(
                found.cookie,
                socket2::SockRef::from(&client).cookie().unwrap()
            );
            // SAFETY: getuid cannot fail.
            assert_eq!(found.uid, unsafe { libc::getuid() });
            assert!(found.cgroup_id.is_some_and(|id| id > 0), "{found:?}");
            // The server closes first, so its side waits in TIME_WAIT and the client's is
            // gone once it has closed too.
            drop(accepted);
            std::thread::sleep(std::time::Duration::from_millis(10));
            drop(client);
            // The last ACK crosses loopback at once; the retries only spare a slow machine.
            let gone = (0..100)
                .map(|_| {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                    diag.find(peer, local)
                })
                .find(|r| matches!(r, Err(DiagError::NotFound { .. })));
            assert!(gone.is_some(), "{:?}", diag.find(peer, local));
        }
    }
}
