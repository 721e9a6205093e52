//! The durable Raft log of one node, in three files of a [`Dir`]:
//!
//! - `log`: append-only records, each `len: u32 LE | crc32c(payload): u32 LE
//!   | payload` where the payload is one prost-encoded `Entry`. A
//!   conflicting suffix is cut with a truncate before the new entries are
//!   appended; [`DiskLog::sync`] makes both durable.
//! - `raftstate`: the hard state (term, vote, commit), replaced atomically
//!   (write temp, fsync, rename, fsync dir). It also carries a copy of the
//!   current voters for people reading it; recovery ignores it.
//! - `snapshot`: the latest snapshot (metadata with the voters as of its
//!   index, and the serialized state machine), replaced atomically; raft-rs
//!   replays the conf changes after it. Taking or installing one rewrites `log`
//!   with only the entries after it (compaction).
//!
//! Ordering is what makes a crash at any point recoverable: entries are
//! synced before the hard state that may commit them is written, and the
//! snapshot is written before the log is compacted. Recovery reads the
//! snapshot, the hard state, then the log up to the first torn or corrupt
//! record, truncates the file there, drops entries the snapshot already
//! covers (all of them if the log disagrees with the snapshot's term), and
//! refuses to start if the hard state commits an entry that is not there.
//!
//! Everything the log holds is also in memory: this is a control-plane log
//! (membership and ownership changes), compacted by snapshots, so reads
//! never touch the disk.

use std::io;

use prost::Message as _;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState, Storage, StorageError};

use crate::disk::Dir;

const LOG: &str = "log";
const RAFT_STATE: &str = "raftstate";
const SNAPSHOT: &str = "snapshot";
const RECORD_HEADER: usize = 8;
/// Largest record accepted on recovery; anything larger is a corrupt length.
const MAX_RECORD: usize = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("log store io: {0}")]
    Io(#[from] io::Error),
    #[error("{file}: {reason}")]
    Corrupt { file: &'static str, reason: String },
    #[error("{field}: {reason}")]
    Invalid { field: &'static str, reason: String },
}

/// What recovery found, for logs and tests.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// Bytes cut from the end of `log` (a torn or corrupt tail).
    pub truncated_bytes: u64,
    /// Entries dropped because the snapshot covers them or contradicts them.
    pub dropped_entries: u64,
}

pub struct DiskLog<D: Dir> {
    dir: D,
    hard_state: HardState,
    conf_state: ConfState,
    snapshot: Snapshot,
    /// Contiguous, starting at `snapshot.index + 1`.
    entries: Vec<Entry>,
    /// Byte offset of each entry's record in `log`.
    offsets: Vec<u64>,
    log_len: u64,
    recovery: Recovery,
}

fn crc_wrap(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 4);
    out.extend_from_slice(&crc32c::crc32c(payload).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

fn crc_unwrap<'a>(file: &'static str, data: &'a [u8]) -> Result<&'a [u8], LogError> {
    let corrupt = |reason: &str| LogError::Corrupt {
        file,
        reason: reason.to_owned(),
    };
    let (crc, payload) = data
        .split_at_checked(4)
        .ok_or_else(|| corrupt("too short"))?;
    let crc = u32::from_le_bytes(crc.try_into().expect("4 bytes"));
    if crc32c::crc32c(payload) != crc {
        return Err(corrupt("checksum mismatch"));
    }
    Ok(payload)
}

fn record(e: &Entry) -> Vec<u8> {
    let payload = e.encode_to_vec();
    let mut out = Vec::with_capacity(RECORD_HEADER + payload.len());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    out
}

/// Parses one record at the start of `buf`: `None` if it is torn, corrupt
/// or not an entry, which recovery treats alike as the end of the log.
fn parse_record(buf: &[u8]) -> Option<(Entry, usize)> {
    let header = buf.get(..RECORD_HEADER)?;
    let len = u32::from_le_bytes(header[..4].try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(header[4..].try_into().ok()?);
    if len > MAX_RECORD {
        return None;
    }
    let payload = buf.get(RECORD_HEADER..RECORD_HEADER + len)?;
    if crc32c::crc32c(payload) != crc {
        return None;
    }
    let e = Entry::decode(payload).ok()?;
    Some((e, RECORD_HEADER + len))
}

fn encode_raft_state(hs: &HardState, cs: &ConfState) -> Vec<u8> {
    let hs = hs.encode_to_vec();
    let mut payload = Vec::new();
    payload.extend_from_slice(&(hs.len() as u32).to_le_bytes());
    payload.extend_from_slice(&hs);
    payload.extend_from_slice(&cs.encode_to_vec());
    crc_wrap(&payload)
}

fn decode_raft_state(data: &[u8]) -> Result<(HardState, ConfState), LogError> {
    let payload = crc_unwrap(RAFT_STATE, data)?;
    let corrupt = |reason: String| LogError::Corrupt {
        file: RAFT_STATE,
        reason,
    };
    let (len, rest) = payload
        .split_at_checked(4)
        .ok_or_else(|| corrupt("too short".into()))?;
    let len = u32::from_le_bytes(len.try_into().expect("4 bytes")) as usize;
    let (hs, cs) = rest
        .split_at_checked(len)
        .ok_or_else(|| corrupt("hard state length".into()))?;
    let hs = HardState::decode(hs).map_err(|e| corrupt(e.to_string()))?;
    let cs = ConfState::decode(cs).map_err(|e| corrupt(e.to_string()))?;
    Ok((hs, cs))
}

impl<D: Dir> DiskLog<D> {
    /// Creates the store of a node that joins a new cluster: an empty log
    /// whose starting point (index 0) carries the initial voters and the
    /// genesis state every member starts from. Refused if the directory
    /// already holds a store.
    pub fn bootstrap(mut dir: D, voters: &[u64], genesis: Vec<u8>) -> Result<DiskLog<D>, LogError> {
        if dir.read(RAFT_STATE)?.is_some() || dir.read(SNAPSHOT)?.is_some() {
            return Err(LogError::Invalid {
                field: "dir",
                reason: "already holds a Raft log".into(),
            });
        }
        if voters.is_empty() || voters.contains(&0) {
            return Err(LogError::Invalid {
                field: "voters",
                reason: format!("{voters:?}: need at least one, none 0"),
            });
        }
        let cs = ConfState {
            voters: voters.to_vec(),
            ..Default::default()
        };
        let snap = Snapshot {
            data: genesis,
            metadata: Some(SnapshotMetadata {
                conf_state: Some(cs.clone()),
                ..Default::default()
            }),
        };
        dir.replace(SNAPSHOT, &crc_wrap(&snap.encode_to_vec()))?;
        dir.replace(RAFT_STATE, &encode_raft_state(&HardState::default(), &cs))?;
        DiskLog::open(dir)
    }

    /// The voter set as of the last applied conf change. It reaches the
    /// disk with the next snapshot: until then a restart replays the conf
    /// change entries from the log, as raft-rs expects.
    pub fn set_conf_state(&mut self, cs: ConfState) {
        self.conf_state = cs;
    }

    /// Recovers the store from its directory (see the module doc).
    pub fn open(mut dir: D) -> Result<DiskLog<D>, LogError> {
        let snapshot = match dir.read(SNAPSHOT)? {
            Some(b) => {
                Snapshot::decode(crc_unwrap(SNAPSHOT, &b)?).map_err(|e| LogError::Corrupt {
                    file: SNAPSHOT,
                    reason: e.to_string(),
                })?
            }
            None => {
                return Err(LogError::Invalid {
                    field: "dir",
                    reason: "holds no Raft log (bootstrap it first)".into(),
                });
            }
        };
        let (mut hard_state, _) = match dir.read(RAFT_STATE)? {
            Some(b) => decode_raft_state(&b)?,
            None => (HardState::default(), ConfState::default()),
        };
        let meta = snapshot.get_metadata();
        // The voters as of the snapshot: raft-rs replays the conf changes
        // after it (the raft state's copy may already include them).
        let conf_state = meta.get_conf_state().clone();
        hard_state.commit = hard_state.commit.max(meta.index);
        hard_state.term = hard_state.term.max(meta.term);

        let log = dir.read(LOG)?.unwrap_or_default();
        let mut recovery = Recovery::default();
        let mut entries: Vec<Entry> = Vec::new();
        let mut offsets = Vec::new();
        let mut pos = 0usize;
        let mut before_snapshot_ok = true;
        while pos < log.len() {
            let Some((e, len)) = parse_record(&log[pos..]) else {
                break;
            };
            let expected = entries.last().map(|last| last.index + 1);
            if expected.is_some_and(|x| e.index != x) && e.index > meta.index {
                break;
            }
            if e.index <= meta.index {
                if e.index == meta.index && e.term != meta.term {
                    before_snapshot_ok = false;
                }
                recovery.dropped_entries += 1;
            } else if entries.is_empty() && e.index != meta.index + 1 {
                // The log does not continue the snapshot: it predates it
                // and the compaction's rewrite was lost.
                break;
            } else {
                entries.push(e);
                offsets.push(pos as u64);
            }
            pos += len;
        }
        if !before_snapshot_ok {
            // The log diverged from the snapshot before its index, so
            // nothing after it belongs to the snapshot's history either.
            recovery.dropped_entries += entries.len() as u64;
            pos = offsets.first().map_or(pos, |&o| o as usize);
            entries.clear();
            offsets.clear();
        }
        if pos < log.len() {
            recovery.truncated_bytes = (log.len() - pos) as u64;
            dir.truncate(LOG, pos as u64)?;
            dir.sync(LOG)?;
        }
        let mut store = DiskLog {
            dir,
            hard_state,
            conf_state,
            snapshot,
            entries,
            offsets,
            log_len: pos as u64,
            recovery,
        };
        if store.hard_state.commit > store.last() {
            return Err(LogError::Corrupt {
                file: LOG,
                reason: format!(
                    "the hard state commits index {} but the log ends at {}",
                    store.hard_state.commit,
                    store.last()
                ),
            });
        }
        if !before_snapshot_ok {
            // Rewrite so that what is left on disk continues the snapshot.
            store.rewrite_log()?;
        }
        Ok(store)
    }

    pub fn recovery(&self) -> &Recovery {
        &self.recovery
    }

    pub fn hard_state(&self) -> &HardState {
        &self.hard_state
    }

    pub fn conf_state(&self) -> &ConfState {
        &self.conf_state
    }

    /// The latest snapshot, with its serialized state machine.
    pub fn latest_snapshot(&self) -> &Snapshot {
        &self.snapshot
    }

    fn first(&self) -> u64 {
        self.snapshot.get_metadata().index + 1
    }

    fn last(&self) -> u64 {
        self.entries
            .last()
            .map_or(self.snapshot.get_metadata().index, |e| e.index)
    }

    /// Appends entries, first cutting any conflicting suffix they replace.
    /// Not durable until [`DiskLog::sync`].
    pub fn append(&mut self, ents: &[Entry]) -> Result<(), LogError> {
        let Some(first) = ents.first() else {
            return Ok(());
        };
        if first.index < self.first() || first.index > self.last() + 1 {
            return Err(LogError::Invalid {
                field: "entries",
                reason: format!(
                    "start at {} but the log holds [{}, {}]",
                    first.index,
                    self.first(),
                    self.last()
                ),
            });
        }
        if let Some(e) = ents.iter().find(|e| e.encoded_len() > MAX_RECORD) {
            // Recovery would take such a record for a corrupt length.
            return Err(LogError::Invalid {
                field: "entries",
                reason: format!(
                    "entry {} is {} bytes, at most {MAX_RECORD}",
                    e.index,
                    e.encoded_len()
                ),
            });
        }
        if ents.windows(2).any(|w| w[1].index != w[0].index + 1) {
            return Err(LogError::Invalid {
                field: "entries",
                reason: "not contiguous".into(),
            });
        }
        if first.index <= self.last() {
            let keep = (first.index - self.first()) as usize;
            let cut = self.offsets[keep];
            self.dir.truncate(LOG, cut)?;
            self.entries.truncate(keep);
            self.offsets.truncate(keep);
            self.log_len = cut;
        }
        let mut buf = Vec::new();
        for e in ents {
            self.offsets.push(self.log_len + buf.len() as u64);
            buf.extend_from_slice(&record(e));
            self.entries.push(e.clone());
        }
        self.dir.append(LOG, &buf)?;
        self.log_len += buf.len() as u64;
        Ok(())
    }

    /// Makes every append so far durable.
    pub fn sync(&mut self) -> Result<(), LogError> {
        self.dir.sync(LOG)?;
        Ok(())
    }

    /// Durably replaces the hard state. Call only after the entries it may
    /// commit are synced.
    pub fn set_hard_state(&mut self, hs: &HardState) -> Result<(), LogError> {
        if hs.commit > self.last() {
            return Err(LogError::Invalid {
                field: "hard_state.commit",
                reason: format!("{} is past the last entry {}", hs.commit, self.last()),
            });
        }
        if *hs != self.hard_state {
            self.dir
                .replace(RAFT_STATE, &encode_raft_state(hs, &self.conf_state))?;
            self.hard_state = hs.clone();
        }
        Ok(())
    }

    /// Installs a snapshot received from the leader: the snapshot file
    /// first, then the log keeps only what follows it, if it agrees.
    pub fn apply_snapshot(&mut self, snap: &Snapshot) -> Result<(), LogError> {
        let meta = snap.get_metadata();
        if meta.index < self.first() {
            return Err(LogError::Invalid {
                field: "snapshot.index",
                reason: format!(
                    "{} is older than the log start {}",
                    meta.index,
                    self.first()
                ),
            });
        }
        let agrees = self.term_of(meta.index) == Some(meta.term);
        self.dir
            .replace(SNAPSHOT, &crc_wrap(&snap.encode_to_vec()))?;
        let keep_from = if agrees {
            (meta.index + 1 - self.first()) as usize
        } else {
            self.entries.len()
        };
        self.entries.drain(..keep_from.min(self.entries.len()));
        if !agrees {
            self.entries.clear();
        }
        self.snapshot = snap.clone();
        self.conf_state = meta.get_conf_state().clone();
        self.rewrite_log()?;
        let mut hs = self.hard_state.clone();
        hs.commit = hs.commit.max(meta.index);
        hs.term = hs.term.max(meta.term);
        self.dir
            .replace(RAFT_STATE, &encode_raft_state(&hs, &self.conf_state))?;
        self.hard_state = hs;
        Ok(())
    }

    /// Takes a snapshot of the state machine as of `index` (which the caller
    /// has applied) and compacts the log up to it.
    pub fn compact(&mut self, index: u64, data: Vec<u8>) -> Result<(), LogError> {
        if index < self.first() || index > self.hard_state.commit {
            return Err(LogError::Invalid {
                field: "index",
                reason: format!(
                    "{index} is not in the committed log [{}, {}]",
                    self.first(),
                    self.hard_state.commit
                ),
            });
        }
        let term = self.term_of(index).expect("index is in the log");
        let snap = Snapshot {
            data,
            metadata: Some(SnapshotMetadata {
                index,
                term,
                conf_state: Some(self.conf_state.clone()),
            }),
        };
        self.dir
            .replace(SNAPSHOT, &crc_wrap(&snap.encode_to_vec()))?;
        let drop = (index + 1 - self.first()) as usize;
        self.entries.drain(..drop);
        self.snapshot = snap;
        self.rewrite_log()
    }

    fn rewrite_log(&mut self) -> Result<(), LogError> {
        let mut buf = Vec::new();
        self.offsets.clear();
        for e in &self.entries {
            self.offsets.push(buf.len() as u64);
            buf.extend_from_slice(&record(e));
        }
        self.dir.replace(LOG, &buf)?;
        self.log_len = buf.len() as u64;
        Ok(())
    }

    fn term_of(&self, idx: u64) -> Option<u64> {
        let meta = self.snapshot.get_metadata();
        if idx == meta.index {
            return Some(meta.term);
        }
        if idx < self.first() || idx > self.last() {
            return None;
        }
        Some(self.entries[(idx - self.first()) as usize].term)
    }

    /// The entries after the snapshot, for checks and tests.
    pub fn entries_after_snapshot(&self) -> &[Entry] {
        &self.entries
    }
}

impl<D: Dir> Storage for DiskLog<D> {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState::new(
            self.hard_state.clone(),
            self.conf_state.clone(),
        ))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        if low < self.first() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > self.last() + 1 || low > high {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let lo = (low - self.first()) as usize;
        let hi = (high - self.first()) as usize;
        let mut ents = self.entries[lo..hi].to_vec();
        raft::util::limit_size(&mut ents, max_size.into());
        Ok(ents)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        if idx < self.snapshot.get_metadata().index {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        self.term_of(idx)
            .ok_or(raft::Error::Store(StorageError::Unavailable))
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.first())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.last())
    }

    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        if self.snapshot.get_metadata().index < request_index {
            return Err(raft::Error::Store(
                StorageError::SnapshotTemporarilyUnavailable,
            ));
        }
        Ok(self.snapshot.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::{MemDir, OsDir};
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    fn ent(index: u64, term: u64) -> Entry {
        Entry {
            index,
            term,
            data: format!("cmd-{index}-{term}").into_bytes(),
            ..Default::default()
        }
    }

    fn hs(term: u64, commit: u64) -> HardState {
        HardState {
            term,
            vote: 1,
            commit,
        }
    }

    fn indices_terms<D: Dir>(s: &DiskLog<D>) -> Vec<(u64, u64)> {
        s.entries_after_snapshot()
            .iter()
            .map(|e| (e.index, e.term))
            .collect()
    }

    #[test]
    fn reopen_after_append_on_a_real_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let mut s = DiskLog::bootstrap(OsDir::open(tmp.path()).unwrap(), &[1, 2, 3], b"g".to_vec())
            .unwrap();
        s.append(&[ent(1, 1), ent(2, 1), ent(3, 2)]).unwrap();
        s.sync().unwrap();
        s.set_hard_state(&hs(2, 3)).unwrap();
        drop(s);
        let s = DiskLog::open(OsDir::open(tmp.path()).unwrap()).unwrap();
        assert_eq!(indices_terms(&s), vec![(1, 1), (2, 1), (3, 2)]);
        assert_eq!(s.hard_state(), &hs(2, 3));
        assert_eq!(s.conf_state().voters, vec![1, 2, 3]);
        assert_eq!(s.latest_snapshot().data, b"g".to_vec());
        assert_eq!(
            s.entries(2, 4, None::<u64>, GetEntriesContext::empty(false))
                .unwrap()[1]
                .data,
            b"cmd-3-2".to_vec()
        );
        assert_eq!(s.recovery(), &Recovery::default());
    }

    #[test]
    fn unsynced_appends_are_lost_or_torn_and_recovery_cuts_the_tail() {
        for seed in 0..32 {
            let dir = MemDir::new();
            let mut s = DiskLog::bootstrap(dir.clone(), &[1], vec![]).unwrap();
            s.append(&[ent(1, 1), ent(2, 1)]).unwrap();
            s.sync().unwrap();
            s.set_hard_state(&hs(1, 2)).unwrap();
            s.append(&[ent(3, 1), ent(4, 1)]).unwrap();
            drop(s);
            dir.crash(&mut ChaCha8Rng::seed_from_u64(seed));
            let mut s = DiskLog::open(dir.clone()).unwrap();
            let got = indices_terms(&s);
            assert!(got.len() >= 2 && got.len() <= 4, "seed {seed}: {got:?}");
            assert_eq!(&got[..2], &[(1, 1), (2, 1)]);
            // After recovery the file ends on a record boundary: appending
            // continues the log and survives another reopen.
            let next = got.len() as u64 + 1;
            s.append(&[ent(next, 2)]).unwrap();
            s.sync().unwrap();
            drop(s);
            let s = DiskLog::open(dir).unwrap();
            assert_eq!(s.entries_after_snapshot().last().unwrap().index, next);
            assert_eq!(s.recovery().truncated_bytes, 0);
        }
    }

    #[test]
    fn a_corrupt_tail_record_is_truncated() {
        let dir = MemDir::new();
        let mut s = DiskLog::bootstrap(dir.clone(), &[1], vec![]).unwrap();
        s.append(&[ent(1, 1), ent(2, 1), ent(3, 1)]).unwrap();
        s.sync().unwrap();
        s.set_hard_state(&hs(1, 2)).unwrap();
        let off3 = s.offsets[2] as usize;
        drop(s);
        dir.corrupt(LOG, off3 + RECORD_HEADER + 1);
        let s = DiskLog::open(dir.clone()).unwrap();
        assert_eq!(indices_terms(&s), vec![(1, 1), (2, 1)]);
        assert!(s.recovery().truncated_bytes > 0);
        assert_eq!(dir.read(LOG).unwrap().unwrap().len(), off3);
    }

    #[test]
    fn losing_a_committed_entry_refuses_to_start() {
        let dir = MemDir::new();
        let mut s = DiskLog::bootstrap(dir.clone(), &[1], vec![]).unwrap();
        s.append(&[ent(1, 1), ent(2, 1)]).unwrap();
        s.sync().unwrap();
        s.set_hard_state(&hs(1, 2)).unwrap();
        let off2 = s.offsets[1] as usize;
        drop(s);
        dir.corrupt(LOG, off2 + 2);
        let err = DiskLog::open(dir).err().expect("must refuse");
        assert!(matches!(err, LogError::Corrupt { file: LOG, .. }), "{err}");
    }

    #[test]
    fn a_conflicting_suffix_is_replaced_durably() {
        let dir = MemDir::new();
        let mut s = DiskLog::bootstrap(dir.clone(), &[1], vec![]).unwrap();
        s.append(&[ent(1, 1), ent(2, 1), ent(3, 1), ent(4, 1)])
            .unwrap();
        s.sync().unwrap();
        s.append(&[ent(3, 2), ent(4, 2), ent(5, 2)]).unwrap();
        s.sync().unwrap();
        assert_eq!(
            indices_terms(&s),
            vec![(1, 1), (2, 1), (3, 2), (4, 2), (5, 2)]
        );
        drop(s);
        dir.crash(&mut ChaCha8Rng::seed_from_u64(3));
        let s = DiskLog::open(dir).unwrap();
        assert_eq!(
            indices_terms(&s),
            vec![(1, 1), (2, 1), (3, 2), (4, 2), (5, 2)]
        );
        assert_eq!(s.term(3).unwrap(), 2);
    }

    #[test]
    fn appends_outside_the_log_are_errors_not_panics() {
        let mut s = DiskLog::bootstrap(MemDir::new(), &[1], vec![]).unwrap();
        assert!(matches!(
            s.append(&[ent(2, 1)]),
            Err(LogError::Invalid {
                field: "entries",
                ..
            })
        ));
        assert!(matches!(
            s.append(&[ent(1, 1), ent(3, 1)]),
            Err(LogError::Invalid { .. })
        ));
        assert!(s.set_hard_state(&hs(1, 1)).is_err());
        assert!(
            s.entries(1, 5, None::<u64>, GetEntriesContext::empty(false))
                .is_err()
        );
        assert!(DiskLog::bootstrap(MemDir::new(), &[0], vec![]).is_err());
    }

    #[test]
    fn compaction_and_snapshot_restore() {
        let dir = MemDir::new();
        let mut s = DiskLog::bootstrap(dir.clone(), &[1, 2], vec![]).unwrap();
        s.append(&(1..=6).map(|i| ent(i, 1)).collect::<Vec<_>>())
            .unwrap();
        s.sync().unwrap();
        s.set_hard_state(&hs(1, 5)).unwrap();
        s.compact(4, b"state@4".to_vec()).unwrap();
        assert_eq!(s.first_index().unwrap(), 5);
        assert_eq!(s.term(4).unwrap(), 1);
        assert!(matches!(
            s.term(3),
            Err(raft::Error::Store(StorageError::Compacted))
        ));
        assert!(matches!(
            s.entries(3, 5, None::<u64>, GetEntriesContext::empty(false)),
            Err(raft::Error::Store(StorageError::Compacted))
        ));
        drop(s);
        let s = DiskLog::open(dir.clone()).unwrap();
        assert_eq!(indices_terms(&s), vec![(5, 1), (6, 1)]);
        assert_eq!(s.latest_snapshot().data, b"state@4".to_vec());
        assert_eq!(s.snapshot(4, 2).unwrap().get_metadata().index, 4);

        // A snapshot from a leader of a newer term replaces the whole log,
        // which disagrees with it.
        let mut s = s;
        let snap = Snapshot {
            data: b"leader@8".to_vec(),
            metadata: Some(SnapshotMetadata {
                index: 8,
                term: 3,
                conf_state: Some(ConfState {
                    voters: vec![1, 2],
                    ..Default::default()
                }),
            }),
        };
        s.apply_snapshot(&snap).unwrap();
        assert_eq!(s.first_index().unwrap(), 9);
        assert_eq!(s.last_index().unwrap(), 8);
        s.append(&[ent(9, 3)]).unwrap();
        s.sync().unwrap();
        drop(s);
        let s = DiskLog::open(dir).unwrap();
        assert_eq!(indices_terms(&s), vec![(9, 3)]);
        assert_eq!(s.hard_state().commit, 8);
        assert_eq!(s.latest_snapshot().data, b"leader@8".to_vec());
    }

    #[test]
    fn a_log_left_behind_by_a_lost_compaction_is_dropped_on_recovery() {
        // Snapshot written, then the crash hit before the log was rewritten:
        // model it by writing a snapshot file over a longer, older log.
        let dir = MemDir::new();
        let mut s = DiskLog::bootstrap(dir.clone(), &[1], vec![]).unwrap();
        s.append(&(1..=4).map(|i| ent(i, 1)).collect::<Vec<_>>())
            .unwrap();
        s.sync().unwrap();
        s.set_hard_state(&hs(1, 4)).unwrap();
        let old_log = dir.read(LOG).unwrap().unwrap();
        s.compact(2, b"s".to_vec()).unwrap();
        drop(s);
        let mut d = dir.clone();
        d.replace(LOG, &old_log).unwrap();
        let s = DiskLog::open(dir).unwrap();
        assert_eq!(indices_terms(&s), vec![(3, 1), (4, 1)]);
        assert_eq!(s.recovery().dropped_entries, 2);
    }
}
