//! `strata bench inproc`: the target's own path — PDU codec, queue pair,
//! controller and a RAM bdev — driven in process, without sockets.
//!
//! This is the ceiling the transport can approach: whatever a loopback run
//! loses against it is syscalls, wakeups and the network stack. Batches of
//! QD capsules go in as one buffer (as one `read` would deliver them), and
//! the responses come out as one buffer (as one `writev` would send them).

use std::sync::Arc;
use std::task::{Context, Waker};
use std::time::Instant;

use anyhow::{Result, anyhow, bail};
use strata_target::bdev::ram::RamBdev;
use strata_target::ctrlr::Target;
use strata_target::host;
use strata_target::pdu;
use strata_target::queue::{QueueLimits, QueuePair};
use strata_target::spec::{self, ConnectData, NvmeCmd};
use strata_target::subsystem::TargetConfig;

use crate::job::parse_size;

const NQN: &str = "nqn.2026-11.dev.strata:inproc";
const HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:inproc";

#[derive(clap::Args, Debug, Clone)]
pub struct InprocArgs {
    /// read or write (random offsets within the first 64 MiB).
    #[arg(long, default_value = "read")]
    pub rw: String,
    #[arg(long, default_value = "4k")]
    pub bs: String,
    #[arg(long, default_value_t = 32)]
    pub qd: u32,
    /// Commands to execute after warm-up.
    #[arg(long, default_value_t = 1_000_000)]
    pub ios: u64,
    /// Header and data digests on.
    #[arg(long)]
    pub digests: bool,
}

#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct InprocResult {
    pub ios: u64,
    pub ns_per_io: f64,
    pub iops_per_core: f64,
    pub cpu_ns_per_io: f64,
    pub buffer_allocations_after_warmup: u64,
}

fn feed(qp: &mut QueuePair, input: &[u8], out: &mut Vec<u8>) {
    let mut off = 0;
    while off < input.len() {
        let used = qp.handle_input(&input[off..], 1);
        if used == 0 {
            break;
        }
        off += used;
    }
    let mut cx = Context::from_waker(Waker::noop());
    while qp.poll_completions(&mut cx) {}
    out.clear();
    qp.drain_tx(out);
}

fn capsule(cmd: &NvmeCmd, data: &[u8], dg: bool, b: &mut Vec<u8>) {
    host::encode_capsule(cmd, data, dg, dg, b);
}

fn connect_pdus(qid: u16, cntlid: u16, dg: bool) -> (Vec<u8>, Vec<u8>) {
    let mut ic = Vec::new();
    host::encode_icreq(dg, dg, &mut ic);
    // The admin queue is bounded at 128 entries (as SPDK's max_aq_depth);
    // MQES bounds the I/O queue.
    let sqsize = if qid == 0 { host::ADMIN_SQSIZE } else { 1023 };
    let d = ConnectData {
        hostid: [5; 16],
        cntlid,
        subnqn: NQN.into(),
        hostnqn: HOST.into(),
    };
    let (c, d) = host::connect(qid, sqsize, 0, &d);
    let mut b = Vec::new();
    capsule(&c, &d, dg, &mut b);
    (ic, b)
}

/// Counts CapsuleResp PDUs in a transmit buffer by walking PLEN.
fn count_responses(mut b: &[u8]) -> Result<u64> {
    let mut n = 0;
    while b.len() >= 8 {
        let plen = u32::from_le_bytes(b[4..8].try_into().unwrap()) as usize;
        if plen < 8 || plen > b.len() {
            bail!("truncated PDU in target output");
        }
        if b[0] == pdu::PduType::CapsuleResp as u8 {
            // Status field: bits 15:1 of CQE DW3 at header offset 8+14.
            let st = u16::from_le_bytes([b[22], b[23]]) >> 1;
            if st != 0 {
                bail!("command failed with status {st:#x}");
            }
            n += 1;
        }
        b = &b[plen..];
    }
    Ok(n)
}

pub fn run(a: &InprocArgs) -> Result<InprocResult> {
    let bs = parse_size(&a.bs).map_err(|e| anyhow!("--bs: {e}"))? as u32;
    if bs == 0 || !bs.is_multiple_of(512) || bs > 1 << 20 {
        bail!("--bs must be a multiple of 512 up to 1M");
    }
    let write = match a.rw.as_str() {
        "read" | "randread" => false,
        "write" | "randwrite" => true,
        other => bail!("--rw {other}: use read or write"),
    };
    if write && bs > strata_target::ctrlr::IN_CAPSULE_DATA_SIZE {
        bail!("inproc writes are in-capsule: --bs at most 8k");
    }
    let dg = a.digests;
    let bdev = RamBdev::new("inproc", 64 << 20, 512)?;
    let t: Arc<Target> = Target::new(TargetConfig::single_namespace(NQN, bdev, 1));
    let mut out = Vec::with_capacity(4 << 20);
    let mut admin = QueuePair::new(t.clone(), 1, QueueLimits::default());
    let (ic, conn) = connect_pdus(0, 0xffff, dg);
    feed(&mut admin, &ic, &mut out);
    feed(&mut admin, &conn, &mut out);
    let cntlid = admin
        .ctrlr()
        .ok_or_else(|| anyhow!("admin connect failed"))?
        .cntlid();
    let en = host::property_set_cmd(spec::prop::CC, host::CC_ENABLE);
    let nq = host::set_features_number_of_queues(0, 0);
    let mut b = Vec::new();
    capsule(&en, &[], dg, &mut b);
    capsule(&nq, &[], dg, &mut b);
    feed(&mut admin, &b, &mut out);
    let mut io = QueuePair::new(t, 1, QueueLimits::default());
    let (ic, conn) = connect_pdus(1, cntlid, dg);
    feed(&mut io, &ic, &mut out);
    feed(&mut io, &conn, &mut out);
    if io.qid() != Some(1) {
        bail!("I/O connect failed");
    }

    // One batch of QD commands at pseudo-random 4K-aligned offsets.
    let nlb = bs / 512;
    let span = (64u64 << 20) / u64::from(bs);
    let data = vec![0xa5u8; bs as usize];
    let mut batch = Vec::new();
    let mut x = 0x2545_f491_4f6c_dd1du64;
    for i in 0..a.qd.max(1) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let opc = if write {
            spec::io_opc::WRITE
        } else {
            spec::io_opc::READ
        };
        let slba = (x % span) * u64::from(nlb);
        let mut c = host::rw_cmd(opc, 1, slba, nlb, bs, write);
        c.set_cid(i as u16);
        capsule(&c, if write { &data } else { &[] }, dg, &mut batch);
    }
    let per_batch = u64::from(a.qd.max(1));
    for _ in 0..(10_000 / per_batch).max(2) {
        feed(&mut io, &batch, &mut out);
        if count_responses(&out)? != per_batch {
            bail!("warm-up batch did not complete");
        }
    }
    let warm_allocs = io.buffer_allocations();
    let batches = a.ios.div_ceil(per_batch);
    let cpu0 = thread_cpu_ns();
    let t0 = Instant::now();
    let mut done = 0;
    for _ in 0..batches {
        feed(&mut io, &batch, &mut out);
        done += count_responses(&out)?;
    }
    let wall = t0.elapsed().as_nanos() as f64;
    let cpu = (thread_cpu_ns() - cpu0) as f64;
    if done != batches * per_batch {
        bail!("{done} of {} commands completed", batches * per_batch);
    }
    Ok(InprocResult {
        ios: done,
        ns_per_io: wall / done as f64,
        iops_per_core: done as f64 / (cpu / 1e9),
        cpu_ns_per_io: cpu / done as f64,
        buffer_allocations_after_warmup: io.buffer_allocations() - warm_allocs,
    })
}

fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

pub fn cmd_inproc(a: InprocArgs) -> Result<()> {
    let r = run(&a)?;
    println!(
        "inproc {} bs={} qd={} digests={}: {} I/Os, {:.0} ns/IO wall, {:.0} ns/IO CPU, {:.0} IOPS per core, {} buffer allocations after warm-up",
        a.rw,
        a.bs,
        a.qd,
        a.digests,
        r.ios,
        r.ns_per_io,
        r.cpu_ns_per_io,
        r.iops_per_core,
        r.buffer_allocations_after_warmup
    );
    println!("{}", serde_json::to_string(&r)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inproc_path_completes_every_command_without_allocating() {
        for (rw, dg) in [("read", false), ("write", true)] {
            let r = run(&InprocArgs {
                rw: rw.into(),
                bs: "4k".into(),
                qd: 16,
                ios: 20_000,
                digests: dg,
            })
            .unwrap();
            assert_eq!(r.ios, 20_000);
            assert_eq!(r.buffer_allocations_after_warmup, 0, "{rw}");
        }
    }
}
