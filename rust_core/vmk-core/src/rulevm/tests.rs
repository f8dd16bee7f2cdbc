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
    p.extend_from_slice(&1u16.to_le_bytes());
    p.extend_from_slice(&0u16.to_le_bytes());
    s(&mut p, name);
    p.extend_from_slice(&u32::MAX.to_le_bytes());
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
