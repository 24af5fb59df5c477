//! Built-in metadata services, served instead of forwarding when `--mock` is given: one
//! module per cloud, each behind [`Cloud`].
//!
//! Every cloud's wire behaviour follows its real service
//! (`../shared/reference/metadata-protocols.md`), down to the error bodies its clients read.

pub mod ec2;
pub mod gcp;
mod token;

use std::{fmt, future::Future, pin::Pin};

use bytes::Bytes;
use hyper::{Request, Response};
use serde::Deserialize;

/// Bodies are complete at construction; the proxy wraps them for hyper.
pub type Resp = Response<Bytes>;

/// The clouds the daemon can mock.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
#[derive(clap::ValueEnum)]
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
}
