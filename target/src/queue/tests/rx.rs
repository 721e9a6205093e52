//! Receive path: framing, digests, malformed PDUs, direct reads into command buffers.

use super::*;

#[test]
fn data_digest_error_fails_the_command_not_the_connection() {
    let t = target_with(AnaState::Optimized);
    let (_admin, mut io) = bring_up(&t, true);
    let data = pattern(4096, 4);
    let mut b = Vec::new();
    let mut cmd = io_cmd(io_opc::WRITE, 0, 8, false);
    cmd.set_cid(77);
    pdu::encode_capsule_cmd(&cmd, data.len(), true, true, &mut b);
    b.extend_from_slice(&data);
    pdu::encode_ddgst(pdu::crc32c(&data) ^ 1, &mut b);
    let r = io.send(&b);
    let [Rsp::Cpl(c)] = &r[..] else {
        panic!("{r:?}")
    };
    assert_eq!(c.status, Status::TRANSIENT_TRANSPORT_ERROR);
    assert_eq!(c.cid, 77);
    assert!(io.qp.close_reason().is_none());
    assert!(write(&mut io, 0, &data).status.is_success());
}

#[test]
fn malformed_pdus_end_the_connection_with_termreq() {
    let t = target_with(AnaState::Optimized);
    // A capsule before ICReq.
    let mut h = Host::new(&t);
    let mut b = Vec::new();
    pdu::encode_capsule_cmd(&NvmeCmd::default(), 0, false, false, &mut b);
    let r = h.send(&b);
    expect_term(&r, FatalErrorStatus::PduSequenceError);
    assert!(matches!(h.qp.close_reason(), Some(CloseReason::Fatal(_))));

    // Unknown PDU type after IC.
    let mut h = Host::new(&t);
    h.icreq(false, false);
    let mut bad = vec![0x0e, 0, 8, 0, 8, 0, 0, 0];
    bad.resize(8, 0);
    expect_term(&h.send(&bad), FatalErrorStatus::InvalidHeaderField);

    // Wrong header length for a capsule.
    let mut h = Host::new(&t);
    h.icreq(false, false);
    let mut b = Vec::new();
    pdu::encode_capsule_cmd(&NvmeCmd::default(), 0, false, false, &mut b);
    b[2] = 70;
    expect_term(&h.send(&b), FatalErrorStatus::InvalidHeaderField);

    // Bad header digest.
    let mut h = Host::new(&t);
    h.icreq(true, false);
    let mut b = Vec::new();
    pdu::encode_capsule_cmd(&NvmeCmd::default(), 0, true, false, &mut b);
    b[72] ^= 0xff;
    expect_term(&h.send(&b), FatalErrorStatus::HeaderDigestError);

    // H2CData for a transfer tag that has no R2T.
    let (_a, mut io) = bring_up(&t, false);
    let mut b = Vec::new();
    pdu::encode_h2c_data(
        &pdu::H2CData {
            cccid: 1,
            ttag: 5,
            datao: 0,
            datal: 512,
            last: true,
        },
        false,
        false,
        &mut b,
    );
    b.extend_from_slice(&[0; 512]);
    expect_term(&io.send(&b), FatalErrorStatus::InvalidHeaderField);

    // In-capsule data beyond the in-capsule limit.
    let (_a, mut io) = bring_up(&t, false);
    let big = vec![0u8; ctrlr::IN_CAPSULE_DATA_SIZE as usize + 512];
    let r = io.capsule(
        io_cmd(io_opc::WRITE, 0, (big.len() / 512) as u32, false),
        &big,
    );
    expect_term(&r, FatalErrorStatus::DataLimitExceeded);
}

#[test]
fn large_write_data_can_be_read_straight_into_the_command_buffer() {
    for digests in [false, true] {
        let t = target_with(AnaState::Optimized);
        let (_admin, mut io) = bring_up(&t, digests);
        let data = pattern(1 << 20, 9);
        let r = io.capsule(io_cmd(io_opc::WRITE, 2048, 2048, true), &[]);
        let [Rsp::R2T(r2t)] = &r[..] else {
            panic!("{r:?}")
        };
        let (r2t_cccid, r2t_ttag) = (r2t.cccid, r2t.ttag);
        let mut off = 0;
        let mut direct = 0;
        while off < data.len() {
            let n = (data.len() - off).min(ctrlr::MAXH2CDATA as usize);
            let mut hdr = Vec::new();
            pdu::encode_h2c_data(
                &pdu::H2CData {
                    cccid: r2t_cccid,
                    ttag: r2t_ttag,
                    datao: off as u32,
                    datal: n as u32,
                    last: off + n == data.len(),
                },
                io.hdgst,
                io.ddgst,
                &mut hdr,
            );
            assert_eq!(io.qp.handle_input(&hdr, 0), hdr.len());
            // The "socket" writes the payload into the buffer in odd chunks.
            let mut p = 0;
            while p < n {
                let dst = io.qp.direct_rx().expect("payload goes direct");
                let k = dst.len().min(10_000).min(n - p);
                dst[..k].copy_from_slice(&data[off + p..off + p + k]);
                io.qp.direct_rx_done(k);
                p += k;
                direct += k;
                if n - p < crate::queue::rx::DIRECT_RX_MIN {
                    break;
                }
            }
            let mut tail = data[off + p..off + n].to_vec();
            if io.ddgst {
                pdu::encode_ddgst(pdu::crc32c(&data[off..off + n]), &mut tail);
            }
            assert_eq!(io.qp.handle_input(&tail, 0), tail.len());
            off += n;
        }
        assert!(direct > data.len() / 2);
        let r = io.pump();
        let Some(Rsp::Cpl(c)) = r.last() else {
            panic!("{r:?}")
        };
        assert!(c.status.is_success());
        let (c, back) = read(&mut io, 2048, 2048);
        assert!(c.status.is_success());
        assert!(
            back == data,
            "direct-read write data differs (digests={digests})"
        );
    }
}
