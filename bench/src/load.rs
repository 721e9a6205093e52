//! The load generator: one thread per job, each driving its own I/O queue.
//!
//! Honest-measurement rules this file follows:
//! * latency runs from submission (the batch's send) to the arrival of the
//!   completion, read with `Instant` once per send batch and once per
//!   receive batch, so the clock itself costs little;
//! * with a rate limit, latency runs from the *scheduled* submission time,
//!   so a stalled target cannot hide its stall by delaying our sends
//!   (coordinated omission);
//! * only completions inside the measurement window (after ramp, before the
//!   runtime ends) count, and IOPS divides by that same window;
//! * the hot loop allocates nothing: slots, buffers and histograms exist
//!   before the first command.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, bail, ensure};
use hdrhistogram::Histogram;
use strata_target::spec::{Status, io_opc};

use crate::initiator::{Completions, ConnectOpts, Controller, ControllerInfo, IoQueue};
use crate::job::{JobSpec, Rw};
use crate::stats::{new_hist, process_cpu_ns, thread_cpu_ns};
use crate::verify::{self, VerifyError};

/// Most verify errors kept with full detail; all are counted.
const MAX_VERIFY_ERRORS: usize = 64;

/// Verify bookkeeping that outlives one run, so a later run (e.g. a read
/// pass after the data was tampered with) checks against what an earlier
/// run wrote.
pub struct VerifyState {
    pub seed: u32,
    layout: Mutex<Option<(u64, u64, u32, u32)>>,
    jobs: Mutex<Vec<Option<JobVerify>>>,
}

impl VerifyState {
    pub fn new(seed: u32) -> Arc<Self> {
        Arc::new(Self {
            seed,
            layout: Mutex::new(None),
            jobs: Mutex::new(Vec::new()),
        })
    }
}

struct JobVerify {
    /// Generation of the last acknowledged write per block; 0 = unwritten.
    gens: Vec<u32>,
    next_gen: u32,
}

/// Per-job results, before serialisation.
pub struct JobResult {
    pub job: u32,
    pub qid: u16,
    pub read_hist: Histogram<u64>,
    pub write_hist: Histogram<u64>,
    pub reads: u64,
    pub writes: u64,
    pub read_bytes: u64,
    pub write_bytes: u64,
    pub window: Duration,
    pub cpu_ns: u64,
    /// (I/Os, bytes) completed per interval of the window.
    pub timeline: Vec<(u64, u64)>,
    pub verify_errors: Vec<VerifyError>,
    pub verify_error_count: u64,
    pub verified_blocks: u64,
}

/// Everything one run produced.
pub struct RunOutput {
    pub info: ControllerInfo,
    pub spec: JobSpec,
    pub jobs: Vec<JobResult>,
    pub process_cpu_ns: u64,
    pub wall: Duration,
}

struct Slot {
    busy: bool,
    opcode: u8,
    block: u64,
    slba: u64,
    generation: u32,
    start: Instant,
    buf: Vec<u8>,
}

/// xorshift64*: a few instructions per number and no allocation.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

struct Engine<'a> {
    slots: Vec<Slot>,
    free: Vec<u16>,
    inflight: u32,
    bs: u32,
    sector: usize,
    seed: u32,
    verify: Option<&'a mut JobVerify>,
    /// Blocks with a command in flight, so verify never races itself.
    block_busy: Vec<bool>,
    measuring: bool,
    t0: Instant,
    t_end: Option<Instant>,
    interval: Duration,
    batch_now: Option<Instant>,
    last_completion: Instant,
    res: JobResult,
    completed_since_publish: u64,
}

impl Engine<'_> {
    fn now(&mut self) -> Instant {
        *self.batch_now.get_or_insert_with(Instant::now)
    }

    fn slot(&mut self, cid: u16) -> Result<&mut Slot> {
        match self.slots.get_mut(cid as usize) {
            Some(s) if s.busy => Ok(s),
            _ => Err(anyhow!(
                "target completed command id {cid}, which is not in flight"
            )),
        }
    }
}

impl Completions for Engine<'_> {
    fn c2h_data(&mut self, cid: u16, offset: u32, data: &[u8]) -> Result<()> {
        let verifying = self.verify.is_some();
        let s = self.slot(cid)?;
        ensure!(
            s.opcode == io_opc::READ,
            "C2HData for command id {cid}, a write"
        );
        let end = offset as usize + data.len();
        ensure!(
            end <= s.buf.len(),
            "C2HData [{offset}, {end}) beyond the {} byte read of command id {cid}",
            s.buf.len()
        );
        // Without verify the payload is left where recv put it: copying it
        // would be work a real application may not do.
        if verifying {
            s.buf[offset as usize..end].copy_from_slice(data);
        }
        Ok(())
    }

    fn write_data(&self, cid: u16) -> Option<&[u8]> {
        self.slots
            .get(cid as usize)
            .filter(|s| s.busy && s.opcode == io_opc::WRITE)
            .map(|s| &s.buf[..])
    }

    fn complete(&mut self, cid: u16, status: Status) -> Result<()> {
        let now = self.now();
        let (sector, seed, bs) = (self.sector, self.seed, self.bs);
        let s = self.slot(cid)?;
        s.busy = false;
        let (opcode, block, slba, generation, start) =
            (s.opcode, s.block, s.slba, s.generation, s.start);
        if !status.is_success() {
            bail!(
                "{} of {bs} bytes at LBA {slba} failed: {status:?}",
                if opcode == io_opc::READ {
                    "read"
                } else {
                    "write"
                }
            );
        }
        if let Some(v) = self.verify.as_deref_mut() {
            if opcode == io_opc::WRITE {
                v.gens[block as usize] = generation;
            } else {
                let expected = match v.gens[block as usize] {
                    0 => None,
                    g => Some(g),
                };
                self.res.verified_blocks += 1;
                let buf = &self.slots[cid as usize].buf;
                if let Some(e) = verify::check(buf, sector, slba, expected, seed) {
                    self.res.verify_error_count += 1;
                    if self.res.verify_errors.len() < MAX_VERIFY_ERRORS {
                        self.res.verify_errors.push(e);
                    }
                }
            }
        }
        self.block_busy[block as usize] = false;
        self.free.push(cid);
        self.inflight -= 1;
        self.completed_since_publish += 1;
        self.last_completion = now;
        if self.measuring && now >= self.t0 && self.t_end.is_none_or(|e| now <= e) {
            let lat = now.saturating_duration_since(start).as_nanos() as u64;
            let bucket = ((now - self.t0).as_nanos() / self.interval.as_nanos()) as usize;
            if self.res.timeline.len() <= bucket {
                // At most once per interval, not per I/O.
                self.res.timeline.resize(bucket + 1, (0, 0));
            }
            self.res.timeline[bucket].0 += 1;
            self.res.timeline[bucket].1 += u64::from(bs);
            if opcode == io_opc::READ {
                let _ = self.res.read_hist.record(lat.max(1));
                self.res.reads += 1;
                self.res.read_bytes += u64::from(bs);
            } else {
                let _ = self.res.write_hist.record(lat.max(1));
                self.res.writes += 1;
                self.res.write_bytes += u64::from(bs);
            }
        }
        Ok(())
    }
}

/// Progress counters the main thread reads while jobs run.
#[derive(Default)]
pub struct Progress {
    pub ios: AtomicU64,
    pub stop: AtomicBool,
    pub finished: AtomicU64,
}

struct Region {
    /// First LBA of this job's region.
    lba: u64,
    blocks: u64,
}

#[allow(clippy::too_many_arguments)]
fn run_job(
    q: &mut IoQueue,
    spec: &JobSpec,
    job: u32,
    region: Region,
    lba_size: u32,
    verify: Option<&mut JobVerify>,
    seed: u32,
    progress: &Progress,
) -> Result<JobResult> {
    let bs = spec.bs;
    let qd = spec.qd as usize;
    let lbas_per_block = u64::from(bs / lba_size);
    let mut rng = Rng(spec.seed ^ (u64::from(job) + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let read_pct = spec.rw.read_pct(spec.rwmixread) as u64;
    let random = spec.rw.is_random();
    let start = Instant::now();
    let t0 = start + Duration::from_millis(spec.ramp_ms);
    let t_end = spec.runtime().map(|r| t0 + r);
    let window_cap = spec.runtime_ms.unwrap_or(10_000) / spec.interval_ms + 2;
    let mut fill = Rng(0x1234_5678 ^ u64::from(job));
    let mut e = Engine {
        slots: (0..qd)
            .map(|_| Slot {
                busy: false,
                opcode: 0,
                block: 0,
                slba: 0,
                generation: 0,
                start,
                // Incompressible bytes, so a compressing target is not
                // flattered by zeros.
                buf: (0..bs).map(|_| fill.next() as u8).collect(),
            })
            .collect(),
        free: (0..qd as u16).rev().collect(),
        inflight: 0,
        bs,
        sector: lba_size as usize,
        seed,
        verify,
        block_busy: vec![false; region.blocks as usize],
        measuring: false,
        t0,
        t_end,
        interval: Duration::from_millis(spec.interval_ms),
        batch_now: None,
        last_completion: start,
        res: JobResult {
            job,
            qid: q.qid,
            read_hist: new_hist(),
            write_hist: new_hist(),
            reads: 0,
            writes: 0,
            read_bytes: 0,
            write_bytes: 0,
            window: Duration::ZERO,
            cpu_ns: 0,
            timeline: Vec::with_capacity(window_cap as usize),
            verify_errors: Vec::new(),
            verify_error_count: 0,
            verified_blocks: 0,
        },
        completed_since_publish: 0,
    };
    let total = spec.total_bytes.or(if spec.runtime_ms.is_none() {
        Some(region.blocks * u64::from(bs))
    } else {
        None
    });
    let rate_period = spec
        .rate_iops
        .map(|r| Duration::from_secs_f64(f64::from(spec.jobs) / r as f64));
    let mut next_at = start;
    let mut cursor = 0u64;
    let mut submitted_bytes = 0u64;
    let mut cpu0 = thread_cpu_ns();
    let mut cpu_stop: Option<u64> = None;
    let mut stop_at: Option<Instant> = None;
    let slice = Duration::from_millis(20);

    loop {
        let now = Instant::now();
        if !e.measuring && now >= t0 {
            e.measuring = true;
            cpu0 = thread_cpu_ns();
        }
        let mut submitting = !progress.stop.load(Ordering::Relaxed)
            && t_end.is_none_or(|te| now < te)
            && total.is_none_or(|t| submitted_bytes < t);
        if !submitting && cpu_stop.is_none() {
            cpu_stop = Some(thread_cpu_ns());
            stop_at = Some(now);
        }
        let mut wait = slice;
        while submitting {
            if rate_period.is_some() && now < next_at {
                wait = wait.min(next_at - now);
                break;
            }
            let Some(cid) = e.free.pop() else { break };
            let is_read = read_pct == 100 || (read_pct > 0 && rng.next() % 100 < read_pct);
            let mut block = if random {
                rng.next() % region.blocks
            } else {
                let b = cursor % region.blocks;
                cursor += 1;
                b
            };
            if e.block_busy[block as usize] {
                // Only possible with random I/O when the region is small
                // relative to QD; probe linearly for a free block.
                let mut tries = 0;
                while e.block_busy[block as usize] && tries < region.blocks {
                    block = (block + 1) % region.blocks;
                    tries += 1;
                }
                if e.block_busy[block as usize] {
                    e.free.push(cid);
                    break;
                }
            }
            let slba = region.lba + block * lbas_per_block;
            let slot = &mut e.slots[cid as usize];
            slot.busy = true;
            slot.block = block;
            slot.slba = slba;
            slot.opcode = if is_read { io_opc::READ } else { io_opc::WRITE };
            // Scheduled time under a rate limit; `now` otherwise.
            slot.start = if rate_period.is_some() { next_at } else { now };
            if let Some(p) = rate_period {
                next_at += p;
            }
            if !is_read && let Some(v) = e.verify.as_deref_mut() {
                v.next_gen += 1;
                slot.generation = v.next_gen;
                verify::stamp(&mut slot.buf, lba_size as usize, slba, v.next_gen, seed);
            }
            e.block_busy[block as usize] = true;
            e.inflight += 1;
            q.submit(cid, slot.opcode, slba, bs, &slot.buf);
            if now >= t0 {
                submitted_bytes += u64::from(bs);
            }
            submitting = total.is_none_or(|t| submitted_bytes < t);
        }
        if e.inflight == 0 && !q.tx_pending() {
            if !submitting && cpu_stop.is_some() {
                break;
            }
            if rate_period.is_some() || now < t0 {
                std::thread::sleep(wait.min(Duration::from_millis(1)));
            }
            continue;
        }
        e.batch_now = None;
        q.poll(&mut e, wait)?;
        if e.completed_since_publish > 0 {
            progress
                .ios
                .fetch_add(e.completed_since_publish, Ordering::Relaxed);
            e.completed_since_publish = 0;
        }
    }
    let cpu_end = cpu_stop.unwrap_or_else(thread_cpu_ns);
    e.res.cpu_ns = cpu_end.saturating_sub(cpu0);
    e.res.window = match (t_end, stop_at) {
        (Some(te), _) => te - t0,
        (None, _) => e.last_completion.saturating_duration_since(t0),
    };

    // Verify pass: read back every block this job has a generation for.
    if let Some(v) = e.verify.as_deref() {
        let written: Vec<u64> = (0..region.blocks)
            .filter(|&b| v.gens[b as usize] != 0)
            .collect();
        if spec.rw.read_pct(spec.rwmixread) < 100 {
            e.measuring = false;
            let mut it = written.into_iter();
            loop {
                while let Some(&cid) = e.free.last() {
                    let Some(block) = it.next() else { break };
                    e.free.pop();
                    let slba = region.lba + block * lbas_per_block;
                    let slot = &mut e.slots[cid as usize];
                    slot.busy = true;
                    slot.block = block;
                    slot.slba = slba;
                    slot.opcode = io_opc::READ;
                    slot.start = Instant::now();
                    e.block_busy[block as usize] = true;
                    e.inflight += 1;
                    q.submit(cid, io_opc::READ, slba, bs, &slot.buf);
                }
                if e.inflight == 0 {
                    break;
                }
                e.batch_now = None;
                q.poll(&mut e, slice)?;
            }
        }
    }
    Ok(e.res)
}

/// Connects, runs `spec` against the target and disconnects.
///
/// `verify` carries expected generations across runs; pass None to use a
/// fresh state (seeded from the job seed) when `spec.verify` is set.
pub fn run(
    opts: &ConnectOpts,
    spec: &JobSpec,
    verify: Option<Arc<VerifyState>>,
    progress: Arc<Progress>,
    on_tick: &mut dyn FnMut(&Progress, Duration),
) -> Result<RunOutput> {
    spec.validate()?;
    let mut ctrl = Controller::connect(opts.clone(), spec.jobs as u16)?;
    let info = ctrl.info.clone();
    ensure!(
        u32::from(info.io_queues) >= spec.jobs,
        "target granted {} I/O queues, {} jobs need one each",
        info.io_queues,
        spec.jobs
    );
    ensure!(
        spec.bs.is_multiple_of(info.lba_size),
        "block size {} is not a multiple of the namespace's {} byte LBA",
        spec.bs,
        info.lba_size
    );
    ensure!(
        spec.qd < info.max_queue_entries,
        "queue depth {} needs {} queue entries; the target allows {} (CAP.MQES+1)",
        spec.qd,
        spec.qd + 1,
        info.max_queue_entries
    );
    let ns_bytes = info.ns_blocks * u64::from(info.lba_size);
    ensure!(
        spec.offset < ns_bytes,
        "offset {} beyond the {ns_bytes} byte namespace",
        spec.offset
    );
    let size = spec.size.unwrap_or(ns_bytes - spec.offset);
    ensure!(
        spec.offset + size <= ns_bytes,
        "region [{}, +{size}) exceeds the {ns_bytes} byte namespace",
        spec.offset
    );
    ensure!(
        spec.offset.is_multiple_of(u64::from(info.lba_size)),
        "offset not LBA aligned"
    );
    let per_job_blocks = size / u64::from(spec.bs) / u64::from(spec.jobs);
    ensure!(
        per_job_blocks >= 1,
        "region of {size} bytes too small for {} jobs of {} byte blocks",
        spec.jobs,
        spec.bs
    );

    let vstate = if spec.verify {
        let vs =
            verify.unwrap_or_else(|| VerifyState::new(spec.seed as u32 ^ (spec.seed >> 32) as u32));
        let layout = (spec.offset, per_job_blocks, spec.bs, spec.jobs);
        let mut l = vs
            .layout
            .lock()
            .map_err(|_| anyhow!("verify state poisoned"))?;
        match *l {
            None => *l = Some(layout),
            Some(old) => ensure!(
                old == layout,
                "verify state was made for a different layout (offset, blocks per job, bs, jobs) {old:?}, now {layout:?}"
            ),
        }
        drop(l);
        let mut jobs = vs
            .jobs
            .lock()
            .map_err(|_| anyhow!("verify state poisoned"))?;
        jobs.resize_with(spec.jobs as usize, || None);
        for j in jobs.iter_mut() {
            if j.is_none() {
                *j = Some(JobVerify {
                    gens: vec![0; per_job_blocks as usize],
                    next_gen: 0,
                });
            }
        }
        drop(jobs);
        Some(vs)
    } else {
        None
    };

    let barrier = Barrier::new(spec.jobs as usize + 1);
    let wall0 = Instant::now();
    let pcpu0 = process_cpu_ns();
    let results: Vec<Result<JobResult>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..spec.jobs)
            .map(|j| {
                let (barrier, progress, vstate, info) = (&barrier, &progress, &vstate, &info);
                std::thread::Builder::new()
                    .name(format!("bench-job{j}"))
                    .spawn_scoped(s, move || {
                        let q = IoQueue::connect(opts, info, j as u16 + 1, spec.qd, spec.bs);
                        barrier.wait();
                        let mut q = q?;
                        if progress.stop.load(Ordering::Relaxed) {
                            q.disconnect();
                            bail!("aborted");
                        }
                        let mut jv = vstate.as_ref().map(|vs| {
                            vs.jobs.lock().expect("poisoned")[j as usize]
                                .take()
                                .expect("set")
                        });
                        let region = Region {
                            lba: (spec.offset + u64::from(j) * per_job_blocks * u64::from(spec.bs))
                                / u64::from(info.lba_size),
                            blocks: per_job_blocks,
                        };
                        let seed = vstate.as_ref().map_or(0, |v| v.seed);
                        let r = run_job(
                            &mut q,
                            spec,
                            j,
                            region,
                            info.lba_size,
                            jv.as_mut(),
                            seed,
                            progress,
                        );
                        if let (Some(vs), Some(jv)) = (vstate, jv) {
                            vs.jobs.lock().expect("poisoned")[j as usize] = Some(jv);
                        }
                        if r.is_err() {
                            progress.stop.store(true, Ordering::Relaxed);
                        }
                        progress.finished.fetch_add(1, Ordering::Relaxed);
                        q.disconnect();
                        r
                    })
                    .expect("spawning job thread")
            })
            .collect();
        barrier.wait();
        let t = Instant::now();
        let mut ka_err = None;
        while progress.finished.load(Ordering::Relaxed) < u64::from(spec.jobs) {
            std::thread::sleep(Duration::from_millis(50));
            on_tick(&progress, t.elapsed());
            if let Err(e) = ctrl.keep_alive_if_due() {
                progress.stop.store(true, Ordering::Relaxed);
                ka_err = Some(e);
                break;
            }
        }
        let mut r: Vec<Result<JobResult>> = handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow!("job thread panicked")))
            })
            .collect();
        if let Some(e) = ka_err {
            r.push(Err(e.context("keep alive")));
        }
        r
    });
    let wall = wall0.elapsed();
    let process_cpu = process_cpu_ns().saturating_sub(pcpu0);
    let mut jobs = Vec::new();
    let mut first_err = None;
    for r in results {
        match r {
            Ok(j) => jobs.push(j),
            Err(e) if first_err.is_none() => first_err = Some(e),
            Err(_) => {}
        }
    }
    let dis = ctrl.disconnect();
    if let Some(e) = first_err {
        return Err(e);
    }
    dis?;
    Ok(RunOutput {
        info,
        spec: spec.clone(),
        jobs,
        process_cpu_ns: process_cpu,
        wall,
    })
}

/// Accepts `Rw` from a string for callers that build specs by hand.
pub fn rw_from_str(s: &str) -> Result<Rw> {
    <Rw as clap::ValueEnum>::from_str(s, true).map_err(|e| anyhow!("bad rw {s:?}: {e}"))
}
