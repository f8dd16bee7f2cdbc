//! `vmkernel._core`: the Python face of `vmk-core`.
//!
//! Design: this crate holds no logic. Each `src/<name>.rs` wraps one
//! `vmk_core::<name>` module (conversions, buffer protocol, GIL release) and
//! exposes a `register(m)` function; the module function below calls one
//! `register` per file. To add a fast path: write `src/<name>.rs`, add its
//! `mod` line and its `register` line here, and its classes to
//! `vmkernel/_core.pyi`. Errors are the Python classes of `vmkernel.errors`
//! (see `errors.rs`), so both implementations raise the same types.

use pyo3::prelude::*;

mod buffers;
mod errors;

// One line per wrapped vmk-core module.
mod blockcrc;
mod journal_chain;
mod nbd;
mod prefilter;
mod processor;
mod rulevm;

/// Rust fast paths of vmkernel; use them through `vmkernel.fast`.
#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    // One line per wrapped vmk-core module.
    blockcrc::register(m)?;
    journal_chain::register(m)?;
    nbd::register(m)?;
    prefilter::register(m)?;
    processor::register(m)?;
    rulevm::register(m)?;
    Ok(())
}
