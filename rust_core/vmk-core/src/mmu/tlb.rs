//! Direct-mapped TLB tagged by VM, domain, page size and page number.
//!
//! Design: a slot is 16 bytes (tag, host page | permission bits) so a hit
//! touches one cache line; the guest-physical pages an entry was built from
//! live in a parallel cold array that only `invalidate_gpa` reads. The tag
//! layout and the slot hash are part of the behaviour (hit and miss counts are
//! compared with the Python reference), so they must not change silently.

use super::{MASK48, PAGE_SIZE, SHIFTS};

/// Multiplier of the slot hash (Fibonacci hashing).
pub(crate) const HASH: u64 = 0x9E37_79B9_7F4A_7C15;

/// Tag of a TLB entry: valid bit 63, size class 61-62, domain 58-60, VM 42-57,
/// page number (of the low 48 address bits) 0-35.
#[inline]
pub(crate) fn tag(vm: u16, domain: u8, size_class: usize, vaddr: u64) -> u64 {
    (1 << 63)
        | ((size_class as u64) << 61)
        | (u64::from(domain) << 58)
        | (u64::from(vm) << 42)
        | ((vaddr & MASK48) >> SHIFTS[size_class])
}

/// The VM of a tag.
#[inline]
pub(crate) fn tag_vm(tag: u64) -> u16 {
    // 16 bits by construction of `tag`.
    ((tag >> 42) & 0xFFFF) as u16
}

/// One hot slot: `tag == 0` means empty.
#[derive(Clone, Copy, Default)]
pub(crate) struct Slot {
    pub(crate) tag: u64,
    /// Host page base ORed with the R/W/X bits (0-2) of the entry's domain.
    pub(crate) hpa_perms: u64,
}

/// The guest-physical pages a combined entry was built from.
#[derive(Clone, Copy, Default)]
pub(crate) struct Origin {
    /// First-stage table pages (guest-physical, page aligned).
    pub(crate) tables: [u64; 4],
    /// How many of `tables` are used (0 for host entries).
    pub(crate) n_tables: u8,
    /// Guest-physical base of the mapped page.
    pub(crate) data_gpa: u64,
    /// Size of the mapped page (0 for host entries).
    pub(crate) data_size: u64,
}

impl Origin {
    /// Whether the entry was built from a guest-physical page in `[lo, hi)`
    /// (`lo` page aligned).
    pub(crate) fn touches(&self, lo: u64, hi: u128) -> bool {
        if self.data_size == 0 {
            return false;
        }
        let data_hit = u128::from(self.data_gpa) < hi && lo < self.data_gpa + self.data_size;
        data_hit
            || self.tables[..usize::from(self.n_tables)]
                .iter()
                .any(|&t| lo <= t && u128::from(t) < hi)
    }
}

/// The TLB itself.
pub(crate) struct Tlb {
    pub(crate) slots: Vec<Slot>,
    pub(crate) origins: Vec<Origin>,
    pub(crate) shift: u32,
}

impl Tlb {
    /// A TLB of `entries` slots (a power of two of at least 2).
    pub(crate) fn new(entries: usize) -> Self {
        Self {
            slots: vec![Slot::default(); entries],
            origins: vec![Origin::default(); entries],
            shift: 64 - entries.trailing_zeros(),
        }
    }

    /// Slot index of a tag.
    #[inline]
    pub(crate) fn index(&self, tag: u64) -> usize {
        // `shift >= 44` for at most 2**20 entries, so the result fits.
        (tag.wrapping_mul(HASH) >> self.shift) as usize
    }

    /// Stores an entry, replacing whatever occupied its slot.
    pub(crate) fn insert(&mut self, tag: u64, hpa_base: u64, perms: u8, origin: Origin) {
        let i = self.index(tag);
        if let (Some(slot), Some(o)) = (self.slots.get_mut(i), self.origins.get_mut(i)) {
            *slot = Slot {
                tag,
                hpa_perms: hpa_base | u64::from(perms & 7),
            };
            *o = origin;
        }
    }

    /// Drops the entry with exactly this tag, if present.
    pub(crate) fn drop_tag(&mut self, tag: u64) {
        let i = self.index(tag);
        if let Some(slot) = self.slots.get_mut(i) {
            if slot.tag == tag {
                *slot = Slot::default();
            }
        }
    }

    /// Drops every entry for which `pred(tag, origin)` holds.
    pub(crate) fn retain_not(&mut self, mut pred: impl FnMut(u64, &Origin) -> bool) {
        for (slot, origin) in self.slots.iter_mut().zip(self.origins.iter()) {
            if slot.tag != 0 && pred(slot.tag, origin) {
                *slot = Slot::default();
            }
        }
    }

    /// Empties the TLB.
    pub(crate) fn clear(&mut self) {
        self.slots.fill(Slot::default());
    }
}

/// Page offset mask of a size class.
#[inline]
pub(crate) fn page_mask(size_class: usize) -> u64 {
    (PAGE_SIZE << (9 * size_class)) - 1
}
