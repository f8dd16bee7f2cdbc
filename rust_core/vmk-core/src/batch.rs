//! Batch layouts: a buffer and parallel `offsets` / `lengths` arrays that
//! name one item per index, the shape of every batch API (journal lines,
//! frames to classify).
//!
//! Design: one checker and one error type for all of them, so every batch
//! API rejects a bad layout the same way and the Python wrapper maps it in
//! one place. The check runs before any item is processed: a batch is
//! all-or-nothing.

/// Why a batch layout was rejected.
#[derive(Debug, Clone, PartialEq, Eq, displaydoc::Display)]
pub enum BatchLayoutError {
    /// offsets has {offsets} items but lengths has {lengths}, expected the same number of items
    LengthMismatch {
        /// Number of offsets given.
        offsets: usize,
        /// Number of lengths given.
        lengths: usize,
    },
    /// item {index}: offset {offset} + length {length} overflows 64 bits, expected an end of at most {buffer_len} (the buffer length)
    Overflow {
        /// Index of the offending item.
        index: usize,
        /// Its offset.
        offset: u64,
        /// Its length.
        length: u64,
        /// Length of the buffer in bytes.
        buffer_len: usize,
    },
    /// item {index}: offset {offset} + length {length} ends past the buffer, expected an end of at most {buffer_len} (the buffer length)
    OutOfBounds {
        /// Index of the offending item.
        index: usize,
        /// Its offset.
        offset: u64,
        /// Its length.
        length: u64,
        /// Length of the buffer in bytes.
        buffer_len: usize,
    },
}

impl std::error::Error for BatchLayoutError {}

/// Checks that `offsets` and `lengths` pair up and name spans inside a
/// buffer of `buffer_len` bytes; returns the number of items or the first
/// problem found.
pub fn check_layout<T: Copy + Into<u64>>(
    buffer_len: usize,
    offsets: &[T],
    lengths: &[T],
) -> Result<usize, BatchLayoutError> {
    if offsets.len() != lengths.len() {
        return Err(BatchLayoutError::LengthMismatch {
            offsets: offsets.len(),
            lengths: lengths.len(),
        });
    }
    // usize -> u64 is lossless on every supported target (pointer width <= 64).
    let limit = buffer_len as u64;
    for (index, (&offset, &length)) in offsets.iter().zip(lengths).enumerate() {
        let (offset, length) = (offset.into(), length.into());
        match offset.checked_add(length) {
            None => {
                return Err(BatchLayoutError::Overflow {
                    index,
                    offset,
                    length,
                    buffer_len,
                })
            }
            Some(end) if end > limit => {
                return Err(BatchLayoutError::OutOfBounds {
                    index,
                    offset,
                    length,
                    buffer_len,
                })
            }
            Some(_) => {}
        }
    }
    Ok(offsets.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_spans_inside_the_buffer_and_counts_them() {
        assert_eq!(check_layout::<u64>(6, &[0, 2, 6], &[2, 4, 0]), Ok(3));
        assert_eq!(check_layout::<u32>(0, &[], &[]), Ok(0));
    }

    #[test]
    fn names_the_first_bad_item() {
        assert_eq!(
            check_layout::<u32>(6, &[0, 2, 4], &[2, 2, 3]),
            Err(BatchLayoutError::OutOfBounds {
                index: 2,
                offset: 4,
                length: 3,
                buffer_len: 6
            })
        );
        assert_eq!(
            check_layout::<u64>(3, &[0, u64::MAX], &[1, 1]),
            Err(BatchLayoutError::Overflow {
                index: 1,
                offset: u64::MAX,
                length: 1,
                buffer_len: 3
            })
        );
        assert_eq!(
            check_layout::<u64>(3, &[0, 1], &[1]),
            Err(BatchLayoutError::LengthMismatch {
                offsets: 2,
                lengths: 1
            })
        );
    }

    #[test]
    fn messages_name_index_values_and_limit() {
        let text = BatchLayoutError::OutOfBounds {
            index: 2,
            offset: 4,
            length: 3,
            buffer_len: 6,
        }
        .to_string();
        for part in ["item 2", "offset 4", "length 3", "at most 6"] {
            assert!(text.contains(part), "{text}");
        }
        assert_eq!(
            BatchLayoutError::LengthMismatch {
                offsets: 2,
                lengths: 1
            }
            .to_string(),
            "offsets has 2 items but lengths has 1, expected the same number of items"
        );
    }
}
