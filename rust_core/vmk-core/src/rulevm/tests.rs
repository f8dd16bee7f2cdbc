//! Unit tests of the loader and the engine on hand-built programs.
#![allow(clippy::unwrap_used)]

use super::engine::{Engine, Event};
use super::program::{decode, op, MAX_CODE};
use super::value::{Scalar, Value};

fn s(out: &mut Vec<u8>, x: &str) {
    out.extend_from_slice(&(x.len() as u32).to_le_bytes());
    out.extend_from_slice(x.as_bytes());
}

fn ins(out: &mut Vec<u8>, o: u8, r: u8, x: u16, a: u32, imm: u64) {
    out.push(o);
    out.push(r);
    out.extend_from_slice(&x.to_le_bytes());
    out.extend_from_slice(&a.to_le_bytes());
    out.extend_from_slice(&imm.to_le_bytes());
}

/// `name`: field "cmd" contains "evil" (case-insensitive) -> match.
fn contains_program(name: &str) -> Vec<u8> {
    let mut p = b"VMKR".to_vec();
    p.extend_from_slice(&2u16.to_le_bytes());
    p.extend_from_slice(&0u16.to_le_bytes());
    s(&mut p, name);
    p.extend_from_slice(&0u32.to_le_bytes()); // no context fields
    p.extend_from_slice(&1u32.to_le_bytes());
    p.push(1);
    s(&mut p, "EVIL");
    p.extend_from_slice(&1u32.to_le_bytes());
    s(&mut p, "cmd");
    for _ in 0..4 {
        p.extend_from_slice(&0u32.to_le_bytes());
    }
    p.extend_from_slice(&5u32.to_le_bytes());
    ins(&mut p, op::LOADF, 0, 0, 0, 0);
    ins(&mut p, op::CONTAINS, 0, 1, 0, 0);
    ins(&mut p, op::JF, 0, 0, 4, 0);
    ins(&mut p, op::HALT, 0, 1, 0, 0);
    ins(&mut p, op::HALT, 0, 0, 0, 0);
    p
}

fn event(cmd: &str, t: i64) -> Event {
    Event {
        ty: "proc".into(),
        source: None,
        time: t,
        fields: vec![("cmd".into(), Value::One(Scalar::Str(cmd.into())))],
    }
}

#[test]
fn contains_matches_case_insensitively() {
    let prog = decode(&contains_program("r")).unwrap();
    let mut eng = Engine::new(vec![prog], 16).unwrap();
    let dets = eng.feed(&[event("run Evil.exe", 1), event("fine", 2)]);
    assert_eq!(dets.len(), 1);
    assert_eq!(dets[0].events, vec![0]);
    assert_eq!(eng.steps(), 4 + 4);
}

#[test]
fn every_truncation_is_refused_without_panic() {
    let full = contains_program("r");
    for n in 0..full.len() {
        let e = decode(&full[..n]).unwrap_err();
        assert!(["truncated", "empty-code"].contains(&e.code), "{n}: {e:?}");
    }
    let mut long = full.clone();
    long.push(0);
    assert_eq!(decode(&long).unwrap_err().code, "trailing-bytes");
}

#[test]
fn backward_jump_and_bad_opcode_are_refused() {
    let mut p = contains_program("r");
    let code_at = p.len() - 5 * 16;
    p[code_at + 2 * 16 + 4] = 1; // JF target 1 <= pc 2
    let e = decode(&p).unwrap_err();
    assert_eq!((e.code, e.pc), ("backward-jump", 2));
    p[code_at + 2 * 16 + 4] = 5; // target == len
    assert_eq!(decode(&p).unwrap_err().code, "jump-out-of-range");
    p[code_at + 2 * 16 + 4] = 4;
    p[code_at] = 0xEE;
    assert_eq!(decode(&p).unwrap_err().code, "bad-opcode");
    const { assert!(MAX_CODE < 13_000) };
}

/// A program with int constants `ints`, fields `fields`, context `context` and `code`.
fn program(
    ints: &[i64],
    fields: &[&str],
    context: &[u32],
    code: &[(u8, u8, u16, u32, u64)],
) -> Vec<u8> {
    let mut p = b"VMKR".to_vec();
    p.extend_from_slice(&2u16.to_le_bytes());
    p.extend_from_slice(&0u16.to_le_bytes());
    s(&mut p, "agg");
    p.extend_from_slice(&(context.len() as u32).to_le_bytes());
    for c in context {
        p.extend_from_slice(&c.to_le_bytes());
    }
    p.extend_from_slice(&(ints.len() as u32).to_le_bytes());
    for i in ints {
        p.push(2);
        p.extend_from_slice(&i.to_le_bytes());
    }
    p.extend_from_slice(&(fields.len() as u32).to_le_bytes());
    for f in fields {
        s(&mut p, f);
    }
    for _ in 0..4 {
        p.extend_from_slice(&0u32.to_le_bytes());
    }
    p.extend_from_slice(&(code.len() as u32).to_le_bytes());
    for &(o, r, x, a, imm) in code {
        ins(&mut p, o, r, x, a, imm);
    }
    p
}

fn ev2(t: i64, u: &str, h: i64) -> Event {
    Event {
        ty: "t".into(),
        source: None,
        time: t,
        fields: vec![
            ("u".into(), Value::One(Scalar::Str(u.into()))),
            ("h".into(), Value::One(Scalar::Int(h))),
        ],
    }
}

#[test]
fn version_one_programs_are_refused_as_a_version_mismatch() {
    let mut p = contains_program("r");
    p[4] = 1;
    let e = decode(&p).unwrap_err();
    assert!(e.is_version());
    assert_eq!(e.reason, "program version 1, expected 2");
}

#[test]
fn a_deferred_window_is_decided_when_it_closes() {
    use super::program::AGG_DEFERRED;
    // count events of (u, h) over 10 ns; match when the closed window holds at most 2
    let code = [
        (op::AGG, 1, AGG_DEFERRED, 3, 10),
        (op::WINDOW, 1, 0, 0, 0),
        (op::CMP, 1, 1, 0, 0),
        (op::JF, 0, 0, 5, 0),
        (op::HALT, 0, 1, 0, 0),
        (op::HALT, 0, 0, 0, 0),
    ];
    let prog = decode(&program(&[2], &["u", "h"], &[0, 1], &code)).unwrap();
    let mut eng = Engine::new(vec![prog], 16).unwrap();
    let got = eng.feed(&[ev2(0, "a\"b", 1), ev2(5, "a\"b", 1), ev2(3, "z", 2)]);
    assert!(got.is_empty());
    // the group's own event after the window ends closes it, before it is counted
    let got = eng.feed(&[ev2(11, "a\"b", 1)]);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].context.as_deref(), Some(r#"["a\"b","1"]"#));
    assert_eq!((got[0].events.clone(), got[0].time), (vec![0], 10));
    // the other group's window closes when the clock moves past its end
    assert!(eng.advance(13).is_empty());
    let got = eng.advance(14);
    assert_eq!(got[0].context.as_deref(), Some(r#"["z","2"]"#));
    let (_, _, live, windows) = eng.stats()[0];
    assert_eq!((live, windows), (0, 1)); // the window opened by the event at 11
}

#[test]
fn slots_keep_one_kind_and_windows_need_a_deferred_slot() {
    let mixed = [
        (op::COUNT, 0, 0, 2, 5),
        (op::AGG, 1, 0, 2, 5),
        (op::HALT, 0, 1, 0, 0),
    ];
    let e = decode(&program(&[], &["u"], &[], &mixed)).unwrap_err();
    assert_eq!((e.code, e.pc), ("bad-counter", 1));
    let window = [
        (op::AGG, 1, 0, 2, 5),
        (op::WINDOW, 1, 0, 0, 0),
        (op::HALT, 0, 1, 0, 0),
    ];
    let e = decode(&program(&[], &["u"], &[], &window)).unwrap_err();
    assert_eq!((e.code, e.pc), ("bad-counter", 1));
}
