//! Per-block crc32c tables, the integrity checksums of storage-unit records.
//!
//! Design: a storage unit stores a crc32c for every 4 KiB block it writes and
//! verifies each block it reads. Computing those one Python call per block
//! costs more than the checksum itself, so a whole extent goes through one
//! call here: [`crc32c_blocks`] builds the table (little-endian `u32` per
//! block, the on-disk layout) and [`first_mismatch`] checks an extent against
//! a stored table. The checksum is CRC-32C (Castagnoli) as computed by the
//! `crc32c` crate (SSE 4.2 / ARMv8 CRC instructions where present).

use displaydoc::Display;

/// Why a block checksum call was refused.
#[derive(Debug, Display, Clone, PartialEq, Eq)]
pub enum BlockCrcError {
    /// block size {0} is not a positive multiple of 512
    BadBlockSize(usize),
    /// data of {len} bytes is not a whole number of {block}-byte blocks
    PartialBlock {
        /// Bytes given.
        len: usize,
        /// Block size.
        block: usize,
    },
    /// table of {table} bytes does not hold one 4-byte checksum for each of {blocks} blocks
    TableLength {
        /// Bytes in the table.
        table: usize,
        /// Blocks in the data.
        blocks: usize,
    },
}

impl std::error::Error for BlockCrcError {}

fn check(len: usize, block: usize) -> Result<usize, BlockCrcError> {
    if block == 0 || block % 512 != 0 {
        return Err(BlockCrcError::BadBlockSize(block));
    }
    if len % block != 0 {
        return Err(BlockCrcError::PartialBlock { len, block });
    }
    Ok(len / block)
}

/// CRC-32C of `data` continued from `seed` (0 for a fresh checksum).
pub fn crc32c(data: &[u8], seed: u32) -> u32 {
    crc32c::crc32c_append(seed, data)
}

/// The table of CRC-32C values of each `block`-byte block of `data`, as
/// little-endian `u32`s appended to `out`.
pub fn crc32c_blocks(data: &[u8], block: usize, out: &mut Vec<u8>) -> Result<(), BlockCrcError> {
    let count = check(data.len(), block)?;
    out.reserve(4 * count);
    for chunk in data.chunks_exact(block) {
        out.extend_from_slice(&crc32c::crc32c(chunk).to_le_bytes());
    }
    Ok(())
}

/// Index of the first block of `data` whose CRC-32C differs from its entry
/// in `table` (as built by [`crc32c_blocks`]), or `None` when all agree.
pub fn first_mismatch(
    data: &[u8],
    table: &[u8],
    block: usize,
) -> Result<Option<usize>, BlockCrcError> {
    let count = check(data.len(), block)?;
    if table.len() != 4 * count {
        return Err(BlockCrcError::TableLength {
            table: table.len(),
            blocks: count,
        });
    }
    Ok(data
        .chunks_exact(block)
        .zip(table.chunks_exact(4))
        .position(|(chunk, want)| crc32c::crc32c(chunk).to_le_bytes() != want))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bitwise CRC-32C, the definition the fast crate must match.
    fn crc32c_bitwise(data: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &byte in data {
            crc ^= u32::from(byte);
            for _ in 0..8 {
                crc = if crc & 1 == 1 {
                    (crc >> 1) ^ 0x82F6_3B78
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }

    #[test]
    fn known_vector() {
        // RFC 3720 (iSCSI) check value.
        assert_eq!(crc32c(b"123456789", 0), 0xE306_9283);
        assert_eq!(crc32c_bitwise(b"123456789"), 0xE306_9283);
    }

    #[test]
    fn table_matches_bitwise_and_detects_flips() {
        let data: Vec<u8> = (0..3 * 4096u32).map(|i| (i * 7 + i / 13) as u8).collect();
        let mut table = Vec::new();
        assert_eq!(crc32c_blocks(&data, 4096, &mut table), Ok(()));
        for (i, want) in table.chunks_exact(4).enumerate() {
            let got = crc32c_bitwise(&data[i * 4096..(i + 1) * 4096]);
            assert_eq!(want, got.to_le_bytes());
        }
        assert_eq!(first_mismatch(&data, &table, 4096), Ok(None));
        let mut bad = data.clone();
        bad[2 * 4096 + 17] ^= 0x10;
        assert_eq!(first_mismatch(&bad, &table, 4096), Ok(Some(2)));
    }

    #[test]
    fn refusals() {
        let mut out = Vec::new();
        assert_eq!(
            crc32c_blocks(&[0; 100], 4096, &mut out),
            Err(BlockCrcError::PartialBlock {
                len: 100,
                block: 4096
            })
        );
        assert_eq!(
            crc32c_blocks(&[], 0, &mut out),
            Err(BlockCrcError::BadBlockSize(0))
        );
        assert_eq!(
            first_mismatch(&[0; 4096], &[0; 3], 4096),
            Err(BlockCrcError::TableLength {
                table: 3,
                blocks: 1
            })
        );
        assert!(crc32c_blocks(&[], 4096, &mut out).is_ok());
        assert!(out.is_empty());
    }
}
