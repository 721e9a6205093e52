//! Identify data structures (NVMe Base 2.0, "Identify Command"), encoded to
//! the 4096-byte little-endian layout the host reads.
//!
//! Field names follow the specification; byte offsets are the ones of Linux
//! `struct nvme_id_ctrl` / `struct nvme_id_ns`, which mirror the spec figures.

/// Every Identify data structure is one 4 KiB page.
pub const IDENTIFY_DATA_SIZE: usize = 4096;

/// Identify CNS values (CDW10 bits 7:0).
pub mod cns {
    pub const NAMESPACE: u8 = 0x00;
    pub const CONTROLLER: u8 = 0x01;
    pub const ACTIVE_NS_LIST: u8 = 0x02;
    pub const NS_ID_DESCRIPTOR_LIST: u8 = 0x03;
    pub const CSI_CONTROLLER: u8 = 0x06;
    pub const CS_INDEPENDENT_NAMESPACE: u8 = 0x08;
}

/// Command Set Identifier of the NVM Command Set.
pub const CSI_NVM: u8 = 0x00;

/// Controller types (CNTRLTYPE).
pub const CNTRLTYPE_IO: u8 = 1;
pub const CNTRLTYPE_DISCOVERY: u8 = 2;

/// Copies `s` into `dst` as the spec's ASCII string fields want it: printable
/// ASCII only, left-justified, padded with spaces.
pub fn put_ascii_padded(dst: &mut [u8], s: &str) {
    dst.fill(b' ');
    for (d, c) in dst.iter_mut().zip(s.bytes()) {
        *d = if (0x20..0x7f).contains(&c) { c } else { b'_' };
    }
}

/// Copies an NQN into a fixed NUL-padded field, truncated to leave a NUL.
pub fn put_nqn(dst: &mut [u8], nqn: &str) {
    dst.fill(0);
    let n = nqn.len().min(dst.len().saturating_sub(1));
    dst[..n].copy_from_slice(&nqn.as_bytes()[..n]);
}

fn put16(b: &mut [u8], off: usize, v: u16) {
    b[off..off + 2].copy_from_slice(&v.to_le_bytes());
}
fn put32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}
fn put64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

/// Identify Controller data structure (CNS 01h). Only the fields a fabrics
/// target reports are modelled; everything else encodes as zero.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IdentifyController {
    pub vid: u16,
    pub ssvid: u16,
    pub sn: String,
    pub mn: String,
    pub fr: String,
    pub rab: u8,
    pub cmic: u8,
    pub mdts: u8,
    pub cntlid: u16,
    pub ver: u32,
    pub oaes: u32,
    pub ctratt: u32,
    pub cntrltype: u8,
    pub oacs: u16,
    pub acl: u8,
    pub aerl: u8,
    pub frmw: u8,
    pub lpa: u8,
    pub elpe: u8,
    pub wctemp: u16,
    pub cctemp: u16,
    pub kas: u16,
    pub anatt: u8,
    pub anacap: u8,
    pub anagrpmax: u32,
    pub nanagrpid: u32,
    pub sqes: u8,
    pub cqes: u8,
    pub maxcmd: u16,
    pub nn: u32,
    pub oncs: u16,
    pub vwc: u8,
    pub awupf: u16,
    pub sgls: u32,
    pub mnan: u32,
    pub subnqn: String,
    pub ioccsz: u32,
    pub iorcsz: u32,
    pub icdoff: u16,
    pub fcatt: u8,
    pub msdbd: u8,
    /// Power State 0 Maximum Power (centiwatts).
    pub psd0_mp: u16,
}

impl IdentifyController {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; IDENTIFY_DATA_SIZE];
        put16(&mut b, 0, self.vid);
        put16(&mut b, 2, self.ssvid);
        put_ascii_padded(&mut b[4..24], &self.sn);
        put_ascii_padded(&mut b[24..64], &self.mn);
        put_ascii_padded(&mut b[64..72], &self.fr);
        b[72] = self.rab;
        b[76] = self.cmic;
        b[77] = self.mdts;
        put16(&mut b, 78, self.cntlid);
        put32(&mut b, 80, self.ver);
        put32(&mut b, 92, self.oaes);
        put32(&mut b, 96, self.ctratt);
        b[111] = self.cntrltype;
        put16(&mut b, 256, self.oacs);
        b[258] = self.acl;
        b[259] = self.aerl;
        b[260] = self.frmw;
        b[261] = self.lpa;
        b[262] = self.elpe;
        put16(&mut b, 266, self.wctemp);
        put16(&mut b, 268, self.cctemp);
        put16(&mut b, 320, self.kas);
        b[342] = self.anatt;
        b[343] = self.anacap;
        put32(&mut b, 344, self.anagrpmax);
        put32(&mut b, 348, self.nanagrpid);
        b[512] = self.sqes;
        b[513] = self.cqes;
        put16(&mut b, 514, self.maxcmd);
        put32(&mut b, 516, self.nn);
        put16(&mut b, 520, self.oncs);
        b[525] = self.vwc;
        put16(&mut b, 528, self.awupf);
        put32(&mut b, 536, self.sgls);
        put32(&mut b, 540, self.mnan);
        put_nqn(&mut b[768..1024], &self.subnqn);
        put32(&mut b, 1792, self.ioccsz);
        put32(&mut b, 1796, self.iorcsz);
        put16(&mut b, 1800, self.icdoff);
        b[1802] = self.fcatt;
        b[1803] = self.msdbd;
        put16(&mut b, 2048, self.psd0_mp);
        b
    }
}

/// Identify Namespace data structure (CNS 00h) for a namespace with a single
/// LBA format and no metadata.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IdentifyNamespace {
    pub nsze: u64,
    pub ncap: u64,
    pub nuse: u64,
    pub nsfeat: u8,
    pub nlbaf: u8,
    pub flbas: u8,
    pub nmic: u8,
    pub dlfeat: u8,
    pub anagrpid: u32,
    pub nguid: [u8; 16],
    pub eui64: [u8; 8],
    /// LBA Format 0 LBA Data Size, as a power of two.
    pub lbaf0_lbads: u8,
}

impl IdentifyNamespace {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; IDENTIFY_DATA_SIZE];
        put64(&mut b, 0, self.nsze);
        put64(&mut b, 8, self.ncap);
        put64(&mut b, 16, self.nuse);
        b[24] = self.nsfeat;
        b[25] = self.nlbaf;
        b[26] = self.flbas;
        b[30] = self.nmic;
        b[33] = self.dlfeat;
        put32(&mut b, 92, self.anagrpid);
        b[104..120].copy_from_slice(&self.nguid);
        b[120..128].copy_from_slice(&self.eui64);
        // LBAF0: MS (bytes 1:0) = 0, LBADS (byte 2), RP (byte 3) = 0 (best).
        b[130] = self.lbaf0_lbads;
        b
    }
}

/// Namespace Identifier Type (NIDT) of a Namespace Identification Descriptor.
pub mod nidt {
    pub const EUI64: u8 = 0x01;
    pub const NGUID: u8 = 0x02;
    pub const UUID: u8 = 0x03;
    pub const CSI: u8 = 0x04;
}

/// Namespace Identification Descriptor list (CNS 03h). All-zero identifiers
/// are omitted: the spec reserves zero as "not reported". The CSI
/// descriptor is always present so a CSI-aware host finds the NVM command set.
pub fn ns_id_descriptor_list(eui64: &[u8; 8], nguid: &[u8; 16], uuid: &[u8; 16]) -> Vec<u8> {
    let mut b = Vec::with_capacity(IDENTIFY_DATA_SIZE);
    let mut desc = |t: u8, id: &[u8]| {
        if id.iter().any(|&x| x != 0) || t == nidt::CSI {
            // NIDT, NIDL, 2 reserved bytes, then NID.
            b.extend_from_slice(&[t, id.len() as u8, 0, 0]);
            b.extend_from_slice(id);
        }
    };
    desc(nidt::EUI64, eui64);
    desc(nidt::NGUID, nguid);
    desc(nidt::UUID, uuid);
    desc(nidt::CSI, &[CSI_NVM]);
    b.resize(IDENTIFY_DATA_SIZE, 0);
    b
}

/// Active Namespace ID list (CNS 02h): up to 1024 NSIDs greater than `after`,
/// ascending, zero-terminated.
pub fn active_ns_list(sorted_nsids: impl IntoIterator<Item = u32>, after: u32) -> Vec<u8> {
    let mut b = vec![0u8; IDENTIFY_DATA_SIZE];
    for (i, nsid) in sorted_nsids
        .into_iter()
        .filter(|&n| n > after)
        .take(IDENTIFY_DATA_SIZE / 4)
        .enumerate()
    {
        put32(&mut b, i * 4, nsid);
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ascii_fields_are_space_padded_and_sanitised() {
        let mut f = [0u8; 8];
        put_ascii_padded(&mut f, "ab\u{e9}");
        assert_eq!(&f, b"ab__    ");
        put_ascii_padded(&mut f, "0123456789");
        assert_eq!(&f, b"01234567");
    }

    #[test]
    fn nqn_field_keeps_a_terminating_nul() {
        let mut f = [0xffu8; 4];
        put_nqn(&mut f, "abcdef");
        assert_eq!(&f, b"abc\0");
    }

    #[test]
    fn descriptor_list_skips_zero_ids_and_ends_with_csi() {
        let b = ns_id_descriptor_list(&[0; 8], &[7; 16], &[0; 16]);
        assert_eq!(&b[0..4], &[nidt::NGUID, 16, 0, 0]);
        assert_eq!(&b[4..20], &[7; 16]);
        assert_eq!(&b[20..25], &[nidt::CSI, 1, 0, 0, CSI_NVM]);
        assert!(b[25..].iter().all(|&x| x == 0));
        assert_eq!(b.len(), IDENTIFY_DATA_SIZE);
    }

    #[test]
    fn active_list_starts_after_nsid() {
        let b = active_ns_list([1, 2, 5], 1);
        assert_eq!(&b[0..12], &[2, 0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0]);
        let b = active_ns_list(1..=5000, 0);
        assert_eq!(u32::from_le_bytes(b[4092..4096].try_into().unwrap()), 1024);
    }
}

/// Limits reported in the I/O Command Set specific Identify Controller data
/// structure for the NVM command set (CNS 06h, CSI 00h).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NvmLimits {
    /// Write Zeroes Size Limit: 2^n units of CAP.MPSMIN (0 = no limit).
    pub wzsl: u8,
    /// Dataset Management Ranges Limit (0 = no limit).
    pub dmrl: u8,
    /// Dataset Management Range Size Limit, in logical blocks.
    pub dmrsl: u32,
    /// Dataset Management Size Limit (all ranges), in logical blocks.
    pub dmsl: u64,
}

impl NvmLimits {
    /// What this target advertises and enforces: 256 ranges, 2^18 blocks per
    /// range and per command (128 MiB at 512-byte blocks, 1 GiB at 4 KiB:
    /// at most 1,024 objects of 1 MiB per Deallocate), Write Zeroes up to
    /// 2^13 × 4 KiB = 32 MiB, which is also what a 16-bit NLB can say at
    /// 512-byte blocks.
    pub const TARGET: NvmLimits = NvmLimits {
        wzsl: 13,
        dmrl: 0xff,
        dmrsl: 1 << 18,
        dmsl: 1 << 18,
    };

    /// Largest Write Zeroes in bytes.
    pub fn write_zeroes_bytes(&self) -> u64 {
        4096u64 << self.wzsl
    }
}

/// Identify Controller, NVM command set specific (NVM Command Set 4.1.5.4).
pub fn nvm_controller(l: &NvmLimits) -> Vec<u8> {
    let mut b = vec![0u8; IDENTIFY_DATA_SIZE];
    b[1] = l.wzsl;
    b[3] = l.dmrl;
    b[4..8].copy_from_slice(&l.dmrsl.to_le_bytes());
    b[8..16].copy_from_slice(&l.dmsl.to_le_bytes());
    b
}
