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
    let bdev = RamBdev::new("t", 64 << 20, 512).unwrap();
    let mut ana_map = std::collections::BTreeMap::new();
    ana_map.insert(1, ana);
    Target::new(TargetConfig {
        subsystems: vec![SubsystemConfig {
            nqn: NQN.into(),
            serial: "S1".into(),
            model: "Strata".into(),
            allow_any_host: false,
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
        Self {
            qp: QueuePair::new(target.clone(), 1, QueueLimits::default()),
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
        let mut c = NvmeCmd::default();
        c.set_opcode(admin_opc::FABRICS);
        c.0[4] = fctype::CONNECT;
        c.set_cdw(10, u32::from(qid) << 16);
        c.set_cdw(11, 127);
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
    let mut admin = Host::new(target);
    admin.icreq(digests, digests);
    let c = admin.connect(0, 0xffff, NQN, HOST);
    assert!(c.status.is_success(), "{c:?}");
    let cntlid = c.dw0 as u16;
    assert!(
        admin
            .prop_set(prop::CC, 1 | (6 << 16) | (4 << 20))
            .status
            .is_success()
    );
    assert!(admin.set_queues(2).status.is_success());
    let mut io = Host::new(target);
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
