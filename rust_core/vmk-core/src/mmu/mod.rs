//! Emulated processor: VM register, domain register and domain-based
//! two-stage x86-64-format address translation with a VM-tagged TLB.
//!
//! Design: the behaviour is defined by the pure-Python model
//! `vmkernel/reference/processor.py` (read its design note); this module
//! follows it bit for bit, statistics included. Page tables are x86-64
//! 4-level tables (present bit 0, page-size bit 7, address bits 12-51) whose
//! R/W/U/S/NX meanings are replaced by per-domain R/W/X bits 52+3d..54+3d and
//! a per-domain security bit 61+d, so an x86-64 emulator fed the same tables
//! computes the same addresses. With a hypervisor and a guest in the VM
//! register every first-stage table read goes through that VM's second stage.
//! Every input is validated into a typed [`MmuError`] or a [`Fault`]; nothing
//! panics, and walks are bounded (4 levels per stage), so self-referencing
//! tables terminate.

mod tlb;
mod walk;

use std::collections::{BTreeSet, HashSet};

use tlb::Tlb;

pub use walk::Fault;

/// Bytes in a page.
pub const PAGE_SIZE: u64 = 4096;
/// Largest accepted physical memory.
pub const MAX_MEMORY: u64 = 1 << 32;
/// Default largest VM id.
pub const DEFAULT_MAX_VM_ID: u16 = 4095;
/// Default number of TLB slots.
pub const DEFAULT_TLB_ENTRIES: usize = 4096;
/// Number of defined domains.
pub const DOMAINS: u8 = 3;
/// The hypervisor domain.
pub const HYPERVISOR: u8 = 0;
/// Read access.
pub const READ: u8 = 0;
/// Write access.
pub const WRITE: u8 = 1;
/// Execute access.
pub const EXECUTE: u8 = 2;

/// Fault kinds by code (code 0 means no fault), as in `vmkernel.errors.FAULT_KINDS`.
pub const FAULT_KINDS: [&str; 8] = [
    "none",
    "not-present",
    "permission",
    "reserved-bit",
    "non-canonical",
    "out-of-memory-range",
    "isolation",
    "page-crossing",
];
/// Fault code: entry not present (or no root).
pub const NOT_PRESENT: u8 = 1;
/// Fault code: a permission bit of the current domain is clear.
pub const PERMISSION: u8 = 2;
/// Fault code: a reserved bit is set (PS in a level-4 entry, misaligned huge page).
pub const RESERVED_BIT: u8 = 3;
/// Fault code: the address is not canonical.
pub const NON_CANONICAL: u8 = 4;
/// Fault code: a table or page lies past the end of memory (or a guest-physical address past 2**48).
pub const OUT_OF_RANGE: u8 = 5;
/// Fault code: a guest reached a frame it neither owns nor was granted.
pub const ISOLATION: u8 = 6;
/// Fault code: the access crosses a 4 KiB page boundary.
pub const PAGE_CROSSING: u8 = 7;

/// Privileged registers, in the order used by the permission table.
pub const REGISTERS: [&str; 4] = ["vmr", "table_root", "stage2_root", "domain_table"];
const VMR: usize = 0;
const TABLE_ROOT: usize = 1;
const STAGE2_ROOT: usize = 2;
const DOMAIN_TABLE: usize = 3;

/// What the VM-id arguments accept.
pub const EXPECTED_U64: &str = "an integer in [0, 2**64)";
/// What a domain argument accepts.
pub const EXPECTED_DOMAIN: &str = "Domain.HYPERVISOR, Domain.OS or Domain.APPLICATION (0, 1 or 2)";
/// What an access argument accepts.
pub const EXPECTED_ACCESS: &str = "Access.READ, Access.WRITE or Access.EXECUTE (0, 1 or 2)";
/// What a size argument accepts.
pub const EXPECTED_SIZE: &str = "1, 2, 4 or 8 (bytes)";
/// What a register name accepts.
pub const EXPECTED_REGISTER: &str = "'vmr', 'table_root', 'stage2_root' or 'domain_table'";
/// What `read_register` accepts.
pub const EXPECTED_READABLE: &str = "'vmr', 'table_root' or 'stage2_root'";

pub(crate) const MASK48: u64 = (1 << 48) - 1;
pub(crate) const SHIFTS: [u32; 3] = [12, 21, 30];
const NO_ROOT: u64 = u64::MAX;

/// A value in an [`MmuError::Invalid`], as Python shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// An integer (wide enough for `addr + length`).
    Int(u128),
    /// A string.
    Text(String),
    /// A boolean.
    Bool(bool),
}

impl std::fmt::Display for Value {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Value::Int(v) => write!(f, "{v}"),
            Value::Text(v) => write!(f, "{v:?}"),
            Value::Bool(v) => write!(f, "{}", if *v { "True" } else { "False" }),
        }
    }
}

/// Why an operation (other than a translation) was refused.
#[derive(Debug, Clone, PartialEq, Eq, displaydoc::Display)]
pub enum MmuError {
    /// {thing}: got {value}, expected {expected}
    Invalid {
        /// The argument or field.
        thing: String,
        /// What it was.
        value: Value,
        /// What would have been accepted.
        expected: String,
    },
    /// {operation} of register {register} from domain {domain}: denied, expected {expected}
    RegisterAccess {
        /// Register name.
        register: &'static str,
        /// Current domain.
        domain: u8,
        /// `read` or `write`.
        operation: &'static str,
        /// Who may.
        expected: String,
    },
    /// entry into domain {domain} at {address:#x}: denied, expected {expected}
    DomainEntry {
        /// The domain being entered.
        domain: u8,
        /// The address used.
        address: u64,
        /// The allowed entry points.
        expected: String,
    },
}

impl std::error::Error for MmuError {}

fn invalid(thing: &str, value: impl Into<u128>, expected: impl Into<String>) -> MmuError {
    MmuError::Invalid {
        thing: thing.to_owned(),
        value: Value::Int(value.into()),
        expected: expected.into(),
    }
}

/// Counters of the translation machinery.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Translations served by the TLB.
    pub tlb_hits: u64,
    /// Translations that walked.
    pub tlb_misses: u64,
    /// Page walks (also by `walk`).
    pub walks: u64,
    /// Page-table entries read (both stages).
    pub table_reads: u64,
    /// Translation faults.
    pub faults: u64,
}

/// Checks an access argument.
pub fn check_access(access: u64) -> Result<u8, MmuError> {
    u8::try_from(access)
        .ok()
        .filter(|a| *a <= EXECUTE)
        .ok_or_else(|| invalid("access", access, EXPECTED_ACCESS))
}

/// Checks a domain argument.
pub fn check_domain(domain: u64) -> Result<u8, MmuError> {
    u8::try_from(domain)
        .ok()
        .filter(|d| *d < DOMAINS)
        .ok_or_else(|| invalid("domain", domain, EXPECTED_DOMAIN))
}

/// Checks an access size argument.
pub fn check_size(size: u64) -> Result<u64, MmuError> {
    if matches!(size, 1 | 2 | 4 | 8) {
        Ok(size)
    } else {
        Err(invalid("size", size, EXPECTED_SIZE))
    }
}

fn register_index(name: &str) -> Result<usize, MmuError> {
    REGISTERS
        .iter()
        .position(|r| *r == name)
        .ok_or_else(|| MmuError::Invalid {
            thing: "register".into(),
            value: Value::Text(name.into()),
            expected: EXPECTED_REGISTER.into(),
        })
}

/// Default (read, write) of the OS and application domains per register.
const DEFAULT_PERMS: [[(bool, bool); 4]; 2] = [
    [(true, false), (true, true), (false, false), (true, false)],
    [
        (false, false),
        (false, false),
        (false, false),
        (false, false),
    ],
];

/// The emulated processor.
pub struct Processor {
    mem: Vec<u8>,
    mem_len: u64,
    hsr: bool,
    isolation: bool,
    max_vm: u16,
    vmr: u16,
    dr: u8,
    roots: Vec<u64>,
    s2roots: Vec<u64>,
    entry_points: [BTreeSet<u64>; 3],
    perms: [[(bool, bool); 4]; 2],
    owner: Vec<u16>,
    grants: HashSet<(u16, u64)>,
    tlb: Tlb,
    stats: Stats,
}

impl std::fmt::Debug for Processor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Processor")
            .field("memory_bytes", &self.mem_len)
            .field("hypervisor", &self.hsr)
            .field("vm_register", &self.vmr)
            .field("domain", &self.dr)
            .finish_non_exhaustive()
    }
}

impl Processor {
    /// A processor with `memory_bytes` of zeroed memory.
    pub fn new(
        memory_bytes: u64,
        hypervisor: bool,
        isolation: bool,
        max_vm_id: u64,
        tlb_entries: u64,
    ) -> Result<Self, MmuError> {
        let mem_expected = format!("a multiple of 4096 in [4096, {MAX_MEMORY}]");
        if !(PAGE_SIZE..=MAX_MEMORY).contains(&memory_bytes) || memory_bytes % PAGE_SIZE != 0 {
            return Err(invalid("memory_bytes", memory_bytes, mem_expected));
        }
        let max_vm = u16::try_from(max_vm_id)
            .ok()
            .filter(|m| *m >= 1)
            .ok_or_else(|| invalid("max_vm_id", max_vm_id, "an integer in [1, 65535]"))?;
        if !(16..=1 << 20).contains(&tlb_entries) || !tlb_entries.is_power_of_two() {
            return Err(invalid(
                "tlb_entries",
                tlb_entries,
                "a power of two in [16, 1048576]",
            ));
        }
        let mem_size = usize::try_from(memory_bytes).map_err(|_| {
            invalid(
                "memory_bytes",
                memory_bytes,
                "a size this machine can address",
            )
        })?;
        let frames = mem_size / 4096;
        let vms = usize::from(max_vm) + 1;
        Ok(Self {
            mem: vec![0; mem_size],
            mem_len: memory_bytes,
            hsr: hypervisor,
            isolation,
            max_vm,
            vmr: 0,
            dr: HYPERVISOR,
            roots: vec![NO_ROOT; vms * usize::from(DOMAINS)],
            s2roots: vec![NO_ROOT; vms],
            entry_points: Default::default(),
            perms: DEFAULT_PERMS,
            owner: vec![0; frames],
            grants: HashSet::new(),
            // In range by the check above.
            tlb: Tlb::new(usize::try_from(tlb_entries).unwrap_or(DEFAULT_TLB_ENTRIES)),
            stats: Stats::default(),
        })
    }

    /// Size of physical memory in bytes.
    pub fn memory_bytes(&self) -> u64 {
        self.mem_len
    }
    /// The hypervisor status register.
    pub fn hypervisor(&self) -> bool {
        self.hsr
    }
    /// Whether frame ownership is enforced for guests.
    pub fn isolation(&self) -> bool {
        self.isolation
    }
    /// The largest accepted VM id.
    pub fn max_vm_id(&self) -> u16 {
        self.max_vm
    }
    /// Number of TLB slots.
    pub fn tlb_entries(&self) -> usize {
        self.tlb.slots.len()
    }
    /// The VM register.
    pub fn vm_register(&self) -> u16 {
        self.vmr
    }
    /// The domain register.
    pub fn domain(&self) -> u8 {
        self.dr
    }
    /// The counters.
    pub fn stats(&self) -> Stats {
        self.stats
    }
    /// Zeroes the counters.
    pub fn reset_stats(&mut self) {
        self.stats = Stats::default();
    }

    /// Checks a VM id (`guest`: 0 is refused).
    pub fn check_vm(&self, vm: u64, guest: bool) -> Result<u16, MmuError> {
        let lo = u64::from(guest);
        let what = if guest { "a guest VM id" } else { "a VM id" };
        u16::try_from(vm)
            .ok()
            .filter(|v| u64::from(*v) >= lo && *v <= self.max_vm)
            .ok_or_else(|| invalid("vm", vm, format!("{what} in [{lo}, {}]", self.max_vm)))
    }

    fn current_vm(&self) -> u16 {
        if self.hsr {
            self.vmr
        } else {
            0
        }
    }

    fn require(
        &self,
        register: usize,
        write: bool,
        expected: Option<&str>,
    ) -> Result<(), MmuError> {
        if self.dr == HYPERVISOR {
            return Ok(());
        }
        let (r, w) = self.perm_of(register, self.dr);
        if (write && w) || (!write && r) {
            return Ok(());
        }
        let op = if write { "write" } else { "read" };
        let name = REGISTERS[register];
        Err(MmuError::RegisterAccess {
            register: name,
            domain: self.dr,
            operation: op,
            expected: expected.map_or_else(
                || format!("a domain with {op} permission on {name}"),
                str::to_owned,
            ),
        })
    }

    fn perm_of(&self, register: usize, domain: u8) -> (bool, bool) {
        match domain {
            HYPERVISOR => (true, true),
            d => self
                .perms
                .get(usize::from(d) - 1)
                .and_then(|row| row.get(register))
                .copied()
                .unwrap_or((false, false)),
        }
    }

    fn phys_range(
        &self,
        thing: &str,
        addr: u64,
        len: u64,
    ) -> Result<std::ops::Range<usize>, MmuError> {
        let end = u128::from(addr) + u128::from(len);
        if end > u128::from(self.mem_len) {
            return Err(invalid(
                thing,
                end,
                format!("at most {} (memory_bytes)", self.mem_len),
            ));
        }
        // Both below mem_len, which fits in usize.
        Ok(addr as usize..end as usize)
    }

    fn frame_range(&self, addr: u64, length: u64) -> Result<std::ops::Range<usize>, MmuError> {
        if addr % PAGE_SIZE != 0 {
            return Err(invalid("addr", addr, "a multiple of 4096"));
        }
        if length % PAGE_SIZE != 0 {
            return Err(invalid("length", length, "a multiple of 4096"));
        }
        let r = self.phys_range("addr + length", addr, length)?;
        Ok(r.start / 4096..r.end / 4096)
    }

    /// `n` bytes of physical memory at `addr`.
    pub fn read_phys(&self, addr: u64, n: u64) -> Result<&[u8], MmuError> {
        let r = self.phys_range("addr + n", addr, n)?;
        Ok(self.mem.get(r).unwrap_or_default())
    }

    /// Writes `data` to physical memory at `addr`.
    pub fn write_phys(&mut self, addr: u64, data: &[u8]) -> Result<(), MmuError> {
        let r = self.phys_range("addr + len(data)", addr, data.len() as u64)?;
        if let Some(dst) = self.mem.get_mut(r) {
            dst.copy_from_slice(data);
        }
        Ok(())
    }

    fn physical_root(&self, addr: u64) -> Result<u64, MmuError> {
        if addr % PAGE_SIZE != 0 || addr >= self.mem_len {
            return Err(invalid(
                "addr",
                addr,
                format!("a 4096-aligned physical address below {}", self.mem_len),
            ));
        }
        Ok(addr)
    }

    /// Sets the first-stage root of `(vm, domain)`.
    pub fn set_table_root(&mut self, vm: u64, domain: u64, addr: u64) -> Result<(), MmuError> {
        let v = self.check_vm(vm, false)?;
        let d = check_domain(domain)?;
        self.require(TABLE_ROOT, true, None)?;
        if self.dr != HYPERVISOR && v != self.current_vm() {
            return Err(MmuError::RegisterAccess {
                register: REGISTERS[TABLE_ROOT],
                domain: self.dr,
                operation: "write",
                expected: "the hypervisor domain, or the running VM's own roots".into(),
            });
        }
        let a = if !self.hsr || v == 0 {
            self.physical_root(addr)?
        } else if addr % PAGE_SIZE != 0 || addr >> 48 != 0 {
            return Err(invalid(
                "addr",
                addr,
                "a 4096-aligned guest-physical address below 2**48",
            ));
        } else {
            addr
        };
        let i = usize::from(v) * usize::from(DOMAINS) + usize::from(d);
        if let Some(slot) = self.roots.get_mut(i) {
            *slot = a;
        }
        Ok(())
    }

    /// The first-stage root of `(vm, domain)`.
    pub fn table_root(&self, vm: u64, domain: u64) -> Result<Option<u64>, MmuError> {
        let v = self.check_vm(vm, false)?;
        let d = check_domain(domain)?;
        Ok(self.root_of(v, d))
    }

    fn root_of(&self, vm: u16, domain: u8) -> Option<u64> {
        self.roots
            .get(usize::from(vm) * usize::from(DOMAINS) + usize::from(domain))
            .copied()
            .filter(|r| *r != NO_ROOT)
    }

    fn s2root_of(&self, vm: u16) -> Option<u64> {
        self.s2roots
            .get(usize::from(vm))
            .copied()
            .filter(|r| *r != NO_ROOT)
    }

    /// Sets the second-stage root of guest `vm`.
    pub fn set_stage2_root(&mut self, vm: u64, addr: u64) -> Result<(), MmuError> {
        let v = self.check_vm(vm, true)?;
        self.require(STAGE2_ROOT, true, None)?;
        let a = self.physical_root(addr)?;
        if let Some(slot) = self.s2roots.get_mut(usize::from(v)) {
            *slot = a;
        }
        Ok(())
    }

    /// The second-stage root of guest `vm`.
    pub fn stage2_root(&self, vm: u64) -> Result<Option<u64>, MmuError> {
        let v = self.check_vm(vm, true)?;
        Ok(self.s2root_of(v))
    }

    /// Writes the VM register (hypervisor domain only; never flushes).
    pub fn write_vm_register(&mut self, vm: u64) -> Result<(), MmuError> {
        let v = self.check_vm(vm, false)?;
        if self.dr != HYPERVISOR {
            return Err(MmuError::RegisterAccess {
                register: REGISTERS[VMR],
                domain: self.dr,
                operation: "write",
                expected: "the hypervisor domain".into(),
            });
        }
        self.vmr = v;
        Ok(())
    }

    /// Reads `vmr`, `table_root` or `stage2_root` of the current VM and domain.
    pub fn read_register(&self, name: &str) -> Result<Option<u64>, MmuError> {
        let index = match name {
            "vmr" => VMR,
            "table_root" => TABLE_ROOT,
            "stage2_root" => STAGE2_ROOT,
            _ => {
                return Err(MmuError::Invalid {
                    thing: "name".into(),
                    value: Value::Text(name.into()),
                    expected: EXPECTED_READABLE.into(),
                })
            }
        };
        self.require(index, false, None)?;
        let vm = self.current_vm();
        Ok(match index {
            VMR => Some(u64::from(self.vmr)),
            TABLE_ROOT => self.root_of(vm, self.dr),
            _ => self.s2root_of(vm),
        })
    }

    /// Sets `(read, write)` of a non-hypervisor domain on a register.
    pub fn set_register_permission(
        &mut self,
        register: &str,
        domain: u64,
        read: bool,
        write: bool,
    ) -> Result<(), MmuError> {
        let r = register_index(register)?;
        let d = check_domain(domain)?;
        self.require(DOMAIN_TABLE, true, None)?;
        if d == HYPERVISOR {
            return Err(invalid(
                "domain",
                d,
                "Domain.OS or Domain.APPLICATION (the hypervisor's are fixed)",
            ));
        }
        if r == VMR && write {
            return Err(MmuError::Invalid {
                thing: "write".into(),
                value: Value::Bool(write),
                expected: "False (vmr is writable only from the hypervisor domain)".into(),
            });
        }
        if let Some(slot) = self
            .perms
            .get_mut(usize::from(d) - 1)
            .and_then(|row| row.get_mut(r))
        {
            *slot = (read, write);
        }
        Ok(())
    }

    /// `(read, write)` of `domain` on `register`.
    pub fn register_permission(
        &self,
        register: &str,
        domain: u64,
    ) -> Result<(bool, bool), MmuError> {
        let r = register_index(register)?;
        let d = check_domain(domain)?;
        Ok(self.perm_of(r, d))
    }

    /// Replaces the entry points of `domain`.
    pub fn set_entry_points(&mut self, domain: u64, addrs: &[u64]) -> Result<(), MmuError> {
        let d = check_domain(domain)?;
        self.require(DOMAIN_TABLE, true, None)?;
        if let Some(set) = self.entry_points.get_mut(usize::from(d)) {
            *set = addrs.iter().copied().collect();
        }
        Ok(())
    }

    /// The entry points of `domain`, sorted.
    pub fn entry_points(&self, domain: u64) -> Result<Vec<u64>, MmuError> {
        let d = check_domain(domain)?;
        Ok(self
            .entry_points
            .get(usize::from(d))
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default())
    }

    /// Enters `domain` at `address` (must be one of its entry points).
    pub fn enter_domain(&mut self, domain: u64, address: u64) -> Result<(), MmuError> {
        let d = check_domain(domain)?;
        let points = self.entry_points.get(usize::from(d));
        let n = points.map_or(0, BTreeSet::len);
        if !points.is_some_and(|p| p.contains(&address)) {
            return Err(MmuError::DomainEntry {
                domain: d,
                address,
                expected: if n > 0 {
                    format!("one of its {n} entry points")
                } else {
                    "an entry point (it has none)".into()
                },
            });
        }
        self.dr = d;
        Ok(())
    }

    /// Gives the frames of `[addr, addr + length)` to `vm`.
    ///
    /// With isolation on, the entries of the frames' previous owners are
    /// dropped (they may have reached these frames); the new owner had no
    /// entries through them, since faults are never cached. Without
    /// isolation, ownership does not affect translation and nothing is dropped.
    pub fn set_frame_owner(&mut self, addr: u64, length: u64, vm: u64) -> Result<(), MmuError> {
        let frames = self.frame_range(addr, length)?;
        let v = self.check_vm(vm, false)?;
        self.require(STAGE2_ROOT, true, None)?;
        let mut previous: Vec<u16> = Vec::new();
        if let Some(owners) = self.owner.get_mut(frames) {
            previous.extend(owners.iter().copied().filter(|o| *o != v));
            owners.fill(v);
        }
        if self.isolation {
            previous.sort_unstable();
            previous.dedup();
            self.tlb
                .retain_not(|tag, _| previous.binary_search(&tlb::tag_vm(tag)).is_ok());
        }
        Ok(())
    }

    /// The owner of the frame holding `addr`.
    pub fn frame_owner(&self, addr: u64) -> Result<u16, MmuError> {
        if addr >= self.mem_len {
            return Err(invalid(
                "addr",
                addr,
                format!("a physical address below {}", self.mem_len),
            ));
        }
        Ok(self
            .owner
            .get((addr / PAGE_SIZE) as usize)
            .copied()
            .unwrap_or(0))
    }

    /// Lets guest `vm` reach frames it does not own. Nothing is dropped from
    /// the TLB: access only widens, and faults are never cached.
    pub fn grant_frames(&mut self, vm: u64, addr: u64, length: u64) -> Result<(), MmuError> {
        let v = self.check_vm(vm, true)?;
        let frames = self.frame_range(addr, length)?;
        self.require(STAGE2_ROOT, true, None)?;
        self.grants.extend(frames.map(|f| (v, f as u64)));
        Ok(())
    }

    /// Withdraws grants; with isolation on, drops `vm`'s entries.
    pub fn revoke_frames(&mut self, vm: u64, addr: u64, length: u64) -> Result<(), MmuError> {
        let v = self.check_vm(vm, true)?;
        let frames = self.frame_range(addr, length)?;
        self.require(STAGE2_ROOT, true, None)?;
        for f in frames {
            self.grants.remove(&(v, f as u64));
        }
        if self.isolation {
            self.tlb.retain_not(|tag, _| tlb::tag_vm(tag) == v);
        }
        Ok(())
    }

    #[inline]
    fn accessible(&self, vm: u16, frame: u64) -> bool {
        self.owner.get(frame as usize).is_some_and(|o| *o == vm)
            || (!self.grants.is_empty() && self.grants.contains(&(vm, frame)))
    }

    #[inline]
    fn read_entry(&mut self, hpa: u64) -> u64 {
        self.stats.table_reads += 1;
        let i = hpa as usize;
        self.mem
            .get(i..i + 8)
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .map_or(0, u64::from_le_bytes)
    }

    /// The lowest host address guest `vm` reaches through its second-stage
    /// tables (table pages included) without owning it or a grant.
    pub fn isolation_violation(&self, vm: u64) -> Result<Option<u64>, MmuError> {
        let v = self.check_vm(vm, true)?;
        let Some(root) = self.s2root_of(v) else {
            return Ok(None);
        };
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        let mut seen: HashSet<(u8, u64)> = HashSet::new();
        let mut stack = vec![(4u8, root)];
        while let Some((level, table)) = stack.pop() {
            if !seen.insert((level, table)) {
                continue;
            }
            ranges.push((table, PAGE_SIZE));
            if table >= self.mem_len {
                continue;
            }
            for i in 0..512u64 {
                let at = (table + 8 * i) as usize;
                let e = self
                    .mem
                    .get(at..at + 8)
                    .and_then(|b| <[u8; 8]>::try_from(b).ok())
                    .map_or(0, u64::from_le_bytes);
                if e & walk::PRESENT == 0 || walk::reserved(e, level) {
                    continue;
                }
                if level == 1 || (e & walk::PS != 0 && level < 4) {
                    let size = PAGE_SIZE << (9 * (u32::from(level) - 1));
                    ranges.push((e & walk::ADDR & !(size - 1), size));
                } else {
                    stack.push((level - 1, e & walk::ADDR));
                }
            }
        }
        ranges.sort_unstable();
        let mut covered = 0u64;
        for (start, size) in ranges {
            let lo = start.max(covered);
            let hi = start + size;
            if lo >= hi {
                continue;
            }
            covered = hi;
            if lo >= self.mem_len {
                return Ok(Some(lo));
            }
            for f in lo / PAGE_SIZE..hi.min(self.mem_len) / PAGE_SIZE {
                if !self.accessible(v, f) {
                    return Ok(Some(f * PAGE_SIZE));
                }
            }
            if hi > self.mem_len {
                return Ok(Some(self.mem_len));
            }
        }
        Ok(None)
    }

    /// Drops the entries of `vm` (every domain and size) mapping `vaddr`.
    pub fn invalidate_page(&mut self, vm: u64, vaddr: u64) -> Result<(), MmuError> {
        let v = self.check_vm(vm, false)?;
        if !walk::canonical(vaddr) {
            return Err(invalid(
                "vaddr",
                vaddr,
                "a canonical address (bits 63-47 all equal)",
            ));
        }
        for sc in 0..3 {
            for d in 0..DOMAINS {
                self.tlb.drop_tag(tlb::tag(v, d, sc, vaddr));
            }
        }
        Ok(())
    }

    /// Drops every entry of `vm`.
    pub fn invalidate_vm(&mut self, vm: u64) -> Result<(), MmuError> {
        let v = self.check_vm(vm, false)?;
        self.tlb.retain_not(|tag, _| tlb::tag_vm(tag) == v);
        Ok(())
    }

    /// Empties the TLB.
    pub fn invalidate_all(&mut self) {
        self.tlb.clear();
    }

    /// Drops every entry of guest `vm` built from a guest-physical page in `[gpa, gpa + length)`.
    pub fn invalidate_gpa(&mut self, vm: u64, gpa: u64, length: u64) -> Result<(), MmuError> {
        let v = self.check_vm(vm, true)?;
        if length == 0 {
            return Err(invalid("length", length, "an integer in [1, 2**64)"));
        }
        let hi = u128::from(gpa) + u128::from(length);
        if hi > 1 << 64 {
            return Err(invalid("gpa + length", hi, "at most 2**64"));
        }
        let lo = gpa & !0xFFF;
        self.tlb
            .retain_not(|tag, origin| tlb::tag_vm(tag) == v && origin.touches(lo, hi));
        Ok(())
    }
}

#[cfg(test)]
mod tests;
