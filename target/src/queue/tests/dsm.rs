//! Dataset Management and Write Zeroes limits.

use super::*;

#[test]
fn deallocate_and_write_zeroes_beyond_the_advertised_limits_are_refused() {
    let t = target_sized(AnaState::Optimized, false, 256 << 20);
    let (_admin, mut io) = bring_up(&t, false);
    let lim = crate::spec::identify::NvmLimits::TARGET;
    let dsm = |ranges: &[(u64, u32)]| {
        let mut c = NvmeCmd::default();
        c.set_opcode(io_opc::DATASET_MANAGEMENT);
        c.set_nsid(1);
        c.set_cdw(10, ranges.len() as u32 - 1);
        c.set_cdw(11, 1 << 2);
        let mut d = Vec::new();
        for &(slba, len) in ranges {
            d.extend_from_slice(&0u32.to_le_bytes());
            d.extend_from_slice(&len.to_le_bytes());
            d.extend_from_slice(&slba.to_le_bytes());
        }
        c.set_sgl(SglDescriptor {
            addr: 0,
            len: d.len() as u32,
            id: SGL_ID_DATA_BLOCK_OFFSET,
        });
        (c, d)
    };
    let (c, d) = dsm(&[(0, lim.dmrsl)]);
    assert!(io.cpl(c, &d).status.is_success());
    let (c, d) = dsm(&[(0, lim.dmrsl + 1)]);
    assert_eq!(io.cpl(c, &d).status, Status::INVALID_FIELD.dnr());
    let half = lim.dmrsl / 2;
    let (c, d) = dsm(&[
        (0, half),
        (u64::from(half), half),
        (u64::from(lim.dmrsl), 1),
    ]);
    assert_eq!(
        io.cpl(c, &d).status,
        Status::INVALID_FIELD.dnr(),
        "DMSL over all ranges"
    );
    let mut wz = io_cmd(io_opc::WRITE_ZEROES, 0, 1, false);
    wz.set_cdw(12, 0xffff); // 65536 blocks of 512 B = 32 MiB: at the limit
    assert!(io.cpl(wz, &[]).status.is_success());
}
