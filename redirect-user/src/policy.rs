//! What a caller may ask for, decided on its kernel-attested identity (see `caller`).
//!
//! Rules come from the container's labels, in Traefik's style (`redirect.<key>=<value>`):
//! - `redirect.deny=true`: every request is refused as the real service refuses a forbidden
//!   one (EC2: 403);
//! - `redirect.allow=/latest/meta-data/placement/,/latest/meta-data/instance-id`: only paths
//!   under these prefixes (the IMDSv2 token path is always allowed: a token grants nothing);
//! - `redirect.cloud=azure`: in mock mode, the cloud the container sees (default: `--mock`'s);
//! - `redirect.identity=NAME`: in mock mode, the container's identity in its cloud: EC2's
//!   instance-profile role (also `redirect.ec2.role`), Azure's managed identity (a
//!   user-assigned one's name or client id, or `system`), GCP's default service account.
//!
//! A label that does not parse denies the container (fail closed), with a log line naming the
//! container, the label and the fix.
//!
//! Rules also come from the config file (`[[policy]]`, the operator's), matched on the
//! container's names or image or on the caller's cgroup; the first rule that matches wins
//! over the labels. `container_labels = false` ignores labels (on a host shared with people
//! who start containers but must not choose their own role).

use std::{
    collections::BTreeMap,
    sync::{Arc, PoisonError, RwLock},
};

use serde::Deserialize;

use crate::{
    docker::Container,
    mock::{
        CloudKind,
        ec2::{TOKEN_PATH, is_role_name},
    },
};

/// The labels' prefix.
pub const LABEL_PREFIX: &str = "redirect.";

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    pub deny: bool,
    /// Path prefixes; empty: every path.
    pub allow: Vec<String>,
    /// The mock's cloud for this caller; none: the default.
    pub cloud: Option<CloudKind>,
    /// The caller's identity in its mocked cloud (see the module's doc); none: the
    /// configured default.
    pub identity: Option<String>,
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
                "identity" | "ec2.role" => {
                    if !is_role_name(value) {
                        bad("a name without '/' or spaces");
                    } else {
                        policy.identity = Some(value.clone());
                    }
                }
                "cloud" => match CloudKind::parse(value) {
                    Some(cloud) => policy.cloud = Some(cloud),
                    None => bad("one of ec2, azure, gcp, openstack, cloudstack"),
                },
                _ => bad(
                    "one of redirect.deny, redirect.allow, redirect.cloud, redirect.identity, redirect.ec2.role",
                ),
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

/// The operator's rules, and whether labels count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rules {
    pub rules: Vec<Rule>,
    pub labels: bool,
}

impl Default for Rules {
    fn default() -> Self {
        Rules {
            rules: Vec::new(),
            labels: true,
        }
    }
}

impl Rules {
    /// The policy for a caller in another namespace: the first matching rule, else its
    /// container's labels (when they count), else none. The labels' problems are returned to
    /// be logged.
    pub fn for_caller(&self, container: Option<&Container>, cgroup: &str) -> (Policy, Vec<String>) {
        if let Some(rule) = self.rules.iter().find(|r| r.matches(container, cgroup)) {
            return (rule.policy.clone(), Vec::new());
        }
        match container {
            Some(c) if self.labels => Policy::from_labels(&c.labels),
            _ => (Policy::default(), Vec::new()),
        }
    }
}

/// The rules in force: read when a caller is found or described, replaced on SIGHUP (the
/// callers then apply the new ones, see `Caller::reapply`).
#[derive(Debug, Default)]
pub struct SharedRules(RwLock<Arc<Rules>>);

impl SharedRules {
    pub fn new(rules: Rules) -> Self {
        SharedRules(RwLock::new(Arc::new(rules)))
    }

    pub fn current(&self) -> Arc<Rules> {
        Arc::clone(&self.0.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Puts `rules` in force; whether they differ from those before.
    pub fn replace(&self, rules: Rules) -> bool {
        let mut current = self.0.write().unwrap_or_else(PoisonError::into_inner);
        if **current == rules {
            return false;
        }
        *current = Arc::new(rules);
        true
    }
}

/// One `[[policy]]` table: which callers, and what they get.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "RawRule")]
pub struct Rule {
    /// A container's name, its compose `project/service`, or a prefix of its id.
    pub container: Option<String>,
    /// The container's image, exactly or up to a `*` at the end (`myorg/*`).
    pub image: Option<String>,
    /// The caller's cgroup or an ancestor, as `/proc/<pid>/cgroup` prints it.
    pub cgroup: Option<String>,
    pub policy: Policy,
}

impl Rule {
    fn matches(&self, container: Option<&Container>, cgroup: &str) -> bool {
        let container_ok = self.container.as_deref().is_none_or(|want| {
            container.is_some_and(|c| {
                let compose = match (
                    c.label("com.docker.compose.project"),
                    c.label("com.docker.compose.service"),
                ) {
                    (Some(p), Some(s)) => format!("{p}/{s}"),
                    _ => String::new(),
                };
                c.name == want || compose == want || (want.len() >= 12 && c.id.starts_with(want))
            })
        });
        let image_ok = self.image.as_deref().is_none_or(|want| {
            container.is_some_and(|c| match want.strip_suffix('*') {
                Some(prefix) => c.image.starts_with(prefix),
                None => c.image == want,
            })
        });
        let cgroup_ok = self.cgroup.as_deref().is_none_or(|want| {
            let want = want.trim_end_matches('/');
            cgroup == want || cgroup.starts_with(&format!("{want}/"))
        });
        container_ok && image_ok && cgroup_ok
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    container: Option<String>,
    image: Option<String>,
    cgroup: Option<String>,
    #[serde(default)]
    deny: bool,
    #[serde(default)]
    allow: Vec<String>,
    cloud: Option<CloudKind>,
    identity: Option<String>,
    /// EC2's name for `identity`.
    ec2_role: Option<String>,
}

impl TryFrom<RawRule> for Rule {
    type Error = String;

    fn try_from(raw: RawRule) -> Result<Self, String> {
        if raw.container.is_none() && raw.image.is_none() && raw.cgroup.is_none() {
            return Err(
                "a [[policy]] rule needs `container`, `image` or `cgroup` to say whom it is for"
                    .into(),
            );
        }
        if let Some(bad) = raw.allow.iter().find(|p| !p.starts_with('/')) {
            return Err(format!(
                "allow: {bad:?} is not a path (it must start with /)"
            ));
        }
        if raw.identity.is_some() && raw.ec2_role.is_some() {
            return Err("give `identity` or its EC2 name `ec2_role`, not both".into());
        }
        for (key, name) in [("identity", &raw.identity), ("ec2_role", &raw.ec2_role)] {
            if let Some(name) = name
                && !is_role_name(name)
            {
                return Err(format!(
                    "{key}: {name:?} must be non-empty, without '/' or spaces"
                ));
            }
        }
        Ok(Rule {
            container: raw.container,
            image: raw.image,
            cgroup: raw.cgroup,
            policy: Policy {
                deny: raw.deny,
                allow: raw.allow,
                cloud: raw.cloud,
                identity: raw.identity.or(raw.ec2_role),
            },
        })
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
        assert_eq!(p.identity.as_deref(), Some("app-role"));
        let (p, problems) = Policy::from_labels(&labels(&[
            ("redirect.cloud", "azure"),
            ("redirect.identity", "app-identity"),
        ]));
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(
            (p.cloud, p.identity.as_deref()),
            (Some(CloudKind::Azure), Some("app-identity"))
        );
        let (p, _) = Policy::from_labels(&labels(&[("redirect.deny", "true")]));
        assert!(!p.permits("/latest/meta-data/instance-id") && !p.permits(TOKEN_PATH));
        assert!(Policy::default().permits("/anything"));
    }

    #[test]
    fn the_operators_rules_win_over_labels_and_can_turn_them_off() {
        let app = Container {
            id: "0123456789abcdef".repeat(4),
            name: "demo_app_1".into(),
            image: "myorg/app:1".into(),
            labels: labels(&[
                ("com.docker.compose.project", "demo"),
                ("com.docker.compose.service", "app"),
                ("redirect.ec2.role", "admin"),
            ]),
        };
        let rule = |container: Option<&str>, image: Option<&str>, role: &str| Rule {
            container: container.map(str::to_owned),
            image: image.map(str::to_owned),
            cgroup: None,
            policy: Policy {
                identity: Some(role.into()),
                ..Policy::default()
            },
        };
        let rules = Rules {
            rules: vec![
                rule(Some("demo/web"), None, "web"),
                rule(None, Some("myorg/*"), "app"),
            ],
            labels: true,
        };
        assert_eq!(
            rules
                .for_caller(Some(&app), "/docker/x")
                .0
                .identity
                .as_deref(),
            Some("app")
        );
        let by_name = Rules {
            rules: vec![rule(Some("demo_app_1"), None, "named")],
            labels: true,
        };
        assert_eq!(
            by_name.for_caller(Some(&app), "/").0.identity.as_deref(),
            Some("named")
        );
        let none_match = Rules {
            rules: vec![rule(Some("other"), None, "x")],
            labels: true,
        };
        assert_eq!(
            none_match.for_caller(Some(&app), "/").0.identity.as_deref(),
            Some("admin"),
            "the labels"
        );
        let no_labels = Rules {
            labels: false,
            ..none_match
        };
        assert_eq!(no_labels.for_caller(Some(&app), "/").0, Policy::default());
        let by_cgroup = Rules {
            rules: vec![Rule {
                cgroup: Some("/ci/".into()),
                container: None,
                image: None,
                policy: Policy {
                    deny: true,
                    ..Policy::default()
                },
            }],
            labels: true,
        };
        assert!(by_cgroup.for_caller(None, "/ci/job-1").0.deny);
        assert!(!by_cgroup.for_caller(None, "/cider").0.deny);
    }

    #[test]
    fn a_label_that_does_not_parse_denies_and_is_named() {
        for (key, value) in [
            ("redirect.deny", "yes"),
            ("redirect.allow", "latest/meta-data"),
            ("redirect.ec2.role", "a/b"),
            ("redirect.dney", "true"),
            ("redirect.cloud", "aws"),
        ] {
            let (p, problems) = Policy::from_labels(&labels(&[(key, value)]));
            assert!(p.deny, "{key}={value}");
            assert_eq!(problems.len(), 1, "{problems:?}");
            assert!(problems[0].contains(key), "{problems:?}");
        }
    }
}
