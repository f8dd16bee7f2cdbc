//! Program format, decoder and verifier of threat rules.
//!
//! Design: mirrors `vmkernel/rules/program.py` check for check and in the
//! same order, so a bad program gets the same `(code, pc)` from both
//! loaders. Decoding never panics: every read is bounds-checked, every count
//! is capped before anything is allocated for it, and the verifier walks the
//! code once (jumps only go forward, so one pass in pc order sees every
//! predecessor of an instruction before the instruction itself).
//!
//! Format version 2 adds group-by contexts of several fields and the
//! aggregate instructions `LOADK`, `AGG`, `WINDOW` and `RESET`: every
//! instruction naming a counter slot must agree on its kind, cap and window,
//! so a slot's live state has one shape and at most `cap` entries.

use std::net::IpAddr;
use std::str::FromStr;

/// Program magic.
pub const MAGIC: &[u8; 4] = b"VMKR";
/// The only format version this loader reads.
pub const VERSION: u16 = 2;
/// Flag: determinations are counted, not emitted.
pub const FLAG_SILENT: u16 = 1;
/// Flag: the rule only runs when another rule launches it.
pub const FLAG_LAUNCHED: u16 = 2;
/// "No index" (no context field; WAIT for any type).
pub const NO_INDEX: u32 = u32::MAX;

/// Most instructions in one program.
pub const MAX_CODE: u32 = 4096;
const MAX_CONSTS: u32 = 65536;
const MAX_STR: u32 = 65536;
const MAX_LIST: u32 = 65536;
const MAX_REGEX: usize = 4096;
const MAX_FIELDS: u32 = 4096;
const MAX_TYPES: u32 = 1024;
const MAX_LAUNCH: u32 = 256;
const MAX_TAGS: u32 = 256;
const MAX_PREFILTER: u32 = 65536;
const MAX_COUNT: u32 = 4096;
/// Largest `AGG` cap: enough to decide a comparison with any threshold up to 4096.
pub const MAX_AGG_CAP: u32 = MAX_COUNT + 1;
const MAX_SLOTS: u16 = 16;
/// Most context (group-by) fields.
pub const MAX_GROUP: u32 = 16;
/// `AGG` operand flag: count distinct text values of the value register.
pub const AGG_DISTINCT: u16 = 0x100;
/// `AGG` operand flag: a window opened by its first event, decided when it closes.
pub const AGG_DEFERRED: u16 = 0x200;
/// Value registers per run.
pub const NREGS: u8 = 16;
/// Largest WAIT / LAUNCH / COUNT time span.
pub const MAX_TIMEOUT_NS: u64 = 1 << 62;
const REGEX_SIZE_LIMIT: usize = 1 << 25;

/// Opcodes.
#[allow(missing_docs)]
pub mod op {
    pub const LOADF: u8 = 0x01;
    pub const LOADCTX: u8 = 0x02;
    pub const LOADTYPE: u8 = 0x03;
    pub const LOADK: u8 = 0x04;
    pub const EQ: u8 = 0x10;
    pub const PREFIX: u8 = 0x11;
    pub const SUFFIX: u8 = 0x12;
    pub const CONTAINS: u8 = 0x13;
    pub const GLOB: u8 = 0x14;
    pub const REGEX: u8 = 0x15;
    pub const CMP: u8 = 0x16;
    pub const CIDR: u8 = 0x17;
    pub const EXISTS: u8 = 0x18;
    pub const ISNULL: u8 = 0x19;
    pub const INSET: u8 = 0x1A;
    pub const ANYOF: u8 = 0x1B;
    pub const ISTYPE: u8 = 0x1C;
    pub const NOT: u8 = 0x20;
    pub const JMP: u8 = 0x21;
    pub const JT: u8 = 0x22;
    pub const JF: u8 = 0x23;
    pub const WAIT: u8 = 0x30;
    pub const LAUNCH: u8 = 0x31;
    pub const COUNT: u8 = 0x32;
    pub const AGG: u8 = 0x33;
    pub const WINDOW: u8 = 0x34;
    pub const RESET: u8 = 0x35;
    pub const HALT: u8 = 0x3F;
}

fn op_name(code: u8) -> Option<&'static str> {
    Some(match code {
        op::LOADF => "loadf",
        op::LOADCTX => "loadctx",
        op::LOADTYPE => "loadtype",
        op::LOADK => "loadk",
        op::EQ => "eq",
        op::PREFIX => "prefix",
        op::SUFFIX => "suffix",
        op::CONTAINS => "contains",
        op::GLOB => "glob",
        op::REGEX => "regex",
        op::CMP => "cmp",
        op::CIDR => "cidr",
        op::EXISTS => "exists",
        op::ISNULL => "isnull",
        op::INSET => "inset",
        op::ANYOF => "anyof",
        op::ISTYPE => "istype",
        op::NOT => "not",
        op::JMP => "jmp",
        op::JT => "jt",
        op::JF => "jf",
        op::WAIT => "wait",
        op::LAUNCH => "launch",
        op::COUNT => "count",
        op::AGG => "agg",
        op::WINDOW => "window",
        op::RESET => "reset",
        op::HALT => "halt",
        _ => return None,
    })
}

/// HALT verdicts.
pub const MONITOR: u16 = 0;
/// HALT verdict: match.
pub const MATCH: u16 = 1;
/// HALT verdict: no-match.
pub const NO_MATCH: u16 = 2;
/// Verdict names by number.
pub const VERDICTS: [&str; 3] = ["monitor", "match", "no-match"];

/// Why a program was refused (`pc` is -1 outside the code).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyError {
    /// Short machine-readable code, e.g. `backward-jump`.
    pub code: &'static str,
    /// Instruction index, or -1.
    pub pc: i64,
    /// What was wrong and what was expected.
    pub reason: String,
}

impl VerifyError {
    fn new(code: &'static str, pc: i64, reason: impl Into<String>) -> Self {
        Self {
            code,
            pc,
            reason: reason.into(),
        }
    }
    /// Whether this is the version-mismatch error.
    pub fn is_version(&self) -> bool {
        self.code == "version"
    }
}

/// One constant-pool entry.
#[derive(Debug, Clone)]
pub enum Const {
    /// Text.
    Str(String),
    /// 64-bit integer.
    Int(i64),
    /// Regex pattern (already checked and compiled).
    Regex(String, regex::Regex),
    /// Network.
    Cidr(String, Cidr),
    /// List of texts.
    List(Vec<String>),
}

impl Const {
    fn kind(&self) -> &'static str {
        match self {
            Const::Str(_) => "str",
            Const::Int(_) => "int",
            Const::Regex(..) => "regex",
            Const::Cidr(..) => "cidr",
            Const::List(_) => "list",
        }
    }
}

/// An address block.
#[derive(Debug, Clone, Copy)]
pub struct Cidr {
    /// Network address (host bits may be set; they are masked on compare).
    pub addr: IpAddr,
    /// Prefix length.
    pub bits: u8,
}

impl Cidr {
    /// Whether `ip` lies in the block (families must agree).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = if self.bits == 0 {
                    0
                } else {
                    u32::MAX << (32 - u32::from(self.bits))
                };
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = if self.bits == 0 {
                    0
                } else {
                    u128::MAX << (128 - u32::from(self.bits))
                };
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// `addr/prefix` with a plain decimal prefix length.
pub fn parse_cidr(text: &str) -> Option<Cidr> {
    let (addr, prefix) = text.split_once('/')?;
    if prefix.contains('/')
        || addr.contains('%')
        || prefix.is_empty()
        || !prefix.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let ip = IpAddr::from_str(addr).ok()?;
    let bits: u32 = if prefix.len() <= 3 {
        prefix.parse().ok()?
    } else {
        999
    };
    let max = if ip.is_ipv4() { 32 } else { 128 };
    if bits > max {
        return None;
    }
    Some(Cidr {
        addr: ip,
        bits: u8::try_from(bits).ok()?,
    })
}

/// A fixed-width instruction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Instr {
    /// Opcode.
    pub op: u8,
    /// Register.
    pub r: u8,
    /// Flags / verdict / slot.
    pub x: u16,
    /// Index or jump target or threshold.
    pub a: u32,
    /// Time span in ns.
    pub imm: u64,
}

/// A decoded, verified program.
#[derive(Debug, Clone)]
pub struct Program {
    /// Rule name (id or title).
    pub name: String,
    /// Instructions.
    pub code: Vec<Instr>,
    /// Constant pool.
    pub consts: Vec<Const>,
    /// Field names.
    pub fields: Vec<String>,
    /// Event types the rule listens to (empty: all).
    pub types: Vec<String>,
    /// Rules this one may launch.
    pub launches: Vec<String>,
    /// Free-text tags.
    pub tags: Vec<String>,
    /// Pre-filter literals `(field index, literal)`.
    pub prefilter: Vec<(u32, String)>,
    /// Context (group-by) field indices; empty: none.
    pub context: Vec<u32>,
    /// Silent mode.
    pub silent: bool,
    /// Launch-only.
    pub launched: bool,
}

struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], VerifyError> {
        let left = self.data.len() - self.pos;
        if n > left {
            return Err(VerifyError::new(
                "truncated",
                -1,
                format!(
                    "{what} needs {n} bytes at offset {}, only {left} left",
                    self.pos
                ),
            ));
        }
        let chunk = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(chunk)
    }
    fn u8(&mut self, what: &str) -> Result<u8, VerifyError> {
        Ok(self.take(1, what)?[0])
    }
    fn u16(&mut self, what: &str) -> Result<u16, VerifyError> {
        let b = self.take(2, what)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self, what: &str) -> Result<u32, VerifyError> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn i64(&mut self, what: &str) -> Result<i64, VerifyError> {
        let b = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(i64::from_le_bytes(a))
    }
    fn count(&mut self, what: &str, cap: u32) -> Result<u32, VerifyError> {
        let n = self.u32(what)?;
        if n > cap {
            return Err(VerifyError::new(
                "too-large",
                -1,
                format!("{what} is {n}, expected at most {cap}"),
            ));
        }
        Ok(n)
    }
    fn str(&mut self, what: &str, cap: u32) -> Result<String, VerifyError> {
        let n = self.u32(&format!("length of {what}"))?;
        if n > cap {
            return Err(VerifyError::new(
                "too-large",
                -1,
                format!("length of {what} is {n}, expected at most {cap}"),
            ));
        }
        let raw = self.take(n as usize, what)?;
        match std::str::from_utf8(raw) {
            Ok(s) => Ok(s.to_owned()),
            Err(_) => Err(VerifyError::new(
                "bad-utf8",
                -1,
                format!("{what} is not valid UTF-8"),
            )),
        }
    }
}

fn bound(digits: &[char]) -> u64 {
    if digits.is_empty() {
        0
    } else if digits.len() <= 9 {
        digits
            .iter()
            .fold(0u64, |acc, c| acc * 10 + u64::from(*c as u32 - '0' as u32))
    } else {
        1_000_000_000
    }
}

/// Whether a quantifier starts at `j`: (repeats, end).
fn repeat_at(p: &[char], j: usize) -> (bool, usize) {
    let n = p.len();
    if j >= n {
        return (false, j);
    }
    match p[j] {
        '*' | '+' => (true, j + 1),
        '?' => (false, j + 1),
        '{' => {
            let mut k = j + 1;
            while k < n && (p[k].is_ascii_digit() || p[k] == ',') {
                k += 1;
            }
            let body = &p[(j + 1).min(k)..k];
            if k < n && p[k] == '}' && k > j + 1 && body.iter().filter(|c| **c == ',').count() <= 1
            {
                match body.iter().position(|c| *c == ',') {
                    None => (bound(body) > 1, k + 1),
                    Some(comma) => {
                        let (low, high) = (&body[..comma], &body[comma + 1..]);
                        if high.is_empty() {
                            (!low.is_empty(), k + 1)
                        } else {
                            (bound(high) > 1, k + 1)
                        }
                    }
                }
            } else {
                (false, j)
            }
        }
        _ => (false, j),
    }
}

/// True when a repeated group contains a repetition, as `(a+)+`.
pub fn catastrophic_regex(pattern: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let n = p.len();
    let mut stack: Vec<bool> = vec![false];
    let mut i = 0usize;
    let mark = |stack: &mut Vec<bool>| {
        if let Some(top) = stack.last_mut() {
            *top = true;
        }
    };
    while i < n {
        let c = p[i];
        if c == '\\' {
            let (rep, e) = repeat_at(&p, i + 2);
            i = e;
            if rep {
                mark(&mut stack);
            }
            continue;
        }
        if c == '[' {
            i += 1;
            if i < n && p[i] == '^' {
                i += 1;
            }
            if i < n && p[i] == ']' {
                i += 1;
            }
            while i < n && p[i] != ']' {
                i += if p[i] == '\\' { 2 } else { 1 };
            }
            let (rep, e) = repeat_at(&p, i + 1);
            i = e;
            if rep {
                mark(&mut stack);
            }
            continue;
        }
        if c == '(' {
            stack.push(false);
            i += 1;
            continue;
        }
        if c == ')' {
            let inner = if stack.len() > 1 {
                stack.pop().unwrap_or(false)
            } else {
                false
            };
            let (rep, e) = repeat_at(&p, i + 1);
            i = e;
            if rep && inner {
                return true;
            }
            if rep || inner {
                mark(&mut stack);
            }
            continue;
        }
        let (rep, j) = repeat_at(&p, i);
        if j != i {
            if rep {
                mark(&mut stack);
            }
            i = j;
            continue;
        }
        let (rep, e) = repeat_at(&p, i + 1);
        i = e;
        if rep {
            mark(&mut stack);
        }
    }
    false
}

fn py_repr_bytes(b: &[u8]) -> String {
    let mut s = String::from("b'");
    for &c in b {
        match c {
            b'\\' => s.push_str("\\\\"),
            b'\'' => s.push_str("\\'"),
            b'\t' => s.push_str("\\t"),
            b'\n' => s.push_str("\\n"),
            b'\r' => s.push_str("\\r"),
            0x20..=0x7e => s.push(c as char),
            _ => s.push_str(&format!("\\x{c:02x}")),
        }
    }
    s.push('\'');
    s
}

/// Decodes and verifies one program.
pub fn decode(data: &[u8]) -> Result<Program, VerifyError> {
    let mut rd = Reader { data, pos: 0 };
    if data.len() < 4 {
        return Err(VerifyError::new(
            "truncated",
            -1,
            format!("{} bytes, expected at least the 4-byte magic", data.len()),
        ));
    }
    let magic = rd.take(4, "magic")?;
    if magic != MAGIC {
        return Err(VerifyError::new(
            "bad-magic",
            -1,
            format!(
                "magic {}, expected {}",
                py_repr_bytes(magic),
                py_repr_bytes(MAGIC)
            ),
        ));
    }
    let version = rd.u16("version")?;
    if version != VERSION {
        return Err(VerifyError::new(
            "version",
            -1,
            format!("program version {version}, expected {VERSION}"),
        ));
    }
    let flags = rd.u16("flags")?;
    if flags & !(FLAG_SILENT | FLAG_LAUNCHED) != 0 {
        return Err(VerifyError::new(
            "bad-flags",
            -1,
            format!("flags {flags:#x}, expected only bits 0x1 (silent) and 0x2 (launched)"),
        ));
    }
    let name = rd.str("rule name", 1024)?;
    let n_context = rd.count("context field count", MAX_GROUP)?;
    let mut context = Vec::new();
    for j in 0..n_context {
        context.push(rd.u32(&format!("context field {j}"))?);
    }
    let n_consts = rd.count("constant count", MAX_CONSTS)?;
    let mut consts = Vec::new();
    for i in 0..n_consts {
        let tag = rd.u8(&format!("tag of constant {i}"))?;
        let what = format!("constant {i}");
        let c = match tag {
            1 => Const::Str(rd.str(&what, MAX_STR)?),
            2 => Const::Int(rd.i64(&what)?),
            3 => {
                let pat = rd.str(&what, MAX_STR)?;
                let chars = pat.chars().count();
                if chars > MAX_REGEX {
                    return Err(VerifyError::new(
                        "regex-too-large",
                        -1,
                        format!("constant {i}: regex of {chars} characters, expected at most {MAX_REGEX}"),
                    ));
                }
                if catastrophic_regex(&pat) {
                    return Err(VerifyError::new(
                        "regex-catastrophic",
                        -1,
                        format!("constant {i}: regex {pat:?} repeats a group that itself repeats, expected no nested repetition"),
                    ));
                }
                match regex::RegexBuilder::new(&pat)
                    .size_limit(REGEX_SIZE_LIMIT)
                    .dfa_size_limit(REGEX_SIZE_LIMIT)
                    .build()
                {
                    Ok(re) => Const::Regex(pat, re),
                    Err(err) => {
                        return Err(VerifyError::new(
                            "regex-invalid",
                            -1,
                            format!("constant {i}: regex {pat:?} does not compile ({err})"),
                        ))
                    }
                }
            }
            4 => {
                let text = rd.str(&what, MAX_STR)?;
                match parse_cidr(&text) {
                    Some(c) => Const::Cidr(text, c),
                    None => {
                        return Err(VerifyError::new(
                            "bad-cidr",
                            -1,
                            format!("constant {i}: {text:?}, expected address/prefix-length"),
                        ))
                    }
                }
            }
            5 => {
                let k = rd.count(&format!("length of constant {i}"), MAX_LIST)?;
                let mut items = Vec::new();
                for j in 0..k {
                    items.push(rd.str(&format!("item {j} of constant {i}"), MAX_STR)?);
                }
                Const::List(items)
            }
            _ => {
                return Err(VerifyError::new(
                    "bad-const",
                    -1,
                    format!("constant {i} has tag {tag}, expected 1..5"),
                ))
            }
        };
        consts.push(c);
    }
    let mut tables: Vec<Vec<String>> = Vec::new();
    for (what, cap) in [
        ("field", MAX_FIELDS),
        ("type", MAX_TYPES),
        ("launch", MAX_LAUNCH),
        ("tag", MAX_TAGS),
    ] {
        let n = rd.count(&format!("{what} count"), cap)?;
        let mut t = Vec::new();
        let len_cap = if what == "tag" { MAX_STR } else { 1024 };
        for j in 0..n {
            t.push(rd.str(&format!("{what} {j}"), len_cap)?);
        }
        tables.push(t);
    }
    let tags = tables.pop().unwrap_or_default();
    let launches = tables.pop().unwrap_or_default();
    let types = tables.pop().unwrap_or_default();
    let fields = tables.pop().unwrap_or_default();
    let n_pf = rd.count("pre-filter count", MAX_PREFILTER)?;
    let mut prefilter = Vec::new();
    for j in 0..n_pf {
        let fid = rd.u32(&format!("field of pre-filter {j}"))?;
        if fid as usize >= fields.len() {
            return Err(VerifyError::new(
                "bad-field",
                -1,
                format!(
                    "pre-filter {j} names field {fid}, expected below {}",
                    fields.len()
                ),
            ));
        }
        prefilter.push((fid, rd.str(&format!("pre-filter {j}"), MAX_STR)?));
    }
    let n_code = rd.u32("code length")?;
    if n_code == 0 {
        return Err(VerifyError::new(
            "empty-code",
            0,
            "a program without instructions, expected at least a HALT",
        ));
    }
    if n_code > MAX_CODE {
        return Err(VerifyError::new(
            "too-large",
            -1,
            format!("{n_code} instructions, expected at most {MAX_CODE}"),
        ));
    }
    let raw = rd.take(n_code as usize * 16, "code")?;
    if rd.pos != data.len() {
        return Err(VerifyError::new(
            "trailing-bytes",
            -1,
            format!(
                "{} bytes after the code, expected none",
                data.len() - rd.pos
            ),
        ));
    }
    for (j, &fid) in context.iter().enumerate() {
        if fid as usize >= fields.len() {
            return Err(VerifyError::new(
                "bad-field",
                -1,
                format!(
                    "context field {j} is {fid}, expected below {}",
                    fields.len()
                ),
            ));
        }
    }
    let code: Vec<Instr> = raw
        .chunks_exact(16)
        .map(|c| Instr {
            op: c[0],
            r: c[1],
            x: u16::from_le_bytes([c[2], c[3]]),
            a: u32::from_le_bytes([c[4], c[5], c[6], c[7]]),
            imm: u64::from_le_bytes([c[8], c[9], c[10], c[11], c[12], c[13], c[14], c[15]]),
        })
        .collect();
    let prog = Program {
        name,
        code,
        consts,
        fields,
        types,
        launches,
        tags,
        prefilter,
        context,
        silent: flags & FLAG_SILENT != 0,
        launched: flags & FLAG_LAUNCHED != 0,
    };
    verify_code(&prog)?;
    Ok(prog)
}

const FLAG_BIT: u32 = 1 << NREGS;
const ALL_DEFINED: u32 = (1 << (NREGS as u32 + 1)) - 1;

fn unused(pc: i64) -> VerifyError {
    VerifyError::new("bad-operand", pc, "unused operands set, expected zero")
}

fn verify_code(p: &Program) -> Result<(), VerifyError> {
    let n = p.code.len();
    let mut incoming: Vec<Option<u32>> = vec![None; n + 1];
    incoming[0] = Some(0);
    let merge = |incoming: &mut Vec<Option<u32>>, t: usize, m: u32| {
        incoming[t] = Some(match incoming[t] {
            None => m,
            Some(cur) => cur & m,
        });
    };
    let const_of = |pc: i64, ins: &Instr, kinds: &[&str]| -> Result<&Const, VerifyError> {
        let Some(c) = p.consts.get(ins.a as usize) else {
            return Err(VerifyError::new(
                "const-missing",
                pc,
                format!("constant {}, expected below {}", ins.a, p.consts.len()),
            ));
        };
        if !kinds.contains(&c.kind()) {
            return Err(VerifyError::new(
                "const-type",
                pc,
                format!(
                    "constant {} is a {}, expected a {}",
                    ins.a,
                    c.kind(),
                    kinds.join(" or ")
                ),
            ));
        }
        Ok(c)
    };
    let timeout = |pc: i64, v: u64| -> Result<(), VerifyError> {
        if !(1..=MAX_TIMEOUT_NS).contains(&v) {
            return Err(VerifyError::new(
                "bad-timeout",
                pc,
                format!("timeout {v} ns, expected 1..={MAX_TIMEOUT_NS}"),
            ));
        }
        Ok(())
    };
    // slot -> (kind, flags, cap, window) of the first instruction naming it (kind 0 count, 1 agg)
    let mut slots: [Option<(u8, u16, u32, u64)>; MAX_SLOTS as usize] = [None; MAX_SLOTS as usize];
    let slot_use = |slots: &mut [Option<(u8, u16, u32, u64)>; MAX_SLOTS as usize],
                    pc: i64,
                    slot: u16,
                    sig: (u8, u16, u32, u64)|
     -> Result<(), VerifyError> {
        let have = slots[usize::from(slot)].get_or_insert(sig);
        if *have != sig {
            return Err(VerifyError::new(
                "bad-counter",
                pc,
                format!("slot {slot} was used with another kind, cap or window before, expected one per slot"),
            ));
        }
        Ok(())
    };
    for (i, ins) in p.code.iter().enumerate() {
        let pc = i as i64;
        let o = ins.op;
        if op_name(o).is_none() {
            return Err(VerifyError::new(
                "bad-opcode",
                pc,
                format!("opcode {o:#04x}, expected one of the 28 known opcodes"),
            ));
        }
        let mask = incoming[i].unwrap_or(ALL_DEFINED);
        let mut uses = 0u32;
        let mut defs = 0u32;
        match o {
            op::LOADF | op::LOADCTX | op::LOADTYPE => {
                if ins.r >= NREGS {
                    return Err(VerifyError::new(
                        "bad-register",
                        pc,
                        format!("register {}, expected below {NREGS}", ins.r),
                    ));
                }
                if o == op::LOADF && ins.a as usize >= p.fields.len() {
                    return Err(VerifyError::new(
                        "bad-field",
                        pc,
                        format!("field {}, expected below {}", ins.a, p.fields.len()),
                    ));
                }
                if ins.x != 0 || ins.imm != 0 || (o != op::LOADF && ins.a != 0) {
                    return Err(unused(pc));
                }
                defs = 1 << ins.r;
            }
            op::LOADK => {
                if ins.r >= NREGS {
                    return Err(VerifyError::new(
                        "bad-register",
                        pc,
                        format!("register {}, expected below {NREGS}", ins.r),
                    ));
                }
                const_of(pc, ins, &["str", "int"])?;
                if ins.x != 0 || ins.imm != 0 {
                    return Err(unused(pc));
                }
                defs = 1 << ins.r;
            }
            op::EQ..=op::ISNULL | op::INSET | op::ANYOF => {
                if ins.r >= NREGS {
                    return Err(VerifyError::new(
                        "bad-register",
                        pc,
                        format!("register {}, expected below {NREGS}", ins.r),
                    ));
                }
                let mut max_x = 0u16;
                match o {
                    op::EQ => {
                        let c = const_of(pc, ins, &["str", "int"])?;
                        max_x = u16::from(matches!(c, Const::Str(_)));
                    }
                    op::PREFIX | op::SUFFIX | op::CONTAINS | op::GLOB => {
                        const_of(pc, ins, &["str"])?;
                        max_x = 1;
                    }
                    op::REGEX => {
                        const_of(pc, ins, &["regex"])?;
                    }
                    op::CMP => {
                        const_of(pc, ins, &["int"])?;
                        max_x = 3;
                    }
                    op::CIDR => {
                        const_of(pc, ins, &["cidr"])?;
                    }
                    op::INSET | op::ANYOF => {
                        const_of(pc, ins, &["list"])?;
                        max_x = 1;
                    }
                    _ => {
                        if ins.a != 0 {
                            return Err(unused(pc));
                        }
                    }
                }
                if ins.x > max_x || ins.imm != 0 {
                    return Err(VerifyError::new(
                        "bad-operand",
                        pc,
                        format!("flags {}, expected at most {max_x} and imm 0", ins.x),
                    ));
                }
                uses = 1 << ins.r;
                defs = FLAG_BIT;
            }
            op::ISTYPE => {
                const_of(pc, ins, &["list"])?;
                if ins.r != 0 || ins.x != 0 || ins.imm != 0 {
                    return Err(unused(pc));
                }
                defs = FLAG_BIT;
            }
            op::NOT => {
                if ins.r != 0 || ins.x != 0 || ins.a != 0 || ins.imm != 0 {
                    return Err(unused(pc));
                }
                uses = FLAG_BIT;
                defs = FLAG_BIT;
            }
            op::JMP | op::JT | op::JF => {
                if ins.r != 0 || ins.x != 0 || ins.imm != 0 {
                    return Err(unused(pc));
                }
                if o != op::JMP {
                    uses = FLAG_BIT;
                }
            }
            op::WAIT => {
                if ins.a != NO_INDEX {
                    const_of(pc, ins, &["list"])?;
                }
                if ins.r != 0 || ins.x != 0 {
                    return Err(unused(pc));
                }
                timeout(pc, ins.imm)?;
            }
            op::LAUNCH => {
                if ins.a as usize >= p.launches.len() {
                    return Err(VerifyError::new(
                        "bad-launch",
                        pc,
                        format!(
                            "launch entry {}, expected below {}",
                            ins.a,
                            p.launches.len()
                        ),
                    ));
                }
                if ins.r != 0 || ins.x != 0 {
                    return Err(unused(pc));
                }
                timeout(pc, ins.imm)?;
            }
            op::COUNT => {
                if ins.x >= MAX_SLOTS {
                    return Err(VerifyError::new(
                        "bad-counter",
                        pc,
                        format!("counter slot {}, expected below {MAX_SLOTS}", ins.x),
                    ));
                }
                if !(1..=MAX_COUNT).contains(&ins.a) {
                    return Err(VerifyError::new(
                        "bad-counter",
                        pc,
                        format!("threshold {}, expected 1..={MAX_COUNT}", ins.a),
                    ));
                }
                if ins.r != 0 {
                    return Err(unused(pc));
                }
                timeout(pc, ins.imm)?;
                slot_use(&mut slots, pc, ins.x, (0, 0, ins.a, ins.imm))?;
                defs = FLAG_BIT;
            }
            op::AGG => {
                if ins.r >= NREGS {
                    return Err(VerifyError::new(
                        "bad-register",
                        pc,
                        format!("register {}, expected below {NREGS}", ins.r),
                    ));
                }
                let distinct = ins.x & AGG_DISTINCT != 0;
                if ins.x & !(0xFF | AGG_DISTINCT | AGG_DEFERRED) != 0
                    || (!distinct && ins.x & 0xF0 != 0)
                {
                    return Err(VerifyError::new(
                        "bad-operand",
                        pc,
                        format!(
                            "agg operand {:#x}, expected a slot, a value register (distinct only) \
                             and flags 0x100 (distinct), 0x200 (deferred)",
                            ins.x
                        ),
                    ));
                }
                if !(1..=MAX_AGG_CAP).contains(&ins.a) {
                    return Err(VerifyError::new(
                        "bad-counter",
                        pc,
                        format!("cap {}, expected 1..={MAX_AGG_CAP}", ins.a),
                    ));
                }
                timeout(pc, ins.imm)?;
                slot_use(&mut slots, pc, ins.x & 0xF, (1, ins.x >> 8, ins.a, ins.imm))?;
                if distinct {
                    uses = 1 << ((ins.x >> 4) & 0xF);
                }
                defs = 1 << ins.r;
            }
            op::WINDOW | op::RESET => {
                if o == op::WINDOW && ins.r >= NREGS {
                    return Err(VerifyError::new(
                        "bad-register",
                        pc,
                        format!("register {}, expected below {NREGS}", ins.r),
                    ));
                }
                if ins.x >= MAX_SLOTS {
                    return Err(VerifyError::new(
                        "bad-counter",
                        pc,
                        format!("counter slot {}, expected below {MAX_SLOTS}", ins.x),
                    ));
                }
                let sig = slots[usize::from(ins.x)];
                if ins.a != 0 || ins.imm != 0 || (o == op::RESET && ins.r != 0) {
                    return Err(unused(pc));
                }
                let deferred = |s: (u8, u16, u32, u64)| s.0 == 1 && s.1 & (AGG_DEFERRED >> 8) != 0;
                if o == op::WINDOW && !sig.is_some_and(deferred) {
                    return Err(VerifyError::new(
                        "bad-counter",
                        pc,
                        format!(
                            "window on slot {}, expected a slot of an earlier deferred agg",
                            ins.x
                        ),
                    ));
                }
                if o == op::RESET && sig.is_none_or(deferred) {
                    return Err(VerifyError::new(
                        "bad-counter",
                        pc,
                        format!(
                            "reset of slot {}, expected a slot of an earlier count or sliding agg",
                            ins.x
                        ),
                    ));
                }
            }
            _ => {
                // HALT
                if ins.x > NO_MATCH {
                    return Err(VerifyError::new(
                        "bad-verdict",
                        pc,
                        format!(
                            "verdict {}, expected 0 (monitor), 1 (match) or 2 (no-match)",
                            ins.x
                        ),
                    ));
                }
                if ins.r != 0 || ins.a != 0 || ins.imm != 0 {
                    return Err(unused(pc));
                }
            }
        }
        if uses & !mask != 0 {
            let reg = if o == op::AGG {
                (ins.x >> 4) & 0xF
            } else {
                u16::from(ins.r)
            };
            let what = if uses & !mask & FLAG_BIT != 0 {
                "the test flag".to_owned()
            } else {
                format!("register {reg}")
            };
            return Err(VerifyError::new(
                "undefined-register",
                pc,
                format!("{what} is read before it is written on some path"),
            ));
        }
        let out = mask | defs;
        match o {
            op::JMP | op::JT | op::JF => {
                let t = ins.a as usize;
                if t <= i {
                    return Err(VerifyError::new(
                        "backward-jump",
                        pc,
                        format!("jump to {}, expected a target after {i}", ins.a),
                    ));
                }
                if t >= n {
                    return Err(VerifyError::new(
                        "jump-out-of-range",
                        pc,
                        format!("jump to {}, expected below {n}", ins.a),
                    ));
                }
                merge(&mut incoming, t, out);
                if o != op::JMP {
                    merge(&mut incoming, i + 1, out);
                }
            }
            op::WAIT => merge(&mut incoming, i + 1, 0),
            // the run ends; it resumes at the window's close with only the count register set
            op::WINDOW => merge(&mut incoming, i + 1, 1 << ins.r),
            op::HALT => {}
            _ => merge(&mut incoming, i + 1, out),
        }
    }
    let last = p.code[n - 1];
    if last.op != op::HALT {
        return Err(VerifyError::new(
            "no-final-halt",
            n as i64 - 1,
            format!(
                "last instruction is {}, expected halt",
                op_name(last.op).unwrap_or("?")
            ),
        ));
    }
    Ok(())
}
