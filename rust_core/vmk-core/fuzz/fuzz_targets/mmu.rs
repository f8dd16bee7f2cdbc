//! Fuzz target: arbitrary table contents, roots, addresses and operations on
//! the emulated processor must never panic (every outcome is a value, a
//! `Fault` or an `MmuError`). Run: `cargo +nightly fuzz run mmu` in this directory.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmk_core::mmu::Processor;

const MEMORY: u64 = 1 << 20;

fn word(data: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    for (i, slot) in b.iter_mut().enumerate() {
        *slot = data.get(at + i).copied().unwrap_or(0);
    }
    u64::from_le_bytes(b)
}

fuzz_target!(|data: &[u8]| {
    let flags = data.first().copied().unwrap_or(0);
    let Ok(mut cpu) = Processor::new(MEMORY, flags & 1 != 0, flags & 2 != 0, 7, 16) else {
        return;
    };
    // The first 2 KiB of input become page-table entries spread over 8 table pages.
    let tables = data.get(1..).unwrap_or_default();
    let (entries, ops) = tables.split_at(tables.len().min(2048));
    for (i, chunk) in entries.chunks(8).enumerate() {
        let page = 0x1000 * (1 + (i as u64 % 8));
        let index = [0u64, 1, 2, 255, 256, 511][(i / 8) % 6];
        let _ = cpu.write_phys(page + 8 * index, &word(chunk, 0).to_le_bytes());
    }
    for vm in 0..3u64 {
        for d in 0..3u64 {
            let _ = cpu.set_table_root(vm, d, 0x1000 * (1 + (vm * 3 + d) % 8));
        }
        let _ = cpu.set_stage2_root(vm, 0x1000 * (1 + vm));
    }
    let _ = cpu.set_entry_points(1, &[0x10]);
    let _ = cpu.set_entry_points(0, &[0x20]);
    let mut at = 0;
    while at + 10 <= ops.len() {
        let op = ops[at];
        let arg = word(ops, at + 1);
        let small = u64::from(ops[at + 9]);
        at += 10;
        match op % 12 {
            0..=3 => {
                let _ = cpu.translate(
                    arg,
                    small as u8 % 3,
                    [1, 2, 4, 8][(small as usize >> 2) % 4],
                );
            }
            4 => {
                let _ = cpu.walk(arg, small as u8 % 3, 8);
            }
            5 => {
                let addrs = [arg, arg ^ 0xFFF, arg.wrapping_add(small << 12)];
                let mut out = [0u64; 3];
                let mut codes = [0u8; 3];
                cpu.translate_batch(&addrs, (small % 3) as u8, 1, &mut out, &mut codes);
            }
            6 => {
                let _ = cpu.write_vm_register(small % 9);
            }
            7 => {
                let _ = cpu.enter_domain(small % 4, arg % 0x40);
            }
            8 => {
                let _ = cpu.write_phys(arg % (MEMORY + 16), &small.to_le_bytes());
            }
            9 => {
                let _ = cpu.invalidate_gpa(small % 9, arg, small << 12);
                let _ = cpu.invalidate_page(small % 9, arg);
            }
            10 => {
                let _ =
                    cpu.set_frame_owner(arg % MEMORY & !0xFFF, (small << 12) % MEMORY, small % 9);
                let _ = cpu.grant_frames(small % 9, arg & !0xFFF, 0x1000);
            }
            _ => {
                let _ = cpu.isolation_violation(small % 9);
                cpu.invalidate_all();
            }
        }
    }
});
