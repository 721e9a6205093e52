//! Capsule dispatch: routes each command by the queue's role to Connect,
//! the admin command set (through the controller), or the I/O path.
//!
//! Exists so that every capsule passes one gate that accounts it and checks
//! what is common to all roles (in-capsule data bounds, its SGL) before any
//! command-specific code runs.
//!
//! Invariants:
//! * Every capsule is counted in `stats.commands` here and, on every path
//!   out, is answered, parked (AER), handed on with its payload, or ends the
//!   connection: the completion rule starts here.
//! * A command that fails before its data arrived still has its in-capsule
//!   data consumed (discarded), so the stream stays framed.

use super::*;
use crate::ctrlr::AdminResult;
use crate::spec::{SGL_ID_DATA_BLOCK_OFFSET, admin_opc, fctype};
use rx::AfterData;

/// PSDT 11b is reserved (NVMe Base 4.2, Figure 91): Invalid Field.
const PSDT_RESERVED: u8 = 0b11;

fn dir_h2c(opcode: u8) -> bool {
    opcode & 0x3 == 0x1
}

fn is_fabrics_without_data(cmd: &NvmeCmd) -> bool {
    cmd.opcode() == admin_opc::FABRICS
        && matches!(
            cmd.fctype(),
            fctype::PROPERTY_SET | fctype::PROPERTY_GET | fctype::DISCONNECT
        )
}

impl QueuePair {
    pub(super) fn on_capsule(
        &mut self,
        cmd: NvmeCmd,
        skip: usize,
        data_len: usize,
        has_ddgst: bool,
        now_ms: u64,
    ) {
        self.stats.commands += 1;
        self.active_since_tick = true;
        // u32: SQSIZE is bounded at Connect, but this must not be able to
        // overflow whatever a host sent.
        self.sqhd = ((u32::from(self.sqhd) + 1) % (u32::from(self.sqsize) + 1)) as u16;
        // The codec bounds every payload by the larger of the two limits;
        // capsules have the smaller one.
        if data_len > self.limits.in_capsule_data as usize {
            return self.terminate(FatalErrorStatus::DataLimitExceeded, 0);
        }
        let sgl = cmd.sgl();
        // In-capsule data must be described by an offset data block SGL of
        // exactly that length; anything else is a malformed command whose
        // data we still consume so the stream stays in sync.
        if data_len > 0
            && (sgl.id != SGL_ID_DATA_BLOCK_OFFSET || sgl.len as usize != data_len || sgl.addr != 0)
        {
            return self.refuse_capsule(
                &cmd,
                Status::INVALID_SGL_DESCRIPTOR.dnr(),
                skip,
                data_len,
                has_ddgst,
            );
        }
        match &self.role {
            Role2::AwaitIcReq => {
                // The codec only passes capsules after the IC exchange; if
                // that ever breaks, the connection ends rather than leave a
                // command unanswered.
                tracing::error!("capsule before ICReq passed the codec");
                self.terminate(FatalErrorStatus::PduSequenceError, 0)
            }
            Role2::AwaitConnect => {
                if cmd.opcode() != admin_opc::FABRICS || cmd.fctype() != fctype::CONNECT {
                    return self.refuse_capsule(
                        &cmd,
                        Status::COMMAND_SEQUENCE_ERROR.dnr(),
                        skip,
                        data_len,
                        has_ddgst,
                    );
                }
                if data_len == 0 {
                    // Connect data always fits in-capsule; a host that asks
                    // for an R2T is not following the transport binding.
                    self.complete_err(&cmd, Status::DATA_SGL_LENGTH_INVALID.dnr());
                    return;
                }
                self.receive_small_capsule(cmd, skip, data_len, has_ddgst)
            }
            Role2::Admin { .. } if cmd.flags() >> 6 == PSDT_RESERVED => {
                self.refuse_capsule(&cmd, Status::INVALID_FIELD.dnr(), skip, data_len, has_ddgst)
            }
            Role2::Admin { .. } => {
                if data_len > 0 {
                    return self.receive_small_capsule(cmd, skip, data_len, has_ddgst);
                }
                if dir_h2c(cmd.opcode()) && sgl.len > 0 && !is_fabrics_without_data(&cmd) {
                    // Admin commands with host data larger than in-capsule
                    // do not exist in the command set we implement.
                    return self.complete_err(&cmd, Status::INVALID_FIELD.dnr());
                }
                self.exec_admin(&cmd, &[], now_ms);
            }
            Role2::Io { .. } => self.on_io_capsule(cmd, skip, data_len, has_ddgst),
        }
    }

    /// Runs after a payload (and its digest) has fully arrived.
    pub(super) fn after_data(&mut self, then: AfterData, digest_ok: bool) {
        match then {
            AfterData::Nothing => {}
            AfterData::Capsule => {
                let Some(cmd) = self.pending_capsule.take() else {
                    tracing::error!("in-capsule data without a pending capsule");
                    return self.terminate(FatalErrorStatus::PduSequenceError, 0);
                };
                let slot = self.pending_capsule_slot.take();
                if !digest_ok {
                    // SPDK's answer, and what the host retries: the command
                    // fails with a transient transport error, the connection lives.
                    if let Some(s) = slot {
                        self.release_slot(s);
                    }
                    return self.complete_err(&cmd, Status::TRANSIENT_TRANSPORT_ERROR);
                }
                match slot {
                    Some(s) => self.submit_io(s),
                    None => {
                        let data = std::mem::take(&mut self.small_data);
                        match self.role {
                            Role2::AwaitConnect => self.on_connect(&cmd, &data),
                            Role2::Admin { .. } => self.exec_admin(&cmd, &data, 0),
                            Role2::Io { .. } => self.exec_dsm(&cmd, &data),
                            Role2::AwaitIcReq => {
                                self.terminate(FatalErrorStatus::PduSequenceError, 0)
                            }
                        }
                        self.small_data = data;
                        self.small_data.clear();
                    }
                }
            }
            AfterData::H2C { slot, last } => {
                if !digest_ok {
                    let cmd = self.slots[slot as usize].cmd;
                    self.release_slot(slot);
                    return self.complete_err(&cmd, Status::TRANSIENT_TRANSPORT_ERROR);
                }
                if last {
                    self.submit_io(slot);
                }
            }
        }
    }

    fn exec_admin(&mut self, cmd: &NvmeCmd, data: &[u8], now_ms: u64) {
        let Role2::Admin { ctrlr } = &self.role else {
            return self.complete_err(cmd, Status::INVALID_OPCODE.dnr());
        };
        let ctrlr = ctrlr.clone();
        match ctrlr.exec_admin(cmd, data, now_ms) {
            AdminResult::Complete { mut cpl, data } => {
                cpl.cid = cmd.cid();
                if !cpl.status.is_success() {
                    // What hosts ask for that we do not do: the interop
                    // suite collects these lines.
                    tracing::info!(
                        opc = format_args!("{:#04x}", cmd.opcode()),
                        fctype = cmd.fctype(),
                        cdw10 = format_args!("{:#x}", cmd.cdw10()),
                        status = ?cpl.status,
                        "admin command refused"
                    );
                }
                if !data.is_empty() && cpl.status.is_success() {
                    let want = cmd.sgl().len as usize;
                    let mut data = data;
                    data.truncate(want);
                    if !data.is_empty() {
                        self.send_c2h_owned(cmd.cid(), data);
                    }
                }
                let disconnect =
                    cmd.opcode() == admin_opc::FABRICS && cmd.fctype() == fctype::DISCONNECT;
                self.send_cpl(cpl);
                if disconnect {
                    self.close = Some(CloseReason::Disconnected("Disconnect command"));
                    self.stop_rx = true;
                }
            }
            AdminResult::Deferred => {}
        }
    }
}
