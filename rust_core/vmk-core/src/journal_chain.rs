//! Hash chain over the lines of the event journal.
//!
//! Design: the journal is tamper-evident because each line is folded into a
//! running SHA-256 head: `head' = SHA-256(head || len(line) as u64 LE || line)`.
//! The length prefix makes the encoding unambiguous (no two different line
//! sequences produce the same byte stream). [`JournalChain::update_batch`]
//! takes one flat buffer plus parallel offset/length arrays so that Python can
//! hand over many lines in one call without building a list of `bytes`. It is
//! all-or-nothing: every span is validated before the first byte is hashed,
//! and the state is only written once the whole batch has been hashed.

use sha2::{Digest, Sha256};

/// Why a batch of journal lines was rejected (the shared batch layout error).
pub use crate::batch::BatchLayoutError as ChainError;

/// Running state of the journal hash chain: the current head and how many
/// lines have been folded into it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct JournalChain {
    head: [u8; 32],
    count: u64,
}

impl Default for JournalChain {
    /// A chain starting from the all-zero genesis head.
    fn default() -> Self {
        Self::new([0; 32])
    }
}

/// One step of the chain rule, without touching any state.
#[inline]
fn step(hasher: &mut Sha256, head: &[u8; 32], line: &[u8]) -> [u8; 32] {
    // usize -> u64 is lossless on every supported target (pointer width <= 64).
    let len = line.len() as u64;
    hasher.update(head);
    hasher.update(len.to_le_bytes());
    hasher.update(line);
    hasher.finalize_reset().into()
}

/// Checks that `offsets` and `lengths` describe spans inside a buffer of
/// `buffer_len` bytes, returning the first problem found.
pub fn validate_batch(
    buffer_len: usize,
    offsets: &[u64],
    lengths: &[u64],
) -> Result<(), ChainError> {
    crate::batch::check_layout(buffer_len, offsets, lengths).map(|_| ())
}

impl JournalChain {
    /// A chain whose head starts at `genesis`, with no lines yet.
    pub fn new(genesis: [u8; 32]) -> Self {
        Self {
            head: genesis,
            count: 0,
        }
    }

    /// The current head.
    pub fn head(&self) -> [u8; 32] {
        self.head
    }

    /// How many lines have been folded in.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Folds one line into the chain and returns the new head.
    pub fn update(&mut self, line: &[u8]) -> [u8; 32] {
        self.head = step(&mut Sha256::new(), &self.head, line);
        // 2**64 lines cannot be reached in practice; saturate rather than wrap.
        self.count = self.count.saturating_add(1);
        self.head
    }

    /// Folds the lines `buffer[offsets[i] .. offsets[i] + lengths[i]]`, in
    /// order, into the chain and returns the new head.
    ///
    /// All-or-nothing: on error the chain is unchanged.
    pub fn update_batch(
        &mut self,
        buffer: &[u8],
        offsets: &[u64],
        lengths: &[u64],
    ) -> Result<[u8; 32], ChainError> {
        validate_batch(buffer.len(), offsets, lengths)?;
        let mut hasher = Sha256::new();
        let mut head = self.head;
        for (index, (&offset, &length)) in offsets.iter().zip(lengths).enumerate() {
            let out_of_bounds = ChainError::OutOfBounds {
                index,
                offset,
                length,
                buffer_len: buffer.len(),
            };
            // Cannot fail after validate_batch; handled anyway so that no path panics.
            let start = usize::try_from(offset).map_err(|_| out_of_bounds.clone())?;
            let end = usize::try_from(offset + length).map_err(|_| out_of_bounds.clone())?;
            let line = buffer.get(start..end).ok_or(out_of_bounds)?;
            head = step(&mut hasher, &head, line);
        }
        self.head = head;
        // usize -> u64 is lossless on every supported target.
        self.count = self.count.saturating_add(offsets.len() as u64);
        Ok(self.head)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference_step(head: [u8; 32], line: &[u8]) -> [u8; 32] {
        let mut data = head.to_vec();
        data.extend_from_slice(&(line.len() as u64).to_le_bytes());
        data.extend_from_slice(line);
        Sha256::digest(&data).into()
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn new_chain_is_genesis() {
        let chain = JournalChain::new([7; 32]);
        assert_eq!(chain.head(), [7; 32]);
        assert_eq!(chain.count(), 0);
        assert_eq!(JournalChain::default().head(), [0; 32]);
    }

    #[test]
    fn known_vectors_from_zero_genesis() {
        // Computed independently: sha256(bytes(40)) and
        // sha256(bytes(32) + (5).to_bytes(8, "little") + b"hello") in Python.
        let mut chain = JournalChain::default();
        assert_eq!(
            hex(&chain.update(b"")),
            "2c34ce1df23b838c5abf2a7f6437cca3d3067ed509ff25f11df6b11b582b51eb"
        );
        let mut chain2 = JournalChain::default();
        assert_eq!(
            hex(&chain2.update(b"hello")),
            "ebfe006bc0002950e38d67da5e954d6218f4df3c5fa4199d2d7d65ed8f8ff445"
        );
        assert_eq!(chain.count(), 1);
    }

    #[test]
    fn update_follows_the_rule() {
        let mut chain = JournalChain::default();
        let h1 = chain.update(b"hello");
        assert_eq!(h1, reference_step([0; 32], b"hello"));
        let h2 = chain.update(b"world");
        assert_eq!(h2, reference_step(h1, b"world"));
        assert_eq!(chain.count(), 2);
    }

    #[test]
    fn batch_equals_scalar_sequence() {
        let buffer = b"alphabetagammadelta";
        let offsets = [0u64, 5, 9, 14, 14];
        let lengths = [5u64, 4, 5, 5, 0];
        let mut scalar = JournalChain::new([1; 32]);
        for (&o, &l) in offsets.iter().zip(&lengths) {
            scalar.update(&buffer[o as usize..(o + l) as usize]);
        }
        let mut batch = JournalChain::new([1; 32]);
        let head = batch.update_batch(buffer, &offsets, &lengths);
        assert_eq!(head, Ok(scalar.head()));
        assert_eq!(batch, scalar);
    }

    #[test]
    fn empty_batch_is_a_no_op() {
        let mut chain = JournalChain::new([3; 32]);
        assert_eq!(chain.update_batch(b"", &[], &[]), Ok([3; 32]));
        assert_eq!(chain.count(), 0);
    }

    #[test]
    fn overlapping_and_repeated_spans_are_allowed() {
        let mut chain = JournalChain::default();
        assert!(chain.update_batch(b"abc", &[0, 0, 1], &[3, 3, 2]).is_ok());
        assert_eq!(chain.count(), 3);
    }

    #[test]
    fn mismatched_lengths_rejected_without_change() {
        let mut chain = JournalChain::default();
        chain.update(b"x");
        let before = chain;
        let err = chain.update_batch(b"abc", &[0, 1], &[1]);
        assert_eq!(
            err,
            Err(ChainError::LengthMismatch {
                offsets: 2,
                lengths: 1
            })
        );
        assert_eq!(chain, before);
    }

    #[test]
    fn out_of_bounds_rejected_without_change_even_after_good_items() {
        let mut chain = JournalChain::default();
        let before = chain;
        let err = chain.update_batch(b"abcdef", &[0, 2, 4], &[2, 2, 3]);
        assert_eq!(
            err,
            Err(ChainError::OutOfBounds {
                index: 2,
                offset: 4,
                length: 3,
                buffer_len: 6
            })
        );
        assert_eq!(chain, before);
    }

    #[test]
    fn overflow_rejected_without_change() {
        let mut chain = JournalChain::default();
        let before = chain;
        let err = chain.update_batch(b"abc", &[0, u64::MAX], &[1, 1]);
        assert_eq!(
            err,
            Err(ChainError::Overflow {
                index: 1,
                offset: u64::MAX,
                length: 1,
                buffer_len: 3
            })
        );
        assert_eq!(chain, before);
    }

    #[test]
    fn error_messages_name_index_and_values() {
        let err = ChainError::OutOfBounds {
            index: 2,
            offset: 4,
            length: 3,
            buffer_len: 6,
        };
        let text = err.to_string();
        assert!(text.contains("item 2"), "{text}");
        assert!(text.contains("offset 4"), "{text}");
        assert!(text.contains("length 3"), "{text}");
        assert!(text.contains("at most 6"), "{text}");
        let err = ChainError::LengthMismatch {
            offsets: 2,
            lengths: 1,
        };
        assert_eq!(
            err.to_string(),
            "offsets has 2 items but lengths has 1, expected the same number of items"
        );
    }
}
