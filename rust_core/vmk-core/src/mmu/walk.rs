//! Translation: TLB lookup, the two-dimensional walk and batches.
//!
//! Design: the hit path is a canonical check, at most three direct-mapped
//! probes (4 KiB, 2 MiB, 1 GiB) and a permission bit test. A miss walks the
//! first stage; for a guest every first-stage table address is itself
//! translated by the second stage (read permission needed), then the final
//! guest-physical address is. The walk stops at the first entry that denies
//! the access, so a fault names its stage and level; successful walks fill
//! the TLB with the smaller page size of the two stages.

use super::tlb::{self, page_mask, Origin};
use super::{
    Processor, ISOLATION, NON_CANONICAL, NOT_PRESENT, OUT_OF_RANGE, PAGE_CROSSING, PAGE_SIZE,
    PERMISSION, READ, RESERVED_BIT,
};

pub(crate) const PRESENT: u64 = 1;
pub(crate) const PS: u64 = 1 << 7;
pub(crate) const ADDR: u64 = 0x000F_FFFF_FFFF_F000;
const RSV_1G: u64 = ((1 << 30) - 1) & !((1 << 13) - 1);
const RSV_2M: u64 = ((1 << 21) - 1) & !((1 << 13) - 1);

/// A translation fault: `code` indexes [`super::FAULT_KINDS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    /// Fault code (1..=7).
    pub code: u8,
    /// 1 or 2.
    pub stage: u8,
    /// 4 = root .. 1 = leaf; 0 before any walk.
    pub level: u8,
    /// Guest-physical address being translated by stage 2.
    pub gpa: Option<u64>,
}

const fn fault(code: u8, stage: u8, level: u8, gpa: Option<u64>) -> Fault {
    Fault {
        code,
        stage,
        level,
        gpa,
    }
}

/// Whether `vaddr` is canonical (bits 63..47 equal).
#[inline]
pub(crate) fn canonical(vaddr: u64) -> bool {
    let top = vaddr >> 47;
    top == 0 || top == 0x1FFFF
}

/// Whether a present entry at `level` has a reserved bit set.
#[inline]
pub(crate) fn reserved(entry: u64, level: u8) -> bool {
    if entry & PS == 0 {
        return false;
    }
    match level {
        4 => true,
        3 => entry & RSV_1G != 0,
        2 => entry & RSV_2M != 0,
        _ => false,
    }
}

/// Result of a successful walk.
struct Walked {
    hpa: u64,
    size_class: usize,
    mask: u8,
    origin: Origin,
}

impl Processor {
    /// Second stage: (host address, size class, permission mask) of `gpa`.
    fn stage2(&mut self, gpa: u64, access: u8, vm: u16) -> Result<(u64, usize, u8), Fault> {
        if gpa >> 48 != 0 {
            return Err(fault(OUT_OF_RANGE, 2, 4, Some(gpa)));
        }
        let Some(mut table) = self.s2root_of(vm) else {
            return Err(fault(NOT_PRESENT, 2, 4, Some(gpa)));
        };
        let pshift = 52 + 3 * u32::from(self.dr);
        let mut mask = 7u8;
        let mut level = 4u8;
        let e = loop {
            if table >= self.mem_len {
                return Err(fault(OUT_OF_RANGE, 2, level, Some(gpa)));
            }
            if self.isolation && !self.accessible(vm, table / PAGE_SIZE) {
                return Err(fault(ISOLATION, 2, level, Some(gpa)));
            }
            let index = (gpa >> (3 + 9 * u32::from(level))) & 511;
            let e = self.read_entry(table + 8 * index);
            if e & PRESENT == 0 {
                return Err(fault(NOT_PRESENT, 2, level, Some(gpa)));
            }
            if reserved(e, level) {
                return Err(fault(RESERVED_BIT, 2, level, Some(gpa)));
            }
            let p = ((e >> pshift) & 7) as u8;
            if (p >> access) & 1 == 0 {
                return Err(fault(PERMISSION, 2, level, Some(gpa)));
            }
            mask &= p;
            if level == 1 || (e & PS != 0 && level < 4) {
                break e;
            }
            table = e & ADDR;
            level -= 1;
        };
        let sc = usize::from(level - 1);
        let m = page_mask(sc);
        let hpa = (e & ADDR & !m) | (gpa & m);
        if hpa >= self.mem_len {
            return Err(fault(OUT_OF_RANGE, 2, level, Some(gpa)));
        }
        if self.isolation && !self.accessible(vm, hpa / PAGE_SIZE) {
            return Err(fault(ISOLATION, 2, level, Some(gpa)));
        }
        Ok((hpa, sc, mask))
    }

    /// Uncached walk of `vaddr` (already checked canonical and in-page).
    fn walk_uncached(&mut self, vaddr: u64, access: u8) -> Result<Walked, Fault> {
        self.stats.walks += 1;
        let vm = self.current_vm();
        let guest = vm != 0;
        let Some(mut table) = self.root_of(vm, self.dr) else {
            return Err(fault(NOT_PRESENT, 1, 4, None));
        };
        let pshift = 52 + 3 * u32::from(self.dr);
        let mut origin = Origin::default();
        let mut mask = 7u8;
        let mut level = 4u8;
        let e = loop {
            let index = (vaddr >> (3 + 9 * u32::from(level))) & 511;
            let ehpa = if guest {
                if let Some(slot) = origin.tables.get_mut(usize::from(origin.n_tables)) {
                    *slot = table;
                }
                origin.n_tables += 1;
                self.stage2(table + 8 * index, READ, vm)?.0
            } else {
                if table >= self.mem_len {
                    return Err(fault(OUT_OF_RANGE, 1, level, None));
                }
                table + 8 * index
            };
            let e = self.read_entry(ehpa);
            if e & PRESENT == 0 {
                return Err(fault(NOT_PRESENT, 1, level, None));
            }
            if reserved(e, level) {
                return Err(fault(RESERVED_BIT, 1, level, None));
            }
            let p = ((e >> pshift) & 7) as u8;
            if (p >> access) & 1 == 0 {
                return Err(fault(PERMISSION, 1, level, None));
            }
            mask &= p;
            if level == 1 || (e & PS != 0 && level < 4) {
                break e;
            }
            table = e & ADDR;
            level -= 1;
        };
        let mut sc = usize::from(level - 1);
        let m = page_mask(sc);
        let out = (e & ADDR & !m) | (vaddr & m);
        if !guest {
            if out >= self.mem_len {
                return Err(fault(OUT_OF_RANGE, 1, level, None));
            }
            if (out & !m) + m + 1 > self.mem_len {
                sc = 0;
            }
            return Ok(Walked {
                hpa: out,
                size_class: sc,
                mask,
                origin,
            });
        }
        let (hpa, s2sc, s2mask) = self.stage2(out, access, vm)?;
        sc = sc.min(s2sc);
        if self.isolation {
            sc = 0;
        }
        let mut m = page_mask(sc);
        if (hpa & !m) + m + 1 > self.mem_len {
            sc = 0;
            m = PAGE_SIZE - 1;
        }
        origin.data_gpa = out & !m;
        origin.data_size = m + 1;
        Ok(Walked {
            hpa,
            size_class: sc,
            mask: mask & s2mask,
            origin,
        })
    }

    #[inline]
    fn precheck(vaddr: u64, size: u64) -> Result<(), Fault> {
        if !canonical(vaddr) {
            return Err(fault(NON_CANONICAL, 1, 0, None));
        }
        if (vaddr & 0xFFF) + size > PAGE_SIZE {
            return Err(fault(PAGE_CROSSING, 1, 0, None));
        }
        Ok(())
    }

    /// Translates through the TLB; `access` and `size` must be valid
    /// ([`super::check_access`], [`super::check_size`]). Faults are counted.
    #[inline]
    pub fn translate(&mut self, vaddr: u64, access: u8, size: u64) -> Result<u64, Fault> {
        let r = self.translate_inner(vaddr, access, size);
        if r.is_err() {
            self.stats.faults += 1;
        }
        r
    }

    /// The TLB hit of `vaddr` for `access`, if any (no side effects).
    #[inline]
    fn probe(&self, vm: u16, domain: u8, vaddr: u64, access: u8) -> Option<u64> {
        for sc in 0..3 {
            let tag = tlb::tag(vm, domain, sc, vaddr);
            let slot = self.tlb.slots.get(self.tlb.index(tag))?;
            if slot.tag == tag {
                return ((slot.hpa_perms >> access) & 1 != 0)
                    .then(|| (slot.hpa_perms & !0xFFF) | (vaddr & page_mask(sc)));
            }
        }
        None
    }

    #[inline]
    fn translate_inner(&mut self, vaddr: u64, access: u8, size: u64) -> Result<u64, Fault> {
        Self::precheck(vaddr, size)?;
        let vm = self.current_vm();
        let domain = self.dr;
        for sc in 0..3 {
            let tag = tlb::tag(vm, domain, sc, vaddr);
            let i = self.tlb.index(tag);
            if let Some(slot) = self.tlb.slots.get(i) {
                if slot.tag == tag {
                    if (slot.hpa_perms >> access) & 1 != 0 {
                        self.stats.tlb_hits += 1;
                        return Ok((slot.hpa_perms & !0xFFF) | (vaddr & page_mask(sc)));
                    }
                    break;
                }
            }
        }
        self.stats.tlb_misses += 1;
        let w = self.walk_uncached(vaddr, access)?;
        let m = page_mask(w.size_class);
        let tag = tlb::tag(vm, domain, w.size_class, vaddr);
        self.tlb.insert(tag, w.hpa & !m, w.mask, w.origin);
        Ok(w.hpa)
    }

    /// Like [`Processor::translate`] but bypassing the TLB (neither read nor filled).
    pub fn walk(&mut self, vaddr: u64, access: u8, size: u64) -> Result<u64, Fault> {
        let r = Self::precheck(vaddr, size)
            .and_then(|()| self.walk_uncached(vaddr, access))
            .map(|w| w.hpa);
        if r.is_err() {
            self.stats.faults += 1;
        }
        r
    }

    /// Translates each of `vaddrs` into `out` (0 on a fault) and its fault
    /// code into `codes`, exactly as scalar calls in order would. The three
    /// slices must have the same length (extra items are ignored).
    pub fn translate_batch(
        &mut self,
        vaddrs: &[u64],
        access: u8,
        size: u64,
        out: &mut [u64],
        codes: &mut [u8],
    ) {
        // The hit path of `translate_inner`, specialised for a batch: the VM and
        // domain are fixed for the whole call and a hit needs no `Result`. A
        // probe has no side effects, so an address that misses (or may fault)
        // simply takes the scalar path, which probes again and then walks;
        // results and counters equal those of scalar calls in order.
        let vm = self.current_vm();
        let domain = self.dr;
        let mut hits = 0u64;
        for ((v, o), c) in vaddrs.iter().zip(out.iter_mut()).zip(codes.iter_mut()) {
            let vaddr = *v;
            if canonical(vaddr) && (vaddr & 0xFFF) + size <= PAGE_SIZE {
                if let Some(hpa) = self.probe(vm, domain, vaddr, access) {
                    *o = hpa;
                    *c = 0;
                    hits += 1;
                    continue;
                }
            }
            match self.translate(vaddr, access, size) {
                Ok(hpa) => {
                    *o = hpa;
                    *c = 0;
                }
                Err(f) => {
                    *o = 0;
                    *c = f.code;
                }
            }
        }
        self.stats.tlb_hits += hits;
    }
}
