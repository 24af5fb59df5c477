//! Roles this test binary plays when started as a child inside a test cgroup and network
//! namespace (`REDIRECT_TEST_ROLE`). Each prints one JSON object on stdout.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
};

use serde_json::json;

pub const ROLE_ENV: &str = "REDIRECT_TEST_ROLE";

/// Runs the role named by `role` with the process arguments; returns the exit code.
pub fn run(role: &str) -> i32 {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match role {
        "http" => http(&args),
        "connect" => connect(&args),
        "flood" => flood(&args),
        "idle-flood" => idle_flood(&args),
        "raw" => raw(&args),
        "churn" => churn(&args),
        "hold" => hold(&args),
        "udp" => udp(&args),
        "early" => early(&args),
        _ => Err(format!("unknown role {role}")),
    };
    match result {
        Ok(value) => {
            println!("{value}");
            0
        }
        Err(e) => {
            eprintln!("child role {role}: {e}");
            1
        }
    }
}

/// `http METHOD URL [NAME:VALUE...]` with reqwest, the way an application would call IMDS.
fn http(args: &[String]) -> Result<serde_json::Value, String> {
    let [method, url, headers @ ..] = args else {
        return Err("usage: http METHOD URL [NAME:VALUE...]".into());
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    runtime.block_on(async {
        let client = reqwest::Client::builder()
            .no_proxy()
            .build()
            .map_err(|e| e.to_string())?;
        let method = reqwest::Method::from_bytes(method.as_bytes()).map_err(|e| e.to_string())?;
        let mut req = client.request(method, url);
        for h in headers {
            let (name, value) = h.split_once(':').ok_or("header must be NAME:VALUE")?;
            req = req.header(name, value);
        }
        let resp = req.send().await.map_err(|e| format!("{e:?}"))?;
        let status = resp.status().as_u16();
        let headers: serde_json::Map<String, serde_json::Value> = resp
            .headers()
            .iter()
            .map(|(k, v)| (k.to_string(), json!(v.to_str().unwrap_or_default())))
            .collect();
        let body = resp.text().await.map_err(|e| e.to_string())?;
        Ok(json!({ "status": status, "headers": headers, "body": body }))
    })
}

/// `connect ADDR`: a plain socket connect; on success reports getpeername() and the body of
/// `GET /latest/meta-data/instance-id` sent over that connection.
fn connect(args: &[String]) -> Result<serde_json::Value, String> {
    let [addr] = args else {
        return Err("usage: connect ADDR".into());
    };
    let addr: SocketAddr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
    let mut stream = match TcpStream::connect(addr) {
        Ok(s) => s,
        Err(e) => {
            return Ok(json!({ "ok": false, "errno": e.raw_os_error(), "error": e.to_string() }));
        }
    };
    let peer = stream.peer_addr().map_err(|e| e.to_string())?;
    // Only a guard against a hung test; the answer comes in microseconds.
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    stream
        .write_all(b"GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: 169.254.169.254\r\nConnection: close\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .map_err(|e| e.to_string())?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .unwrap_or_default();
    Ok(json!({ "ok": true, "peer": peer.to_string(), "body": body }))
}

/// The soft descriptor limit up to the hard one: the floods hold many sockets.
pub fn raise_nofile() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls with a valid struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

/// `flood ADDR N SIZE`: N connections at once, each sending a PUT with a SIZE-byte body as
/// fast as it can, then reading the answer; reports the statuses it got (`"none"`: the
/// connection ended without one).
fn flood(args: &[String]) -> Result<serde_json::Value, String> {
    let [addr, n, size] = args else {
        return Err("usage: flood ADDR N SIZE".into());
    };
    let addr: SocketAddr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
    let n: usize = n.parse().map_err(|e| format!("{n}: {e}"))?;
    let size: usize = size.parse().map_err(|e| format!("{size}: {e}"))?;
    raise_nofile();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let statuses = runtime.block_on(async {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let tasks: Vec<_> = (0..n)
            .map(|_| {
                tokio::spawn(async move {
                    let Ok(mut stream) = tokio::net::TcpStream::connect(addr).await else {
                        return "connect failed".to_owned();
                    };
                    let head = format!(
                        "PUT /latest/flood HTTP/1.1\r\nHost: 169.254.169.254\r\nConnection: close\r\nContent-Length: {size}\r\n\r\n"
                    );
                    let (mut read, mut write) = stream.split();
                    let send = async {
                        write.write_all(head.as_bytes()).await?;
                        let chunk = vec![b'x'; 64 << 10];
                        let mut left = size;
                        while left > 0 {
                            let n = left.min(chunk.len());
                            write.write_all(&chunk[..n]).await?;
                            left -= n;
                        }
                        std::io::Result::Ok(())
                    };
                    let mut answer = Vec::new();
                    let (_, _) = tokio::join!(send, read.read_to_end(&mut answer));
                    String::from_utf8_lossy(&answer)
                        .strip_prefix("HTTP/1.1 ")
                        .and_then(|r| r.get(..3))
                        .unwrap_or("none")
                        .to_owned()
                })
            })
            .collect();
        let mut statuses = serde_json::Map::new();
        for task in tasks {
            let status = task.await.unwrap_or_else(|_| "panicked".to_owned());
            let count = statuses.entry(status).or_insert(json!(0));
            *count = json!(count.as_u64().unwrap_or(0) + 1);
        }
        statuses
    });
    Ok(json!({ "statuses": statuses }))
}

/// `idle-flood ADDR N`: opens N connections and sends nothing on them; prints how many
/// opened, then holds them until stdin closes.
fn idle_flood(args: &[String]) -> Result<serde_json::Value, String> {
    let [addr, n] = args else {
        return Err("usage: idle-flood ADDR N".into());
    };
    let addr: SocketAddr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
    let n: usize = n.parse().map_err(|e| format!("{n}: {e}"))?;
    raise_nofile();
    let held: Vec<TcpStream> = (0..n)
        .filter_map(|_| TcpStream::connect(addr).ok())
        .collect();
    println!("{}", json!({ "opened": held.len() }));
    std::io::stdout().flush().map_err(|e| e.to_string())?;
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
    Ok(json!({ "released": held.len() }))
}

/// `raw ADDR`: sends stdin's bytes verbatim on one connection and reports everything that
/// comes back until the other side closes.
fn raw(args: &[String]) -> Result<serde_json::Value, String> {
    let [addr] = args else {
        return Err("usage: raw ADDR < bytes".into());
    };
    let addr: SocketAddr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
    let mut request = Vec::new();
    std::io::stdin()
        .read_to_end(&mut request)
        .map_err(|e| e.to_string())?;
    let mut stream = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    // A refusal may close before everything is sent.
    let _ = stream.write_all(&request);
    let mut answer = Vec::new();
    // Ends at the daemon's close (after a refusal, or at its idle timeout); a reset after
    // some bytes keeps what came.
    let _ = stream.read_to_end(&mut answer);
    Ok(json!({ "answer": String::from_utf8_lossy(&answer) }))
}

/// `udp ADDR`: sends one datagram to ADDR; the errno of a refused send.
fn udp(args: &[String]) -> Result<serde_json::Value, String> {
    let [addr] = args else {
        return Err("usage: udp ADDR".into());
    };
    let addr: SocketAddr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
    let socket = std::net::UdpSocket::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
    Ok(match socket.send_to(b"escape", addr) {
        Ok(n) => json!({ "sent": n }),
        Err(e) => json!({ "sent": 0, "errno": e.raw_os_error() }),
    })
}

/// `early ADDR`: connects (before the redirect exists), says so (`{"connected":true}`),
/// waits for a line on stdin, then sends a request on that connection and says whether the
/// write was taken (`{"written":true}`): what happens to its packets is the test's to see.
fn early(args: &[String]) -> Result<serde_json::Value, String> {
    let [addr] = args else {
        return Err("usage: early ADDR".into());
    };
    let addr: SocketAddr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
    let mut stream = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    println!("{}", json!({ "connected": true }));
    std::io::stdout().flush().map_err(|e| e.to_string())?;
    let mut line = String::new();
    std::io::stdin()
        .read_line(&mut line)
        .map_err(|e| e.to_string())?;
    let written = stream
        .write_all(b"GET /latest/meta-data/iam/security-credentials/ HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\n")
        .is_ok();
    Ok(json!({ "written": written }))
}

/// `hold ADDR`: connects, sends half a request head, says so (`{"sent":true}`), and waits to
/// be killed in the middle of its request.
fn hold(args: &[String]) -> Result<serde_json::Value, String> {
    let [addr] = args else {
        return Err("usage: hold ADDR".into());
    };
    let addr: SocketAddr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
    let mut stream = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    stream
        .write_all(b"GET /latest/meta-data/ HTTP/1.1\r\nHost: 169.254.169.254\r\n")
        .map_err(|e| e.to_string())?;
    println!("{}", json!({ "sent": true }));
    std::io::stdout().flush().map_err(|e| e.to_string())?;
    loop {
        std::thread::sleep(std::time::Duration::from_secs(600));
    }
}

/// `churn COUNT PARALLEL`: COUNT short-lived processes, PARALLEL at a time, each in a network
/// namespace of its own (loopback up, nothing else) that connects to 169.254.169.254:80
/// until the connect succeeds (the daemon has planted its listener there) or 10 s pass, then
/// exits, its namespace with it: containers starting and stopping, without Docker.
fn churn(args: &[String]) -> Result<serde_json::Value, String> {
    let [count, parallel] = args else {
        return Err("usage: churn COUNT PARALLEL".into());
    };
    let count: usize = count.parse().map_err(|e| format!("{count}: {e}"))?;
    let parallel: usize = parallel.parse().map_err(|e| format!("{parallel}: {e}"))?;
    let (mut served, mut failed, mut running) = (0, std::collections::BTreeMap::new(), 0);
    let mut reap = |running: &mut usize| {
        let mut status = 0;
        // SAFETY: waits for any child of this process.
        if unsafe { libc::wait(&raw mut status) } > 0 {
            *running -= 1;
            match libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status)) {
                Some(0) => served += 1,
                // 1: never served; 2, 3: no namespace, no loopback; -1: killed.
                code => *failed.entry(code.unwrap_or(-1)).or_insert(0) += 1,
            }
        }
    };
    for _ in 0..count {
        if running == parallel {
            reap(&mut running);
        }
        // SAFETY: the child only makes async-signal-safe calls (no allocation) and _exits.
        match unsafe { libc::fork() } {
            0 => unsafe { libc::_exit(churn_child()) },
            -1 => return Err(std::io::Error::last_os_error().to_string()),
            _ => running += 1,
        }
    }
    while running > 0 {
        reap(&mut running);
    }
    Ok(json!({ "served": served, "failed": failed }))
}

/// One churned process: 0 once a connect succeeded.
unsafe fn churn_child() -> i32 {
    // SAFETY (for the block): plain syscalls on values of this frame.
    unsafe {
        if libc::unshare(libc::CLONE_NEWNET) != 0 {
            return 2;
        }
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
        let mut ifr: libc::ifreq = std::mem::zeroed();
        ifr.ifr_name[0] = b'l' as libc::c_char;
        ifr.ifr_name[1] = b'o' as libc::c_char;
        ifr.ifr_ifru.ifru_flags = libc::IFF_UP as libc::c_short;
        if libc::ioctl(fd, libc::SIOCSIFFLAGS, &raw const ifr) != 0 {
            return 3;
        }
        libc::close(fd);
        let addr = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 80u16.to_be(),
            // 169.254.169.254, network byte order.
            sin_addr: libc::in_addr {
                s_addr: u32::from_be_bytes([169, 254, 169, 254]).to_be(),
            },
            sin_zero: [0; 8],
        };
        for _ in 0..5000 {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
            let connected = libc::connect(
                fd,
                (&raw const addr).cast(),
                size_of::<libc::sockaddr_in>() as libc::socklen_t,
            ) == 0;
            libc::close(fd);
            if connected {
                return 0;
            }
            let pause = libc::timespec {
                tv_sec: 0,
                tv_nsec: 2_000_000,
            };
            libc::nanosleep(&raw const pause, std::ptr::null_mut());
        }
        1
    }
}
