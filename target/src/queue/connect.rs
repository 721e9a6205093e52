//! Connection establishment: ICReq/ICResp, then Fabrics Connect, which
//! makes the connection an admin queue or an I/O queue of a controller.
//!
//! Exists apart from dispatch because it is the only place the queue's role
//! (`Role2`) and its negotiated parameters (digests, SQ size, SQ flow
//! control) change; after Connect they are fixed for the connection.
//!
//! Invariants:
//! * ICReq is accepted once, before anything else; Connect is the only
//!   command before a role is set.
//! * Slots are sized from the SQSIZE the controller accepted, bounded by
//!   `QueueLimits::max_slots`.

use super::*;
use std::sync::atomic::Ordering::Relaxed;

use crate::ctrlr::Connected;

impl QueuePair {
    pub(super) fn on_icreq(&mut self, req: pdu::ICReq) {
        if !matches!(self.role, Role2::AwaitIcReq) {
            return self.terminate(FatalErrorStatus::PduSequenceError, 0);
        }
        if req.pfv != 0 {
            return self.terminate(FatalErrorStatus::UnsupportedParameter, 8);
        }
        // We place C2H data right after the header (PDO = HLEN + HDGST), which
        // satisfies only HPDA 0; every host we know sends 0.
        if req.hpda != 0 {
            return self.terminate(FatalErrorStatus::UnsupportedParameter, 10);
        }
        self.hdgst = req.hdgst;
        self.ddgst = req.ddgst;
        let resp = pdu::ICResp {
            pfv: 0,
            cpda: 0,
            hdgst: req.hdgst,
            ddgst: req.ddgst,
            maxh2cdata: self.limits.maxh2cdata,
        };
        let mut b = [0u8; 128];
        let mut v = Vec::with_capacity(128);
        pdu::encode_icresp(&resp, &mut v);
        b[..v.len()].copy_from_slice(&v);
        self.push_inline(&b[..v.len()]);
        self.dcfg = DecodeConfig {
            role: Role::Target,
            hdgst: req.hdgst,
            ddgst: req.ddgst,
            max_data: self.limits.in_capsule_data.max(self.limits.maxh2cdata),
            connected: true,
        };
        self.role = Role2::AwaitConnect;
    }

    pub(super) fn on_connect(&mut self, cmd: &NvmeCmd, data: &[u8]) {
        match ctrlr::connect_explained(&self.target, self.port_id, cmd, data, self.now_ms) {
            Ok((connected, mut cpl)) => {
                self.sqsize = (cmd.cdw11() & 0xffff) as u16;
                self.sqflow_disabled = (cmd.cdw11() >> 16) & 0x4 != 0;
                let entries = u32::from(self.sqsize.max(1)) + 1;
                self.sqhd = (1 % entries) as u16;
                let depth = (entries as usize).min(self.limits.max_slots);
                self.slots = (0..depth).map(|_| Slot::free()).collect();
                self.free_slots = (0..depth as u32).rev().collect();
                self.role = match connected {
                    Connected::Admin { ctrlr } => {
                        if let Some(p) = self.peer {
                            ctrlr.set_host_addr(p);
                        }
                        tracing::info!(
                            cntlid = ctrlr.cntlid(),
                            subnqn = ctrlr.subnqn(),
                            hostnqn = ctrlr.hostnqn(),
                            port = self.port_id,
                            peer = %self.peer_str(),
                            "admin queue connected"
                        );
                        stats::registry()
                            .subsystem(ctrlr.subnqn())
                            .controllers_created
                            .fetch_add(1, Relaxed);
                        self.listener_stats.admin_queues.fetch_add(1, Relaxed);
                        self.counted_queue = Some(false);
                        Role2::Admin { ctrlr }
                    }
                    Connected::Io { ctrlr, qid, .. } => {
                        tracing::debug!(cntlid = ctrlr.cntlid(), qid, "I/O queue connected");
                        let view = ctrlr.io_view();
                        self.fence = Some(self.target.fence.register(ctrlr::QueueName {
                            subnqn: ctrlr.subnqn().to_owned(),
                            cntlid: ctrlr.cntlid(),
                            qid,
                        }));
                        self.listener_stats.io_queues.fetch_add(1, Relaxed);
                        self.counted_queue = Some(true);
                        Role2::Io { ctrlr, qid, view }
                    }
                };
                cpl.cid = cmd.cid();
                self.send_cpl(cpl);
            }
            Err(r) => {
                tracing::warn!(
                    reason = r.reason,
                    hostnqn = %r.hostnqn,
                    subnqn = %r.subnqn,
                    peer = %self.peer_str(),
                    port = self.port_id,
                    qid = cmd.cdw10() >> 16,
                    status = ?r.cpl.status,
                    "connect refused: {}",
                    r.reason
                );
                let mut cpl = r.cpl;
                cpl.cid = cmd.cid();
                self.stats.errors += 1;
                self.send_cpl(cpl);
            }
        }
    }
}
