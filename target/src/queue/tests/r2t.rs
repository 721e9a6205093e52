//! Solicited writes: H2CData bounds, the R2T budget and the data-phase timeout.

use super::*;

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
        let r = io.send(&fill_r2t(&io, &r2t));
        done += responses(&r).len();
        r2ts.extend(
            r.into_iter()
                .filter_map(|x| if let Rsp::R2T(r) = x { Some(r) } else { None }),
        );
    }
    assert_eq!(done, 6);
    io.qp.check_completions().unwrap();
}

/// All the data one R2T asks for.
fn fill_r2t(io: &Host, r2t: &pdu::R2T) -> Vec<u8> {
    h2c_for(io, r2t, &vec![0x5a; r2t.r2tl as usize])
}

/// A write waiting for budget gets its R2T when a completion frees it,
/// without any further input from the host. Before, only the receive path
/// issued R2Ts: with every host command either in the device or waiting
/// for an R2T, the host had nothing left to send, and a QD64 stream of
/// 1 MiB writes to an objbacker namespace (completions minutes apart from
/// the data) stopped for good.
#[test]
fn a_completion_alone_releases_the_next_r2t() {
    let t = target_with(AnaState::Optimized);
    let limits = QueueLimits {
        max_r2t_bytes: 1 << 20,
        ..QueueLimits::default()
    };
    let (_admin, mut io) = bring_up_with(&t, false, limits);
    let r = io.capsule(io_cmd(io_opc::WRITE, 0, 2048, true), &[]);
    let [Rsp::R2T(first)] = &r[..] else {
        panic!("{r:?}")
    };
    let first = *first;
    let r = io.capsule(io_cmd(io_opc::WRITE, 2048, 2048, true), &[]);
    assert!(r.is_empty(), "budget held by the first write: {r:?}");
    // The first write's data: the device completes it (RAM: at submit),
    // and the completion, polled after the input, must bring the R2T.
    let mut out = fill_r2t(&io, &first);
    let mut pending = &out[..];
    while !pending.is_empty() {
        let used = io.qp.handle_input(pending, io.now);
        pending = &pending[used..];
    }
    out.clear();
    let mut cx = Context::from_waker(Waker::noop());
    while io.qp.poll_completions(&mut cx) {}
    io.qp.drain_tx(&mut out);
    let r = io.decode(&out);
    assert!(
        r.iter()
            .any(|x| matches!(x, Rsp::Cpl(c) if c.cid == first.cccid)),
        "{r:?}"
    );
    let [Rsp::R2T(second)] = &r
        .iter()
        .filter(|x| matches!(x, Rsp::R2T(_)))
        .collect::<Vec<_>>()[..]
    else {
        panic!("the second write's R2T must follow the first's completion: {r:?}")
    };
    let second = *second;
    let done = responses(&io.send(&fill_r2t(&io, &second)));
    assert_eq!(done.len(), 1, "the second write completes");
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
