//! Verified programs run on arbitrary events without panicking and within their fuel bound.
//!
//! The input is split into a program (mutated from a small valid seed by the fuzzer) and an event
//! script; programs the verifier refuses are skipped.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmk_core::rulevm::engine::Event;
use vmk_core::rulevm::{decode, Engine, Scalar, Value};

fn event(i: usize, b: &[u8]) -> Event {
    let pick = |k: usize| b.get(k).copied().unwrap_or(0);
    let text = String::from_utf8_lossy(b).into_owned();
    let value = match pick(0) % 5 {
        0 => Value::One(Scalar::Str(text)),
        1 => Value::One(Scalar::Int(i64::from(pick(1)) - 128)),
        2 => Value::List(vec![Scalar::Str(text), Scalar::Null]),
        3 => Value::One(Scalar::Float(f64::from(pick(1)))),
        _ => Value::One(Scalar::Null),
    };
    let names = ["f", "cmd", "pid", "*"];
    Event {
        ty: ["a", "b", "t1", "t2/sub"][usize::from(pick(2)) % 4].to_owned(),
        source: None,
        time: i as i64 * i64::from(pick(3)) - 50,
        fields: vec![
            (names[usize::from(pick(4)) % 4].to_owned(), value),
            ("pid".to_owned(), Value::One(Scalar::Int(i64::from(pick(5) % 3)))),
        ],
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let split = usize::from(u16::from_le_bytes([data[0], data[1]])) % data.len();
    let (prog, script) = data[2..].split_at(split.min(data.len() - 2));
    let Ok(prog) = decode(prog) else { return };
    let len = prog.code.len() as u64;
    let Ok(mut engine) = Engine::new(vec![prog], 4) else { return };
    let events: Vec<Event> = script.chunks(8).enumerate().map(|(i, c)| event(i, c)).collect();
    let _ = engine.feed(&events);
    let _ = engine.advance(i64::MAX);
    for (_, stats, live, windows) in engine.stats() {
        assert!(stats[1] <= stats[0] * len, "fuel bound exceeded");
        assert!(live <= 4);
        assert!(windows == 0, "advance(i64::MAX) leaves no window open");
    }
});
