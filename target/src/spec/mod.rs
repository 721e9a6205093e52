//! NVMe structures as the NVMe Base and NVMe-oF specifications name them.
//!
//! Everything here is plain data with explicit little-endian encoding: no
//! `unsafe` transmutes, so a malformed buffer can only produce an error.

pub mod identify;
pub mod log;
mod status;

pub use status::*;

/// Submission Queue Entry (NVMe Base 4.2): 64 bytes, kept as raw bytes with
/// typed accessors so the capsule can be forwarded without re-encoding.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct NvmeCmd(pub [u8; 64]);

impl Default for NvmeCmd {
    fn default() -> Self {
        Self([0; 64])
    }
}

impl std::fmt::Debug for NvmeCmd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NvmeCmd")
            .field("opc", &format_args!("{:#04x}", self.opcode()))
            .field("cid", &self.cid())
            .field("nsid", &self.nsid())
            .field("cdw10", &format_args!("{:#x}", self.cdw10()))
            .finish()
    }
}

#[inline]
fn le32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

#[inline]
fn put32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}

impl NvmeCmd {
    pub fn from_slice(b: &[u8]) -> Option<Self> {
        Some(Self(b.get(..64)?.try_into().ok()?))
    }
    pub fn opcode(&self) -> u8 {
        self.0[0]
    }
    /// FUSE (bits 1:0) and PSDT (bits 7:6).
    pub fn flags(&self) -> u8 {
        self.0[1]
    }
    pub fn cid(&self) -> u16 {
        u16::from_le_bytes([self.0[2], self.0[3]])
    }
    pub fn nsid(&self) -> u32 {
        le32(&self.0, 4)
    }
    /// Fabrics commands carry FCTYPE where an admin command has NSID.
    pub fn fctype(&self) -> u8 {
        self.0[4]
    }
    pub fn cdw(&self, n: usize) -> u32 {
        le32(&self.0, n * 4)
    }
    pub fn cdw10(&self) -> u32 {
        self.cdw(10)
    }
    pub fn cdw11(&self) -> u32 {
        self.cdw(11)
    }
    pub fn cdw12(&self) -> u32 {
        self.cdw(12)
    }
    pub fn cdw13(&self) -> u32 {
        self.cdw(13)
    }
    pub fn cdw14(&self) -> u32 {
        self.cdw(14)
    }
    pub fn cdw15(&self) -> u32 {
        self.cdw(15)
    }
    /// Starting LBA of an NVM I/O command (CDW10/11).
    pub fn slba(&self) -> u64 {
        u64::from(self.cdw10()) | (u64::from(self.cdw11()) << 32)
    }
    /// Number of logical blocks, 0's based (CDW12 bits 15:0).
    pub fn nlb(&self) -> u32 {
        (self.cdw12() & 0xffff) + 1
    }
    /// Force Unit Access (CDW12 bit 30).
    pub fn fua(&self) -> bool {
        self.cdw12() & (1 << 30) != 0
    }
    pub fn sgl(&self) -> SglDescriptor {
        SglDescriptor::decode(self.0[24..40].try_into().unwrap())
    }
    pub fn set_opcode(&mut self, v: u8) {
        self.0[0] = v;
    }
    pub fn set_cid(&mut self, v: u16) {
        self.0[2..4].copy_from_slice(&v.to_le_bytes());
    }
    pub fn set_nsid(&mut self, v: u32) {
        put32(&mut self.0, 4, v);
    }
    pub fn set_cdw(&mut self, n: usize, v: u32) {
        put32(&mut self.0, n * 4, v);
    }
    pub fn set_sgl(&mut self, sgl: SglDescriptor) {
        self.0[24..40].copy_from_slice(&sgl.encode());
    }
}

/// SGL descriptor in DPTR. NVMe/TCP uses the Transport SGL Data Block
/// descriptor (type 5, subtype 0xA) for host-resident data and the Data Block
/// descriptor with subtype Offset (type 0, subtype 1) for in-capsule data.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SglDescriptor {
    pub addr: u64,
    pub len: u32,
    /// Byte 15: descriptor type (bits 7:4) and subtype (bits 3:0).
    pub id: u8,
}

pub const SGL_ID_TRANSPORT_DATA_BLOCK: u8 = 0x5A;
pub const SGL_ID_DATA_BLOCK_OFFSET: u8 = 0x01;

impl SglDescriptor {
    pub fn decode(b: [u8; 16]) -> Self {
        Self {
            addr: u64::from_le_bytes(b[0..8].try_into().unwrap()),
            len: u32::from_le_bytes(b[8..12].try_into().unwrap()),
            id: b[15],
        }
    }
    pub fn encode(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&self.addr.to_le_bytes());
        b[8..12].copy_from_slice(&self.len.to_le_bytes());
        b[15] = self.id;
        b
    }
}

/// Completion Queue Entry: 16 bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NvmeCpl {
    pub dw0: u32,
    pub dw1: u32,
    pub sqhd: u16,
    pub sqid: u16,
    pub cid: u16,
    pub status: Status,
}

impl NvmeCpl {
    pub fn new(cid: u16, status: Status) -> Self {
        Self {
            cid,
            status,
            ..Default::default()
        }
    }
    pub fn success(cid: u16) -> Self {
        Self::new(cid, Status::SUCCESS)
    }
    pub fn encode(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..4].copy_from_slice(&self.dw0.to_le_bytes());
        b[4..8].copy_from_slice(&self.dw1.to_le_bytes());
        b[8..10].copy_from_slice(&self.sqhd.to_le_bytes());
        b[10..12].copy_from_slice(&self.sqid.to_le_bytes());
        b[12..14].copy_from_slice(&self.cid.to_le_bytes());
        // Phase tag (bit 0) is meaningless on fabrics and left 0.
        b[14..16].copy_from_slice(&(self.status.to_raw() << 1).to_le_bytes());
        b
    }
    pub fn decode(b: &[u8; 16]) -> Self {
        Self {
            dw0: le32(b, 0),
            dw1: le32(b, 4),
            sqhd: u16::from_le_bytes([b[8], b[9]]),
            sqid: u16::from_le_bytes([b[10], b[11]]),
            cid: u16::from_le_bytes([b[12], b[13]]),
            status: Status::from_raw(u16::from_le_bytes([b[14], b[15]]) >> 1),
        }
    }
}

/// Admin command opcodes (NVMe Base, Figure "Opcodes for Admin Commands").
pub mod admin_opc {
    pub const GET_LOG_PAGE: u8 = 0x02;
    pub const IDENTIFY: u8 = 0x06;
    pub const ABORT: u8 = 0x08;
    pub const SET_FEATURES: u8 = 0x09;
    pub const GET_FEATURES: u8 = 0x0A;
    pub const ASYNC_EVENT_REQUEST: u8 = 0x0C;
    pub const KEEP_ALIVE: u8 = 0x18;
    pub const FABRICS: u8 = 0x7F;
}

/// NVM command set I/O opcodes.
pub mod io_opc {
    pub const FLUSH: u8 = 0x00;
    pub const WRITE: u8 = 0x01;
    pub const READ: u8 = 0x02;
    pub const WRITE_ZEROES: u8 = 0x08;
    pub const DATASET_MANAGEMENT: u8 = 0x09;
}

/// Fabrics command types (FCTYPE).
pub mod fctype {
    pub const PROPERTY_SET: u8 = 0x00;
    pub const CONNECT: u8 = 0x01;
    pub const PROPERTY_GET: u8 = 0x04;
    pub const AUTH_SEND: u8 = 0x05;
    pub const AUTH_RECV: u8 = 0x06;
    pub const DISCONNECT: u8 = 0x08;
}

/// Controller property offsets (NVMe-oF "Controller Properties").
pub mod prop {
    pub const CAP: u32 = 0x00;
    pub const VS: u32 = 0x08;
    pub const CC: u32 = 0x14;
    pub const CSTS: u32 = 0x1C;
    pub const NSSR: u32 = 0x20;
}

/// Feature identifiers used by the Linux host.
pub mod feat {
    pub const ARBITRATION: u8 = 0x01;
    pub const POWER_MGMT: u8 = 0x02;
    pub const TEMP_THRESHOLD: u8 = 0x04;
    pub const ERROR_RECOVERY: u8 = 0x05;
    pub const VOLATILE_WRITE_CACHE: u8 = 0x06;
    pub const NUMBER_OF_QUEUES: u8 = 0x07;
    pub const INTERRUPT_COALESCING: u8 = 0x08;
    pub const WRITE_ATOMICITY: u8 = 0x0A;
    pub const ASYNC_EVENT_CONFIG: u8 = 0x0B;
    pub const KEEP_ALIVE_TIMER: u8 = 0x0F;
}

/// Log page identifiers.
pub mod lid {
    pub const ERROR_INFO: u8 = 0x01;
    pub const SMART: u8 = 0x02;
    pub const FW_SLOT: u8 = 0x03;
    pub const CHANGED_NS_LIST: u8 = 0x04;
    pub const CMD_EFFECTS: u8 = 0x05;
    pub const ANA: u8 = 0x0C;
    pub const DISCOVERY: u8 = 0x70;
}

/// Fabrics Connect data (1024 bytes of in-capsule data).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectData {
    pub hostid: [u8; 16],
    pub cntlid: u16,
    pub subnqn: String,
    pub hostnqn: String,
}

pub const CONNECT_DATA_LEN: usize = 1024;
pub const NQN_MAX: usize = 223;
pub const DISCOVERY_NQN: &str = "nqn.2014-08.org.nvmexpress.discovery";

fn nqn_field(b: &[u8], allow_empty: bool) -> Result<String, ()> {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    if (end == 0 && !allow_empty) || end > NQN_MAX {
        return Err(());
    }
    std::str::from_utf8(&b[..end])
        .map(str::to_owned)
        .map_err(|_| ())
}

impl ConnectData {
    /// Decodes; `Err(offset)` names the byte offset of the bad field, which
    /// the Connect response reports as IATTR=1/IPO (Invalid Parameter).
    pub fn decode(b: &[u8]) -> Result<Self, u16> {
        if b.len() < CONNECT_DATA_LEN {
            return Err(0);
        }
        Ok(Self {
            hostid: b[0..16].try_into().unwrap(),
            cntlid: u16::from_le_bytes([b[16], b[17]]),
            subnqn: nqn_field(&b[256..512], false).map_err(|_| 256u16)?,
            // Empty is legal here: the Connect decides whether the
            // subsystem accepts an anonymous host.
            hostnqn: nqn_field(&b[512..768], true).map_err(|_| 512u16)?,
        })
    }
    pub fn encode(&self) -> [u8; CONNECT_DATA_LEN] {
        let mut b = [0u8; CONNECT_DATA_LEN];
        b[0..16].copy_from_slice(&self.hostid);
        b[16..18].copy_from_slice(&self.cntlid.to_le_bytes());
        let s = self.subnqn.as_bytes();
        b[256..256 + s.len().min(255)].copy_from_slice(&s[..s.len().min(255)]);
        let h = self.hostnqn.as_bytes();
        b[512..512 + h.len().min(255)].copy_from_slice(&h[..h.len().min(255)]);
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpl_roundtrip_keeps_status_and_dnr() {
        let c = NvmeCpl {
            dw0: 7,
            dw1: 9,
            sqhd: 3,
            sqid: 1,
            cid: 0xbeef,
            status: Status::INVALID_FIELD.dnr(),
        };
        assert_eq!(NvmeCpl::decode(&c.encode()), c);
    }

    #[test]
    fn cmd_accessors_read_little_endian() {
        let mut c = NvmeCmd::default();
        c.set_opcode(io_opc::READ);
        c.set_cid(0x1234);
        c.set_nsid(5);
        c.set_cdw(10, 0xdead_beef);
        c.set_cdw(11, 1);
        c.set_cdw(12, (1 << 30) | 7);
        assert_eq!(c.opcode(), io_opc::READ);
        assert_eq!(c.cid(), 0x1234);
        assert_eq!(c.nsid(), 5);
        assert_eq!(c.slba(), 0x1_dead_beef);
        assert_eq!(c.nlb(), 8);
        assert!(c.fua());
    }

    #[test]
    fn connect_data_rejects_missing_nqn_with_offset() {
        let d = ConnectData {
            hostid: [1; 16],
            cntlid: 0xffff,
            subnqn: "nqn.x".into(),
            hostnqn: "nqn.h".into(),
        };
        let mut b = d.encode();
        assert_eq!(ConnectData::decode(&b).unwrap(), d);
        // An empty host NQN decodes; Connect decides whether it is allowed.
        b[512] = 0;
        assert_eq!(ConnectData::decode(&b).unwrap().hostnqn, "");
        b[512..768].fill(b'a');
        assert_eq!(ConnectData::decode(&b), Err(512), "no NUL within 256 bytes");
        b[256] = 0;
        assert_eq!(ConnectData::decode(&b), Err(256));
        assert_eq!(ConnectData::decode(&b[..100]), Err(0));
    }
}
