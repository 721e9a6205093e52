use super::*;
use crate::bdev::{BdevChannel, BdevInfo};
use crate::spec::identify::cns;
use crate::spec::{feat, lid, prop};
use crate::subsystem::{NamespaceConfig, PortConfig, SubsystemConfig};
use std::collections::BTreeMap;
use std::sync::atomic::AtomicUsize;

struct TestBdev(BdevInfo);

impl Bdev for TestBdev {
    fn info(&self) -> &BdevInfo {
        &self.0
    }
    fn open_channel(self: Arc<Self>) -> std::io::Result<Box<dyn BdevChannel>> {
        Err(std::io::Error::other("no I/O in controller tests"))
    }
}

fn bdev(num_blocks: u64, block_size: u32, vwc: bool) -> Arc<dyn Bdev> {
    Arc::new(TestBdev(BdevInfo {
        name: "t".into(),
        block_size,
        num_blocks,
        volatile_write_cache: vwc,
        max_io_bytes: 0,
    }))
}

fn ns(nsid: u32, anagrpid: u32) -> NamespaceConfig {
    let b = nsid as u8;
    NamespaceConfig {
        nsid,
        bdev: bdev(1 << 20, 4096, false),
        uuid: [b; 16],
        nguid: [b | 0x40; 16],
        eui64: [b | 0x80; 8],
        anagrpid,
    }
}

fn port(id: u16) -> PortConfig {
    PortConfig {
        id,
        traddr: format!("10.0.0.{id}"),
        trsvcid: "4420".into(),
        adrfam_ipv6: false,
        ana: BTreeMap::new(),
    }
}

const SUB1: &str = "nqn.2024-01.io.strata:sub1";
const SUB2: &str = "nqn.2024-01.io.strata:sub2";
const HOST1: &str = "nqn.2014-08.org.nvmexpress:uuid:host1";
const HOST2: &str = "nqn.2014-08.org.nvmexpress:uuid:host2";
const HOST3: &str = "nqn.2014-08.org.nvmexpress:uuid:host3";

fn hostid(host: &str) -> [u8; 16] {
    [host.len() as u8 ^ host.as_bytes()[host.len() - 1]; 16]
}

fn sub1() -> SubsystemConfig {
    SubsystemConfig {
        nqn: SUB1.into(),
        serial: "SN0001".into(),
        model: "Strata Test".into(),
        allow_any_host: false,
        hosts: vec![HOST1.into(), HOST2.into()],
        namespaces: vec![ns(1, 1), ns(2, 2)],
        ports: vec![1, 2],
    }
}

fn cfg() -> TargetConfig {
    TargetConfig {
        subsystems: vec![
            sub1(),
            SubsystemConfig {
                nqn: SUB2.into(),
                serial: "SN0002".into(),
                model: "Strata Test".into(),
                allow_any_host: true,
                hosts: vec![],
                namespaces: vec![NamespaceConfig {
                    bdev: bdev(1000, 512, true),
                    ..ns(7, 3)
                }],
                ports: vec![1],
            },
        ],
        ports: vec![port(1), port(2)],
    }
}

fn connect_cmd(qid: u16, sqsize: u16, kato: u32) -> NvmeCmd {
    let mut c = NvmeCmd::default();
    c.set_opcode(admin_opc::FABRICS);
    c.set_cid(0x10);
    c.0[4] = fctype::CONNECT;
    c.set_cdw(10, u32::from(qid) << 16);
    c.set_cdw(11, u32::from(sqsize));
    c.set_cdw(12, kato);
    c
}

fn cdata(sub: &str, host: &str, cntlid: u16) -> [u8; CONNECT_DATA_LEN] {
    ConnectData {
        hostid: hostid(host),
        cntlid,
        subnqn: sub.into(),
        hostnqn: host.into(),
    }
    .encode()
}

fn admin_connect(t: &Arc<Target>, port_id: u16, sub: &str, host: &str) -> Arc<Ctrlr> {
    match connect(
        t,
        port_id,
        &connect_cmd(0, 31, 5000),
        &cdata(sub, host, 0xFFFF),
        0,
    ) {
        Ok((Connected::Admin { ctrlr }, cpl)) => {
            assert!(cpl.status.is_success());
            assert_eq!(cpl.dw0, u32::from(ctrlr.cntlid()));
            ctrlr
        }
        Ok(_) => panic!("admin connect gave an I/O queue"),
        Err(cpl) => panic!("admin connect failed: {cpl:?}"),
    }
}

fn connect_err(t: &Arc<Target>, port_id: u16, cmd: &NvmeCmd, data: &[u8]) -> NvmeCpl {
    match connect(t, port_id, cmd, data, 0) {
        Ok(_) => panic!("connect unexpectedly succeeded"),
        Err(c) => c,
    }
}

fn exec(c: &Ctrlr, cmd: &NvmeCmd) -> (NvmeCpl, Vec<u8>) {
    match c.exec_admin(cmd, &[], 0) {
        AdminResult::Complete { cpl, data } => {
            assert_eq!(cpl.cid, cmd.cid());
            (cpl, data)
        }
        AdminResult::Deferred => panic!("unexpectedly deferred"),
    }
}

fn fabrics(fct: u8, cdw10: u32, cdw11: u32, cdw12: u32) -> NvmeCmd {
    let mut c = NvmeCmd::default();
    c.set_opcode(admin_opc::FABRICS);
    c.set_cid(0x20);
    c.0[4] = fct;
    c.set_cdw(10, cdw10);
    c.set_cdw(11, cdw11);
    c.set_cdw(12, cdw12);
    c
}

fn prop_get(c: &Ctrlr, ofst: u32, eight: bool) -> Result<u64, Status> {
    let (cpl, _) = exec(c, &fabrics(fctype::PROPERTY_GET, u32::from(eight), ofst, 0));
    if cpl.status.is_success() {
        Ok(u64::from(cpl.dw0) | (u64::from(cpl.dw1) << 32))
    } else {
        Err(cpl.status)
    }
}

fn prop_set(c: &Ctrlr, ofst: u32, v: u32) -> Status {
    exec(c, &fabrics(fctype::PROPERTY_SET, 0, ofst, v)).0.status
}

/// What the Linux host writes: CSS=NVM, MPS=0, AMS=RR, IOSQES=6, IOCQES=4.
const CC_LINUX: u32 = (6 << 16) | (4 << 20);

fn enable(c: &Ctrlr) {
    assert_eq!(prop_set(c, prop::CC, CC_LINUX), Status::SUCCESS);
    assert_eq!(prop_set(c, prop::CC, CC_LINUX | 1), Status::SUCCESS);
    assert_eq!(prop_get(c, prop::CSTS, false).unwrap() & 1, 1);
    assert!(c.is_enabled());
}

fn bring_up(t: &Arc<Target>, port_id: u16, sub: &str, host: &str) -> Arc<Ctrlr> {
    let c = admin_connect(t, port_id, sub, host);
    enable(&c);
    c
}

fn admin(opc: u8, nsid: u32, cdw10: u32, cdw11: u32) -> NvmeCmd {
    let mut c = NvmeCmd::default();
    c.set_opcode(opc);
    c.set_cid(0x30);
    c.set_nsid(nsid);
    c.set_cdw(10, cdw10);
    c.set_cdw(11, cdw11);
    c
}

fn identify(c: &Ctrlr, cns: u8, nsid: u32, cdw11: u32) -> (NvmeCpl, Vec<u8>) {
    exec(c, &admin(admin_opc::IDENTIFY, nsid, u32::from(cns), cdw11))
}

fn get_log(c: &Ctrlr, lid: u8, lsp: u8, rae: bool, len: u32, off: u64) -> (NvmeCpl, Vec<u8>) {
    get_log_ns(c, lid, lsp, rae, len, off, u32::MAX)
}

fn get_log_ns(
    c: &Ctrlr,
    lid: u8,
    lsp: u8,
    rae: bool,
    len: u32,
    off: u64,
    nsid: u32,
) -> (NvmeCpl, Vec<u8>) {
    let numd = len / 4 - 1;
    let cdw10 =
        u32::from(lid) | (u32::from(lsp) << 8) | (u32::from(rae) << 15) | ((numd & 0xffff) << 16);
    let mut cmd = admin(admin_opc::GET_LOG_PAGE, nsid, cdw10, numd >> 16);
    cmd.set_cdw(12, off as u32);
    cmd.set_cdw(13, (off >> 32) as u32);
    exec(c, &cmd)
}

fn set_feat(c: &Ctrlr, fid: u8, v: u32) -> NvmeCpl {
    exec(c, &admin(admin_opc::SET_FEATURES, 0, u32::from(fid), v)).0
}

fn get_feat(c: &Ctrlr, fid: u8, sel: u32, cdw11: u32) -> NvmeCpl {
    exec(
        c,
        &admin(
            admin_opc::GET_FEATURES,
            0,
            u32::from(fid) | (sel << 8),
            cdw11,
        ),
    )
    .0
}

fn aer(c: &Ctrlr, cid: u16) -> AdminResult {
    let mut cmd = admin(admin_opc::ASYNC_EVENT_REQUEST, 0, 0, 0);
    cmd.set_cid(cid);
    c.exec_admin(&cmd, &[], 0)
}

fn le16(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn le32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
}
fn le64(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
}

fn io_connect(
    t: &Arc<Target>,
    port_id: u16,
    host: &str,
    cntlid: u16,
    qid: u16,
    sqsize: u16,
) -> Result<(Connected, NvmeCpl), NvmeCpl> {
    connect(
        t,
        port_id,
        &connect_cmd(qid, sqsize, 0),
        &cdata(SUB1, host, cntlid),
        0,
    )
}

struct CountWaker(AtomicUsize);
impl std::task::Wake for CountWaker {
    fn wake(self: Arc<Self>) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

fn counting_waker(c: &Ctrlr) -> Arc<CountWaker> {
    let w = Arc::new(CountWaker(AtomicUsize::new(0)));
    c.set_event_waker(Waker::from(w.clone()));
    w
}

const AEN_NS_CHANGED: u32 = 2 | (0x04 << 16);
const AEN_ANA_CHANGE: u32 = 2 | (0x03 << 8) | (0x0C << 16);
const AEN_DISC_CHANGE: u32 = 2 | (0xF0 << 8) | (0x70 << 16);

// ---------------------------------------------------------------- connect

#[test]
fn admin_connect_allocates_unique_cntlids() {
    let t = Target::new(cfg());
    let mut seen = BTreeSet::new();
    for i in 0..300 {
        let host = if i % 2 == 0 { HOST1 } else { HOST2 };
        let c = admin_connect(&t, 1 + (i % 2) as u16, SUB1, host);
        assert!((1..=0xFFEF).contains(&c.cntlid()));
        assert!(seen.insert(c.cntlid()), "duplicate cntlid {}", c.cntlid());
        assert_eq!(c.subnqn(), SUB1);
        assert_eq!(c.hostnqn(), host);
        assert!(!c.is_discovery());
    }
    assert_eq!(t.controllers().len(), 300);
    // A freed CNTLID is not reused straight away.
    let c = admin_connect(&t, 1, SUB1, HOST1);
    let freed = c.cntlid();
    c.destroy();
    let d = admin_connect(&t, 1, SUB1, HOST1);
    assert_ne!(d.cntlid(), freed);
    // Discovery controllers come from their own subsystem, on any port.
    let disc = admin_connect(&t, 77, DISCOVERY_NQN, HOST3);
    assert!(disc.is_discovery());
}

#[test]
fn cntlid_allocation_wraps_and_reports_busy_when_exhausted() {
    let mut reg = super::target::Registry::default();
    let one = admin_connect(&Target::new(cfg()), 1, SUB1, HOST1);
    let mut n = 0u32;
    while let Some(id) = reg.alloc_cntlid("nqn.x") {
        reg.ctrls.insert(("nqn.x".into(), id), one.clone());
        n += 1;
        if n > 0x10000 {
            break;
        }
    }
    assert_eq!(n, 0xFFEF);
}

#[test]
fn admin_connect_errors() {
    let t = Target::new(cfg());
    let cmd = connect_cmd(0, 31, 5000);
    let invalid_param = Status::CONNECT_INVALID_PARAM.dnr();

    let c = connect_err(&t, 1, &cmd, &cdata("nqn.nope", HOST1, 0xFFFF));
    assert_eq!((c.status, c.dw0), (invalid_param, (1 << 16) | 256));
    assert_eq!(c.cid, 0x10);
    // SUB2 is not exported through port 2.
    let c = connect_err(&t, 2, &cmd, &cdata(SUB2, HOST1, 0xFFFF));
    assert_eq!((c.status, c.dw0), (invalid_param, (1 << 16) | 256));
    // Unknown port.
    let c = connect_err(&t, 9, &cmd, &cdata(SUB1, HOST1, 0xFFFF));
    assert_eq!((c.status, c.dw0), (invalid_param, (1 << 16) | 256));

    let c = connect_err(&t, 1, &cmd, &cdata(SUB1, HOST3, 0xFFFF));
    assert_eq!(
        (c.status, c.dw0),
        (Status::CONNECT_INVALID_HOST.dnr(), (1 << 16) | 512)
    );

    let c = connect_err(&t, 1, &cmd, &cdata(SUB1, HOST1, 5));
    assert_eq!((c.status, c.dw0), (invalid_param, (1 << 16) | 16));

    let mut bad = cmd;
    bad.set_cdw(10, 1);
    let c = connect_err(&t, 1, &bad, &cdata(SUB1, HOST1, 0xFFFF));
    assert_eq!(c.status, Status::CONNECT_INCOMPATIBLE_FORMAT.dnr());

    let c = connect_err(&t, 1, &connect_cmd(0, 0, 0), &cdata(SUB1, HOST1, 0xFFFF));
    assert_eq!((c.status, c.dw0), (invalid_param, 44));

    let c = connect_err(&t, 1, &cmd, &cdata(SUB1, HOST1, 0xFFFF)[..512]);
    assert_eq!(c.status, Status::DATA_SGL_LENGTH_INVALID.dnr());

    let mut d = cdata(SUB1, HOST1, 0xFFFF);
    d[256] = 0;
    let c = connect_err(&t, 1, &cmd, &d);
    assert_eq!((c.status, c.dw0), (invalid_param, (1 << 16) | 256));
    let mut d = cdata(SUB1, HOST1, 0xFFFF);
    d[512..768].fill(b'x');
    let c = connect_err(&t, 1, &cmd, &d);
    assert_eq!((c.status, c.dw0), (invalid_param, (1 << 16) | 512));

    let mut notconnect = cmd;
    notconnect.0[4] = fctype::PROPERTY_GET;
    let c = connect_err(&t, 1, &notconnect, &cdata(SUB1, HOST1, 0xFFFF));
    assert_eq!(c.status, Status::INVALID_OPCODE.dnr());

    assert!(t.controllers().is_empty());
}

#[test]
fn io_connect_flow_and_errors() {
    let t = Target::new(cfg());
    let c = admin_connect(&t, 1, SUB1, HOST1);
    let id = c.cntlid();
    let invalid_param = Status::CONNECT_INVALID_PARAM.dnr();

    // Before CC.EN=1.
    let e = io_connect(&t, 1, HOST1, id, 1, 127).err().unwrap();
    assert_eq!(e.status, Status::COMMAND_SEQUENCE_ERROR.dnr());
    enable(&c);
    // No queues granted yet.
    let e = io_connect(&t, 1, HOST1, id, 1, 127).err().unwrap();
    assert_eq!((e.status, e.dw0), (invalid_param, 42));

    let s = set_feat(&c, feat::NUMBER_OF_QUEUES, (3 << 16) | 3);
    assert!(s.status.is_success());
    assert_eq!(s.dw0, (3 << 16) | 3);

    match io_connect(&t, 1, HOST1, id, 1, 127) {
        Ok((Connected::Io { ctrlr, qid, sqsize }, cpl)) => {
            assert!(Arc::ptr_eq(&ctrlr, &c));
            assert_eq!((qid, sqsize), (1, 127));
            assert_eq!(cpl.dw0, u32::from(id));
            assert!(cpl.status.is_success());
        }
        _ => panic!("I/O connect failed"),
    }
    assert!(io_connect(&t, 1, HOST1, id, 4, 127).is_ok());
    let e = io_connect(&t, 1, HOST1, id, 5, 127).err().unwrap();
    assert_eq!((e.status, e.dw0), (invalid_param, 42));
    let e = io_connect(&t, 1, HOST1, id, 2, 1024).err().unwrap();
    assert_eq!((e.status, e.dw0), (invalid_param, 44));
    let e = io_connect(&t, 1, HOST1, id, 2, 0).err().unwrap();
    assert_eq!((e.status, e.dw0), (invalid_param, 44));
    assert!(io_connect(&t, 1, HOST1, id, 2, 1023).is_ok());
    // QID already connected.
    let e = io_connect(&t, 1, HOST1, id, 1, 127).err().unwrap();
    assert_eq!(e.status, Status::COMMAND_SEQUENCE_ERROR.dnr());
    c.release_io_queue(1);
    assert!(io_connect(&t, 1, HOST1, id, 1, 127).is_ok());

    // Another allowed host naming this controller.
    let e = io_connect(&t, 1, HOST2, id, 3, 127).err().unwrap();
    assert_eq!((e.status, e.dw0), (invalid_param, (1 << 16) | 16));
    // Same host NQN, different Host Identifier.
    let mut d = cdata(SUB1, HOST1, id);
    d[0] ^= 0xff;
    let e = connect_err(&t, 1, &connect_cmd(3, 127, 0), &d);
    assert_eq!((e.status, e.dw0), (invalid_param, 1 << 16));
    // Unknown controller, and the right one through another port.
    let e = io_connect(&t, 1, HOST1, id.wrapping_add(100), 3, 127)
        .err()
        .unwrap();
    assert_eq!((e.status, e.dw0), (invalid_param, (1 << 16) | 16));
    let e = io_connect(&t, 2, HOST1, id, 3, 127).err().unwrap();
    assert_eq!((e.status, e.dw0), (invalid_param, (1 << 16) | 16));
    // Not allowed host at all.
    let e = io_connect(&t, 1, HOST3, id, 3, 127).err().unwrap();
    assert_eq!(e.status, Status::CONNECT_INVALID_HOST.dnr());

    // Number of Queues cannot change once I/O queues exist.
    let s = set_feat(&c, feat::NUMBER_OF_QUEUES, 7);
    assert_eq!(s.status, Status::COMMAND_SEQUENCE_ERROR.dnr());

    // Destroyed controllers accept no more queues.
    c.destroy();
    let e = io_connect(&t, 1, HOST1, id, 3, 127).err().unwrap();
    assert_eq!((e.status, e.dw0), (invalid_param, (1 << 16) | 16));

    // A discovery controller has no I/O queues.
    let d = bring_up(&t, 1, DISCOVERY_NQN, HOST1);
    let e = connect_err(
        &t,
        1,
        &connect_cmd(1, 31, 0),
        &cdata(DISCOVERY_NQN, HOST1, d.cntlid()),
    );
    assert_eq!((e.status, e.dw0), (invalid_param, 42));
}

// ------------------------------------------------------------- properties

#[test]
fn properties_and_linux_enable_shutdown_flow() {
    let t = Target::new(cfg());
    let c = admin_connect(&t, 1, SUB1, HOST1);

    let cap = prop_get(&c, prop::CAP, true).unwrap();
    assert_eq!(cap & 0xffff, 1023, "MQES");
    assert_eq!((cap >> 16) & 1, 1, "CQR");
    assert_eq!((cap >> 24) & 0xff, 30, "TO");
    assert_eq!((cap >> 37) & 0xff, 1, "CSS: NVM only");
    assert_eq!((cap >> 48) & 0xff, 0, "MPSMIN/MPSMAX");
    assert_eq!(prop_get(&c, prop::CAP, false).unwrap(), cap & 0xffff_ffff);
    assert_eq!(prop_get(&c, prop::CAP + 4, false).unwrap(), cap >> 32);
    assert_eq!(prop_get(&c, prop::VS, false).unwrap(), 0x0001_0400);
    assert_eq!(prop_get(&c, prop::CC, false).unwrap(), 0);
    assert_eq!(prop_get(&c, prop::CSTS, false).unwrap(), 0);

    let inval = Err(Status::INVALID_FIELD.dnr());
    assert_eq!(prop_get(&c, prop::VS, true), inval);
    assert_eq!(prop_get(&c, 0x68, false), inval);
    assert_eq!(prop_get(&c, 0x1000, true), inval);
    for ro in [prop::CAP, prop::VS, prop::CSTS, prop::NSSR, 0x44] {
        assert_eq!(prop_set(&c, ro, 0), Status::INVALID_FIELD.dnr());
    }
    let (cpl, _) = exec(&c, &fabrics(fctype::PROPERTY_SET, 1, prop::CC, 1));
    assert_eq!(cpl.status, Status::INVALID_FIELD.dnr());

    // Admin commands need a ready controller.
    let (cpl, _) = identify(&c, cns::CONTROLLER, 0, 0);
    assert_eq!(cpl.status, Status::COMMAND_SEQUENCE_ERROR.dnr());

    // Bad queue entry sizes: CFS, not ready.
    assert_eq!(prop_set(&c, prop::CC, 1), Status::SUCCESS);
    assert_eq!(prop_get(&c, prop::CSTS, false).unwrap(), 0b10);
    assert!(!c.is_enabled());
    assert_eq!(prop_set(&c, prop::CC, 0), Status::SUCCESS);
    assert_eq!(prop_get(&c, prop::CSTS, false).unwrap(), 0);
    // MPS other than 4 KiB.
    assert_eq!(
        prop_set(&c, prop::CC, CC_LINUX | (1 << 7) | 1),
        Status::SUCCESS
    );
    assert_eq!(prop_get(&c, prop::CSTS, false).unwrap() & 1, 0);
    assert_eq!(prop_set(&c, prop::CC, 0), Status::SUCCESS);

    enable(&c);
    assert_eq!(
        prop_get(&c, prop::CC, false).unwrap(),
        u64::from(CC_LINUX | 1)
    );
    let (cpl, _) = identify(&c, cns::CONTROLLER, 0, 0);
    assert!(cpl.status.is_success());

    // Normal shutdown as nvme_disable_ctrl(shutdown=true) writes it.
    assert_eq!(
        prop_set(&c, prop::CC, CC_LINUX | 1 | (1 << 14)),
        Status::SUCCESS
    );
    assert_eq!(prop_get(&c, prop::CSTS, false).unwrap() & 0b1100, 0b1000);
    assert!(!c.is_enabled());
    // Reset.
    assert_eq!(prop_set(&c, prop::CC, CC_LINUX), Status::SUCCESS);
    assert_eq!(prop_get(&c, prop::CSTS, false).unwrap(), 0);
    enable(&c);

    // Other Fabrics commands on an established admin queue.
    let (cpl, _) = exec(&c, &connect_cmd(0, 31, 0));
    assert_eq!(cpl.status, Status::COMMAND_SEQUENCE_ERROR.dnr());
    for f in [fctype::AUTH_SEND, fctype::AUTH_RECV, 0x02, 0x7f] {
        let (cpl, _) = exec(&c, &fabrics(f, 0, 0, 0));
        assert_eq!(cpl.status, Status::INVALID_OPCODE.dnr(), "fctype {f:#x}");
    }
    let (cpl, _) = exec(&c, &fabrics(fctype::DISCONNECT, 0, 0, 0));
    assert!(cpl.status.is_success());
}

// --------------------------------------------------------------- identify

#[test]
fn identify_controller_satisfies_linux_host_checks() {
    let t = Target::new(cfg());
    let _other = bring_up(&t, 2, SUB1, HOST2);
    let c = bring_up(&t, 1, SUB1, HOST1);
    let (cpl, b) = identify(&c, cns::CONTROLLER, 0, 0);
    assert!(cpl.status.is_success());
    assert_eq!(b.len(), 4096);
    assert_eq!(le16(&b, 78), c.cntlid(), "CNTLID");
    assert_eq!(&b[4..24], b"SN0001              ");
    assert_eq!(&b[24..35], b"Strata Test");
    assert!(b[35..64].iter().all(|&x| x == b' '));
    assert_eq!(b[76], 0b1011, "CMIC");
    assert_eq!(b[77], 8, "MDTS");
    assert_eq!(4096u32 << b[77], MDTS_BYTES);
    assert_eq!(le32(&b, 80), 0x0001_0400, "VER");
    assert_eq!(le32(&b, 92), (1 << 8) | (1 << 11), "OAES");
    assert_eq!(le32(&b, 96), 0, "CTRATT");
    assert_eq!(b[111], 1, "CNTRLTYPE");
    assert_eq!(le16(&b, 128), 0, "CRDT1");
    assert_eq!(b[259], AERL);
    assert_eq!(b[261], 0b111, "LPA");
    assert_eq!(le16(&b, 320), 10, "KAS");
    assert_eq!(b[342], 10, "ANATT");
    assert_eq!(b[343], 0x1f, "ANACAP");
    let anagrpmax = le32(&b, 344);
    let nanagrpid = le32(&b, 348);
    assert!(nanagrpid >= 3 && nanagrpid <= anagrpmax);
    assert_eq!((b[512], b[513]), (0x66, 0x44), "SQES/CQES");
    let maxcmd = le16(&b, 514);
    assert!(maxcmd != 0 && maxcmd > MQES);
    let nn = le32(&b, 516);
    let mnan = le32(&b, 540);
    assert!(mnan > 0 && mnan <= nn, "0 < MNAN <= NN");
    let oncs = le16(&b, 520);
    assert_eq!(oncs & 0b1100, 0b1100, "DSM + Write Zeroes");
    assert_eq!(oncs & (1 << 6), 0, "no Timestamp");
    assert_eq!(le16(&b, 256) & 1, 0, "no Security Send/Receive");
    assert_eq!(b[265], 0, "APSTA");
    // No namespace of SUB1 has a volatile write cache.
    assert_eq!(b[525], 0b100, "VWC");
    let sgls = le32(&b, 536);
    assert_eq!(sgls & 0b11, 0b01, "SGLs supported");
    assert_ne!(sgls & (1 << 20), 0, "offset SGLs for in-capsule data");
    assert_eq!(sgls & (1 << 2), 0, "no keyed SGLs on TCP");
    assert_eq!(&b[768..768 + SUB1.len()], SUB1.as_bytes());
    assert_eq!(b[768 + SUB1.len()], 0);
    assert_eq!(le32(&b, 1792), (64 + 8192) / 16, "IOCCSZ");
    assert!(le32(&b, 1792) >= 4);
    assert_eq!(le32(&b, 1796), 1, "IORCSZ");
    assert_eq!(le16(&b, 1800), 0, "ICDOFF");
    assert_eq!(b[1802], 0, "FCATT");
    assert_eq!(b[1803], 1, "MSDBD");
    // The Linux host's ANA log buffer must fit MDTS.
    assert!(16 + nanagrpid as u64 * 32 + u64::from(mnan) * 4 <= u64::from(MDTS_BYTES));

    // VWC present when a namespace's bdev has a volatile write cache.
    let c2 = bring_up(&t, 1, SUB2, HOST3);
    let (_, b) = identify(&c2, cns::CONTROLLER, 0, 0);
    assert_eq!(b[525], 0b101);
    assert_ne!(le16(&b, 78), c.cntlid());
}

#[test]
fn identify_namespace_and_lists() {
    let t = Target::new(cfg());
    let c = bring_up(&t, 1, SUB1, HOST1);
    let (cpl, b) = identify(&c, cns::NAMESPACE, 2, 0);
    assert!(cpl.status.is_success());
    assert_eq!(le64(&b, 0), 1 << 20, "NSZE");
    assert_eq!(le64(&b, 8), 1 << 20, "NCAP");
    assert_eq!(le64(&b, 16), 1 << 20, "NUSE");
    assert_eq!((b[25], b[26]), (0, 0), "NLBAF/FLBAS");
    assert_eq!(b[30], 1, "NMIC shared");
    assert_eq!(b[33], 0x09, "DLFEAT");
    assert_eq!(le32(&b, 92), 2, "ANAGRPID");
    assert_eq!(&b[104..120], &[2 | 0x40; 16], "NGUID");
    assert_eq!(&b[120..128], &[2 | 0x80; 8], "EUI64");
    assert_eq!(b[130], 12, "LBADS");

    let c2 = bring_up(&t, 1, SUB2, HOST1);
    let (_, b) = identify(&c2, cns::NAMESPACE, 7, 0);
    assert_eq!(b[130], 9);
    assert_eq!(le64(&b, 0), 1000);

    // Inactive NSID: zeroes. NSID 0 / broadcast / beyond NN: Invalid Namespace.
    let (cpl, b) = identify(&c, cns::NAMESPACE, 5, 0);
    assert!(cpl.status.is_success());
    assert!(b.iter().all(|&x| x == 0));
    for nsid in [0, u32::MAX, MAX_NAMESPACES_FOR_TEST + 1] {
        let (cpl, _) = identify(&c, cns::NAMESPACE, nsid, 0);
        assert_eq!(cpl.status, Status::INVALID_NAMESPACE.dnr(), "nsid {nsid}");
    }

    let (cpl, b) = identify(&c, cns::ACTIVE_NS_LIST, 0, 0);
    assert!(cpl.status.is_success());
    assert_eq!((le32(&b, 0), le32(&b, 4), le32(&b, 8)), (1, 2, 0));
    let (_, b) = identify(&c, cns::ACTIVE_NS_LIST, 1, 0);
    assert_eq!((le32(&b, 0), le32(&b, 4)), (2, 0));
    let (_, b) = identify(&c, cns::ACTIVE_NS_LIST, 2, 0);
    assert!(b.iter().all(|&x| x == 0));
    let (cpl, _) = identify(&c, cns::ACTIVE_NS_LIST, 0xFFFF_FFFE, 0);
    assert_eq!(cpl.status, Status::INVALID_NAMESPACE.dnr());

    let (cpl, b) = identify(&c, cns::NS_ID_DESCRIPTOR_LIST, 1, 0);
    assert!(cpl.status.is_success());
    assert_eq!(&b[0..4], &[1, 8, 0, 0]);
    assert_eq!(&b[4..12], &[0x81; 8]);
    assert_eq!(&b[12..16], &[2, 16, 0, 0]);
    assert_eq!(&b[16..32], &[0x41; 16]);
    assert_eq!(&b[32..36], &[3, 16, 0, 0]);
    assert_eq!(&b[36..52], &[1; 16]);
    assert_eq!(&b[52..57], &[4, 1, 0, 0, 0]);
    let (cpl, _) = identify(&c, cns::NS_ID_DESCRIPTOR_LIST, 3, 0);
    assert_eq!(cpl.status, Status::INVALID_NAMESPACE.dnr());

    let (cpl, b) = identify(&c, cns::CSI_CONTROLLER, 0, 0);
    assert!(cpl.status.is_success());
    assert_eq!(b.len(), 4096);
    // WZSL, DMRL, DMRSL, DMSL: what bounds a TRIM or Write Zeroes command.
    assert_eq!(b[1], 13, "WZSL: 32 MiB");
    assert_eq!(b[3], 255, "DMRL");
    assert_eq!(
        u32::from_le_bytes(b[4..8].try_into().unwrap()),
        1 << 18,
        "DMRSL"
    );
    assert_eq!(
        u64::from_le_bytes(b[8..16].try_into().unwrap()),
        1 << 18,
        "DMSL"
    );
    assert!(b[16..].iter().all(|&x| x == 0));
    let (cpl, _) = identify(&c, cns::CSI_CONTROLLER, 0, 2 << 24);
    assert_eq!(cpl.status, Status::INVALID_FIELD.dnr());
    for other in [cns::CS_INDEPENDENT_NAMESPACE, 0x04, 0x05, 0x10, 0x1f, 0xff] {
        let (cpl, _) = identify(&c, other, 1, 0);
        assert_eq!(cpl.status, Status::INVALID_FIELD.dnr(), "cns {other:#x}");
    }
}

const MAX_NAMESPACES_FOR_TEST: u32 = crate::subsystem::MAX_NAMESPACES;

#[test]
fn invalid_namespaces_in_config_are_not_exposed() {
    let mut cfg = cfg();
    cfg.subsystems[0].namespaces.push(ns(0, 1));
    cfg.subsystems[0].namespaces.push(ns(5000, 1));
    cfg.subsystems[0].namespaces.push(ns(6, 500));
    cfg.subsystems[0].namespaces.push(NamespaceConfig {
        bdev: bdev(10, 1000, false),
        ..ns(8, 1)
    });
    cfg.subsystems[0].namespaces.push(ns(1, 2)); // duplicate NSID
    let t = Target::new(cfg);
    let c = bring_up(&t, 1, SUB1, HOST1);
    let (_, b) = identify(&c, cns::ACTIVE_NS_LIST, 0, 0);
    assert_eq!((le32(&b, 0), le32(&b, 4), le32(&b, 8)), (1, 2, 0));
    let (_, b) = identify(&c, cns::NAMESPACE, 1, 0);
    assert_eq!(le32(&b, 92), 1, "the first NSID 1 wins");
    let v = c.io_view();
    assert_eq!(
        v.namespaces.iter().map(|n| n.nsid).collect::<Vec<_>>(),
        [1, 2]
    );
}

// -------------------------------------------------------------- log pages

#[test]
fn log_pages() {
    let t = Target::new(cfg());
    let c = bring_up(&t, 1, SUB1, HOST1);

    let (cpl, b) = get_log(&c, lid::ERROR_INFO, 0, false, 64, 0);
    assert!(cpl.status.is_success());
    assert_eq!(b, vec![0; 64]);

    let (cpl, b) = get_log(&c, lid::SMART, 0, false, 512, 0);
    assert!(cpl.status.is_success());
    assert_eq!(b.len(), 512);
    let temp = le16(&b, 1);
    assert!((273..273 + 70).contains(&temp), "sane temperature {temp}");
    assert_eq!(b[0], 0, "no critical warning");
    let (cpl, _) = get_log_ns(&c, lid::SMART, 0, false, 512, 0, 1);
    assert!(cpl.status.is_success());
    let (cpl, _) = get_log_ns(&c, lid::SMART, 0, false, 512, 0, 9);
    assert_eq!(cpl.status, Status::INVALID_NAMESPACE.dnr());

    let (cpl, b) = get_log(&c, lid::FW_SLOT, 0, false, 512, 0);
    assert!(cpl.status.is_success());
    assert_eq!(b[0], 1, "AFI: slot 1");

    let (cpl, b) = get_log(&c, lid::CMD_EFFECTS, 0, false, 4096, 0);
    assert!(cpl.status.is_success());
    assert_eq!(le32(&b, 4 * usize::from(admin_opc::IDENTIFY)) & 1, 1);
    assert_eq!(le32(&b, 1024 + 4 * usize::from(io_write())), 0b11);
    assert_eq!(le32(&b, 1024 + 4 * 0x7e), 0);
    let mut cmd = admin(
        admin_opc::GET_LOG_PAGE,
        0,
        u32::from(lid::CMD_EFFECTS) | (1023 << 16),
        0,
    );
    cmd.set_cdw(14, 2 << 24);
    assert_eq!(exec(&c, &cmd).0.status, Status::INVALID_FIELD.dnr());

    // Offsets and lengths: only the requested slice, zero-filled past the end.
    let (_, whole) = get_log(&c, lid::SMART, 0, false, 512, 0);
    let (cpl, part) = get_log(&c, lid::SMART, 0, false, 8, 0);
    assert!(cpl.status.is_success());
    assert_eq!(part, whole[..8]);
    let (_, part) = get_log(&c, lid::SMART, 0, false, 16, 504);
    assert_eq!(&part[..8], &whole[504..]);
    assert_eq!(&part[8..], &[0; 8]);
    let (cpl, part) = get_log(&c, lid::SMART, 0, false, 4, 512);
    assert!(cpl.status.is_success());
    assert_eq!(part, vec![0; 4]);
    let (cpl, _) = get_log(&c, lid::SMART, 0, false, 4, 516);
    assert_eq!(cpl.status, Status::INVALID_FIELD.dnr());
    let (cpl, _) = get_log(&c, lid::SMART, 0, false, 4, 2);
    assert_eq!(cpl.status, Status::INVALID_FIELD.dnr());
    let (cpl, _) = get_log(&c, lid::SMART, 0, false, 4, 1 << 40);
    assert_eq!(cpl.status, Status::INVALID_FIELD.dnr());

    for unknown in [0x00, 0x06, 0x0d, 0x70, 0x80, 0xff] {
        let (cpl, _) = get_log(&c, unknown, 0, false, 4, 0);
        assert_eq!(
            cpl.status,
            Status::INVALID_LOG_PAGE.dnr(),
            "lid {unknown:#x}"
        );
    }

    // Linux-sized read of the whole page: NUMDU in use.
    let (cpl, b) = get_log(&c, lid::ANA, 0, false, 0x40000, 0);
    assert!(cpl.status.is_success());
    assert_eq!(b.len(), 0x40000);
}

fn io_write() -> u8 {
    crate::spec::io_opc::WRITE
}

fn parse_ana(b: &[u8]) -> (u64, Vec<(u32, u8, Vec<u32>)>) {
    let chg = le64(b, 0);
    let n = le16(b, 8);
    let mut off = 16;
    let mut v = Vec::new();
    for _ in 0..n {
        let grp = le32(b, off);
        let nn = le32(b, off + 4) as usize;
        assert_eq!(le64(b, off + 8), chg);
        let st = b[off + 16];
        let ids = (0..nn).map(|i| le32(b, off + 32 + i * 4)).collect();
        v.push((grp, st, ids));
        off += 32 + nn * 4;
    }
    (chg, v)
}

#[test]
fn ana_log_per_port_and_rgo() {
    let mut cfg = cfg();
    cfg.ports[1].ana.insert(2, AnaState::NonOptimized);
    cfg.ports[1].ana.insert(1, AnaState::Inaccessible);
    cfg.ports[1].ana.insert(99, AnaState::PersistentLoss);
    let t = Target::new(cfg);
    let c1 = bring_up(&t, 1, SUB1, HOST1);
    let c2 = bring_up(&t, 2, SUB1, HOST1);
    let (_, b) = get_log(&c1, lid::ANA, 0, false, 4096, 0);
    let (chg1, g1) = parse_ana(&b);
    assert_eq!(g1, vec![(1, 1, vec![1]), (2, 1, vec![2])]);
    let (_, b) = get_log(&c2, lid::ANA, 0, false, 4096, 0);
    let (chg2, g2) = parse_ana(&b);
    assert_eq!(chg1, chg2);
    assert_eq!(g2, vec![(1, 3, vec![1]), (2, 2, vec![2])]);
    // RGO: groups without NSIDs.
    let (_, b) = get_log(&c2, lid::ANA, 1, false, 4096, 0);
    assert_eq!(parse_ana(&b).1, vec![(1, 3, vec![]), (2, 2, vec![])]);
    // Header only, then the rest at an offset.
    let (_, h) = get_log(&c2, lid::ANA, 0, false, 16, 0);
    assert_eq!(le16(&h, 8), 2);
    let (_, full) = get_log(&c2, lid::ANA, 0, false, 4096, 0);
    let (_, tail) = get_log(&c2, lid::ANA, 0, false, 64, 16);
    assert_eq!(tail, full[16..80]);

    t.set_ana_state(2, 2, AnaState::Optimized);
    let (_, b) = get_log(&c2, lid::ANA, 0, false, 4096, 0);
    let (chg3, g3) = parse_ana(&b);
    assert!(chg3 > chg2);
    assert_eq!(g3, vec![(1, 3, vec![1]), (2, 1, vec![2])]);
}

// --------------------------------------------------------------- features

#[test]
fn features() {
    let t = Target::new(cfg());
    let c = bring_up(&t, 1, SUB1, HOST1);
    let inval = Status::INVALID_FIELD.dnr();

    // Number of Queues: the Linux host asks for one per CPU.
    let s = set_feat(&c, feat::NUMBER_OF_QUEUES, (200 << 16) | 200);
    assert_eq!(s.dw0, (126 << 16) | 126);
    let s = set_feat(&c, feat::NUMBER_OF_QUEUES, (7 << 16) | 3);
    assert_eq!(s.dw0, (3 << 16) | 3);
    assert_eq!(
        get_feat(&c, feat::NUMBER_OF_QUEUES, 0, 0).dw0,
        (3 << 16) | 3
    );
    assert_eq!(
        get_feat(&c, feat::NUMBER_OF_QUEUES, 1, 0).dw0,
        (126 << 16) | 126
    );
    assert_eq!(set_feat(&c, feat::NUMBER_OF_QUEUES, 0xffff).status, inval);

    // Async Event Configuration.
    let s = set_feat(&c, feat::ASYNC_EVENT_CONFIG, (1 << 8) | (1 << 11));
    assert!(s.status.is_success());
    assert_eq!(get_feat(&c, feat::ASYNC_EVENT_CONFIG, 0, 0).dw0, 0x900);
    assert_eq!(
        set_feat(&c, feat::ASYNC_EVENT_CONFIG, 1 << 31).status,
        inval
    );
    assert_eq!(set_feat(&c, feat::ASYNC_EVENT_CONFIG, 1 << 9).status, inval);

    // Keep Alive Timer, rounded up to KAS granularity.
    assert!(
        set_feat(&c, feat::KEEP_ALIVE_TIMER, 1500)
            .status
            .is_success()
    );
    assert_eq!(c.kato_ms(), 2000);
    assert_eq!(get_feat(&c, feat::KEEP_ALIVE_TIMER, 0, 0).dw0, 2000);
    assert_eq!(get_feat(&c, feat::KEEP_ALIVE_TIMER, 1, 0).dw0, 5000);

    // Temperature Threshold.
    assert_eq!(get_feat(&c, feat::TEMP_THRESHOLD, 0, 0).dw0, 343);
    assert_eq!(get_feat(&c, feat::TEMP_THRESHOLD, 0, 1 << 20).dw0, 0);
    assert!(set_feat(&c, feat::TEMP_THRESHOLD, 350).status.is_success());
    assert_eq!(get_feat(&c, feat::TEMP_THRESHOLD, 0, 0).dw0, 350);
    assert_eq!(get_feat(&c, feat::TEMP_THRESHOLD, 1, 0).dw0, 343);
    assert_eq!(get_feat(&c, feat::TEMP_THRESHOLD, 0, 1 << 16).status, inval);

    // Volatile Write Cache: SUB1 has none.
    assert_eq!(set_feat(&c, feat::VOLATILE_WRITE_CACHE, 1).status, inval);
    assert_eq!(get_feat(&c, feat::VOLATILE_WRITE_CACHE, 0, 0).status, inval);
    let c2 = bring_up(&t, 1, SUB2, HOST1);
    assert!(
        set_feat(&c2, feat::VOLATILE_WRITE_CACHE, 0)
            .status
            .is_success()
    );
    assert_eq!(get_feat(&c2, feat::VOLATILE_WRITE_CACHE, 0, 0).dw0, 0);
    assert_eq!(get_feat(&c2, feat::VOLATILE_WRITE_CACHE, 1, 0).dw0, 1);

    // Select: supported capabilities; reserved values.
    assert_eq!(get_feat(&c, feat::KEEP_ALIVE_TIMER, 3, 0).dw0, 1 << 2);
    assert_eq!(get_feat(&c, feat::KEEP_ALIVE_TIMER, 4, 0).status, inval);
    // Saving is not supported.
    let s = exec(
        &c,
        &admin(
            admin_opc::SET_FEATURES,
            0,
            u32::from(feat::KEEP_ALIVE_TIMER) | (1 << 31),
            1000,
        ),
    )
    .0;
    assert_eq!(s.status, Status::FEATURE_NOT_SAVEABLE.dnr());

    for fid in [
        feat::ARBITRATION,
        feat::POWER_MGMT,
        feat::INTERRUPT_COALESCING,
        0x0E,
        0x81,
    ] {
        assert_eq!(set_feat(&c, fid, 0).status, inval, "set {fid:#x}");
        assert_eq!(get_feat(&c, fid, 0, 0).status, inval, "get {fid:#x}");
    }
}

#[test]
fn abort_keep_alive_and_unknown_opcodes() {
    let t = Target::new(cfg());
    let c = bring_up(&t, 1, SUB1, HOST1);
    let (cpl, _) = exec(&c, &admin(admin_opc::ABORT, 0, 0x1234, 0));
    assert!(cpl.status.is_success());
    assert_eq!(cpl.dw0 & 1, 1, "command not aborted");
    let (cpl, d) = exec(&c, &admin(admin_opc::KEEP_ALIVE, 0, 0, 0));
    assert!(cpl.status.is_success() && d.is_empty());
    for opc in [
        0x00, 0x01, 0x04, 0x05, 0x10, 0x11, 0x19, 0x80, 0x81, 0xC0, 0xFF,
    ] {
        let (cpl, _) = exec(&c, &admin(opc, 0, 0, 0));
        assert_eq!(cpl.status, Status::INVALID_OPCODE.dnr(), "opc {opc:#x}");
    }
    let mut fused = admin(admin_opc::IDENTIFY, 0, 1, 0);
    fused.0[1] = 1;
    assert_eq!(exec(&c, &fused).0.status, Status::INVALID_FIELD.dnr());
}

// ------------------------------------------------------------------- AERs

#[test]
fn aer_parking_limit_and_delivery_after_set_ana_state() {
    let t = Target::new(cfg());
    let c1 = bring_up(&t, 1, SUB1, HOST1);
    let c2 = bring_up(&t, 2, SUB1, HOST2);
    let w1 = counting_waker(&c1);
    let w2 = counting_waker(&c2);
    for cid in 0..=u16::from(AERL) {
        assert!(matches!(aer(&c1, 100 + cid), AdminResult::Deferred));
    }
    match aer(&c1, 200) {
        AdminResult::Complete { cpl, .. } => {
            assert_eq!(cpl.status, Status::ASYNC_EVENT_LIMIT_EXCEEDED.dnr());
            assert_eq!(cpl.cid, 200);
        }
        AdminResult::Deferred => panic!("AERL exceeded but parked"),
    }
    assert!(matches!(aer(&c2, 1), AdminResult::Deferred));
    assert!(c1.take_events().is_empty());

    let gen0 = c1.generation();
    t.set_ana_state(1, 2, AnaState::Inaccessible);
    assert!(c1.generation() > gen0);
    let ev = c1.take_events();
    assert_eq!(ev.len(), 1);
    assert_eq!((ev[0].cid, ev[0].dw0), (100, AEN_ANA_CHANGE));
    assert!(ev[0].status.is_success());
    assert!(w1.0.load(Ordering::SeqCst) >= 1);
    assert!(c1.take_events().is_empty(), "taken once");
    // Port 2's controller saw no change.
    assert!(c2.take_events().is_empty());
    assert_eq!(w2.0.load(Ordering::SeqCst), 0);

    // Masked until the ANA log is read.
    t.set_ana_state(1, 2, AnaState::Change);
    assert!(c1.take_events().is_empty());
    let (_, b) = get_log(&c1, lid::ANA, 0, false, 4096, 0);
    assert_eq!(parse_ana(&b).1[1], (2, 0x0F, vec![2]));
    // RAE keeps it masked.
    t.set_ana_state(1, 2, AnaState::Optimized);
    assert_eq!(c1.take_events().len(), 1);
    let (_, _) = get_log(&c1, lid::ANA, 0, true, 4096, 0);
    t.set_ana_state(1, 2, AnaState::NonOptimized);
    assert!(c1.take_events().is_empty());
    let (_, _) = get_log(&c1, lid::ANA, 0, false, 4096, 0);
    t.set_ana_state(1, 2, AnaState::Optimized);
    let ev = c1.take_events();
    assert_eq!((ev.len(), ev[0].cid), (1, 102));

    // Setting the state it already has is no change.
    let _ = get_log(&c1, lid::ANA, 0, false, 4096, 0);
    t.set_ana_state(1, 2, AnaState::Optimized);
    assert!(c1.take_events().is_empty());
    // Groups without namespaces in the subsystem are not reported.
    t.set_ana_state(1, 50, AnaState::Inaccessible);
    assert!(c1.take_events().is_empty());
}

#[test]
fn pending_event_completes_the_next_aer_at_once() {
    let t = Target::new(cfg());
    let c = bring_up(&t, 1, SUB1, HOST1);
    t.set_ana_state(1, 1, AnaState::NonOptimized);
    match aer(&c, 9) {
        AdminResult::Complete { cpl, data } => {
            assert_eq!((cpl.cid, cpl.dw0), (9, AEN_ANA_CHANGE));
            assert!(data.is_empty());
        }
        AdminResult::Deferred => panic!("pending event not delivered"),
    }
    assert!(matches!(aer(&c, 10), AdminResult::Deferred));
}

#[test]
fn aen_respects_async_event_configuration() {
    let t = Target::new(cfg());
    let c = bring_up(&t, 1, SUB1, HOST1);
    assert!(
        set_feat(&c, feat::ASYNC_EVENT_CONFIG, 1 << 8)
            .status
            .is_success()
    );
    assert!(matches!(aer(&c, 1), AdminResult::Deferred));
    t.set_ana_state(1, 1, AnaState::NonOptimized);
    assert!(c.take_events().is_empty());
    let mut cfg = t.config();
    cfg.subsystems[0].namespaces.push(ns(3, 1));
    t.apply(cfg);
    assert_eq!(c.take_events()[0].dw0, AEN_NS_CHANGED);
}

#[test]
fn aer_after_apply_adding_resizing_and_removing_namespaces() {
    let t = Target::new(cfg());
    let c = bring_up(&t, 1, SUB1, HOST1);
    let other = bring_up(&t, 1, SUB2, HOST1);
    assert!(matches!(aer(&c, 1), AdminResult::Deferred));
    assert!(matches!(aer(&other, 1), AdminResult::Deferred));
    let v0 = c.io_view();
    assert_eq!(v0.namespaces.len(), 2);

    let mut cfg = t.config();
    cfg.subsystems[0].namespaces.push(ns(3, 1));
    t.apply(cfg.clone());
    let ev = c.take_events();
    assert_eq!((ev.len(), ev[0].cid, ev[0].dw0), (1, 1, AEN_NS_CHANGED));
    assert!(other.take_events().is_empty(), "other subsystem unchanged");
    let v1 = c.io_view();
    assert!(v1.generation > v0.generation);
    assert!(v1.get(3).is_some());
    let (_, b) = identify(&c, cns::ACTIVE_NS_LIST, 0, 0);
    assert_eq!(le32(&b, 8), 3);

    // Changed Namespace List: RAE keeps it, a plain read clears it.
    let (_, b) = get_log(&c, lid::CHANGED_NS_LIST, 0, true, 4096, 0);
    assert_eq!((le32(&b, 0), le32(&b, 4)), (3, 0));
    let (_, b) = get_log(&c, lid::CHANGED_NS_LIST, 0, false, 4096, 0);
    assert_eq!((le32(&b, 0), le32(&b, 4)), (3, 0));
    let (_, b) = get_log(&c, lid::CHANGED_NS_LIST, 0, false, 4096, 0);
    assert!(b.iter().all(|&x| x == 0));

    // Resize NSID 1 and remove NSID 2.
    assert!(matches!(aer(&c, 2), AdminResult::Deferred));
    cfg.subsystems[0].namespaces[0].bdev = bdev(1 << 21, 4096, false);
    cfg.subsystems[0].namespaces.remove(1);
    t.apply(cfg.clone());
    assert_eq!(c.take_events()[0].dw0, AEN_NS_CHANGED);
    let (_, b) = get_log(&c, lid::CHANGED_NS_LIST, 0, false, 4096, 0);
    assert_eq!((le32(&b, 0), le32(&b, 4), le32(&b, 8)), (1, 2, 0));
    let (_, b) = identify(&c, cns::NAMESPACE, 1, 0);
    assert_eq!(le64(&b, 0), 1 << 21);
    assert!(c.io_view().get(2).is_none());

    // Re-applying the same config (even with reopened bdevs) is no change.
    assert!(matches!(aer(&c, 3), AdminResult::Deferred));
    cfg.subsystems[0].namespaces[0].bdev = bdev(1 << 21, 4096, false);
    let g = c.generation();
    t.apply(cfg.clone());
    assert!(c.generation() > g, "the I/O path must pick up the new bdev");
    assert!(c.take_events().is_empty());

    // Moving a namespace to another ANA group is a namespace change; the
    // ANA log shows the new group with a new CHGCNT.
    let (_, b) = get_log(&c, lid::ANA, 0, false, 4096, 0);
    let (chg, _) = parse_ana(&b);
    cfg.subsystems[0].namespaces[0].anagrpid = 4;
    t.apply(cfg);
    let ev = c.take_events();
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0].dw0, AEN_NS_CHANGED);
    assert!(matches!(aer(&c, 4), AdminResult::Deferred));
    let (_, b) = get_log(&c, lid::ANA, 0, false, 4096, 0);
    let (chg2, groups) = parse_ana(&b);
    assert!(chg2 > chg);
    assert_eq!(groups, vec![(1, 1, vec![3]), (4, 1, vec![1])]);
}

#[test]
fn changed_ns_list_holds_every_possible_nsid() {
    // NSIDs are bounded by NN = 1024 and deduplicated, so the list never
    // needs the FFFFFFFFh overflow entry (spec::log tests that encoding).
    let t = Target::new(cfg());
    let c = bring_up(&t, 1, SUB1, HOST1);
    let mut cfg = t.config();
    cfg.subsystems[0].namespaces = (3..=1024).map(|n| ns(n, 1)).collect();
    t.apply(cfg);
    let (_, b) = get_log(&c, lid::CHANGED_NS_LIST, 0, false, 4096, 0);
    let ids: Vec<u32> = (0..1024).map(|i| le32(&b, i * 4)).collect();
    assert_eq!(ids, (1..=1024).collect::<Vec<_>>());
}

// ------------------------------------------------------------- keep alive

#[test]
fn keep_alive_timeout() {
    let t = Target::new(cfg());
    // KATO from Connect CDW12, in ms, rounded up to whole seconds.
    let (c, _) = match connect(
        &t,
        1,
        &connect_cmd(0, 31, 1500),
        &cdata(SUB1, HOST1, 0xFFFF),
        1000,
    ) {
        Ok((Connected::Admin { ctrlr }, cpl)) => (ctrlr, cpl),
        _ => panic!(),
    };
    assert_eq!(c.kato_ms(), 2000);
    assert!(!c.kato_expired(3000));
    assert!(c.kato_expired(3001));
    c.touch(0, 2500);
    assert!(!c.kato_expired(4500));
    assert!(c.kato_expired(4501));
    // touch never moves the timer backwards.
    c.touch(0, 100);
    assert!(!c.kato_expired(4500));
    // Any admin command, Keep Alive included, counts.
    let _ = c.exec_admin(&admin(admin_opc::KEEP_ALIVE, 0, 0, 0), &[], 10_000);
    assert!(!c.kato_expired(12_000));
    assert!(c.kato_expired(12_001));
    // KATO 0 disables it.
    let c0 = match connect(
        &t,
        1,
        &connect_cmd(0, 31, 0),
        &cdata(SUB1, HOST1, 0xFFFF),
        0,
    ) {
        Ok((Connected::Admin { ctrlr }, _)) => ctrlr,
        _ => panic!(),
    };
    assert_eq!(c0.kato_ms(), 0);
    assert!(!c0.kato_expired(u64::MAX));
    // A discovery controller without KATO still gets reaped eventually.
    let d = match connect(
        &t,
        5,
        &connect_cmd(0, 31, 0),
        &cdata(DISCOVERY_NQN, HOST3, 0xFFFF),
        0,
    ) {
        Ok((Connected::Admin { ctrlr }, _)) => ctrlr,
        _ => panic!(),
    };
    assert_eq!(d.kato_ms(), DISCOVERY_DEFAULT_KATO_MS);
    assert!(d.kato_expired(DISCOVERY_DEFAULT_KATO_MS + 1));
}

// ---------------------------------------------------- destroy / reconfig

#[test]
fn destroy_on_host_or_subsystem_removal_via_apply() {
    let t = Target::new(cfg());
    let c1 = bring_up(&t, 1, SUB1, HOST1);
    let c2 = bring_up(&t, 1, SUB1, HOST2);
    let c3 = bring_up(&t, 1, SUB2, HOST1);
    let w1 = counting_waker(&c1);
    assert_eq!(t.controllers().len(), 3);

    let mut cfg = t.config();
    cfg.subsystems[0].hosts.retain(|h| h != HOST1);
    let g = c1.generation();
    t.apply(cfg.clone());
    assert!(c1.generation() > g);
    assert!(c1.is_destroyed() && !c1.is_enabled());
    assert!(w1.0.load(Ordering::SeqCst) >= 1, "admin connection woken");
    assert!(!c2.is_destroyed() && !c3.is_destroyed());
    assert_eq!(t.controllers().len(), 2);
    // Commands on a destroyed controller are refused.
    let (cpl, _) = exec(&c1, &admin(admin_opc::KEEP_ALIVE, 0, 0, 0));
    assert_eq!(cpl.status, Status::ABORTED_SQ_DELETION);
    assert!(c1.io_view().namespaces.is_empty());

    // Subsystem no longer exported through the controller's port.
    cfg.subsystems[1].ports = vec![2];
    t.apply(cfg.clone());
    assert!(c3.is_destroyed());

    cfg.subsystems.remove(0);
    t.apply(cfg);
    assert!(c2.is_destroyed());
    assert!(t.controllers().is_empty());

    // Explicit destroy is idempotent and unregisters.
    let t = Target::new(self::cfg());
    let c = bring_up(&t, 1, SUB1, HOST1);
    let g = c.generation();
    c.destroy();
    c.destroy();
    assert!(c.is_destroyed());
    assert!(t.controllers().is_empty());
    assert_eq!(c.generation(), g + 1);
}

#[test]
fn io_view_ana_states_per_port() {
    let mut cfg = cfg();
    cfg.ports[1].ana.insert(2, AnaState::NonOptimized);
    let t = Target::new(cfg);
    let c1 = bring_up(&t, 1, SUB1, HOST1);
    let c2 = bring_up(&t, 2, SUB1, HOST1);
    let v1 = c1.io_view();
    let v2 = c2.io_view();
    assert_eq!(v1.generation, c1.generation());
    assert_eq!(v1.get(2).unwrap().ana_state, AnaState::Optimized);
    assert_eq!(v2.get(2).unwrap().ana_state, AnaState::NonOptimized);
    assert_eq!(v2.get(1).unwrap().ana_state, AnaState::Optimized);
    assert!(v2.get(3).is_none());
    assert_eq!(v2.get(1).unwrap().bdev.info().block_size, 4096);
    // Cached while nothing changes.
    assert!(Arc::ptr_eq(&v1, &c1.io_view()));
    t.set_ana_state(1, 1, AnaState::Inaccessible);
    let v1b = c1.io_view();
    assert!(v1b.generation > v1.generation);
    assert_eq!(v1b.get(1).unwrap().ana_state, AnaState::Inaccessible);
    assert_eq!(c2.io_view().get(1).unwrap().ana_state, AnaState::Optimized);
    // Same NSIDs on every controller of the subsystem.
    let ids = |v: &IoView| v.namespaces.iter().map(|n| n.nsid).collect::<Vec<_>>();
    assert_eq!(ids(&v1b), ids(&c2.io_view()));
}

/// A teardown, or a reconfiguration of one subsystem, moves the view
/// generation of no controller it does not concern, so none of their queues
/// rebuild.
#[test]
fn view_generations_move_only_for_the_controllers_concerned() {
    let t = Target::new(cfg());
    let a1 = bring_up(&t, 1, SUB1, HOST1);
    let a2 = bring_up(&t, 1, SUB1, HOST2);
    let b = bring_up(&t, 1, SUB2, HOST1);
    let (va2, vb) = (a2.io_view(), b.io_view());
    let (ga1, ga2, gb) = (a1.generation(), a2.generation(), b.generation());

    a1.destroy();
    assert!(a1.generation() > ga1, "its own queues drop their channels");
    assert_eq!(b.generation(), gb, "subsystem B is untouched");
    assert_eq!(a2.generation(), ga2, "so is another controller of A");
    assert!(Arc::ptr_eq(&vb, &b.io_view()));
    assert!(Arc::ptr_eq(&va2, &a2.io_view()));

    // Resizing SUB1's namespace is a new view for SUB1's controllers only.
    let mut cfg = t.config();
    cfg.subsystems[0].namespaces[0].bdev = bdev(1 << 21, 4096, false);
    t.apply(cfg.clone());
    assert!(a2.generation() > ga2);
    assert_eq!(b.generation(), gb);
    // A reload that changes nothing either leaves every view alone.
    let ga2 = a2.generation();
    t.apply(cfg);
    assert_eq!((a2.generation(), b.generation()), (ga2, gb));
    // An ANA change on a group SUB2 has no namespace in is none of its
    // business.
    t.set_ana_state(1, 2, AnaState::Inaccessible);
    assert!(a2.generation() > ga2);
    assert_eq!(b.generation(), gb);
    assert!(Arc::ptr_eq(&vb, &b.io_view()));
}

/// Keep Alive counts activity on any queue: each queue has its own slot,
/// and the check takes the latest of them.
#[test]
fn io_on_one_queue_keeps_the_controller_alive_while_others_idle() {
    let t = Target::new(cfg());
    let c = match connect(
        &t,
        1,
        &connect_cmd(0, 31, 2000),
        &cdata(SUB1, HOST1, 0xFFFF),
        1000,
    ) {
        Ok((Connected::Admin { ctrlr }, _)) => ctrlr,
        _ => panic!(),
    };
    for now in (2000..=10_000).step_by(1000) {
        c.touch(1, now);
        assert!(!c.kato_expired(now + 2000), "queue 1 is busy at {now}");
    }
    assert!(c.kato_expired(12_001), "KATO after the last I/O");
    c.touch(MAX_IO_QUEUES, 12_000);
    assert!(!c.kato_expired(14_000), "the highest QID has a slot too");
    // A QID no Connect can name is ignored rather than counted elsewhere.
    c.touch(MAX_IO_QUEUES + 1, 20_000);
    assert!(c.kato_expired(14_001));
}

#[test]
fn ana_state_parse() {
    assert_eq!(AnaState::parse("optimized"), Some(AnaState::Optimized));
    assert_eq!(
        AnaState::parse("non-optimized"),
        Some(AnaState::NonOptimized)
    );
    assert_eq!(
        AnaState::parse("inaccessible"),
        Some(AnaState::Inaccessible)
    );
    assert_eq!(
        AnaState::parse("persistent-loss"),
        Some(AnaState::PersistentLoss)
    );
    assert_eq!(AnaState::parse("change"), Some(AnaState::Change));
    assert_eq!(AnaState::parse("Optimized"), None);
    assert_eq!(AnaState::Change as u8, 0x0F);
}

// -------------------------------------------------------------- discovery

#[test]
fn discovery_controller() {
    let t = Target::new(cfg());
    let d = bring_up(&t, 2, DISCOVERY_NQN, HOST1);
    let w = counting_waker(&d);

    let (cpl, b) = identify(&d, cns::CONTROLLER, 0, 0);
    assert!(cpl.status.is_success());
    assert_eq!(b[111], 2, "CNTRLTYPE discovery");
    assert_eq!(le16(&b, 78), d.cntlid());
    assert_eq!(&b[768..768 + DISCOVERY_NQN.len()], DISCOVERY_NQN.as_bytes());
    assert_eq!(le32(&b, 92), 1 << 31, "OAES");
    assert_ne!(b[261] & (1 << 2), 0, "LPA extended data");
    assert_ne!(le16(&b, 320), 0, "KAS");
    assert_eq!(le32(&b, 536) & 3, 1, "SGLS");
    assert_eq!(le16(&b, 1800), 0, "ICDOFF");
    let (cpl, _) = identify(&d, cns::NAMESPACE, 1, 0);
    assert_eq!(cpl.status, Status::INVALID_FIELD.dnr());

    // Header first, then the entries, as nvme-cli reads it.
    let (cpl, h) = get_log(&d, lid::DISCOVERY, 0, false, 1024, 0);
    assert!(cpl.status.is_success());
    let genctr = le64(&h, 0);
    let numrec = le64(&h, 8);
    assert_eq!(numrec, 3, "SUB1 on ports 1 and 2, SUB2 on port 1");
    let (_, e) = get_log(&d, lid::DISCOVERY, 0, false, (numrec * 1024) as u32, 1024);
    let recs: Vec<(String, u16)> = e
        .chunks(1024)
        .map(|r| {
            let end = r[256..512].iter().position(|&x| x == 0).unwrap();
            (
                String::from_utf8(r[256..256 + end].to_vec()).unwrap(),
                le16(r, 4),
            )
        })
        .collect();
    assert_eq!(
        recs,
        vec![(SUB1.into(), 1), (SUB1.into(), 2), (SUB2.into(), 1)]
    );
    let (cpl, _) = get_log(&d, lid::DISCOVERY, 0, false, 4, 1024 * 5);
    assert_eq!(cpl.status, Status::INVALID_FIELD.dnr());
    for other in [lid::SMART, lid::ANA, lid::CHANGED_NS_LIST] {
        let (cpl, _) = get_log(&d, other, 0, false, 512, 0);
        assert_eq!(cpl.status, Status::INVALID_LOG_PAGE.dnr());
    }

    // Host 3 only sees the allow-any subsystem.
    let d3 = bring_up(&t, 1, DISCOVERY_NQN, HOST3);
    let (_, h) = get_log(&d3, lid::DISCOVERY, 0, false, 1024, 0);
    assert_eq!(le64(&h, 8), 1);

    // Features, Keep Alive, and nothing else.
    assert!(
        set_feat(&d, feat::ASYNC_EVENT_CONFIG, 1 << 31)
            .status
            .is_success()
    );
    assert_eq!(
        set_feat(&d, feat::ASYNC_EVENT_CONFIG, 1 << 8).status,
        Status::INVALID_FIELD.dnr()
    );
    assert!(
        set_feat(&d, feat::KEEP_ALIVE_TIMER, 30_000)
            .status
            .is_success()
    );
    assert_eq!(get_feat(&d, feat::KEEP_ALIVE_TIMER, 0, 0).dw0, 30_000);
    assert_eq!(
        set_feat(&d, feat::NUMBER_OF_QUEUES, 1).status,
        Status::INVALID_FIELD.dnr()
    );
    assert!(
        exec(&d, &admin(admin_opc::KEEP_ALIVE, 0, 0, 0))
            .0
            .status
            .is_success()
    );
    for opc in [admin_opc::ABORT, 0x01, 0x80] {
        let (cpl, _) = exec(&d, &admin(opc, 0, 0, 0));
        assert_eq!(cpl.status, Status::INVALID_OPCODE.dnr(), "opc {opc:#x}");
    }
    assert!(d.io_view().namespaces.is_empty());

    // Discovery Log Change: to host 1 (who can see the new subsystem) only.
    assert!(matches!(aer(&d, 50), AdminResult::Deferred));
    assert!(matches!(aer(&d3, 50), AdminResult::Deferred));
    let mut cfg = t.config();
    let mut s3 = sub1();
    s3.nqn = "nqn.2024-01.io.strata:sub3".into();
    s3.hosts = vec![HOST1.into()];
    cfg.subsystems.push(s3);
    t.apply(cfg.clone());
    let ev = d.take_events();
    assert_eq!((ev.len(), ev[0].cid, ev[0].dw0), (1, 50, AEN_DISC_CHANGE));
    assert!(w.0.load(Ordering::SeqCst) >= 1);
    assert!(d3.take_events().is_empty());
    let (_, h) = get_log(&d, lid::DISCOVERY, 0, false, 1024, 0);
    assert!(le64(&h, 0) > genctr, "GENCTR moved");
    assert_eq!(le64(&h, 8), 5);

    // Namespace or ANA changes do not touch the discovery log.
    assert!(matches!(aer(&d, 51), AdminResult::Deferred));
    let g = le64(&h, 0);
    cfg.subsystems[0].namespaces.push(ns(9, 1));
    t.apply(cfg);
    t.set_ana_state(1, 1, AnaState::Inaccessible);
    assert!(d.take_events().is_empty());
    let (_, h) = get_log(&d, lid::DISCOVERY, 0, false, 1024, 0);
    assert_eq!(le64(&h, 0), g);
}

// ------------------------------------------------------------- robustness

#[test]
fn no_panic_on_arbitrary_commands() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x0574_7a7a);
    let t = Target::new(cfg());
    let c = bring_up(&t, 1, SUB1, HOST1);
    let d = bring_up(&t, 1, DISCOVERY_NQN, HOST1);
    let opcodes = [
        admin_opc::GET_LOG_PAGE,
        admin_opc::IDENTIFY,
        admin_opc::SET_FEATURES,
        admin_opc::GET_FEATURES,
        admin_opc::FABRICS,
        admin_opc::ABORT,
        admin_opc::KEEP_ALIVE,
    ];
    for i in 0..20_000u32 {
        let mut cmd = NvmeCmd::default();
        rng.fill(&mut cmd.0[..]);
        cmd.0[1] &= !3;
        cmd.set_opcode(opcodes[i as usize % opcodes.len()]);
        if cmd.opcode() == admin_opc::FABRICS && cmd.fctype() == fctype::PROPERTY_SET {
            // Keep the controller enabled most of the time.
            cmd.set_cdw(11, prop::CSTS);
        }
        if cmd.opcode() == admin_opc::GET_LOG_PAGE && i % 3 == 0 {
            cmd.set_cdw(11, 0);
            cmd.set_cdw(12, cmd.cdw12() & 0xffc);
            cmd.set_cdw(13, 0);
        }
        for ctrl in [&c, &d] {
            if let AdminResult::Complete { data, .. } = ctrl.exec_admin(&cmd, &[], 0) {
                assert!(data.len() <= MDTS_BYTES as usize);
            }
        }
        let mut data = [0u8; CONNECT_DATA_LEN];
        rng.fill(&mut data[..]);
        if i % 2 == 0 {
            data[256..256 + SUB1.len() + 1].copy_from_slice(&[SUB1.as_bytes(), &[0]].concat());
            data[512..512 + HOST1.len() + 1].copy_from_slice(&[HOST1.as_bytes(), &[0]].concat());
        }
        let _ = connect(&t, rng.gen_range(0..4), &cmd, &data, 0);
        let mut conn = connect_cmd(rng.r#gen(), rng.r#gen(), rng.r#gen());
        conn.set_cdw(10, conn.cdw10() & 0xffff_0000);
        let _ = connect(&t, 1, &conn, &data, 0);
    }
}

// --------------------------------------------------------------- fencing

#[test]
fn group_fence_epochs_only_rise_and_name_real_groups() {
    let t = Target::new(cfg());
    let st = t.group_fence(2).unwrap();
    // Without a cluster every group is open and the ports decide.
    assert!(st.readable && st.writable);
    assert_eq!((st.epoch, st.ana), (0, None));

    let a = t.set_group_fence(2, 5, AnaState::Optimized).unwrap();
    assert_eq!((a.anagrpid, a.epoch), (2, 5));
    // The same epoch may change state (no ownership change); a lower one
    // is a stale decision and changes nothing.
    let b = t.set_group_fence(2, 5, AnaState::NonOptimized).unwrap();
    assert!(b.seq > a.seq);
    assert_eq!(
        t.set_group_fence(2, 4, AnaState::Optimized),
        Err(FenceError::StaleEpoch {
            anagrpid: 2,
            current: 5,
            requested: 4
        })
    );
    assert_eq!(t.group_fence(2).unwrap().seq, b.seq);
    assert_eq!(t.group_fence(2).unwrap().ana, Some(AnaState::NonOptimized));
    // A revoke keeps the epoch and moves the sequence.
    let c = t.revoke_group_lease(2).unwrap();
    assert_eq!(c.epoch, 5);
    assert!(c.seq > b.seq);
    let st = t.group_fence(2).unwrap();
    assert!(!st.readable && !st.writable);

    for g in [0, crate::subsystem::MAX_ANA_GROUPS + 1] {
        assert_eq!(
            t.set_group_fence(g, 1, AnaState::Optimized),
            Err(FenceError::NoSuchGroup(g))
        );
        assert_eq!(t.revoke_group_lease(g), Err(FenceError::NoSuchGroup(g)));
    }
    // Other groups never moved.
    assert_eq!(t.group_fence(1).unwrap().seq, 0);
}

#[test]
fn a_group_fence_sets_the_ana_state_on_every_port_and_raises_ana_change() {
    let t = Target::new(cfg());
    let c1 = bring_up(&t, 1, SUB1, HOST1);
    let c2 = bring_up(&t, 2, SUB1, HOST2);
    assert!(matches!(aer(&c1, 1), AdminResult::Deferred));
    assert!(matches!(aer(&c2, 1), AdminResult::Deferred));
    t.set_group_fence(2, 1, AnaState::Inaccessible).unwrap();
    for p in t.config().ports {
        assert_eq!(
            p.ana.get(&2),
            Some(&AnaState::Inaccessible),
            "port {}",
            p.id
        );
    }
    for c in [&c1, &c2] {
        let ev = c.take_events();
        assert_eq!(ev.len(), 1, "cntlid {}", c.cntlid());
        assert_eq!(ev[0].dw0, AEN_ANA_CHANGE);
        let (_, b) = get_log(c, lid::ANA, 0, false, 4096, 0);
        assert_eq!(parse_ana(&b).1[1], (2, 0x03, vec![2]));
    }
    // Group 1 still reads Optimized.
    let (_, b) = get_log(&c1, lid::ANA, 0, false, 4096, 0);
    assert_eq!(parse_ana(&b).1[0], (1, 0x01, vec![1]));
}

#[test]
fn a_barrier_with_no_io_queues_resolves_at_once() {
    let t = Target::new(cfg());
    let _c = bring_up(&t, 1, SUB1, HOST1);
    let tk = t.set_group_fence(1, 1, AnaState::Change).unwrap();
    assert!(t.quiesce_outstanding(tk).is_empty());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    rt.block_on(t.quiesce(tk, std::time::Duration::from_secs(30)))
        .unwrap();
}
