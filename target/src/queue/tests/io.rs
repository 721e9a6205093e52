//! The I/O path: reads and writes through a RAM bdev, device errors, ANA, allocation-free steady state.

use super::*;

#[test]
fn read_write_in_capsule_and_r2t_with_and_without_digests() {
    for digests in [false, true] {
        let t = target_with(AnaState::Optimized);
        let (_admin, mut io) = bring_up(&t, digests);
        let small = pattern(4096, 1);
        assert!(write(&mut io, 8, &small).status.is_success());
        let (c, d) = read(&mut io, 8, 8);
        assert!(c.status.is_success());
        assert_eq!(d, small);

        let big = pattern(1 << 20, 2);
        assert!(write(&mut io, 4096, &big).status.is_success());
        let (c, d) = read(&mut io, 4096, 2048);
        assert!(c.status.is_success());
        assert!(d == big, "1 MiB read back differs");

        // Flush, Write Zeroes and Deallocate.
        let mut f = NvmeCmd::default();
        f.set_opcode(io_opc::FLUSH);
        f.set_nsid(1);
        assert!(io.cpl(f, &[]).status.is_success());
        assert!(
            io.cpl(io_cmd(io_opc::WRITE_ZEROES, 8, 4, false), &[])
                .status
                .is_success()
        );
        let (_, d) = read(&mut io, 8, 8);
        assert!(d[..2048].iter().all(|&b| b == 0));
        assert_eq!(&d[2048..], &small[2048..]);

        let mut dsm = io_cmd(io_opc::DATASET_MANAGEMENT, 0, 1, false);
        dsm.set_cdw(10, 0); // one range
        dsm.set_cdw(11, 1 << 2); // AD
        dsm.set_cdw(12, 0);
        let mut range = [0u8; 16];
        range[4..8].copy_from_slice(&2048u32.to_le_bytes());
        range[8..16].copy_from_slice(&4096u64.to_le_bytes());
        dsm.set_sgl(SglDescriptor {
            addr: 0,
            len: 16,
            id: SGL_ID_DATA_BLOCK_OFFSET,
        });
        assert!(io.cpl(dsm, &range).status.is_success());
        let (_, d) = read(&mut io, 4096, 2048);
        assert!(
            d.iter().all(|&b| b == 0),
            "deallocated blocks read as zeros"
        );
        assert!(io.qp.close_reason().is_none());
    }
}

#[test]
fn steady_state_io_allocates_no_buffers() {
    let t = target_with(AnaState::Optimized);
    let (_admin, mut io) = bring_up(&t, false);
    let data = pattern(4096, 3);
    for i in 0..16 {
        write(&mut io, i * 8, &data);
        read(&mut io, i * 8, 8);
    }
    let warm = io.qp.buffer_allocations();
    for i in 0..500 {
        write(&mut io, (i % 64) * 8, &data);
        read(&mut io, (i % 64) * 8, 8);
    }
    assert_eq!(io.qp.buffer_allocations(), warm);
}

#[test]
fn io_errors_return_the_specified_status() {
    let t = target_with(AnaState::Optimized);
    let (_a, mut io) = bring_up(&t, false);
    // Beyond the namespace.
    let (c, _) = read(&mut io, (64 << 20) / 512 - 4, 8);
    assert_eq!(c.status, Status::LBA_OUT_OF_RANGE.dnr());
    // Beyond MDTS (2 MiB read).
    let c = io.capsule(io_cmd(io_opc::READ, 0, 4096, true), &[]);
    let Some(Rsp::Cpl(c)) = c.last() else {
        panic!()
    };
    assert_eq!(c.status, Status::INVALID_FIELD.dnr());
    // Unknown namespace.
    let mut cmd = io_cmd(io_opc::READ, 0, 8, true);
    cmd.set_nsid(9);
    assert_eq!(io.cpl(cmd, &[]).status, Status::INVALID_NAMESPACE.dnr());
    // SGL length that does not match NLB.
    let mut cmd = io_cmd(io_opc::READ, 0, 8, true);
    cmd.set_sgl(SglDescriptor {
        addr: 0,
        len: 512,
        id: SGL_ID_TRANSPORT_DATA_BLOCK,
    });
    assert_eq!(
        io.cpl(cmd, &[]).status,
        Status::DATA_SGL_LENGTH_INVALID.dnr()
    );
    // An admin command on an I/O queue.
    let mut cmd = NvmeCmd::default();
    cmd.set_opcode(admin_opc::IDENTIFY);
    assert_eq!(io.cpl(cmd, &[]).status, Status::INVALID_OPCODE.dnr());
    // A second Connect on an established queue.
    assert_eq!(
        io.connect(1, 1, NQN, HOST).status,
        Status::COMMAND_SEQUENCE_ERROR.dnr()
    );
    // Unknown I/O opcode.
    assert_eq!(
        io.cpl(io_cmd(0x7e, 0, 1, true), &[]).status,
        Status::INVALID_OPCODE.dnr()
    );
    assert!(
        io.qp.close_reason().is_none(),
        "command errors keep the connection"
    );
}

#[test]
fn inaccessible_path_fails_io_with_ana_status() {
    let t = target_with(AnaState::Optimized);
    let (_a, mut io) = bring_up(&t, false);
    let (c, _) = read(&mut io, 0, 8);
    assert!(c.status.is_success());
    t.set_ana_state(1, 1, AnaState::Inaccessible);
    let (c, _) = read(&mut io, 0, 8);
    assert_eq!(c.status, Status::ANA_INACCESSIBLE);
    t.set_ana_state(1, 1, AnaState::Optimized);
    let (c, _) = read(&mut io, 0, 8);
    assert!(c.status.is_success());
}
