//! Verify mode: every written sector carries a self-describing header.
//!
//! Sector layout (one header per logical block, so a write torn at any
//! sector boundary is visible):
//!
//! | bytes  | field                                              |
//! |--------|----------------------------------------------------|
//! | 0..8   | magic `STRATAVB`                                   |
//! | 8..16  | LBA the sector was written to                      |
//! | 16..20 | write generation of the block                      |
//! | 20..24 | run seed                                           |
//! | 24..28 | first LBA of the write the sector belonged to      |
//! | 28..32 | CRC32C of the sector with this field taken out     |
//! | 32..   | pseudo-random fill derived from (seed, LBA, gen)   |
//!
//! What each check catches:
//! * CRC mismatch: bytes changed after the write (bit rot, flipped bytes).
//! * header LBA ≠ read LBA: a misdirected write (data landed elsewhere).
//! * generation lower than the last acknowledged write, or a block we wrote
//!   that reads as never written: a lost write.
//! * sectors of one write disagreeing on generation or write LBA: torn.

use serde::{Deserialize, Serialize};
use strata_target::pdu::{crc32c, crc32c_append};

pub const MAGIC: &[u8; 8] = b"STRATAVB";
pub const HDR_LEN: usize = 32;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// Content does not match its own checksum.
    Corrupt,
    /// Sector holds data written for another LBA.
    Misdirected,
    /// An acknowledged write is not there (old generation or never written).
    Lost,
    /// Sectors of one write come from different writes.
    Torn,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyError {
    pub kind: ErrorKind,
    /// LBA of the first bad sector.
    pub lba: u64,
    pub expected_gen: Option<u32>,
    pub found_gen: Option<u32>,
    pub detail: String,
}

impl std::fmt::Display for VerifyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?} at LBA {}: {}", self.kind, self.lba, self.detail)
    }
}

fn mix(mut x: u64) -> u64 {
    // splitmix64 finaliser: cheap and well spread.
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

fn sector_crc(s: &[u8]) -> u32 {
    crc32c_append(crc32c(&s[..28]), &s[32..])
}

/// Fills `buf` (a whole write of `buf.len() / sector` sectors starting at
/// `slba`) with stamped sectors of generation `gen`.
pub fn stamp(buf: &mut [u8], sector: usize, slba: u64, generation: u32, seed: u32) {
    for (i, s) in buf.chunks_exact_mut(sector).enumerate() {
        let lba = slba + i as u64;
        s[..8].copy_from_slice(MAGIC);
        s[8..16].copy_from_slice(&lba.to_le_bytes());
        s[16..20].copy_from_slice(&generation.to_le_bytes());
        s[20..24].copy_from_slice(&seed.to_le_bytes());
        s[24..28].copy_from_slice(&(slba as u32).to_le_bytes());
        let mut x = mix(u64::from(seed) << 32 ^ lba ^ u64::from(generation) << 48);
        for w in s[HDR_LEN..].chunks_exact_mut(8) {
            x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
            w.copy_from_slice(&mix(x).to_le_bytes());
        }
        let c = sector_crc(s);
        s[28..32].copy_from_slice(&c.to_le_bytes());
    }
}

/// Checks data read from `slba`. `expected` is the generation of the last
/// acknowledged write of this block in this run (None: not written by us,
/// so only self-consistency can be checked). Returns the first problem.
pub fn check(
    buf: &[u8],
    sector: usize,
    slba: u64,
    expected: Option<u32>,
    seed: u32,
) -> Option<VerifyError> {
    let err = |kind, lba, found_gen, detail: String| {
        Some(VerifyError {
            kind,
            lba,
            expected_gen: expected,
            found_gen,
            detail,
        })
    };
    let mut first: Option<(u32, u32)> = None;
    for (i, s) in buf.chunks_exact(sector).enumerate() {
        let lba = slba + i as u64;
        if &s[..8] != MAGIC {
            if s.iter().all(|&b| b == 0) {
                match expected {
                    Some(g) => {
                        return err(
                            ErrorKind::Lost,
                            lba,
                            None,
                            format!("reads as never written, expected generation {g}"),
                        );
                    }
                    None => continue,
                }
            }
            return err(
                ErrorKind::Corrupt,
                lba,
                None,
                "verify header missing".into(),
            );
        }
        let crc = u32::from_le_bytes(s[28..32].try_into().expect("4"));
        if crc != sector_crc(s) {
            return err(
                ErrorKind::Corrupt,
                lba,
                None,
                format!(
                    "checksum mismatch (stored {crc:#010x}, computed {:#010x})",
                    sector_crc(s)
                ),
            );
        }
        let hlba = u64::from_le_bytes(s[8..16].try_into().expect("8"));
        let generation = u32::from_le_bytes(s[16..20].try_into().expect("4"));
        let hseed = u32::from_le_bytes(s[20..24].try_into().expect("4"));
        let wlba = u32::from_le_bytes(s[24..28].try_into().expect("4"));
        if hlba != lba {
            return err(
                ErrorKind::Misdirected,
                lba,
                Some(generation),
                format!("holds data written for LBA {hlba}"),
            );
        }
        if let Some((g0, w0)) = first {
            if (generation, wlba) != (g0, w0) {
                return err(
                    ErrorKind::Torn,
                    lba,
                    Some(generation),
                    format!(
                        "generation {generation} (write at {wlba}) while the block's first sector has {g0} (write at {w0})"
                    ),
                );
            }
        } else {
            first = Some((generation, wlba));
        }
        if let Some(e) = expected {
            if hseed != seed {
                return err(
                    ErrorKind::Lost,
                    lba,
                    Some(generation),
                    format!("data from another run (seed {hseed:#x}), expected generation {e}"),
                );
            }
            if generation < e {
                return err(
                    ErrorKind::Lost,
                    lba,
                    Some(generation),
                    format!("generation {generation}, expected {e}"),
                );
            }
            if generation > e {
                return err(
                    ErrorKind::Corrupt,
                    lba,
                    Some(generation),
                    format!("generation {generation} newer than any acknowledged ({e})"),
                );
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamped_block_checks_clean() {
        let mut b = vec![0u8; 4096];
        stamp(&mut b, 512, 80, 3, 7);
        assert_eq!(check(&b, 512, 80, Some(3), 7), None);
        assert_eq!(check(&b, 512, 80, None, 99), None);
    }

    #[test]
    fn each_fault_is_named_with_its_lba() {
        let mut b = vec![0u8; 4096];
        stamp(&mut b, 512, 80, 3, 7);
        let mut c = b.clone();
        c[3 * 512 + 100] ^= 1;
        let e = check(&c, 512, 80, Some(3), 7).unwrap();
        assert_eq!((e.kind, e.lba), (ErrorKind::Corrupt, 83));

        let e = check(&b, 512, 88, Some(3), 7).unwrap();
        assert_eq!((e.kind, e.lba), (ErrorKind::Misdirected, 88));

        let e = check(&b, 512, 80, Some(4), 7).unwrap();
        assert_eq!((e.kind, e.lba), (ErrorKind::Lost, 80));

        let e = check(&vec![0u8; 4096], 512, 80, Some(1), 7).unwrap();
        assert_eq!(e.kind, ErrorKind::Lost);
        assert_eq!(check(&vec![0u8; 4096], 512, 80, None, 7), None);

        let mut old = vec![0u8; 4096];
        stamp(&mut old, 512, 80, 2, 7);
        let mut torn = b.clone();
        torn[2048..].copy_from_slice(&old[2048..]);
        let e = check(&torn, 512, 80, Some(3), 7).unwrap();
        assert_eq!((e.kind, e.lba), (ErrorKind::Torn, 84));
    }
}
