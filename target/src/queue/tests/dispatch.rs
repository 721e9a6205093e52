//! Dispatch and the completion rule: every opcode on every role gets exactly one response; parked AERs.

use super::*;

/// The two commands a random-command fuzzer found unanswered, then a
/// sweep of every opcode with every PSDT value, random NSIDs and random
/// reserved fields: each gets exactly one response with the expected
/// status, and the accounting holds after every command.
#[test]
fn every_admin_and_io_opcode_gets_exactly_one_response() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let t = target_with(AnaState::Optimized);
    let (mut admin, mut io) = bring_up(&t, false);
    let mut reported = Vec::new();
    for (opc, psdt, cdw10, cdw11) in [
        (0xb8u8, 0b11u8, 0xC281_B767u32, 0xA9D5_B174u32),
        (0x89, 0b00, 0xB9F0_B9BB, 0),
    ] {
        let mut c = NvmeCmd::default();
        rng.fill(&mut c.0[..]);
        c.set_opcode(opc);
        c.0[1] = psdt << 6;
        c.set_nsid(2);
        c.set_cdw(10, cdw10);
        c.set_cdw(11, cdw11);
        let r = admin.capsule(c, &[]);
        assert_eq!(responses(&r), vec![admin.cid], "opc {opc:#x}: {r:?}");
        let Some(Rsp::Cpl(cpl)) = r.last() else {
            panic!()
        };
        let want = if psdt == 0b11 {
            Status::INVALID_FIELD.dnr()
        } else {
            // 0x89 is host-to-controller with a data pointer but no data.
            Status::INVALID_FIELD.dnr()
        };
        assert_eq!(cpl.status, want, "opc {opc:#x}");
        reported.push(cpl.status);
    }
    for queue in 0..2 {
        for opc in 0..=255u8 {
            // Commands with side effects on the association are covered by
            // their own tests: Connect/Disconnect/Property Set (Fabrics),
            // AER (parks by design), Set Features (may change KATO).
            if matches!(
                opc,
                admin_opc::FABRICS | admin_opc::ASYNC_EVENT_REQUEST | admin_opc::SET_FEATURES
            ) {
                continue;
            }
            for psdt in 0..4u8 {
                let h = if queue == 0 { &mut admin } else { &mut io };
                let mut c = NvmeCmd::default();
                rng.fill(&mut c.0[..]);
                c.set_opcode(opc);
                c.0[1] = psdt << 6; // FUSE 0: fused commands have their own status
                c.set_nsid(rng.gen_range(0..4));
                let r = h.capsule(c, &[]);
                if h.qp.close_reason().is_some() {
                    panic!("queue {queue} opc {opc:#x} psdt {psdt} closed the connection: {r:?}");
                }
                let got = responses(&r);
                // An I/O write with a host data SGL legitimately waits for data.
                if got.is_empty() && r.iter().any(|x| matches!(x, Rsp::R2T(_))) {
                    let Some(Rsp::R2T(r2t)) = r.iter().find(|x| matches!(x, Rsp::R2T(_))) else {
                        unreachable!()
                    };
                    // Finish it with zeros so the slot is answered.
                    let mut out = Vec::new();
                    let n = r2t.r2tl as usize;
                    pdu::encode_h2c_data(
                        &pdu::H2CData {
                            cccid: r2t.cccid,
                            ttag: r2t.ttag,
                            datao: 0,
                            datal: n as u32,
                            last: true,
                        },
                        false,
                        false,
                        &mut out,
                    );
                    out.resize(out.len() + n, 0);
                    let r = h.send(&out);
                    assert_eq!(responses(&r), vec![h.cid], "write after R2T: {r:?}");
                } else {
                    assert_eq!(
                        got,
                        vec![h.cid],
                        "queue {queue} opc {opc:#x} psdt {psdt}: {r:?}"
                    );
                }
                let Some(Rsp::Cpl(cpl)) = r.iter().rev().find(|x| matches!(x, Rsp::Cpl(_))) else {
                    continue;
                };
                if psdt == 0b11 && queue == 0 {
                    assert_eq!(cpl.status, Status::INVALID_FIELD.dnr(), "opc {opc:#x}");
                }
                h.qp.check_completions().unwrap();
            }
        }
    }
    assert_eq!(admin.qp.stats.commands, admin.qp.stats.responses);
    assert_eq!(io.qp.stats.commands, io.qp.stats.responses);
}

#[test]
fn random_admin_and_io_streams_keep_the_completion_invariant() {
    use rand::{Rng, SeedableRng};
    for seed in 0..8u64 {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let t = target_with(AnaState::Optimized);
        let (mut admin, mut io) = bring_up(&t, false);
        for _ in 0..2000 {
            let h = if rng.gen_bool(0.5) {
                &mut admin
            } else {
                &mut io
            };
            if h.qp.close_reason().is_some() {
                break;
            }
            let mut c = NvmeCmd::default();
            rng.fill(&mut c.0[..]);
            // Keep the association: no Fabrics (Disconnect, CC changes).
            if c.opcode() == admin_opc::FABRICS {
                c.set_opcode(0);
            }
            let data: Vec<u8> = if rng.gen_bool(0.2) {
                let n = rng.gen_range(1..2048);
                c.set_sgl(SglDescriptor {
                    addr: 0,
                    len: n,
                    id: SGL_ID_DATA_BLOCK_OFFSET,
                });
                vec![0xa5; n as usize]
            } else {
                vec![]
            };
            let _ = h.capsule(c, &data);
            h.qp.check_completions()
                .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        }
    }
}

#[test]
fn controller_reset_answers_parked_aers() {
    let t = target_with(AnaState::Optimized);
    let (mut admin, _io) = bring_up(&t, false);
    let mut aer = NvmeCmd::default();
    aer.set_opcode(admin_opc::ASYNC_EVENT_REQUEST);
    let r = admin.capsule(aer, &[]);
    assert!(responses(&r).is_empty(), "AER parks");
    let aer_cid = admin.cid;
    assert_eq!(admin.qp.commands_in_flight(), 1);
    let r = admin.capsule(
        {
            let mut c = NvmeCmd::default();
            c.set_opcode(admin_opc::FABRICS);
            c.0[4] = fctype::PROPERTY_SET;
            c.set_cdw(11, prop::CC);
            c.set_cdw(12, 0);
            c
        },
        &[],
    );
    let cpls: Vec<_> = r
        .iter()
        .filter_map(|x| if let Rsp::Cpl(c) = x { Some(*c) } else { None })
        .collect();
    assert!(
        cpls.iter()
            .any(|c| c.cid == aer_cid && c.status == Status::ABORTED_SQ_DELETION),
        "{cpls:?}"
    );
    admin.qp.check_completions().unwrap();
    assert_eq!(admin.qp.stats.commands, admin.qp.stats.responses);
}
