//! Asking the network's DHCP server who it is: a DHCPINFORM (RFC 2131 §3.4, for a client
//! that has its address already) from the VM's address on one interface, whose DHCPACK
//! carries the server identifier (option 54). Built and read with dhcproto.
//!
//! Sent only by `--upstream cloudstack` when neither the `data-server` name nor a lease
//! file names the router: one broadcast on the VM's own network, as its DHCP client sends.

use std::{
    io,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    time::Duration,
};

use dhcproto::{
    Decodable as _, Decoder, Encodable as _, Encoder,
    v4::{DhcpOption, Flags, Message, MessageType, OptionCode},
};
use socket2::{Domain, Protocol, Socket, Type};

const SERVER_PORT: u16 = 67;
const CLIENT_PORT: u16 = 68;

/// The server identifier of the DHCP server answering on `interface`, whose address is
/// `address` and hardware address `mac`; `None` when none answers within `wait`.
pub async fn server_identifier(
    interface: &str,
    address: Ipv4Addr,
    mac: [u8; 6],
    wait: Duration,
) -> io::Result<Option<Ipv4Addr>> {
    let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_reuse_address(true)?;
    socket.set_broadcast(true)?;
    socket.bind_device(Some(interface.as_bytes()))?;
    socket.set_nonblocking(true)?;
    // The ACK comes to the client port, unicast to `address` (or broadcast).
    socket.bind(&SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, CLIENT_PORT)).into())?;
    let socket = tokio::net::UdpSocket::from_std(socket.into())?;
    let mut inform = Message::new(
        address,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        &mac,
    );
    inform.set_flags(Flags::default());
    let opts = inform.opts_mut();
    opts.insert(DhcpOption::MessageType(MessageType::Inform));
    opts.insert(DhcpOption::ParameterRequestList(vec![
        OptionCode::ServerIdentifier,
        OptionCode::Router,
    ]));
    let xid = inform.xid();
    let mut packet = Vec::new();
    inform
        .encode(&mut Encoder::new(&mut packet))
        .map_err(io::Error::other)?;
    let broadcast = SocketAddrV4::new(Ipv4Addr::BROADCAST, SERVER_PORT);
    socket.send_to(&packet, broadcast).await?;
    let answer = async {
        let mut buf = vec![0u8; 1500];
        loop {
            let (n, _) = socket.recv_from(&mut buf).await?;
            if let Some(server) = ack_server(&buf[..n], xid) {
                return Ok::<_, io::Error>(server);
            }
        }
    };
    match tokio::time::timeout(wait, answer).await {
        Ok(Ok(server)) => Ok(Some(server)),
        Ok(Err(e)) => Err(e),
        Err(_) => Ok(None),
    }
}

/// The server identifier of a DHCPACK answering `xid`.
fn ack_server(packet: &[u8], xid: u32) -> Option<Ipv4Addr> {
    let message = Message::decode(&mut Decoder::new(packet)).ok()?;
    if message.xid() != xid || message.opts().msg_type() != Some(MessageType::Ack) {
        return None;
    }
    super::leases::server_of(&message)
}

#[cfg(test)]
mod tests {
    use dhcproto::v4::Opcode;

    use super::*;

    #[test]
    fn reads_only_its_own_ack() {
        let mut ack = Message::default();
        ack.set_opcode(Opcode::BootReply).set_xid(7);
        ack.opts_mut()
            .insert(DhcpOption::MessageType(MessageType::Ack));
        ack.opts_mut()
            .insert(DhcpOption::ServerIdentifier(Ipv4Addr::new(10, 1, 1, 1)));
        let mut raw = Vec::new();
        ack.encode(&mut Encoder::new(&mut raw)).unwrap();
        assert_eq!(ack_server(&raw, 7), Some(Ipv4Addr::new(10, 1, 1, 1)));
        assert_eq!(ack_server(&raw, 8), None, "another client's");
        assert_eq!(ack_server(&raw[..100], 7), None, "truncated");
        assert_eq!(ack_server(b"", 7), None);
    }
}
