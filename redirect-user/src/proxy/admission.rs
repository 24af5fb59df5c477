//! What a request must be before any backend sees it, refused as nginx refuses it.
//!
//! hyper has already refused what does not parse (400), an oversized head (431), HTTP/1.0
//! with `Transfer-Encoding` and a transfer coding whose last is not chunked (400), and
//! decodes chunked bodies strictly (a bare CR or LF in a chunk line ends the connection).
//! What it lets through and nginx does not:
//! - a target that is not origin-form: absolute-form only for our own host names (it is then
//!   made origin-form, its authority the Host, RFC 9112 §3.2.2), `CONNECT` 405, the rest 400;
//! - the Host rules of RFC 9112 §3.2: HTTP/1.1 without Host, more than one Host line, or a
//!   Host that is not `host[:port]`: 400;
//! - `Transfer-Encoding` on more than one line: 400; a transfer coding other than chunked:
//!   501;
//! - `Connection` naming `Host` (it would strip Host from what is forwarded): 400.
//!
//! Header names with `_` are dropped (nginx's `underscores_in_headers off`): an upstream that
//! folds `_` into `-` would otherwise read `Transfer_Encoding` as framing. One is kept:
//! CloudStack's password server protocol is a header named `DomU_Request`, which no framing
//! header resembles.

use hyper::{
    HeaderMap, Method, StatusCode, Uri, Version,
    header::{self, HeaderName, HeaderValue},
    http::{request::Parts, uri::Authority},
};

use crate::mock::cloudstack::PASSWORD_HEADER;

/// Longest request target: beyond it, 414 (nginx's default `large_client_header_buffers`).
pub const MAX_TARGET: usize = 8 << 10;

/// A request the proxy answers itself, before any backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub status: StatusCode,
    pub reason: &'static str,
}

fn bad(reason: &'static str) -> Refusal {
    Refusal {
        status: StatusCode::BAD_REQUEST,
        reason,
    }
}

/// The host names an absolute-form target may carry: the metadata service's own (the
/// targets, the upstream, `metadata.google.internal`) and the proxy's listen addresses.
#[derive(Debug, Clone, Default)]
pub struct OwnNames(Vec<String>);

impl OwnNames {
    pub fn new(names: impl IntoIterator<Item = String>) -> Self {
        OwnNames(names.into_iter().map(|n| normalize(&n)).collect())
    }
}

/// Lower case, IPv6 without brackets.
fn normalize(host: &str) -> String {
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .to_ascii_lowercase()
}

/// Checks a request head and brings it to the form backends get: an origin-form target,
/// exactly one valid Host (none only for HTTP/1.0), no header names with `_`.
pub fn admit(parts: &mut Parts, names: &OwnNames) -> Result<(), Refusal> {
    if parts.method == Method::CONNECT {
        let reason = "CONNECT is not supported";
        return Err(Refusal {
            status: StatusCode::METHOD_NOT_ALLOWED,
            reason,
        });
    }
    let uri = &parts.uri;
    let target = uri.path_and_query().map_or(0, |p| p.as_str().len())
        + uri.authority().map_or(0, |a| a.as_str().len());
    if target > MAX_TARGET {
        let reason = "the request target is too long";
        return Err(Refusal {
            status: StatusCode::URI_TOO_LONG,
            reason,
        });
    }
    if let Some(authority) = parts.uri.authority().cloned() {
        absolute_to_origin(parts, authority, names)?;
    } else if !parts.uri.path().starts_with('/') {
        // `*` (asterisk-form), or a path without its leading slash.
        return Err(bad("the request target must be a path"));
    }
    check_host(parts.version, &parts.headers)?;
    let mut codings = parts.headers.get_all(header::TRANSFER_ENCODING).iter();
    match (codings.next(), codings.next()) {
        (Some(_), Some(_)) => return Err(bad("Transfer-Encoding on more than one line")),
        (Some(coding), None)
            if !coding
                .as_bytes()
                .trim_ascii()
                .eq_ignore_ascii_case(b"chunked") =>
        {
            let reason = "transfer codings other than chunked are not supported";
            return Err(Refusal {
                status: StatusCode::NOT_IMPLEMENTED,
                reason,
            });
        }
        _ => {}
    }
    if connection_options(&parts.headers).any(|name| name == header::HOST) {
        return Err(bad("Connection may not name Host"));
    }
    let underscored: Vec<HeaderName> = parts
        .headers
        .keys()
        .filter(|name| name.as_str().contains('_') && name.as_str() != PASSWORD_HEADER)
        .cloned()
        .collect();
    for name in underscored {
        parts.headers.remove(name);
    }
    Ok(())
}

/// `GET http://169.254.169.254/x`: served as `GET /x` with that Host, for our own names only
/// (this is not an open proxy). An authority-form target (`GET host:80`) is refused too.
fn absolute_to_origin(
    parts: &mut Parts,
    authority: Authority,
    names: &OwnNames,
) -> Result<(), Refusal> {
    let not_ours = bad("the request target must be a path, or an http:// URL of this service");
    let path = parts
        .uri
        .path_and_query()
        .filter(|p| p.as_str().starts_with('/'));
    let (Some(path), Some("http")) = (path, parts.uri.scheme_str()) else {
        return Err(not_ours);
    };
    if !names.0.contains(&normalize(authority.host())) {
        return Err(not_ours);
    }
    let invalid = |_| bad("invalid request target");
    parts.uri = Uri::builder()
        .path_and_query(path.clone())
        .build()
        .map_err(invalid)?;
    // RFC 9112 §3.2.2: the target's authority replaces whatever Host says.
    let host =
        HeaderValue::from_str(authority.as_str()).map_err(|_| bad("invalid request target"))?;
    parts.headers.insert(header::HOST, host);
    Ok(())
}

/// RFC 9112 §3.2.
fn check_host(version: Version, headers: &HeaderMap) -> Result<(), Refusal> {
    let mut hosts = headers.get_all(header::HOST).iter();
    match (hosts.next(), hosts.next()) {
        (None, _) if version == Version::HTTP_10 => Ok(()),
        (None, _) => Err(bad("HTTP/1.1 requires a Host header")),
        (Some(_), Some(_)) => Err(bad("more than one Host header")),
        (Some(host), None) if valid_host(host.as_bytes()) => Ok(()),
        (Some(_), None) => Err(bad("invalid Host header")),
    }
}

/// `uri-host [ ":" port ]`, nothing more.
fn valid_host(value: &[u8]) -> bool {
    let Ok(authority) = Authority::try_from(value) else {
        return false;
    };
    let port = authority.as_str().strip_prefix(authority.host());
    !value.is_empty()
        && !value.contains(&b'@')
        && port.is_some_and(|p| {
            p.is_empty()
                || p.strip_prefix(':')
                    .is_some_and(|n| n.parse::<u16>().is_ok())
        })
}

/// The header names listed in `Connection` (RFC 9110 §7.6.1).
pub fn connection_options(headers: &HeaderMap) -> impl Iterator<Item = HeaderName> + '_ {
    let values = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok());
    values
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::Request;

    fn names() -> OwnNames {
        OwnNames::new(
            [
                "169.254.169.254",
                "[fd00:ec2::254]",
                "metadata.google.internal",
            ]
            .map(String::from),
        )
    }

    fn parts(method: &str, target: &str, version: Version, headers: &[(&str, &str)]) -> Parts {
        let mut req = Request::builder()
            .method(method)
            .uri(target)
            .version(version);
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        req.body(()).unwrap().into_parts().0
    }

    fn admitted(method: &str, target: &str, headers: &[(&str, &str)]) -> Result<Parts, Refusal> {
        let mut p = parts(method, target, Version::HTTP_11, headers);
        admit(&mut p, &names()).map(|()| p)
    }

    fn status(method: &str, target: &str, headers: &[(&str, &str)]) -> u16 {
        match admitted(method, target, headers) {
            Ok(_) => 200,
            Err(r) => r.status.as_u16(),
        }
    }

    const HOST: (&str, &str) = ("host", "169.254.169.254");

    #[test]
    fn targets() {
        assert_eq!(status("GET", "/latest/meta-data/", &[HOST]), 200);
        assert_eq!(status("GET", "latest", &[HOST]), 400);
        assert_eq!(status("GET", "169.254.169.254:80", &[HOST]), 400);
        assert_eq!(status("CONNECT", "evil:443", &[HOST]), 405);
        assert_eq!(status("OPTIONS", "*", &[HOST]), 400);
        assert_eq!(status("GET", "http://evil.example/x", &[HOST]), 400);
        assert_eq!(status("GET", "https://169.254.169.254/x", &[HOST]), 400);
        assert_eq!(
            status("GET", &format!("/{}", "a".repeat(MAX_TARGET)), &[HOST]),
            414
        );
        // Our own names, in absolute form: origin-form with the target's authority as Host.
        for (target, host) in [
            ("http://169.254.169.254/latest/x?y=1", "169.254.169.254"),
            (
                "http://[FD00:EC2::254]:80/latest/x?y=1",
                "[FD00:EC2::254]:80",
            ),
            (
                "http://Metadata.Google.Internal/latest/x?y=1",
                "Metadata.Google.Internal",
            ),
        ] {
            let p = admitted("GET", target, &[("host", "other")]).unwrap();
            assert_eq!(p.uri, "/latest/x?y=1", "{target}");
            assert_eq!(p.headers.get_all("host").iter().collect::<Vec<_>>(), [host]);
        }
    }

    #[test]
    fn host_rules() {
        assert_eq!(status("GET", "/", &[]), 400, "HTTP/1.1 without Host");
        let mut http10 = parts("GET", "/", Version::HTTP_10, &[]);
        assert_eq!(admit(&mut http10, &names()), Ok(()), "HTTP/1.0 may omit it");
        assert_eq!(status("GET", "/", &[HOST, HOST]), 400);
        for bad in ["", "a@b", "a b", "[::1", "h:x"] {
            assert_eq!(status("GET", "/", &[("host", bad)]), 400, "{bad:?}");
        }
        for good in ["h", "h:8080", "[::1]:80", "169.254.169.254"] {
            assert_eq!(status("GET", "/", &[("host", good)]), 200, "{good:?}");
        }
        assert_eq!(
            status("GET", "/", &[HOST, ("connection", "keep-alive, Host")]),
            400
        );
    }

    #[test]
    fn framing() {
        let te = |v| ("transfer-encoding", v);
        assert_eq!(status("PUT", "/", &[HOST, te("chunked")]), 200);
        assert_eq!(status("PUT", "/", &[HOST, te("Chunked ")]), 200);
        assert_eq!(
            status("PUT", "/", &[HOST, te("chunked"), te("chunked")]),
            400
        );
        assert_eq!(status("PUT", "/", &[HOST, te("gzip, chunked")]), 501);
        assert_eq!(status("PUT", "/", &[HOST, te("\"chunked\"")]), 501);
    }

    #[test]
    fn underscored_names_are_dropped() {
        let p = admitted(
            "GET",
            "/",
            &[
                HOST,
                ("transfer_encoding", "chunked"),
                ("content_length", "5"),
                ("x-keep", "1"),
                ("DomU_Request", "send_my_password"),
            ],
        )
        .unwrap();
        let mut left: Vec<&str> = p.headers.keys().map(|k| k.as_str()).collect();
        left.sort();
        assert_eq!(
            left,
            ["domu_request", "host", "x-keep"],
            "CloudStack's password header kept"
        );
    }
}
