//! Python class `vmkernel._core.JournalChain` wrapping
//! `vmk_core::journal_chain`.
//!
//! Design: the class is `frozen` and keeps the chain in a `Mutex`, so a batch
//! can hash with the GIL released while other threads may still read `head`
//! (they wait for the batch instead of failing with "already borrowed"). The
//! lock is never held while waiting for the GIL or calling into Python, so it
//! cannot deadlock with the interpreter. Inputs are read through the buffer
//! protocol without copying and fully validated before any state changes.

use std::sync::{Mutex, MutexGuard, PoisonError};

use pyo3::prelude::*;
use pyo3::types::PyBytes;
use vmk_core::journal_chain::JournalChain;

use crate::buffers::{bytes_of, export, u64s_of, U64_EXPECTED};
use crate::errors::{batch_layout_err, invalid_argument};

/// Lines at least this long are hashed with the GIL released by `update`.
const DETACH_THRESHOLD: usize = 4096;

const BYTES_LIKE: &str = "a bytes-like object";

/// Tamper-evident hash chain over journal lines:
/// ``head' = sha256(head || u64-LE len(line) || line)``.
#[pyclass(frozen, module = "vmkernel._core", name = "JournalChain")]
pub struct PyJournalChain {
    inner: Mutex<JournalChain>,
}

impl PyJournalChain {
    /// The chain state. A poisoned lock cannot leave a half-updated chain
    /// (state is written in one assignment), so poisoning is ignored.
    fn state(&self) -> MutexGuard<'_, JournalChain> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn wrap(chain: JournalChain) -> Self {
        Self {
            inner: Mutex::new(chain),
        }
    }
}

#[pymethods]
impl PyJournalChain {
    /// Starts a chain at ``genesis`` (32 bytes; ``None`` means 32 zero bytes).
    #[new]
    #[pyo3(signature = (genesis = None))]
    fn new(genesis: Option<&Bound<'_, PyAny>>) -> PyResult<Self> {
        let Some(genesis) = genesis else {
            return Ok(Self::wrap(JournalChain::default()));
        };
        let buf = export(genesis, "genesis", "a bytes-like object of 32 bytes")?;
        let bytes = bytes_of(&buf, "genesis")?;
        let head: [u8; 32] = bytes
            .try_into()
            .map_err(|_| invalid_argument("genesis", bytes.len(), "32 bytes"))?;
        Ok(Self::wrap(JournalChain::new(head)))
    }

    /// The current head (32 bytes).
    #[getter]
    fn head<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        let head = self.state().head();
        PyBytes::new(py, &head)
    }

    /// How many lines have been folded in.
    #[getter]
    fn count(&self) -> u64 {
        self.state().count()
    }

    /// Folds one line (any bytes-like object) into the chain; returns the new head.
    fn update<'py>(
        &self,
        py: Python<'py>,
        line: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let buf = export(line, "line", BYTES_LIKE)?;
        let bytes = bytes_of(&buf, "line")?;
        let head = if bytes.len() >= DETACH_THRESHOLD {
            py.detach(|| self.state().update(bytes))
        } else {
            self.state().update(bytes)
        };
        Ok(PyBytes::new(py, &head))
    }

    /// Folds ``buffer[offsets[i]:offsets[i] + lengths[i]]`` for each ``i``, in
    /// order; returns the new head. All-or-nothing: on error nothing changes.
    fn update_batch<'py>(
        &self,
        py: Python<'py>,
        buffer: &Bound<'py, PyAny>,
        offsets: &Bound<'py, PyAny>,
        lengths: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let buffer_export = export(buffer, "buffer", BYTES_LIKE)?;
        let offsets_export = export(offsets, "offsets", U64_EXPECTED)?;
        let lengths_export = export(lengths, "lengths", U64_EXPECTED)?;
        let data = bytes_of(&buffer_export, "buffer")?;
        let offsets = u64s_of(&offsets_export, "offsets")?;
        let lengths = u64s_of(&lengths_export, "lengths")?;
        let head = py
            .detach(|| self.state().update_batch(data, &offsets, &lengths))
            .map_err(batch_layout_err)?;
        Ok(PyBytes::new(py, &head))
    }

    /// An independent chain with the same head and count.
    fn copy(&self) -> Self {
        Self::wrap(*self.state())
    }

    fn __repr__(&self) -> String {
        let chain = *self.state();
        let hex: String = chain.head().iter().map(|b| format!("{b:02x}")).collect();
        format!("<JournalChain count={} head={hex}>", chain.count())
    }
}

/// Adds the journal chain class to `vmkernel._core`.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyJournalChain>()
}
