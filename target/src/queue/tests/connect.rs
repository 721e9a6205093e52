//! ICReq and Connect: refusals, SQSIZE bounds, host NQN rules, the connect timeout.

use super::*;

#[test]
fn commands_before_connect_and_bad_connects_are_refused() {
    let t = target_with(AnaState::Optimized);
    let mut h = Host::new(&t);
    h.icreq(false, false);
    let mut id = NvmeCmd::default();
    id.set_opcode(admin_opc::IDENTIFY);
    assert_eq!(h.cpl(id, &[]).status, Status::COMMAND_SEQUENCE_ERROR.dnr());
    let c = h.connect(0, 0xffff, "nqn.2026-11.dev.strata:nope", HOST);
    assert_eq!(c.status.sc, Status::CONNECT_INVALID_PARAM.sc);
    let c = h.connect(0, 0xffff, NQN, "nqn.2014-08.org.nvmexpress:uuid:stranger");
    assert_eq!(c.status.sc, Status::CONNECT_INVALID_HOST.sc);
    assert!(c.status.dnr);
    // The queue is still usable for a correct Connect.
    assert!(h.connect(0, 0xffff, NQN, HOST).status.is_success());
}

#[test]
fn admin_sqsize_is_bounded_and_refusals_leave_nothing_registered() {
    for subnqn in [NQN, spec::DISCOVERY_NQN] {
        let t = target_with(AnaState::Optimized);
        for sqsize in [0xffffu16, 128, 0] {
            let mut h = Host::new(&t);
            h.icreq(false, false);
            let c = h.connect_sqsize(0, 0xffff, subnqn, HOST, sqsize);
            assert_eq!(
                c.status,
                Status::CONNECT_INVALID_PARAM.dnr(),
                "{subnqn} sqsize {sqsize}"
            );
            assert_eq!(c.dw0, 44, "IATTR=0 (SQE), IPO=44 (SQSIZE)");
            drop(h);
            assert!(
                t.controllers().is_empty(),
                "{subnqn}: refused connect left a controller"
            );
        }
        let mut h = Host::new(&t);
        h.icreq(false, false);
        assert!(
            h.connect_sqsize(0, 0xffff, subnqn, HOST, 127)
                .status
                .is_success()
        );
        assert_eq!(t.controllers().len(), 1);
        // The queue's own arithmetic at the largest admin depth.
        for _ in 0..300 {
            let mut ka = NvmeCmd::default();
            ka.set_opcode(admin_opc::KEEP_ALIVE);
            // Before CC.EN this is a sequence error; what matters is one
            // completion each, with SQHD wrapping inside 128 entries.
            assert!(h.cpl(ka, &[]).sqhd <= 127);
        }
        drop(h);
        assert!(
            t.controllers().is_empty(),
            "dropping the queue releases the controller"
        );
    }
}

#[test]
fn empty_host_nqn_is_accepted_only_where_any_host_may_connect() {
    let open = target_hosts(AnaState::Optimized, true);
    let mut h = Host::new(&open);
    h.icreq(false, false);
    let c = h.connect(0, 0xffff, NQN, "");
    assert!(c.status.is_success(), "{c:?}");

    let listed = target_hosts(AnaState::Optimized, false);
    let mut h = Host::new(&listed);
    h.icreq(false, false);
    let c = h.connect(0, 0xffff, NQN, "");
    assert_eq!(c.status, Status::CONNECT_INVALID_HOST.dnr());
    assert_eq!(c.dw0, (1 << 16) | 512, "IATTR=1 (data), IPO=512 (HOSTNQN)");
    // Discovery takes anyone.
    let mut h = Host::new(&listed);
    h.icreq(false, false);
    assert!(
        h.connect(0, 0xffff, spec::DISCOVERY_NQN, "")
            .status
            .is_success()
    );
}

#[test]
fn connections_that_never_finish_ic_or_connect_time_out() {
    let t = target_with(AnaState::Optimized);
    let timeout = QueueLimits::default().connect_timeout_ms;
    let mut silent = QueuePair::new(t.clone(), 1, QueueLimits::default());
    silent.on_tick(5);
    silent.on_tick(5 + timeout / 2);
    assert!(silent.close_reason().is_none());
    silent.on_tick(6 + timeout);
    assert!(silent.must_close_now());
    let mut h = Host::new(&t);
    h.icreq(false, false);
    h.qp.on_tick(h.now + timeout + 1);
    assert!(h.qp.must_close_now(), "ICReq but no Connect");
    let short = QueueLimits {
        connect_timeout_ms: 1000,
        ..QueueLimits::default()
    };
    let (_admin, mut io) = bring_up_with(&t, false, short);
    io.qp.on_tick(io.now + 1001);
    assert!(
        io.qp.close_reason().is_none(),
        "a connected queue has no connect timeout"
    );
}
