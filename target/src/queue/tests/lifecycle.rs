//! Lifecycle: controller teardown, keep-alive, the registry sweep.

use super::*;

#[test]
fn admin_queue_close_destroys_controller_and_io_queue_follows() {
    let t = target_with(AnaState::Optimized);
    let (mut admin, mut io) = bring_up(&t, false);
    admin.qp.on_disconnect();
    io.qp.on_tick(io.now + 10);
    assert_eq!(
        io.qp.close_reason(),
        Some(&CloseReason::Disconnected("controller destroyed"))
    );
}

#[test]
fn keep_alive_expiry_destroys_the_controller() {
    let t = target_with(AnaState::Optimized);
    let (mut admin, mut io) = bring_up(&t, false);
    admin.qp.on_tick(admin.now + 60_000);
    assert_eq!(
        admin.qp.close_reason(),
        Some(&CloseReason::Disconnected("keep-alive timeout"))
    );
    io.qp.on_tick(io.now + 60_000);
    assert!(io.qp.close_reason().is_some());
}

#[test]
fn registry_sweep_reaps_controllers_whose_keep_alive_expired() {
    let t = target_with(AnaState::Optimized);
    let (admin, _io) = bring_up(&t, false);
    assert_eq!(t.reap_expired_controllers(admin.now + 1000), 0);
    assert_eq!(t.reap_expired_controllers(admin.now + 60_000), 1);
    assert!(t.controllers().is_empty());
    // The leaked queue then notices and closes.
    std::mem::forget(admin);
}

#[test]
fn io_on_one_queue_keeps_the_controller_alive_while_another_idles() {
    let t = target_with(AnaState::Optimized);
    let (mut admin, mut io) = bring_up(&t, false);
    let cntlid = io.qp.ctrlr().unwrap().cntlid();
    let mut idle = Host::new(&t);
    idle.icreq(false, false);
    assert!(idle.connect(2, cntlid, NQN, HOST).status.is_success());
    // KATO is 5 s; I/O every 3 s on queue 1 only, for four KATOs.
    let mut now = io.now;
    for _ in 0..7 {
        now += 3000;
        io.now = now;
        assert!(read(&mut io, 0, 8).0.status.is_success());
        admin.qp.on_tick(now);
        idle.qp.on_tick(now);
        assert_eq!(admin.qp.close_reason(), None, "at {now}");
        assert_eq!(idle.qp.close_reason(), None, "at {now}");
    }
    admin.qp.on_tick(now + 5001);
    assert_eq!(
        admin.qp.close_reason(),
        Some(&CloseReason::Disconnected("keep-alive timeout"))
    );
}
