//! `strata bench seqio`: one sequential pass over a file's bytes through
//! NVMe/TCP, the block-device counterpart of `dd bs=1M if=FILE` (write) and
//! `dd of=/dev/null` with a byte compare (read).
//!
//! * `--rw write`: the file's bytes go to the namespace from `--offset`, in
//!   `--bs` commands with `--qd` in flight on one I/O queue, then (with
//!   `--flush`) one FLUSH; the time includes the FLUSH, so the figure is
//!   "written and durable", as `dd conv=fsync` is for a file system.
//! * `--rw read`: the same range is read and every byte compared with the
//!   file, so after a restart of the target this proves the data was in
//!   the store.
//!
//! The fio-style load generator (`strata bench run`) does not fit here:
//! its data is its own (random or verify stamps), a later process cannot
//! check it byte for byte, and it sends no FLUSH.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde::Serialize;
use strata_target::spec::{Status, io_opc};

use crate::initiator::{Completions, Controller};
use crate::job::parse_size;
use crate::opts::{Endpoint, TargetArgs};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum SeqRw {
    Write,
    Read,
}

#[derive(clap::Args, Debug)]
pub struct SeqIoArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    #[arg(long, value_enum)]
    pub rw: SeqRw,
    /// Source of the writes, reference of the reads; its length (a
    /// multiple of --bs) is the length of the pass.
    #[arg(long)]
    pub file: PathBuf,
    #[arg(long, default_value = "1m")]
    pub bs: String,
    /// Commands in flight.
    #[arg(long, default_value_t = 16)]
    pub qd: u32,
    /// Byte offset into the namespace.
    #[arg(long, default_value = "0")]
    pub offset: String,
    /// FLUSH after the writes, timed with them.
    #[arg(long)]
    pub flush: bool,
    /// Give up when the pass takes longer than this.
    #[arg(long, default_value = "600s")]
    pub timeout: String,
    /// Write the result as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(Clone, Debug, Serialize)]
pub struct SeqIoResult {
    pub rw: SeqRw,
    pub bytes: u64,
    pub bs: u32,
    pub qd: u32,
    /// First command submitted to last completion (and FLUSH, if any).
    pub seconds: f64,
    pub flush_seconds: f64,
    /// Decimal megabytes per second, as dd reports.
    pub mb_per_s: f64,
    /// Reads: bytes compared with the file (all of them, or the run fails).
    pub verified_bytes: u64,
}

struct Pass<'a> {
    data: &'a [u8],
    bs: usize,
    /// Block index of each command id in flight.
    slot: Vec<Option<usize>>,
    read: bool,
    mismatch: Option<(u64, String)>,
    verified: u64,
    done: Vec<u16>,
    status: Option<Status>,
    flush_cid: u16,
}

impl Completions for Pass<'_> {
    fn c2h_data(&mut self, cid: u16, offset: u32, data: &[u8]) -> Result<()> {
        ensure!(self.read, "C2HData for write command {cid}");
        let Some(Some(block)) = self.slot.get(cid as usize).copied() else {
            bail!("C2HData for command id {cid}, which is not in flight");
        };
        let start = block * self.bs + offset as usize;
        let end = start + data.len();
        ensure!(
            offset as usize + data.len() <= self.bs,
            "C2HData [{offset}, +{}) beyond the {}-byte read of command {cid}",
            data.len(),
            self.bs
        );
        let want = &self.data[start..end];
        if want != data && self.mismatch.is_none() {
            let i = want
                .iter()
                .zip(data)
                .position(|(a, b)| a != b)
                .expect("differs");
            self.mismatch = Some((
                (start + i) as u64,
                format!("read {:#04x}, file has {:#04x}", data[i], want[i]),
            ));
        }
        self.verified += data.len() as u64;
        Ok(())
    }

    fn write_data(&self, cid: u16) -> Option<&[u8]> {
        if self.read {
            return None;
        }
        let block = (*self.slot.get(cid as usize)?)?;
        Some(&self.data[block * self.bs..(block + 1) * self.bs])
    }

    fn complete(&mut self, cid: u16, status: Status) -> Result<()> {
        if cid == self.flush_cid {
            self.status = Some(status);
            return Ok(());
        }
        let Some(block) = self.slot.get_mut(cid as usize).and_then(Option::take) else {
            bail!("completion for command id {cid}, which is not in flight");
        };
        if !status.is_success() {
            bail!(
                "{} of block {block} ({} bytes) failed: {status:?}",
                if self.read { "read" } else { "write" },
                self.bs
            );
        }
        self.done.push(cid);
        Ok(())
    }
}

/// Entry point for `strata bench seqio`.
pub fn cmd_seqio(a: SeqIoArgs) -> Result<()> {
    let ep = Endpoint::resolve(&a.target, None)?;
    let data = std::fs::read(&a.file).with_context(|| format!("reading {}", a.file.display()))?;
    let bs = u32::try_from(parse_size(&a.bs)?).context("--bs too large")?;
    let offset = parse_size(&a.offset)?;
    let timeout = crate::job::parse_duration(&a.timeout)?;
    let r = run(&ep, &data, a.rw, bs, a.qd, offset, a.flush, timeout)?;
    println!(
        "seqio {:?}: {} bytes, bs {} QD {}: {:.3} s{} = {:.1} MB/s{}",
        r.rw,
        r.bytes,
        r.bs,
        r.qd,
        r.seconds,
        if a.flush {
            format!(" (FLUSH {:.3} s)", r.flush_seconds)
        } else {
            String::new()
        },
        r.mb_per_s,
        if r.rw == SeqRw::Read {
            format!(", {} bytes equal to {}", r.verified_bytes, a.file.display())
        } else {
            String::new()
        }
    );
    if let Some(p) = &a.json {
        std::fs::write(p, serde_json::to_string_pretty(&r)? + "\n")
            .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
pub fn run(
    ep: &Endpoint,
    data: &[u8],
    rw: SeqRw,
    bs: u32,
    qd: u32,
    offset: u64,
    flush: bool,
    timeout: Duration,
) -> Result<SeqIoResult> {
    ensure!(
        bs > 0 && !data.is_empty() && data.len().is_multiple_of(bs as usize),
        "the file's length ({}) must be a non-zero multiple of --bs ({bs})",
        data.len()
    );
    ensure!((1..=1024).contains(&qd), "--qd out of 1..=1024");
    let mut ctrl = Controller::connect(ep.opts.clone(), 1)?;
    let info = ctrl.info.clone();
    let lba = u64::from(info.lba_size);
    ensure!(
        offset.is_multiple_of(lba) && u64::from(bs).is_multiple_of(lba),
        "--offset and --bs must be multiples of the {lba}-byte LBA"
    );
    let ns_bytes = info.ns_blocks * lba;
    ensure!(
        offset + data.len() as u64 <= ns_bytes,
        "{} bytes at offset {offset} exceed the {ns_bytes}-byte namespace",
        data.len()
    );
    let mut q = ctrl.connect_io_queue(1, qd, bs)?;
    let blocks = data.len() / bs as usize;
    let read = rw == SeqRw::Read;
    let mut p = Pass {
        data,
        bs: bs as usize,
        slot: vec![None; qd as usize],
        read,
        mismatch: None,
        verified: 0,
        done: (0..qd as u16).rev().collect(),
        status: None,
        flush_cid: qd as u16,
    };
    let opc = if read { io_opc::READ } else { io_opc::WRITE };
    let slba0 = offset / lba;
    let per = u64::from(bs) / lba;
    let t0 = Instant::now();
    let mut next = 0usize;
    let mut completed = 0usize;
    while completed < blocks {
        while next < blocks
            && let Some(cid) = p.done.pop()
        {
            p.slot[cid as usize] = Some(next);
            let wdata = if read {
                &[][..]
            } else {
                &data[next * bs as usize..(next + 1) * bs as usize]
            };
            q.submit(cid, opc, slba0 + next as u64 * per, bs, wdata);
            next += 1;
        }
        let free_before = p.done.len();
        q.poll(&mut p, Duration::from_millis(50))?;
        completed += p.done.len() - free_before;
        ctrl.keep_alive_if_due()?;
        ensure!(
            t0.elapsed() < timeout,
            "{completed} of {blocks} commands done after {timeout:?}"
        );
    }
    let io_done = t0.elapsed();
    if flush {
        // FLUSH moves no data; the length only fills the SGL.
        q.submit(p.flush_cid, io_opc::FLUSH, 0, info.lba_size, &[]);
        while p.status.is_none() {
            q.poll(&mut p, Duration::from_millis(50))?;
            ctrl.keep_alive_if_due()?;
            ensure!(t0.elapsed() < timeout, "FLUSH not done after {timeout:?}");
        }
        let st = p.status.expect("set");
        ensure!(st.is_success(), "FLUSH failed: {st:?}");
    }
    let seconds = t0.elapsed().as_secs_f64();
    q.disconnect();
    ctrl.disconnect()?;
    if let Some((at, what)) = &p.mismatch {
        bail!(
            "data differs from the file at byte {at} (namespace byte {}): {what}",
            offset + at
        );
    }
    if read {
        ensure!(
            p.verified == data.len() as u64,
            "compared {} of {} bytes",
            p.verified,
            data.len()
        );
    }
    Ok(SeqIoResult {
        rw,
        bytes: data.len() as u64,
        bs,
        qd,
        seconds,
        flush_seconds: seconds - io_done.as_secs_f64(),
        mb_per_s: data.len() as f64 / seconds / 1e6,
        verified_bytes: p.verified,
    })
}
