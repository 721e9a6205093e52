//! Admin command set and Fabrics Property Get/Set, executed under the
//! controller's admin-state lock.

use super::*;
use crate::spec::identify::{
    self, CNTRLTYPE_DISCOVERY, CNTRLTYPE_IO, CSI_NVM, IDENTIFY_DATA_SIZE, IdentifyController,
    IdentifyNamespace, cns,
};
use crate::spec::log::{self, AnaGroupDescriptor, CSE_CSUPP, CSE_LBCC, SmartLog};
use crate::spec::{feat, io_opc, lid, prop};
use crate::subsystem::{MAX_ANA_GROUPS, MAX_NAMESPACES, SubsystemConfig};

/// What `exec_admin` read from the target before taking the state lock.
pub(crate) struct Ctx<'a> {
    pub(crate) cfg: &'a TargetConfig,
    pub(crate) ana_chgcnt: u64,
    pub(crate) disc_genctr: u64,
}

// Controller Configuration (CC) and Status (CSTS) fields.
const CC_EN: u32 = 1 << 0;
const CC_CSS_SHIFT: u32 = 4;
const CC_MPS_SHIFT: u32 = 7;
const CC_AMS_SHIFT: u32 = 11;
const CC_SHN_SHIFT: u32 = 14;
const CC_IOSQES_SHIFT: u32 = 16;
const CC_IOCQES_SHIFT: u32 = 20;
pub(crate) const CSTS_RDY: u32 = 1 << 0;
const CSTS_CFS: u32 = 1 << 1;
pub(crate) const CSTS_SHST_MASK: u32 = 3 << 2;
const CSTS_SHST_COMPLETE: u32 = 2 << 2;
/// CC.IOSQES / CC.IOCQES the NVM command set requires (64 and 16 bytes).
const NVM_IOSQES: u32 = 6;
const NVM_IOCQES: u32 = 4;

pub(crate) fn cc_en(cc: u32) -> bool {
    cc & CC_EN != 0
}
fn cc_shn(cc: u32) -> u32 {
    (cc >> CC_SHN_SHIFT) & 3
}

/// CAP: MQES, CQR (fabrics queues are physically contiguous), TO = 30 ×
/// 500 ms, CSS = NVM command set only (bit 37), MPSMIN = MPSMAX = 0 (4 KiB).
pub const CAP: u64 = MQES as u64 | (1 << 16) | (30 << 24) | (1 << 37);

/// Composite temperature reported in SMART, in kelvins (35 °C).
pub(crate) const COMPOSITE_TEMP_K: u16 = 308;
/// Default over-temperature threshold and WCTEMP (70 °C), CCTEMP (85 °C).
pub(crate) const DEFAULT_TEMP_OVER_K: u16 = 343;
const CCTEMP_K: u16 = 358;

/// OAES: Namespace Attribute and ANA Change notices for an I/O controller,
/// Discovery Log Change for a discovery controller.
pub(crate) fn oaes(discovery: bool) -> u32 {
    if discovery {
        Event::DiscoveryLogChange.aec_bit()
    } else {
        Event::NsAttrChanged.aec_bit() | Event::AnaChange.aec_bit()
    }
}

type Res<T> = Result<T, Status>;

fn ok(cid: u16, dw0: u32, data: Vec<u8>) -> AdminResult {
    AdminResult::Complete {
        cpl: cpl(cid, Status::SUCCESS, dw0),
        data,
    }
}

fn err(cid: u16, status: Status) -> AdminResult {
    AdminResult::Complete {
        cpl: NvmeCpl::new(cid, status),
        data: Vec::new(),
    }
}

fn invalid_field<T>() -> Res<T> {
    Err(Status::INVALID_FIELD.dnr())
}

/// The slice of a log page the command asked for: `len` bytes from `off`,
/// zero-filled past the end of the log (capped at MDTS).
fn log_slice(full: &[u8], off: u64, len: u64) -> Res<Vec<u8>> {
    let size = full.len() as u64;
    if off > size {
        return invalid_field();
    }
    let len = len.min(u64::from(MDTS_BYTES));
    let end = off.saturating_add(len).min(size);
    let mut v = full[off as usize..end as usize].to_vec();
    v.resize(len as usize, 0);
    Ok(v)
}

impl Ctrlr {
    pub(super) fn dispatch(&self, st: &mut AdminState, cx: &Ctx<'_>, cmd: &NvmeCmd) -> AdminResult {
        let cid = cmd.cid();
        if cmd.opcode() == admin_opc::FABRICS {
            return match self.fabrics(st, cmd) {
                Ok((dw0, dw1)) => AdminResult::Complete {
                    cpl: NvmeCpl {
                        dw0,
                        dw1,
                        ..NvmeCpl::success(cid)
                    },
                    data: Vec::new(),
                },
                Err(s) => err(cid, s),
            };
        }
        // FUSE: no fused operations are supported.
        if cmd.flags() & 0x3 != 0 {
            return err(cid, Status::INVALID_FIELD.dnr());
        }
        if !st.is_ready() {
            return err(cid, Status::COMMAND_SEQUENCE_ERROR.dnr());
        }
        let r = if self.discovery {
            self.discovery_cmd(st, cx, cmd)
        } else {
            self.io_ctrl_cmd(st, cx, cmd)
        };
        match r {
            Ok(Some((dw0, data))) => ok(cid, dw0, data),
            Ok(None) => AdminResult::Deferred,
            Err(s) => err(cid, s),
        }
    }

    fn io_ctrl_cmd(
        &self,
        st: &mut AdminState,
        cx: &Ctx<'_>,
        cmd: &NvmeCmd,
    ) -> Res<Option<(u32, Vec<u8>)>> {
        let sub = cx.cfg.subsystem_on_port(&self.subnqn, self.port_id);
        Ok(Some(match cmd.opcode() {
            admin_opc::IDENTIFY => (0, self.identify(sub, cmd)?),
            admin_opc::GET_LOG_PAGE => (0, self.get_log_page(st, cx, sub, cmd)?),
            admin_opc::SET_FEATURES => (self.set_features(st, sub, cmd)?, Vec::new()),
            admin_opc::GET_FEATURES => (self.get_features(st, sub, cmd)?, Vec::new()),
            admin_opc::ASYNC_EVENT_REQUEST => return self.async_event_request(st, cmd),
            admin_opc::KEEP_ALIVE => (0, Vec::new()),
            // Bit 0: command not aborted (see the module docs).
            admin_opc::ABORT => (1, Vec::new()),
            _ => return Err(Status::INVALID_OPCODE.dnr()),
        }))
    }

    fn discovery_cmd(
        &self,
        st: &mut AdminState,
        cx: &Ctx<'_>,
        cmd: &NvmeCmd,
    ) -> Res<Option<(u32, Vec<u8>)>> {
        Ok(Some(match cmd.opcode() {
            admin_opc::IDENTIFY => match (cmd.cdw10() & 0xff) as u8 {
                cns::CONTROLLER => (0, self.identify_controller(None)),
                _ => return invalid_field(),
            },
            admin_opc::GET_LOG_PAGE => (0, self.get_log_page(st, cx, None, cmd)?),
            admin_opc::SET_FEATURES => (self.set_features(st, None, cmd)?, Vec::new()),
            admin_opc::GET_FEATURES => (self.get_features(st, None, cmd)?, Vec::new()),
            admin_opc::ASYNC_EVENT_REQUEST => return self.async_event_request(st, cmd),
            admin_opc::KEEP_ALIVE => (0, Vec::new()),
            _ => return Err(Status::INVALID_OPCODE.dnr()),
        }))
    }

    // ---- Fabrics ----

    fn fabrics(&self, st: &mut AdminState, cmd: &NvmeCmd) -> Res<(u32, u32)> {
        match cmd.fctype() {
            fctype::PROPERTY_GET => {
                let v = self.property_get(st, cmd)?;
                Ok((v as u32, (v >> 32) as u32))
            }
            fctype::PROPERTY_SET => {
                self.property_set(st, cmd)?;
                Ok((0, 0))
            }
            fctype::CONNECT => Err(Status::COMMAND_SEQUENCE_ERROR.dnr()),
            fctype::DISCONNECT => Ok((0, 0)),
            // No authentication is configured, so Authentication
            // Send/Receive are as unknown as any other type.
            _ => Err(Status::INVALID_OPCODE.dnr()),
        }
    }

    /// ATTRIB bit 0 selects an 8-byte (CAP) or 4-byte access; CAP may also be
    /// read as two 4-byte halves.
    fn property_get(&self, st: &AdminState, cmd: &NvmeCmd) -> Res<u64> {
        let eight = cmd.cdw10() & 1 != 0;
        let ofst = cmd.cdw11();
        match (eight, ofst) {
            (true, prop::CAP) => Ok(CAP),
            (false, prop::CAP) => Ok(CAP & 0xffff_ffff),
            (false, o) if o == prop::CAP + 4 => Ok(CAP >> 32),
            (false, prop::VS) => Ok(u64::from(NVME_VERSION)),
            (false, prop::CC) => Ok(u64::from(st.cc)),
            (false, prop::CSTS) => Ok(u64::from(st.csts)),
            _ => invalid_field(),
        }
    }

    fn property_set(&self, st: &mut AdminState, cmd: &NvmeCmd) -> Res<()> {
        if cmd.cdw10() & 1 != 0 || cmd.cdw11() != prop::CC {
            return invalid_field();
        }
        self.update_cc(st, cmd.cdw12());
        Ok(())
    }

    /// CC transitions as nvmet applies them: EN 0→1 validates the
    /// configuration and sets RDY at once (or CFS); EN 1→0 resets the
    /// controller; SHN≠0 completes the shutdown at once.
    fn update_cc(&self, st: &mut AdminState, new: u32) {
        let old = st.cc;
        st.cc = new;
        if cc_en(new) && !cc_en(old) {
            if self.cc_valid(new) {
                st.csts = (st.csts & !CSTS_CFS) | CSTS_RDY;
            } else {
                st.csts |= CSTS_CFS;
            }
        }
        if !cc_en(new) && cc_en(old) {
            st.reset();
            st.aec = oaes(self.discovery);
            st.csts &= !(CSTS_RDY | CSTS_CFS);
        }
        if cc_shn(new) != 0 && cc_shn(old) == 0 {
            st.csts |= CSTS_SHST_COMPLETE;
        }
        if cc_shn(new) == 0 && cc_shn(old) != 0 {
            st.csts &= !CSTS_SHST_MASK;
        }
    }

    fn cc_valid(&self, cc: u32) -> bool {
        let css = (cc >> CC_CSS_SHIFT) & 7;
        let mps = (cc >> CC_MPS_SHIFT) & 0xf;
        let ams = (cc >> CC_AMS_SHIFT) & 7;
        let iosqes = (cc >> CC_IOSQES_SHIFT) & 0xf;
        let iocqes = (cc >> CC_IOCQES_SHIFT) & 0xf;
        // Like nvmet, a discovery controller does not insist on the queue
        // entry sizes: older hosts leave them zero there.
        css == 0
            && mps == 0
            && ams == 0
            && (self.discovery || (iosqes == NVM_IOSQES && iocqes == NVM_IOCQES))
    }

    // ---- Identify ----

    fn identify(&self, sub: Option<&SubsystemConfig>, cmd: &NvmeCmd) -> Res<Vec<u8>> {
        let nsid = cmd.nsid();
        let active = sub.map(|s| s.active_namespaces()).unwrap_or_default();
        match (cmd.cdw10() & 0xff) as u8 {
            cns::NAMESPACE => {
                if nsid == 0 || nsid > MAX_NAMESPACES {
                    return Err(Status::INVALID_NAMESPACE.dnr());
                }
                // An allocated-but-inactive NSID reads as zeroes.
                Ok(match active.iter().find(|n| n.nsid == nsid) {
                    Some(ns) => {
                        let info = ns.bdev.info();
                        IdentifyNamespace {
                            nsze: info.num_blocks,
                            ncap: info.num_blocks,
                            nuse: info.num_blocks,
                            nsfeat: 0,
                            nlbaf: 0,
                            flbas: 0,
                            // Shared: reachable through several controllers.
                            nmic: 1,
                            // Deallocated blocks read as zeroes; Write Zeroes
                            // may deallocate.
                            dlfeat: 0x01 | 0x08,
                            anagrpid: ns.effective_anagrpid(),
                            nguid: ns.nguid,
                            eui64: ns.eui64,
                            lbaf0_lbads: info.block_size.trailing_zeros() as u8,
                        }
                        .encode()
                    }
                    None => vec![0; IDENTIFY_DATA_SIZE],
                })
            }
            cns::CONTROLLER => Ok(self.identify_controller(sub)),
            cns::ACTIVE_NS_LIST => {
                if nsid >= 0xFFFF_FFFE {
                    return Err(Status::INVALID_NAMESPACE.dnr());
                }
                Ok(identify::active_ns_list(
                    active.iter().map(|n| n.nsid),
                    nsid,
                ))
            }
            cns::NS_ID_DESCRIPTOR_LIST => match active.iter().find(|n| n.nsid == nsid) {
                Some(ns) => Ok(identify::ns_id_descriptor_list(
                    &ns.eui64, &ns.nguid, &ns.uuid,
                )),
                None => Err(Status::INVALID_NAMESPACE.dnr()),
            },
            // NVM command set specific Identify Controller: the Dataset
            // Management and Write Zeroes limits that keep one command
            // bounded in time on every backing (an objbacker TRIM is one
            // DELETE per object).
            cns::CSI_CONTROLLER if (cmd.cdw11() >> 24) as u8 == CSI_NVM => {
                Ok(identify::nvm_controller(&identify::NvmLimits::TARGET))
            }
            // CNS 08h is only sent to VS >= 2.0 controllers; the host falls
            // back to CNS 00h on any error.
            _ => invalid_field(),
        }
    }

    fn identify_controller(&self, sub: Option<&SubsystemConfig>) -> Vec<u8> {
        let common = IdentifyController {
            fr: env!("CARGO_PKG_VERSION").to_owned(),
            cntlid: self.cntlid,
            ver: NVME_VERSION,
            mdts: (MDTS_BYTES / 4096).trailing_zeros() as u8,
            kas: KAS,
            maxcmd: MQES + 1,
            // SGLs supported (bits 1:0 = 01b) and the Offset subtype for
            // in-capsule data (bit 20); no keyed SGLs on TCP. As nvmet.
            sgls: (1 << 0) | (1 << 20),
            ioccsz: (64 + IN_CAPSULE_DATA_SIZE) / 16,
            iorcsz: 1,
            icdoff: 0,
            fcatt: 0,
            msdbd: 1,
            aerl: AERL,
            lpa: 1 << 2,
            oaes: oaes(self.discovery),
            subnqn: self.subnqn.clone(),
            ..Default::default()
        };
        if self.discovery {
            return IdentifyController {
                cntrltype: CNTRLTYPE_DISCOVERY,
                ..common
            }
            .encode();
        }
        let vwc_present = sub
            .map(|s| {
                s.active_namespaces()
                    .iter()
                    .any(|n| n.bdev.info().volatile_write_cache)
            })
            .unwrap_or(false);
        IdentifyController {
            sn: sub.map(|s| s.serial.clone()).unwrap_or_default(),
            mn: sub.map(|s| s.model.clone()).unwrap_or_default(),
            rab: 6,
            // Multiple ports, multiple controllers, ANA reporting.
            cmic: (1 << 0) | (1 << 1) | (1 << 3),
            cntrltype: CNTRLTYPE_IO,
            oacs: 0,
            acl: 3,
            // Slot 1 read-only, one slot.
            frmw: (1 << 0) | (1 << 1),
            // Per-namespace SMART, Commands Supported and Effects, extended
            // Get Log Page (NUMDU, offsets).
            lpa: (1 << 0) | (1 << 1) | (1 << 2),
            elpe: 0,
            wctemp: DEFAULT_TEMP_OVER_K,
            cctemp: CCTEMP_K,
            anatt: 10,
            // Optimized, non-optimized, inaccessible, persistent loss and
            // change states may be reported.
            anacap: 0x1f,
            anagrpmax: MAX_ANA_GROUPS,
            nanagrpid: MAX_ANA_GROUPS,
            sqes: 0x66,
            cqes: 0x44,
            nn: MAX_NAMESPACES,
            mnan: MAX_NAMESPACES,
            // Dataset Management, Write Zeroes, Save/Select in features.
            oncs: (1 << 2) | (1 << 3) | (1 << 4),
            // Bits 2:1 = 10b: Flush with the broadcast NSID is not
            // supported, so the host flushes per namespace.
            vwc: (2 << 1) | u8::from(vwc_present),
            psd0_mp: 0x9c4,
            ..common
        }
        .encode()
    }

    // ---- Get Log Page ----

    fn get_log_page(
        &self,
        st: &mut AdminState,
        cx: &Ctx<'_>,
        sub: Option<&SubsystemConfig>,
        cmd: &NvmeCmd,
    ) -> Res<Vec<u8>> {
        let lid = (cmd.cdw10() & 0xff) as u8;
        let lsp = ((cmd.cdw10() >> 8) & 0x7f) as u8;
        let rae = cmd.cdw10() & (1 << 15) != 0;
        let numd = ((u64::from(cmd.cdw11() & 0xffff)) << 16 | u64::from(cmd.cdw10() >> 16)) + 1;
        let len = numd * 4;
        let off = u64::from(cmd.cdw12()) | (u64::from(cmd.cdw13()) << 32);
        if off & 3 != 0 {
            return invalid_field();
        }
        if self.discovery {
            if lid != lid::DISCOVERY {
                return Err(Status::INVALID_LOG_PAGE.dnr());
            }
            let full = crate::discovery::discovery_log(cx.cfg, &self.hostnqn, cx.disc_genctr);
            let v = log_slice(&full, off, len)?;
            if !rae {
                st.masked &= !Event::DiscoveryLogChange.aec_bit();
            }
            return Ok(v);
        }
        let active = sub.map(|s| s.active_namespaces()).unwrap_or_default();
        let full = match lid {
            lid::ERROR_INFO => vec![0; log::ERROR_INFO_ENTRY_SIZE],
            lid::SMART => {
                let nsid = cmd.nsid();
                if nsid != 0 && nsid != u32::MAX && !active.iter().any(|n| n.nsid == nsid) {
                    return Err(Status::INVALID_NAMESPACE.dnr());
                }
                SmartLog {
                    composite_temperature: COMPOSITE_TEMP_K,
                    available_spare: 100,
                    available_spare_threshold: 10,
                    ..Default::default()
                }
                .encode()
            }
            lid::FW_SLOT => log::fw_slot_log(env!("CARGO_PKG_VERSION")),
            lid::CHANGED_NS_LIST => log::changed_ns_list(&st.changed_ns, st.changed_ns_overflow),
            lid::CMD_EFFECTS => {
                if (cmd.cdw14() >> 24) as u8 != CSI_NVM {
                    return invalid_field();
                }
                cmd_effects()
            }
            lid::ANA => {
                let groups: Vec<AnaGroupDescriptor> = cx
                    .cfg
                    .ana_groups(&self.subnqn, self.port_id)
                    .into_iter()
                    .map(|(anagrpid, (state, nsids))| AnaGroupDescriptor {
                        anagrpid,
                        chgcnt: cx.ana_chgcnt,
                        anas: state as u8,
                        nsids,
                    })
                    .collect();
                log::ana_log(cx.ana_chgcnt, &groups, lsp & log::ANA_LSP_RGO != 0)
            }
            _ => return Err(Status::INVALID_LOG_PAGE.dnr()),
        };
        let v = log_slice(&full, off, len)?;
        if !rae {
            match lid {
                lid::CHANGED_NS_LIST => {
                    st.changed_ns.clear();
                    st.changed_ns_overflow = false;
                    st.masked &= !Event::NsAttrChanged.aec_bit();
                }
                lid::ANA => st.masked &= !Event::AnaChange.aec_bit(),
                _ => {}
            }
        }
        Ok(v)
    }

    // ---- Features ----

    fn vwc_present(sub: Option<&SubsystemConfig>) -> bool {
        sub.is_some_and(|s| {
            s.active_namespaces()
                .iter()
                .any(|n| n.bdev.info().volatile_write_cache)
        })
    }

    fn supported_feature(&self, fid: u8, sub: Option<&SubsystemConfig>) -> bool {
        match fid {
            feat::ASYNC_EVENT_CONFIG | feat::KEEP_ALIVE_TIMER => true,
            _ if self.discovery => false,
            feat::NUMBER_OF_QUEUES | feat::TEMP_THRESHOLD => true,
            feat::VOLATILE_WRITE_CACHE => Self::vwc_present(sub),
            _ => false,
        }
    }

    fn set_features(
        &self,
        st: &mut AdminState,
        sub: Option<&SubsystemConfig>,
        cmd: &NvmeCmd,
    ) -> Res<u32> {
        let fid = (cmd.cdw10() & 0xff) as u8;
        let v = cmd.cdw11();
        if !self.supported_feature(fid, sub) {
            return invalid_field();
        }
        if cmd.cdw10() & (1 << 31) != 0 {
            return Err(Status::FEATURE_NOT_SAVEABLE.dnr());
        }
        match fid {
            feat::NUMBER_OF_QUEUES => {
                if !st.io_qids.is_empty() {
                    return Err(Status::COMMAND_SEQUENCE_ERROR.dnr());
                }
                let (nsqr, ncqr) = (v & 0xffff, v >> 16);
                if nsqr == 0xffff || ncqr == 0xffff {
                    return invalid_field();
                }
                // Fabrics queues come in SQ/CQ pairs.
                let n = (nsqr.min(ncqr) + 1).min(u32::from(MAX_IO_QUEUES)) as u16;
                st.io_queues_granted = Some(n);
                Ok(queues_dw0(n))
            }
            feat::ASYNC_EVENT_CONFIG => {
                // SMART critical warning bits 7:0 are accepted and ignored:
                // a virtual device never raises them.
                let allowed = oaes(self.discovery) | if self.discovery { 0 } else { 0xff };
                if v & !allowed != 0 {
                    return invalid_field();
                }
                st.aec = v;
                Ok(v)
            }
            feat::KEEP_ALIVE_TIMER => {
                self.kato_ms
                    .store(round_kato(u64::from(v)), Ordering::Relaxed);
                Ok(0)
            }
            feat::VOLATILE_WRITE_CACHE => {
                st.vwc_enabled = v & 1 != 0;
                Ok(0)
            }
            feat::TEMP_THRESHOLD => {
                let (tmpth, tmpsel, thsel) = (v & 0xffff, (v >> 16) & 0xf, (v >> 20) & 0x3);
                if tmpsel != 0 {
                    return invalid_field();
                }
                match thsel {
                    0 => st.temp_over = tmpth as u16,
                    1 => st.temp_under = tmpth as u16,
                    _ => return invalid_field(),
                }
                Ok(0)
            }
            _ => invalid_field(),
        }
    }

    fn get_features(
        &self,
        st: &AdminState,
        sub: Option<&SubsystemConfig>,
        cmd: &NvmeCmd,
    ) -> Res<u32> {
        let fid = (cmd.cdw10() & 0xff) as u8;
        let sel = (cmd.cdw10() >> 8) & 7;
        if !self.supported_feature(fid, sub) {
            return invalid_field();
        }
        let current = match sel {
            0 => true,
            // Nothing is saveable, so "saved" is the default.
            1 | 2 => false,
            // Supported capabilities: changeable, not saveable, not
            // namespace specific.
            3 => return Ok(1 << 2),
            _ => return invalid_field(),
        };
        match fid {
            feat::NUMBER_OF_QUEUES => Ok(queues_dw0(match st.io_queues_granted {
                Some(n) if current => n,
                _ => MAX_IO_QUEUES,
            })),
            feat::ASYNC_EVENT_CONFIG => Ok(if current {
                st.aec
            } else {
                oaes(self.discovery)
            }),
            feat::KEEP_ALIVE_TIMER => Ok(if current {
                self.kato_ms()
            } else {
                st.connect_kato_ms
            }
            .min(u64::from(u32::MAX)) as u32),
            feat::VOLATILE_WRITE_CACHE => Ok(u32::from(!current || st.vwc_enabled)),
            feat::TEMP_THRESHOLD => {
                let (tmpsel, thsel) = ((cmd.cdw11() >> 16) & 0xf, (cmd.cdw11() >> 20) & 0x3);
                if tmpsel != 0 {
                    return invalid_field();
                }
                let (over, under) = if current {
                    (st.temp_over, st.temp_under)
                } else {
                    (DEFAULT_TEMP_OVER_K, 0)
                };
                match thsel {
                    0 => Ok(u32::from(over)),
                    1 => Ok(u32::from(under)),
                    _ => invalid_field(),
                }
            }
            _ => invalid_field(),
        }
    }

    // ---- Asynchronous Event Request ----

    fn async_event_request(
        &self,
        st: &mut AdminState,
        cmd: &NvmeCmd,
    ) -> Res<Option<(u32, Vec<u8>)>> {
        // Older parked AERs are served first, so an event left pending means
        // none is parked and this one takes it.
        if st.parked_aers.is_empty()
            && let Some(ev) = st.pending.pop_front()
        {
            return Ok(Some((ev.dw0(), Vec::new())));
        }
        if st.parked_aers.len() > usize::from(AERL) {
            return Err(Status::ASYNC_EVENT_LIMIT_EXCEEDED.dnr());
        }
        st.parked_aers.push_back(cmd.cid());
        Ok(None)
    }
}

fn queues_dw0(n: u16) -> u32 {
    let z = u32::from(n.saturating_sub(1));
    (z << 16) | z
}

/// Commands Supported and Effects: everything implemented; the I/O
/// commands that write change logical block content.
fn cmd_effects() -> Vec<u8> {
    let admin = [
        admin_opc::GET_LOG_PAGE,
        admin_opc::IDENTIFY,
        admin_opc::ABORT,
        admin_opc::SET_FEATURES,
        admin_opc::GET_FEATURES,
        admin_opc::ASYNC_EVENT_REQUEST,
        admin_opc::KEEP_ALIVE,
    ]
    .map(|o| (o, CSE_CSUPP));
    let io = [
        (io_opc::FLUSH, CSE_CSUPP),
        (io_opc::WRITE, CSE_CSUPP | CSE_LBCC),
        (io_opc::READ, CSE_CSUPP),
        (io_opc::WRITE_ZEROES, CSE_CSUPP | CSE_LBCC),
        (io_opc::DATASET_MANAGEMENT, CSE_CSUPP | CSE_LBCC),
    ];
    log::cmd_effects_log(&admin, &io)
}

impl AdminState {
    /// Controller Level Reset (CC.EN 1→0): features back to their defaults,
    /// queued events dropped. Parked AERs complete with Command Aborted due
    /// to SQ Deletion, as SPDK does: every accepted capsule gets exactly one
    /// response, also across a reset (a host that already gave up on them
    /// ignores the completions).
    fn reset(&mut self) {
        self.io_queues_granted = None;
        while let Some(cid) = self.parked_aers.pop_front() {
            self.ready
                .push(NvmeCpl::new(cid, Status::ABORTED_SQ_DELETION));
        }
        self.pending.clear();
        self.masked = 0;
        self.changed_ns.clear();
        self.changed_ns_overflow = false;
        self.csts &= !CSTS_SHST_MASK;
    }
}
