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
