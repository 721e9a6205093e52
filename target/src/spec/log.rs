//! Log pages (NVMe Base 2.0, "Get Log Page"), encoded little-endian.

/// Error Information log entry size.
pub const ERROR_INFO_ENTRY_SIZE: usize = 64;
/// SMART / Health Information log size.
pub const SMART_LOG_SIZE: usize = 512;
/// Firmware Slot Information log size.
pub const FW_SLOT_LOG_SIZE: usize = 512;
/// Changed Namespace List: 1024 NSIDs.
pub const CHANGED_NS_LIST_ENTRIES: usize = 1024;
pub const CHANGED_NS_LIST_SIZE: usize = CHANGED_NS_LIST_ENTRIES * 4;
/// Commands Supported and Effects log size.
pub const CMD_EFFECTS_LOG_SIZE: usize = 4096;
/// ANA log page header and group descriptor header sizes.
pub const ANA_LOG_HEADER_SIZE: usize = 16;
pub const ANA_GROUP_DESC_SIZE: usize = 32;

/// Get Log Page LSP bit 0 for the ANA log: Return Groups Only.
pub const ANA_LSP_RGO: u8 = 0x01;

/// SMART / Health Information. A virtual device has no wear, so only the
/// fields a host interprets are filled in.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SmartLog {
    pub critical_warning: u8,
    /// Composite Temperature in kelvins.
    pub composite_temperature: u16,
    pub available_spare: u8,
    pub available_spare_threshold: u8,
    pub percentage_used: u8,
    pub num_err_log_entries: u64,
}

impl SmartLog {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; SMART_LOG_SIZE];
        b[0] = self.critical_warning;
        b[1..3].copy_from_slice(&self.composite_temperature.to_le_bytes());
        b[3] = self.available_spare;
        b[4] = self.available_spare_threshold;
        b[5] = self.percentage_used;
        b[176..184].copy_from_slice(&self.num_err_log_entries.to_le_bytes());
        b
    }
}

/// Firmware Slot Information: slot 1 active, holding `frs1`.
pub fn fw_slot_log(frs1: &str) -> Vec<u8> {
    let mut b = vec![0u8; FW_SLOT_LOG_SIZE];
    // AFI bits 2:0: the slot the running firmware came from.
    b[0] = 1;
    super::identify::put_ascii_padded(&mut b[8..16], frs1);
    b
}

/// Changed Namespace List. More changes than fit are reported as the single
/// entry FFFFFFFFh, which tells the host to rescan everything.
pub fn changed_ns_list(nsids: &[u32], overflow: bool) -> Vec<u8> {
    let mut b = vec![0u8; CHANGED_NS_LIST_SIZE];
    if overflow || nsids.len() > CHANGED_NS_LIST_ENTRIES {
        b[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
    } else {
        for (i, n) in nsids.iter().enumerate() {
            b[i * 4..i * 4 + 4].copy_from_slice(&n.to_le_bytes());
        }
    }
    b
}

/// Commands Supported and Effects entry bits.
pub const CSE_CSUPP: u32 = 1 << 0;
pub const CSE_LBCC: u32 = 1 << 1;

/// Commands Supported and Effects: ACS[opcode] at 0, IOCS[opcode] at 1024.
pub fn cmd_effects_log(admin: &[(u8, u32)], io: &[(u8, u32)]) -> Vec<u8> {
    let mut b = vec![0u8; CMD_EFFECTS_LOG_SIZE];
    for &(opc, e) in admin {
        let o = usize::from(opc) * 4;
        b[o..o + 4].copy_from_slice(&e.to_le_bytes());
    }
    for &(opc, e) in io {
        let o = 1024 + usize::from(opc) * 4;
        b[o..o + 4].copy_from_slice(&e.to_le_bytes());
    }
    b
}

/// One ANA Group Descriptor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AnaGroupDescriptor {
    pub anagrpid: u32,
    pub chgcnt: u64,
    /// ANA State (bits 3:0 of byte 16).
    pub anas: u8,
    pub nsids: Vec<u32>,
}

/// Asymmetric Namespace Access log: header (CHGCNT, NGRPS) then descriptors.
pub fn ana_log(chgcnt: u64, groups: &[AnaGroupDescriptor], rgo: bool) -> Vec<u8> {
    let mut b = Vec::with_capacity(ANA_LOG_HEADER_SIZE + groups.len() * ANA_GROUP_DESC_SIZE);
    b.extend_from_slice(&chgcnt.to_le_bytes());
    let ngrps = u16::try_from(groups.len()).unwrap_or(u16::MAX);
    b.extend_from_slice(&ngrps.to_le_bytes());
    b.extend_from_slice(&[0; 6]);
    for g in groups.iter().take(usize::from(ngrps)) {
        let nsids: &[u32] = if rgo { &[] } else { &g.nsids };
        b.extend_from_slice(&g.anagrpid.to_le_bytes());
        b.extend_from_slice(&(nsids.len() as u32).to_le_bytes());
        b.extend_from_slice(&g.chgcnt.to_le_bytes());
        b.push(g.anas & 0x0f);
        b.extend_from_slice(&[0; 15]);
        for n in nsids {
            b.extend_from_slice(&n.to_le_bytes());
        }
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ana_log_layout() {
        let g = [
            AnaGroupDescriptor {
                anagrpid: 1,
                chgcnt: 5,
                anas: 0x01,
                nsids: vec![1, 3],
            },
            AnaGroupDescriptor {
                anagrpid: 2,
                chgcnt: 5,
                anas: 0x03,
                nsids: vec![2],
            },
        ];
        let b = ana_log(5, &g, false);
        assert_eq!(b.len(), 16 + 32 + 8 + 32 + 4);
        assert_eq!(u64::from_le_bytes(b[0..8].try_into().unwrap()), 5);
        assert_eq!(u16::from_le_bytes(b[8..10].try_into().unwrap()), 2);
        assert_eq!(u32::from_le_bytes(b[16..20].try_into().unwrap()), 1);
        assert_eq!(u32::from_le_bytes(b[20..24].try_into().unwrap()), 2);
        assert_eq!(b[32], 0x01);
        assert_eq!(u32::from_le_bytes(b[52..56].try_into().unwrap()), 3);
        assert_eq!(u32::from_le_bytes(b[56..60].try_into().unwrap()), 2);
        let b = ana_log(5, &g, true);
        assert_eq!(b.len(), 16 + 64);
        assert_eq!(u32::from_le_bytes(b[20..24].try_into().unwrap()), 0);
    }

    #[test]
    fn changed_ns_list_overflow_is_all_ones() {
        let b = changed_ns_list(&[4, 9], false);
        assert_eq!(&b[0..8], &[4, 0, 0, 0, 9, 0, 0, 0]);
        let b = changed_ns_list(&[4], true);
        assert_eq!(&b[0..8], &[0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0]);
    }

    #[test]
    fn smart_log_fields() {
        let b = SmartLog {
            composite_temperature: 308,
            available_spare: 100,
            ..Default::default()
        }
        .encode();
        assert_eq!(u16::from_le_bytes([b[1], b[2]]), 308);
        assert_eq!(b[3], 100);
    }
}
