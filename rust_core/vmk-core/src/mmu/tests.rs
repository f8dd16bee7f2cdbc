//! Unit tests of the processor; the Python suites compare it with the reference.
#![allow(clippy::unwrap_used)]

use super::*;

const ALL: u64 = (0o777 << 52) | 1;

fn put(cpu: &mut Processor, addr: u64, value: u64) {
    cpu.write_phys(addr, &value.to_le_bytes()).unwrap();
}

/// Maps 4 KiB page `vaddr -> pa` with tables at 0x1000.. (host, no hypervisor).
fn simple() -> Processor {
    let mut cpu = Processor::new(4 << 20, false, false, 15, 64).unwrap();
    put(&mut cpu, 0x1000, 0x2000 | ALL);
    put(&mut cpu, 0x2000, 0x3000 | ALL);
    put(&mut cpu, 0x3000, 0x4000 | ALL);
    put(&mut cpu, 0x4000 + 8 * 5, 0x9000 | ALL);
    put(&mut cpu, 0x3000 + 8, 0x20_0000 | ALL | PS_BIT);
    cpu.set_table_root(0, 0, 0x1000).unwrap();
    cpu
}

const PS_BIT: u64 = 1 << 7;

#[test]
fn four_kib_and_huge_pages_translate_and_cache() {
    let mut cpu = simple();
    assert_eq!(cpu.translate(0x5123, READ, 1), Ok(0x9123));
    assert_eq!(cpu.stats().table_reads, 4);
    assert_eq!(cpu.translate(0x5FF8, WRITE, 8), Ok(0x9FF8));
    assert_eq!(cpu.stats().tlb_hits, 1);
    assert_eq!(cpu.translate(0x20_1234, READ, 1), Ok(0x20_1234));
    let f = cpu.translate(0x6000, READ, 1).unwrap_err();
    assert_eq!((f.code, f.stage, f.level), (NOT_PRESENT, 1, 1));
}

#[test]
fn bad_addresses_fault_before_walking() {
    let mut cpu = simple();
    assert_eq!(
        cpu.translate(1 << 47, READ, 1).unwrap_err().code,
        NON_CANONICAL
    );
    assert_eq!(
        cpu.translate(0x5FFF, READ, 8).unwrap_err().code,
        PAGE_CROSSING
    );
    assert_eq!(
        cpu.translate(u64::MAX, READ, 8).unwrap_err().code,
        PAGE_CROSSING
    );
    assert_eq!(
        cpu.translate(u64::MAX, READ, 1).unwrap_err().code,
        NOT_PRESENT
    );
    assert_eq!(cpu.stats().walks, 1);
}

#[test]
fn reserved_bits_and_out_of_range() {
    let mut cpu = simple();
    put(&mut cpu, 0x3000 + 16, 0x20_2000 | ALL | PS_BIT); // misaligned 2 MiB page
    let f = cpu.translate(0x40_0000, READ, 1).unwrap_err();
    assert_eq!((f.code, f.level), (RESERVED_BIT, 2));
    put(&mut cpu, 0x3000 + 24, 0xFFFF_0000_0000 | ALL); // table past memory
    let f = cpu.translate(0x60_0000, READ, 1).unwrap_err();
    assert_eq!((f.code, f.level), (OUT_OF_RANGE, 1));
}

#[test]
fn self_referencing_tables_terminate() {
    let mut cpu = Processor::new(1 << 20, false, false, 15, 64).unwrap();
    put(&mut cpu, 0x1000, 0x1000 | ALL);
    cpu.set_table_root(0, 0, 0x1000).unwrap();
    assert_eq!(cpu.translate(0x10, READ, 1), Ok(0x1010));
    assert_eq!(cpu.stats().table_reads, 4);
}

#[test]
fn permissions_are_per_domain() {
    let mut cpu = simple();
    // OS domain: read only on the leaf.
    put(
        &mut cpu,
        0x4000 + 8 * 5,
        0x9000 | 1 | (0o7 << 52) | (0o1 << 55),
    );
    cpu.set_table_root(0, 1, 0x1000).unwrap();
    cpu.set_entry_points(1, &[0x100]).unwrap();
    cpu.enter_domain(1, 0x100).unwrap();
    assert_eq!(cpu.translate(0x5000, READ, 1), Ok(0x9000));
    let f = cpu.translate(0x5000, WRITE, 1).unwrap_err();
    assert_eq!((f.code, f.level), (PERMISSION, 1));
    assert!(matches!(
        cpu.write_vm_register(1),
        Err(MmuError::RegisterAccess { .. })
    ));
    assert_eq!(cpu.vm_register(), 0);
    assert!(matches!(
        cpu.enter_domain(0, 0x100),
        Err(MmuError::DomainEntry { .. })
    ));
}

#[test]
fn two_stage_walk_reads_at_most_24_entries() {
    let mut cpu = Processor::new(8 << 20, true, false, 15, 64).unwrap();
    // Stage 2 at 0x1000: identity map of the first 8 MiB with 4 KiB pages.
    put(&mut cpu, 0x1000, 0x2000 | ALL);
    put(&mut cpu, 0x2000, 0x3000 | ALL);
    for i in 0..4u64 {
        put(&mut cpu, 0x3000 + 8 * i, (0x10_0000 + i * 0x1000) | ALL);
        for j in 0..512u64 {
            let gpa = (i << 21) | (j << 12);
            put(&mut cpu, 0x10_0000 + i * 0x1000 + 8 * j, gpa | ALL);
        }
    }
    cpu.set_stage2_root(1, 0x1000).unwrap();
    put(&mut cpu, 0x20_0000, 0x20_1000 | ALL);
    put(&mut cpu, 0x20_1000, 0x20_2000 | ALL);
    put(&mut cpu, 0x20_2000, 0x20_3000 | ALL);
    put(&mut cpu, 0x20_3000 + 8 * 3, 0x30_0000 | ALL);
    cpu.set_table_root(1, 0, 0x20_0000).unwrap();
    cpu.write_vm_register(1).unwrap();
    assert_eq!(cpu.translate(0x3abc, READ, 1), Ok(0x30_0abc));
    assert_eq!(cpu.stats().table_reads, 24);
    // Host view differs (no host tables) and the VM's entry survives the switch.
    cpu.write_vm_register(0).unwrap();
    assert!(cpu.translate(0x3abc, READ, 1).is_err());
    cpu.write_vm_register(1).unwrap();
    assert_eq!(cpu.translate(0x3abd, READ, 1), Ok(0x30_0abd));
    assert_eq!(cpu.stats().tlb_hits, 1);
    // Remapping the guest page through stage 2 needs invalidate_gpa.
    put(&mut cpu, 0x10_1000 + 8 * 0x100, 0x40_0000 | ALL);
    assert_eq!(cpu.translate(0x3abc, READ, 1), Ok(0x30_0abc));
    cpu.invalidate_gpa(1, 0x30_0000, 1).unwrap();
    assert_eq!(cpu.translate(0x3abc, READ, 1), Ok(0x40_0abc));
    // Isolation: a fresh processor with ownership enforced.
    assert_eq!(cpu.isolation_violation(1), Ok(Some(0)));
}

#[test]
fn batch_equals_scalar() {
    let mut a = simple();
    let mut b = simple();
    let addrs = [0x5000, 0x5001, 1 << 47, 0x20_0000, 0x6000, 0x5000];
    let mut out = [0u64; 6];
    let mut codes = [0u8; 6];
    a.translate_batch(&addrs, READ, 1, &mut out, &mut codes);
    for (i, v) in addrs.iter().enumerate() {
        match b.translate(*v, READ, 1) {
            Ok(h) => assert_eq!((out[i], codes[i]), (h, 0)),
            Err(f) => assert_eq!((out[i], codes[i]), (0, f.code)),
        }
    }
    assert_eq!(a.stats(), b.stats());
}

#[test]
fn bad_arguments_are_typed_errors() {
    assert!(Processor::new(100, false, false, 15, 64).is_err());
    assert!(Processor::new(4096, false, false, 0, 64).is_err());
    assert!(Processor::new(4096, false, false, 15, 63).is_err());
    let mut cpu = simple();
    assert!(cpu.read_phys(u64::MAX, 2).is_err());
    assert!(cpu.write_phys(4 << 20, &[1]).is_err());
    assert!(cpu.set_stage2_root(0, 0).is_err());
    assert!(cpu.set_stage2_root(16, 0).is_err());
    assert!(cpu.set_table_root(0, 3, 0).is_err());
    assert!(cpu.set_table_root(0, 0, 0x123).is_err());
    assert!(check_access(3).is_err());
    assert!(check_size(3).is_err());
    assert!(cpu.invalidate_gpa(1, u64::MAX, 2).is_err());
    assert!(cpu.set_register_permission("vmr", 1, true, true).is_err());
    assert!(cpu.read_register("nope").is_err());
}
