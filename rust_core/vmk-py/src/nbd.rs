//! Python class `vmkernel._core.NbdClient` wrapping `vmk_core::nbd`.
//!
//! Design: the class is `frozen` and keeps the connection in a `Mutex`. Every
//! call that talks to the server releases the GIL and takes the lock inside
//! the released section, so the lock is never held while waiting for the GIL
//! and two Python threads sharing a client take turns instead of interleaving
//! requests. Arguments are checked like the reference
//! (`vmkernel/reference/nbd.py`) checks them, before any byte is sent; data
//! moves through the buffer protocol without copying. Failures become the
//! `OSError` the reference raises: the same errno and message, with
//! `NbdProtocolError` for `EPROTO`.

use std::os::unix::net::UnixStream;
use std::sync::{Mutex, MutexGuard, PoisonError};

use pyo3::buffer::PyUntypedBuffer;
use pyo3::exceptions::{PyOSError, PyOverflowError};
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use vmk_core::nbd::{self, Client, NbdError};

use crate::buffers::{bytes_of, export};
use crate::errors::{buffer_layout, invalid_argument};

pyo3::import_exception!(vmkernel.errors, NbdProtocolError);

const U64_EXPECTED: &str = "an integer in [0, 2**64)";
const WRITABLE_EXPECTED: &str =
    "a writable C-contiguous buffer (bytearray, memoryview, numpy array)";
const PARTS_EXPECTED: &str = "a sequence of bytes-like objects";
const PART_EXPECTED: &str = "a bytes-like object (a C-contiguous buffer)";
const TIMEOUT_EXPECTED: &str = "a number of seconds in [0.001, 2**31)";
const PATH_EXPECTED: &str = "a str or os.PathLike path of a unix socket (no NUL byte)";

/// `os.strerror(errno)`, as the reference words server and socket errors.
fn strerror(py: Python<'_>, errno: u32) -> String {
    let text = if i32::try_from(errno).is_ok() {
        py.import("os")
            .and_then(|os| os.call_method1("strerror", (errno,)))
            .and_then(|s| s.extract::<String>())
            .ok()
    } else {
        None
    };
    text.unwrap_or_else(|| format!("unknown error {errno}"))
}

fn os_error(errno: u32, message: String) -> PyErr {
    PyOSError::new_err((errno, message))
}

fn to_py_err(py: Python<'_>, err: NbdError) -> PyErr {
    match err {
        NbdError::Protocol(detail) => NbdProtocolError::new_err((detail,)),
        NbdError::Io { errno, context } => {
            os_error(errno, format!("{context}: {}", strerror(py, errno)))
        }
        NbdError::Server {
            errno,
            ref peer,
            command,
            offset,
            length,
        } => os_error(
            errno,
            format!(
                "NBD server at {peer}: {command} of {length} bytes at offset {offset} failed: {}",
                strerror(py, errno)
            ),
        ),
        NbdError::Invalid {
            thing,
            value,
            expected,
        } => invalid_argument(thing, value, expected),
        other => os_error(other.errno(), other.to_string()),
    }
}

/// An integer argument in `[0, 2**64)`.
fn u64_arg(obj: &Bound<'_, PyAny>, thing: &str) -> PyResult<u64> {
    obj.extract::<u64>()
        .map_err(|_| invalid_argument(thing, obj.clone().unbind(), U64_EXPECTED))
}

/// `offset + length` within the 64-bit offset range, as the reference checks it.
fn range_arg(offset: u64, length: u64) -> PyResult<()> {
    if offset.checked_add(length).is_none() {
        return Err(invalid_argument(
            "offset + length",
            u128::from(offset) + u128::from(length),
            "at most 2**64 (the NBD offset range)",
        ));
    }
    Ok(())
}

/// The export name argument (default `"unit"`).
struct ExportName(String);

impl FromPyObject<'_, '_> for ExportName {
    type Error = PyErr;

    fn extract(obj: Borrowed<'_, '_, PyAny>) -> PyResult<Self> {
        let expected = format!("a str of at most {} UTF-8 bytes", nbd::MAX_EXPORT_NAME);
        match obj.extract::<String>() {
            Ok(name) if name.len() <= nbd::MAX_EXPORT_NAME => Ok(Self(name)),
            _ => Err(invalid_argument(
                "export",
                obj.to_owned().unbind(),
                expected,
            )),
        }
    }
}

/// The timeout argument in seconds (default 60).
struct Timeout(f64);

impl FromPyObject<'_, '_> for Timeout {
    type Error = PyErr;

    fn extract(obj: Borrowed<'_, '_, PyAny>) -> PyResult<Self> {
        match obj.extract::<f64>() {
            Ok(t) if (0.001..2_147_483_648.0).contains(&t) => Ok(Self(t)),
            _ => Err(invalid_argument(
                "timeout",
                obj.to_owned().unbind(),
                TIMEOUT_EXPECTED,
            )),
        }
    }
}

/// One connection to an NBD export over a unix socket.
#[pyclass(frozen, module = "vmkernel._core", name = "NbdClient")]
pub struct PyNbdClient {
    socket_path: String,
    export: String,
    size: u64,
    transmission_flags: u16,
    inner: Mutex<Client<UnixStream>>,
}

impl PyNbdClient {
    /// The connection. Every client call leaves it consistent before it
    /// returns (no call panics), so a poisoned lock is taken as it is.
    fn conn(&self) -> MutexGuard<'_, Client<UnixStream>> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Checks that an export can be filled in place (writable, C-contiguous).
fn check_writable(buf: &PyUntypedBuffer) -> PyResult<()> {
    if buf.readonly() {
        return Err(buffer_layout(
            "buf.readonly",
            true,
            "False (a writable buffer)",
        ));
    }
    if !buf.is_c_contiguous() {
        return Err(buffer_layout(
            "buf.c_contiguous",
            false,
            "True (a C-contiguous buffer)",
        ));
    }
    Ok(())
}

#[pymethods]
impl PyNbdClient {
    /// Connects to the NBD server on the unix socket ``socket_path`` and
    /// negotiates ``export``; each socket read or write times out after
    /// ``timeout`` seconds.
    #[new]
    #[pyo3(
        signature = (socket_path, export = ExportName(nbd::DEFAULT_EXPORT.to_owned()), *, timeout = Timeout(60.0)),
        text_signature = "(socket_path, export='unit', *, timeout=60.0)"
    )]
    fn new(
        py: Python<'_>,
        socket_path: &Bound<'_, PyAny>,
        export: ExportName,
        timeout: Timeout,
    ) -> PyResult<Self> {
        let path: String = py
            .import("os")?
            .call_method1("fspath", (socket_path,))
            .and_then(|p| p.extract::<String>())
            .ok()
            .filter(|p| !p.contains('\0'))
            .ok_or_else(|| {
                invalid_argument("socket_path", socket_path.clone().unbind(), PATH_EXPECTED)
            })?;
        let (export, timeout) = (export.0, timeout.0);
        let client = py
            .detach(|| nbd::connect(&path, &export, timeout))
            .map_err(|e| to_py_err(py, e))?;
        Ok(Self {
            socket_path: path,
            export,
            size: client.size(),
            transmission_flags: client.transmission_flags(),
            inner: Mutex::new(client),
        })
    }

    /// The server's unix socket.
    #[getter]
    fn socket_path(&self) -> &str {
        &self.socket_path
    }

    /// The export's name.
    #[getter]
    fn export(&self) -> &str {
        &self.export
    }

    /// The export's size in bytes.
    #[getter]
    fn size(&self) -> u64 {
        self.size
    }

    /// The export's transmission flags (``TF_*``).
    #[getter]
    fn transmission_flags(&self) -> u16 {
        self.transmission_flags
    }

    /// The largest payload of one request; longer reads and writes are split.
    #[getter]
    fn get_max_payload(&self, py: Python<'_>) -> u32 {
        py.detach(|| self.conn().max_payload())
    }

    #[setter]
    fn set_max_payload(&self, py: Python<'_>, value: &Bound<'_, PyAny>) -> PyResult<()> {
        let expected = format!("an integer in [{}, {}]", nbd::MIN_PAYLOAD, nbd::MAX_PAYLOAD);
        let v = value
            .extract::<u64>()
            .ok()
            .and_then(|v| nbd::check_max_payload(v).ok())
            .ok_or_else(|| invalid_argument("max_payload", value.clone().unbind(), expected))?;
        py.detach(|| self.conn().set_max_payload(u64::from(v)))
            .map_err(|e| to_py_err(py, e))
    }

    /// Reads ``len(buf)`` bytes at ``offset`` into ``buf`` (any writable
    /// C-contiguous buffer).
    fn readinto(
        &self,
        py: Python<'_>,
        buf: &Bound<'_, PyAny>,
        offset: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let exported = export(buf, "buf", WRITABLE_EXPECTED)?;
        check_writable(&exported)?;
        let offset = u64_arg(offset, "offset")?;
        let len = exported.len_bytes();
        range_arg(offset, len as u64)?;
        let ptr = exported.buf_ptr().cast::<u8>();
        let dst: &mut [u8] = if len == 0 || ptr.is_null() {
            &mut []
        } else {
            // SAFETY: the export `exported` is writable (checked above),
            // C-contiguous and `len` bytes long; it pins the memory and forbids
            // resizing until it is dropped at the end of this function, after
            // the last use of `dst`, which is the only Rust reference to those
            // bytes. `u8` has alignment 1 and no invalid values. As with
            // `socket.recv_into`, another thread touching the buffer while the
            // GIL is released sees unspecified bytes.
            unsafe { std::slice::from_raw_parts_mut(ptr, len) }
        };
        py.detach(|| self.conn().read_into(dst, offset))
            .map_err(|e| to_py_err(py, e))
    }

    /// ``length`` bytes at ``offset``.
    fn read<'py>(
        &self,
        py: Python<'py>,
        length: &Bound<'py, PyAny>,
        offset: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let length = u64_arg(length, "length")?;
        let offset = u64_arg(offset, "offset")?;
        range_arg(offset, length)?;
        let n = usize::try_from(length)
            .ok()
            .filter(|&n| isize::try_from(n).is_ok())
            .ok_or_else(|| {
                PyOverflowError::new_err(format!("length {length} does not fit a bytes object"))
            })?;
        PyBytes::new_with(py, n, |dst| {
            py.detach(|| self.conn().read_into(dst, offset))
                .map_err(|e| to_py_err(py, e))
        })
    }

    /// Writes the concatenation of ``parts`` (a sequence of bytes-like
    /// objects) at ``offset``.
    fn write(
        &self,
        py: Python<'_>,
        parts: &Bound<'_, PyAny>,
        offset: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let not_parts = || invalid_argument("parts", parts.clone().unbind(), PARTS_EXPECTED);
        if PyUntypedBuffer::get(parts).is_ok() {
            return Err(not_parts());
        }
        let iter = parts.try_iter().map_err(|_| not_parts())?;
        let mut exports = Vec::new();
        for (i, part) in iter.enumerate() {
            let thing = format!("parts[{i}]");
            let buf = export(&part?, &thing, PART_EXPECTED)?;
            bytes_of(&buf, &thing)?;
            exports.push(buf);
        }
        let offset = u64_arg(offset, "offset")?;
        let slices = exports
            .iter()
            .map(|b| bytes_of(b, "part"))
            .collect::<PyResult<Vec<&[u8]>>>()?;
        let total = slices.iter().map(|s| s.len() as u64).sum();
        range_arg(offset, total)?;
        py.detach(|| self.conn().write(&slices, offset))
            .map_err(|e| to_py_err(py, e))
    }

    /// Makes ``length`` bytes at ``offset`` read as zeros.
    fn write_zeroes(
        &self,
        py: Python<'_>,
        offset: &Bound<'_, PyAny>,
        length: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let offset = u64_arg(offset, "offset")?;
        let length = u64_arg(length, "length")?;
        range_arg(offset, length)?;
        py.detach(|| self.conn().write_zeroes(offset, length))
            .map_err(|e| to_py_err(py, e))
    }

    /// Makes every acknowledged write durable.
    fn flush(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| self.conn().flush())
            .map_err(|e| to_py_err(py, e))
    }

    /// Disconnects (a second call does nothing).
    fn close(&self, py: Python<'_>) {
        py.detach(|| self.conn().close());
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyNbdClient>()?;
    Ok(())
}
