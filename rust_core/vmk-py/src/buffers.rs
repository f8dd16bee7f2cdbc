//! Zero-copy access to Python buffers (`bytes`, `bytearray`, `memoryview`,
//! `array.array`, numpy arrays).
//!
//! Design: [`export`] takes a buffer export (which pins the memory and forbids
//! resizing until it is dropped), [`bytes_of`] views any C-contiguous export as
//! raw bytes and [`u64s_of`] views a 1-D native unsigned 64-bit export as
//! `&[u64]`. Every rejection is a `vmkernel.errors` exception naming the
//! attribute that was wrong, with the same thing/value/expected as the pure
//! Python reference (`vmkernel/reference/`), so tests compare both directly.
//! Reading an export as a slice needs `unsafe` (here); wrappers that write
//! into a caller's output buffer do so in their own `unsafe` block, each with
//! a `SAFETY:` note.

use std::borrow::Cow;

use pyo3::buffer::PyUntypedBuffer;
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;

use crate::errors::{buffer_layout, invalid_argument};

/// What `u64s_of` accepts, for error messages.
pub(crate) const U64_EXPECTED: &str =
    "a buffer of unsigned 64-bit integers (array('Q'), numpy uint64, memoryview cast 'Q')";

/// Takes a buffer export of `obj`; a non-buffer is `InvalidArgument(thing, obj, expected)`.
pub(crate) fn export(
    obj: &Bound<'_, PyAny>,
    thing: &str,
    expected: &str,
) -> PyResult<PyUntypedBuffer> {
    PyUntypedBuffer::get(obj).map_err(|err| {
        if err.is_instance_of::<PyTypeError>(obj.py()) {
            invalid_argument(thing, obj.clone().unbind(), expected)
        } else {
            err
        }
    })
}

/// The bytes of a C-contiguous export, without copying.
pub(crate) fn bytes_of<'a>(buf: &'a PyUntypedBuffer, thing: &str) -> PyResult<&'a [u8]> {
    if !buf.is_c_contiguous() {
        return Err(buffer_layout(
            format!("{thing}.c_contiguous"),
            false,
            "True (a C-contiguous buffer)",
        ));
    }
    let len = buf.len_bytes();
    let ptr = buf.buf_ptr().cast::<u8>().cast_const();
    if len == 0 || ptr.is_null() {
        return Ok(&[]);
    }
    // SAFETY: the exporter guarantees `len` readable bytes at `ptr` for as long
    // as the export `buf` is alive, and the returned slice borrows `buf`; the
    // export is C-contiguous (checked above) so those bytes are exactly the
    // buffer; `u8` has alignment 1 and no invalid values. The export forbids
    // resizing. As with `hashlib`, another thread writing into a mutable buffer
    // while we read it with the GIL released gives an unspecified result.
    Ok(unsafe { std::slice::from_raw_parts(ptr, len) })
}

/// Whether a struct-module format string denotes a native-order unsigned
/// 64-bit integer (given that the item size is 8).
fn is_native_u64_format(format: &[u8]) -> bool {
    match format {
        [b'Q' | b'L' | b'N'] | [b'@', b'Q' | b'L' | b'N'] | [b'=', b'Q'] => true,
        [b'<', b'Q'] => cfg!(target_endian = "little"),
        [b'>' | b'!', b'Q'] => cfg!(target_endian = "big"),
        _ => false,
    }
}

/// The items of a 1-D export of native unsigned 64-bit integers; zero-copy
/// when the memory is 8-byte aligned, copied otherwise.
pub(crate) fn u64s_of<'a>(buf: &'a PyUntypedBuffer, thing: &str) -> PyResult<Cow<'a, [u64]>> {
    if buf.dimensions() != 1 {
        return Err(buffer_layout(
            format!("{thing}.ndim"),
            buf.dimensions(),
            "1",
        ));
    }
    if buf.item_size() != 8 {
        return Err(buffer_layout(
            format!("{thing}.itemsize"),
            buf.item_size(),
            format!("8 ({U64_EXPECTED})"),
        ));
    }
    let format = buf.format().to_bytes();
    if !is_native_u64_format(format) {
        return Err(buffer_layout(
            format!("{thing}.format"),
            String::from_utf8_lossy(format).into_owned(),
            format!("'Q' ({U64_EXPECTED})"),
        ));
    }
    let bytes = bytes_of(buf, thing)?;
    Ok(match bytemuck::try_cast_slice::<u8, u64>(bytes) {
        Ok(items) => Cow::Borrowed(items),
        Err(_) => Cow::Owned(
            bytes
                .chunks_exact(8)
                .map(|chunk| {
                    let mut item = [0u8; 8];
                    item.copy_from_slice(chunk);
                    u64::from_ne_bytes(item)
                })
                .collect(),
        ),
    })
}
