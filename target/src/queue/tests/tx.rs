//! Output: a host that stops reading.

use super::*;

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
