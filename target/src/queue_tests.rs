//! Queue-pair tests: an in-memory host drives real queue pairs, a real
//! controller and a RAM bdev through the PDU codec; no sockets.

use super::*;
use crate::bdev::ram::RamBdev;
use crate::pdu::{ICReq, Parsed};
use crate::spec::{self, ConnectData, SglDescriptor, prop};
use crate::subsystem::{NamespaceConfig, PortConfig, SubsystemConfig, TargetConfig};
use std::task::Waker;

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
    let mut off = 0;
    let mut out = Vec::new();
    while off < data.len() {
        let n = (data.len() - off).min(ctrlr::MAXH2CDATA as usize);
        let h = pdu::H2CData {
            cccid: r2t.cccid,
            ttag: r2t.ttag,
            datao: off as u32,
            datal: n as u32,
            last: off + n == data.len(),
        };
        pdu::encode_h2c_data(&h, io.hdgst, io.ddgst, &mut out);
        out.extend_from_slice(&data[off..off + n]);
        if io.ddgst {
            pdu::encode_ddgst(pdu::crc32c(&data[off..off + n]), &mut out);
        }
        off += n;
    }
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

#[test]
fn read_write_in_capsule_and_r2t_with_and_without_digests() {
    for digests in [false, true] {
        let t = target_with(AnaState::Optimized);
        let (_admin, mut io) = bring_up(&t, digests);
        let small = pattern(4096, 1);
        assert!(write(&mut io, 8, &small).status.is_success());
        let (c, d) = read(&mut io, 8, 8);
        assert!(c.status.is_success());
        assert_eq!(d, small);

        let big = pattern(1 << 20, 2);
        assert!(write(&mut io, 4096, &big).status.is_success());
        let (c, d) = read(&mut io, 4096, 2048);
        assert!(c.status.is_success());
        assert!(d == big, "1 MiB read back differs");

        // Flush, Write Zeroes and Deallocate.
        let mut f = NvmeCmd::default();
        f.set_opcode(io_opc::FLUSH);
        f.set_nsid(1);
        assert!(io.cpl(f, &[]).status.is_success());
        assert!(
            io.cpl(io_cmd(io_opc::WRITE_ZEROES, 8, 4, false), &[])
                .status
                .is_success()
        );
        let (_, d) = read(&mut io, 8, 8);
        assert!(d[..2048].iter().all(|&b| b == 0));
        assert_eq!(&d[2048..], &small[2048..]);

        let mut dsm = io_cmd(io_opc::DATASET_MANAGEMENT, 0, 1, false);
        dsm.set_cdw(10, 0); // one range
        dsm.set_cdw(11, 1 << 2); // AD
        dsm.set_cdw(12, 0);
        let mut range = [0u8; 16];
        range[4..8].copy_from_slice(&2048u32.to_le_bytes());
        range[8..16].copy_from_slice(&4096u64.to_le_bytes());
        dsm.set_sgl(SglDescriptor {
            addr: 0,
            len: 16,
            id: SGL_ID_DATA_BLOCK_OFFSET,
        });
        assert!(io.cpl(dsm, &range).status.is_success());
        let (_, d) = read(&mut io, 4096, 2048);
        assert!(
            d.iter().all(|&b| b == 0),
            "deallocated blocks read as zeros"
        );
        assert!(io.qp.close_reason().is_none());
    }
}

#[test]
fn steady_state_io_allocates_no_buffers() {
    let t = target_with(AnaState::Optimized);
    let (_admin, mut io) = bring_up(&t, false);
    let data = pattern(4096, 3);
    for i in 0..16 {
        write(&mut io, i * 8, &data);
        read(&mut io, i * 8, 8);
    }
    let warm = io.qp.buffer_allocations();
    for i in 0..500 {
        write(&mut io, (i % 64) * 8, &data);
        read(&mut io, (i % 64) * 8, 8);
    }
    assert_eq!(io.qp.buffer_allocations(), warm);
}

#[test]
fn data_digest_error_fails_the_command_not_the_connection() {
    let t = target_with(AnaState::Optimized);
    let (_admin, mut io) = bring_up(&t, true);
    let data = pattern(4096, 4);
    let mut b = Vec::new();
    let mut cmd = io_cmd(io_opc::WRITE, 0, 8, false);
    cmd.set_cid(77);
    pdu::encode_capsule_cmd(&cmd, data.len(), true, true, &mut b);
    b.extend_from_slice(&data);
    pdu::encode_ddgst(pdu::crc32c(&data) ^ 1, &mut b);
    let r = io.send(&b);
    let [Rsp::Cpl(c)] = &r[..] else {
        panic!("{r:?}")
    };
    assert_eq!(c.status, Status::TRANSIENT_TRANSPORT_ERROR);
    assert_eq!(c.cid, 77);
    assert!(io.qp.close_reason().is_none());
    assert!(write(&mut io, 0, &data).status.is_success());
}

fn expect_term(r: &[Rsp], fes: FatalErrorStatus) {
    match r.last() {
        Some(Rsp::Term(t)) => assert_eq!(t.fes, fes),
        _ => panic!("expected C2HTermReq {fes:?}: {r:?}"),
    }
}

#[test]
fn malformed_pdus_end_the_connection_with_termreq() {
    let t = target_with(AnaState::Optimized);
    // A capsule before ICReq.
    let mut h = Host::new(&t);
    let mut b = Vec::new();
    pdu::encode_capsule_cmd(&NvmeCmd::default(), 0, false, false, &mut b);
    let r = h.send(&b);
    expect_term(&r, FatalErrorStatus::PduSequenceError);
    assert!(matches!(h.qp.close_reason(), Some(CloseReason::Fatal(_))));

    // Unknown PDU type after IC.
    let mut h = Host::new(&t);
    h.icreq(false, false);
    let mut bad = vec![0x0e, 0, 8, 0, 8, 0, 0, 0];
    bad.resize(8, 0);
    expect_term(&h.send(&bad), FatalErrorStatus::InvalidHeaderField);

    // Wrong header length for a capsule.
    let mut h = Host::new(&t);
    h.icreq(false, false);
    let mut b = Vec::new();
    pdu::encode_capsule_cmd(&NvmeCmd::default(), 0, false, false, &mut b);
    b[2] = 70;
    expect_term(&h.send(&b), FatalErrorStatus::InvalidHeaderField);

    // Bad header digest.
    let mut h = Host::new(&t);
    h.icreq(true, false);
    let mut b = Vec::new();
    pdu::encode_capsule_cmd(&NvmeCmd::default(), 0, true, false, &mut b);
    b[72] ^= 0xff;
    expect_term(&h.send(&b), FatalErrorStatus::HeaderDigestError);

    // H2CData for a transfer tag that has no R2T.
    let (_a, mut io) = bring_up(&t, false);
    let mut b = Vec::new();
    pdu::encode_h2c_data(
        &pdu::H2CData {
            cccid: 1,
            ttag: 5,
            datao: 0,
            datal: 512,
            last: true,
        },
        false,
        false,
        &mut b,
    );
    b.extend_from_slice(&[0; 512]);
    expect_term(&io.send(&b), FatalErrorStatus::InvalidHeaderField);

    // In-capsule data beyond the in-capsule limit.
    let (_a, mut io) = bring_up(&t, false);
    let big = vec![0u8; ctrlr::IN_CAPSULE_DATA_SIZE as usize + 512];
    let r = io.capsule(
        io_cmd(io_opc::WRITE, 0, (big.len() / 512) as u32, false),
        &big,
    );
    expect_term(&r, FatalErrorStatus::DataLimitExceeded);
}

#[test]
fn r2t_data_beyond_the_transfer_is_out_of_range() {
    let t = target_with(AnaState::Optimized);
    let (_a, mut io) = bring_up(&t, false);
    let r = io.capsule(io_cmd(io_opc::WRITE, 0, 64, true), &[]);
    let [Rsp::R2T(r2t)] = &r[..] else {
        panic!("{r:?}")
    };
    let mut b = Vec::new();
    let h = pdu::H2CData {
        cccid: r2t.cccid,
        ttag: r2t.ttag,
        datao: 0,
        datal: r2t.r2tl + 512,
        last: true,
    };
    pdu::encode_h2c_data(&h, false, false, &mut b);
    b.extend_from_slice(&vec![0; h.datal as usize]);
    expect_term(&io.send(&b), FatalErrorStatus::DataOutOfRange);
}

#[test]
fn io_errors_return_the_specified_status() {
    let t = target_with(AnaState::Optimized);
    let (_a, mut io) = bring_up(&t, false);
    // Beyond the namespace.
    let (c, _) = read(&mut io, (64 << 20) / 512 - 4, 8);
    assert_eq!(c.status, Status::LBA_OUT_OF_RANGE.dnr());
    // Beyond MDTS (2 MiB read).
    let c = io.capsule(io_cmd(io_opc::READ, 0, 4096, true), &[]);
    let Some(Rsp::Cpl(c)) = c.last() else {
        panic!()
    };
    assert_eq!(c.status, Status::INVALID_FIELD.dnr());
    // Unknown namespace.
    let mut cmd = io_cmd(io_opc::READ, 0, 8, true);
    cmd.set_nsid(9);
    assert_eq!(io.cpl(cmd, &[]).status, Status::INVALID_NAMESPACE.dnr());
    // SGL length that does not match NLB.
    let mut cmd = io_cmd(io_opc::READ, 0, 8, true);
    cmd.set_sgl(SglDescriptor {
        addr: 0,
        len: 512,
        id: SGL_ID_TRANSPORT_DATA_BLOCK,
    });
    assert_eq!(
        io.cpl(cmd, &[]).status,
        Status::DATA_SGL_LENGTH_INVALID.dnr()
    );
    // An admin command on an I/O queue.
    let mut cmd = NvmeCmd::default();
    cmd.set_opcode(admin_opc::IDENTIFY);
    assert_eq!(io.cpl(cmd, &[]).status, Status::INVALID_OPCODE.dnr());
    // A second Connect on an established queue.
    assert_eq!(
        io.connect(1, 1, NQN, HOST).status,
        Status::COMMAND_SEQUENCE_ERROR.dnr()
    );
    // Unknown I/O opcode.
    assert_eq!(
        io.cpl(io_cmd(0x7e, 0, 1, true), &[]).status,
        Status::INVALID_OPCODE.dnr()
    );
    assert!(
        io.qp.close_reason().is_none(),
        "command errors keep the connection"
    );
}

#[test]
fn commands_before_connect_and_bad_connects_are_refused() {
    let t = target_with(AnaState::Optimized);
    let mut h = Host::new(&t);
    h.icreq(false, false);
    let mut id = NvmeCmd::default();
    id.set_opcode(admin_opc::IDENTIFY);
    assert_eq!(h.cpl(id, &[]).status, Status::COMMAND_SEQUENCE_ERROR.dnr());
    let c = h.connect(0, 0xffff, "nqn.2026-11.dev.strata:nope", HOST);
    assert_eq!(c.status.sc, Status::CONNECT_INVALID_PARAM.sc);
    let c = h.connect(0, 0xffff, NQN, "nqn.2014-08.org.nvmexpress:uuid:stranger");
    assert_eq!(c.status.sc, Status::CONNECT_INVALID_HOST.sc);
    assert!(c.status.dnr);
    // The queue is still usable for a correct Connect.
    assert!(h.connect(0, 0xffff, NQN, HOST).status.is_success());
}

#[test]
fn inaccessible_path_fails_io_with_ana_status() {
    let t = target_with(AnaState::Optimized);
    let (_a, mut io) = bring_up(&t, false);
    let (c, _) = read(&mut io, 0, 8);
    assert!(c.status.is_success());
    t.set_ana_state(1, 1, AnaState::Inaccessible);
    let (c, _) = read(&mut io, 0, 8);
    assert_eq!(c.status, Status::ANA_INACCESSIBLE);
    t.set_ana_state(1, 1, AnaState::Optimized);
    let (c, _) = read(&mut io, 0, 8);
    assert!(c.status.is_success());
}

#[test]
fn admin_queue_close_destroys_controller_and_io_queue_follows() {
    let t = target_with(AnaState::Optimized);
    let (mut admin, mut io) = bring_up(&t, false);
    admin.qp.on_disconnect();
    io.qp.on_tick(io.now + 10);
    assert_eq!(
        io.qp.close_reason(),
        Some(&CloseReason::Disconnected("controller destroyed"))
    );
}

#[test]
fn keep_alive_expiry_destroys_the_controller() {
    let t = target_with(AnaState::Optimized);
    let (mut admin, mut io) = bring_up(&t, false);
    admin.qp.on_tick(admin.now + 60_000);
    assert_eq!(
        admin.qp.close_reason(),
        Some(&CloseReason::Disconnected("keep-alive timeout"))
    );
    io.qp.on_tick(io.now + 60_000);
    assert!(io.qp.close_reason().is_some());
}

#[test]
fn large_write_data_can_be_read_straight_into_the_command_buffer() {
    for digests in [false, true] {
        let t = target_with(AnaState::Optimized);
        let (_admin, mut io) = bring_up(&t, digests);
        let data = pattern(1 << 20, 9);
        let r = io.capsule(io_cmd(io_opc::WRITE, 2048, 2048, true), &[]);
        let [Rsp::R2T(r2t)] = &r[..] else {
            panic!("{r:?}")
        };
        let (r2t_cccid, r2t_ttag) = (r2t.cccid, r2t.ttag);
        let mut off = 0;
        let mut direct = 0;
        while off < data.len() {
            let n = (data.len() - off).min(ctrlr::MAXH2CDATA as usize);
            let mut hdr = Vec::new();
            pdu::encode_h2c_data(
                &pdu::H2CData {
                    cccid: r2t_cccid,
                    ttag: r2t_ttag,
                    datao: off as u32,
                    datal: n as u32,
                    last: off + n == data.len(),
                },
                io.hdgst,
                io.ddgst,
                &mut hdr,
            );
            assert_eq!(io.qp.handle_input(&hdr, 0), hdr.len());
            // The "socket" writes the payload into the buffer in odd chunks.
            let mut p = 0;
            while p < n {
                let dst = io.qp.direct_rx().expect("payload goes direct");
                let k = dst.len().min(10_000).min(n - p);
                dst[..k].copy_from_slice(&data[off + p..off + p + k]);
                io.qp.direct_rx_done(k);
                p += k;
                direct += k;
                if n - p < super::DIRECT_RX_MIN {
                    break;
                }
            }
            let mut tail = data[off + p..off + n].to_vec();
            if io.ddgst {
                pdu::encode_ddgst(pdu::crc32c(&data[off..off + n]), &mut tail);
            }
            assert_eq!(io.qp.handle_input(&tail, 0), tail.len());
            off += n;
        }
        assert!(direct > data.len() / 2);
        let r = io.pump();
        let Some(Rsp::Cpl(c)) = r.last() else {
            panic!("{r:?}")
        };
        assert!(c.status.is_success());
        let (c, back) = read(&mut io, 2048, 2048);
        assert!(c.status.is_success());
        assert!(
            back == data,
            "direct-read write data differs (digests={digests})"
        );
    }
}

// ----------------------------------------------------------------------
// Hardening: completion accounting, Connect bounds, resource limits.

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

/// The two commands a random-command fuzzer found unanswered, then a
/// sweep of every opcode with every PSDT value, random NSIDs and random
/// reserved fields: each gets exactly one response with the expected
/// status, and the accounting holds after every command.
#[test]
fn every_admin_and_io_opcode_gets_exactly_one_response() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let t = target_with(AnaState::Optimized);
    let (mut admin, mut io) = bring_up(&t, false);
    let mut reported = Vec::new();
    for (opc, psdt, cdw10, cdw11) in [
        (0xb8u8, 0b11u8, 0xC281_B767u32, 0xA9D5_B174u32),
        (0x89, 0b00, 0xB9F0_B9BB, 0),
    ] {
        let mut c = NvmeCmd::default();
        rng.fill(&mut c.0[..]);
        c.set_opcode(opc);
        c.0[1] = psdt << 6;
        c.set_nsid(2);
        c.set_cdw(10, cdw10);
        c.set_cdw(11, cdw11);
        let r = admin.capsule(c, &[]);
        assert_eq!(responses(&r), vec![admin.cid], "opc {opc:#x}: {r:?}");
        let Some(Rsp::Cpl(cpl)) = r.last() else {
            panic!()
        };
        let want = if psdt == 0b11 {
            Status::INVALID_FIELD.dnr()
        } else {
            // 0x89 is host-to-controller with a data pointer but no data.
            Status::INVALID_FIELD.dnr()
        };
        assert_eq!(cpl.status, want, "opc {opc:#x}");
        reported.push(cpl.status);
    }
    for queue in 0..2 {
        for opc in 0..=255u8 {
            // Commands with side effects on the association are covered by
            // their own tests: Connect/Disconnect/Property Set (Fabrics),
            // AER (parks by design), Set Features (may change KATO).
            if matches!(
                opc,
                admin_opc::FABRICS | admin_opc::ASYNC_EVENT_REQUEST | admin_opc::SET_FEATURES
            ) {
                continue;
            }
            for psdt in 0..4u8 {
                let h = if queue == 0 { &mut admin } else { &mut io };
                let mut c = NvmeCmd::default();
                rng.fill(&mut c.0[..]);
                c.set_opcode(opc);
                c.0[1] = psdt << 6; // FUSE 0: fused commands have their own status
                c.set_nsid(rng.gen_range(0..4));
                let r = h.capsule(c, &[]);
                if h.qp.close_reason().is_some() {
                    panic!("queue {queue} opc {opc:#x} psdt {psdt} closed the connection: {r:?}");
                }
                let got = responses(&r);
                // An I/O write with a host data SGL legitimately waits for data.
                if got.is_empty() && r.iter().any(|x| matches!(x, Rsp::R2T(_))) {
                    let Some(Rsp::R2T(r2t)) = r.iter().find(|x| matches!(x, Rsp::R2T(_))) else {
                        unreachable!()
                    };
                    // Finish it with zeros so the slot is answered.
                    let mut out = Vec::new();
                    let n = r2t.r2tl as usize;
                    pdu::encode_h2c_data(
                        &pdu::H2CData {
                            cccid: r2t.cccid,
                            ttag: r2t.ttag,
                            datao: 0,
                            datal: n as u32,
                            last: true,
                        },
                        false,
                        false,
                        &mut out,
                    );
                    out.resize(out.len() + n, 0);
                    let r = h.send(&out);
                    assert_eq!(responses(&r), vec![h.cid], "write after R2T: {r:?}");
                } else {
                    assert_eq!(
                        got,
                        vec![h.cid],
                        "queue {queue} opc {opc:#x} psdt {psdt}: {r:?}"
                    );
                }
                let Some(Rsp::Cpl(cpl)) = r.iter().rev().find(|x| matches!(x, Rsp::Cpl(_))) else {
                    continue;
                };
                if psdt == 0b11 && queue == 0 {
                    assert_eq!(cpl.status, Status::INVALID_FIELD.dnr(), "opc {opc:#x}");
                }
                h.qp.check_completions().unwrap();
            }
        }
    }
    assert_eq!(admin.qp.stats.commands, admin.qp.stats.responses);
    assert_eq!(io.qp.stats.commands, io.qp.stats.responses);
}

#[test]
fn random_admin_and_io_streams_keep_the_completion_invariant() {
    use rand::{Rng, SeedableRng};
    for seed in 0..8u64 {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let t = target_with(AnaState::Optimized);
        let (mut admin, mut io) = bring_up(&t, false);
        for _ in 0..2000 {
            let h = if rng.gen_bool(0.5) {
                &mut admin
            } else {
                &mut io
            };
            if h.qp.close_reason().is_some() {
                break;
            }
            let mut c = NvmeCmd::default();
            rng.fill(&mut c.0[..]);
            // Keep the association: no Fabrics (Disconnect, CC changes).
            if c.opcode() == admin_opc::FABRICS {
                c.set_opcode(0);
            }
            let data: Vec<u8> = if rng.gen_bool(0.2) {
                let n = rng.gen_range(1..2048);
                c.set_sgl(SglDescriptor {
                    addr: 0,
                    len: n,
                    id: SGL_ID_DATA_BLOCK_OFFSET,
                });
                vec![0xa5; n as usize]
            } else {
                vec![]
            };
            let _ = h.capsule(c, &data);
            h.qp.check_completions()
                .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        }
    }
}

#[test]
fn admin_sqsize_is_bounded_and_refusals_leave_nothing_registered() {
    for subnqn in [NQN, spec::DISCOVERY_NQN] {
        let t = target_with(AnaState::Optimized);
        for sqsize in [0xffffu16, 128, 0] {
            let mut h = Host::new(&t);
            h.icreq(false, false);
            let c = h.connect_sqsize(0, 0xffff, subnqn, HOST, sqsize);
            assert_eq!(
                c.status,
                Status::CONNECT_INVALID_PARAM.dnr(),
                "{subnqn} sqsize {sqsize}"
            );
            assert_eq!(c.dw0, 44, "IATTR=0 (SQE), IPO=44 (SQSIZE)");
            drop(h);
            assert!(
                t.controllers().is_empty(),
                "{subnqn}: refused connect left a controller"
            );
        }
        let mut h = Host::new(&t);
        h.icreq(false, false);
        assert!(
            h.connect_sqsize(0, 0xffff, subnqn, HOST, 127)
                .status
                .is_success()
        );
        assert_eq!(t.controllers().len(), 1);
        // The queue's own arithmetic at the largest admin depth.
        for _ in 0..300 {
            let mut ka = NvmeCmd::default();
            ka.set_opcode(admin_opc::KEEP_ALIVE);
            // Before CC.EN this is a sequence error; what matters is one
            // completion each, with SQHD wrapping inside 128 entries.
            assert!(h.cpl(ka, &[]).sqhd <= 127);
        }
        drop(h);
        assert!(
            t.controllers().is_empty(),
            "dropping the queue releases the controller"
        );
    }
}

#[test]
fn empty_host_nqn_is_accepted_only_where_any_host_may_connect() {
    let open = target_hosts(AnaState::Optimized, true);
    let mut h = Host::new(&open);
    h.icreq(false, false);
    let c = h.connect(0, 0xffff, NQN, "");
    assert!(c.status.is_success(), "{c:?}");

    let listed = target_hosts(AnaState::Optimized, false);
    let mut h = Host::new(&listed);
    h.icreq(false, false);
    let c = h.connect(0, 0xffff, NQN, "");
    assert_eq!(c.status, Status::CONNECT_INVALID_HOST.dnr());
    assert_eq!(c.dw0, (1 << 16) | 512, "IATTR=1 (data), IPO=512 (HOSTNQN)");
    // Discovery takes anyone.
    let mut h = Host::new(&listed);
    h.icreq(false, false);
    assert!(
        h.connect(0, 0xffff, spec::DISCOVERY_NQN, "")
            .status
            .is_success()
    );
}

#[test]
fn controller_reset_answers_parked_aers() {
    let t = target_with(AnaState::Optimized);
    let (mut admin, _io) = bring_up(&t, false);
    let mut aer = NvmeCmd::default();
    aer.set_opcode(admin_opc::ASYNC_EVENT_REQUEST);
    let r = admin.capsule(aer, &[]);
    assert!(responses(&r).is_empty(), "AER parks");
    let aer_cid = admin.cid;
    assert_eq!(admin.qp.commands_in_flight(), 1);
    let r = admin.capsule(
        {
            let mut c = NvmeCmd::default();
            c.set_opcode(admin_opc::FABRICS);
            c.0[4] = fctype::PROPERTY_SET;
            c.set_cdw(11, prop::CC);
            c.set_cdw(12, 0);
            c
        },
        &[],
    );
    let cpls: Vec<_> = r
        .iter()
        .filter_map(|x| if let Rsp::Cpl(c) = x { Some(*c) } else { None })
        .collect();
    assert!(
        cpls.iter()
            .any(|c| c.cid == aer_cid && c.status == Status::ABORTED_SQ_DELETION),
        "{cpls:?}"
    );
    admin.qp.check_completions().unwrap();
    assert_eq!(admin.qp.stats.commands, admin.qp.stats.responses);
}

#[test]
fn a_host_that_never_reads_stops_being_read_and_is_cut_off() {
    let t = target_with(AnaState::Optimized);
    let limits = QueueLimits {
        max_pending_output: 1 << 20,
        ..QueueLimits::default()
    };
    let (_admin, mut io) = bring_up_with(&t, false, limits);
    // 256 reads of 128 KiB, sent in one go and never drained.
    let mut bytes = Vec::new();
    for i in 0..256u16 {
        let mut c = io_cmd(io_opc::READ, 0, 256, true);
        c.set_cid(1000 + i);
        pdu::encode_capsule_cmd(&c, 0, false, false, &mut bytes);
    }
    let mut cx = Context::from_waker(Waker::noop());
    let mut used = 0;
    for _ in 0..10 {
        used += io.qp.handle_input(&bytes[used..], io.now);
        io.qp.poll_completions(&mut cx);
    }
    assert!(used < bytes.len(), "the queue stopped taking commands");
    assert!(!io.qp.wants_input());
    assert!(io.qp.stats.input_paused > 0);
    let owed: usize = io.qp.tx.iter().map(|s| s.remaining().len()).sum();
    assert!(
        owed <= (1 << 20) + (128 << 10) + 4096,
        "output bounded: {owed}"
    );
    io.qp.check_completions().unwrap();
    // Output that never moves ends the connection, without waiting to drain.
    io.qp.on_tick(io.now + 1);
    io.qp.on_tick(io.now + limits.tx_stall_timeout_ms + 2);
    assert!(io.qp.must_close_now(), "{:?}", io.qp.close_reason());
}

#[test]
fn r2t_budget_bounds_solicited_writes_and_serves_them_in_order() {
    let t = target_with(AnaState::Optimized);
    let limits = QueueLimits {
        max_r2t_bytes: 2 << 20,
        ..QueueLimits::default()
    };
    let (_admin, mut io) = bring_up_with(&t, false, limits);
    let mut r2ts = Vec::new();
    for i in 0..6u64 {
        let r = io.capsule(io_cmd(io_opc::WRITE, i * 2048, 2048, true), &[]);
        r2ts.extend(
            r.into_iter()
                .filter_map(|x| if let Rsp::R2T(r) = x { Some(r) } else { None }),
        );
    }
    assert_eq!(r2ts.len(), 2, "only 2 MiB of R2T outstanding");
    assert_eq!(io.qp.stats.r2t_deferred, 4);
    io.qp.check_completions().unwrap();
    // Each completed write releases budget for the next, oldest first.
    let mut done = 0;
    while let Some(r2t) = r2ts.first().copied() {
        r2ts.remove(0);
        let mut out = Vec::new();
        let n = r2t.r2tl as usize;
        let mut off = 0;
        while off < n {
            let k = (n - off).min(ctrlr::MAXH2CDATA as usize);
            pdu::encode_h2c_data(
                &pdu::H2CData {
                    cccid: r2t.cccid,
                    ttag: r2t.ttag,
                    datao: off as u32,
                    datal: k as u32,
                    last: off + k == n,
                },
                false,
                false,
                &mut out,
            );
            out.resize(out.len() + k, 0x5a);
            off += k;
        }
        let r = io.send(&out);
        done += responses(&r).len();
        r2ts.extend(
            r.into_iter()
                .filter_map(|x| if let Rsp::R2T(r) = x { Some(r) } else { None }),
        );
    }
    assert_eq!(done, 6);
    io.qp.check_completions().unwrap();
}

#[test]
fn withheld_h2c_data_ends_the_connection_after_the_data_phase_timeout() {
    let t = target_with(AnaState::Optimized);
    let (_admin, mut io) = bring_up(&t, false);
    let r = io.capsule(io_cmd(io_opc::WRITE, 0, 2048, true), &[]);
    let [Rsp::R2T(_)] = &r[..] else {
        panic!("{r:?}")
    };
    io.qp.on_tick(io.now + 1000);
    assert!(io.qp.close_reason().is_none());
    io.qp
        .on_tick(io.now + QueueLimits::default().data_phase_timeout_ms + 1);
    assert!(io.qp.must_close_now(), "{:?}", io.qp.close_reason());
}

#[test]
fn connections_that_never_finish_ic_or_connect_time_out() {
    let t = target_with(AnaState::Optimized);
    let timeout = QueueLimits::default().connect_timeout_ms;
    let mut silent = QueuePair::new(t.clone(), 1, QueueLimits::default());
    silent.on_tick(5);
    silent.on_tick(5 + timeout / 2);
    assert!(silent.close_reason().is_none());
    silent.on_tick(6 + timeout);
    assert!(silent.must_close_now());
    let mut h = Host::new(&t);
    h.icreq(false, false);
    h.qp.on_tick(h.now + timeout + 1);
    assert!(h.qp.must_close_now(), "ICReq but no Connect");
    let short = QueueLimits {
        connect_timeout_ms: 1000,
        ..QueueLimits::default()
    };
    let (_admin, mut io) = bring_up_with(&t, false, short);
    io.qp.on_tick(io.now + 1001);
    assert!(
        io.qp.close_reason().is_none(),
        "a connected queue has no connect timeout"
    );
}

#[test]
fn registry_sweep_reaps_controllers_whose_keep_alive_expired() {
    let t = target_with(AnaState::Optimized);
    let (admin, _io) = bring_up(&t, false);
    assert_eq!(t.reap_expired_controllers(admin.now + 1000), 0);
    assert_eq!(t.reap_expired_controllers(admin.now + 60_000), 1);
    assert!(t.controllers().is_empty());
    // The leaked queue then notices and closes.
    std::mem::forget(admin);
}

#[test]
fn deallocate_and_write_zeroes_beyond_the_advertised_limits_are_refused() {
    let t = target_sized(AnaState::Optimized, false, 256 << 20);
    let (_admin, mut io) = bring_up(&t, false);
    let lim = crate::spec::identify::NvmLimits::TARGET;
    let dsm = |ranges: &[(u64, u32)]| {
        let mut c = NvmeCmd::default();
        c.set_opcode(io_opc::DATASET_MANAGEMENT);
        c.set_nsid(1);
        c.set_cdw(10, ranges.len() as u32 - 1);
        c.set_cdw(11, 1 << 2);
        let mut d = Vec::new();
        for &(slba, len) in ranges {
            d.extend_from_slice(&0u32.to_le_bytes());
            d.extend_from_slice(&len.to_le_bytes());
            d.extend_from_slice(&slba.to_le_bytes());
        }
        c.set_sgl(SglDescriptor {
            addr: 0,
            len: d.len() as u32,
            id: SGL_ID_DATA_BLOCK_OFFSET,
        });
        (c, d)
    };
    let (c, d) = dsm(&[(0, lim.dmrsl)]);
    assert!(io.cpl(c, &d).status.is_success());
    let (c, d) = dsm(&[(0, lim.dmrsl + 1)]);
    assert_eq!(io.cpl(c, &d).status, Status::INVALID_FIELD.dnr());
    let half = lim.dmrsl / 2;
    let (c, d) = dsm(&[
        (0, half),
        (u64::from(half), half),
        (u64::from(lim.dmrsl), 1),
    ]);
    assert_eq!(
        io.cpl(c, &d).status,
        Status::INVALID_FIELD.dnr(),
        "DMSL over all ranges"
    );
    let mut wz = io_cmd(io_opc::WRITE_ZEROES, 0, 1, false);
    wz.set_cdw(12, 0xffff); // 65536 blocks of 512 B = 32 MiB: at the limit
    assert!(io.cpl(wz, &[]).status.is_success());
}
