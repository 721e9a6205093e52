//! The file-system seam under the log store. A [`Dir`] is one directory of
//! named files with exactly the durability operations the log store relies
//! on, so the simulator can run the real store over [`MemDir`], a disk that
//! keeps "written" and "durable" apart and loses (or tears) what was not
//! synced when the simulated machine crashes.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rand::Rng;

pub trait Dir {
    /// The file's whole content; `None` if it does not exist.
    fn read(&self, name: &str) -> io::Result<Option<Vec<u8>>>;
    /// Appends, creating the file. Not durable until [`Dir::sync`].
    fn append(&mut self, name: &str, data: &[u8]) -> io::Result<()>;
    /// Cuts the file to `len` bytes. Not durable until [`Dir::sync`].
    fn truncate(&mut self, name: &str, len: u64) -> io::Result<()>;
    /// Makes everything written to `name` so far durable, including its
    /// directory entry if the file is new.
    fn sync(&mut self, name: &str) -> io::Result<()>;
    /// Replaces the file with `data` atomically and durably: after a crash
    /// the file holds either the old content or `data`, never a mix.
    fn replace(&mut self, name: &str, data: &[u8]) -> io::Result<()>;
}

/// A real directory. `replace` is write-to-temp, fsync, rename, fsync dir.
pub struct OsDir {
    root: PathBuf,
    /// Files created since the directory was last synced.
    unsynced_entries: BTreeSet<String>,
}

impl OsDir {
    pub fn open(root: impl AsRef<Path>) -> io::Result<OsDir> {
        fs::create_dir_all(root.as_ref())?;
        Ok(OsDir {
            root: root.as_ref().to_path_buf(),
            unsynced_entries: BTreeSet::new(),
        })
    }

    fn sync_dir(&self) -> io::Result<()> {
        File::open(&self.root)?.sync_all()
    }
}

impl Dir for OsDir {
    fn read(&self, name: &str) -> io::Result<Option<Vec<u8>>> {
        match fs::read(self.root.join(name)) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn append(&mut self, name: &str, data: &[u8]) -> io::Result<()> {
        let path = self.root.join(name);
        if !path.exists() {
            self.unsynced_entries.insert(name.to_owned());
        }
        let mut f = OpenOptions::new().create(true).append(true).open(path)?;
        f.write_all(data)
    }

    fn truncate(&mut self, name: &str, len: u64) -> io::Result<()> {
        OpenOptions::new()
            .write(true)
            .open(self.root.join(name))?
            .set_len(len)
    }

    fn sync(&mut self, name: &str) -> io::Result<()> {
        let path = self.root.join(name);
        if path.exists() {
            File::open(&path)?.sync_data()?;
        }
        if self.unsynced_entries.remove(name) {
            self.sync_dir()?;
        }
        Ok(())
    }

    fn replace(&mut self, name: &str, data: &[u8]) -> io::Result<()> {
        let tmp = self.root.join(format!("{name}.tmp"));
        {
            let mut f = File::create(&tmp)?;
            f.write_all(data)?;
            f.sync_all()?;
        }
        fs::rename(&tmp, self.root.join(name))?;
        self.unsynced_entries.remove(name);
        self.sync_dir()
    }
}

#[derive(Default, Clone)]
struct MemFile {
    durable: Vec<u8>,
    current: Vec<u8>,
}

/// The simulator's disk: a handle (clones share the files) that survives
/// the node using it, as a real disk survives its machine.
#[derive(Default, Clone)]
pub struct MemDir {
    files: Arc<Mutex<BTreeMap<String, MemFile>>>,
}

impl MemDir {
    pub fn new() -> MemDir {
        MemDir::default()
    }

    fn files(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, MemFile>> {
        // A panic while holding the lock is a test failure already; the
        // data is still consistent enough to report it.
        self.files.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The machine lost power: every file goes back to its durable content.
    /// Bytes appended since the last sync survive only as a prefix of
    /// random length (a torn write), as on a disk that wrote some sectors of
    /// the page cache; a truncation not yet synced is undone.
    pub fn crash(&self, rng: &mut impl Rng) {
        for f in self.files().values_mut() {
            let appended_only =
                f.current.len() > f.durable.len() && f.current.starts_with(&f.durable);
            if appended_only {
                let kept = rng.gen_range(0..=f.current.len() - f.durable.len());
                f.current.truncate(f.durable.len() + kept);
            } else {
                f.current = f.durable.clone();
            }
            f.durable = f.current.clone();
        }
    }

    /// Bytes written but not yet synced, over all files.
    pub fn unsynced_bytes(&self) -> usize {
        self.files()
            .values()
            .map(|f| {
                if f.current.starts_with(&f.durable) {
                    f.current.len() - f.durable.len()
                } else {
                    f.current.len().max(1)
                }
            })
            .sum()
    }

    /// Overwrites one byte of a file's durable and current content, for
    /// corruption tests.
    pub fn corrupt(&self, name: &str, offset: usize) {
        if let Some(f) = self.files().get_mut(name) {
            for b in [&mut f.durable, &mut f.current] {
                if let Some(x) = b.get_mut(offset) {
                    *x ^= 0x5a;
                }
            }
        }
    }
}

impl Dir for MemDir {
    fn read(&self, name: &str) -> io::Result<Option<Vec<u8>>> {
        Ok(self.files().get(name).map(|f| f.current.clone()))
    }

    fn append(&mut self, name: &str, data: &[u8]) -> io::Result<()> {
        self.files()
            .entry(name.to_owned())
            .or_default()
            .current
            .extend_from_slice(data);
        Ok(())
    }

    fn truncate(&mut self, name: &str, len: u64) -> io::Result<()> {
        let mut files = self.files();
        let f = files
            .get_mut(name)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, name.to_owned()))?;
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        f.current.truncate(len);
        Ok(())
    }

    fn sync(&mut self, name: &str) -> io::Result<()> {
        if let Some(f) = self.files().get_mut(name) {
            f.durable = f.current.clone();
        }
        Ok(())
    }

    fn replace(&mut self, name: &str, data: &[u8]) -> io::Result<()> {
        let mut files = self.files();
        let f = files.entry(name.to_owned()).or_default();
        f.durable = data.to_vec();
        f.current = data.to_vec();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn a_crash_keeps_synced_bytes_and_at_most_a_prefix_of_the_rest() {
        let mut d = MemDir::new();
        d.append("f", b"durable").unwrap();
        d.sync("f").unwrap();
        d.append("f", b"-volatile").unwrap();
        d.replace("g", b"atomic").unwrap();
        d.crash(&mut ChaCha8Rng::seed_from_u64(7));
        let f = d.read("f").unwrap().unwrap();
        assert!(f.starts_with(b"durable"));
        assert!(b"durable-volatile".starts_with(&f));
        assert_eq!(d.read("g").unwrap().unwrap(), b"atomic");
        assert_eq!(d.unsynced_bytes(), 0);
    }

    #[test]
    fn an_unsynced_truncation_is_undone_by_a_crash() {
        let mut d = MemDir::new();
        d.append("f", b"0123456789").unwrap();
        d.sync("f").unwrap();
        d.truncate("f", 3).unwrap();
        d.append("f", b"abc").unwrap();
        d.crash(&mut ChaCha8Rng::seed_from_u64(1));
        assert_eq!(d.read("f").unwrap().unwrap(), b"0123456789");
    }

    #[test]
    fn os_dir_appends_truncates_and_replaces() {
        let tmp = tempfile::tempdir().unwrap();
        let mut d = OsDir::open(tmp.path()).unwrap();
        assert_eq!(d.read("f").unwrap(), None);
        d.append("f", b"hello").unwrap();
        d.append("f", b" world").unwrap();
        d.sync("f").unwrap();
        d.truncate("f", 5).unwrap();
        d.sync("f").unwrap();
        assert_eq!(d.read("f").unwrap().unwrap(), b"hello");
        d.replace("g", b"one").unwrap();
        d.replace("g", b"two").unwrap();
        assert_eq!(d.read("g").unwrap().unwrap(), b"two");
        assert!(!tmp.path().join("g.tmp").exists());
    }
}
