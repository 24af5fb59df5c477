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
