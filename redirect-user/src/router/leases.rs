//! The DHCP server identifier (option 54) of the newest lease the VM's DHCP client wrote:
//! on CloudStack it is the virtual router's address.
//!
//! Each client writes leases its own way:
//! - systemd-networkd (`/run/systemd/netif/leases/<ifindex>`) and NetworkManager's internal
//!   client (`/var/lib/NetworkManager/internal-*.lease`): `SERVER_ADDRESS=10.1.1.1` lines;
//! - dhclient (`/var/lib/dhcp/dhclient*.leases`, `/var/lib/dhclient/`, NetworkManager's
//!   `dhclient-*.lease`): `option dhcp-server-identifier 10.1.1.1;` in `lease { }` blocks,
//!   the last block the newest;
//! - dhcpcd (`/var/lib/dhcpcd/*.lease`): the server's DHCPACK itself, as received.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::SystemTime,
};

use dhcproto::{
    Decodable as _, Decoder,
    v4::{DhcpOption, Message, OptionCode},
};

/// Where DHCP clients keep their leases, in the order cloud-init looks.
pub const LEASE_DIRS: &[&str] = &[
    "/run/systemd/netif/leases",
    "/var/lib/dhcp",
    "/var/lib/dhclient",
    "/var/lib/NetworkManager",
    "/var/lib/dhcpcd",
    "/run/dhcpcd",
];

/// The server identifier of the newest lease file in `dirs` that names one, and that file.
pub fn newest_server(dirs: &[PathBuf]) -> Option<(Ipv4Addr, PathBuf)> {
    let mut found: Vec<(SystemTime, Ipv4Addr, PathBuf)> = Vec::new();
    for dir in dirs {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(meta) = entry.metadata() else { continue };
            // Leases are small; anything large is not one.
            if !meta.is_file() || meta.len() > 64 << 10 {
                continue;
            }
            if let Some(server) = server_in(&path) {
                let modified = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
                found.push((modified, server, path));
            }
        }
    }
    found.sort_by_key(|(modified, ..)| *modified);
    found.pop().map(|(_, server, path)| (server, path))
}

/// The server identifier in one lease file, whichever client wrote it.
pub fn server_in(path: &Path) -> Option<Ipv4Addr> {
    let bytes = std::fs::read(path).ok()?;
    match std::str::from_utf8(&bytes) {
        Ok(text) => networkd(text).or_else(|| dhclient(text)),
        Err(_) => dhcpcd(&bytes),
    }
    .or_else(|| dhcpcd(&bytes))
}

fn networkd(text: &str) -> Option<Ipv4Addr> {
    text.lines()
        .find_map(|l| l.trim().strip_prefix("SERVER_ADDRESS="))
        .and_then(|v| v.trim().parse().ok())
}

fn dhclient(text: &str) -> Option<Ipv4Addr> {
    // The last block is the newest lease.
    text.lines().rev().find_map(|l| {
        l.trim()
            .strip_prefix("option dhcp-server-identifier ")?
            .trim_end_matches(';')
            .trim()
            .parse()
            .ok()
    })
}

/// A DHCP message as dhcpcd stores it (a BOOTP reply with the magic cookie).
fn dhcpcd(bytes: &[u8]) -> Option<Ipv4Addr> {
    if bytes.len() < 240 {
        return None;
    }
    server_of(&Message::decode(&mut Decoder::new(bytes)).ok()?)
}

/// A DHCP message's server identifier (option 54).
pub fn server_of(message: &Message) -> Option<Ipv4Addr> {
    match message.opts().get(OptionCode::ServerIdentifier)? {
        DhcpOption::ServerIdentifier(server) => Some(*server),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use dhcproto::{Encodable as _, Encoder, v4};

    use super::*;

    #[test]
    fn every_clients_format() {
        let dir = tempfile::tempdir().unwrap();
        let written = std::cell::Cell::new(0u64);
        let write = |name: &str, body: &[u8]| {
            let path = dir.path().join(name);
            std::fs::write(&path, body).unwrap();
            // Each file newer than the one before, whatever the clock's granularity.
            written.set(written.get() + 1);
            let when =
                SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000 * written.get());
            std::fs::File::options()
                .write(true)
                .open(&path)
                .unwrap()
                .set_modified(when)
                .unwrap();
            path
        };
        let networkd = write(
            "2",
            b"# This is private data. Do not parse.\nADDRESS=10.1.1.42\nSERVER_ADDRESS=10.1.1.1\n",
        );
        assert_eq!(server_in(&networkd), Some(Ipv4Addr::new(10, 1, 1, 1)));
        let dhclient = write(
            "dhclient.eth0.leases",
            b"lease {\n  interface \"eth0\";\n  option dhcp-server-identifier 10.1.1.1;\n}\nlease {\n  interface \"eth0\";\n  option dhcp-server-identifier 10.1.1.254;\n}\n",
        );
        assert_eq!(
            server_in(&dhclient),
            Some(Ipv4Addr::new(10, 1, 1, 254)),
            "the last"
        );
        let mut ack = Message::default();
        ack.set_opcode(v4::Opcode::BootReply);
        ack.opts_mut()
            .insert(DhcpOption::MessageType(v4::MessageType::Ack));
        ack.opts_mut()
            .insert(DhcpOption::ServerIdentifier(Ipv4Addr::new(10, 1, 1, 7)));
        let mut raw = Vec::new();
        ack.encode(&mut Encoder::new(&mut raw)).unwrap();
        let dhcpcd = write("eth0.lease", &raw);
        assert_eq!(server_in(&dhcpcd), Some(Ipv4Addr::new(10, 1, 1, 7)));
        assert_eq!(server_in(&write("junk", b"\xff\x00garbage")), None);
        assert_eq!(server_in(&write("empty", b"")), None);
        // The newest file that names a server wins.
        let newest = newest_server(&[dir.path().to_owned(), "/nonexistent".into()]).unwrap();
        assert_eq!(newest.1, dhcpcd);
    }
}
