//! Python exception classes raised by the extension.
//!
//! Design: the extension defines no exception of its own; it imports the
//! classes of `vmkernel.errors` so an error looks the same whichever
//! implementation raised it. Each module wrapper maps its `vmk_core` error
//! enum to these with a `to_py_err` function. Add further imports here.

use pyo3::prelude::*;
use pyo3::IntoPyObject;

pyo3::import_exception!(vmkernel.errors, InvalidArgument);
pyo3::import_exception!(vmkernel.errors, BufferLayoutError);

/// `InvalidArgument(thing, value, expected)`.
pub(crate) fn invalid_argument<V>(
    thing: impl Into<String>,
    value: V,
    expected: impl Into<String>,
) -> PyErr
where
    V: for<'py> IntoPyObject<'py> + Send + Sync + 'static,
{
    InvalidArgument::new_err((thing.into(), value, expected.into()))
}

/// `BufferLayoutError(thing, value, expected)`.
pub(crate) fn buffer_layout<V>(
    thing: impl Into<String>,
    value: V,
    expected: impl Into<String>,
) -> PyErr
where
    V: for<'py> IntoPyObject<'py> + Send + Sync + 'static,
{
    BufferLayoutError::new_err((thing.into(), value, expected.into()))
}

/// A batch whose `offsets` and `lengths` differ in length (shared by every
/// `(buffer, offsets, lengths)` batch API, so they all say it the same way).
pub(crate) fn batch_length_mismatch(offsets: usize, lengths: usize) -> PyErr {
    buffer_layout("len(lengths)", lengths, format!("{offsets} (len(offsets))"))
}

/// Batch item `index` ends at `end`, past the buffer (or past 2**64 when
/// `overflow`).
pub(crate) fn batch_out_of_bounds(
    index: usize,
    end: u128,
    buffer_len: usize,
    overflow: bool,
) -> PyErr {
    let expected = if overflow {
        format!("below 2**64 and at most {buffer_len} (len(buffer))")
    } else {
        format!("at most {buffer_len} (len(buffer))")
    };
    buffer_layout(
        format!("offsets[{index}] + lengths[{index}]"),
        end,
        expected,
    )
}

/// The Python error for a rejected batch layout (every batch API maps its
/// `vmk_core::batch::BatchLayoutError` here, as the reference raises it).
pub(crate) fn batch_layout_err(err: vmk_core::batch::BatchLayoutError) -> PyErr {
    use vmk_core::batch::BatchLayoutError as E;
    match err {
        E::LengthMismatch { offsets, lengths } => batch_length_mismatch(offsets, lengths),
        E::Overflow {
            index,
            offset,
            length,
            buffer_len,
        } => batch_out_of_bounds(
            index,
            u128::from(offset) + u128::from(length),
            buffer_len,
            true,
        ),
        E::OutOfBounds {
            index,
            offset,
            length,
            buffer_len,
        } => batch_out_of_bounds(
            index,
            u128::from(offset) + u128::from(length),
            buffer_len,
            false,
        ),
    }
}
