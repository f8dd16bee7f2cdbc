//! JSON Lines events, parsed without Python.
//!
//! Design: one JSON object per line, blank lines skipped; the checks and the
//! value mapping are those of the reference's `feed_jsonl` (integers beyond
//! i64 but within u64 are kept as text, larger ones become floats, as
//! `serde_json` reads them), so both report the same events and errors.

use super::engine::Event;
use super::value::{Scalar, Value};

/// Why a line was refused: `thing` / `value` / `expected` as in `InvalidArgument`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonlError {
    /// What was wrong, e.g. `data line 3`.
    pub thing: String,
    /// The offending value (shortened).
    pub value: String,
    /// What was expected.
    pub expected: String,
}

fn scalar(v: &serde_json::Value) -> Scalar {
    match v {
        serde_json::Value::Null => Scalar::Null,
        serde_json::Value::Bool(b) => Scalar::Bool(*b),
        serde_json::Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                Scalar::Int(i)
            } else if let Some(u) = n.as_u64() {
                Scalar::Big(u.to_string())
            } else {
                Scalar::Float(n.as_f64().unwrap_or(f64::NAN))
            }
        }
        serde_json::Value::String(s) => Scalar::Str(s.clone()),
        _ => Scalar::Other,
    }
}

/// Converts one JSON value to a field value.
pub fn value(v: &serde_json::Value) -> Value {
    match v {
        serde_json::Value::Array(items) => Value::List(
            items
                .iter()
                .map(|x| match x {
                    serde_json::Value::Array(_) => Scalar::Other,
                    other => scalar(other),
                })
                .collect(),
        ),
        other => Value::One(scalar(other)),
    }
}

fn short(line: &[u8]) -> String {
    let cut = &line[..line.len().min(80)];
    String::from_utf8_lossy(cut).into_owned()
}

/// The checks of an event object (`i` is its index among the parsed events).
pub fn event_from_map(
    i: usize,
    map: &serde_json::Map<String, serde_json::Value>,
) -> Result<Event, JsonlError> {
    let ty = match map.get("type") {
        Some(serde_json::Value::String(s)) => s.clone(),
        other => {
            return Err(JsonlError {
                thing: format!("events[{i}].type"),
                value: other.map_or("None".to_owned(), ToString::to_string),
                expected: "a str event type".to_owned(),
            })
        }
    };
    let time = match map
        .get("time_ns")
        .and_then(|t| if t.is_i64() { t.as_i64() } else { None })
    {
        Some(t) => t,
        None => {
            return Err(JsonlError {
                thing: format!("events[{i}].time_ns"),
                value: map
                    .get("time_ns")
                    .map_or("None".to_owned(), ToString::to_string),
                expected: "an int number of ns (64-bit)".to_owned(),
            })
        }
    };
    let source = match map.get("source") {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(s)) => Some(s.clone()),
        Some(other) => {
            return Err(JsonlError {
                thing: format!("events[{i}].source"),
                value: other.to_string(),
                expected: "a str log source or None".to_owned(),
            })
        }
    };
    let fields = map
        .iter()
        .filter(|(k, _)| !matches!(k.as_str(), "type" | "time_ns" | "source"))
        .map(|(k, v)| (k.clone(), value(v)))
        .collect();
    Ok(Event {
        ty,
        source,
        time,
        fields,
    })
}

/// Parses JSON Lines bytes into events.
pub fn parse(data: &[u8]) -> Result<Vec<Event>, JsonlError> {
    let mut out = Vec::new();
    for (n, line) in data.split(|b| *b == b'\n').enumerate() {
        if line.iter().all(|b| matches!(b, b' ' | b'\t' | b'\r')) {
            continue;
        }
        let lineno = n + 1;
        let parsed: serde_json::Value = match serde_json::from_slice(line) {
            Ok(v) => v,
            Err(e) => {
                return Err(JsonlError {
                    thing: format!("data line {lineno}"),
                    value: short(line),
                    expected: format!("one JSON object per line ({e})"),
                })
            }
        };
        let serde_json::Value::Object(map) = parsed else {
            return Err(JsonlError {
                thing: format!("data line {lineno}"),
                value: short(line),
                expected: "one JSON object per line".to_owned(),
            });
        };
        out.push(event_from_map(out.len(), &map)?);
    }
    Ok(out)
}
