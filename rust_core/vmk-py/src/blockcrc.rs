//! Python face of `vmk_core::blockcrc`: per-block CRC-32C tables over any
//! C-contiguous buffer, computed with the GIL released.

use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyBytes, PyInt};
use vmk_core::blockcrc::{self, BlockCrcError};

use crate::buffers::{bytes_of, export};
use crate::errors::{buffer_layout, invalid_argument};

const BUFFER_EXPECTED: &str = "bytes, bytearray, memoryview or another C-contiguous buffer";

fn to_py_err(err: BlockCrcError) -> PyErr {
    match err {
        BlockCrcError::BadBlockSize(block) => {
            invalid_argument("block_size", block, "a positive multiple of 512")
        }
        BlockCrcError::PartialBlock { len, block } => buffer_layout(
            "len(data)",
            len,
            format!("a multiple of the block size {block}"),
        ),
        BlockCrcError::TableLength { table, blocks } => buffer_layout(
            "len(table)",
            table,
            format!("{} (4 bytes per block of data)", 4 * blocks),
        ),
    }
}

/// The block size argument: any Python int (a negative or huge one is an
/// `InvalidArgument`, as in the reference), anything else a `TypeError`.
struct BlockSize(usize);

impl FromPyObject<'_, '_> for BlockSize {
    type Error = PyErr;

    fn extract(obj: Borrowed<'_, '_, PyAny>) -> PyResult<Self> {
        if obj.is_instance_of::<PyBool>() || !obj.is_instance_of::<PyInt>() {
            let kind = obj.get_type().name()?;
            return Err(PyTypeError::new_err(format!(
                "block_size must be an int, not {kind}"
            )));
        }
        match obj.extract::<usize>() {
            Ok(size) if size > 0 && size % 512 == 0 => Ok(Self(size)),
            _ => Err(invalid_argument(
                "block_size",
                obj.to_owned().unbind(),
                "a positive multiple of 512",
            )),
        }
    }
}

/// CRC-32C of each `block_size`-byte block of `data`, as little-endian u32s.
#[pyfunction]
#[pyo3(signature = (data, block_size = BlockSize(4096)), text_signature = "(data, block_size=4096)")]
fn crc32c_blocks<'py>(
    py: Python<'py>,
    data: &Bound<'py, PyAny>,
    block_size: BlockSize,
) -> PyResult<Bound<'py, PyBytes>> {
    let block_size = block_size.0;
    let buf = export(data, "data", BUFFER_EXPECTED)?;
    let bytes = bytes_of(&buf, "data")?;
    let mut out = Vec::new();
    py.detach(|| blockcrc::crc32c_blocks(bytes, block_size, &mut out))
        .map_err(to_py_err)?;
    Ok(PyBytes::new(py, &out))
}

/// Index of the first block of `data` whose CRC-32C differs from `table`, or None.
#[pyfunction]
#[pyo3(
    signature = (data, table, block_size = BlockSize(4096)),
    text_signature = "(data, table, block_size=4096)"
)]
fn crc32c_first_mismatch(
    py: Python<'_>,
    data: &Bound<'_, PyAny>,
    table: &Bound<'_, PyAny>,
    block_size: BlockSize,
) -> PyResult<Option<usize>> {
    let block_size = block_size.0;
    let buf = export(data, "data", BUFFER_EXPECTED)?;
    let bytes = bytes_of(&buf, "data")?;
    let tbuf = export(table, "table", BUFFER_EXPECTED)?;
    let tbytes = bytes_of(&tbuf, "table")?;
    py.detach(|| blockcrc::first_mismatch(bytes, tbytes, block_size))
        .map_err(to_py_err)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(crc32c_blocks, m)?)?;
    m.add_function(wrap_pyfunction!(crc32c_first_mismatch, m)?)?;
    Ok(())
}
