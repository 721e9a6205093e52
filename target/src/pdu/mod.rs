//! Sans-IO NVMe/TCP PDU codec (NVMe TCP Transport Specification 1.0, 3.6).
//!
//! The codec only looks at PDU *headers*. The queue layer owns the receive
//! buffer: it calls [`parse_header`] on the unconsumed bytes, skips
//! [`Parsed::data_offset`], moves [`Parsed::data_len`] payload bytes wherever
//! they belong (ideally straight into an I/O buffer) and, when
//! [`Parsed::has_ddgst`], checks the trailing 4-byte data digest itself.
//! Keeping the payload out of the codec is what lets data land in its final
//! buffer without a copy.
//!
//! The same code serves the target ([`Role::Target`]: receives ICReq,
//! CapsuleCmd, H2CData, H2CTermReq) and a userspace initiator ([`Role::Host`]:
//! receives ICResp, CapsuleResp, C2HData, R2T, C2HTermReq).
//!
//! Data digest errors are not reported here, because the codec never sees the
//! data. NVMe/TCP does not treat them as fatal: the command is completed with
//! a Transient Transport Error status instead of sending a TermReq.

pub mod digest;

pub use digest::{crc32c, crc32c_append};

use crate::spec::{NvmeCmd, NvmeCpl};

pub const COMMON_HDR_LEN: usize = 8;
pub const DIGEST_LEN: usize = 4;
/// ICReq and ICResp are both 128 bytes and never carry digests.
pub const ICREQ_LEN: usize = 128;
pub const CAPSULE_CMD_HLEN: usize = 72;
pub const CAPSULE_RESP_HLEN: usize = 24;
/// H2CData / C2HData header length.
pub const DATA_HLEN: usize = 24;
pub const R2T_HLEN: usize = 24;
pub const TERM_REQ_HLEN: usize = 24;
/// Most bytes of the offending PDU header a TermReq carries as data.
///
/// The spec caps a whole TermReq at 152 bytes (Linux:
/// `NVME_TCP_MAX_C2HTERM_PLEN`), i.e. 128 data bytes, which is exactly enough
/// to echo the largest header there is (ICReq/ICResp).
pub const MAX_TERM_REQ_DATA: usize = 128;

/// Common header flags (byte 1).
pub const FLAG_HDGSTF: u8 = 0x01;
pub const FLAG_DDGSTF: u8 = 0x02;
/// H2CData / C2HData: last PDU of the transfer.
pub const FLAG_LAST_PDU: u8 = 0x04;
/// C2HData only: the command succeeded and no CapsuleResp will follow.
pub const FLAG_SUCCESS: u8 = 0x08;

/// ICReq/ICResp DGST byte.
const DGST_HDGST_ENABLE: u8 = 0x01;
const DGST_DDGST_ENABLE: u8 = 0x02;

/// Byte offsets of common header fields, reported as FEI for
/// Invalid PDU Header Field.
const FEI_TYPE: u32 = 0;
const FEI_FLAGS: u32 = 1;
const FEI_HLEN: u32 = 2;
const FEI_PDO: u32 = 3;
const FEI_PLEN: u32 = 4;
const FEI_DATAL: u32 = 16;
const FEI_FES: u32 = 8;
const FEI_PFV: u32 = 8;
const FEI_PDA: u32 = 10;

#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PduType {
    ICReq = 0x00,
    ICResp = 0x01,
    H2CTermReq = 0x02,
    C2HTermReq = 0x03,
    CapsuleCmd = 0x04,
    CapsuleResp = 0x05,
    H2CData = 0x06,
    C2HData = 0x07,
    R2T = 0x09,
}

impl PduType {
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0x00 => Self::ICReq,
            0x01 => Self::ICResp,
            0x02 => Self::H2CTermReq,
            0x03 => Self::C2HTermReq,
            0x04 => Self::CapsuleCmd,
            0x05 => Self::CapsuleResp,
            0x06 => Self::H2CData,
            0x07 => Self::C2HData,
            0x09 => Self::R2T,
            _ => return None,
        })
    }

    /// The fixed HLEN of this PDU type.
    pub fn hlen(self) -> usize {
        match self {
            Self::ICReq | Self::ICResp => ICREQ_LEN,
            Self::H2CTermReq | Self::C2HTermReq => TERM_REQ_HLEN,
            Self::CapsuleCmd => CAPSULE_CMD_HLEN,
            Self::CapsuleResp => CAPSULE_RESP_HLEN,
            Self::H2CData | Self::C2HData => DATA_HLEN,
            Self::R2T => R2T_HLEN,
        }
    }

    /// Whether a PDU of this type travels towards `role`. Host-to-controller
    /// types are even and controller-to-host types odd.
    pub fn received_by(self, role: Role) -> bool {
        let to_host = (self as u8) & 1 == 1;
        to_host == (role == Role::Host)
    }

    fn is_ic(self) -> bool {
        matches!(self, Self::ICReq | Self::ICResp)
    }

    fn is_term(self) -> bool {
        matches!(self, Self::H2CTermReq | Self::C2HTermReq)
    }

    /// Types whose PLEN may extend past the header with a data payload that
    /// the data digest covers.
    fn carries_data(self) -> bool {
        matches!(self, Self::CapsuleCmd | Self::H2CData | Self::C2HData)
    }
}

impl TryFrom<u8> for PduType {
    type Error = u8;
    fn try_from(v: u8) -> Result<Self, u8> {
        Self::from_u8(v).ok_or(v)
    }
}

/// Which side is decoding: decides which PDU types are legal to receive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Target,
    Host,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ICReq {
    pub pfv: u16,
    pub hpda: u8,
    pub hdgst: bool,
    pub ddgst: bool,
    /// 0's based.
    pub maxr2t: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ICResp {
    pub pfv: u16,
    pub cpda: u8,
    pub hdgst: bool,
    pub ddgst: bool,
    pub maxh2cdata: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct H2CData {
    pub cccid: u16,
    pub ttag: u16,
    pub datao: u32,
    pub datal: u32,
    pub last: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct C2HData {
    pub cccid: u16,
    pub datao: u32,
    pub datal: u32,
    pub last: bool,
    pub success: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct R2T {
    pub cccid: u16,
    pub ttag: u16,
    pub r2to: u32,
    pub r2tl: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TermReq {
    pub fes: FatalErrorStatus,
    pub fei: u32,
    /// Copy of the offending PDU header, at most [`MAX_TERM_REQ_DATA`] bytes.
    pub hdr: Vec<u8>,
}

/// Fatal Error Status values of H2CTermReq/C2HTermReq (FES).
#[repr(u16)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FatalErrorStatus {
    InvalidHeaderField = 0x01,
    PduSequenceError = 0x02,
    HeaderDigestError = 0x03,
    DataOutOfRange = 0x04,
    /// Also "R2T Limit Exceeded" (same code).
    DataLimitExceeded = 0x05,
    UnsupportedParameter = 0x06,
}

impl FatalErrorStatus {
    pub fn from_u16(v: u16) -> Option<Self> {
        Some(match v {
            0x01 => Self::InvalidHeaderField,
            0x02 => Self::PduSequenceError,
            0x03 => Self::HeaderDigestError,
            0x04 => Self::DataOutOfRange,
            0x05 => Self::DataLimitExceeded,
            0x06 => Self::UnsupportedParameter,
            _ => return None,
        })
    }
}

/// A decoded PDU header (the PDU-specific header; data is NOT included,
/// except for TermReq whose small data part is the echoed header).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PduHeader {
    ICReq(ICReq),
    ICResp(ICResp),
    H2CTermReq(TermReq),
    C2HTermReq(TermReq),
    CapsuleCmd(NvmeCmd),
    CapsuleResp(NvmeCpl),
    H2CData(H2CData),
    C2HData(C2HData),
    R2T(R2T),
}

impl PduHeader {
    pub fn pdu_type(&self) -> PduType {
        match self {
            Self::ICReq(_) => PduType::ICReq,
            Self::ICResp(_) => PduType::ICResp,
            Self::H2CTermReq(_) => PduType::H2CTermReq,
            Self::C2HTermReq(_) => PduType::C2HTermReq,
            Self::CapsuleCmd(_) => PduType::CapsuleCmd,
            Self::CapsuleResp(_) => PduType::CapsuleResp,
            Self::H2CData(_) => PduType::H2CData,
            Self::C2HData(_) => PduType::C2HData,
            Self::R2T(_) => PduType::R2T,
        }
    }
}

/// Why a received PDU is fatal: the FES to send in the TermReq and the FEI.
///
/// FEI follows the spec per FES: for Invalid Header Field and Unsupported
/// Parameter it is the byte offset of the offending field in the PDU header;
/// for Header Digest Error it is the HDGST value that was received (as the
/// FreeBSD implementation, which cites the spec, reports it; SPDK sends 0);
/// for the other codes it is reserved (0).
///
/// Never answer a received TermReq with a TermReq: if parsing a TermReq fails
/// (check `buf[0]`), just close the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PduError {
    pub fes: FatalErrorStatus,
    pub fei: u32,
}

impl PduError {
    pub const fn new(fes: FatalErrorStatus, fei: u32) -> Self {
        Self { fes, fei }
    }
    const fn header_field(fei: u32) -> Self {
        Self::new(FatalErrorStatus::InvalidHeaderField, fei)
    }
    const fn sequence() -> Self {
        Self::new(FatalErrorStatus::PduSequenceError, 0)
    }
}

impl std::fmt::Display for PduError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "NVMe/TCP fatal error {:?} (FEI {:#x})",
            self.fes, self.fei
        )
    }
}

impl std::error::Error for PduError {}

/// Decoder settings negotiated by ICReq/ICResp.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodeConfig {
    pub role: Role,
    pub hdgst: bool,
    pub ddgst: bool,
    /// Largest data payload (bytes) accepted in one received PDU: for the
    /// target, max(in-capsule data size for CapsuleCmd, MAXH2CDATA for
    /// H2CData); for the host, a large bound. Does not apply to TermReq,
    /// whose data is bounded by [`MAX_TERM_REQ_DATA`].
    pub max_data: u32,
    /// Whether IC exchange has completed. Before: only ICReq (target) /
    /// ICResp (host) and TermReq are legal, anything else is a
    /// PduSequenceError. After: ICReq/ICResp is a PduSequenceError.
    pub connected: bool,
}

impl DecodeConfig {
    /// Before IC exchange: no digests, and no data PDU is legal yet.
    pub fn initial(role: Role) -> Self {
        Self {
            role,
            hdgst: false,
            ddgst: false,
            max_data: 0,
            connected: false,
        }
    }

    /// After IC exchange, with the negotiated digests.
    pub fn established(role: Role, hdgst: bool, ddgst: bool, max_data: u32) -> Self {
        Self {
            role,
            hdgst,
            ddgst,
            max_data,
            connected: true,
        }
    }
}

/// Result of parsing the front of a receive buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parsed {
    pub header: PduHeader,
    /// Bytes from the start of the PDU to the first data byte (= PDO when
    /// data is present, else HLEN + header digest). Skip these.
    pub data_offset: usize,
    /// Length of the data payload that follows (0 if none), excluding the
    /// data digest.
    pub data_len: usize,
    /// Whether a 4-byte data digest follows the data (ddgst negotiated AND
    /// data_len > 0 AND the PDU's DDGSTF flag set).
    pub has_ddgst: bool,
    /// Total PDU length (PLEN).
    pub plen: usize,
}

#[inline]
fn le16(b: &[u8], off: usize) -> u16 {
    b.get(off..off + 2)
        .and_then(|s| s.try_into().ok())
        .map_or(0, u16::from_le_bytes)
}

#[inline]
fn le32(b: &[u8], off: usize) -> u32 {
    b.get(off..off + 4)
        .and_then(|s| s.try_into().ok())
        .map_or(0, u32::from_le_bytes)
}

/// Parses one PDU header from the front of `buf`.
///
/// `Ok(None)` means more bytes are needed; only the header (plus header
/// digest) has to be buffered, not the data, except for TermReq, which is
/// returned only once complete (at most 152 bytes) so that
/// [`TermReq::hdr`] can be filled. For TermReq, `data_offset`/`data_len`
/// still describe the echoed header so generic consumption code works.
///
/// Fields are validated in wire order (type, flags, HLEN, PDO, PLEN, header
/// digest, PSH) so the lowest offending field is the one reported. Common
/// header errors are reported as soon as 8 bytes are present.
///
/// Not checked here, because they need queue state: whether CCCID/TTAG name
/// a live command, DATAO/DATAL against the command's transfer
/// (DataOutOfRange), R2T limits, and ICReq/ICResp parameter values (see
/// [`validate_icreq`] and [`validate_icresp`]).
///
/// Never panics, for any input.
pub fn parse_header(buf: &[u8], cfg: &DecodeConfig) -> Result<Option<Parsed>, PduError> {
    let Some(ch) = buf.get(..COMMON_HDR_LEN) else {
        return Ok(None);
    };
    let ty = PduType::from_u8(ch[0]).ok_or(PduError::header_field(FEI_TYPE))?;
    if !ty.received_by(cfg.role) {
        return Err(PduError::header_field(FEI_TYPE));
    }
    // TermReq is legal before IC completes: a controller rejects a bad ICReq
    // with a C2HTermReq.
    if !ty.is_term() && ty.is_ic() == cfg.connected {
        return Err(PduError::sequence());
    }

    let flags = ch[1];
    let hlen = usize::from(ch[2]);
    let pdo = usize::from(ch[3]);
    let plen = usize::try_from(le32(ch, 4)).unwrap_or(usize::MAX);

    // IC and TermReq PDUs never carry digests, whatever was negotiated.
    let digests_apply = !ty.is_ic() && !ty.is_term();
    let hdgst_len = if digests_apply && cfg.hdgst {
        DIGEST_LEN
    } else {
        0
    };
    let expected_hlen = ty.hlen();
    let full_hlen = expected_hlen + hdgst_len;
    let has_data = ty.carries_data() && plen > full_hlen;

    let mut want_flags = 0;
    if hdgst_len != 0 {
        want_flags |= FLAG_HDGSTF;
    }
    if has_data && cfg.ddgst {
        want_flags |= FLAG_DDGSTF;
    }
    // Other flag bits are reserved or type-specific; reserved bits are
    // ignored rather than rejected, as the Linux target does.
    if flags & (FLAG_HDGSTF | FLAG_DDGSTF) != want_flags {
        return Err(PduError::header_field(FEI_FLAGS));
    }
    if ty == PduType::C2HData && flags & (FLAG_SUCCESS | FLAG_LAST_PDU) == FLAG_SUCCESS {
        return Err(PduError::header_field(FEI_FLAGS));
    }
    let ddgst_len = if flags & FLAG_DDGSTF != 0 {
        DIGEST_LEN
    } else {
        0
    };

    if hlen != expected_hlen {
        return Err(PduError::header_field(FEI_HLEN));
    }

    let pdo_ok = if ty.is_term() {
        // A dying peer's TermReq is taken as-is: its data always starts right
        // after the header, whatever PDO says.
        true
    } else if !ty.carries_data() {
        pdo == 0
    } else if has_data {
        // PDO must be dword aligned (HPDA/CPDA are in dwords) and leave at
        // least one data byte.
        pdo >= full_hlen && pdo < plen && pdo.is_multiple_of(4)
    } else {
        pdo == 0 || pdo == full_hlen
    };
    if !pdo_ok {
        return Err(PduError::header_field(FEI_PDO));
    }

    let plen_ok = plen >= full_hlen
        && match ty {
            PduType::ICReq | PduType::ICResp => plen == ICREQ_LEN,
            PduType::CapsuleResp | PduType::R2T => plen == full_hlen,
            PduType::H2CTermReq | PduType::C2HTermReq => plen <= TERM_REQ_HLEN + MAX_TERM_REQ_DATA,
            PduType::CapsuleCmd | PduType::H2CData | PduType::C2HData => {
                !has_data || plen - pdo > ddgst_len
            }
        };
    if !plen_ok {
        return Err(PduError::header_field(FEI_PLEN));
    }

    let (data_offset, data_len) = if ty.is_term() {
        (hlen, plen - hlen)
    } else if has_data {
        (pdo, plen - pdo - ddgst_len)
    } else {
        (full_hlen, 0)
    };

    let need = if ty.is_term() { plen } else { full_hlen };
    let Some(whole) = buf.get(..need) else {
        return Ok(None);
    };
    let h = &whole[..hlen];

    if hdgst_len != 0 {
        let received = le32(whole, hlen);
        if crc32c(h) != received {
            return Err(PduError::new(FatalErrorStatus::HeaderDigestError, received));
        }
    }

    if ty.carries_data() && u32::try_from(data_len).map_or(true, |l| l > cfg.max_data) {
        return Err(PduError::new(FatalErrorStatus::DataLimitExceeded, 0));
    }

    let header = match ty {
        PduType::ICReq => PduHeader::ICReq(ICReq {
            pfv: le16(h, 8),
            hpda: h[10],
            hdgst: h[11] & DGST_HDGST_ENABLE != 0,
            ddgst: h[11] & DGST_DDGST_ENABLE != 0,
            maxr2t: le32(h, 12),
        }),
        PduType::ICResp => PduHeader::ICResp(ICResp {
            pfv: le16(h, 8),
            cpda: h[10],
            hdgst: h[11] & DGST_HDGST_ENABLE != 0,
            ddgst: h[11] & DGST_DDGST_ENABLE != 0,
            maxh2cdata: le32(h, 12),
        }),
        PduType::H2CTermReq | PduType::C2HTermReq => {
            let t = TermReq {
                fes: FatalErrorStatus::from_u16(le16(h, 8))
                    .ok_or(PduError::header_field(FEI_FES))?,
                fei: le32(h, 10),
                hdr: whole[hlen..].to_vec(),
            };
            if ty == PduType::H2CTermReq {
                PduHeader::H2CTermReq(t)
            } else {
                PduHeader::C2HTermReq(t)
            }
        }
        PduType::CapsuleCmd => PduHeader::CapsuleCmd(
            NvmeCmd::from_slice(&h[COMMON_HDR_LEN..]).ok_or(PduError::header_field(FEI_HLEN))?,
        ),
        PduType::CapsuleResp => {
            let cqe: &[u8; 16] = h[COMMON_HDR_LEN..]
                .try_into()
                .map_err(|_| PduError::header_field(FEI_HLEN))?;
            PduHeader::CapsuleResp(NvmeCpl::decode(cqe))
        }
        PduType::H2CData => {
            let d = H2CData {
                cccid: le16(h, 8),
                ttag: le16(h, 10),
                datao: le32(h, 12),
                datal: le32(h, 16),
                last: flags & FLAG_LAST_PDU != 0,
            };
            check_datal(d.datal, data_len)?;
            PduHeader::H2CData(d)
        }
        PduType::C2HData => {
            let d = C2HData {
                cccid: le16(h, 8),
                datao: le32(h, 12),
                datal: le32(h, 16),
                last: flags & FLAG_LAST_PDU != 0,
                success: flags & FLAG_SUCCESS != 0,
            };
            check_datal(d.datal, data_len)?;
            PduHeader::C2HData(d)
        }
        PduType::R2T => PduHeader::R2T(R2T {
            cccid: le16(h, 8),
            ttag: le16(h, 10),
            r2to: le32(h, 12),
            r2tl: le32(h, 16),
        }),
    };

    Ok(Some(Parsed {
        header,
        data_offset,
        data_len,
        has_ddgst: ddgst_len != 0,
        plen,
    }))
}

/// DATAL is redundant with PLEN - PDO - DDGST; a disagreement means one of
/// the two is corrupt and the data stream can no longer be trusted.
fn check_datal(datal: u32, data_len: usize) -> Result<(), PduError> {
    if usize::try_from(datal).ok() == Some(data_len) {
        Ok(())
    } else {
        Err(PduError::header_field(FEI_DATAL))
    }
}

/// Saturates instead of wrapping so an absurd length yields a PDU the peer
/// rejects rather than one that silently desynchronises the stream.
fn plen_u32(plen: usize) -> u32 {
    u32::try_from(plen).unwrap_or(u32::MAX)
}

fn put_common(out: &mut Vec<u8>, ty: PduType, flags: u8, hlen: usize, pdo: usize, plen: usize) {
    out.extend_from_slice(&[ty as u8, flags, hlen as u8, pdo as u8]);
    out.extend_from_slice(&plen_u32(plen).to_le_bytes());
}

/// Appends the header digest over the header that starts at `start`.
fn put_hdgst(out: &mut Vec<u8>, start: usize, hdgst: bool) {
    if hdgst {
        let crc = crc32c(out.get(start..).unwrap_or_default());
        out.extend_from_slice(&crc.to_le_bytes());
    }
}

/// Flags, PDO and PLEN of a PDU that may carry `data_len` data bytes.
/// We advertise CPDA/HPDA 0, so data starts right after the header digest.
fn data_layout(hlen: usize, data_len: usize, hdgst: bool, ddgst: bool) -> (u8, usize, usize) {
    let mut flags = 0;
    let mut full = hlen;
    if hdgst {
        flags |= FLAG_HDGSTF;
        full += DIGEST_LEN;
    }
    if data_len == 0 {
        return (flags, 0, full);
    }
    let mut plen = full.saturating_add(data_len);
    if ddgst {
        flags |= FLAG_DDGSTF;
        plen = plen.saturating_add(DIGEST_LEN);
    }
    (flags, full, plen)
}

fn dgst_byte(hdgst: bool, ddgst: bool) -> u8 {
    (if hdgst { DGST_HDGST_ENABLE } else { 0 }) | (if ddgst { DGST_DDGST_ENABLE } else { 0 })
}

fn encode_ic(ty: PduType, pfv: u16, pda: u8, dgst: u8, word: u32, out: &mut Vec<u8>) {
    let mut b = [0u8; ICREQ_LEN];
    b[0] = ty as u8;
    b[2] = ICREQ_LEN as u8;
    b[4..8].copy_from_slice(&(ICREQ_LEN as u32).to_le_bytes());
    b[8..10].copy_from_slice(&pfv.to_le_bytes());
    b[10] = pda;
    b[11] = dgst;
    b[12..16].copy_from_slice(&word.to_le_bytes());
    out.extend_from_slice(&b);
}

pub fn encode_icreq(r: &ICReq, out: &mut Vec<u8>) {
    let dgst = dgst_byte(r.hdgst, r.ddgst);
    encode_ic(PduType::ICReq, r.pfv, r.hpda, dgst, r.maxr2t, out);
}

pub fn encode_icresp(r: &ICResp, out: &mut Vec<u8>) {
    let dgst = dgst_byte(r.hdgst, r.ddgst);
    encode_ic(PduType::ICResp, r.pfv, r.cpda, dgst, r.maxh2cdata, out);
}

/// CapsuleCmd header; the caller sends `in_capsule_len` data bytes and then
/// the data digest when `ddgst && in_capsule_len > 0`.
pub fn encode_capsule_cmd(
    cmd: &NvmeCmd,
    in_capsule_len: usize,
    hdgst: bool,
    ddgst: bool,
    out: &mut Vec<u8>,
) {
    let (flags, pdo, plen) = data_layout(CAPSULE_CMD_HLEN, in_capsule_len, hdgst, ddgst);
    let start = out.len();
    put_common(out, PduType::CapsuleCmd, flags, CAPSULE_CMD_HLEN, pdo, plen);
    out.extend_from_slice(&cmd.0);
    put_hdgst(out, start, hdgst);
}

pub fn encode_capsule_resp(cpl: &NvmeCpl, hdgst: bool, out: &mut Vec<u8>) {
    let (flags, pdo, plen) = data_layout(CAPSULE_RESP_HLEN, 0, hdgst, false);
    let start = out.len();
    put_common(
        out,
        PduType::CapsuleResp,
        flags,
        CAPSULE_RESP_HLEN,
        pdo,
        plen,
    );
    out.extend_from_slice(&cpl.encode());
    put_hdgst(out, start, hdgst);
}

/// H2CData header for `h.datal` data bytes.
pub fn encode_h2c_data(h: &H2CData, hdgst: bool, ddgst: bool, out: &mut Vec<u8>) {
    let data_len = usize::try_from(h.datal).unwrap_or(usize::MAX);
    let (mut flags, pdo, plen) = data_layout(DATA_HLEN, data_len, hdgst, ddgst);
    if h.last {
        flags |= FLAG_LAST_PDU;
    }
    let start = out.len();
    put_common(out, PduType::H2CData, flags, DATA_HLEN, pdo, plen);
    out.extend_from_slice(&h.cccid.to_le_bytes());
    out.extend_from_slice(&h.ttag.to_le_bytes());
    out.extend_from_slice(&h.datao.to_le_bytes());
    out.extend_from_slice(&h.datal.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    put_hdgst(out, start, hdgst);
}

/// C2HData header for `h.datal` data bytes. `success` is only meaningful
/// with `last` (the spec requires LAST_PDU whenever SUCCESS is set).
pub fn encode_c2h_data(h: &C2HData, hdgst: bool, ddgst: bool, out: &mut Vec<u8>) {
    let data_len = usize::try_from(h.datal).unwrap_or(usize::MAX);
    let (mut flags, pdo, plen) = data_layout(DATA_HLEN, data_len, hdgst, ddgst);
    if h.last {
        flags |= FLAG_LAST_PDU;
    }
    if h.success {
        flags |= FLAG_SUCCESS;
    }
    let start = out.len();
    put_common(out, PduType::C2HData, flags, DATA_HLEN, pdo, plen);
    out.extend_from_slice(&h.cccid.to_le_bytes());
    out.extend_from_slice(&[0; 2]);
    out.extend_from_slice(&h.datao.to_le_bytes());
    out.extend_from_slice(&h.datal.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    put_hdgst(out, start, hdgst);
}

pub fn encode_r2t(r: &R2T, hdgst: bool, out: &mut Vec<u8>) {
    let (flags, pdo, plen) = data_layout(R2T_HLEN, 0, hdgst, false);
    let start = out.len();
    put_common(out, PduType::R2T, flags, R2T_HLEN, pdo, plen);
    out.extend_from_slice(&r.cccid.to_le_bytes());
    out.extend_from_slice(&r.ttag.to_le_bytes());
    out.extend_from_slice(&r.r2to.to_le_bytes());
    out.extend_from_slice(&r.r2tl.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    put_hdgst(out, start, hdgst);
}

/// Complete TermReq PDU, header copy included (truncated to
/// [`MAX_TERM_REQ_DATA`]). TermReq never carries digests, so the peer can
/// decode it even when the failure was a digest problem.
///
/// `pdu_type` should be [`PduType::H2CTermReq`] or [`PduType::C2HTermReq`];
/// any other type is written as given and the peer will reject it.
pub fn encode_term_req(pdu_type: PduType, t: &TermReq, out: &mut Vec<u8>) {
    let data = t.hdr.get(..MAX_TERM_REQ_DATA).unwrap_or(&t.hdr);
    put_common(
        out,
        pdu_type,
        0,
        TERM_REQ_HLEN,
        0,
        TERM_REQ_HLEN + data.len(),
    );
    out.extend_from_slice(&(t.fes as u16).to_le_bytes());
    out.extend_from_slice(&t.fei.to_le_bytes());
    out.extend_from_slice(&[0; 10]);
    out.extend_from_slice(data);
}

/// Appends the 4-byte little-endian CRC32C data digest `crc` (computed by
/// the caller over the data with [`crc32c`] / [`crc32c_append`]).
pub fn encode_ddgst(crc: u32, out: &mut Vec<u8>) {
    out.extend_from_slice(&crc.to_le_bytes());
}

/// Controller-side checks of a received ICReq: the values a target must
/// refuse with a C2HTermReq (FES Unsupported Parameter, FEI = field offset).
///
/// HPDA must be 0 because the encoders always place C2HData right after the
/// header (PDO = HLEN + HDGST), which only satisfies dword alignment; the
/// Linux target makes the same restriction.
pub fn validate_icreq(req: &ICReq) -> Result<(), PduError> {
    if req.pfv != 0 {
        return Err(PduError::new(
            FatalErrorStatus::UnsupportedParameter,
            FEI_PFV,
        ));
    }
    if req.hpda != 0 {
        return Err(PduError::new(
            FatalErrorStatus::UnsupportedParameter,
            FEI_PDA,
        ));
    }
    Ok(())
}

/// The checks the Linux host applies to ICResp (`nvme_tcp_init_connection`).
/// PDU type and PLEN == 128 are already enforced by [`parse_header`].
pub fn validate_icresp(req: &ICReq, resp: &ICResp) -> Result<(), &'static str> {
    if resp.pfv != 0 {
        return Err("ICResp: unsupported PFV");
    }
    if resp.hdgst != req.hdgst {
        return Err("ICResp: header digest does not mirror ICReq");
    }
    if resp.ddgst != req.ddgst {
        return Err("ICResp: data digest does not mirror ICReq");
    }
    if resp.cpda != 0 {
        return Err("ICResp: unsupported CPDA");
    }
    if !resp.maxh2cdata.is_multiple_of(4) || resp.maxh2cdata < 4096 {
        return Err("ICResp: invalid MAXH2CDATA");
    }
    Ok(())
}

#[cfg(test)]
mod tests;
