//! The Discovery Log Page (log 70h) served by discovery controllers
//! (NVMe-oF "Discovery Log Page").

use crate::spec::identify::put_nqn;
use crate::subsystem::TargetConfig;

/// Discovery Log Page header and entry sizes.
pub const DISC_LOG_HEADER_SIZE: usize = 1024;
pub const DISC_LOG_ENTRY_SIZE: usize = 1024;

/// TRTYPE: TCP.
pub const TRTYPE_TCP: u8 = 3;
/// ADRFAM values.
pub const ADRFAM_IPV4: u8 = 1;
pub const ADRFAM_IPV6: u8 = 2;
/// SUBTYPE: NVMe subsystem (as opposed to a discovery referral).
pub const SUBTYPE_NVME: u8 = 2;
/// TREQ bits 1:0 = 10b: secure channel not required.
pub const TREQ_SECURE_CHANNEL_NOT_REQUIRED: u8 = 0x02;
/// Admin queue size the host should use (ASQSZ), as nvmet reports.
pub const ASQSZ: u16 = 32;
/// CNTLID of an entry: FFFFh = dynamic controller model.
pub const CNTLID_DYNAMIC: u16 = 0xFFFF;
/// TSAS for TCP: SECTYPE (byte 0) = 0, no security.
pub const TCP_SECTYPE_NONE: u8 = 0;

/// Copies ASCII into a TRADDR/TRSVCID field, space-padded as SPDK does
/// (nvme-cli trims trailing spaces and NULs alike).
fn put_addr(dst: &mut [u8], s: &str) {
    dst.fill(b' ');
    let n = s.len().min(dst.len());
    dst[..n].copy_from_slice(&s.as_bytes()[..n]);
}

/// The Discovery Log Page (log 0x70) as seen by `hostnqn`: one entry per
/// (subsystem the host may see, port of that subsystem). Entry: TRTYPE=3
/// (TCP), ADRFAM 1/2, SUBTYPE=2 (NVMe subsystem), TREQ = secure channel not
/// required, PORTID, CNTLID=0xFFFF, ASQSZ=32, TRSVCID, TRADDR, SUBNQN, TSAS
/// (SECTYPE none). GENCTR changes whenever the set of entries changes.
pub fn discovery_log(cfg: &TargetConfig, hostnqn: &str, genctr: u64) -> Vec<u8> {
    let mut entries: Vec<[u8; DISC_LOG_ENTRY_SIZE]> = Vec::new();
    for sub in cfg.subsystems.iter().filter(|s| s.host_allowed(hostnqn)) {
        for port in sub.ports.iter().filter_map(|&id| cfg.port(id)) {
            let mut e = [0u8; DISC_LOG_ENTRY_SIZE];
            e[0] = TRTYPE_TCP;
            e[1] = if port.adrfam_ipv6 {
                ADRFAM_IPV6
            } else {
                ADRFAM_IPV4
            };
            e[2] = SUBTYPE_NVME;
            e[3] = TREQ_SECURE_CHANNEL_NOT_REQUIRED;
            e[4..6].copy_from_slice(&port.id.to_le_bytes());
            e[6..8].copy_from_slice(&CNTLID_DYNAMIC.to_le_bytes());
            e[8..10].copy_from_slice(&ASQSZ.to_le_bytes());
            put_addr(&mut e[32..64], &port.trsvcid);
            put_nqn(&mut e[256..512], &sub.nqn);
            put_addr(&mut e[512..768], &port.traddr);
            e[768] = TCP_SECTYPE_NONE;
            entries.push(e);
        }
    }
    let mut b = Vec::with_capacity(DISC_LOG_HEADER_SIZE + entries.len() * DISC_LOG_ENTRY_SIZE);
    b.extend_from_slice(&genctr.to_le_bytes());
    b.extend_from_slice(&(entries.len() as u64).to_le_bytes());
    // RECFMT = 0.
    b.resize(DISC_LOG_HEADER_SIZE, 0);
    for e in &entries {
        b.extend_from_slice(e);
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::subsystem::{PortConfig, SubsystemConfig};
    use std::collections::BTreeMap;

    fn port(id: u16, addr: &str, v6: bool) -> PortConfig {
        PortConfig {
            id,
            traddr: addr.into(),
            trsvcid: "4420".into(),
            adrfam_ipv6: v6,
            ana: BTreeMap::new(),
        }
    }

    fn sub(nqn: &str, any: bool, hosts: &[&str], ports: &[u16]) -> SubsystemConfig {
        SubsystemConfig {
            nqn: nqn.into(),
            serial: "s".into(),
            model: "m".into(),
            allow_any_host: any,
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
            namespaces: vec![],
            ports: ports.to_vec(),
        }
    }

    fn cfg() -> TargetConfig {
        TargetConfig {
            subsystems: vec![
                sub("nqn.a", true, &[], &[1, 2]),
                sub("nqn.b", false, &["nqn.host1"], &[2]),
                sub("nqn.c", false, &["nqn.host2"], &[1]),
                // Port 9 does not exist: no entry.
                sub("nqn.d", true, &[], &[9]),
            ],
            ports: vec![port(1, "10.0.0.1", false), port(2, "fe80::1", true)],
        }
    }

    fn entry(b: &[u8], i: usize) -> &[u8] {
        &b[DISC_LOG_HEADER_SIZE + i * DISC_LOG_ENTRY_SIZE..][..DISC_LOG_ENTRY_SIZE]
    }

    fn nqn_of(e: &[u8]) -> String {
        let f = &e[256..512];
        let end = f.iter().position(|&c| c == 0).unwrap();
        String::from_utf8(f[..end].to_vec()).unwrap()
    }

    #[test]
    fn entries_are_filtered_by_host_and_list_every_port() {
        let b = discovery_log(&cfg(), "nqn.host1", 7);
        assert_eq!(u64::from_le_bytes(b[0..8].try_into().unwrap()), 7);
        assert_eq!(u64::from_le_bytes(b[8..16].try_into().unwrap()), 3);
        assert_eq!(b.len(), 1024 * 4);
        let got: Vec<(String, u16)> = (0..3)
            .map(|i| {
                let e = entry(&b, i);
                (nqn_of(e), u16::from_le_bytes([e[4], e[5]]))
            })
            .collect();
        assert_eq!(
            got,
            vec![
                ("nqn.a".into(), 1),
                ("nqn.a".into(), 2),
                ("nqn.b".into(), 2)
            ]
        );
        let b = discovery_log(&cfg(), "nqn.host2", 7);
        assert_eq!(u64::from_le_bytes(b[8..16].try_into().unwrap()), 3);
        assert_eq!(nqn_of(entry(&b, 2)), "nqn.c");
        let b = discovery_log(&cfg(), "nqn.other", 7);
        assert_eq!(u64::from_le_bytes(b[8..16].try_into().unwrap()), 2);
    }

    #[test]
    fn entry_fields() {
        let b = discovery_log(&cfg(), "nqn.host1", 1);
        let e = entry(&b, 1);
        assert_eq!(e[0], TRTYPE_TCP);
        assert_eq!(e[1], ADRFAM_IPV6);
        assert_eq!(e[2], SUBTYPE_NVME);
        assert_eq!(e[3], 0x02);
        assert_eq!(u16::from_le_bytes([e[6], e[7]]), 0xFFFF);
        assert_eq!(u16::from_le_bytes([e[8], e[9]]), 32);
        assert_eq!(&e[32..36], b"4420");
        assert_eq!(e[36], b' ');
        assert_eq!(&e[512..519], b"fe80::1");
        assert_eq!(e[768], 0);
        assert_eq!(entry(&b, 0)[1], ADRFAM_IPV4);
    }
}
