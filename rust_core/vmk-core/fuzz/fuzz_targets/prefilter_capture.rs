//! Capture-file bytes into the pcap / pcapng reader: no panic, and every
//! returned frame lies inside the returned buffer.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmk_core::prefilter::capture::read_capture;
use vmk_core::prefilter::check_batch;

fuzz_target!(|data: &[u8]| {
    if let Ok(frames) = read_capture(data) {
        assert!(check_batch(frames.data.len(), &frames.offsets, &frames.lengths).is_ok());
    }
});
