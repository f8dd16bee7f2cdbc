//! Python classes `vmkernel._core.RuleEngine` and `Determination`, wrapping
//! `vmk_core::rulevm`.
//!
//! Design: events are converted from Python objects with the GIL held (that
//! needs the interpreter), then the batch runs with the GIL released; JSON
//! Lines input is parsed and run entirely without the GIL. The engine sits in
//! a `Mutex` (the class is `frozen`), never held while calling into Python.
//! Conversion follows the reference (`vmkernel/reference/rulevm.py`) check by
//! check, so both raise the same `InvalidArgument` for the same bad event.

use std::sync::{Mutex, MutexGuard, PoisonError};

use pyo3::exceptions::PyUnicodeEncodeError;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyFloat, PyInt, PyList, PyMapping, PyString, PyTuple};
use vmk_core::rulevm::engine::{Determination, Engine, Event, STAT_NAMES};
use vmk_core::rulevm::jsonl;
use vmk_core::rulevm::program::{decode, VerifyError, VERDICTS};
use vmk_core::rulevm::value::{Scalar, Value};

use crate::buffers::{bytes_of, export};
use crate::errors::invalid_argument;

/// The Python error classes raised here.
mod exc {
    pyo3::import_exception!(vmkernel.errors, VerifyError);
    pyo3::import_exception!(vmkernel.errors, VersionMismatch);
}

/// Batches at least this long run with the GIL released.
const DETACH_EVENTS: usize = 64;

fn verify_err(e: VerifyError) -> PyErr {
    let version = e.is_version();
    let args = (e.code.to_owned(), e.pc, e.reason);
    if version {
        exc::VersionMismatch::new_err(args)
    } else {
        exc::VerifyError::new_err(args)
    }
}

/// A halted rule instance's verdict; ``events`` are engine-wide event numbers, oldest first.
#[pyclass(frozen, eq, hash, module = "vmkernel._core", name = "Determination")]
#[derive(PartialEq, Eq, Hash)]
pub struct PyDetermination {
    #[pyo3(get)]
    rule: String,
    #[pyo3(get)]
    context: Option<String>,
    #[pyo3(get)]
    verdict: String,
    events: Vec<u64>,
    #[pyo3(get)]
    time_ns: i64,
}

#[pymethods]
impl PyDetermination {
    #[new]
    fn new(
        rule: String,
        context: Option<String>,
        verdict: String,
        events: Vec<u64>,
        time_ns: i64,
    ) -> Self {
        Self {
            rule,
            context,
            verdict,
            events,
            time_ns,
        }
    }

    #[getter]
    fn events<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        PyTuple::new(py, &self.events)
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        // The reference's dataclass repr, so both implementations print alike.
        let context = match &self.context {
            Some(c) => PyString::new(py, c).repr()?.to_string(),
            None => "None".to_owned(),
        };
        Ok(format!(
            "Determination(rule={}, context={context}, verdict={}, events={}, time_ns={})",
            PyString::new(py, &self.rule).repr()?,
            PyString::new(py, &self.verdict).repr()?,
            PyTuple::new(py, &self.events)?.repr()?,
            self.time_ns
        ))
    }
}

fn utf8_string(obj: &Bound<'_, PyString>, thing: impl FnOnce() -> String) -> PyResult<String> {
    match obj.to_str() {
        Ok(s) => Ok(s.to_owned()),
        Err(e) if e.is_instance_of::<PyUnicodeEncodeError>(obj.py()) => Err(invalid_argument(
            thing(),
            obj.clone().unbind(),
            "text without lone surrogates (valid UTF-8)",
        )),
        Err(e) => Err(e),
    }
}

fn scalar(obj: &Bound<'_, PyAny>, thing: &dyn Fn() -> String) -> PyResult<Scalar> {
    if obj.is_none() {
        return Ok(Scalar::Null);
    }
    if let Ok(b) = obj.cast::<PyBool>() {
        return Ok(Scalar::Bool(b.is_true()));
    }
    if let Ok(i) = obj.cast::<PyInt>() {
        return Ok(match i.extract::<i64>() {
            Ok(v) => Scalar::Int(v),
            Err(_) => Scalar::Big(i.str()?.to_str()?.to_owned()),
        });
    }
    if let Ok(f) = obj.cast::<PyFloat>() {
        return Ok(Scalar::Float(f.value()));
    }
    if let Ok(s) = obj.cast::<PyString>() {
        return Ok(Scalar::Str(utf8_string(s, thing)?));
    }
    Ok(Scalar::Other)
}

fn value(obj: &Bound<'_, PyAny>, thing: &dyn Fn() -> String) -> PyResult<Value> {
    if obj.is_instance_of::<PyList>() || obj.is_instance_of::<PyTuple>() {
        let mut items = Vec::new();
        for x in obj.try_iter()? {
            let x = x?;
            items.push(
                if x.is_instance_of::<PyList>() || x.is_instance_of::<PyTuple>() {
                    Scalar::Other
                } else {
                    scalar(&x, thing)?
                },
            );
        }
        return Ok(Value::List(items));
    }
    Ok(Value::One(scalar(obj, thing)?))
}

fn event(i: usize, ev: &Bound<'_, PyAny>) -> PyResult<Event> {
    let expected_map = "a mapping with 'type' (str) and 'time_ns' (int)";
    let map: Bound<'_, PyMapping> = if let Ok(d) = ev.cast::<PyDict>() {
        d.as_mapping().clone()
    } else {
        match ev.cast::<PyMapping>() {
            Ok(m) => m.clone(),
            Err(_) => {
                return Err(invalid_argument(
                    format!("events[{i}]"),
                    ev.clone().unbind(),
                    expected_map,
                ))
            }
        }
    };
    let get = |k: &str| -> PyResult<Option<Bound<'_, PyAny>>> {
        match map.get_item(k) {
            Ok(v) => Ok(Some(v)),
            Err(e) if e.is_instance_of::<pyo3::exceptions::PyKeyError>(ev.py()) => Ok(None),
            Err(e) => Err(e),
        }
    };
    let ty = match get("type")? {
        Some(t) if t.is_instance_of::<PyString>() => t,
        other => {
            return Err(invalid_argument(
                format!("events[{i}].type"),
                other.map(Bound::unbind),
                "a str event type",
            ))
        }
    };
    let time = match get("time_ns")? {
        Some(t) if t.is_instance_of::<PyInt>() && !t.is_instance_of::<PyBool>() => {
            match t.extract::<i64>() {
                Ok(v) => v,
                Err(_) => {
                    return Err(invalid_argument(
                        format!("events[{i}].time_ns"),
                        t.unbind(),
                        "an int number of ns (64-bit)",
                    ))
                }
            }
        }
        other => {
            return Err(invalid_argument(
                format!("events[{i}].time_ns"),
                other.map(Bound::unbind),
                "an int number of ns (64-bit)",
            ))
        }
    };
    let source = match get("source")? {
        None => None,
        Some(s) if s.is_none() => None,
        Some(s) if s.is_instance_of::<PyString>() => Some(s),
        Some(s) => {
            return Err(invalid_argument(
                format!("events[{i}].source"),
                s.unbind(),
                "a str log source or None",
            ))
        }
    };
    let ty = utf8_string(ty.cast::<PyString>()?, || format!("events[{i}].type"))?;
    let source = match source {
        Some(s) => Some(utf8_string(s.cast::<PyString>()?, || {
            format!("events[{i}].source")
        })?),
        None => None,
    };
    let mut fields = Vec::new();
    for item in map.items()?.iter() {
        let (k, v): (Bound<'_, PyAny>, Bound<'_, PyAny>) = item.extract()?;
        let Ok(ks) = k.cast::<PyString>() else {
            return Err(invalid_argument(
                format!("events[{i}] key"),
                k.unbind(),
                "str field names",
            ));
        };
        let key = utf8_string(ks, || format!("events[{i}] key"))?;
        if matches!(key.as_str(), "type" | "time_ns" | "source") {
            continue;
        }
        let thing = || format!("events[{i}].{key}");
        fields.push((key.clone(), value(&v, &thing)?));
    }
    Ok(Event {
        ty,
        source,
        time,
        fields,
    })
}

/// Runs verified threat-rule programs over event streams.
#[pyclass(frozen, module = "vmkernel._core", name = "RuleEngine")]
pub struct PyRuleEngine {
    inner: Mutex<Engine>,
}

impl PyRuleEngine {
    fn engine(&self) -> MutexGuard<'_, Engine> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn wrap(&self, py: Python<'_>, dets: Vec<Determination>) -> PyResult<Vec<Py<PyDetermination>>> {
        let names: Vec<String> = {
            let eng = self.engine();
            let mut idx: Vec<u32> = dets.iter().map(|d| d.rule).collect();
            idx.sort_unstable();
            idx.dedup();
            let mut table = vec![String::new(); eng.rule_names().len()];
            for i in idx {
                table[i as usize] = eng.rule_name(i).to_owned();
            }
            table
        };
        dets.into_iter()
            .map(|d| {
                Py::new(
                    py,
                    PyDetermination {
                        rule: names[d.rule as usize].clone(),
                        context: d.context,
                        verdict: VERDICTS[d.verdict as usize].to_owned(),
                        events: d.events,
                        time_ns: d.time,
                    },
                )
            })
            .collect()
    }

    fn run(&self, py: Python<'_>, events: Vec<Event>) -> PyResult<Vec<Py<PyDetermination>>> {
        let dets = if events.len() >= DETACH_EVENTS {
            py.detach(|| self.engine().feed(&events))
        } else {
            self.engine().feed(&events)
        };
        self.wrap(py, dets)
    }
}

#[pymethods]
impl PyRuleEngine {
    /// Verifies every program; any bad one raises ``VerifyError`` and nothing is loaded.
    #[new]
    #[pyo3(signature = (programs, *, max_instances = None))]
    fn new(
        py: Python<'_>,
        programs: &Bound<'_, PyAny>,
        max_instances: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        let max = match max_instances {
            None => 4096,
            Some(m) => match m.extract::<i64>() {
                Ok(v) if !m.is_instance_of::<PyBool>() && (1..=1 << 24).contains(&v) => v as usize,
                _ => {
                    return Err(invalid_argument(
                        "max_instances",
                        m.clone().unbind(),
                        "an int in 1..=16777216",
                    ))
                }
            },
        };
        if programs.is_instance_of::<PyString>()
            || programs.is_instance_of::<pyo3::types::PyBytes>()
            || programs.is_instance_of::<pyo3::types::PyByteArray>()
            || programs.is_instance_of::<pyo3::types::PyMemoryView>()
        {
            return Err(invalid_argument(
                "programs",
                programs.clone().unbind(),
                "an iterable of program byte strings",
            ));
        }
        let mut raw: Vec<Vec<u8>> = Vec::new();
        for (i, p) in programs.try_iter()?.enumerate() {
            let p = p?;
            let buf = export(&p, &format!("programs[{i}]"), "a bytes-like program")?;
            raw.push(bytes_of(&buf, &format!("programs[{i}]"))?.to_vec());
        }
        let engine = py
            .detach(|| -> Result<Engine, VerifyError> {
                let progs = raw
                    .iter()
                    .map(|r| decode(r))
                    .collect::<Result<Vec<_>, _>>()?;
                Engine::new(progs, max)
            })
            .map_err(verify_err)?;
        Ok(Self {
            inner: Mutex::new(engine),
        })
    }

    /// Runs event mappings (``type``, ``time_ns``, optional ``source``, fields) in order.
    fn feed(
        &self,
        py: Python<'_>,
        events: &Bound<'_, PyAny>,
    ) -> PyResult<Vec<Py<PyDetermination>>> {
        if events.cast::<PyMapping>().is_ok() {
            return Err(invalid_argument(
                "events",
                events.clone().unbind(),
                "an iterable of event mappings (wrap one event in a list)",
            ));
        }
        let mut evs = Vec::new();
        for (i, ev) in events.try_iter()?.enumerate() {
            evs.push(event(i, &ev?)?);
        }
        self.run(py, evs)
    }

    /// Parses JSON Lines bytes (one event object per line) and runs them.
    fn feed_jsonl(
        &self,
        py: Python<'_>,
        data: &Bound<'_, PyAny>,
    ) -> PyResult<Vec<Py<PyDetermination>>> {
        let buf = export(data, "data", "a bytes-like object of JSON Lines")?;
        let bytes = bytes_of(&buf, "data")?;
        let dets = py
            .detach(|| jsonl::parse(bytes).map(|evs| self.engine().feed(&evs)))
            .map_err(|e| invalid_argument(e.thing, e.value, e.expected))?;
        self.wrap(py, dets)
    }

    /// Rule names in load order.
    #[getter]
    fn rules(&self) -> Vec<String> {
        self.engine()
            .rule_names()
            .into_iter()
            .map(str::to_owned)
            .collect()
    }

    /// Instructions executed so far, over all rules.
    #[getter]
    fn steps(&self) -> u64 {
        self.engine().steps()
    }

    /// Events fed so far.
    #[getter]
    fn events_seen(&self) -> u64 {
        self.engine().events_seen()
    }

    /// Waiting instances over all rules.
    #[getter]
    fn live_instances(&self) -> usize {
        self.engine().live_instances()
    }

    /// Per rule: runs, steps, skipped (pre-filter), matches, no_matches, silent, expired, evicted,
    /// live, windows.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let out = PyDict::new(py);
        for (name, s, live, windows) in self.engine().stats() {
            let d = PyDict::new(py);
            for (k, v) in STAT_NAMES.iter().zip(s) {
                d.set_item(k, v)?;
            }
            d.set_item("live", live)?;
            d.set_item("windows", windows)?;
            out.set_item(name, d)?;
        }
        Ok(out)
    }

    /// Closes every window that ended before ``now_ns``; returns the determinations.
    fn advance(
        &self,
        py: Python<'_>,
        now_ns: &Bound<'_, PyAny>,
    ) -> PyResult<Vec<Py<PyDetermination>>> {
        let now = match now_ns.extract::<i64>() {
            Ok(v) if now_ns.is_instance_of::<PyInt>() && !now_ns.is_instance_of::<PyBool>() => v,
            _ => {
                return Err(invalid_argument(
                    "now_ns",
                    now_ns.clone().unbind(),
                    "an int number of ns (64-bit)",
                ))
            }
        };
        let dets = self.engine().advance(now);
        self.wrap(py, dets)
    }

    fn __repr__(&self) -> String {
        let eng = self.engine();
        format!(
            "<RuleEngine rules={} events_seen={} live={}>",
            eng.rule_names().len(),
            eng.events_seen(),
            eng.live_instances()
        )
    }
}

/// Adds the threat-rule engine classes to `vmkernel._core`.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyRuleEngine>()?;
    m.add_class::<PyDetermination>()
}
