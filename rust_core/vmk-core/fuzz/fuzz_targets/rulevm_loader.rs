//! Any bytes given to the threat-rule loader give a program or a VerifyError, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmk_core::rulevm::{decode, Engine};

fuzz_target!(|data: &[u8]| {
    let mut with_magic = b"VMKR\x02\x00".to_vec();
    with_magic.extend_from_slice(data);
    for bytes in [data, &with_magic[..]] {
        if let Ok(prog) = decode(bytes) {
            let _ = Engine::new(vec![prog], 8);
        }
    }
});
