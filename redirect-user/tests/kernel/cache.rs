//! Upstream mode's credential cache, against the mock standing in for the real service at
//! 169.254.169.254 in the test's namespace: hundreds of callers asking at once cost it one
//! request, and cached credentials are served while it is down.

use anyhow::{Context as _, Result};

use super::{Mode, TOKEN_TTL, cloud_setup, command_in, curl, sh, test_python, url};

pub const TESTS: &[(&str, super::TestFn)] = &[
    (
        "concurrent_callers_cost_one_upstream_request_and_survive_its_outage",
        concurrent_callers_cost_one_upstream_request_and_survive_its_outage,
    ),
    (
        "ten_thousand_concurrent_requests_cost_one_upstream_request",
        ten_thousand_concurrent_requests_cost_one_upstream_request,
    ),
];

const CREDS: &str = "/latest/meta-data/iam/security-credentials/redirect-mock-role";

fn concurrent_callers_cost_one_upstream_request_and_survive_its_outage() -> Result<()> {
    let python = test_python()?;
    let mut s = cloud_setup("ec2", Mode::Proxy, &["--http-tokens", "required"])?;
    let stand_in = s.stand_in.as_ref().context("proxy mode has a stand-in")?;
    let upstream_requests = |stand_in: &super::Daemon| -> Result<u64> {
        stand_in.status(&s.ns)?["proxy"]["requests"]
            .as_u64()
            .context("requests")
    };
    // 500 callers at once, each with its own token PUT and credentials GET.
    let script = format!(
        r#"
import json, threading, urllib.request
results = []
def ask():
    put = urllib.request.Request("http://169.254.169.254/latest/api/token", method="PUT",
                                 headers={{"{TOKEN_TTL}": "21600"}})
    token = urllib.request.urlopen(put, timeout=30).read().decode()
    get = urllib.request.Request("http://169.254.169.254{CREDS}",
                                 headers={{"X-aws-ec2-metadata-token": token}})
    results.append(json.loads(urllib.request.urlopen(get, timeout=30).read())["AccessKeyId"])
threads = [threading.Thread(target=ask) for _ in range(500)]
for t in threads: t.start()
for t in threads: t.join()
print(json.dumps({{"served": len(results), "keys": sorted(set(results))}}))
"#
    );
    let out = sh(command_in(&python, Some(&s.client), Some(&s.ns))?.args(["-c", &script]))?;
    let got: serde_json::Value = serde_json::from_str(out.trim()).with_context(|| out.clone())?;
    assert_eq!(got["served"], 500, "{got}");
    assert_eq!(got["keys"], serde_json::json!(["ASIAIOSFODNN7EXAMPLE"]));
    assert_eq!(
        upstream_requests(stand_in)?,
        2,
        "one token PUT and one credentials GET reached the real service"
    );
    // A token and the credentials, then the real service goes away.
    let (status, token) = curl(
        &s.client,
        &s.ns,
        &["-X", "PUT", "-H", &format!("{TOKEN_TTL}: 60")],
        &url("/latest/api/token"),
    )?;
    assert_eq!(status, 200);
    drop(s.stand_in.take());
    let auth = format!("X-aws-ec2-metadata-token: {token}");
    let (status, body) = curl(&s.client, &s.ns, &["-H", &auth], &url(CREDS))?;
    assert_eq!(
        status, 200,
        "served from the cache while the service is down: {body}"
    );
    assert!(body.contains("ASIAIOSFODNN7EXAMPLE"), "{body}");
    let (status, _) = curl(
        &s.client,
        &s.ns,
        &["-H", &auth],
        &url("/latest/meta-data/instance-id"),
    )?;
    assert_eq!(status, 502, "what is not cached fails as the service does");
    // A forged token never gets the cached credentials.
    let (status, _) = curl(
        &s.client,
        &s.ns,
        &["-H", "X-aws-ec2-metadata-token: forged"],
        &url(CREDS),
    )?;
    assert_eq!(
        status, 502,
        "forwarded for the service to judge, and it is down"
    );
    Ok(())
}

/// 10,000 requests for the same credentials at once, each on its own connection to the
/// proxy (dialled directly: the redirect is not what this measures), with a proxy that takes
/// them all: one request reaches the stand-in.
fn ten_thousand_concurrent_requests_cost_one_upstream_request() -> Result<()> {
    const CALLERS: usize = 10_000;
    raise_nofile(CALLERS as u64 + 2_000)?;
    let ns = super::NetNs::new()?;
    ns.ip(&["addr", "add", "169.254.169.254/32", "dev", "lo"])?;
    let cg = super::TestCgroup::new()?;
    let (idle, client) = (cg.child("stand-in")?, cg.child("client")?);
    let stand_in = super::Daemon::start_logging(
        &[
            "--mock",
            "--listen",
            "169.254.169.254:80",
            "--cgroup",
            idle.to_str().unwrap(),
        ],
        &ns,
        None,
        "info,access=off",
    )?;
    let proxy = "127.0.0.1:8169";
    let _front = super::Daemon::start_with(
        &[
            "--upstream",
            "http://169.254.169.254",
            "--listen",
            proxy,
            // All at once, none closed for room (the default halves the descriptors for
            // upstream connections).
            "--max-connections",
            "12000",
            "--cgroup",
            client.to_str().unwrap(),
        ],
        &ns,
        None,
        "info,access=off",
        |_| {},
    )?;
    let answered = ns.run(move || -> Result<usize> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(async move {
            let tasks: Vec<_> = (0..CALLERS).map(|_| tokio::spawn(ask(proxy))).collect();
            let mut ok = 0;
            for task in tasks {
                ok += usize::from(task.await? == Some(200));
            }
            Ok(ok)
        })
    })??;
    assert_eq!(answered, CALLERS);
    let upstream = stand_in.status(&ns)?["proxy"]["requests"].as_u64();
    assert_eq!(upstream, Some(1), "one request reached the real service");
    Ok(())
}

/// One GET for the credentials on a new connection: its status.
async fn ask(proxy: &str) -> Option<u16> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(proxy).await.ok()?;
    let request =
        format!("GET {CREDS} HTTP/1.1\r\nHost: 169.254.169.254\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.ok()?;
    std::str::from_utf8(answer.get(9..12)?).ok()?.parse().ok()
}

/// Lets this test process hold `n` descriptors: its soft limit raised up to the hard one
/// (raising that needs CAP_SYS_RESOURCE, which a root in a container may lack).
fn raise_nofile(n: u64) -> Result<()> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read and write a plain value.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        anyhow::ensure!(
            limit.rlim_max >= n,
            "this test needs {n} descriptors; the hard RLIMIT_NOFILE is {} (raise it: ulimit -Hn)",
            limit.rlim_max
        );
        limit.rlim_cur = limit.rlim_cur.max(n);
        if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
    }
    Ok(())
}
