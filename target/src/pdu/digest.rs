//! CRC32C (Castagnoli) as used for NVMe/TCP HDGST and DDGST.
//!
//! NVMe/TCP digests are the standard CRC32C (reflected, init and final XOR
//! 0xFFFF_FFFF), transmitted little-endian. The `crc32c` crate computes exactly
//! that and uses SSE4.2 / ARMv8 CRC instructions when available, which matters
//! because the data digest covers every payload byte.

/// CRC32C of `data`.
#[inline]
pub fn crc32c(data: &[u8]) -> u32 {
    ::crc32c::crc32c(data)
}

/// Continues a CRC32C: `crc32c_append(crc32c(a), b) == crc32c(a ++ b)`.
///
/// Lets the queue layer digest a payload that arrives in several socket reads
/// or lives in several buffers without copying it together first.
#[inline]
pub fn crc32c_append(crc: u32, data: &[u8]) -> u32 {
    ::crc32c::crc32c_append(crc, data)
}
