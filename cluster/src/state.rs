//! The replicated state machine: what every node agrees on once a command is
//! committed. `apply` is deterministic (no clock, no randomness, no IO, maps
//! are ordered), so every replica that applies the same log holds the same
//! state, and a snapshot is simply the serialized state.
//!
//! Encoding: commands and snapshots are JSON (serde_json). It is stable
//! across versions of the crate as long as fields are only added with
//! defaults, self-describing (a snapshot can be read by a person during an
//! incident), and the volume is tiny: this is the control plane, not the
//! data path.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Raft node id; 0 is never a valid id (raft-rs reserves it).
pub type NodeId = u64;
/// ANA group id as the NVMe ANA log page reports it (ANAGRPID, non-zero).
pub type GroupId = u32;

/// Longest name, address or listener string a command may carry, so one
/// command cannot bloat every replica's state.
pub const MAX_FIELD_LEN: usize = 256;
/// Most NVMe/TCP listeners one node may register.
pub const MAX_LISTENERS: usize = 16;
/// Largest management document (the rendered TOML config).
pub const MAX_DOCUMENT_LEN: usize = 1 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Serves namespaces; may own ANA groups.
    Storage,
    /// Votes in Raft and keeps the replicated state, serves no data and
    /// never owns a group: it lets two storage nodes keep a quorum.
    Witness,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct NodeInfo {
    pub id: NodeId,
    pub name: String,
    /// Where the node's Raft transport listens.
    pub raft_addr: String,
    /// Its NVMe/TCP listeners ("ip:port"), listed in every node's discovery
    /// log.
    pub listeners: Vec<String>,
    pub role: Role,
    /// Health as last committed by the leader's policy (`NodeDown`/`NodeUp`).
    pub up: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Group {
    pub id: GroupId,
    /// The node whose paths are ANA-optimized for this group; `None` while
    /// no storage node can take it.
    pub owner: Option<NodeId>,
    /// Rises at every ownership change (including to and from `None`), so a
    /// write tagged with an older epoch is recognisably stale.
    pub epoch: u64,
    /// Where automatic failback returns the group.
    pub preferred_owner: Option<NodeId>,
}

/// The management plane's rendered configuration, replicated as opaque text
/// with a version for compare-and-set.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Document {
    pub version: u64,
    pub text: String,
}

/// ANA state of one group on one node's paths, derived from committed state
/// only.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AnaState {
    Optimized,
    NonOptimized,
    Inaccessible,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ClusterState {
    pub nodes: BTreeMap<NodeId, NodeInfo>,
    pub groups: BTreeMap<GroupId, Group>,
    pub document: Document,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "op")]
pub enum Command {
    AddNode {
        id: NodeId,
        name: String,
        raft_addr: String,
        listeners: Vec<String>,
        role: Role,
    },
    RemoveNode {
        id: NodeId,
    },
    AddGroup {
        id: GroupId,
        preferred_owner: Option<NodeId>,
    },
    /// Compare-and-set on the epoch: a proposal made from a stale view (an
    /// old leader's policy, a racing `ctl`) is refused instead of moving the
    /// group twice.
    SetGroupOwner {
        group: GroupId,
        owner: Option<NodeId>,
        expected_epoch: u64,
    },
    NodeDown {
        id: NodeId,
    },
    NodeUp {
        id: NodeId,
    },
    PutDocument {
        expected_version: u64,
        text: String,
    },
}

/// What a successful command changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Applied {
    Done,
    /// The group's new owner and epoch.
    Owner {
        group: GroupId,
        owner: Option<NodeId>,
        epoch: u64,
    },
    DocumentVersion(u64),
}

/// Why a command was refused. The state is unchanged after any of these.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    #[error("{field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("{field}: node {id} already exists")]
    NodeExists { field: &'static str, id: NodeId },
    #[error("{field}: no node {id}")]
    NoSuchNode { field: &'static str, id: NodeId },
    #[error("id: node {id} owns groups {groups:?}; move them first")]
    NodeOwnsGroups { id: NodeId, groups: Vec<GroupId> },
    #[error("id: node {id} is the last storage node")]
    LastStorageNode { id: NodeId },
    #[error("{field}: group {id} already exists")]
    GroupExists { field: &'static str, id: GroupId },
    #[error("{field}: no group {id}")]
    NoSuchGroup { field: &'static str, id: GroupId },
    #[error("expected_epoch: group {group} is at epoch {actual}, not {expected}")]
    EpochMismatch {
        group: GroupId,
        expected: u64,
        actual: u64,
    },
    #[error("owner: node {id} is a witness and cannot own a group")]
    OwnerIsWitness { id: NodeId },
    #[error("owner: node {id} is down")]
    OwnerDown { id: NodeId },
    #[error("expected_version: the document is at version {actual}, not {expected}")]
    VersionMismatch { expected: u64, actual: u64 },
    #[error("entry: not a command: {0}")]
    Malformed(String),
}

impl Command {
    pub fn encode(&self) -> Vec<u8> {
        // Serializing these plain enums cannot fail (no maps with non-string
        // keys, no foreign Serialize impls).
        serde_json::to_vec(self).expect("command serializes")
    }

    pub fn decode(data: &[u8]) -> Result<Command, CommandError> {
        serde_json::from_slice(data).map_err(|e| CommandError::Malformed(e.to_string()))
    }
}

fn check_len(field: &'static str, s: &str) -> Result<(), CommandError> {
    if s.is_empty() {
        return Err(CommandError::Invalid {
            field,
            reason: "must not be empty".into(),
        });
    }
    if s.len() > MAX_FIELD_LEN {
        return Err(CommandError::Invalid {
            field,
            reason: format!("{} bytes, at most {MAX_FIELD_LEN}", s.len()),
        });
    }
    Ok(())
}

impl ClusterState {
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("state serializes")
    }

    pub fn decode(data: &[u8]) -> Result<ClusterState, CommandError> {
        serde_json::from_slice(data).map_err(|e| CommandError::Malformed(e.to_string()))
    }

    /// Applies one committed entry's payload. A payload that is not a
    /// command is refused like any invalid command: every replica sees the
    /// same bytes, so every replica refuses it the same way.
    pub fn apply_entry(&mut self, data: &[u8]) -> Result<Applied, CommandError> {
        let cmd = Command::decode(data)?;
        self.apply(&cmd)
    }

    pub fn apply(&mut self, cmd: &Command) -> Result<Applied, CommandError> {
        match cmd {
            Command::AddNode {
                id,
                name,
                raft_addr,
                listeners,
                role,
            } => {
                if *id == 0 {
                    return Err(CommandError::Invalid {
                        field: "id",
                        reason: "0 is reserved".into(),
                    });
                }
                if self.nodes.contains_key(id) {
                    return Err(CommandError::NodeExists {
                        field: "id",
                        id: *id,
                    });
                }
                check_len("name", name)?;
                check_len("raft_addr", raft_addr)?;
                if self.nodes.values().any(|n| n.name == *name) {
                    return Err(CommandError::Invalid {
                        field: "name",
                        reason: format!("{name:?} is taken"),
                    });
                }
                if listeners.len() > MAX_LISTENERS {
                    return Err(CommandError::Invalid {
                        field: "listeners",
                        reason: format!("{} listeners, at most {MAX_LISTENERS}", listeners.len()),
                    });
                }
                for l in listeners {
                    check_len("listeners", l)?;
                }
                if *role == Role::Witness && !listeners.is_empty() {
                    return Err(CommandError::Invalid {
                        field: "listeners",
                        reason: "a witness serves no namespaces".into(),
                    });
                }
                self.nodes.insert(
                    *id,
                    NodeInfo {
                        id: *id,
                        name: name.clone(),
                        raft_addr: raft_addr.clone(),
                        listeners: listeners.clone(),
                        role: *role,
                        up: true,
                    },
                );
                Ok(Applied::Done)
            }
            Command::RemoveNode { id } => {
                let node = self.nodes.get(id).ok_or(CommandError::NoSuchNode {
                    field: "id",
                    id: *id,
                })?;
                let owned: Vec<GroupId> = self
                    .groups
                    .values()
                    .filter(|g| g.owner == Some(*id))
                    .map(|g| g.id)
                    .collect();
                if !owned.is_empty() {
                    return Err(CommandError::NodeOwnsGroups {
                        id: *id,
                        groups: owned,
                    });
                }
                if node.role == Role::Storage
                    && self.storage_nodes().filter(|n| n.id != *id).count() == 0
                {
                    return Err(CommandError::LastStorageNode { id: *id });
                }
                self.nodes.remove(id);
                for g in self.groups.values_mut() {
                    if g.preferred_owner == Some(*id) {
                        g.preferred_owner = None;
                    }
                }
                Ok(Applied::Done)
            }
            Command::AddGroup {
                id,
                preferred_owner,
            } => {
                if *id == 0 {
                    return Err(CommandError::Invalid {
                        field: "id",
                        reason: "ANA group 0 is reserved".into(),
                    });
                }
                if self.groups.contains_key(id) {
                    return Err(CommandError::GroupExists {
                        field: "id",
                        id: *id,
                    });
                }
                if let Some(p) = preferred_owner {
                    self.check_owner("preferred_owner", *p, false)?;
                }
                // A new group starts unowned: the policy gives it an owner
                // through a SetGroupOwner, so the first owner has an epoch
                // bump like every later one.
                self.groups.insert(
                    *id,
                    Group {
                        id: *id,
                        owner: None,
                        epoch: 0,
                        preferred_owner: *preferred_owner,
                    },
                );
                Ok(Applied::Done)
            }
            Command::SetGroupOwner {
                group,
                owner,
                expected_epoch,
            } => {
                let g = self.groups.get(group).ok_or(CommandError::NoSuchGroup {
                    field: "group",
                    id: *group,
                })?;
                if g.epoch != *expected_epoch {
                    return Err(CommandError::EpochMismatch {
                        group: *group,
                        expected: *expected_epoch,
                        actual: g.epoch,
                    });
                }
                if let Some(o) = owner {
                    self.check_owner("owner", *o, true)?;
                }
                let g = self.groups.get_mut(group).expect("checked above");
                g.owner = *owner;
                g.epoch += 1;
                Ok(Applied::Owner {
                    group: *group,
                    owner: *owner,
                    epoch: g.epoch,
                })
            }
            Command::NodeDown { id } | Command::NodeUp { id } => {
                let up = matches!(cmd, Command::NodeUp { .. });
                let node = self.nodes.get_mut(id).ok_or(CommandError::NoSuchNode {
                    field: "id",
                    id: *id,
                })?;
                node.up = up;
                Ok(Applied::Done)
            }
            Command::PutDocument {
                expected_version,
                text,
            } => {
                if self.document.version != *expected_version {
                    return Err(CommandError::VersionMismatch {
                        expected: *expected_version,
                        actual: self.document.version,
                    });
                }
                if text.len() > MAX_DOCUMENT_LEN {
                    return Err(CommandError::Invalid {
                        field: "text",
                        reason: format!("{} bytes, at most {MAX_DOCUMENT_LEN}", text.len()),
                    });
                }
                self.document.version += 1;
                self.document.text = text.clone();
                Ok(Applied::DocumentVersion(self.document.version))
            }
        }
    }

    fn check_owner(
        &self,
        field: &'static str,
        id: NodeId,
        must_be_up: bool,
    ) -> Result<(), CommandError> {
        let n = self
            .nodes
            .get(&id)
            .ok_or(CommandError::NoSuchNode { field, id })?;
        if n.role == Role::Witness {
            return Err(CommandError::OwnerIsWitness { id });
        }
        if must_be_up && !n.up {
            return Err(CommandError::OwnerDown { id });
        }
        Ok(())
    }

    pub fn storage_nodes(&self) -> impl Iterator<Item = &NodeInfo> {
        self.nodes.values().filter(|n| n.role == Role::Storage)
    }

    /// The ANA state a node reports for a group, from committed state only:
    /// optimized on the owner, non-optimized on other live storage nodes
    /// (so a node that returns after a failover comes back non-optimized),
    /// inaccessible on down nodes and witnesses.
    pub fn ana_state(&self, group: GroupId, node: NodeId) -> Option<AnaState> {
        let g = self.groups.get(&group)?;
        let n = self.nodes.get(&node)?;
        Some(if n.role == Role::Witness || !n.up {
            AnaState::Inaccessible
        } else if g.owner == Some(node) {
            AnaState::Optimized
        } else {
            AnaState::NonOptimized
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn add(id: NodeId, role: Role) -> Command {
        Command::AddNode {
            id,
            name: format!("n{id}"),
            raft_addr: format!("10.0.0.{id}:7000"),
            listeners: if role == Role::Storage {
                vec![format!("10.0.0.{id}:4420")]
            } else {
                vec![]
            },
            role,
        }
    }

    fn two_plus_witness() -> ClusterState {
        let mut s = ClusterState::default();
        for c in [
            add(1, Role::Storage),
            add(2, Role::Storage),
            add(3, Role::Witness),
            Command::AddGroup {
                id: 1,
                preferred_owner: Some(1),
            },
        ] {
            s.apply(&c).unwrap();
        }
        s
    }

    #[test]
    fn ownership_changes_bump_the_epoch_and_are_compare_and_set() {
        let mut s = two_plus_witness();
        let r = s.apply(&Command::SetGroupOwner {
            group: 1,
            owner: Some(1),
            expected_epoch: 0,
        });
        assert_eq!(
            r,
            Ok(Applied::Owner {
                group: 1,
                owner: Some(1),
                epoch: 1
            })
        );
        // A proposal made from the old view is refused, state unchanged.
        let before = s.clone();
        let r = s.apply(&Command::SetGroupOwner {
            group: 1,
            owner: Some(2),
            expected_epoch: 0,
        });
        assert_eq!(
            r,
            Err(CommandError::EpochMismatch {
                group: 1,
                expected: 0,
                actual: 1
            })
        );
        assert_eq!(s, before);
        assert_eq!(s.ana_state(1, 1), Some(AnaState::Optimized));
        assert_eq!(s.ana_state(1, 2), Some(AnaState::NonOptimized));
        assert_eq!(s.ana_state(1, 3), Some(AnaState::Inaccessible));
    }

    #[test]
    fn a_witness_or_a_down_node_cannot_own() {
        let mut s = two_plus_witness();
        let r = s.apply(&Command::SetGroupOwner {
            group: 1,
            owner: Some(3),
            expected_epoch: 0,
        });
        assert_eq!(r, Err(CommandError::OwnerIsWitness { id: 3 }));
        s.apply(&Command::NodeDown { id: 2 }).unwrap();
        let r = s.apply(&Command::SetGroupOwner {
            group: 1,
            owner: Some(2),
            expected_epoch: 0,
        });
        assert_eq!(r, Err(CommandError::OwnerDown { id: 2 }));
        assert_eq!(s.ana_state(1, 2), Some(AnaState::Inaccessible));
        assert_eq!(s.groups[&1].epoch, 0);
    }

    #[test]
    fn remove_node_refuses_owners_and_the_last_storage_node() {
        let mut s = two_plus_witness();
        s.apply(&Command::SetGroupOwner {
            group: 1,
            owner: Some(1),
            expected_epoch: 0,
        })
        .unwrap();
        assert_eq!(
            s.apply(&Command::RemoveNode { id: 1 }),
            Err(CommandError::NodeOwnsGroups {
                id: 1,
                groups: vec![1]
            })
        );
        assert_eq!(s.apply(&Command::RemoveNode { id: 2 }), Ok(Applied::Done));
        assert_eq!(
            s.apply(&Command::RemoveNode { id: 1 }),
            Err(CommandError::NodeOwnsGroups {
                id: 1,
                groups: vec![1]
            })
        );
        s.apply(&Command::SetGroupOwner {
            group: 1,
            owner: None,
            expected_epoch: 1,
        })
        .unwrap();
        assert_eq!(
            s.apply(&Command::RemoveNode { id: 1 }),
            Err(CommandError::LastStorageNode { id: 1 })
        );
        // The witness can go: it is not a storage node.
        assert_eq!(s.apply(&Command::RemoveNode { id: 3 }), Ok(Applied::Done));
        assert_eq!(
            s.apply(&Command::RemoveNode { id: 9 }),
            Err(CommandError::NoSuchNode { field: "id", id: 9 })
        );
    }

    #[test]
    fn validation_names_the_field() {
        let mut s = ClusterState::default();
        let err = s
            .apply(&Command::AddNode {
                id: 1,
                name: String::new(),
                raft_addr: "a:1".into(),
                listeners: vec![],
                role: Role::Storage,
            })
            .unwrap_err();
        assert!(
            matches!(err, CommandError::Invalid { field: "name", .. }),
            "{err}"
        );
        assert!(err.to_string().starts_with("name:"), "{err}");
        let err = s
            .apply(&Command::AddNode {
                id: 1,
                name: "w".into(),
                raft_addr: "a:1".into(),
                listeners: vec!["x:4420".into()],
                role: Role::Witness,
            })
            .unwrap_err();
        assert!(
            matches!(
                err,
                CommandError::Invalid {
                    field: "listeners",
                    ..
                }
            ),
            "{err}"
        );
        assert!(s.nodes.is_empty());
        let err = s
            .apply(&Command::AddGroup {
                id: 1,
                preferred_owner: Some(7),
            })
            .unwrap_err();
        assert_eq!(
            err,
            CommandError::NoSuchNode {
                field: "preferred_owner",
                id: 7
            }
        );
    }

    #[test]
    fn the_document_is_compare_and_set_on_its_version() {
        let mut s = ClusterState::default();
        assert_eq!(
            s.apply(&Command::PutDocument {
                expected_version: 0,
                text: "a = 1".into()
            }),
            Ok(Applied::DocumentVersion(1))
        );
        assert_eq!(
            s.apply(&Command::PutDocument {
                expected_version: 0,
                text: "a = 2".into()
            }),
            Err(CommandError::VersionMismatch {
                expected: 0,
                actual: 1
            })
        );
        assert_eq!(s.document.text, "a = 1");
    }

    #[test]
    fn commands_and_snapshots_round_trip_and_garbage_is_an_error() {
        let s = two_plus_witness();
        assert_eq!(ClusterState::decode(&s.encode()), Ok(s.clone()));
        let c = add(4, Role::Storage);
        assert_eq!(Command::decode(&c.encode()), Ok(c));
        let mut s2 = s.clone();
        assert!(matches!(
            s2.apply_entry(b"\xff{not json"),
            Err(CommandError::Malformed(_))
        ));
        assert_eq!(s2, s);
    }
}
