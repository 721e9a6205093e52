//! Shared tests every bdev implementation must pass, and helpers to drive a
//! channel the way the queue layer does: submit a batch, flush once, poll.

use std::future::poll_fn;
use std::sync::Arc;
use std::time::Duration;

use rand::{Rng, RngCore, SeedableRng, rngs::StdRng};

use super::{Bdev, BdevChannel, BdevCompletion, BdevIo, IoBuf, IoError, IoOp};

/// Generous: a wedged completion path must fail the test, not hang it.
const TIMEOUT: Duration = Duration::from_secs(60);

/// Submits `ios` as one batch and waits for all of them; results by tag.
pub async fn run(ch: &mut dyn BdevChannel, ios: Vec<BdevIo>) -> Vec<BdevCompletion> {
    let n = ios.len();
    for io in ios {
        ch.submit(io);
    }
    ch.flush_submissions();
    let mut out = Vec::with_capacity(n);
    tokio::time::timeout(TIMEOUT, async {
        while out.len() < n {
            poll_fn(|cx| ch.poll_completions(cx, &mut out)).await;
        }
    })
    .await
    .expect("bdev completions timed out");
    assert_eq!(out.len(), n, "more completions than requests");
    out.sort_by_key(|c| c.tag);
    out
}

pub async fn one(ch: &mut dyn BdevChannel, io: BdevIo) -> BdevCompletion {
    run(ch, vec![io]).await.pop().unwrap()
}

pub fn write(tag: u32, offset_blocks: u64, data: &[u8], block_size: u32) -> BdevIo {
    write_fua(tag, offset_blocks, data, block_size, false)
}

pub fn write_fua(tag: u32, offset_blocks: u64, data: &[u8], block_size: u32, fua: bool) -> BdevIo {
    BdevIo {
        tag,
        op: IoOp::Write { fua },
        offset_blocks,
        num_blocks: data.len() as u64 / u64::from(block_size),
        buf: Some(IoBuf::from_slice(data)),
    }
}

pub fn read(tag: u32, offset_blocks: u64, num_blocks: u64, block_size: u32) -> BdevIo {
    let mut buf = IoBuf::new((num_blocks * u64::from(block_size)) as usize);
    buf.set_len((num_blocks * u64::from(block_size)) as usize);
    BdevIo {
        tag,
        op: IoOp::Read,
        offset_blocks,
        num_blocks,
        buf: Some(buf),
    }
}

pub fn range_op(tag: u32, op: IoOp, offset_blocks: u64, num_blocks: u64) -> BdevIo {
    BdevIo {
        tag,
        op,
        offset_blocks,
        num_blocks,
        buf: None,
    }
}

pub async fn read_blocks(
    ch: &mut dyn BdevChannel,
    offset_blocks: u64,
    num_blocks: u64,
    block_size: u32,
) -> IoBuf {
    let c = one(ch, read(0, offset_blocks, num_blocks, block_size)).await;
    assert_eq!(c.result, Ok(()), "read {offset_blocks}+{num_blocks}");
    c.buf.expect("read returns its buffer")
}

/// Compares the whole device against `shadow`, 1 MiB at a time.
pub async fn verify_all(ch: &mut dyn BdevChannel, shadow: &[u8], block_size: u32) {
    let bs = block_size as usize;
    let chunk = (1 << 20).max(bs);
    for (i, want) in shadow.chunks(chunk).enumerate() {
        let off = (i * chunk / bs) as u64;
        let got = read_blocks(ch, off, (want.len() / bs) as u64, block_size).await;
        if let Some(pos) = got.iter().zip(want).position(|(a, b)| a != b) {
            panic!(
                "mismatch at byte {} (got {:#x}, want {:#x})",
                i * chunk + pos,
                got[pos],
                want[pos]
            );
        }
    }
}

/// Applies a write to the device and to the shadow copy.
async fn write_both(
    ch: &mut dyn BdevChannel,
    shadow: &mut [u8],
    rng: &mut StdRng,
    byte_off: usize,
    len: usize,
    block_size: u32,
) {
    let mut data = vec![0u8; len];
    rng.fill_bytes(&mut data);
    let c = one(
        ch,
        write(
            1,
            (byte_off / block_size as usize) as u64,
            &data,
            block_size,
        ),
    )
    .await;
    assert_eq!(c.result, Ok(()), "write at {byte_off} len {len}");
    assert_eq!(
        c.buf.map(|b| b.len()),
        Some(len),
        "write returns its buffer"
    );
    shadow[byte_off..byte_off + len].copy_from_slice(&data);
}

/// Behaviour every bdev must have. Needs a device of at least 4 MiB.
pub async fn conformance(bdev: Arc<dyn Bdev>) {
    let info = bdev.info().clone();
    let bs = info.block_size;
    let bsz = bs as usize;
    let nb = info.num_blocks;
    let size = (nb * u64::from(bs)) as usize;
    assert!(size >= 4 << 20, "conformance needs >= 4 MiB");
    let mut ch = Arc::clone(&bdev).open_channel().unwrap();
    let ch = &mut *ch;
    let mut shadow = vec![0u8; size];
    let mut rng = StdRng::seed_from_u64(u64::from(bs) ^ nb);

    // Never-written blocks read as zeros, at both ends.
    let head = read_blocks(ch, 0, 8, bs).await;
    assert!(head.iter().all(|&x| x == 0));
    let tail = read_blocks(ch, nb - 1, 1, bs).await;
    assert!(tail.iter().all(|&x| x == 0));

    // Writes of several sizes, some overlapping, at the start, middle and end.
    let mib = 1 << 20;
    let cases = [
        (0, bsz),
        (bsz, 4096),
        (7 * bsz, 3 * bsz),
        (size / 2 + 3 * bsz, mib),
        (size - mib, mib),
        (size - bsz, bsz),
    ];
    for (off, len) in cases {
        write_both(ch, &mut shadow, &mut rng, off, len, bs).await;
        let got = read_blocks(ch, (off / bsz) as u64, (len / bsz) as u64, bs).await;
        assert!(
            *got == shadow[off..off + len],
            "readback at {off} len {len}"
        );
    }

    // FUA write and flush succeed and the data is there.
    let mut data = vec![0u8; 2 * 4096];
    rng.fill_bytes(&mut data);
    let fua_off = 64 * 4096;
    let c = one(ch, write_fua(2, (fua_off / bsz) as u64, &data, bs, true)).await;
    assert_eq!(c.result, Ok(()));
    shadow[fua_off..fua_off + data.len()].copy_from_slice(&data);
    let c = one(ch, range_op(3, IoOp::Flush, 0, 0)).await;
    assert_eq!(c.result, Ok(()));
    assert!(c.buf.is_none());

    // WriteZeroes and Deallocate over ranges that start and end mid-page
    // (with 512 B blocks) and cover whole pages in between; neighbours stay.
    for (i, op) in [IoOp::WriteZeroes, IoOp::Deallocate]
        .into_iter()
        .enumerate()
    {
        let base = (128 + 64 * i) * 4096;
        write_both(ch, &mut shadow, &mut rng, base, 64 * 1024, bs).await;
        let start = base + bsz;
        let len = 2 * 4096 + bsz;
        let c = one(
            ch,
            range_op(4, op, (start / bsz) as u64, (len / bsz) as u64),
        )
        .await;
        assert_eq!(c.result, Ok(()), "{op:?}");
        shadow[start..start + len].fill(0);
        let got = read_blocks(ch, (base / bsz) as u64, (64 * 1024 / bsz) as u64, bs).await;
        assert!(*got == shadow[base..base + 64 * 1024], "{op:?} readback");
        assert!(
            got[start - base..start - base + len]
                .iter()
                .all(|&x| x == 0)
        );
        assert!(
            got[..start - base].iter().any(|&x| x != 0),
            "{op:?} head kept"
        );
    }
    // A large deallocate of written data, reaching the last block.
    let c = one(
        ch,
        range_op(
            5,
            IoOp::Deallocate,
            ((size - mib) / bsz) as u64,
            (mib / bsz) as u64,
        ),
    )
    .await;
    assert_eq!(c.result, Ok(()));
    shadow[size - mib..].fill(0);

    // Zero-length requests are harmless.
    let mut empty = IoBuf::new(0);
    empty.set_len(0);
    let c = one(
        ch,
        BdevIo {
            tag: 6,
            op: IoOp::Read,
            offset_blocks: 0,
            num_blocks: 0,
            buf: Some(empty),
        },
    )
    .await;
    assert_eq!(c.result, Ok(()));
    let c = one(ch, range_op(6, IoOp::WriteZeroes, 1, 0)).await;
    assert_eq!(c.result, Ok(()));

    // Out of range, including offset + length overflowing u64.
    let data = vec![0xaau8; 2 * bsz];
    let bad = vec![
        read(10, nb, 1, bs),
        write(11, nb - 1, &data, bs),
        range_op(12, IoOp::WriteZeroes, u64::MAX, 2),
        range_op(13, IoOp::Deallocate, 0, nb + 1),
        read(14, u64::MAX, 1, bs),
    ];
    for c in run(ch, bad).await {
        assert_eq!(c.result, Err(IoError::OutOfRange), "tag {}", c.tag);
    }
    // Missing or wrongly sized buffers; the buffer still comes back.
    let mut wrong = read(20, 0, 1, bs);
    wrong.buf = Some(IoBuf::new(2 * bsz));
    let mut short = write(21, 0, &data, bs);
    short.num_blocks = 1;
    let mut missing = read(22, 0, 1, bs);
    missing.buf = None;
    let mut missing_w = write(23, 0, &data, bs);
    missing_w.buf = None;
    let res = run(ch, vec![wrong, short, missing, missing_w]).await;
    for c in &res {
        assert_eq!(c.result, Err(IoError::Internal), "tag {}", c.tag);
    }
    assert!(res[0].buf.is_some() && res[1].buf.is_some());

    assert_eq!(ch.in_flight(), 0);
    verify_all(ch, &shadow, bs).await;
    assert_eq!(ch.in_flight(), 0);
}

/// `n` writes to distinct blocks in one batch, then `n` reads in one batch,
/// with flushes mixed in: deeper than the device queue, so requests wait.
pub async fn many_in_flight(bdev: Arc<dyn Bdev>, n: u32) {
    let bs = bdev.info().block_size;
    assert!(bdev.info().num_blocks >= u64::from(n) * 2);
    let mut ch = Arc::clone(&bdev).open_channel().unwrap();
    let ch = &mut *ch;
    let mut rng = StdRng::seed_from_u64(42);
    let mut datas = Vec::new();
    let mut ios = Vec::new();
    for i in 0..n {
        let mut data = vec![0u8; bs as usize];
        rng.fill_bytes(&mut data);
        let fua = rng.gen_bool(0.1);
        ios.push(write_fua(i, u64::from(i) * 2, &data, bs, fua));
        datas.push(data);
    }
    ios.push(range_op(n, IoOp::Flush, 0, 0));
    for c in run(ch, ios).await {
        assert_eq!(c.result, Ok(()), "write {}", c.tag);
    }
    assert_eq!(ch.in_flight(), 0);
    let ios = (0..n).map(|i| read(i, u64::from(i) * 2, 1, bs)).collect();
    for (c, want) in run(ch, ios).await.into_iter().zip(&datas) {
        assert_eq!(c.result, Ok(()), "read {}", c.tag);
        assert!(**c.buf.as_ref().unwrap() == want[..], "data of {}", c.tag);
    }
    assert_eq!(ch.in_flight(), 0);
}

/// A temporary directory on /dev/shm (tmpfs). A missing /dev/shm fails the
/// test: CI machines have it, and a test that passed as "skipped" would
/// hide that the tmpfs paths (EOPNOTSUPP zero-range fallback, buffered
/// fallback) never ran.
#[allow(dead_code)] // For the file bdev's tmpfs tests (uring.rs).
pub fn shm_tempdir() -> tempfile::TempDir {
    tempfile::tempdir_in("/dev/shm").unwrap_or_else(|e| {
        panic!("/dev/shm is required for this test (tmpfs paths of the file bdev): {e}")
    })
}

/// Checks that a file bdev on a filesystem named `fs` (as `stat -f` names
/// it: ext4, xfs, btrfs, tmpfs, ...) used O_DIRECT where the filesystem
/// supports it. Elsewhere O_DIRECT cannot be asserted: say so loudly, so
/// the run's log shows what it did not test.
#[allow(dead_code)] // For the file bdev's tests (uring.rs).
pub fn check_direct(dir: &std::path::Path, fs: &str, direct: bool) {
    eprintln!("{}: fs {fs}, O_DIRECT {direct}", dir.display());
    if matches!(fs, "ext4" | "xfs" | "btrfs") {
        assert!(direct, "O_DIRECT expected on {fs} ({})", dir.display());
    } else if !direct {
        eprintln!(
            "NOT TESTED: O_DIRECT on {} ({fs} refused it; buffered fallback ran instead)",
            dir.display()
        );
    }
}
