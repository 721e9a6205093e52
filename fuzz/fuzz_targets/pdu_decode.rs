#![no_main]

use libfuzzer_sys::fuzz_target;
use strata_target::pdu::{DIGEST_LEN, DecodeConfig, Role, parse_header};

// Every receive state the codec can be in: both roles, before and after IC
// exchange, each digest combination, and a zero data limit.
fn configs() -> Vec<DecodeConfig> {
    let mut v = Vec::new();
    for role in [Role::Target, Role::Host] {
        v.push(DecodeConfig::initial(role));
        for hdgst in [false, true] {
            for ddgst in [false, true] {
                for max_data in [0, 8192, u32::MAX] {
                    v.push(DecodeConfig::established(role, hdgst, ddgst, max_data));
                }
            }
        }
    }
    v
}

fuzz_target!(|data: &[u8]| {
    for cfg in configs() {
        if let Ok(Some(p)) = parse_header(data, &cfg) {
            let dd = if p.has_ddgst { DIGEST_LEN } else { 0 };
            assert_eq!(p.data_offset + p.data_len + dd, p.plen);
            assert!(p.data_len as u64 <= u64::from(cfg.max_data) || p.data_len <= 128);
        }
    }
});
