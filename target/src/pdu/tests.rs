use super::*;
use crate::spec::{Status, io_opc};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

const FES_IHF: FatalErrorStatus = FatalErrorStatus::InvalidHeaderField;

fn target(hdgst: bool, ddgst: bool) -> DecodeConfig {
    DecodeConfig::established(Role::Target, hdgst, ddgst, 128 * 1024)
}

fn host(hdgst: bool, ddgst: bool) -> DecodeConfig {
    DecodeConfig::established(Role::Host, hdgst, ddgst, u32::MAX)
}

fn parse(buf: &[u8], cfg: &DecodeConfig) -> Parsed {
    parse_header(buf, cfg)
        .expect("valid PDU")
        .expect("complete header")
}

fn err(buf: &[u8], cfg: &DecodeConfig) -> PduError {
    parse_header(buf, cfg).expect_err("must be rejected")
}

fn ihf(fei: u32) -> PduError {
    PduError::new(FES_IHF, fei)
}

/// Recomputes the header digest after a test edits a header field.
fn reseal(b: &mut [u8], hlen: usize) {
    let crc = crc32c(&b[..hlen]);
    b[hlen..hlen + 4].copy_from_slice(&crc.to_le_bytes());
}

fn sample_cmd() -> NvmeCmd {
    let mut c = NvmeCmd::default();
    c.set_opcode(io_opc::WRITE);
    c.set_cid(0x1234);
    c.set_nsid(1);
    c.set_cdw(10, 0xdead_beef);
    c.set_cdw(12, 7);
    c
}

fn sample_c2h() -> C2HData {
    C2HData {
        cccid: 9,
        datao: 4096,
        datal: 8192,
        last: true,
        success: false,
    }
}

/// Every header prefix shorter than what the parser needs is Ok(None), and
/// none of them is mistaken for an error.
fn assert_truncations_wait(buf: &[u8], need: usize, cfg: &DecodeConfig) {
    for n in 0..need {
        assert_eq!(parse_header(&buf[..n], cfg), Ok(None), "prefix {n}");
    }
}

#[test]
fn crc32c_known_answer() {
    assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    assert_eq!(crc32c_append(crc32c(b"1234"), b"56789"), 0xE306_9283);
    assert_eq!(crc32c(b""), 0);
}

#[test]
fn icreq_roundtrip() {
    for (hdgst, ddgst) in [(false, false), (true, false), (false, true), (true, true)] {
        let r = ICReq {
            pfv: 0,
            hpda: 0,
            hdgst,
            ddgst,
            maxr2t: 3,
        };
        let mut b = Vec::new();
        encode_icreq(&r, &mut b);
        assert_eq!(b.len(), ICREQ_LEN);
        assert_eq!(&b[..8], &[0x00, 0, 128, 0, 128, 0, 0, 0]);
        let p = parse(&b, &DecodeConfig::initial(Role::Target));
        assert_eq!(p.header, PduHeader::ICReq(r));
        assert_eq!((p.data_offset, p.data_len, p.plen), (128, 0, 128));
        assert!(!p.has_ddgst);
        assert_truncations_wait(&b, ICREQ_LEN, &DecodeConfig::initial(Role::Target));
    }
}

#[test]
fn icresp_roundtrip_and_linux_checks() {
    let req = ICReq {
        pfv: 0,
        hpda: 0,
        hdgst: true,
        ddgst: false,
        maxr2t: 0,
    };
    let r = ICResp {
        pfv: 0,
        cpda: 0,
        hdgst: true,
        ddgst: false,
        maxh2cdata: 128 * 1024,
    };
    let mut b = Vec::new();
    encode_icresp(&r, &mut b);
    assert_eq!(b[11], DGST_HDGST_ENABLE);
    let p = parse(&b, &DecodeConfig::initial(Role::Host));
    assert_eq!(p.header, PduHeader::ICResp(r));
    assert_eq!(validate_icresp(&req, &r), Ok(()));

    let bad = [
        ICResp { pfv: 1, ..r },
        ICResp { hdgst: false, ..r },
        ICResp { ddgst: true, ..r },
        ICResp { cpda: 1, ..r },
        ICResp {
            maxh2cdata: 4094,
            ..r
        },
        ICResp {
            maxh2cdata: 4097,
            ..r
        },
    ];
    for resp in bad {
        assert!(validate_icresp(&req, &resp).is_err(), "{resp:?}");
    }
    assert_eq!(
        validate_icresp(
            &req,
            &ICResp {
                maxh2cdata: 4096,
                ..r
            }
        ),
        Ok(())
    );
}

#[test]
fn validate_icreq_rejects_unsupported_parameters() {
    let ok = ICReq {
        pfv: 0,
        hpda: 0,
        hdgst: false,
        ddgst: false,
        maxr2t: 0,
    };
    assert_eq!(validate_icreq(&ok), Ok(()));
    let e = |fei| PduError::new(FatalErrorStatus::UnsupportedParameter, fei);
    assert_eq!(validate_icreq(&ICReq { pfv: 1, ..ok }), Err(e(8)));
    assert_eq!(validate_icreq(&ICReq { hpda: 2, ..ok }), Err(e(10)));
}

#[test]
fn capsule_cmd_roundtrip() {
    let cmd = sample_cmd();
    for hdgst in [false, true] {
        for ddgst in [false, true] {
            let cfg = target(hdgst, ddgst);
            let hd = if hdgst { 4 } else { 0 };

            // No in-capsule data: PDO 0, never DDGSTF.
            let mut b = Vec::new();
            encode_capsule_cmd(&cmd, 0, hdgst, ddgst, &mut b);
            assert_eq!(b.len(), 72 + hd);
            assert_eq!(b[3], 0);
            let p = parse(&b, &cfg);
            assert_eq!(p.header, PduHeader::CapsuleCmd(cmd));
            assert_eq!((p.data_offset, p.data_len, p.plen), (72 + hd, 0, 72 + hd));
            assert!(!p.has_ddgst);
            assert_truncations_wait(&b, 72 + hd, &cfg);

            // 1 KiB in-capsule data (Fabrics Connect).
            let mut b = Vec::new();
            encode_capsule_cmd(&cmd, 1024, hdgst, ddgst, &mut b);
            assert_eq!(b.len(), 72 + hd, "data is not written by the encoder");
            let p = parse(&b, &cfg);
            let dd = if ddgst { 4 } else { 0 };
            assert_eq!(p.header, PduHeader::CapsuleCmd(cmd));
            assert_eq!(p.data_offset, 72 + hd);
            assert_eq!(p.data_len, 1024);
            assert_eq!(p.plen, 72 + hd + 1024 + dd);
            assert_eq!(p.has_ddgst, ddgst);
            assert_eq!(b[1] & FLAG_DDGSTF != 0, ddgst);
            assert_eq!(b[1] & FLAG_HDGSTF != 0, hdgst);
        }
    }
}

#[test]
fn capsule_resp_roundtrip() {
    let cpl = NvmeCpl {
        dw0: 1,
        dw1: 2,
        sqhd: 3,
        sqid: 4,
        cid: 0x1234,
        status: Status::INVALID_FIELD.dnr(),
    };
    for hdgst in [false, true] {
        for ddgst in [false, true] {
            let mut b = Vec::new();
            encode_capsule_resp(&cpl, hdgst, &mut b);
            let hd = if hdgst { 4 } else { 0 };
            let p = parse(&b, &host(hdgst, ddgst));
            assert_eq!(p.header, PduHeader::CapsuleResp(cpl));
            assert_eq!((p.data_offset, p.data_len, p.plen), (24 + hd, 0, 24 + hd));
            assert!(!p.has_ddgst);
        }
    }
}

#[test]
fn h2c_data_roundtrip() {
    let h = H2CData {
        cccid: 0x42,
        ttag: 7,
        datao: 65536,
        datal: 32768,
        last: true,
    };
    for hdgst in [false, true] {
        for ddgst in [false, true] {
            for last in [false, true] {
                let h = H2CData { last, ..h };
                let mut b = Vec::new();
                encode_h2c_data(&h, hdgst, ddgst, &mut b);
                let hd = if hdgst { 4 } else { 0 };
                let dd = if ddgst { 4 } else { 0 };
                let p = parse(&b, &target(hdgst, ddgst));
                assert_eq!(p.header, PduHeader::H2CData(h));
                assert_eq!(p.data_offset, 24 + hd);
                assert_eq!(p.data_len, 32768);
                assert_eq!(p.plen, 24 + hd + 32768 + dd);
                assert_eq!(p.has_ddgst, ddgst);
            }
        }
    }
}

#[test]
fn c2h_data_roundtrip() {
    for hdgst in [false, true] {
        for ddgst in [false, true] {
            for (last, success) in [(false, false), (true, false), (true, true)] {
                let h = C2HData {
                    last,
                    success,
                    ..sample_c2h()
                };
                let mut b = Vec::new();
                encode_c2h_data(&h, hdgst, ddgst, &mut b);
                let hd = if hdgst { 4 } else { 0 };
                let p = parse(&b, &host(hdgst, ddgst));
                assert_eq!(p.header, PduHeader::C2HData(h));
                assert_eq!(p.data_offset, 24 + hd);
                assert_eq!(p.data_len, 8192);
                assert_eq!(p.has_ddgst, ddgst);
                assert_truncations_wait(&b, 24 + hd, &host(hdgst, ddgst));
            }
        }
    }
}

#[test]
fn r2t_roundtrip() {
    let r = R2T {
        cccid: 0xabcd,
        ttag: 0x55,
        r2to: 4096,
        r2tl: 131072,
    };
    for hdgst in [false, true] {
        for ddgst in [false, true] {
            let mut b = Vec::new();
            encode_r2t(&r, hdgst, &mut b);
            let hd = if hdgst { 4 } else { 0 };
            let p = parse(&b, &host(hdgst, ddgst));
            assert_eq!(p.header, PduHeader::R2T(r));
            assert_eq!((p.data_offset, p.data_len, p.plen), (24 + hd, 0, 24 + hd));
        }
    }
}

#[test]
fn term_req_roundtrip_ignores_negotiated_digests() {
    let mut offending = Vec::new();
    encode_icreq(
        &ICReq {
            pfv: 1,
            hpda: 0,
            hdgst: false,
            ddgst: false,
            maxr2t: 0,
        },
        &mut offending,
    );
    let t = TermReq {
        fes: FatalErrorStatus::UnsupportedParameter,
        fei: 8,
        hdr: offending.clone(),
    };
    let mut b = Vec::new();
    encode_term_req(PduType::C2HTermReq, &t, &mut b);
    assert_eq!(b.len(), 24 + 128, "a whole ICReq fits");
    // Before IC (a rejected ICReq) and after, with any digest setting.
    for cfg in [
        DecodeConfig::initial(Role::Host),
        host(true, true),
        host(false, false),
    ] {
        let p = parse(&b, &cfg);
        assert_eq!(p.header, PduHeader::C2HTermReq(t.clone()));
        assert_eq!((p.data_offset, p.data_len, p.plen), (24, 128, 152));
        assert!(!p.has_ddgst);
        // A TermReq is returned only once complete.
        assert_truncations_wait(&b, b.len(), &cfg);
    }

    // Oversized header copies are truncated, not rejected.
    let t = TermReq {
        fes: FatalErrorStatus::HeaderDigestError,
        fei: 0x1234_5678,
        hdr: vec![0xaa; 300],
    };
    let mut b = Vec::new();
    encode_term_req(PduType::H2CTermReq, &t, &mut b);
    let p = parse(&b, &target(true, true));
    let PduHeader::H2CTermReq(got) = p.header else {
        panic!("wrong type");
    };
    assert_eq!(got.fes, t.fes);
    assert_eq!(got.fei, t.fei);
    assert_eq!(got.hdr, vec![0xaa; MAX_TERM_REQ_DATA]);
}

#[test]
fn encoders_append() {
    let mut b = vec![0xff; 3];
    encode_r2t(
        &R2T {
            cccid: 1,
            ttag: 2,
            r2to: 0,
            r2tl: 512,
        },
        true,
        &mut b,
    );
    encode_ddgst(0x0102_0304, &mut b);
    assert_eq!(b.len(), 3 + 28 + 4);
    assert_eq!(&b[31..], &[4, 3, 2, 1]);
    assert!(parse_header(&b[3..], &host(true, false)).unwrap().is_some());
}

#[test]
fn wire_layout_matches_spec_offsets() {
    let mut b = Vec::new();
    encode_h2c_data(
        &H2CData {
            cccid: 0x0102,
            ttag: 0x0304,
            datao: 0x0506_0708,
            datal: 0x10,
            last: true,
        },
        true,
        true,
        &mut b,
    );
    assert_eq!(b[0], 0x06);
    assert_eq!(b[1], FLAG_HDGSTF | FLAG_DDGSTF | FLAG_LAST_PDU);
    assert_eq!(b[2], 24);
    assert_eq!(b[3], 28);
    assert_eq!(le32(&b, 4), 24 + 4 + 0x10 + 4);
    assert_eq!(le16(&b, 8), 0x0102);
    assert_eq!(le16(&b, 10), 0x0304);
    assert_eq!(le32(&b, 12), 0x0506_0708);
    assert_eq!(le32(&b, 16), 0x10);
    assert_eq!(&b[20..24], &[0; 4]);
    assert_eq!(le32(&b, 24), crc32c(&b[..24]));

    let mut b = Vec::new();
    encode_term_req(
        PduType::C2HTermReq,
        &TermReq {
            fes: FatalErrorStatus::DataOutOfRange,
            fei: 0xa0b0_c0d0,
            hdr: vec![1, 2],
        },
        &mut b,
    );
    assert_eq!(&b[..8], &[0x03, 0, 24, 0, 26, 0, 0, 0]);
    assert_eq!(le16(&b, 8), 4);
    assert_eq!(le32(&b, 10), 0xa0b0_c0d0);
    assert_eq!(&b[14..24], &[0; 10]);
    assert_eq!(&b[24..], &[1, 2]);
}

#[test]
fn unknown_type_is_invalid_header_field_at_type() {
    for ty in [0x08u8, 0x0a, 0x0b, 0x10, 0x7f, 0xff] {
        let mut b = vec![0u8; 128];
        b[0] = ty;
        b[2] = 24;
        b[4] = 24;
        for cfg in [target(false, false), host(true, true)] {
            assert_eq!(err(&b, &cfg), ihf(0));
        }
    }
}

#[test]
fn wrong_direction_is_invalid_header_field_at_type() {
    let mut c2h = Vec::new();
    encode_c2h_data(&sample_c2h(), false, false, &mut c2h);
    assert_eq!(err(&c2h, &target(false, false)), ihf(0));

    let mut r2t = Vec::new();
    encode_r2t(
        &R2T {
            cccid: 0,
            ttag: 0,
            r2to: 0,
            r2tl: 1,
        },
        false,
        &mut r2t,
    );
    assert_eq!(err(&r2t, &target(false, false)), ihf(0));

    let mut cmd = Vec::new();
    encode_capsule_cmd(&sample_cmd(), 0, false, false, &mut cmd);
    assert_eq!(err(&cmd, &host(false, false)), ihf(0));

    let mut icreq = Vec::new();
    encode_icreq(
        &ICReq {
            pfv: 0,
            hpda: 0,
            hdgst: false,
            ddgst: false,
            maxr2t: 0,
        },
        &mut icreq,
    );
    assert_eq!(err(&icreq, &DecodeConfig::initial(Role::Host)), ihf(0));
}

#[test]
fn ic_sequence_errors() {
    let seq = PduError::new(FatalErrorStatus::PduSequenceError, 0);
    let mut cmd = Vec::new();
    encode_capsule_cmd(&sample_cmd(), 0, false, false, &mut cmd);
    assert_eq!(err(&cmd, &DecodeConfig::initial(Role::Target)), seq);

    let mut icreq = Vec::new();
    encode_icreq(
        &ICReq {
            pfv: 0,
            hpda: 0,
            hdgst: false,
            ddgst: false,
            maxr2t: 0,
        },
        &mut icreq,
    );
    assert_eq!(err(&icreq, &target(false, false)), seq);
    // The sequence error is known from the common header alone.
    assert_eq!(parse_header(&icreq[..8], &target(false, false)), Err(seq));

    let mut resp = Vec::new();
    encode_capsule_resp(&NvmeCpl::success(1), false, &mut resp);
    assert_eq!(err(&resp, &DecodeConfig::initial(Role::Host)), seq);
    let mut icresp = Vec::new();
    encode_icresp(
        &ICResp {
            pfv: 0,
            cpda: 0,
            hdgst: false,
            ddgst: false,
            maxh2cdata: 4096,
        },
        &mut icresp,
    );
    assert_eq!(err(&icresp, &host(false, false)), seq);
}

#[test]
fn wrong_hlen() {
    let mut b = Vec::new();
    encode_capsule_cmd(&sample_cmd(), 0, false, false, &mut b);
    b[2] = 24;
    assert_eq!(err(&b, &target(false, false)), ihf(2));

    let mut b = Vec::new();
    encode_icreq(
        &ICReq {
            pfv: 0,
            hpda: 0,
            hdgst: false,
            ddgst: false,
            maxr2t: 0,
        },
        &mut b,
    );
    b[2] = 127;
    assert_eq!(err(&b, &DecodeConfig::initial(Role::Target)), ihf(2));
}

#[test]
fn plen_errors() {
    let mut b = Vec::new();
    encode_capsule_cmd(&sample_cmd(), 0, false, false, &mut b);
    b[4] = 71;
    assert_eq!(err(&b, &target(false, false)), ihf(4));
    b[4..8].copy_from_slice(&0u32.to_le_bytes());
    assert_eq!(err(&b, &target(false, false)), ihf(4));

    // With HDGST negotiated, PLEN must cover the header digest too.
    let mut b = Vec::new();
    encode_capsule_resp(&NvmeCpl::success(1), true, &mut b);
    b[4] = 24;
    assert_eq!(err(&b, &host(true, false)), ihf(4));
    // CapsuleResp and R2T never carry data.
    b[4] = 32;
    assert_eq!(err(&b, &host(true, false)), ihf(4));

    // ICReq must be exactly 128 bytes.
    let mut b = Vec::new();
    encode_icreq(
        &ICReq {
            pfv: 0,
            hpda: 0,
            hdgst: false,
            ddgst: false,
            maxr2t: 0,
        },
        &mut b,
    );
    b[4] = 132;
    assert_eq!(err(&b, &DecodeConfig::initial(Role::Target)), ihf(4));

    // TermReq is at most 152 bytes.
    let mut b = Vec::new();
    encode_term_req(
        PduType::H2CTermReq,
        &TermReq {
            fes: FatalErrorStatus::PduSequenceError,
            fei: 0,
            hdr: vec![],
        },
        &mut b,
    );
    b[4] = 153;
    assert_eq!(err(&b, &target(false, false)), ihf(4));
    b[4] = 23;
    assert_eq!(err(&b, &target(false, false)), ihf(4));

    // DDGSTF with no room for data plus digest.
    let mut b = Vec::new();
    encode_h2c_data(
        &H2CData {
            cccid: 1,
            ttag: 1,
            datao: 0,
            datal: 1,
            last: true,
        },
        false,
        true,
        &mut b,
    );
    b[4..8].copy_from_slice(&(24u32 + 4).to_le_bytes());
    assert_eq!(err(&b, &target(false, true)), ihf(4));
}

#[test]
fn pdo_errors() {
    let cfg = target(true, false);
    let mut good = Vec::new();
    encode_capsule_cmd(&sample_cmd(), 512, true, false, &mut good);
    assert_eq!(good[3], 76);

    for bad_pdo in [0u8, 72, 74, 75] {
        let mut b = good.clone();
        b[3] = bad_pdo;
        assert_eq!(err(&b, &cfg), ihf(3), "pdo {bad_pdo}");
    }
    // PDO at or past PLEN leaves no data.
    let mut b = good.clone();
    b[4..8].copy_from_slice(&80u32.to_le_bytes());
    b[3] = 80;
    assert_eq!(err(&b, &cfg), ihf(3));
    // Padding between header and data is allowed (peer with larger PDA).
    let mut b = good.clone();
    b[3] = 128;
    reseal(&mut b, 72);
    let p = parse(&b, &cfg);
    assert_eq!((p.data_offset, p.data_len), (128, 76 + 512 - 128));

    // PDUs without data must have PDO 0.
    let mut b = Vec::new();
    encode_r2t(
        &R2T {
            cccid: 0,
            ttag: 0,
            r2to: 0,
            r2tl: 1,
        },
        false,
        &mut b,
    );
    b[3] = 24;
    assert_eq!(err(&b, &host(false, false)), ihf(3));

    // Data PDU without data: PDO 0 or right after the header.
    let mut b = Vec::new();
    encode_capsule_cmd(&sample_cmd(), 0, false, false, &mut b);
    b[3] = 72;
    assert_eq!(parse(&b, &target(false, false)).data_len, 0);
    b[3] = 8;
    assert_eq!(err(&b, &target(false, false)), ihf(3));
}

#[test]
fn bad_header_digest_reports_received_digest() {
    let mut b = Vec::new();
    encode_capsule_cmd(&sample_cmd(), 0, true, false, &mut b);
    b[20] ^= 0x40; // corrupt a byte of the SQE
    let received = le32(&b, 72);
    assert_eq!(
        err(&b, &target(true, false)),
        PduError::new(FatalErrorStatus::HeaderDigestError, received)
    );

    let mut b = Vec::new();
    encode_c2h_data(&sample_c2h(), true, true, &mut b);
    b[24] ^= 1; // corrupt the digest itself
    let received = le32(&b, 24);
    assert_eq!(
        err(&b, &host(true, true)),
        PduError::new(FatalErrorStatus::HeaderDigestError, received)
    );
}

#[test]
fn digest_flag_mismatch() {
    // HDGSTF missing although negotiated.
    let mut b = Vec::new();
    encode_capsule_cmd(&sample_cmd(), 0, false, false, &mut b);
    assert_eq!(err(&b, &target(true, false)), ihf(1));
    // HDGSTF set although not negotiated.
    let mut b = Vec::new();
    encode_capsule_cmd(&sample_cmd(), 0, true, false, &mut b);
    assert_eq!(err(&b, &target(false, false)), ihf(1));
    // DDGSTF missing on a PDU with data.
    let mut b = Vec::new();
    encode_c2h_data(&sample_c2h(), false, false, &mut b);
    assert_eq!(err(&b, &host(false, true)), ihf(1));
    // DDGSTF set although not negotiated.
    let mut b = Vec::new();
    encode_c2h_data(&sample_c2h(), false, true, &mut b);
    assert_eq!(err(&b, &host(false, false)), ihf(1));
    // DDGSTF on a PDU without data.
    let mut b = Vec::new();
    encode_capsule_resp(&NvmeCpl::success(1), false, &mut b);
    b[1] |= FLAG_DDGSTF;
    assert_eq!(err(&b, &host(false, true)), ihf(1));
    // IC PDUs never carry digest flags.
    let mut b = Vec::new();
    encode_icreq(
        &ICReq {
            pfv: 0,
            hpda: 0,
            hdgst: true,
            ddgst: true,
            maxr2t: 0,
        },
        &mut b,
    );
    b[1] = FLAG_HDGSTF;
    assert_eq!(err(&b, &DecodeConfig::initial(Role::Target)), ihf(1));
    // SUCCESS without LAST_PDU.
    let mut b = Vec::new();
    encode_c2h_data(
        &C2HData {
            last: false,
            success: true,
            ..sample_c2h()
        },
        false,
        false,
        &mut b,
    );
    assert_eq!(err(&b, &host(false, false)), ihf(1));
}

#[test]
fn data_beyond_max_data() {
    let cfg = DecodeConfig::established(Role::Target, false, true, 8192);
    let limit = PduError::new(FatalErrorStatus::DataLimitExceeded, 0);
    let mut b = Vec::new();
    encode_capsule_cmd(&sample_cmd(), 8192, false, true, &mut b);
    assert_eq!(parse(&b, &cfg).data_len, 8192);
    let mut b = Vec::new();
    encode_capsule_cmd(&sample_cmd(), 8193, false, true, &mut b);
    assert_eq!(err(&b, &cfg), limit);

    let h = H2CData {
        cccid: 1,
        ttag: 1,
        datao: 0,
        datal: 8196,
        last: false,
    };
    let mut b = Vec::new();
    encode_h2c_data(&h, false, true, &mut b);
    assert_eq!(err(&b, &cfg), limit);
}

#[test]
fn datal_must_match_plen() {
    let mut b = Vec::new();
    encode_c2h_data(&sample_c2h(), true, true, &mut b);
    b[16] ^= 1;
    // Re-seal the header digest so DATAL itself is what is wrong.
    reseal(&mut b, 24);
    assert_eq!(err(&b, &host(true, true)), ihf(16));
}

#[test]
fn unknown_fes_in_term_req() {
    let mut b = Vec::new();
    encode_term_req(
        PduType::H2CTermReq,
        &TermReq {
            fes: FatalErrorStatus::InvalidHeaderField,
            fei: 0,
            hdr: vec![],
        },
        &mut b,
    );
    b[8] = 0x77;
    assert_eq!(err(&b, &target(false, false)), ihf(8));
}

#[test]
fn truncated_buffers_wait() {
    for cfg in [target(false, false), target(true, true)] {
        assert_eq!(parse_header(&[], &cfg), Ok(None));
        let mut b = Vec::new();
        encode_h2c_data(
            &H2CData {
                cccid: 1,
                ttag: 2,
                datao: 0,
                datal: 4096,
                last: true,
            },
            cfg.hdgst,
            cfg.ddgst,
            &mut b,
        );
        let need = b.len();
        assert_truncations_wait(&b, need, &cfg);
        // The data itself is not needed.
        assert!(parse_header(&b[..need], &cfg).unwrap().is_some());
    }
}

#[test]
fn random_input_never_panics() {
    let mut rng = StdRng::seed_from_u64(0x5743_5452_4154_4131);
    let cfgs = [
        DecodeConfig::initial(Role::Target),
        DecodeConfig::initial(Role::Host),
        target(false, false),
        target(true, true),
        host(true, false),
        host(false, true),
        DecodeConfig::established(Role::Target, true, true, 0),
    ];
    let mut buf = vec![0u8; 256];
    let mut oks = 0;
    for i in 0..200_000 {
        let len = rng.gen_range(0..buf.len());
        rng.fill_bytes(&mut buf[..len]);
        // Bias towards plausible common headers so deeper paths run too.
        if len >= 8 && i % 2 == 0 {
            buf[0] = [0, 1, 2, 3, 4, 5, 6, 7, 9][rng.gen_range(0..9)];
            buf[1] &= 0x0f;
            buf[2] = PduType::from_u8(buf[0]).map_or(24, |t| t.hlen() as u8);
            buf[3] = [0, 24, 28, 72, 76][rng.gen_range(0..5)];
            let plen = rng.gen_range(0..300u32);
            buf[4..8].copy_from_slice(&plen.to_le_bytes());
        }
        for cfg in &cfgs {
            if let Ok(Some(p)) = parse_header(&buf[..len], cfg) {
                oks += 1;
                let dd = if p.has_ddgst { DIGEST_LEN } else { 0 };
                assert_eq!(p.data_offset + p.data_len + dd, p.plen);
            }
        }
    }
    assert!(oks > 0, "generator never produced a valid PDU");
}
