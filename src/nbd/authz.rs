//! Who may open which disk, read-only or read-write, and who may advance
//! a disk's epoch (connect as `NAME@EPOCH` above the current one, which
//! fences the disk's present writer at its first write).
//!
//! From the config file's `[[client]]` entries:
//!
//! ```toml
//! [[client]]
//! identity = "CN=host-a,O=blkshim-test"   # the client certificate's subject
//! disks = ["vm1"]                          # or ["*"]
//! access = "rw"                            # or "ro" (the default)
//! advance = true                           # default false
//! ```
//!
//! An identity may only use the disks an entry lists for it (entries for
//! one identity add up). A connection without a client certificate (plain,
//! where the listener allows it, or TLS with `--tls-verify-peer false`) is
//! [`ANONYMOUS`]: with no `[[client]]` entry at all it may use every disk,
//! as before authorization existed; otherwise only what entries for
//! `identity = "anonymous"` grant. An authenticated identity with no
//! entries may use nothing.

use serde::Deserialize;

/// The identity of a connection without a client certificate. A rendered
/// subject DN always has an `=`, so no certificate is mistaken for it.
pub const ANONYMOUS: &str = "anonymous";

/// Read-only or read-write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Access {
    #[default]
    Ro,
    Rw,
}

/// One `[[client]]` entry.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientRule {
    pub identity: String,
    pub disks: Vec<String>,
    #[serde(default)]
    pub access: Access,
    #[serde(default)]
    pub advance: bool,
}

/// What a connection may do with one disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    pub write: bool,
    /// May register above the disk's current epoch.
    pub advance: bool,
}

const EVERYTHING: Grant = Grant {
    write: true,
    advance: true,
};

/// The authorization rules of a server.
#[derive(Debug, Clone, Default)]
pub struct Authz {
    rules: Vec<ClientRule>,
}

impl Authz {
    /// Check the entries: an empty identity or disk list is a mistake, not
    /// a rule.
    pub fn new(rules: Vec<ClientRule>) -> Result<Self, String> {
        for (i, r) in rules.iter().enumerate() {
            let n = i + 1;
            if r.identity.trim().is_empty() {
                return Err(format!("[[client]] entry {n}: empty identity"));
            }
            if r.disks.is_empty() {
                return Err(format!(
                    "[[client]] entry {n} ({:?}): no disks (give disk names or \"*\")",
                    r.identity
                ));
            }
            if let Some(d) = r.disks.iter().find(|d| d.is_empty() || d.contains('@')) {
                return Err(format!(
                    "[[client]] entry {n} ({:?}): {d:?} is not a disk name (no epoch here)",
                    r.identity
                ));
            }
        }
        Ok(Authz { rules })
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    pub fn rules(&self) -> &[ClientRule] {
        &self.rules
    }

    /// What `identity` (`None`: no client certificate) may do with `disk`;
    /// `None`: nothing, the disk is not to be opened or listed.
    pub fn grant(&self, identity: Option<&str>, disk: &str) -> Option<Grant> {
        if self.rules.is_empty() && identity.is_none() {
            return Some(EVERYTHING);
        }
        let who = identity.unwrap_or(ANONYMOUS);
        self.rules
            .iter()
            .filter(|r| r.identity == who && r.disks.iter().any(|d| d == "*" || d == disk))
            .fold(None, |acc: Option<Grant>, r| {
                let g = Grant {
                    write: r.access == Access::Rw,
                    advance: r.advance,
                };
                Some(match acc {
                    None => g,
                    Some(a) => Grant {
                        write: a.write || g.write,
                        advance: a.advance || g.advance,
                    },
                })
            })
    }

    /// Whether `identity` is held to the rules at all (else it may use
    /// everything, and unknown exports are reported as unknown).
    pub fn restricted(&self, identity: Option<&str>) -> bool {
        !(self.rules.is_empty() && identity.is_none())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(identity: &str, disks: &[&str], access: Access, advance: bool) -> ClientRule {
        ClientRule {
            identity: identity.into(),
            disks: disks.iter().map(|s| s.to_string()).collect(),
            access,
            advance,
        }
    }

    const A: &str = "CN=host-a,O=t";
    const B: &str = "CN=host-b,O=t";

    #[test]
    fn without_rules_only_anonymous_clients_may_use_everything() {
        let z = Authz::default();
        assert_eq!(z.grant(None, "vm1"), Some(EVERYTHING));
        assert!(!z.restricted(None));
        assert_eq!(z.grant(Some(A), "vm1"), None, "default deny");
        assert!(z.restricted(Some(A)));
    }

    #[test]
    fn an_identity_uses_only_the_disks_listed_for_it() {
        let z = Authz::new(vec![
            rule(A, &["vm1"], Access::Rw, false),
            rule(B, &["vm1", "vm2"], Access::Ro, false),
            rule(A, &["vm2"], Access::Ro, true),
        ])
        .unwrap();
        let rw = Grant {
            write: true,
            advance: false,
        };
        assert_eq!(z.grant(Some(A), "vm1"), Some(rw));
        assert_eq!(
            z.grant(Some(A), "vm2"),
            Some(Grant {
                write: false,
                advance: true
            })
        );
        assert_eq!(z.grant(Some(A), "vm3"), None);
        assert_eq!(z.grant(Some(B), "vm2").map(|g| g.write), Some(false));
        assert_eq!(z.grant(Some("CN=host-c"), "vm1"), None);
        // With rules, an anonymous client is held to them too.
        assert_eq!(z.grant(None, "vm1"), None);
        assert!(z.restricted(None));
    }

    #[test]
    fn entries_for_one_identity_add_up_and_star_means_every_disk() {
        let z = Authz::new(vec![
            rule(A, &["*"], Access::Ro, false),
            rule(A, &["vm1"], Access::Rw, true),
            rule(ANONYMOUS, &["pub"], Access::Ro, false),
        ])
        .unwrap();
        assert_eq!(z.grant(Some(A), "vm1"), Some(EVERYTHING));
        assert_eq!(z.grant(Some(A), "any").map(|g| g.write), Some(false));
        assert_eq!(z.grant(None, "pub").map(|g| g.write), Some(false));
        assert_eq!(z.grant(None, "vm1"), None);
    }

    #[test]
    fn bad_entries_are_refused() {
        assert!(Authz::new(vec![rule("", &["vm1"], Access::Rw, false)]).is_err());
        assert!(Authz::new(vec![rule(A, &[], Access::Rw, false)]).is_err());
        let e = Authz::new(vec![rule(A, &["vm1@3"], Access::Rw, false)]).unwrap_err();
        assert!(e.contains("not a disk name"), "{e}");
    }
}
