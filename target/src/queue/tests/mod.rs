//! Queue-pair tests: an in-memory host drives real queue pairs, a real
//! controller and a RAM bdev through the PDU codec; no sockets. This file
//! holds the host and the fixtures; each concept's tests sit in the file
//! named as its source file.

use std::task::Context;

use super::*;
use crate::bdev::ram::RamBdev;
use crate::pdu::{ICReq, Parsed, PduHeader};
use crate::spec::{self, ConnectData, SglDescriptor, prop};
use crate::spec::{
    NvmeCpl, SGL_ID_DATA_BLOCK_OFFSET, SGL_ID_TRANSPORT_DATA_BLOCK, admin_opc, fctype, io_opc,
};
use crate::subsystem::AnaState;
use crate::subsystem::{NamespaceConfig, PortConfig, SubsystemConfig, TargetConfig};
use std::task::Waker;

mod connect;
mod dispatch;
mod dsm;
mod fence;
mod io;
mod lifecycle;
mod r2t;
mod rx;
mod tx;

const NQN: &str = "nqn.2026-11.dev.strata:test";

const HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:host-a";

fn target_with(ana: AnaState) -> Arc<Target> {
    target_hosts(ana, false)
}

fn target_hosts(ana: AnaState, allow_any_host: bool) -> Arc<Target> {
    target_sized(ana, allow_any_host, 64 << 20)
}

fn target_sized(ana: AnaState, allow_any_host: bool, bytes: u64) -> Arc<Target> {
    let bdev = RamBdev::new("t", bytes, 512).unwrap();
    let mut ana_map = std::collections::BTreeMap::new();
    ana_map.insert(1, ana);
    Target::new(TargetConfig {
        subsystems: vec![SubsystemConfig {
            nqn: NQN.into(),
            serial: "S1".into(),
            model: "Strata".into(),
            allow_any_host,
            hosts: vec![HOST.into()],
            namespaces: vec![NamespaceConfig {
                nsid: 1,
                bdev,
                uuid: [7; 16],
                nguid: [7; 16],
                eui64: [7; 8],
                anagrpid: 1,
            }],
            ports: vec![1],
        }],
        ports: vec![PortConfig {
            id: 1,
            traddr: "127.0.0.1".into(),
            trsvcid: "4420".into(),
            adrfam_ipv6: false,
            ana: ana_map,
        }],
    })
}

#[derive(Debug)]
enum Rsp {
    IcResp(pdu::ICResp),
    Cpl(NvmeCpl),
    C2H(pdu::C2HData, Vec<u8>),
    R2T(pdu::R2T),
    Term(pdu::TermReq),
}

/// A minimal host: encodes commands, feeds the queue, decodes what comes back.
struct Host {
    qp: QueuePair,
    hdgst: bool,
    ddgst: bool,
    cid: u16,
    now: u64,
}

impl Host {
    fn new(target: &Arc<Target>) -> Self {
        Self::with_limits(target, QueueLimits::default())
    }

    fn with_limits(target: &Arc<Target>, limits: QueueLimits) -> Self {
        Self {
            qp: QueuePair::new(target.clone(), 1, limits),
            hdgst: false,
            ddgst: false,
            cid: 0,
            now: 1000,
        }
    }

    fn send(&mut self, bytes: &[u8]) -> Vec<Rsp> {
        // Feed in odd-sized pieces so partial headers and payloads are exercised.
        let mut pending: Vec<u8> = Vec::new();
        for chunk in bytes.chunks(97) {
            pending.extend_from_slice(chunk);
            let used = self.qp.handle_input(&pending, self.now);
            pending.drain(..used);
        }
        assert!(
            pending.is_empty() || self.qp.close_reason().is_some(),
            "queue left {} bytes unconsumed",
            pending.len()
        );
        self.pump()
    }

    fn pump(&mut self) -> Vec<Rsp> {
        let mut cx = Context::from_waker(Waker::noop());
        for _ in 0..100 {
            if !self.qp.poll_completions(&mut cx) {
                break;
            }
        }
        let mut out = Vec::new();
        self.qp.drain_tx(&mut out);
        self.decode(&out)
    }

    fn decode(&self, mut b: &[u8]) -> Vec<Rsp> {
        let cfg = DecodeConfig {
            role: Role::Host,
            hdgst: self.hdgst,
            ddgst: self.ddgst,
            max_data: 1 << 24,
            connected: true,
        };
        let mut v = Vec::new();
        while !b.is_empty() {
            let mut c = cfg;
            if b[0] == PduType::ICResp as u8 {
                c = DecodeConfig::initial(Role::Host);
            }
            let p: Parsed = pdu::parse_header(b, &c)
                .expect("target sent a valid PDU")
                .expect("complete PDU");
            let data = b[p.data_offset..p.data_offset + p.data_len].to_vec();
            if p.has_ddgst {
                let d = &b[p.data_offset + p.data_len..p.data_offset + p.data_len + 4];
                assert_eq!(
                    u32::from_le_bytes(d.try_into().unwrap()),
                    pdu::crc32c(&data),
                    "data digest"
                );
            }
            v.push(match p.header {
                PduHeader::ICResp(r) => Rsp::IcResp(r),
                PduHeader::CapsuleResp(c) => Rsp::Cpl(c),
                PduHeader::C2HData(h) => Rsp::C2H(h, data),
                PduHeader::R2T(r) => Rsp::R2T(r),
                PduHeader::C2HTermReq(t) => Rsp::Term(t),
                other => panic!("unexpected {other:?}"),
            });
            b = &b[p.plen..];
        }
        v
    }

    fn icreq(&mut self, hdgst: bool, ddgst: bool) {
        let req = ICReq {
            pfv: 0,
            hpda: 0,
            hdgst,
            ddgst,
            maxr2t: 0,
        };
        let mut b = Vec::new();
        pdu::encode_icreq(&req, &mut b);
        let r = self.send(&b);
        let [Rsp::IcResp(resp)] = &r[..] else {
            panic!("{r:?}")
        };
        pdu::validate_icresp(&req, resp).expect("ICResp passes the Linux host's checks");
        self.hdgst = hdgst;
        self.ddgst = ddgst;
    }

    fn capsule(&mut self, mut cmd: NvmeCmd, data: &[u8]) -> Vec<Rsp> {
        self.cid = self.cid.wrapping_add(1);
        cmd.set_cid(self.cid);
        let mut b = Vec::new();
        pdu::encode_capsule_cmd(&cmd, data.len(), self.hdgst, self.ddgst, &mut b);
        b.extend_from_slice(data);
        if self.ddgst && !data.is_empty() {
            pdu::encode_ddgst(pdu::crc32c(data), &mut b);
        }
        self.send(&b)
    }

    fn cpl(&mut self, cmd: NvmeCmd, data: &[u8]) -> NvmeCpl {
        let r = self.capsule(cmd, data);
        match r.last() {
            Some(Rsp::Cpl(c)) => *c,
            _ => panic!("no completion: {r:?}"),
        }
    }

    fn connect(&mut self, qid: u16, cntlid: u16, subnqn: &str, hostnqn: &str) -> NvmeCpl {
        self.connect_sqsize(qid, cntlid, subnqn, hostnqn, 127)
    }

    fn connect_sqsize(
        &mut self,
        qid: u16,
        cntlid: u16,
        subnqn: &str,
        hostnqn: &str,
        sqsize: u16,
    ) -> NvmeCpl {
        let mut c = NvmeCmd::default();
        c.set_opcode(admin_opc::FABRICS);
        c.0[4] = fctype::CONNECT;
        c.set_cdw(10, u32::from(qid) << 16);
        c.set_cdw(11, u32::from(sqsize));
        c.set_cdw(12, 5000);
        c.set_sgl(SglDescriptor {
            addr: 0,
            len: 1024,
            id: SGL_ID_DATA_BLOCK_OFFSET,
        });
        let d = ConnectData {
            hostid: [9; 16],
            cntlid,
            subnqn: subnqn.into(),
            hostnqn: hostnqn.into(),
        };
        self.cpl(c, &d.encode())
    }

    fn prop_set(&mut self, ofst: u32, val: u64) -> NvmeCpl {
        let mut c = NvmeCmd::default();
        c.set_opcode(admin_opc::FABRICS);
        c.0[4] = fctype::PROPERTY_SET;
        c.set_cdw(11, ofst);
        c.set_cdw(12, val as u32);
        c.set_cdw(13, (val >> 32) as u32);
        self.cpl(c, &[])
    }

    fn set_queues(&mut self, n: u32) -> NvmeCpl {
        let mut c = NvmeCmd::default();
        c.set_opcode(admin_opc::SET_FEATURES);
        c.set_cdw(10, u32::from(spec::feat::NUMBER_OF_QUEUES));
        c.set_cdw(11, ((n - 1) << 16) | (n - 1));
        self.cpl(c, &[])
    }
}

fn io_cmd(opc: u8, slba: u64, nlb: u32, host_data: bool) -> NvmeCmd {
    let mut c = NvmeCmd::default();
    c.set_opcode(opc);
    c.set_nsid(1);
    c.set_cdw(10, slba as u32);
    c.set_cdw(11, (slba >> 32) as u32);
    c.set_cdw(12, nlb - 1);
    let len = nlb * 512;
    c.set_sgl(SglDescriptor {
        addr: 0,
        len,
        id: if host_data {
            SGL_ID_TRANSPORT_DATA_BLOCK
        } else {
            SGL_ID_DATA_BLOCK_OFFSET
        },
    });
    c
}

/// Admin bring-up like the Linux host, then one connected I/O queue.
fn bring_up(target: &Arc<Target>, digests: bool) -> (Host, Host) {
    bring_up_with(target, digests, QueueLimits::default())
}

fn bring_up_with(target: &Arc<Target>, digests: bool, limits: QueueLimits) -> (Host, Host) {
    let mut admin = Host::new(target);
    admin.icreq(digests, digests);
    let c = admin.connect_sqsize(0, 0xffff, NQN, HOST, 31);
    assert!(c.status.is_success(), "{c:?}");
    let cntlid = c.dw0 as u16;
    assert!(
        admin
            .prop_set(prop::CC, 1 | (6 << 16) | (4 << 20))
            .status
            .is_success()
    );
    assert!(admin.set_queues(2).status.is_success());
    let mut io = Host::with_limits(target, limits);
    io.icreq(digests, digests);
    let c = io.connect(1, cntlid, NQN, HOST);
    assert!(c.status.is_success(), "{c:?}");
    assert_eq!(io.qp.qid(), Some(1));
    (admin, io)
}

/// The H2CData PDUs that answer `r2t` with `data`, in MAXH2CDATA pieces,
/// with the digests the connection negotiated.
fn h2c_for(io: &Host, r2t: &pdu::R2T, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut off = 0;
    while off < data.len() {
        let n = (data.len() - off).min(ctrlr::MAXH2CDATA as usize);
        let h = pdu::H2CData {
            cccid: r2t.cccid,
            ttag: r2t.ttag,
            datao: off as u32,
            datal: n as u32,
            last: off + n == data.len(),
        };
        crate::host::encode_h2c(&h, &data[off..off + n], io.hdgst, io.ddgst, &mut out);
        off += n;
    }
    out
}

fn write(io: &mut Host, slba: u64, data: &[u8]) -> NvmeCpl {
    let nlb = (data.len() / 512) as u32;
    if data.len() <= ctrlr::IN_CAPSULE_DATA_SIZE as usize {
        return io.cpl(io_cmd(io_opc::WRITE, slba, nlb, false), data);
    }
    let r = io.capsule(io_cmd(io_opc::WRITE, slba, nlb, true), &[]);
    let [Rsp::R2T(r2t)] = &r[..] else {
        panic!("expected R2T: {r:?}")
    };
    assert_eq!(r2t.r2tl as usize, data.len());
    let out = h2c_for(io, r2t, data);
    let r = io.send(&out);
    match r.last() {
        Some(Rsp::Cpl(c)) => *c,
        _ => panic!("{r:?}"),
    }
}

fn read(io: &mut Host, slba: u64, nlb: u32) -> (NvmeCpl, Vec<u8>) {
    let r = io.capsule(io_cmd(io_opc::READ, slba, nlb, true), &[]);
    let mut data = Vec::new();
    let mut cpl = None;
    for x in r {
        match x {
            Rsp::C2H(h, d) => {
                assert_eq!(h.datao as usize, data.len());
                data.extend_from_slice(&d);
            }
            Rsp::Cpl(c) => cpl = Some(c),
            other => panic!("{other:?}"),
        }
    }
    (cpl.expect("read completion"), data)
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn expect_term(r: &[Rsp], fes: FatalErrorStatus) {
    match r.last() {
        Some(Rsp::Term(t)) => assert_eq!(t.fes, fes),
        _ => panic!("expected C2HTermReq {fes:?}: {r:?}"),
    }
}

/// Counts responses per CID in what the target sent.
fn responses(r: &[Rsp]) -> Vec<u16> {
    r.iter()
        .filter_map(|x| match x {
            Rsp::Cpl(c) => Some(c.cid),
            Rsp::C2H(h, _) if h.success => Some(h.cccid),
            _ => None,
        })
        .collect()
}
