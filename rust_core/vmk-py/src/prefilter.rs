//! Python classes `vmkernel._core.Prefilter` and `PrefilterDecision`
//! wrapping `vmk_core::prefilter`.
//!
//! Design: the class is `frozen` and keeps the pre-filter in a `Mutex`, so a
//! batch classifies with the GIL released while other threads wait for it
//! rather than fail. A rule update parses and validates the new rules before
//! taking the lock, then swaps the table in one assignment: a rejected
//! update leaves the old table, revision and flow cache untouched. Inputs
//! are read through the buffer protocol without copying; results come back
//! as numpy arrays. Every argument check mirrors the pure-Python reference
//! (`vmkernel/reference/prefilter.py`) so both raise the same errors.

use std::borrow::Cow;
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard, PoisonError};

use numpy::PyArray1;
use pyo3::buffer::PyUntypedBuffer;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyBytes, PyDict, PyInt, PyString, PyTuple, PyType};
use vmk_core::prefilter::capture::{read_capture, CaptureError as CoreCaptureError, Frames};
use vmk_core::prefilter::parse::{parse_frame, Reason, NO_VLAN, NO_VNI};
use vmk_core::prefilter::rules::{
    packet_direction, write_classbench, write_json, write_text, Action, Format, Location,
    RuleError as CoreRuleError, MAX_SPI,
};
use vmk_core::prefilter::{
    nsh_encap, parse_rules, BatchOut, Prefilter, BYPASS, DEFAULT_FLOW_CAPACITY, DROP, NO_RULE,
    REDIRECT,
};

use crate::buffers::{bytes_of, export};
use crate::errors::{batch_layout_err, buffer_layout, invalid_argument};

pyo3::import_exception!(vmkernel.errors, RuleError);
pyo3::import_exception!(vmkernel.errors, CaptureError);

const BYTES_LIKE: &str = "a bytes-like object";
const U32_EXPECTED: &str =
    "a buffer of unsigned 32-bit integers (numpy uint32, array('I'), memoryview cast 'I')";
/// Upper bound of `flow_capacity` (16 Mi flows, a few GiB at most).
const MAX_FLOW_CAPACITY: i128 = 1 << 24;

fn rule_err(err: CoreRuleError) -> PyErr {
    let (place, line, column) = match err.location {
        Location::Text { line, column } => (
            format!("line {line} column {column}"),
            Some(line),
            Some(column),
        ),
        Location::JsonSyntax { line, column } => (
            format!("JSON line {line} column {column}"),
            Some(line),
            Some(column),
        ),
        Location::JsonPath(p) | Location::Set(p) => (p, None, None),
    };
    RuleError::new_err((place, err.value, err.expected, line, column))
}

fn capture_err(path: &str, err: CoreCaptureError) -> PyErr {
    CaptureError::new_err((path.to_string(), err.offset, err.problem, err.expected))
}

/// Whether a struct-module format denotes a native unsigned 32-bit integer
/// (the item size is checked separately).
fn is_native_u32_format(format: &[u8]) -> bool {
    match format {
        [b'I' | b'L'] | [b'@', b'I' | b'L'] | [b'=', b'I'] => true,
        [b'<', b'I'] => cfg!(target_endian = "little"),
        [b'>' | b'!', b'I'] => cfg!(target_endian = "big"),
        _ => false,
    }
}

/// The items of a 1-D native u32 export; zero-copy when 4-byte aligned.
fn u32s_of<'a>(buf: &'a PyUntypedBuffer, thing: &str) -> PyResult<Cow<'a, [u32]>> {
    if buf.dimensions() != 1 {
        return Err(buffer_layout(
            format!("{thing}.ndim"),
            buf.dimensions(),
            "1",
        ));
    }
    if buf.item_size() != 4 {
        return Err(buffer_layout(
            format!("{thing}.itemsize"),
            buf.item_size(),
            format!("4 ({U32_EXPECTED})"),
        ));
    }
    let format = buf.format().to_bytes();
    if !is_native_u32_format(format) {
        return Err(buffer_layout(
            format!("{thing}.format"),
            String::from_utf8_lossy(format).into_owned(),
            format!("'I' ({U32_EXPECTED})"),
        ));
    }
    let bytes = bytes_of(buf, thing)?;
    Ok(match bytemuck::try_cast_slice::<u8, u32>(bytes) {
        Ok(items) => Cow::Borrowed(items),
        Err(_) => Cow::Owned(
            bytes
                .chunks_exact(4)
                .map(|c| u32::from_ne_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        ),
    })
}

/// An int (not a bool) within `lo..=hi`, else `InvalidArgument` as the reference raises it.
fn int_in(thing: &str, obj: &Bound<'_, PyAny>, lo: i128, hi: i128) -> PyResult<i128> {
    let bad = || {
        invalid_argument(
            thing,
            obj.clone().unbind(),
            format!("an integer {lo}..{hi}"),
        )
    };
    if !obj.is_instance_of::<PyInt>() || obj.is_instance_of::<PyBool>() {
        return Err(bad());
    }
    match obj.extract::<i128>() {
        Ok(v) if (lo..=hi).contains(&v) => Ok(v),
        _ => Err(bad()),
    }
}

fn direction_of(obj: &Bound<'_, PyAny>) -> PyResult<u8> {
    obj.cast::<PyString>()
        .ok()
        .and_then(|s| s.to_str().ok().and_then(packet_direction))
        .ok_or_else(|| invalid_argument("direction", obj.clone().unbind(), "'in' or 'out'"))
}

fn str_of<'a>(obj: &'a Bound<'_, PyAny>, thing: &str, expected: &str) -> PyResult<&'a str> {
    obj.cast::<PyString>()
        .ok()
        .and_then(|s| s.to_str().ok())
        .ok_or_else(|| invalid_argument(thing, obj.clone().unbind(), expected.to_string()))
}

/// Validated rule-set arguments, in the reference's order.
fn parse_args(
    rules: &Bound<'_, PyAny>,
    format: &Bound<'_, PyAny>,
    action: &Bound<'_, PyAny>,
    spi: &Bound<'_, PyAny>,
    si: &Bound<'_, PyAny>,
) -> PyResult<Vec<vmk_core::prefilter::rules::Rule>> {
    let text = str_of(rules, "rules", "a str")?;
    let fmt = match format.cast::<PyString>().ok().and_then(|s| s.to_str().ok()) {
        Some("text") => Format::Text,
        Some("json") => Format::Json,
        Some("classbench") => Format::ClassBench,
        _ => {
            return Err(invalid_argument(
                "format",
                format.clone().unbind(),
                "'text', 'json' or 'classbench'",
            ))
        }
    };
    let act = action.cast::<PyString>().ok().and_then(|s| s.to_str().ok());
    if !matches!(act, Some("bypass" | "redirect" | "drop")) {
        return Err(invalid_argument(
            "action",
            action.clone().unbind(),
            "'bypass', 'redirect' or 'drop'",
        ));
    }
    let spi = int_in("spi", spi, 0, i128::from(MAX_SPI))? as u32;
    let si = int_in("si", si, 1, 255)? as u8;
    let action = match act {
        Some("redirect") => Action::Redirect { spi, si },
        Some("drop") => Action::Drop,
        _ => Action::Bypass,
    };
    parse_rules(text, fmt, action).map_err(rule_err)
}

/// An optional argument, or its default.
fn or<'py>(given: Option<&Bound<'py, PyAny>>, default: Bound<'py, PyAny>) -> Bound<'py, PyAny> {
    given.cloned().unwrap_or(default)
}

fn frame_bytes(buf: &PyUntypedBuffer) -> PyResult<&[u8]> {
    bytes_of(buf, "frame")
}

type Arrays<'py> = (
    Bound<'py, PyArray1<u8>>,
    Bound<'py, PyArray1<u32>>,
    Bound<'py, PyArray1<u32>>,
    Bound<'py, PyArray1<u8>>,
);

type CaptureArrays<'py> = (
    Bound<'py, PyBytes>,
    Bound<'py, PyArray1<u32>>,
    Bound<'py, PyArray1<u32>>,
);

fn arrays(py: Python<'_>, out: BatchOut) -> Arrays<'_> {
    (
        PyArray1::from_vec(py, out.verdicts),
        PyArray1::from_vec(py, out.rule_ids),
        PyArray1::from_vec(py, out.spis),
        PyArray1::from_vec(py, out.sis),
    )
}

fn load_capture(py: Python<'_>, path: &PathBuf) -> PyResult<Frames> {
    let shown = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|e| {
        let msg = e.to_string();
        let msg = msg.split(" (os error").next().unwrap_or("").to_string();
        CaptureError::new_err((
            shown.clone(),
            0usize,
            format!("cannot be read ({msg})"),
            "a readable file",
        ))
    })?;
    py.detach(|| read_capture(&bytes))
        .map_err(|e| capture_err(&shown, e))
}

/// The pre-filter's answer for one frame: ``verdict`` (0 BYPASS, 1 REDIRECT,
/// 2 DROP), ``rule_id`` (``2**32 - 1`` for none), ``spi`` and ``si``.
#[pyclass(
    frozen,
    eq,
    hash,
    module = "vmkernel._core",
    name = "PrefilterDecision"
)]
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct PyDecision {
    #[pyo3(get)]
    verdict: u8,
    #[pyo3(get)]
    rule_id: u32,
    #[pyo3(get)]
    spi: u32,
    #[pyo3(get)]
    si: u8,
}

#[pymethods]
impl PyDecision {
    #[new]
    fn new(verdict: u8, rule_id: u32, spi: u32, si: u8) -> Self {
        PyDecision {
            verdict,
            rule_id,
            spi,
            si,
        }
    }

    fn __repr__(&self) -> String {
        format!(
            "PrefilterDecision(verdict={}, rule_id={}, spi={}, si={})",
            self.verdict, self.rule_id, self.spi, self.si
        )
    }
}

/// Packet pre-filter for service insertion: rules, revision, flow cache.
///
/// ``Prefilter(rules, format)`` installs ``rules`` (text, JSON or ClassBench);
/// ``classify`` / ``classify_batch`` / ``classify_pcap`` decide BYPASS,
/// REDIRECT (to the security component on a service path) or DROP.
#[pyclass(frozen, module = "vmkernel._core", name = "Prefilter")]
pub struct PyPrefilter {
    inner: Mutex<Prefilter>,
}

impl PyPrefilter {
    /// The state. Every mutation is a single assignment or a cache update
    /// that leaves the cache consistent, so a poisoned lock is still usable.
    fn state(&self) -> MutexGuard<'_, Prefilter> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[pymethods]
impl PyPrefilter {
    #[classattr]
    const BYPASS: u8 = BYPASS;
    #[classattr]
    const REDIRECT: u8 = REDIRECT;
    #[classattr]
    const DROP: u8 = DROP;
    #[classattr]
    const NO_RULE: u32 = NO_RULE;

    #[classattr]
    #[allow(non_snake_case)]
    fn REASONS(py: Python<'_>) -> PyResult<Bound<'_, PyTuple>> {
        PyTuple::new(py, Reason::ALL.iter().map(|r| r.name()))
    }

    #[new]
    #[pyo3(
        text_signature = "(rules='', format='text', *, action='bypass', spi=1, si=255, \
        default_spi=1, default_si=255, flow_capacity=65536)"
    )]
    #[pyo3(signature = (
        rules = None, format = None, *, action = None, spi = None, si = None,
        default_spi = None, default_si = None, flow_capacity = None
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new<'py>(
        py: Python<'py>,
        rules: Option<&Bound<'py, PyAny>>,
        format: Option<&Bound<'py, PyAny>>,
        action: Option<&Bound<'py, PyAny>>,
        spi: Option<&Bound<'py, PyAny>>,
        si: Option<&Bound<'py, PyAny>>,
        default_spi: Option<&Bound<'py, PyAny>>,
        default_si: Option<&Bound<'py, PyAny>>,
        flow_capacity: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Self> {
        let int = |v: i64| PyInt::new(py, v).into_any();
        let s = |v: &str| PyString::new(py, v).into_any();
        let dspi = int_in(
            "default_spi",
            &or(default_spi, int(1)),
            0,
            i128::from(MAX_SPI),
        )? as u32;
        let dsi = int_in("default_si", &or(default_si, int(255)), 1, 255)? as u8;
        let cap = int_in(
            "flow_capacity",
            &or(flow_capacity, int(DEFAULT_FLOW_CAPACITY as i64)),
            0,
            MAX_FLOW_CAPACITY,
        )? as usize;
        let parsed = parse_args(
            &or(rules, s("")),
            &or(format, s("text")),
            &or(action, s("bypass")),
            &or(spi, int(1)),
            &or(si, int(255)),
        )?;
        let pf = py.detach(|| Prefilter::new(parsed, dspi, dsi, cap));
        Ok(PyPrefilter {
            inner: Mutex::new(pf),
        })
    }

    /// A pre-filter with the rules of the text format.
    #[classmethod]
    #[pyo3(signature = (text, **options))]
    fn from_text<'py>(
        cls: &Bound<'py, PyType>,
        text: &Bound<'py, PyAny>,
        options: Option<&Bound<'py, PyDict>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        cls.call((text, "text"), options)
    }

    /// A pre-filter with the rules of the JSON format.
    #[classmethod]
    #[pyo3(signature = (text, **options))]
    fn from_json<'py>(
        cls: &Bound<'py, PyType>,
        text: &Bound<'py, PyAny>,
        options: Option<&Bound<'py, PyDict>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        cls.call((text, "json"), options)
    }

    /// A pre-filter with ClassBench filter lines (rule id = line index; first line wins).
    #[classmethod]
    #[pyo3(signature = (text, **options))]
    fn from_classbench<'py>(
        cls: &Bound<'py, PyType>,
        text: &Bound<'py, PyAny>,
        options: Option<&Bound<'py, PyDict>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        cls.call((text, "classbench"), options)
    }

    /// Replaces the rule table atomically; returns the new revision.
    #[pyo3(signature = (rules, format = None, *, action = None, spi = None, si = None))]
    #[pyo3(text_signature = "($self, rules, format='text', *, action='bypass', spi=1, si=255)")]
    fn load<'py>(
        &self,
        py: Python<'py>,
        rules: &Bound<'py, PyAny>,
        format: Option<&Bound<'py, PyAny>>,
        action: Option<&Bound<'py, PyAny>>,
        spi: Option<&Bound<'py, PyAny>>,
        si: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<u64> {
        let parsed = parse_args(
            rules,
            &or(format, PyString::new(py, "text").into_any()),
            &or(action, PyString::new(py, "bypass").into_any()),
            &or(spi, PyInt::new(py, 1).into_any()),
            &or(si, PyInt::new(py, 255).into_any()),
        )?;
        Ok(py.detach(|| self.state().replace(parsed)))
    }

    /// Bumped by every successful ``load``.
    #[getter]
    fn revision(&self) -> u64 {
        self.state().revision()
    }

    /// ``(spi, si)`` of fail-closed redirects.
    #[getter]
    fn default_path(&self) -> (u32, u8) {
        self.state().default_path()
    }

    fn __len__(&self) -> usize {
        self.state().rules().len()
    }

    /// The rules in the text format.
    fn to_text(&self) -> String {
        write_text(self.state().rules())
    }

    /// The rules as JSON.
    fn to_json(&self) -> String {
        write_json(self.state().rules())
    }

    /// The rules as ClassBench filter lines (IPv4, both directions, no VLAN/VNI only).
    fn to_classbench(&self) -> PyResult<String> {
        write_classbench(self.state().rules()).map_err(rule_err)
    }

    /// Classifies one Ethernet frame sent (``out``) or received (``in``) by a VM.
    #[pyo3(signature = (frame, direction = None))]
    #[pyo3(text_signature = "($self, frame, direction='out')")]
    fn classify(
        &self,
        frame: &Bound<'_, PyAny>,
        direction: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<PyDecision> {
        let dir = match direction {
            Some(d) => direction_of(d)?,
            None => vmk_core::prefilter::rules::DIR_OUT,
        };
        let buf = export(frame, "frame", BYTES_LIKE)?;
        let d = self.state().classify(frame_bytes(&buf)?, dir);
        Ok(PyDecision::new(d.verdict, d.rule_id, d.spi, d.si))
    }

    /// Classifies ``buffer[offsets[i]:offsets[i] + lengths[i]]`` for each ``i``
    /// with the GIL released. Returns numpy arrays
    /// ``(verdicts u8, rule_ids u32, spis u32, sis u8)``.
    #[pyo3(signature = (buffer, offsets, lengths, direction = None))]
    #[pyo3(text_signature = "($self, buffer, offsets, lengths, direction='out')")]
    fn classify_batch<'py>(
        &self,
        py: Python<'py>,
        buffer: &Bound<'py, PyAny>,
        offsets: &Bound<'py, PyAny>,
        lengths: &Bound<'py, PyAny>,
        direction: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Arrays<'py>> {
        let dir = match direction {
            Some(d) => direction_of(d)?,
            None => vmk_core::prefilter::rules::DIR_OUT,
        };
        let buffer_export = export(buffer, "buffer", BYTES_LIKE)?;
        let offsets_export = export(offsets, "offsets", U32_EXPECTED)?;
        let lengths_export = export(lengths, "lengths", U32_EXPECTED)?;
        let data = bytes_of(&buffer_export, "buffer")?;
        let offs = u32s_of(&offsets_export, "offsets")?;
        let lens = u32s_of(&lengths_export, "lengths")?;
        let out = py
            .detach(|| self.state().classify_batch(data, &offs, &lens, dir))
            .map_err(batch_layout_err)?;
        Ok(arrays(py, out))
    }

    /// Classifies every frame of a pcap or pcapng file.
    #[pyo3(signature = (path, direction = None))]
    #[pyo3(text_signature = "($self, path, direction='out')")]
    fn classify_pcap<'py>(
        &self,
        py: Python<'py>,
        path: PathBuf,
        direction: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Arrays<'py>> {
        let dir = match direction {
            Some(d) => direction_of(d)?,
            None => vmk_core::prefilter::rules::DIR_OUT,
        };
        let frames = load_capture(py, &path)?;
        let out = py
            .detach(|| {
                self.state()
                    .classify_batch(&frames.data, &frames.offsets, &frames.lengths, dir)
            })
            .map_err(batch_layout_err)?;
        Ok(arrays(py, out))
    }

    /// Reads a pcap / pcapng file into ``(buffer, offsets, lengths)`` of Ethernet frames.
    #[staticmethod]
    fn read_capture<'py>(py: Python<'py>, path: PathBuf) -> PyResult<CaptureArrays<'py>> {
        let frames = load_capture(py, &path)?;
        Ok((
            PyBytes::new(py, &frames.data),
            PyArray1::from_vec(py, frames.offsets),
            PyArray1::from_vec(py, frames.lengths),
        ))
    }

    /// The parsed key of a frame (``reason`` is None when it parsed fully).
    #[staticmethod]
    fn parse<'py>(py: Python<'py>, frame: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyDict>> {
        let buf = export(frame, "frame", BYTES_LIKE)?;
        let parsed = parse_frame(frame_bytes(&buf)?);
        let d = PyDict::new(py);
        d.set_item("reason", parsed.key.err().map(Reason::name))?;
        d.set_item("nsh_spi", parsed.nsh.map(|n| n.spi))?;
        d.set_item("nsh_si", parsed.nsh.map(|n| n.si))?;
        if let Ok(k) = parsed.key {
            let size = if k.family == 4 { 4 } else { 16 };
            let src = k.src.to_be_bytes();
            let dst = k.dst.to_be_bytes();
            d.set_item("family", k.family)?;
            d.set_item("proto", k.proto)?;
            d.set_item("src", PyBytes::new(py, &src[16 - size..]))?;
            d.set_item("dst", PyBytes::new(py, &dst[16 - size..]))?;
            d.set_item("sport", k.sport)?;
            d.set_item("dport", k.dport)?;
            d.set_item("flags", k.flags)?;
            d.set_item("vlan", (k.vlan != NO_VLAN).then_some(k.vlan))?;
            d.set_item(
                "inner_vlan",
                (k.inner_vlan != NO_VLAN).then_some(k.inner_vlan),
            )?;
            d.set_item("vni", (k.vni != NO_VNI).then_some(k.vni))?;
            d.set_item("first_fragment", k.first_fragment)?;
        }
        Ok(d)
    }

    /// Wraps an Ethernet frame in Ethernet + NSH (MD type 2) on path ``(spi, si)``.
    #[staticmethod]
    fn nsh_encap<'py>(
        py: Python<'py>,
        frame: &Bound<'py, PyAny>,
        spi: &Bound<'py, PyAny>,
        si: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let buf = export(frame, "frame", BYTES_LIKE)?;
        let data = frame_bytes(&buf)?;
        let spi = int_in("spi", spi, 0, i128::from(MAX_SPI))? as u32;
        let si = int_in("si", si, 0, 255)? as u8;
        Ok(PyBytes::new(py, &nsh_encap(data, spi, si)))
    }

    /// Whether programmed flows are consulted (their entries are kept when off).
    #[getter]
    fn flow_cache(&self) -> bool {
        self.state().cache_enabled()
    }

    #[setter]
    fn set_flow_cache(&self, on: &Bound<'_, PyAny>) -> PyResult<()> {
        let on = on.is_truthy()?;
        self.state().set_cache_enabled(on);
        Ok(())
    }

    /// Number of programmed flows.
    #[getter]
    fn flow_count(&self) -> usize {
        self.state().cache().len()
    }

    /// Most flows the cache holds.
    #[getter]
    fn flow_capacity(&self) -> usize {
        self.state().cache().capacity()
    }

    /// The security component's verdict (BYPASS or DROP) for the frame's whole flow.
    /// Returns False when the frame does not parse or the cache is full.
    fn program_flow(&self, frame: &Bound<'_, PyAny>, verdict: &Bound<'_, PyAny>) -> PyResult<bool> {
        let ok = verdict.is_instance_of::<PyInt>()
            && !verdict.is_instance_of::<PyBool>()
            && matches!(verdict.extract::<i64>(), Ok(v) if v == i64::from(BYPASS) || v == i64::from(DROP));
        if !ok {
            return Err(invalid_argument(
                "verdict",
                verdict.clone().unbind(),
                "Prefilter.BYPASS (0) or Prefilter.DROP (2)",
            ));
        }
        let v = verdict.extract::<u8>()?;
        let buf = export(frame, "frame", BYTES_LIKE)?;
        let data = frame_bytes(&buf)?;
        Ok(self.state().program_flow(data, v))
    }

    /// Forgets the frame's flow; True when it was programmed.
    fn evict_flow(&self, frame: &Bound<'_, PyAny>) -> PyResult<bool> {
        let buf = export(frame, "frame", BYTES_LIKE)?;
        let data = frame_bytes(&buf)?;
        Ok(self.state().evict_flow(data))
    }

    /// Forgets every programmed flow; returns how many there were.
    fn flush_flows(&self) -> usize {
        self.state().flush_flows()
    }

    /// The default security component: inspects frames, programs the flow cache.
    /// Returns one verdict per frame, BYPASS (deliver) or DROP.
    fn inspect_batch<'py>(
        &self,
        py: Python<'py>,
        buffer: &Bound<'py, PyAny>,
        offsets: &Bound<'py, PyAny>,
        lengths: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyArray1<u8>>> {
        let buffer_export = export(buffer, "buffer", BYTES_LIKE)?;
        let offsets_export = export(offsets, "offsets", U32_EXPECTED)?;
        let lengths_export = export(lengths, "lengths", U32_EXPECTED)?;
        let data = bytes_of(&buffer_export, "buffer")?;
        let offs = u32s_of(&offsets_export, "offsets")?;
        let lens = u32s_of(&lengths_export, "lengths")?;
        let out = py
            .detach(|| self.state().inspect_batch(data, &offs, &lens))
            .map_err(batch_layout_err)?;
        Ok(PyArray1::from_vec(py, out))
    }

    fn __repr__(&self) -> String {
        let s = self.state();
        format!(
            "<Prefilter rules={} revision={} flows={}>",
            s.rules().len(),
            s.revision(),
            s.cache().len()
        )
    }
}

/// Adds the pre-filter classes to `vmkernel._core`.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyPrefilter>()?;
    m.add_class::<PyDecision>()
}
