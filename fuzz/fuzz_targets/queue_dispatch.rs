#![no_main]
//! Command dispatch: arbitrary capsules and raw bytes against live admin and
//! I/O queue pairs (real controller, RAM bdev), with fuzzed Connect fields.
//! Nothing may panic, and after every input the completion rule holds:
//! commands in = responses out + commands legitimately in flight, unless
//! the connection ended. A refused Connect leaves no controller behind.

use std::sync::Arc;
use std::task::{Context, Waker};

use libfuzzer_sys::fuzz_target;
use strata_target::bdev::ram::RamBdev;
use strata_target::host;
use strata_target::queue::{QueueLimits, QueuePair};
use strata_target::ctrlr::Target;
use strata_target::spec::{self, ConnectData, NvmeCmd};
use strata_target::subsystem::TargetConfig;

const NQN: &str = "nqn.2026-11.dev.strata:fuzz";
const HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:fuzz";

fn target() -> Arc<Target> {
    Target::new(TargetConfig::single_namespace(NQN, RamBdev::new("f", 1 << 20, 512).unwrap(), 1))
}

fn feed(qp: &mut QueuePair, bytes: &[u8], now: u64) {
    let used = qp.handle_input(bytes, now);
    assert!(used <= bytes.len());
    let mut cx = Context::from_waker(Waker::noop());
    qp.poll_completions(&mut cx);
    let mut out = Vec::new();
    qp.drain_tx(&mut out);
    if let Err(e) = qp.check_completions() {
        panic!("{e}");
    }
}

fn capsule(cmd: &NvmeCmd, data: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    host::encode_capsule(cmd, data, false, false, &mut b);
    b
}

/// Connect fields: SQSIZE and CATTR/KATO from the input, or the usual ones.
struct ConnectParams {
    sqsize: u16,
    cattr: u8,
    kato: u32,
    subnqn: &'static str,
    hostnqn: &'static str,
}

fn connect(qp: &mut QueuePair, qid: u16, cntlid: u16, p: &ConnectParams) {
    let mut b = Vec::new();
    host::encode_icreq(false, false, &mut b);
    let d = ConnectData { hostid: [2; 16], cntlid, subnqn: p.subnqn.into(), hostnqn: p.hostnqn.into() };
    let (mut c, d) = host::connect(qid, p.sqsize, p.kato, &d);
    c.set_cdw(11, u32::from(p.sqsize) | (u32::from(p.cattr) << 16));
    b.extend(capsule(&c, &d));
    feed(qp, &b, 1);
}

const NORMAL: ConnectParams = ConnectParams { sqsize: 31, cattr: 0, kato: 0, subnqn: NQN, hostnqn: HOST };

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let t = target();
    if mode & 0x80 != 0 {
        // Connect fields from the input, on the subsystem or the discovery NQN.
        if rest.len() < 8 {
            return;
        }
        let p = ConnectParams {
            sqsize: u16::from_le_bytes([rest[0], rest[1]]),
            cattr: rest[2],
            kato: u32::from_le_bytes([rest[3], rest[4], rest[5], rest[6]]),
            subnqn: if rest[7] & 1 == 0 { NQN } else { spec::DISCOVERY_NQN },
            hostnqn: if rest[7] & 2 == 0 { HOST } else { "" },
        };
        let qid = if rest[7] & 4 == 0 { 0 } else { u16::from(rest[7] >> 3) };
        let mut qp = QueuePair::new(t.clone(), 1, QueueLimits::default());
        connect(&mut qp, qid, 0xffff, &p);
        let connected = qp.ctrlr().is_some();
        if !connected {
            assert!(t.controllers().is_empty(), "refused Connect left a controller registered");
        }
        // Then the rest as commands on whatever the queue became.
        for chunk in rest[8..].chunks(64) {
            if chunk.len() < 64 || qp.close_reason().is_some() {
                break;
            }
            let cmd = NvmeCmd::from_slice(chunk).unwrap();
            feed(&mut qp, &capsule(&cmd, &[]), 2);
        }
        drop(qp);
        assert!(t.controllers().is_empty(), "dropped queue left its controller registered");
        return;
    }
    let mut admin = QueuePair::new(t.clone(), 1, QueueLimits::default());
    connect(&mut admin, 0, 0xffff, &NORMAL);
    let Some(cntlid) = admin.ctrlr().map(|c| c.cntlid()) else { panic!("admin connect failed") };
    let en = host::property_set_cmd(spec::prop::CC, host::CC_ENABLE);
    let nq = host::set_features_number_of_queues(1, 1);
    let mut b = capsule(&en, &[]);
    b.extend(capsule(&nq, &[]));
    feed(&mut admin, &b, 1);
    let mut io = QueuePair::new(t, 1, QueueLimits::default());
    connect(&mut io, 1, cntlid, &NORMAL);
    assert!(io.qid() == Some(1), "I/O connect failed");

    match mode % 4 {
        0 => feed(&mut io, rest, 2),
        1 => feed(&mut admin, rest, 2),
        _ => {
            // Structured: 64-byte SQEs, each followed by a length byte and
            // that much in-capsule data, on the queue the mode picks.
            let qp = if mode % 4 == 2 { &mut io } else { &mut admin };
            let mut r = rest;
            while r.len() >= 65 && qp.close_reason().is_none() {
                let cmd = NvmeCmd::from_slice(&r[..64]).unwrap();
                let n = (r[64] as usize * 64).min(r.len() - 65);
                let mut cmd2 = cmd;
                if n > 0 {
                    cmd2.set_sgl(host::in_capsule_sgl(n as u32));
                }
                feed(qp, &capsule(&cmd2, &r[65..65 + n]), 2);
                r = &r[65 + n..];
            }
        }
    }
});
