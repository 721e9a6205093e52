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
        let mut out = Vec::new();
        let n = r2t.r2tl as usize;
        let mut off = 0;
        while off < n {
            let k = (n - off).min(ctrlr::MAXH2CDATA as usize);
            pdu::encode_h2c_data(
                &pdu::H2CData {
                    cccid: r2t.cccid,
                    ttag: r2t.ttag,
                    datao: off as u32,
                    datal: k as u32,
                    last: off + k == n,
                },
                false,
                false,
                &mut out,
            );
            out.resize(out.len() + k, 0x5a);
            off += k;
        }
        let r = io.send(&out);
        done += responses(&r).len();
        r2ts.extend(
            r.into_iter()
                .filter_map(|x| if let Rsp::R2T(r) = x { Some(r) } else { None }),
        );
    }
    assert_eq!(done, 6);
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
