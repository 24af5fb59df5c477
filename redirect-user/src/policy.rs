//! What a caller may ask for, decided on its kernel-attested identity (see `caller`).
//!
//! Rules come from the container's labels, in Traefik's style (`redirect.<key>=<value>`):
//! - `redirect.deny=true`: every request is refused as the real service refuses a forbidden
//!   one (EC2: 403);
//! - `redirect.allow=/latest/meta-data/placement/,/latest/meta-data/instance-id`: only paths
//!   under these prefixes (the IMDSv2 token path is always allowed: a token grants nothing);
//! - `redirect.ec2.role=NAME`: in mock mode, the IAM role the container's credentials are for.
//!
//! A label that does not parse denies the container (fail closed), with a log line naming the
//! container, the label and the fix.

use std::collections::BTreeMap;

use crate::mock::ec2::TOKEN_PATH;

/// The labels' prefix.
pub const LABEL_PREFIX: &str = "redirect.";

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    pub deny: bool,
    /// Path prefixes; empty: every path.
    pub allow: Vec<String>,
    /// The EC2 mock's role name for this caller.
    pub ec2_role: Option<String>,
}

impl Policy {
    /// The policy the `redirect.*` labels give, and what was wrong with them.
    pub fn from_labels(labels: &BTreeMap<String, String>) -> (Policy, Vec<String>) {
        let mut policy = Policy::default();
        let mut problems = Vec::new();
        for (key, value) in labels {
            let Some(name) = key.strip_prefix(LABEL_PREFIX) else {
                continue;
            };
            let mut bad = |expected: &str| {
                problems.push(format!("label {key}={value:?}: expected {expected}"));
            };
            match name {
                "deny" => match value.as_str() {
                    "true" => policy.deny = true,
                    "false" => {}
                    _ => bad("true or false"),
                },
                "allow" => {
                    let prefixes: Vec<String> = value
                        .split(',')
                        .map(str::trim)
                        .filter(|p| !p.is_empty())
                        .map(str::to_owned)
                        .collect();
                    if prefixes.is_empty() || prefixes.iter().any(|p| !p.starts_with('/')) {
                        bad("comma-separated paths starting with /");
                    } else {
                        policy.allow = prefixes;
                    }
                }
                "ec2.role" => {
                    if value.is_empty() || value.contains(['/', ' ']) {
                        bad("a role name without '/' or spaces");
                    } else {
                        policy.ec2_role = Some(value.clone());
                    }
                }
                _ => bad("one of redirect.deny, redirect.allow, redirect.ec2.role"),
            }
        }
        if !problems.is_empty() {
            policy.deny = true;
        }
        (policy, problems)
    }

    /// Whether a request for `path` may be answered.
    pub fn permits(&self, path: &str) -> bool {
        if self.deny {
            return false;
        }
        self.allow.is_empty()
            || path == TOKEN_PATH
            || self
                .allow
                .iter()
                .any(|prefix| path.starts_with(prefix.as_str()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn labels_deny_allow_and_name_a_role() {
        let (p, problems) = Policy::from_labels(&labels(&[
            ("com.docker.compose.service", "app"),
            (
                "redirect.allow",
                "/latest/meta-data/placement/, /latest/meta-data/instance-id",
            ),
            ("redirect.ec2.role", "app-role"),
        ]));
        assert!(problems.is_empty(), "{problems:?}");
        assert!(p.permits("/latest/meta-data/placement/region"));
        assert!(p.permits("/latest/meta-data/instance-id"));
        assert!(p.permits(TOKEN_PATH), "a token grants nothing by itself");
        assert!(!p.permits("/latest/meta-data/iam/security-credentials/"));
        assert_eq!(p.ec2_role.as_deref(), Some("app-role"));
        let (p, _) = Policy::from_labels(&labels(&[("redirect.deny", "true")]));
        assert!(!p.permits("/latest/meta-data/instance-id") && !p.permits(TOKEN_PATH));
        assert!(Policy::default().permits("/anything"));
    }

    #[test]
    fn a_label_that_does_not_parse_denies_and_is_named() {
        for (key, value) in [
            ("redirect.deny", "yes"),
            ("redirect.allow", "latest/meta-data"),
            ("redirect.ec2.role", "a/b"),
            ("redirect.dney", "true"),
        ] {
            let (p, problems) = Policy::from_labels(&labels(&[(key, value)]));
            assert!(p.deny, "{key}={value}");
            assert_eq!(problems.len(), 1, "{problems:?}");
            assert!(problems[0].contains(key), "{problems:?}");
        }
    }
}
