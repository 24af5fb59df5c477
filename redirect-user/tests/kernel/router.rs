//! `--upstream cloudstack`: the virtual router found as cloud-init finds it (here by a
//! DHCPINFORM to a real dnsmasq, then by a lease file) in a router namespace of the test's,
//! connected to from the VM's own address, and followed when it moves mid-run.

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    path::Path,
    process::{Command, Stdio},
    sync::Mutex,
};

use anyhow::{Context as _, Result};

use super::{Daemon, NetNs, TestCgroup, curl, support, url};
use support::{ChildGuard, TestServer};

pub const TESTS: &[(&str, super::TestFn)] = &[
    (
        "cloudstack_upstream_follows_the_router_found_by_dhcp",
        cloudstack_upstream_follows_the_router_found_by_dhcp,
    ),
    (
        "cloudstack_upstream_finds_the_router_in_a_lease",
        cloudstack_upstream_finds_the_router_in_a_lease,
    ),
];

/// A router's metadata server (port 80) or password server (8080): answers
/// `<name>:<port>:<target>` and records each connection's source address.
fn router_server(
    ns: &NetNs,
    name: &'static str,
    addr: &str,
    port: u16,
) -> Result<TestServer<String>> {
    let addr = format!("{addr}:{port}").parse()?;
    TestServer::start(
        ns,
        addr,
        move |mut stream: TcpStream, log: &Mutex<Vec<String>>| {
            let mut buf = [0u8; 4096];
            let Ok(n) = stream.read(&mut buf) else { return };
            let head = String::from_utf8_lossy(&buf[..n]).into_owned();
            let target = head
                .split_whitespace()
                .nth(1)
                .unwrap_or_default()
                .to_owned();
            if let Ok(peer) = stream.peer_addr() {
                log.lock().unwrap().push(peer.ip().to_string());
            }
            let body = format!("{name}:{port}:{target}");
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        },
    )
}

/// dnsmasq answering DHCP on `interface` of the router namespace, as CloudStack's router
/// does (its server identifier is its address there).
fn dnsmasq(ns: &NetNs, interface: &str, dir: &Path) -> Result<ChildGuard> {
    let child = Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns.name,
            "dnsmasq",
            "--keep-in-foreground",
            "--port=0",
        ])
        .arg(format!("--interface={interface}"))
        .args([
            "--bind-interfaces",
            "--dhcp-range=10.1.1.0,static,255.255.255.0",
            "--dhcp-authoritative",
            "--leasefile-ro",
            "--no-resolv",
            "--no-hosts",
            "--log-dhcp",
        ])
        .arg(format!(
            "--pid-file={}",
            dir.join(format!("dnsmasq-{interface}.pid")).display()
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting dnsmasq (cargo xtask test installs dnsmasq-base)")?;
    Ok(ChildGuard(Some(child)))
}

struct Network {
    vm: NetNs,
    router: NetNs,
    /// The router namespace's end of the VM's link.
    router_end: String,
}

/// The VM's namespace and the router's, linked: VM 10.1.1.42, router 10.1.1.1 and a
/// gateway address 10.1.1.254 the router's servers do not answer on (so the default
/// gateway, cloud-init's last resort, would be the wrong answer).
fn network() -> Result<Network> {
    let vm = NetNs::new()?;
    let router = NetNs::new()?;
    let (_, router_end) = support::veth(&vm, "10.1.1.42/24", &router, "10.1.1.1/24")?;
    router.ip(&["addr", "add", "10.1.1.254/24", "dev", &router_end])?;
    vm.ip(&["route", "add", "default", "via", "10.1.1.254"])?;
    Ok(Network {
        vm,
        router,
        router_end,
    })
}

fn daemon(net: &Network, client: &Path, lease_dir: &Path, config_dir: &Path) -> Result<Daemon> {
    let config = config_dir.join("redirect.toml");
    std::fs::write(
        &config,
        format!(
            "upstream = \"cloudstack\"\ncgroups = [{:?}]\n[cloudstack_router]\nlease_dirs = [{:?}]\nrecheck = \"1s\"\n",
            client.to_str().unwrap(),
            lease_dir.to_str().unwrap()
        ),
    )?;
    Daemon::start(&["--config", config.to_str().unwrap()], &net.vm, None)
}

fn cloudstack_upstream_follows_the_router_found_by_dhcp() -> Result<()> {
    let net = network()?;
    let cg = TestCgroup::new()?;
    let client = cg.child("client")?;
    let dir = tempfile::tempdir()?;
    let leases = tempfile::tempdir()?; // none: the DHCPINFORM finds it
    let a80 = router_server(&net.router, "router-a", "10.1.1.1", 80)?;
    let a8080 = router_server(&net.router, "router-a", "10.1.1.1", 8080)?;
    let dhcp = dnsmasq(&net.router, &net.router_end, dir.path())?;
    let daemon = daemon(&net, &client, leases.path(), dir.path())?;
    daemon.wait_for_log("CloudStack virtual router: 10.1.1.1 (found by a DHCPINFORM")?;
    let id = url("/latest/meta-data/instance-id");
    assert_eq!(
        curl(&client, &net.vm, &[], &id)?,
        (200, "router-a:80:/latest/meta-data/instance-id".into())
    );
    // The password server, on the router's port 8080.
    let password = ["-H", "DomU_Request: send_my_password"];
    assert_eq!(
        curl(&client, &net.vm, &password, "http://169.254.169.254:8080/")?,
        (200, "router-a:8080:/".into())
    );
    assert_eq!(a80.log(), ["10.1.1.42"], "from the VM's own address");
    assert_eq!(a8080.log(), ["10.1.1.42"]);
    // The router is recreated elsewhere: its old address goes, a new one answers DHCP.
    drop((dhcp, a80, a8080));
    net.router
        .ip(&["addr", "del", "10.1.1.1/24", "dev", &net.router_end])?;
    net.router
        .ip(&["addr", "add", "10.1.1.2/24", "dev", &net.router_end])?;
    let _b80 = router_server(&net.router, "router-b", "10.1.1.2", 80)?;
    let _dhcp = dnsmasq(&net.router, &net.router_end, dir.path())?;
    daemon.wait_for_log("CloudStack virtual router: 10.1.1.2 (found by a DHCPINFORM")?;
    assert_eq!(
        curl(&client, &net.vm, &[], &id)?,
        (200, "router-b:80:/latest/meta-data/instance-id".into()),
        "the same well-known address, the new router"
    );
    Ok(())
}

fn cloudstack_upstream_finds_the_router_in_a_lease() -> Result<()> {
    let net = network()?;
    let cg = TestCgroup::new()?;
    let client = cg.child("client")?;
    let dir = tempfile::tempdir()?;
    let leases = tempfile::tempdir()?;
    // systemd-networkd's lease, naming the router; no DHCP server runs.
    std::fs::write(
        leases.path().join("2"),
        "# This is private data. Do not parse.\nADDRESS=10.1.1.42\nSERVER_ADDRESS=10.1.1.1\n",
    )?;
    let _a80 = router_server(&net.router, "router-a", "10.1.1.1", 80)?;
    let daemon = daemon(&net, &client, leases.path(), dir.path())?;
    daemon.wait_for_log("CloudStack virtual router: 10.1.1.1 (found by the DHCP lease")?;
    assert_eq!(
        curl(&client, &net.vm, &[], &url("/latest/user-data"))?,
        (200, "router-a:80:/latest/user-data".into())
    );
    Ok(())
}
