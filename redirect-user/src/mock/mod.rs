//! Built-in metadata services, served instead of forwarding when `--mock` is given: one
//! module per cloud, each behind [`Cloud`].
//!
//! Every cloud's wire behaviour follows its real service
//! (`../shared/reference/metadata-protocols.md`), down to the error bodies its clients read.

pub mod azure;
pub mod cloudstack;
pub mod ec2;
pub mod gcp;
pub mod openstack;
mod query;
pub mod token;

use std::{fmt, future::Future, pin::Pin};

use bytes::Bytes;
use hyper::{Request, Response};
use serde::Deserialize;

/// Bodies are complete at construction; the proxy wraps them for hyper.
pub type Resp = Response<Bytes>;

/// The clouds the daemon can mock.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum CloudKind {
    #[default]
    Ec2,
    Azure,
    Gcp,
    #[value(name = "openstack")]
    OpenStack,
    #[value(name = "cloudstack")]
    CloudStack,
}

impl CloudKind {
    pub const ALL: [CloudKind; 5] = [
        CloudKind::Ec2,
        CloudKind::Azure,
        CloudKind::Gcp,
        CloudKind::OpenStack,
        CloudKind::CloudStack,
    ];

    pub fn name(self) -> &'static str {
        match self {
            CloudKind::Ec2 => "ec2",
            CloudKind::Azure => "azure",
            CloudKind::Gcp => "gcp",
            CloudKind::OpenStack => "openstack",
            CloudKind::CloudStack => "cloudstack",
        }
    }

    /// The name or `None`, for labels and config values.
    pub fn parse(s: &str) -> Option<CloudKind> {
        CloudKind::ALL.into_iter().find(|k| k.name() == s)
    }
}

impl fmt::Display for CloudKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An answer now, or later: a GCE long poll (`wait_for_change`) waits for a value to change.
pub enum Answer {
    Now(Resp),
    Later(Pin<Box<dyn Future<Output = Resp> + Send>>),
}

impl Answer {
    pub async fn resolve(self) -> Resp {
        match self {
            Answer::Now(resp) => resp,
            Answer::Later(wait) => wait.await,
        }
    }
}

impl From<Resp> for Answer {
    fn from(resp: Resp) -> Self {
        Answer::Now(resp)
    }
}

/// One cloud's metadata service.
pub trait Cloud: Send + Sync {
    fn kind(&self) -> CloudKind;

    /// Answers one request. `identity` is what the caller's policy names it (`redirect.identity`):
    /// EC2's instance-profile role, Azure's managed identity, GCP's default service account;
    /// `None`: the configured default. The body has been read whole (none of the mocks takes
    /// one).
    fn handle(&self, req: &Request<Bytes>, identity: Option<&str>) -> Answer;

    /// What this cloud answers a request that the caller's policy refuses, as the real
    /// service refuses a forbidden one.
    fn forbidden(&self) -> Resp;

    /// The largest request body taken; beyond it, 413. Most endpoints take none.
    fn max_request_body(&self) -> usize {
        0
    }
}

/// The values of every cloud's mock (`[ec2]`, `[azure]`, ... in the config).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MockValues {
    pub ec2: ec2::Ec2Values,
    pub azure: azure::AzureValues,
    pub gcp: gcp::GcpValues,
    pub openstack: openstack::OpenStackValues,
    pub cloudstack: cloudstack::CloudStackValues,
}

/// Every cloud's mock, each caller served by one: the cloud its policy names
/// (`redirect.cloud`), else the default (`--mock KIND`). A laptop running an AWS app and an
/// Azure app needs one daemon, and each container sees exactly one cloud.
pub struct Mocks {
    default: CloudKind,
    ec2: ec2::Ec2Mock,
    azure: azure::AzureMock,
    gcp: gcp::GcpMock,
    openstack: openstack::OpenStackMock,
    cloudstack: cloudstack::CloudStackMock,
}

impl Mocks {
    pub fn new(default: CloudKind, values: &MockValues) -> Self {
        Self::with_key(default, values, &token::TokenKey::random())
    }

    /// With IMDSv2 tokens signed by `key` (kept over restarts, see [`token::TokenKey`]).
    pub fn with_key(default: CloudKind, values: &MockValues, key: &token::TokenKey) -> Self {
        Mocks {
            default,
            ec2: ec2::Ec2Mock::with_key(values.ec2.clone(), key),
            azure: azure::AzureMock::new(values.azure.clone()),
            gcp: gcp::GcpMock::new(values.gcp.clone()),
            openstack: openstack::OpenStackMock::new(values.openstack.clone()),
            cloudstack: cloudstack::CloudStackMock::new(values.cloudstack.clone()),
        }
    }

    pub fn default_kind(&self) -> CloudKind {
        self.default
    }

    /// The mock of `kind`, or the default one.
    pub fn cloud(&self, kind: Option<CloudKind>) -> &dyn Cloud {
        match kind.unwrap_or(self.default) {
            CloudKind::Ec2 => &self.ec2,
            CloudKind::Azure => &self.azure,
            CloudKind::Gcp => &self.gcp,
            CloudKind::OpenStack => &self.openstack,
            CloudKind::CloudStack => &self.cloudstack,
        }
    }

    /// The EC2 mock itself, for what only it has.
    pub fn ec2(&self) -> &ec2::Ec2Mock {
        &self.ec2
    }

    /// Serves `values` from now on (SIGHUP); the clouds whose values changed.
    pub fn reload(&self, values: &MockValues) -> Vec<CloudKind> {
        let mut changed = Vec::new();
        if self.ec2.reload(values.ec2.clone()) {
            changed.push(CloudKind::Ec2);
        }
        if self.azure.reload(values.azure.clone()) {
            changed.push(CloudKind::Azure);
        }
        if self.gcp.reload(values.gcp.clone()) {
            changed.push(CloudKind::Gcp);
        }
        if self.openstack.reload(values.openstack.clone()) {
            changed.push(CloudKind::OpenStack);
        }
        if self.cloudstack.reload(values.cloudstack.clone()) {
            changed.push(CloudKind::CloudStack);
        }
        changed
    }
}
