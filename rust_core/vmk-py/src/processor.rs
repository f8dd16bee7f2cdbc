//! Python class `vmkernel._core.Processor` wrapping `vmk_core::mmu`.
//!
//! Design: a `frozen` class holding the processor in a `Mutex` (like
//! `JournalChain`), so a batch translates with the GIL released while other
//! threads wait instead of failing with "already borrowed". Arguments are
//! type-checked here with the same thing/value/expected as the pure-Python
//! reference; range checks live in the core. `translate_batch` reads and
//! writes the caller's buffers in place; when the two overlap the input is
//! copied first so no mutable slice ever aliases a shared one.

use std::sync::{Mutex, MutexGuard, PoisonError};

use pyo3::prelude::*;
use pyo3::types::{PyByteArray, PyBytes, PyDict};
use vmk_core::mmu::{
    check_access, check_domain, check_size, Fault, MmuError, Processor, Value, DEFAULT_MAX_VM_ID,
    DEFAULT_TLB_ENTRIES, EXPECTED_ACCESS, EXPECTED_DOMAIN, EXPECTED_READABLE, EXPECTED_REGISTER,
    EXPECTED_SIZE, EXPECTED_U64, FAULT_KINDS, MAX_MEMORY,
};

use crate::buffers::{bytes_of, export};
use crate::errors::{buffer_layout, invalid_argument, InvalidArgument};

pyo3::import_exception!(vmkernel.errors, TranslationFault);
pyo3::import_exception!(vmkernel.errors, RegisterAccessFault);
pyo3::import_exception!(vmkernel.errors, DomainEntryFault);

/// Batches at least this long translate with the GIL released.
const DETACH_THRESHOLD: usize = 256;

const U64_BUFFER: &str = "a buffer of unsigned 64-bit integers (array('Q'), numpy uint64, \
                          memoryview cast 'Q') or of bytes";

fn mmu_err(err: MmuError) -> PyErr {
    match err {
        MmuError::Invalid {
            thing,
            value,
            expected,
        } => match value {
            Value::Int(v) => InvalidArgument::new_err((thing, v, expected)),
            Value::Text(v) => InvalidArgument::new_err((thing, v, expected)),
            Value::Bool(v) => InvalidArgument::new_err((thing, v, expected)),
        },
        MmuError::RegisterAccess {
            register,
            domain,
            operation,
            expected,
        } => RegisterAccessFault::new_err((register, domain, operation, expected)),
        MmuError::DomainEntry {
            domain,
            address,
            expected,
        } => DomainEntryFault::new_err((domain, address, expected)),
    }
}

fn fault_err(fault: Fault, vaddr: u64) -> PyErr {
    let kind = FAULT_KINDS
        .get(usize::from(fault.code))
        .copied()
        .unwrap_or("unknown");
    TranslationFault::new_err((kind, fault.stage, fault.level, vaddr, fault.gpa))
}

/// An integer argument in `[0, 2**64)`; anything else is `InvalidArgument(thing, obj, expected)`.
fn int_arg(obj: &Bound<'_, PyAny>, thing: &str, expected: &str) -> PyResult<u64> {
    obj.extract::<u64>()
        .map_err(|_| invalid_argument(thing, obj.clone().unbind(), expected))
}

fn str_arg(obj: &Bound<'_, PyAny>, thing: &str, expected: &str) -> PyResult<String> {
    obj.extract::<String>()
        .map_err(|_| invalid_argument(thing, obj.clone().unbind(), expected))
}

fn vm_expected(guest: bool, max: u16) -> String {
    if guest {
        format!("a guest VM id in [1, {max}]")
    } else {
        format!("a VM id in [0, {max}]")
    }
}

/// Checks a batch buffer like the reference does and returns its bytes.
fn u64_bytes<'a>(
    buf: &'a pyo3::buffer::PyUntypedBuffer,
    thing: &str,
    writable: bool,
) -> PyResult<&'a [u8]> {
    if writable && buf.readonly() {
        return Err(buffer_layout(
            format!("{thing}.readonly"),
            true,
            "False (a writable buffer)",
        ));
    }
    if buf.dimensions() != 1 {
        return Err(buffer_layout(
            format!("{thing}.ndim"),
            buf.dimensions(),
            "1",
        ));
    }
    if !buf.is_c_contiguous() {
        return Err(buffer_layout(
            format!("{thing}.c_contiguous"),
            false,
            "True (a C-contiguous buffer)",
        ));
    }
    let format = buf.format().to_bytes();
    let is_bytes = buf.item_size() == 1
        && matches!(
            format,
            [b'B' | b'b' | b'c'] | [b'@' | b'=' | b'<' | b'>', b'B'] | [b'@', b'b']
        );
    if is_bytes {
        if buf.len_bytes() % 8 != 0 {
            return Err(buffer_layout(
                format!("len({thing})"),
                buf.len_bytes(),
                "a multiple of 8 bytes",
            ));
        }
    } else if buf.item_size() != 8 || !is_native_u64(format) {
        return Err(buffer_layout(
            format!("{thing}.format"),
            String::from_utf8_lossy(format).into_owned(),
            format!("'Q' ({U64_BUFFER})"),
        ));
    }
    bytes_of(buf, thing)
}

fn is_native_u64(format: &[u8]) -> bool {
    match format {
        [b'Q' | b'L' | b'N'] | [b'@', b'Q' | b'L' | b'N'] | [b'=', b'Q'] => true,
        [b'<', b'Q'] => cfg!(target_endian = "little"),
        [b'>' | b'!', b'Q'] => cfg!(target_endian = "big"),
        _ => false,
    }
}

/// An emulated processor with a VM register, a domain register and
/// domain-based two-stage x86-64-format address translation.
#[pyclass(frozen, module = "vmkernel._core", name = "Processor")]
pub struct PyProcessor {
    inner: Mutex<Processor>,
    max_vm: u16,
}

impl PyProcessor {
    /// A poisoned lock cannot leave a half-applied change that matters
    /// (nothing panics inside), so poisoning is ignored.
    fn cpu(&self) -> MutexGuard<'_, Processor> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn vm_arg(&self, obj: &Bound<'_, PyAny>, guest: bool) -> PyResult<u64> {
        int_arg(obj, "vm", &vm_expected(guest, self.max_vm))
    }
}

fn domain_arg(obj: &Bound<'_, PyAny>) -> PyResult<u64> {
    int_arg(obj, "domain", EXPECTED_DOMAIN)
}

fn access_arg(obj: &Bound<'_, PyAny>) -> PyResult<u8> {
    check_access(int_arg(obj, "access", EXPECTED_ACCESS)?).map_err(mmu_err)
}

fn size_arg(obj: Option<&Bound<'_, PyAny>>) -> PyResult<u64> {
    match obj {
        None => Ok(1),
        Some(o) => check_size(int_arg(o, "size", EXPECTED_SIZE)?).map_err(mmu_err),
    }
}

#[pymethods]
impl PyProcessor {
    #[new]
    #[pyo3(
        signature = (memory_bytes = None, hypervisor = None, *, isolation = None, max_vm_id = None, tlb_entries = None),
        text_signature = "(memory_bytes=67108864, hypervisor=False, *, isolation=False, max_vm_id=4095, tlb_entries=4096)"
    )]
    fn new(
        memory_bytes: Option<&Bound<'_, PyAny>>,
        hypervisor: Option<&Bound<'_, PyAny>>,
        isolation: Option<&Bound<'_, PyAny>>,
        max_vm_id: Option<&Bound<'_, PyAny>>,
        tlb_entries: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        let mem = match memory_bytes {
            None => 64 << 20,
            Some(o) => int_arg(
                o,
                "memory_bytes",
                &format!("a multiple of 4096 in [4096, {MAX_MEMORY}]"),
            )?,
        };
        let hyp = hypervisor
            .map(Bound::is_truthy)
            .transpose()?
            .unwrap_or(false);
        let iso = isolation
            .map(Bound::is_truthy)
            .transpose()?
            .unwrap_or(false);
        let max_vm = match max_vm_id {
            None => u64::from(DEFAULT_MAX_VM_ID),
            Some(o) => int_arg(o, "max_vm_id", "an integer in [1, 65535]")?,
        };
        let tlb = match tlb_entries {
            None => DEFAULT_TLB_ENTRIES as u64,
            Some(o) => int_arg(o, "tlb_entries", "a power of two in [16, 1048576]")?,
        };
        let cpu = Processor::new(mem, hyp, iso, max_vm, tlb).map_err(mmu_err)?;
        Ok(Self {
            max_vm: cpu.max_vm_id(),
            inner: Mutex::new(cpu),
        })
    }

    /// Size of physical memory in bytes.
    #[getter]
    fn memory_bytes(&self) -> u64 {
        self.cpu().memory_bytes()
    }

    /// The hypervisor status register (fixed at construction).
    #[getter]
    fn hypervisor(&self) -> bool {
        self.cpu().hypervisor()
    }

    /// Whether guests may reach only frames they own or were granted.
    #[getter]
    fn isolation(&self) -> bool {
        self.cpu().isolation()
    }

    /// The largest accepted VM id (0 is the host).
    #[getter]
    fn max_vm_id(&self) -> u16 {
        self.max_vm
    }

    /// Number of TLB slots.
    #[getter]
    fn tlb_entries(&self) -> usize {
        self.cpu().tlb_entries()
    }

    /// The VM register: the id of the running VM (0 = host).
    #[getter]
    fn vm_register(&self) -> u16 {
        self.cpu().vm_register()
    }

    /// The domain register: the current domain.
    #[getter]
    fn domain<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let d = self.cpu().domain();
        py.import("vmkernel.enums")?.getattr("Domain")?.call1((d,))
    }

    /// ``n`` bytes of physical memory at ``addr``.
    fn read_phys<'py>(
        &self,
        py: Python<'py>,
        addr: &Bound<'py, PyAny>,
        n: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let a = int_arg(addr, "addr", EXPECTED_U64)?;
        let count = int_arg(n, "n", EXPECTED_U64)?;
        let cpu = self.cpu();
        let data = cpu.read_phys(a, count).map_err(mmu_err)?;
        Ok(PyBytes::new(py, data))
    }

    /// Writes ``data`` (any bytes-like object) to physical memory at ``addr``.
    fn write_phys(&self, addr: &Bound<'_, PyAny>, data: &Bound<'_, PyAny>) -> PyResult<()> {
        let a = int_arg(addr, "addr", EXPECTED_U64)?;
        let buf = export(data, "data", "a bytes-like object")?;
        let bytes = bytes_of(&buf, "data")?;
        self.cpu().write_phys(a, bytes).map_err(mmu_err)
    }

    /// Sets the first-stage root of ``(vm, domain)``: physical for the host or
    /// without hypervisor, guest-physical otherwise.
    fn set_table_root(
        &self,
        vm: &Bound<'_, PyAny>,
        domain: &Bound<'_, PyAny>,
        addr: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let v = self.vm_arg(vm, false)?;
        let d = domain_arg(domain)?;
        let a = int_arg(addr, "addr", EXPECTED_U64)?;
        self.cpu().set_table_root(v, d, a).map_err(mmu_err)
    }

    /// The first-stage root of ``(vm, domain)``, or None.
    fn table_root(
        &self,
        vm: &Bound<'_, PyAny>,
        domain: &Bound<'_, PyAny>,
    ) -> PyResult<Option<u64>> {
        let v = self.vm_arg(vm, false)?;
        let d = domain_arg(domain)?;
        self.cpu().table_root(v, d).map_err(mmu_err)
    }

    /// Sets the second-stage (guest-physical -> host-physical) root of guest ``vm``.
    fn set_stage2_root(&self, vm: &Bound<'_, PyAny>, addr: &Bound<'_, PyAny>) -> PyResult<()> {
        let v = self.vm_arg(vm, true)?;
        let a = int_arg(addr, "addr", EXPECTED_U64)?;
        self.cpu().set_stage2_root(v, a).map_err(mmu_err)
    }

    /// The second-stage root of guest ``vm``, or None.
    fn stage2_root(&self, vm: &Bound<'_, PyAny>) -> PyResult<Option<u64>> {
        let v = self.vm_arg(vm, true)?;
        self.cpu().stage2_root(v).map_err(mmu_err)
    }

    /// Switches the running VM.  Only the hypervisor domain may; never flushes the TLB.
    fn write_vm_register(&self, vm: &Bound<'_, PyAny>) -> PyResult<()> {
        let v = self.vm_arg(vm, false)?;
        self.cpu().write_vm_register(v).map_err(mmu_err)
    }

    /// Reads ``vmr``, ``table_root`` (current VM and domain) or ``stage2_root`` (current VM).
    fn read_register(&self, name: &Bound<'_, PyAny>) -> PyResult<Option<u64>> {
        let n = str_arg(name, "name", EXPECTED_READABLE)?;
        self.cpu().read_register(&n).map_err(mmu_err)
    }

    /// Sets whether ``domain`` may read / write ``register``.
    fn set_register_permission(
        &self,
        register: &Bound<'_, PyAny>,
        domain: &Bound<'_, PyAny>,
        read: &Bound<'_, PyAny>,
        write: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let r = str_arg(register, "register", EXPECTED_REGISTER)?;
        let d = domain_arg(domain)?;
        let (rd, wr) = (read.is_truthy()?, write.is_truthy()?);
        self.cpu()
            .set_register_permission(&r, d, rd, wr)
            .map_err(mmu_err)
    }

    /// ``(read, write)`` of ``domain`` on ``register``.
    fn register_permission(
        &self,
        register: &Bound<'_, PyAny>,
        domain: &Bound<'_, PyAny>,
    ) -> PyResult<(bool, bool)> {
        let r = str_arg(register, "register", EXPECTED_REGISTER)?;
        let d = domain_arg(domain)?;
        self.cpu().register_permission(&r, d).map_err(mmu_err)
    }

    /// Replaces the allowed entry points of ``domain``.
    fn set_entry_points(
        &self,
        domain: &Bound<'_, PyAny>,
        addrs: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let d = check_domain(domain_arg(domain)?).map_err(mmu_err)?;
        let mut points = Vec::new();
        for item in addrs.try_iter()? {
            points.push(int_arg(&item?, "addrs[]", EXPECTED_U64)?);
        }
        self.cpu()
            .set_entry_points(u64::from(d), &points)
            .map_err(mmu_err)
    }

    /// The allowed entry points of ``domain``, sorted.
    fn entry_points(&self, domain: &Bound<'_, PyAny>) -> PyResult<Vec<u64>> {
        let d = domain_arg(domain)?;
        self.cpu().entry_points(d).map_err(mmu_err)
    }

    /// Enters ``domain`` at ``address``; anywhere but an entry point faults.
    fn enter_domain(&self, domain: &Bound<'_, PyAny>, address: &Bound<'_, PyAny>) -> PyResult<()> {
        let d = check_domain(domain_arg(domain)?).map_err(mmu_err)?;
        let a = int_arg(address, "address", EXPECTED_U64)?;
        self.cpu().enter_domain(u64::from(d), a).map_err(mmu_err)
    }

    /// Gives the frames in ``[addr, addr + length)`` to ``vm`` (0 = host); under isolation the
    /// previous owners' TLB entries are dropped.
    fn set_frame_owner(
        &self,
        addr: &Bound<'_, PyAny>,
        length: &Bound<'_, PyAny>,
        vm: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let a = int_arg(addr, "addr", EXPECTED_U64)?;
        let n = int_arg(length, "length", EXPECTED_U64)?;
        let v = self.vm_arg(vm, false)?;
        self.cpu().set_frame_owner(a, n, v).map_err(mmu_err)
    }

    /// The owner of the frame holding physical address ``addr``.
    fn frame_owner(&self, addr: &Bound<'_, PyAny>) -> PyResult<u16> {
        let a = int_arg(addr, "addr", EXPECTED_U64)?;
        self.cpu().frame_owner(a).map_err(mmu_err)
    }

    /// Lets guest ``vm`` reach frames it does not own (nothing is dropped from the TLB).
    fn grant_frames(
        &self,
        vm: &Bound<'_, PyAny>,
        addr: &Bound<'_, PyAny>,
        length: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let v = self.vm_arg(vm, true)?;
        let a = int_arg(addr, "addr", EXPECTED_U64)?;
        let n = int_arg(length, "length", EXPECTED_U64)?;
        self.cpu().grant_frames(v, a, n).map_err(mmu_err)
    }

    /// Withdraws grants made by ``grant_frames``; under isolation ``vm``'s TLB entries are dropped.
    fn revoke_frames(
        &self,
        vm: &Bound<'_, PyAny>,
        addr: &Bound<'_, PyAny>,
        length: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let v = self.vm_arg(vm, true)?;
        let a = int_arg(addr, "addr", EXPECTED_U64)?;
        let n = int_arg(length, "length", EXPECTED_U64)?;
        self.cpu().revoke_frames(v, a, n).map_err(mmu_err)
    }

    /// The lowest host address that guest ``vm`` can reach through its
    /// second-stage tables (table pages included) without owning it or having
    /// it granted, or None.
    fn isolation_violation(&self, vm: &Bound<'_, PyAny>) -> PyResult<Option<u64>> {
        let v = self.vm_arg(vm, true)?;
        self.cpu().isolation_violation(v).map_err(mmu_err)
    }

    /// The host-physical address of a ``size``-byte ``access`` at ``vaddr`` in
    /// the current VM and domain; raises :class:`TranslationFault`.
    #[pyo3(signature = (vaddr, access, size = None), text_signature = "(self, vaddr, access, size=1)")]
    fn translate(
        &self,
        vaddr: &Bound<'_, PyAny>,
        access: &Bound<'_, PyAny>,
        size: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<u64> {
        let v = int_arg(vaddr, "vaddr", EXPECTED_U64)?;
        let a = access_arg(access)?;
        let s = size_arg(size)?;
        self.cpu().translate(v, a, s).map_err(|f| fault_err(f, v))
    }

    /// Like ``translate`` but bypassing the TLB (neither read nor filled).
    #[pyo3(signature = (vaddr, access, size = None), text_signature = "(self, vaddr, access, size=1)")]
    fn walk(
        &self,
        vaddr: &Bound<'_, PyAny>,
        access: &Bound<'_, PyAny>,
        size: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<u64> {
        let v = int_arg(vaddr, "vaddr", EXPECTED_U64)?;
        let a = access_arg(access)?;
        let s = size_arg(size)?;
        self.cpu().walk(v, a, s).map_err(|f| fault_err(f, v))
    }

    /// Translates every address of the u64 buffer ``vaddrs`` into ``out`` (same
    /// length, 0 where a fault occurred) and returns the fault codes
    /// (``FAULT_KINDS`` index, 0 = translated), exactly as scalar calls would.
    #[pyo3(signature = (vaddrs, access, out, size = None), text_signature = "(self, vaddrs, access, out, size=1)")]
    fn translate_batch<'py>(
        &self,
        py: Python<'py>,
        vaddrs: &Bound<'py, PyAny>,
        access: &Bound<'py, PyAny>,
        out: &Bound<'py, PyAny>,
        size: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyByteArray>> {
        let a = access_arg(access)?;
        let s = size_arg(size)?;
        let src_export = export(vaddrs, "vaddrs", U64_BUFFER)?;
        let src_bytes = u64_bytes(&src_export, "vaddrs", false)?;
        let dst_export = export(out, "out", U64_BUFFER)?;
        u64_bytes(&dst_export, "out", true)?;
        let n = src_bytes.len() / 8;
        if dst_export.len_bytes() / 8 != n {
            return Err(buffer_layout(
                "len(out)",
                dst_export.len_bytes() / 8,
                format!("{n} (the number of vaddrs)"),
            ));
        }
        // Inputs are read before anything is written: if `out` overlaps
        // `vaddrs` (in-place translation) the input is copied first.
        let src_range = src_bytes.as_ptr_range();
        let dst_start = dst_export.buf_ptr().cast::<u8>().cast_const();
        let overlap =
            n > 0 && dst_start < src_range.end && src_range.start < dst_start.wrapping_add(n * 8);
        let input: std::borrow::Cow<'_, [u64]> = if overlap {
            std::borrow::Cow::Owned(to_u64s(src_bytes))
        } else {
            match bytemuck::try_cast_slice::<u8, u64>(src_bytes) {
                Ok(items) => std::borrow::Cow::Borrowed(items),
                Err(_) => std::borrow::Cow::Owned(to_u64s(src_bytes)),
            }
        };
        let dst_ptr = dst_export.buf_ptr().cast::<u8>();
        let dst: &mut [u8] = if n == 0 || dst_ptr.is_null() {
            &mut []
        } else {
            // SAFETY: the export `dst_export` is writable (checked by
            // `u64_bytes`), C-contiguous and `n * 8` bytes long, and it pins the
            // memory and forbids resizing until it is dropped at the end of this
            // function, after the last use of `dst`. No other Rust reference to
            // these bytes is live: `input` is an owned copy whenever the two
            // buffers overlap, and `src_bytes` is not used after this point.
            // `u8` has alignment 1 and no invalid values. As with `hashlib`, a
            // concurrent write from another thread gives an unspecified result.
            unsafe { std::slice::from_raw_parts_mut(dst_ptr, n * 8) }
        };
        let mut codes = vec![0u8; n];
        let run = |dst: &mut [u8], codes: &mut [u8]| {
            let mut cpu = self.cpu();
            match bytemuck::try_cast_slice_mut::<u8, u64>(dst) {
                Ok(out) => cpu.translate_batch(&input, a, s, out, codes),
                Err(_) => {
                    let mut tmp = vec![0u64; n];
                    cpu.translate_batch(&input, a, s, &mut tmp, codes);
                    for (chunk, v) in dst.chunks_exact_mut(8).zip(tmp) {
                        chunk.copy_from_slice(&v.to_ne_bytes());
                    }
                }
            }
        };
        if n >= DETACH_THRESHOLD {
            py.detach(|| run(dst, &mut codes));
        } else {
            run(dst, &mut codes);
        }
        Ok(PyByteArray::new(py, &codes))
    }

    /// Drops the entries of ``vm`` (every domain and page size) that map ``vaddr``.
    fn invalidate_page(&self, vm: &Bound<'_, PyAny>, vaddr: &Bound<'_, PyAny>) -> PyResult<()> {
        let v = self.vm_arg(vm, false)?;
        let a = int_arg(vaddr, "vaddr", EXPECTED_U64)?;
        self.cpu().invalidate_page(v, a).map_err(mmu_err)
    }

    /// Drops every entry of ``vm``.
    fn invalidate_vm(&self, vm: &Bound<'_, PyAny>) -> PyResult<()> {
        let v = self.vm_arg(vm, false)?;
        self.cpu().invalidate_vm(v).map_err(mmu_err)
    }

    /// Empties the TLB.
    fn invalidate_all(&self) {
        self.cpu().invalidate_all();
    }

    /// Drops every entry of guest ``vm`` built from a guest-physical page in
    /// ``[gpa, gpa + length)`` (a first-stage table page or the mapped page).
    #[pyo3(signature = (vm, gpa, length = None), text_signature = "(self, vm, gpa, length=4096)")]
    fn invalidate_gpa(
        &self,
        vm: &Bound<'_, PyAny>,
        gpa: &Bound<'_, PyAny>,
        length: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        let v = self.vm_arg(vm, true)?;
        let g = int_arg(gpa, "gpa", EXPECTED_U64)?;
        let n = match length {
            None => 4096,
            Some(o) => int_arg(o, "length", "an integer in [1, 2**64)")?,
        };
        self.cpu().invalidate_gpa(v, g, n).map_err(mmu_err)
    }

    /// Counters: ``tlb_hits``, ``tlb_misses``, ``walks``, ``table_reads``, ``faults``.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.cpu().stats();
        let d = PyDict::new(py);
        d.set_item("tlb_hits", s.tlb_hits)?;
        d.set_item("tlb_misses", s.tlb_misses)?;
        d.set_item("walks", s.walks)?;
        d.set_item("table_reads", s.table_reads)?;
        d.set_item("faults", s.faults)?;
        Ok(d)
    }

    /// Sets every counter to zero.
    fn reset_stats(&self) {
        self.cpu().reset_stats();
    }

    fn __repr__(&self) -> String {
        let cpu = self.cpu();
        let names = ["HYPERVISOR", "OS", "APPLICATION"];
        format!(
            "<Processor memory_bytes={} hypervisor={} vm_register={} domain={}>",
            cpu.memory_bytes(),
            if cpu.hypervisor() { "True" } else { "False" },
            cpu.vm_register(),
            names.get(usize::from(cpu.domain())).copied().unwrap_or("?"),
        )
    }
}

fn to_u64s(bytes: &[u8]) -> Vec<u64> {
    bytes
        .chunks_exact(8)
        .map(|c| {
            let mut item = [0u8; 8];
            item.copy_from_slice(c);
            u64::from_ne_bytes(item)
        })
        .collect()
}

/// Adds the processor class to `vmkernel._core`.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyProcessor>()
}
