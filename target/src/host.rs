//! The host's half of NVMe/TCP, sans-IO: the PDUs and commands an
//! initiator sends to bring up a queue (ICReq, Fabrics Connect, Property
//! Get/Set, Set Features Number of Queues) and to move data (I/O capsules,
//! H2CData), with the header and data digests the connection negotiated.
//!
//! It lives next to the codec because product code builds these too: the
//! bench initiator, and a replication client that connects to a peer
//! target. The field layouts follow NVMe over Fabrics 1.1 (Connect,
//! Property Get/Set) and the NVMe Base specification (CC, Set Features);
//! the values match what the Linux host sends, so a target that is fine
//! with these is fine with Linux.

use crate::pdu::{self, H2CData, ICReq};
use crate::spec::{
    CONNECT_DATA_LEN, ConnectData, NvmeCmd, SGL_ID_DATA_BLOCK_OFFSET, SGL_ID_TRANSPORT_DATA_BLOCK,
    SglDescriptor, admin_opc, fctype, feat,
};

/// PSDT=01b in CDW0: the data pointer is an SGL. NVMe/TCP requires SGLs,
/// and Linux sets it on every command (`NVME_CMD_SGL_METABUF`).
pub const PSDT_SGL: u8 = 0x40;

/// CC with EN=1, CSS=NVM, MPS=4 KiB, IOSQES=6 (64 B), IOCQES=4 (16 B).
pub const CC_ENABLE: u32 = 1 | (6 << 16) | (4 << 20);
/// CC.SHN=01b (normal shutdown); set together with [`CC_ENABLE`].
pub const CC_SHN_NORMAL: u32 = 1 << 14;
/// Connect to the admin queue with this CNTLID asks for a dynamic
/// controller.
pub const CNTLID_DYNAMIC: u16 = 0xFFFF;
/// Admin SQSIZE (0's based) of 32 entries, Linux's NVME_AQ_DEPTH - 1.
pub const ADMIN_SQSIZE: u16 = 31;

/// ICReq: PFV 0, HPDA 0 (the target places data right after the header),
/// MAXR2T 0 (0's based: one R2T in flight per command, as Linux asks).
pub fn icreq(hdgst: bool, ddgst: bool) -> ICReq {
    ICReq {
        pfv: 0,
        hpda: 0,
        hdgst,
        ddgst,
        maxr2t: 0,
    }
}

/// The 128-byte ICReq PDU.
pub fn encode_icreq(hdgst: bool, ddgst: bool, out: &mut Vec<u8>) {
    pdu::encode_icreq(&icreq(hdgst, ddgst), out);
}

/// An admin command with only the opcode and PSDT set.
pub fn admin_cmd(opc: u8) -> NvmeCmd {
    let mut c = NvmeCmd::default();
    c.set_opcode(opc);
    c.0[1] = PSDT_SGL;
    c
}

/// A Fabrics command (opcode 7Fh) of type `fct`.
pub fn fabrics_cmd(fct: u8) -> NvmeCmd {
    let mut c = admin_cmd(admin_opc::FABRICS);
    c.0[4] = fct;
    c
}

/// Fabrics Connect of queue `qid` with `sqsize` (0's based) entries and
/// Keep Alive Timeout `kato_ms` (honoured on the admin queue only). Its
/// data, [`ConnectData`], goes in-capsule: the SGL says so.
pub fn connect_cmd(qid: u16, sqsize: u16, kato_ms: u32) -> NvmeCmd {
    let mut c = fabrics_cmd(fctype::CONNECT);
    // RECFMT 0 | QID; SQSIZE | CATTR 0; KATO.
    c.set_cdw(10, u32::from(qid) << 16);
    c.set_cdw(11, u32::from(sqsize));
    c.set_cdw(12, kato_ms);
    c.set_sgl(in_capsule_sgl(CONNECT_DATA_LEN as u32));
    c
}

/// The Connect command and its 1024 data bytes, ready for
/// [`encode_capsule`].
pub fn connect(
    qid: u16,
    sqsize: u16,
    kato_ms: u32,
    data: &ConnectData,
) -> (NvmeCmd, [u8; CONNECT_DATA_LEN]) {
    (connect_cmd(qid, sqsize, kato_ms), data.encode())
}

/// Property Get of the property at `offset` (`spec::prop`); `eight` for
/// the 8-byte ones (CAP).
pub fn property_get_cmd(offset: u32, eight: bool) -> NvmeCmd {
    let mut c = fabrics_cmd(fctype::PROPERTY_GET);
    c.set_cdw(10, u32::from(eight));
    c.set_cdw(11, offset);
    c
}

/// Property Set of the 4-byte property at `offset` to `value`.
pub fn property_set_cmd(offset: u32, value: u32) -> NvmeCmd {
    let mut c = fabrics_cmd(fctype::PROPERTY_SET);
    c.set_cdw(10, 0);
    c.set_cdw(11, offset);
    c.set_cdw(12, value);
    c
}

/// Set Features Number of Queues: `nsqr` submission and `ncqr` completion
/// queues requested, both 0's based.
pub fn set_features_number_of_queues(nsqr: u16, ncqr: u16) -> NvmeCmd {
    let mut c = admin_cmd(admin_opc::SET_FEATURES);
    c.set_cdw(10, u32::from(feat::NUMBER_OF_QUEUES));
    c.set_cdw(11, u32::from(nsqr) | (u32::from(ncqr) << 16));
    c
}

/// Identify with CNS `cns` for namespace `nsid` (0 when the CNS takes
/// none); 4 KiB of data come back.
pub fn identify_cmd(cns: u8, nsid: u32) -> NvmeCmd {
    let mut c = admin_cmd(admin_opc::IDENTIFY);
    c.set_nsid(nsid);
    c.set_cdw(10, u32::from(cns));
    c
}

/// A read or write (`io_opc`) of `nlb` blocks (a count, not 0's based) at
/// `slba`, `len` bytes; `in_capsule` for a write whose data follows the
/// command in the same PDU, otherwise the target asks for it with R2T (or
/// sends C2HData).
pub fn rw_cmd(opc: u8, nsid: u32, slba: u64, nlb: u32, len: u32, in_capsule: bool) -> NvmeCmd {
    let mut c = admin_cmd(opc);
    c.set_nsid(nsid);
    c.set_cdw(10, slba as u32);
    c.set_cdw(11, (slba >> 32) as u32);
    c.set_cdw(12, nlb - 1);
    c.set_sgl(if in_capsule {
        in_capsule_sgl(len)
    } else {
        transport_sgl(len)
    });
    c
}

/// SGL for `len` bytes of in-capsule data (Data Block, Offset).
pub fn in_capsule_sgl(len: u32) -> SglDescriptor {
    SglDescriptor {
        addr: 0,
        len,
        id: SGL_ID_DATA_BLOCK_OFFSET,
    }
}

/// SGL for `len` bytes moved by H2CData/C2HData (Transport Data Block).
pub fn transport_sgl(len: u32) -> SglDescriptor {
    SglDescriptor {
        addr: 0,
        len,
        id: SGL_ID_TRANSPORT_DATA_BLOCK,
    }
}

/// A CapsuleCmd PDU: header (with HDGST when `hdgst`), the in-capsule
/// `data`, and its DDGST when `ddgst` and there is data.
pub fn encode_capsule(cmd: &NvmeCmd, data: &[u8], hdgst: bool, ddgst: bool, out: &mut Vec<u8>) {
    pdu::encode_capsule_cmd(cmd, data.len(), hdgst, ddgst, out);
    out.extend_from_slice(data);
    if ddgst && !data.is_empty() {
        pdu::encode_ddgst(pdu::crc32c(data), out);
    }
}

/// An H2CData PDU carrying `data` (`h.datal` must be its length), with the
/// negotiated digests.
pub fn encode_h2c(h: &H2CData, data: &[u8], hdgst: bool, ddgst: bool, out: &mut Vec<u8>) {
    debug_assert_eq!(h.datal as usize, data.len(), "H2CData DATAL");
    pdu::encode_h2c_data(h, hdgst, ddgst, out);
    out.extend_from_slice(data);
    if ddgst {
        pdu::encode_ddgst(pdu::crc32c(data), out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pdu::{DecodeConfig, PduHeader, Role, parse_header};
    use crate::spec::{io_opc, prop};

    #[test]
    fn connect_capsule_decodes_on_the_controller_side() {
        let d = ConnectData {
            hostid: [7; 16],
            cntlid: CNTLID_DYNAMIC,
            subnqn: "nqn.sub".into(),
            hostnqn: "nqn.host".into(),
        };
        let (cmd, data) = connect(0, ADMIN_SQSIZE, 5000, &d);
        let mut b = Vec::new();
        encode_capsule(&cmd, &data, true, true, &mut b);
        let cfg = DecodeConfig::established(Role::Target, true, true, 1 << 20);
        let p = parse_header(&b, &cfg).unwrap().unwrap();
        assert_eq!(p.plen, b.len());
        let PduHeader::CapsuleCmd(got) = p.header else {
            panic!("{:?}", p.header)
        };
        assert_eq!(got.opcode(), admin_opc::FABRICS);
        assert_eq!(got.fctype(), fctype::CONNECT);
        assert_eq!(got.flags(), PSDT_SGL);
        assert_eq!(got.cdw11(), 31);
        assert_eq!(got.cdw12(), 5000);
        assert_eq!(got.sgl().len, 1024);
        let payload = &b[p.data_offset..p.data_offset + p.data_len];
        assert_eq!(ConnectData::decode(payload).unwrap(), d);
        let dd = u32::from_le_bytes(b[b.len() - 4..].try_into().unwrap());
        assert_eq!(dd, pdu::crc32c(payload));
    }

    #[test]
    fn bring_up_commands_carry_the_spec_fields() {
        let c = property_set_cmd(prop::CC, CC_ENABLE);
        assert_eq!((c.cdw10(), c.cdw11(), c.cdw12()), (0, 0x14, 0x0046_0001));
        let c = property_get_cmd(prop::CAP, true);
        assert_eq!(
            (c.fctype(), c.cdw10(), c.cdw11()),
            (fctype::PROPERTY_GET, 1, 0)
        );
        let c = set_features_number_of_queues(3, 2);
        assert_eq!((c.opcode(), c.cdw10(), c.cdw11()), (0x09, 7, 0x0002_0003));
        let c = rw_cmd(io_opc::WRITE, 1, 0x1_0000_0002, 8, 4096, true);
        assert_eq!((c.slba(), c.nlb(), c.sgl().id), (0x1_0000_0002, 8, 0x01));
    }

    #[test]
    fn h2c_without_digest_is_header_and_data() {
        let h = H2CData {
            cccid: 1,
            ttag: 2,
            datao: 0,
            datal: 8,
            last: true,
        };
        let mut b = Vec::new();
        encode_h2c(&h, &[9; 8], false, false, &mut b);
        assert_eq!(b.len(), pdu::DATA_HLEN + 8);
        let mut d = Vec::new();
        encode_h2c(&h, &[9; 8], true, true, &mut d);
        assert_eq!(d.len(), pdu::DATA_HLEN + 4 + 8 + 4);
    }
}
