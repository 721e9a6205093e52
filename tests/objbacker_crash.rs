//! Crash consistency of object-backed namespaces through the whole stack:
//! a real `strata serve` process, NVMe/TCP, objbacker, a real store.
//!
//! Each trial: fresh buckets, `strata serve`, a writer issuing 4 KiB and
//! 1 MiB writes at seeded pseudo-random LBAs with a FLUSH every few writes;
//! after at least one FLUSH has completed and a seeded 50–500 ms more, the
//! server gets SIGKILL. It is restarted on the same buckets and every block
//! of the device is read and checked:
//!
//! * every block is whole (never torn): all zeros, or exactly one of the
//!   4 KiB values written to that LBA (each carries its LBA and a unique
//!   generation, and the rest is derived from both);
//! * every block written before the last completed FLUSH holds the value
//!   it had at that FLUSH or a later one written to it.
//!
//! Writes after the last completed FLUSH may or may not have survived.

mod support;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng, rngs::StdRng};
use strata_target::pdu;
use strata_target::spec::{self, NvmeCmd, NvmeCpl, SglDescriptor};
use support::objstores::{self, S3s};
use support::{Client, Rsp, Server, free_port, rw};

const NQN: &str = "nqn.2026-11.dev.strata:crash";
const HOSTNQN: &str = "nqn.2026-11.dev.strata:crash-host";
const BS: u64 = 4096;
const DEV_BYTES: u64 = 32 << 20;
const DEV_BLOCKS: u64 = DEV_BYTES / BS;
const TRIALS: u64 = 20;
const FLUSH_EVERY: u64 = 6;

/// The 4 KiB value of generation `generation` at `lba`: LBA and generation
/// in the first 16 bytes, the rest derived from both.
fn block(lba: u64, generation: u64) -> Vec<u8> {
    let mut b = Vec::with_capacity(BS as usize);
    b.extend_from_slice(&lba.to_le_bytes());
    b.extend_from_slice(&generation.to_le_bytes());
    let mut x = (lba.wrapping_mul(0x9e37_79b9_7f4a_7c15)
        ^ generation.wrapping_mul(0xd6e8_feb8_6659_fd93))
        | 1;
    while b.len() < BS as usize {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        b.extend_from_slice(&x.to_le_bytes());
    }
    b
}

#[derive(Default)]
struct History {
    /// Every generation ever sent to each LBA (recorded before sending: a
    /// write in flight at the kill may or may not land).
    sent: HashMap<u64, Vec<u64>>,
    /// Generation of the last completed write per LBA.
    completed: HashMap<u64, u64>,
    /// `completed` as it was when the last successful FLUSH was sent.
    flushed: HashMap<u64, u64>,
    flushes: u64,
    writes: u64,
}

/// Sends one command and waits for its completion; None when the target
/// went away (the kill).
fn exec(c: &mut Client, cmd: NvmeCmd, data: &[u8]) -> Option<(NvmeCpl, Vec<u8>)> {
    c.capsule(cmd, data);
    let mut got = Vec::new();
    loop {
        match c.recv() {
            Rsp::Cpl(cpl) => return Some((cpl, got)),
            Rsp::C2H(_, d) => got.extend_from_slice(&d),
            Rsp::Closed => return None,
            other => panic!("unexpected {other:?}"),
        }
    }
}

fn write(c: &mut Client, slba: u64, data: &[u8]) -> Option<NvmeCpl> {
    let mut cmd = rw(
        spec::io_opc::WRITE,
        slba,
        (data.len() as u64 / BS) as u32,
        data.len() as u32,
    );
    if data.len() <= 8192 {
        cmd.set_sgl(SglDescriptor {
            addr: 0,
            len: data.len() as u32,
            id: spec::SGL_ID_DATA_BLOCK_OFFSET,
        });
        return exec(c, cmd, data).map(|x| x.0);
    }
    c.capsule(cmd, &[]);
    // Answer every R2T with its range until the completion arrives.
    loop {
        let r2t = match c.recv() {
            Rsp::R2T(r) => r,
            Rsp::Cpl(cpl) => return Some(cpl),
            Rsp::Closed => return None,
            other => panic!("expected R2T, got {other:?}"),
        };
        let mut off = r2t.r2to as usize;
        let end = off + r2t.r2tl as usize;
        while off < end {
            let n = (end - off).min(128 * 1024);
            let mut b = Vec::new();
            pdu::encode_h2c_data(
                &pdu::H2CData {
                    cccid: r2t.cccid,
                    ttag: r2t.ttag,
                    datao: off as u32,
                    datal: n as u32,
                    last: off + n == end,
                },
                false,
                false,
                &mut b,
            );
            b.extend_from_slice(&data[off..off + n]);
            c.send_raw(&b);
            off += n;
        }
    }
}

fn flush(c: &mut Client) -> Option<NvmeCpl> {
    let mut cmd = NvmeCmd::default();
    cmd.set_opcode(spec::io_opc::FLUSH);
    cmd.set_nsid(1);
    exec(c, cmd, &[]).map(|x| x.0)
}

/// The writer: runs until the target goes away or `stop` is set.
fn workload(
    port: u16,
    seed: u64,
    h: Arc<Mutex<History>>,
    generation: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) {
    let (_admin, cntlid) = Client::admin(port, NQN, HOSTNQN);
    let mut q = Client::io(port, NQN, HOSTNQN, cntlid, 1);
    let mut rng = StdRng::seed_from_u64(seed);
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        if n.is_multiple_of(FLUSH_EVERY) {
            let snapshot = h.lock().unwrap().completed.clone();
            match flush(&mut q) {
                None => return,
                Some(c) => {
                    assert!(c.status.is_success(), "FLUSH failed: {c:?}");
                    let mut g = h.lock().unwrap();
                    g.flushed = snapshot;
                    g.flushes += 1;
                }
            }
            continue;
        }
        // 4 KiB at a random LBA, or 1 MiB (256 blocks) at a random block
        // offset: aligned to an object a third of the time, else straddling
        // two objects.
        let (slba, nblocks) = if rng.gen_bool(0.7) {
            (rng.gen_range(0..DEV_BLOCKS), 1)
        } else if rng.gen_bool(0.33) {
            (rng.gen_range(0..DEV_BLOCKS / 256) * 256, 256)
        } else {
            (rng.gen_range(0..DEV_BLOCKS - 256), 256)
        };
        let mut data = Vec::with_capacity((nblocks * BS) as usize);
        let mut gens = Vec::with_capacity(nblocks as usize);
        {
            let mut g = h.lock().unwrap();
            for lba in slba..slba + nblocks {
                let generation = generation.fetch_add(1, Ordering::Relaxed);
                g.sent.entry(lba).or_default().push(generation);
                data.extend_from_slice(&block(lba, generation));
                gens.push(generation);
            }
        }
        match write(&mut q, slba, &data) {
            None => return,
            Some(c) => {
                assert!(c.status.is_success(), "WRITE failed: {c:?}");
                let mut g = h.lock().unwrap();
                for (i, generation) in gens.into_iter().enumerate() {
                    g.completed.insert(slba + i as u64, generation);
                }
                g.writes += 1;
            }
        }
    }
}

/// Reads the whole device and checks it against the history. Returns
/// (blocks covered by the last FLUSH, blocks holding data).
fn verify(port: u16, h: &History, trial: u64) -> (u64, u64) {
    let (_admin, cntlid) = Client::admin(port, NQN, HOSTNQN);
    let mut q = Client::io(port, NQN, HOSTNQN, cntlid, 1);
    let chunk = 256u64;
    let (mut flushed_ok, mut with_data) = (0, 0);
    for start in (0..DEV_BLOCKS).step_by(chunk as usize) {
        let (c, data) = q.read(start, chunk as u32, BS as usize);
        assert!(c.status.is_success(), "trial {trial}: READ {start}: {c:?}");
        assert_eq!(data.len() as u64, chunk * BS);
        for i in 0..chunk {
            let lba = start + i;
            let b = &data[(i * BS) as usize..((i + 1) * BS) as usize];
            let must = h.flushed.get(&lba);
            if b.iter().all(|&x| x == 0) {
                assert!(
                    must.is_none(),
                    "trial {trial}: LBA {lba} reads zeros but generation {} was written before the last completed FLUSH",
                    must.unwrap()
                );
                continue;
            }
            with_data += 1;
            let tag_lba = u64::from_le_bytes(b[0..8].try_into().unwrap());
            let generation = u64::from_le_bytes(b[8..16].try_into().unwrap());
            assert_eq!(
                tag_lba, lba,
                "trial {trial}: LBA {lba} holds another block's data"
            );
            assert!(
                b == block(lba, generation).as_slice(),
                "trial {trial}: LBA {lba} is torn (header says generation {generation})"
            );
            let sent = h.sent.get(&lba).map(Vec::as_slice).unwrap_or(&[]);
            assert!(
                sent.contains(&generation),
                "trial {trial}: LBA {lba} holds generation {generation}, never written there"
            );
            if let Some(&min) = must {
                assert!(
                    generation >= min,
                    "trial {trial}: LBA {lba} went back to generation {generation}; {min} was written before the last completed FLUSH"
                );
                flushed_ok += 1;
            }
        }
    }
    assert_eq!(
        flushed_ok,
        h.flushed.len() as u64,
        "trial {trial}: every block covered by the last FLUSH was checked"
    );
    (flushed_ok, with_data)
}

fn run_trials(label: &str, namespace: impl Fn(u64) -> String, dir: &Path) {
    let t0 = Instant::now();
    let mut master = StdRng::seed_from_u64(0x5eed_c4a5);
    let (mut total_flushed, mut total_data, mut total_writes, mut total_flushes) = (0, 0, 0, 0);
    for trial in 0..TRIALS {
        let seed: u64 = master.r#gen();
        let kill_after = Duration::from_millis(master.gen_range(50..=500));
        let (port, dport) = (free_port(), free_port());
        let cfg = dir.join(format!("crash-{trial}.toml"));
        std::fs::write(
            &cfg,
            format!(
                "[target]\nreactors = 1\n[[listener]]\nname = \"a\"\naddr = \"127.0.0.1:{port}\"\n[[subsystem]]\nnqn = \"{NQN}\"\n[[subsystem.namespace]]\nnsid = 1\ntype = \"objbacker\"\nsize = \"32MiB\"\nblock_size = 4096\nobject_size = \"1MiB\"\nauto_format = true\n{}",
                namespace(trial)
            ),
        )
        .unwrap();
        let mut srv = Server::start_on(Some(&cfg), dir, port, dport);
        let h = Arc::new(Mutex::new(History::default()));
        let generation = Arc::new(AtomicU64::new(1));
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let (h, generation, stop) = (h.clone(), generation.clone(), stop.clone());
            std::thread::spawn(move || workload(port, seed, h, generation, stop))
        };
        // Wait for the first completed FLUSH (bounded), then the seeded delay.
        let t = Instant::now();
        while h.lock().unwrap().flushes == 0 {
            assert!(
                !writer.is_finished(),
                "{label} trial {trial}: the writer stopped before any FLUSH; log:\n{}",
                srv.log_text()
            );
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "{label} trial {trial}: no FLUSH completed within 60 s"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(kill_after);
        srv.kill9(); // Child::kill is SIGKILL
        let log = srv.log_text();
        assert!(
            !log.contains("panicked"),
            "{label} trial {trial}: target panicked:\n{log}"
        );
        stop.store(true, Ordering::Relaxed);
        writer.join().expect("writer thread");
        let h = std::mem::take(&mut *h.lock().unwrap());

        let srv2 = Server::start_on(Some(&cfg), dir, port, dport);
        let (flushed, data) = verify(port, &h, trial);
        drop(srv2);
        eprintln!(
            "{label} trial {trial}: killed {kill_after:?} after the first FLUSH; {} writes, {} FLUSHes completed; {flushed} blocks of the last FLUSH verified, {data} blocks with data all whole",
            h.writes, h.flushes
        );
        total_flushed += flushed;
        total_data += data;
        total_writes += h.writes;
        total_flushes += h.flushes;
    }
    eprintln!(
        "{label}: {TRIALS}/{TRIALS} trials passed; {total_flushed} blocks written before the last completed FLUSH verified, {total_data} blocks with data checked whole, {total_writes} writes, {total_flushes} FLUSHes; {:?}",
        t0.elapsed()
    );
}

#[test]
fn kill9_during_writes_keeps_every_flushed_block_local_directory() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    run_trials(
        "local directory",
        |trial| {
            format!(
                "buckets = [{}]\n",
                (0..3)
                    .map(|k| format!("\"file://{}/t{trial}/bucket-{k}\"", root.display()))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        },
        dir.path(),
    );
}

#[test]
fn kill9_during_writes_keeps_every_flushed_block_s3() {
    let dir = tempfile::tempdir().unwrap();
    let s3_root = dir.path().join("s3");
    for k in 0..3 {
        std::fs::create_dir_all(s3_root.join(format!("strata-{k}"))).unwrap();
    }
    let s3 = S3s::start(&s3_root, true);
    let options = objstores::s3_options_toml(&s3.endpoint());
    run_trials(
        "S3 (s3s-fs)",
        |trial| {
            format!(
                "buckets = [{}]\nstore_options = {options}\n",
                (0..3)
                    .map(|k| format!("\"s3://strata-{k}/t{trial}\""))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        },
        dir.path(),
    );
}
