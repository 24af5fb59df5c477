//! The built-in Azure Instance Metadata Service (IMDS): instance metadata, managed identity
//! tokens, scheduled events and the attested document.
//!
//! Wire behaviour follows the real service (`../shared/reference/metadata-protocols.md`):
//! `Metadata: true` required, `api-version` required and validated, JSON error bodies
//! (`{"error": "Bad request. ..."}` for metadata, OAuth's `invalid_request` for identity),
//! requests carrying `X-Forwarded-For` refused, every token field a string.

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    sync::{Arc, PoisonError, RwLock},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use base64::{
    Engine as _,
    engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD},
};
use bytes::Bytes;
use hyper::{
    HeaderMap, Method, Request, Response, StatusCode,
    header::{self, HeaderName, HeaderValue},
};
use serde::{Deserialize, Deserializer, de};
use serde_json::{Value, json};

use super::{Answer, Cloud, CloudKind, Resp, query};

const METADATA: HeaderName = HeaderName::from_static("metadata");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// The `api-version`s the service accepts (`/metadata/versions` lists them), those of
/// scheduled events (2017-11-01, 2019-01-01, 2020-07-01) included.
const VERSIONS: &[&str] = &[
    "2017-03-01",
    "2017-04-02",
    "2017-08-01",
    "2017-10-01",
    "2017-11-01",
    "2017-12-01",
    "2018-02-01",
    "2018-04-02",
    "2018-10-01",
    "2019-01-01",
    "2019-02-01",
    "2019-03-11",
    "2019-04-30",
    "2019-06-01",
    "2019-06-04",
    "2019-08-01",
    "2019-08-15",
    "2019-11-01",
    "2020-06-01",
    "2020-07-01",
    "2020-07-15",
    "2020-09-01",
    "2020-10-01",
    "2020-12-01",
    "2021-01-01",
    "2021-02-01",
    "2021-03-01",
    "2021-05-01",
    "2021-08-01",
    "2021-10-01",
    "2021-11-01",
    "2021-11-15",
    "2021-12-13",
    "2022-02-01",
    "2022-03-01",
    "2022-05-01",
    "2022-07-01",
    "2022-08-01",
    "2022-09-01",
    "2022-11-01",
    "2023-07-01",
];

/// The three the real service names in a version error (`newest-versions`).
fn newest_versions() -> &'static [&'static str] {
    &VERSIONS[VERSIONS.len() - 3..]
}

/// A user-assigned managed identity of the VM.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserIdentity {
    /// The identity resource's name (the last segment of its `msi_res_id`).
    pub name: String,
    pub client_id: String,
    pub object_id: String,
}

/// The values the mock serves. Every field has a default; `[azure]` in the config overrides
/// them.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AzureValues {
    pub vm_id: String,
    /// The VM's name, and `osProfile.computerName`.
    pub name: String,
    pub location: String,
    pub zone: String,
    pub vm_size: String,
    pub subscription_id: String,
    pub resource_group: String,
    /// The directory the identities' tokens are issued by (`tid`).
    pub tenant_id: String,
    pub publisher: String,
    pub offer: String,
    pub sku: String,
    pub image_version: String,
    pub admin_username: String,
    /// OpenSSH public keys of `compute.publicKeys`, installed for `admin_username`.
    pub public_keys: Vec<String>,
    /// `compute.userData` (served base64-encoded, as the real service does); none: "".
    pub user_data: Option<String>,
    pub tags: BTreeMap<String, String>,
    pub private_ipv4: Ipv4Addr,
    pub public_ipv4: Option<Ipv4Addr>,
    /// 12 hex digits without separators, as the real service writes it.
    pub mac: String,
    pub subnet_address: Ipv4Addr,
    pub subnet_prefix: u8,
    /// Whether the VM has a system-assigned identity, with these ids.
    pub system_assigned: bool,
    pub system_client_id: String,
    pub system_object_id: String,
    pub user_assigned: Vec<UserIdentity>,
    /// How long a token stays valid; it is re-issued every half lifetime (the real service
    /// caches tokens for about a day).
    #[serde(deserialize_with = "de_lifetime")]
    pub token_lifetime: Duration,
}

impl Default for AzureValues {
    fn default() -> Self {
        AzureValues {
            vm_id: "02aab8a4-74ef-476e-8182-f6d2ba4166a6".into(),
            name: "redirect-mock-vm".into(),
            location: "eastus".into(),
            zone: "1".into(),
            vm_size: "Standard_B2s".into(),
            subscription_id: "8d10da13-8125-4ba9-a717-bf7490507b3d".into(),
            resource_group: "redirect-mock-rg".into(),
            tenant_id: "72f988bf-86f1-41af-91ab-2d7cd011db47".into(),
            publisher: "Canonical".into(),
            offer: "0001-com-ubuntu-server-jammy".into(),
            sku: "22_04-lts-gen2".into(),
            image_version: "22.04.202411040".into(),
            admin_username: "azureuser".into(),
            public_keys: vec![
                "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBdn64tja8pwcDUbaCmvStoVpTGDi5Ee8Qb40/GlwW1i redirect-mock".into(),
            ],
            user_data: None,
            tags: BTreeMap::new(),
            private_ipv4: Ipv4Addr::new(10, 0, 0, 4),
            public_ipv4: None,
            mac: "000D3A1B2C3D".into(),
            subnet_address: Ipv4Addr::new(10, 0, 0, 0),
            subnet_prefix: 24,
            system_assigned: true,
            system_client_id: "9a2ab0b7-2d9f-4f4e-a3a6-2f1a8b0e5c11".into(),
            system_object_id: "4a8e7c2d-3b1f-4d6a-9e5c-7f0b2a1d3c44".into(),
            user_assigned: vec![UserIdentity {
                name: "redirect-mock-identity".into(),
                client_id: "5b0c7d1e-8f2a-4c3b-9d4e-6a1f0b2c3d55".into(),
                object_id: "7e6d5c4b-3a2f-4e1d-8c9b-0a1f2e3d4c66".into(),
            }],
            token_lifetime: Duration::from_secs(24 * 3600),
        }
    }
}

fn de_lifetime<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    let d = crate::config::parse_duration(&s).map_err(de::Error::custom)?;
    if d < Duration::from_secs(2) {
        return Err(de::Error::custom("token_lifetime must be at least 2s"));
    }
    Ok(d)
}

/// A managed identity as a token request selects it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Identity {
    client_id: String,
    object_id: String,
    /// `msi_res_id` of a user-assigned identity; none for the system-assigned one.
    resource_id: Option<String>,
}

/// The mock, whose values a reload replaces (SIGHUP) while its start time stays: tokens are
/// dated from it.
pub struct AzureMock {
    current: RwLock<Arc<Values>>,
    started: SystemTime,
}

/// The values and what is derived from them once.
struct Values {
    values: AzureValues,
    identities: Vec<(String, Identity)>,
}

impl AzureMock {
    pub fn new(values: AzureValues) -> Self {
        AzureMock {
            current: RwLock::new(Arc::new(Values::new(values))),
            started: SystemTime::now(),
        }
    }

    /// Serves `values` from now on; false when they are the ones served already.
    pub fn reload(&self, values: AzureValues) -> bool {
        let mut current = self.current.write().unwrap_or_else(PoisonError::into_inner);
        if current.values == values {
            return false;
        }
        *current = Arc::new(Values::new(values));
        true
    }

    fn values(&self) -> Arc<Values> {
        Arc::clone(&self.current.read().unwrap_or_else(PoisonError::into_inner))
    }

    fn handle_at(&self, req: &Request<Bytes>, identity: Option<&str>, now: SystemTime) -> Resp {
        let path = req.uri().path();
        let params = query::Params::parse(req.uri().query());
        let v = self.values();
        let identity_path = path == "/metadata/identity/oauth2/token";
        let refuse = |status, description: &str| match identity_path {
            true => oauth_error(status, "invalid_request", description),
            false => error(status, &format!("Bad request. {description}")),
        };
        if req.headers().contains_key(X_FORWARDED_FOR) {
            // The service is not meant to be reached through a proxy, and says so.
            return refuse(
                StatusCode::BAD_REQUEST,
                "Requests with an X-Forwarded-For header are not allowed",
            );
        }
        if !has_metadata_header(req.headers()) {
            return refuse(
                StatusCode::BAD_REQUEST,
                "Required metadata header not specified",
            );
        }
        let known = matches!(
            path,
            "/metadata/instance" | "/metadata/versions" | "/metadata/scheduledevents"
        ) || identity_path
            || path.starts_with("/metadata/instance/")
            || path.starts_with("/metadata/attested/");
        if !known {
            return error(StatusCode::NOT_FOUND, "Not found");
        }
        let method_ok = match path {
            "/metadata/scheduledevents" => matches!(*req.method(), Method::GET | Method::POST),
            _ => *req.method() == Method::GET,
        };
        if !method_ok {
            let mut resp = error(StatusCode::METHOD_NOT_ALLOWED, "Method not allowed");
            let allow = if path == "/metadata/scheduledevents" {
                "GET, POST"
            } else {
                "GET"
            };
            resp.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static(allow));
            return resp;
        }
        if path == "/metadata/versions" {
            return json_resp(StatusCode::OK, &json!({ "apiVersions": VERSIONS }));
        }
        match params.get("api-version") {
            None => return version_error("api-version was not specified in the request"),
            Some(version) if !VERSIONS.contains(&version.as_ref()) => {
                return version_error("api-version is invalid or was not specified in the request");
            }
            Some(_) => {}
        }
        if identity_path {
            return self.token(&v, &params, identity, now);
        }
        if path == "/metadata/scheduledevents" {
            // No event is pending: acknowledging one (a POST of `StartRequests`) is a no-op.
            return match *req.method() {
                Method::POST => Response::new(Bytes::new()),
                _ => json_resp(
                    StatusCode::OK,
                    &json!({ "DocumentIncarnation": 0, "Events": [] }),
                ),
            };
        }
        if path == "/metadata/attested/document" {
            return self.attested(&v, &params, now);
        }
        let rest = path.strip_prefix("/metadata/instance").unwrap_or_default();
        v.instance(&params, rest)
    }

    fn token(
        &self,
        v: &Values,
        params: &query::Params,
        identity: Option<&str>,
        now: SystemTime,
    ) -> Resp {
        let Some(resource) = params.get("resource").filter(|r| !r.is_empty()) else {
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "Required audience parameter not specified",
            );
        };
        let selectors = [
            ("client_id", params.get("client_id")),
            ("object_id", params.get("object_id")),
            ("msi_res_id", params.get("msi_res_id")),
        ];
        let chosen: Vec<_> = selectors
            .iter()
            .filter_map(|(k, v)| v.as_ref().map(|v| (*k, v.as_ref())))
            .collect();
        // What this caller has: every identity of the VM, or the one its policy names.
        let has: Vec<&Identity> = match identity {
            Some(name) => v.named(name).into_iter().collect(),
            None => v.identities.iter().map(|(_, id)| id).collect(),
        };
        let found = match chosen.as_slice() {
            [] => match (identity, v.values.system_assigned, has.as_slice()) {
                (Some(_), _, [one]) => Some(*one),
                (None, true, _) => v.system(),
                (None, false, [one]) => Some(*one),
                (None, false, [_, _, ..]) => {
                    return oauth_error(
                        StatusCode::BAD_REQUEST,
                        "invalid_request",
                        "Multiple user assigned identities exist, please specify the clientId / resourceId of the identity in the token request",
                    );
                }
                _ => None,
            },
            [(key, wanted)] => has.into_iter().find(|id| match *key {
                "client_id" => id.client_id.eq_ignore_ascii_case(wanted),
                "object_id" => id.object_id.eq_ignore_ascii_case(wanted),
                _ => id
                    .resource_id
                    .as_deref()
                    .is_some_and(|r| r.eq_ignore_ascii_case(wanted)),
            }),
            _ => {
                return oauth_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    "Only one of client_id, object_id or msi_res_id may be specified",
                );
            }
        };
        let Some(found) = found else {
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "Identity not found",
            );
        };
        let (issued, expires) = self.window(v, now);
        let expires_in = expires
            .duration_since(now)
            .unwrap_or_default()
            .as_secs()
            .to_string();
        let access_token = v.access_token(found, &resource, issued, expires);
        // Every field a string, as the real service sends them.
        json_resp(
            StatusCode::OK,
            &json!({
                "access_token": access_token,
                "client_id": found.client_id,
                "expires_in": expires_in,
                "expires_on": unix(expires).to_string(),
                "ext_expires_in": expires_in,
                "not_before": unix(issued).to_string(),
                "resource": resource,
                "token_type": "Bearer",
            }),
        )
    }

    /// Tokens are re-issued every half lifetime, so one served is always valid for at least
    /// half a lifetime more.
    fn window(&self, v: &Values, now: SystemTime) -> (SystemTime, SystemTime) {
        let lifetime = v.values.token_lifetime;
        let period = (lifetime / 2).as_secs().max(1);
        let elapsed = now
            .duration_since(self.started)
            .unwrap_or_default()
            .as_secs();
        let issued = self.started + Duration::from_secs(elapsed - elapsed % period);
        (issued, issued + lifetime)
    }

    /// The attested document: the real one is PKCS#7 signed by a Microsoft certificate,
    /// which no mock has; the payload is served base64-encoded under the same field names,
    /// so a client that reads it works and one that verifies it fails, as it should.
    fn attested(&self, v: &Values, params: &query::Params, now: SystemTime) -> Resp {
        let values = &v.values;
        let created = humantime::format_rfc3339_seconds(now).to_string();
        let expires = humantime::format_rfc3339_seconds(now + Duration::from_secs(6 * 3600));
        let payload = json!({
            "licenseType": "",
            "nonce": params.get("nonce").unwrap_or_default(),
            "plan": { "name": "", "product": "", "publisher": "" },
            "sku": values.sku,
            "subscriptionId": values.subscription_id,
            "timeStamp": { "createdOn": created, "expiresOn": expires.to_string() },
            "vmId": values.vm_id,
        });
        json_resp(
            StatusCode::OK,
            &json!({ "encoding": "pkcs7", "signature": STANDARD.encode(payload.to_string()) }),
        )
    }
}

impl Values {
    fn new(values: AzureValues) -> Self {
        let mut identities = Vec::new();
        if values.system_assigned {
            identities.push((
                String::new(),
                Identity {
                    client_id: values.system_client_id.clone(),
                    object_id: values.system_object_id.clone(),
                    resource_id: None,
                },
            ));
        }
        for user in &values.user_assigned {
            let resource_id = format!(
                "/subscriptions/{}/resourcegroups/{}/providers/Microsoft.ManagedIdentity/userAssignedIdentities/{}",
                values.subscription_id, values.resource_group, user.name
            );
            identities.push((
                user.name.clone(),
                Identity {
                    client_id: user.client_id.clone(),
                    object_id: user.object_id.clone(),
                    resource_id: Some(resource_id),
                },
            ));
        }
        Values { values, identities }
    }

    fn system(&self) -> Option<&Identity> {
        self.identities
            .iter()
            .find(|(_, id)| id.resource_id.is_none())
            .map(|(_, id)| id)
    }

    /// The identity a policy names: `system`, or a user-assigned one by name or client id.
    fn named(&self, name: &str) -> Option<&Identity> {
        if name == "system" {
            return self.system();
        }
        self.identities
            .iter()
            .find(|(n, id)| {
                id.resource_id.is_some() && (n == name || id.client_id.eq_ignore_ascii_case(name))
            })
            .map(|(_, id)| id)
    }

    /// A token shaped as Entra ID's (a JWT with the claims apps read). Nothing can verify
    /// its signature, as nothing could verify a real one without Microsoft's keys online.
    fn access_token(
        &self,
        id: &Identity,
        resource: &str,
        issued: SystemTime,
        expires: SystemTime,
    ) -> String {
        let v = &self.values;
        let header = json!({ "typ": "JWT", "alg": "RS256", "kid": "redirect-mock" });
        let mut claims = json!({
            "aud": resource,
            "iss": format!("https://sts.windows.net/{}/", v.tenant_id),
            "iat": unix(issued),
            "nbf": unix(issued),
            "exp": unix(expires),
            "appid": id.client_id,
            "oid": id.object_id,
            "sub": id.object_id,
            "tid": v.tenant_id,
            "idtyp": "app",
        });
        let xms_mirid = id.resource_id.clone().unwrap_or_else(|| {
            format!(
                "/subscriptions/{}/resourcegroups/{}/providers/Microsoft.Compute/virtualMachines/{}",
                v.subscription_id, v.resource_group, v.name
            )
        });
        claims["xms_mirid"] = Value::String(xms_mirid);
        let part = |value: &Value| URL_SAFE_NO_PAD.encode(value.to_string());
        format!(
            "{}.{}.{}",
            part(&header),
            part(&claims),
            URL_SAFE_NO_PAD.encode(b"redirect-mock-signature")
        )
    }

    /// `/metadata/instance[/path]`: the whole document, or the node at `path`
    /// (`/compute/vmId`), as JSON or with `format=text` as text.
    fn instance(&self, params: &query::Params, path: &str) -> Resp {
        let doc = self.document(params.flag("extended"));
        let mut node = &doc;
        for segment in path.split('/').filter(|s| !s.is_empty()) {
            let next = match node {
                Value::Object(map) => map.get(segment),
                Value::Array(items) => segment.parse::<usize>().ok().and_then(|i| items.get(i)),
                _ => None,
            };
            match next {
                Some(next) => node = next,
                None => return error(StatusCode::NOT_FOUND, "Not found"),
            }
        }
        match params.get("format").as_deref() {
            None | Some("json") => json_resp(StatusCode::OK, node),
            Some("text") => match node {
                Value::String(s) => text(s.clone()),
                Value::Object(_) | Value::Array(_) => error(
                    StatusCode::BAD_REQUEST,
                    "Bad request. Query parameter format=text is only supported for leaf nodes",
                ),
                other => text(other.to_string()),
            },
            Some(_) => error(
                StatusCode::BAD_REQUEST,
                "Bad request. Query parameter format is invalid; it must be json or text",
            ),
        }
    }

    fn document(&self, extended: bool) -> Value {
        let v = &self.values;
        let resource_id = format!(
            "/subscriptions/{}/resourceGroups/{}/providers/Microsoft.Compute/virtualMachines/{}",
            v.subscription_id, v.resource_group, v.name
        );
        let tags: Vec<String> = v.tags.iter().map(|(k, v)| format!("{k}:{v}")).collect();
        let tags_list: Vec<Value> = v
            .tags
            .iter()
            .map(|(k, v)| json!({ "name": k, "value": v }))
            .collect();
        let public_keys: Vec<Value> = v
            .public_keys
            .iter()
            .map(|key| {
                json!({
                    "keyData": key,
                    "path": format!("/home/{}/.ssh/authorized_keys", v.admin_username),
                })
            })
            .collect();
        let public_ip = v.public_ipv4.map(|ip| ip.to_string()).unwrap_or_default();
        let mut doc = json!({
            "compute": {
                "azEnvironment": "AzurePublicCloud",
                "customData": "",
                "evictionPolicy": "",
                "isHostCompatibilityLayerVm": "false",
                "licenseType": "",
                "location": v.location,
                "name": v.name,
                "offer": v.offer,
                "osProfile": {
                    "adminUsername": v.admin_username,
                    "computerName": v.name,
                    "disablePasswordAuthentication": "true",
                },
                "osType": "Linux",
                "placementGroupId": "",
                "plan": { "name": "", "product": "", "publisher": "" },
                "platformFaultDomain": "0",
                "platformUpdateDomain": "0",
                "priority": "",
                "provider": "Microsoft.Compute",
                "publicKeys": public_keys,
                "publisher": v.publisher,
                "resourceGroupName": v.resource_group,
                "resourceId": resource_id,
                "securityProfile": { "secureBootEnabled": "false", "virtualTpmEnabled": "false" },
                "sku": v.sku,
                "subscriptionId": v.subscription_id,
                "tags": tags.join(";"),
                "tagsList": tags_list,
                "userData": v.user_data.as_deref().map(|d| STANDARD.encode(d)).unwrap_or_default(),
                "version": v.image_version,
                "vmId": v.vm_id,
                "vmScaleSetName": "",
                "vmSize": v.vm_size,
                "zone": v.zone,
            },
            "network": {
                "interface": [{
                    "ipv4": {
                        "ipAddress": [{
                            "privateIpAddress": v.private_ipv4.to_string(),
                            "publicIpAddress": public_ip,
                        }],
                        "subnet": [{
                            "address": v.subnet_address.to_string(),
                            "prefix": v.subnet_prefix.to_string(),
                        }],
                    },
                    "ipv6": { "ipAddress": [] },
                    "macAddress": v.mac,
                }],
            },
        });
        if extended {
            doc["extended"] = json!({ "compute": { "hasCustomData": false, "ppsType": "None" } });
        }
        doc
    }
}

impl Cloud for AzureMock {
    fn kind(&self) -> CloudKind {
        CloudKind::Azure
    }

    fn handle(&self, req: &Request<Bytes>, identity: Option<&str>) -> Answer {
        Answer::Now(self.handle_at(req, identity, SystemTime::now()))
    }

    fn forbidden(&self) -> Resp {
        error(StatusCode::FORBIDDEN, "Forbidden")
    }

    fn max_request_body(&self) -> usize {
        // A scheduled event's acknowledgement: `{"StartRequests": [{"EventId": ...}]}`.
        16 << 10
    }
}

/// `Metadata: true`, its value compared as the service compares it (case-insensitively).
fn has_metadata_header(headers: &HeaderMap) -> bool {
    headers
        .get(METADATA)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"true"))
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs()
}

fn json_resp(status: StatusCode, value: &Value) -> Resp {
    let mut resp = Response::new(Bytes::from(value.to_string()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    resp
}

fn text(body: String) -> Resp {
    let mut resp = Response::new(Bytes::from(body));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// The metadata endpoints' error: `{"error": "..."}`.
fn error(status: StatusCode, message: &str) -> Resp {
    json_resp(status, &json!({ "error": message }))
}

fn version_error(problem: &str) -> Resp {
    json_resp(
        StatusCode::BAD_REQUEST,
        &json!({
            "error": format!("Bad request. {problem}. For more information refer to aka.ms/azureimds"),
            "newest-versions": newest_versions(),
        }),
    )
}

/// The identity endpoint's error, in OAuth 2.0's shape.
fn oauth_error(status: StatusCode, error: &str, description: &str) -> Resp {
    json_resp(
        status,
        &json!({ "error": error, "error_description": description }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https://management.azure.com";

    fn req(method: Method, target: &str, headers: &[(&str, &str)]) -> Request<Bytes> {
        let mut b = Request::builder().method(method).uri(target);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(Bytes::new()).unwrap()
    }

    fn ask(m: &AzureMock, target: &str, identity: Option<&str>) -> (StatusCode, Value) {
        let resp = m.handle_at(
            &req(Method::GET, target, &[("Metadata", "true")]),
            identity,
            SystemTime::now(),
        );
        let status = resp.status();
        let body = resp.into_body();
        let value = serde_json::from_slice(&body)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned()));
        (status, value)
    }

    fn mock() -> AzureMock {
        AzureMock::new(AzureValues::default())
    }

    #[test]
    fn instance_document_as_cloud_init_reads_it() {
        let m = mock();
        let (status, doc) = ask(
            &m,
            "/metadata/instance?api-version=2021-08-01&extended=true",
            None,
        );
        assert_eq!(status, StatusCode::OK);
        assert_eq!(doc["compute"]["osProfile"]["adminUsername"], "azureuser");
        assert_eq!(
            doc["compute"]["osProfile"]["disablePasswordAuthentication"],
            "true"
        );
        assert!(
            doc["compute"]["publicKeys"][0]["keyData"]
                .as_str()
                .unwrap()
                .starts_with("ssh-ed25519 ")
        );
        assert_eq!(doc["extended"]["compute"]["ppsType"], "None");
        let nic = &doc["network"]["interface"][0];
        assert_eq!(nic["macAddress"], "000D3A1B2C3D");
        assert_eq!(nic["ipv4"]["ipAddress"][0]["privateIpAddress"], "10.0.0.4");
        assert_eq!(nic["ipv4"]["subnet"][0]["prefix"], "24");
        assert!(doc.get("extended").is_some());
        let (_, plain) = ask(&m, "/metadata/instance?api-version=2021-08-01", None);
        assert!(plain.get("extended").is_none());
    }

    #[test]
    fn leaves_and_text_format() {
        let m = mock();
        let (status, vm_id) = ask(
            &m,
            "/metadata/instance/compute/vmId?api-version=2021-02-01&format=text",
            None,
        );
        assert_eq!(
            (status, vm_id),
            (
                StatusCode::OK,
                "02aab8a4-74ef-476e-8182-f6d2ba4166a6".into()
            )
        );
        let (_, ip) = ask(
            &m,
            "/metadata/instance/network/interface/0/ipv4/ipAddress/0/privateIpAddress?api-version=2021-02-01&format=text",
            None,
        );
        assert_eq!(ip, "10.0.0.4");
        let (status, _) = ask(
            &m,
            "/metadata/instance/compute?api-version=2021-02-01&format=text",
            None,
        );
        assert_eq!(status, StatusCode::BAD_REQUEST);
        let (status, body) = ask(
            &m,
            "/metadata/instance/compute/nope?api-version=2021-02-01",
            None,
        );
        assert_eq!(
            (status, body["error"].clone()),
            (StatusCode::NOT_FOUND, "Not found".into())
        );
    }

    #[test]
    fn user_data_is_base64() {
        let m = AzureMock::new(AzureValues {
            user_data: Some("#cloud-config\n".into()),
            ..Default::default()
        });
        let (_, doc) = ask(&m, "/metadata/instance?api-version=2021-08-01", None);
        let data = STANDARD
            .decode(doc["compute"]["userData"].as_str().unwrap())
            .unwrap();
        assert_eq!(data, b"#cloud-config\n");
    }

    #[test]
    fn header_version_and_forwarding_rules() {
        let m = mock();
        let now = SystemTime::now();
        let bare = m.handle_at(
            &req(
                Method::GET,
                "/metadata/instance?api-version=2021-08-01",
                &[],
            ),
            None,
            now,
        );
        assert_eq!(bare.status(), StatusCode::BAD_REQUEST);
        assert_eq!(
            bare.body().as_ref(),
            br#"{"error":"Bad request. Required metadata header not specified"}"#
        );
        let token = m.handle_at(&req(Method::GET, TOKEN, &[]), None, now);
        assert_eq!(token.status(), StatusCode::BAD_REQUEST);
        let body: Value = serde_json::from_slice(token.body()).unwrap();
        assert_eq!(body["error"], "invalid_request");
        assert_eq!(
            body["error_description"],
            "Required metadata header not specified"
        );
        let (status, body) = ask(&m, "/metadata/instance", None);
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(
            body["error"]
                .as_str()
                .unwrap()
                .contains("api-version was not specified")
        );
        assert_eq!(body["newest-versions"][0], "2022-09-01");
        let (status, body) = ask(&m, "/metadata/instance?api-version=2099-01-01", None);
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(body["error"].as_str().unwrap().contains("invalid"));
        let xff = m.handle_at(
            &req(
                Method::GET,
                TOKEN,
                &[("Metadata", "true"), ("X-Forwarded-For", "10.1.1.1")],
            ),
            None,
            now,
        );
        assert_eq!(xff.status(), StatusCode::BAD_REQUEST);
        let post = m.handle_at(
            &req(
                Method::POST,
                "/metadata/instance?api-version=2021-08-01",
                &[("Metadata", "true")],
            ),
            None,
            now,
        );
        assert_eq!(post.status(), StatusCode::METHOD_NOT_ALLOWED);
        let (status, versions) = ask(&m, "/metadata/versions", None);
        assert_eq!(status, StatusCode::OK);
        assert!(
            versions["apiVersions"]
                .as_array()
                .unwrap()
                .contains(&"2018-02-01".into())
        );
        assert_eq!(ask(&m, "/metadata/nope", None).0, StatusCode::NOT_FOUND);
        assert_eq!(ask(&m, "/", None).0, StatusCode::NOT_FOUND);
    }

    #[test]
    fn tokens_for_each_identity() {
        let m = mock();
        let (status, token) = ask(&m, TOKEN, None);
        assert_eq!(status, StatusCode::OK);
        assert_eq!(token["client_id"], "9a2ab0b7-2d9f-4f4e-a3a6-2f1a8b0e5c11");
        assert_eq!(token["resource"], "https://management.azure.com");
        assert_eq!(token["token_type"], "Bearer");
        let expires_in: u64 = token["expires_in"].as_str().unwrap().parse().unwrap();
        assert!(expires_in > 12 * 3600, "{expires_in}");
        for field in ["expires_on", "not_before", "ext_expires_in"] {
            assert!(token[field].is_string(), "{field} must be a string");
        }
        let claims = token["access_token"]
            .as_str()
            .unwrap()
            .split('.')
            .nth(1)
            .unwrap();
        let claims: Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(claims).unwrap()).unwrap();
        assert_eq!(claims["aud"], "https://management.azure.com");
        let user = "5b0c7d1e-8f2a-4c3b-9d4e-6a1f0b2c3d55";
        for selector in [
            format!("client_id={user}"),
            "object_id=7e6d5c4b-3a2f-4e1d-8c9b-0a1f2e3d4c66".into(),
            "msi_res_id=/subscriptions/8d10da13-8125-4ba9-a717-bf7490507b3d/resourcegroups/redirect-mock-rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/redirect-mock-identity".into(),
        ] {
            let (status, token) = ask(&m, &format!("{TOKEN}&{selector}"), None);
            assert_eq!((status, token["client_id"].clone()), (StatusCode::OK, user.into()), "{selector}");
        }
        let (status, body) = ask(
            &m,
            &format!("{TOKEN}&client_id=00000000-0000-0000-0000-000000000000"),
            None,
        );
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(body["error_description"], "Identity not found");
        let (status, body) = ask(
            &m,
            "/metadata/identity/oauth2/token?api-version=2018-02-01",
            None,
        );
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(body["error"], "invalid_request");
    }

    /// A caller whose policy names an identity has that one and no other.
    #[test]
    fn a_caller_sees_only_its_identity() {
        let m = mock();
        let user = "5b0c7d1e-8f2a-4c3b-9d4e-6a1f0b2c3d55";
        let (status, token) = ask(&m, TOKEN, Some("redirect-mock-identity"));
        assert_eq!(
            (status, token["client_id"].clone()),
            (StatusCode::OK, user.into())
        );
        let system = format!("{TOKEN}&client_id=9a2ab0b7-2d9f-4f4e-a3a6-2f1a8b0e5c11");
        assert_eq!(ask(&m, &system, Some(user)).0, StatusCode::BAD_REQUEST);
        assert_eq!(ask(&m, TOKEN, Some("nobody")).0, StatusCode::BAD_REQUEST);
        assert_eq!(ask(&m, TOKEN, Some("system")).0, StatusCode::OK);
    }

    #[test]
    fn without_a_system_identity() {
        let only_user = AzureMock::new(AzureValues {
            system_assigned: false,
            ..Default::default()
        });
        assert_eq!(ask(&only_user, TOKEN, None).0, StatusCode::OK);
        let two = AzureMock::new(AzureValues {
            system_assigned: false,
            user_assigned: vec![
                UserIdentity {
                    name: "a".into(),
                    client_id: "1".into(),
                    object_id: "2".into(),
                },
                UserIdentity {
                    name: "b".into(),
                    client_id: "3".into(),
                    object_id: "4".into(),
                },
            ],
            ..Default::default()
        });
        let (status, body) = ask(&two, TOKEN, None);
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(
            body["error_description"]
                .as_str()
                .unwrap()
                .contains("Multiple")
        );
        let none = AzureMock::new(AzureValues {
            system_assigned: false,
            user_assigned: Vec::new(),
            ..Default::default()
        });
        assert_eq!(
            ask(&none, TOKEN, None).1["error_description"],
            "Identity not found"
        );
    }

    #[test]
    fn tokens_stay_valid_over_time() {
        let m = AzureMock::new(AzureValues {
            token_lifetime: Duration::from_secs(600),
            ..Default::default()
        });
        let v = m.values();
        for elapsed in [0, 299, 300, 301, 599, 600, 7_777] {
            let now = m.started + Duration::from_secs(elapsed);
            let (issued, expires) = m.window(&v, now);
            assert!(
                issued <= now && expires >= now + Duration::from_secs(300),
                "+{elapsed}s"
            );
        }
    }

    #[test]
    fn scheduled_events_and_attestation() {
        let m = mock();
        let (status, events) = ask(&m, "/metadata/scheduledevents?api-version=2020-07-01", None);
        assert_eq!(status, StatusCode::OK);
        assert_eq!(events["Events"], json!([]));
        let (status, doc) = ask(
            &m,
            "/metadata/attested/document?api-version=2020-09-01&nonce=1234",
            None,
        );
        assert_eq!(status, StatusCode::OK);
        assert_eq!(doc["encoding"], "pkcs7");
        let payload: Value =
            serde_json::from_slice(&STANDARD.decode(doc["signature"].as_str().unwrap()).unwrap())
                .unwrap();
        assert_eq!(payload["nonce"], "1234");
        assert_eq!(payload["vmId"], "02aab8a4-74ef-476e-8182-f6d2ba4166a6");
    }

    #[test]
    fn a_reload_serves_new_values() {
        let m = mock();
        assert!(!m.reload(AzureValues::default()));
        assert!(m.reload(AzureValues {
            name: "renamed".into(),
            ..Default::default()
        }));
        let (_, name) = ask(
            &m,
            "/metadata/instance/compute/name?api-version=2021-02-01&format=text",
            None,
        );
        assert_eq!(name, "renamed");
    }
}
