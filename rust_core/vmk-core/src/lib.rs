//! `vmk-core`: the hot loops of vmkernel in plain Rust.
//!
//! Design: this crate knows nothing about Python. Each module is one fast path
//! with its own error enum; the `vmk-py` crate wraps them for Python and the
//! pure-Python models in `vmkernel/reference/` define the expected behaviour.
//! Add a module with one `pub mod` line below (keep the list sorted).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod batch;
pub mod blockcrc;
pub mod journal_chain;
pub mod mmu;
pub mod nbd;
pub mod prefilter;
pub mod rulevm;
