//! The threat-rule engine: instances, WAIT/resume, LAUNCH, counters, indexing
//! and the cross-rule literal pre-filter.
//!
//! Design: the semantics are those of `vmkernel/reference/rulevm.py` (read its
//! module note); this file adds only speed. Rules are indexed by event type
//! and log source (with a per-(type, source) cache of candidate lists), and
//! every rule with pre-filter literals shares one Aho-Corasick automaton per
//! field, run once per event over the lowercased field text, so most rules
//! are ruled out without running a single instruction. Lowercased field text
//! is computed at most once per event. Instance state is bounded per rule:
//! instances, counters and windows each at most `max_instances`, and each
//! counter or window at most its `AGG` cap entries.

use std::cell::OnceCell;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::Arc;

use aho_corasick::AhoCorasick;

use super::program::{
    op, Cidr, Const, Instr, Program, VerifyError, AGG_DEFERRED, AGG_DISTINCT, MATCH, MONITOR,
    NO_INDEX, NREGS,
};
use super::value::{glob_match, glob_tokens, lower, GTok, Scalar, Value};

/// One input event.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// Event type, e.g. `vm.launch` or `windows/process_creation`.
    pub ty: String,
    /// Optional log source, e.g. `windows/sysmon`.
    pub source: Option<String>,
    /// Time in ns.
    pub time: i64,
    /// Fields other than `type`, `time_ns` and `source`, in input order.
    pub fields: Vec<(String, Value)>,
}

/// A verdict of a halted instance.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Determination {
    /// Index of the rule in load order.
    pub rule: u32,
    /// Context key, when the rule has a context field.
    pub context: Option<String>,
    /// 1 = match, 2 = no-match.
    pub verdict: u16,
    /// Engine-wide numbers of the events of the sequence, oldest first.
    pub events: Vec<u64>,
    /// Time of the event that halted it.
    pub time: i64,
}

/// Per-rule counters, in the order of [`STAT_NAMES`].
pub type Stats = [u64; 8];
/// Names of the per-rule statistics.
pub const STAT_NAMES: [&str; 8] = [
    "runs",
    "steps",
    "skipped",
    "matches",
    "no_matches",
    "silent",
    "expired",
    "evicted",
];
const RUNS: usize = 0;
const STEPS: usize = 1;
const SKIPPED: usize = 2;
const MATCHES: usize = 3;
const NO_MATCHES: usize = 4;
const SILENT: usize = 5;
const EXPIRED: usize = 6;
const EVICTED: usize = 7;

enum PConst {
    Str {
        plain: String,
        low: String,
        gplain: Vec<GTok>,
        glow: Vec<GTok>,
    },
    Int(i64),
    Regex(regex::Regex),
    Cidr(Cidr),
    List {
        set: HashSet<String>,
        lowset: HashSet<String>,
        items: Vec<String>,
        lows: Vec<String>,
        ac: Option<AhoCorasick>,
        ac_low: Option<AhoCorasick>,
    },
}

fn any_of_ac(items: &[String]) -> Option<AhoCorasick> {
    if items.is_empty() || items.iter().any(String::is_empty) {
        return None;
    }
    AhoCorasick::new(items).ok()
}

fn prepare(c: &Const) -> PConst {
    match c {
        Const::Str(s) => PConst::Str {
            plain: s.clone(),
            low: lower(s),
            gplain: glob_tokens(s, false),
            glow: glob_tokens(s, true),
        },
        Const::Int(i) => PConst::Int(*i),
        Const::Regex(_, re) => PConst::Regex(re.clone()),
        Const::Cidr(_, c) => PConst::Cidr(*c),
        Const::List(items) => {
            let lows: Vec<String> = items.iter().map(|s| lower(s)).collect();
            PConst::List {
                set: items.iter().cloned().collect(),
                lowset: lows.iter().cloned().collect(),
                ac: any_of_ac(items),
                ac_low: any_of_ac(&lows),
                items: items.clone(),
                lows,
            }
        }
    }
}

struct Rule {
    prog: Program,
    consts: Vec<PConst>,
    /// Local field index -> global field id.
    gfields: Vec<u32>,
    /// Global field ids of the context (group-by) fields.
    context: Vec<u32>,
    launch_targets: Vec<u32>,
    has_prefilter: bool,
    /// Type lists of ISTYPE / WAIT constants, by constant index.
    type_lists: Vec<Option<Arc<[String]>>>,
}

#[derive(Clone)]
struct Instance {
    first_time: i64,
    last_time: i64,
    last_seq: u64,
    events: Vec<u64>,
    timeout: u64,
    types: Option<Arc<[String]>>,
    created: u64,
}

struct Counter {
    created: u64,
    /// Event times (COUNT, events AGG).
    times: Vec<i64>,
    /// Distinct values with the time each was last seen (distinct AGG), first seen first.
    values: Vec<(String, i64)>,
}

/// A deferred aggregate's open window in one context.
struct Window {
    open_time: i64,
    span: u64,
    cap: u32,
    distinct: bool,
    first_time: i64,
    chain: Vec<u64>,
    count: u32,
    values: Vec<String>,
    created: u64,
    /// pc of the WINDOW instruction a run stopped at.
    resume: Option<usize>,
}

impl Window {
    fn due(&self, now: i64) -> bool {
        i128::from(now) - i128::from(self.open_time) > i128::from(self.span)
    }
    fn end(&self) -> i128 {
        i128::from(self.open_time) + i128::from(self.span)
    }
    fn size(&self) -> u32 {
        if self.distinct {
            u32::try_from(self.values.len()).unwrap_or(u32::MAX)
        } else {
            self.count
        }
    }
}

/// The "event number" of a run without an event (a window close).
const NO_SEQ: u64 = u64::MAX;

struct PfGroup {
    gid: u32,
    ac: Option<AhoCorasick>,
    pat_rules: Vec<Vec<u32>>,
    /// Rules with an empty literal on this field: pass when the field has any text.
    empty: Vec<u32>,
}

/// The loaded rule set and its live state.
pub struct Engine {
    rules: Vec<Rule>,
    gids: HashMap<String, u32>,
    star: Option<u32>,
    index: HashMap<String, Vec<u32>>,
    wild: Vec<u32>,
    cand_cache: HashMap<(String, Option<String>), Arc<[u32]>>,
    pf_groups: Vec<PfGroup>,
    max: usize,
    live: Vec<HashMap<String, BTreeMap<i64, Instance>>>,
    live_count: Vec<usize>,
    counters: Vec<HashMap<(String, u16), Counter>>,
    /// Deferred aggregates: context key -> slot -> open window.
    windows: Vec<HashMap<String, BTreeMap<u16, Window>>>,
    win_count: Vec<usize>,
    created: u64,
    seq: u64,
    steps: u64,
    stats: Vec<Stats>,
    slot_of: Vec<u32>,
}

fn types_match(types: &[String], ty: &str, source: Option<&str>) -> bool {
    types.iter().any(|t| {
        [Some(ty), source].into_iter().flatten().any(|have| {
            have == t
                || (have.len() > t.len()
                    && have.starts_with(t.as_str())
                    && have.as_bytes()[t.len()] == b'/')
        })
    })
}

/// What a register holds.
#[derive(Clone, Copy)]
enum Reg {
    Absent,
    Field(u32),
    Star,
    Ctx,
    Type,
    /// A count (at most an AGG cap).
    Num(u32),
    /// A constant (str or int), by constant index.
    Lit(u32),
}

/// The context key of an event: one field's value, or the compact JSON array of several.
fn json_key(parts: &[String]) -> String {
    use std::fmt::Write as _;
    let mut out = String::from("[");
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push('"');
        for c in p.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\u{8}' => out.push_str("\\b"),
                '\u{c}' => out.push_str("\\f"),
                c if (c as u32) < 0x20 => {
                    let _ = write!(out, "\\u{:04x}", c as u32);
                }
                c => out.push(c),
            }
        }
        out.push('"');
    }
    out.push(']');
    out
}

/// Per-event view: field lookup and lazily lowercased text.
struct EvView<'a> {
    ev: &'a Event,
    seq: u64,
    slot_of: &'a [u32],
    lowered: Vec<OnceCell<Vec<String>>>,
    star_lowered: OnceCell<Vec<String>>,
    type_val: Value,
    /// A window close: no event (no fields, no type).
    no_event: bool,
}

impl EvView<'_> {
    fn field(&self, gid: u32) -> Option<u32> {
        match self.slot_of.get(gid as usize) {
            Some(&s) if s != 0 => Some(s - 1),
            _ => None,
        }
    }

    fn lowered_of(&self, idx: u32) -> &[String] {
        self.lowered[idx as usize].get_or_init(|| {
            self.ev.fields[idx as usize]
                .1
                .elems()
                .iter()
                .filter_map(|s| s.text().map(|t| lower(&t)))
                .collect()
        })
    }

    fn star_lowered(&self) -> &[String] {
        self.star_lowered.get_or_init(|| {
            (0..self.ev.fields.len())
                .flat_map(|i| self.lowered_of(i as u32).iter().cloned())
                .collect()
        })
    }
}

/// Live context of one run.
struct Frame<'a> {
    ctx_val: Option<Value>,
    view: &'a EvView<'a>,
}

impl Frame<'_> {
    /// Any element of `reg` satisfies `f`.
    fn any_elem(&self, reg: Reg, lits: &[PConst], f: &mut dyn FnMut(&Scalar) -> bool) -> bool {
        match reg {
            Reg::Absent => false,
            Reg::Field(i) => self.view.ev.fields[i as usize].1.elems().iter().any(f),
            Reg::Star => self
                .view
                .ev
                .fields
                .iter()
                .any(|(_, v)| v.elems().iter().any(&mut *f)),
            Reg::Ctx => self
                .ctx_val
                .as_ref()
                .is_some_and(|v| v.elems().iter().any(f)),
            Reg::Type => self.view.type_val.elems().iter().any(f),
            Reg::Num(n) => f(&Scalar::Int(i64::from(n))),
            Reg::Lit(i) => match lits.get(i as usize) {
                Some(PConst::Str { plain, .. }) => f(&Scalar::Str(plain.clone())),
                Some(PConst::Int(n)) => f(&Scalar::Int(*n)),
                _ => false,
            },
        }
    }

    /// Any lowercased text view of `reg` satisfies `f`.
    fn any_lowered(&self, reg: Reg, lits: &[PConst], f: &mut dyn FnMut(&str) -> bool) -> bool {
        match reg {
            Reg::Absent => false,
            Reg::Field(i) => self.view.lowered_of(i).iter().any(|s| f(s)),
            Reg::Star => self.view.star_lowered().iter().any(|s| f(s)),
            Reg::Ctx | Reg::Type | Reg::Num(_) | Reg::Lit(_) => {
                self.any_elem(reg, lits, &mut |s| s.text().is_some_and(|t| f(&lower(&t))))
            }
        }
    }

    fn any_text(&self, reg: Reg, lits: &[PConst], f: &mut dyn FnMut(&str) -> bool) -> bool {
        self.any_elem(reg, lits, &mut |s| s.text().is_some_and(|t| f(&t)))
    }

    /// The text views of `reg`'s elements, in order (the values a distinct AGG adds).
    fn texts(&self, reg: Reg, lits: &[PConst]) -> Vec<String> {
        let mut out = Vec::new();
        self.any_elem(reg, lits, &mut |s| {
            if let Some(t) = s.text() {
                out.push(t.into_owned());
            }
            false
        });
        out
    }

    fn exists(&self, reg: Reg) -> bool {
        match reg {
            Reg::Absent => false,
            Reg::Ctx => self.ctx_val.is_some(),
            _ => true,
        }
    }

    fn is_null(&self, reg: Reg) -> bool {
        match reg {
            Reg::Absent => true,
            Reg::Field(i) => matches!(self.view.ev.fields[i as usize].1, Value::One(Scalar::Null)),
            Reg::Ctx => self.ctx_val.is_none(),
            Reg::Star | Reg::Type | Reg::Num(_) | Reg::Lit(_) => false,
        }
    }
}

fn parse_ip(s: &str) -> Option<IpAddr> {
    if s.contains('%') {
        return None;
    }
    IpAddr::from_str(s).ok()
}

fn test(frame: &Frame<'_>, ins: &Instr, c: Option<&PConst>, reg: Reg, lits: &[PConst]) -> bool {
    let ci = ins.x == 1;
    match ins.op {
        op::EXISTS => return frame.exists(reg),
        op::ISNULL => return frame.is_null(reg),
        _ => {}
    }
    let Some(c) = c else { return false };
    match (ins.op, c) {
        (op::EQ, PConst::Int(n)) => frame.any_elem(reg, lits, &mut |s| s.number() == Some(*n)),
        (op::CMP, PConst::Int(n)) => {
            let n = *n;
            frame.any_elem(reg, lits, &mut |s| match s.number() {
                Some(v) => match ins.x {
                    0 => v < n,
                    1 => v <= n,
                    2 => v > n,
                    _ => v >= n,
                },
                None => false,
            })
        }
        (op::REGEX, PConst::Regex(re)) => frame.any_text(reg, lits, &mut |t| re.is_match(t)),
        (op::CIDR, PConst::Cidr(net)) => frame.any_text(reg, lits, &mut |t| {
            parse_ip(t).is_some_and(|ip| net.contains(ip))
        }),
        (op::INSET, PConst::List { set, lowset, .. }) => {
            if ci {
                frame.any_lowered(reg, lits, &mut |t| lowset.contains(t))
            } else {
                frame.any_text(reg, lits, &mut |t| set.contains(t))
            }
        }
        (
            op::ANYOF,
            PConst::List {
                items,
                lows,
                ac,
                ac_low,
                ..
            },
        ) => {
            if ci {
                match ac_low {
                    Some(ac) => frame.any_lowered(reg, lits, &mut |t| ac.is_match(t)),
                    None => frame.any_lowered(reg, lits, &mut |t| {
                        lows.iter().any(|l| t.contains(l.as_str()))
                    }),
                }
            } else {
                match ac {
                    Some(ac) => frame.any_text(reg, lits, &mut |t| ac.is_match(t)),
                    None => frame.any_text(reg, lits, &mut |t| {
                        items.iter().any(|l| t.contains(l.as_str()))
                    }),
                }
            }
        }
        (
            o,
            PConst::Str {
                plain,
                low,
                gplain,
                glow,
            },
        ) => {
            let lit = if ci { low.as_str() } else { plain.as_str() };
            let mut f: Box<dyn FnMut(&str) -> bool> = match o {
                op::EQ => Box::new(move |t: &str| t == lit),
                op::PREFIX => Box::new(move |t: &str| t.starts_with(lit)),
                op::SUFFIX => Box::new(move |t: &str| t.ends_with(lit)),
                op::CONTAINS => Box::new(move |t: &str| t.contains(lit)),
                _ => {
                    let toks: &[GTok] = if ci { glow } else { gplain };
                    Box::new(move |t: &str| glob_match(toks, t))
                }
            };
            if ci {
                frame.any_lowered(reg, lits, &mut *f)
            } else {
                frame.any_text(reg, lits, &mut *f)
            }
        }
        _ => false,
    }
}

fn err(code: &'static str, reason: String) -> VerifyError {
    VerifyError {
        code,
        pc: -1,
        reason,
    }
}

impl Engine {
    /// Loads verified programs; cross-program checks (duplicate names, launch
    /// targets, launch cycles) are all-or-nothing like decoding.
    pub fn new(programs: Vec<Program>, max_instances: usize) -> Result<Self, VerifyError> {
        let mut by_name: HashMap<String, u32> = HashMap::new();
        for (i, p) in programs.iter().enumerate() {
            if by_name.contains_key(&p.name) {
                return Err(err(
                    "duplicate-rule",
                    format!("rule name {:?} of program {i} is already used", p.name),
                ));
            }
            by_name.insert(p.name.clone(), i as u32);
        }
        let mut targets: Vec<Vec<u32>> = Vec::with_capacity(programs.len());
        for p in &programs {
            let mut t = Vec::new();
            for name in &p.launches {
                let Some(&j) = by_name.get(name) else {
                    return Err(err(
                        "unknown-launch-target",
                        format!(
                            "rule {:?} launches {name:?}, expected a loaded rule",
                            p.name
                        ),
                    ));
                };
                if !programs[j as usize].launched {
                    return Err(err(
                        "launch-target",
                        format!(
                            "rule {:?} launches {name:?}, expected a launch-only rule",
                            p.name
                        ),
                    ));
                }
                t.push(j);
            }
            targets.push(t);
        }
        // Iterative DFS in the reference's order (program order, then launch-list order).
        let mut color = vec![0u8; programs.len()];
        for start in 0..programs.len() {
            if color[start] != 0 {
                continue;
            }
            let mut stack: Vec<(usize, usize)> = vec![(start, 0)];
            color[start] = 1;
            while let Some(&mut (k, ref mut next)) = stack.last_mut() {
                if *next < targets[k].len() {
                    let j = targets[k][*next] as usize;
                    *next += 1;
                    if color[j] == 1 {
                        return Err(err(
                            "launch-cycle",
                            format!(
                                "rule {:?} launches {:?}, which leads back to it",
                                programs[k].name, programs[j].name
                            ),
                        ));
                    }
                    if color[j] == 0 {
                        color[j] = 1;
                        stack.push((j, 0));
                    }
                } else {
                    color[k] = 2;
                    stack.pop();
                }
            }
        }
        let mut gids: HashMap<String, u32> = HashMap::new();
        let mut rules = Vec::with_capacity(programs.len());
        let mut index: HashMap<String, Vec<u32>> = HashMap::new();
        let mut wild = Vec::new();
        // (gid, literal) -> rules
        let mut pf: BTreeMap<u32, BTreeMap<String, Vec<u32>>> = BTreeMap::new();
        for (ri, (prog, launch_targets)) in programs.into_iter().zip(targets).enumerate() {
            let ri = ri as u32;
            let gfields: Vec<u32> = prog
                .fields
                .iter()
                .map(|f| {
                    let next = gids.len() as u32;
                    *gids.entry(f.clone()).or_insert(next)
                })
                .collect();
            if prog.types.is_empty() {
                wild.push(ri);
            }
            let mut seen = HashSet::new();
            for t in &prog.types {
                if seen.insert(t.clone()) {
                    index.entry(t.clone()).or_default().push(ri);
                }
            }
            for (fid, lit) in &prog.prefilter {
                let list = pf
                    .entry(gfields[*fid as usize])
                    .or_default()
                    .entry(lower(lit))
                    .or_default();
                if list.last() != Some(&ri) {
                    list.push(ri);
                }
            }
            let type_lists = prog
                .consts
                .iter()
                .map(|c| match c {
                    Const::List(items) => Some(Arc::from(items.clone())),
                    _ => None,
                })
                .collect();
            rules.push(Rule {
                consts: prog.consts.iter().map(prepare).collect(),
                context: prog.context.iter().map(|&c| gfields[c as usize]).collect(),
                gfields,
                launch_targets,
                has_prefilter: !prog.prefilter.is_empty(),
                type_lists,
                prog,
            });
        }
        let pf_groups = pf
            .into_iter()
            .map(|(gid, lits)| {
                let mut empty = Vec::new();
                let mut pats = Vec::new();
                let mut pat_rules = Vec::new();
                for (lit, rs) in lits {
                    if lit.is_empty() {
                        empty.extend(rs);
                    } else {
                        pats.push(lit);
                        pat_rules.push(rs);
                    }
                }
                PfGroup {
                    gid,
                    ac: if pats.is_empty() {
                        None
                    } else {
                        AhoCorasick::new(&pats).ok()
                    },
                    pat_rules,
                    empty,
                }
            })
            .collect();
        let n = rules.len();
        let star = gids.get("*").copied();
        let slot_of = vec![0u32; gids.len()];
        Ok(Self {
            rules,
            gids,
            star,
            index,
            wild,
            cand_cache: HashMap::new(),
            pf_groups,
            max: max_instances.max(1),
            live: (0..n).map(|_| HashMap::new()).collect(),
            live_count: vec![0; n],
            counters: (0..n).map(|_| HashMap::new()).collect(),
            windows: (0..n).map(|_| HashMap::new()).collect(),
            win_count: vec![0; n],
            created: 0,
            seq: 0,
            steps: 0,
            stats: vec![[0; 8]; n],
            slot_of,
        })
    }

    /// Rule names in load order.
    pub fn rule_names(&self) -> Vec<&str> {
        self.rules.iter().map(|r| r.prog.name.as_str()).collect()
    }

    /// Whether rule `i` has a context field.
    pub fn rule_name(&self, i: u32) -> &str {
        &self.rules[i as usize].prog.name
    }

    /// Instructions executed so far.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Events fed so far.
    pub fn events_seen(&self) -> u64 {
        self.seq
    }

    /// Live instances over all rules.
    pub fn live_instances(&self) -> usize {
        self.live_count.iter().sum()
    }

    /// Per-rule statistics, live instance count and open window count.
    pub fn stats(&self) -> Vec<(&str, Stats, usize, usize)> {
        self.rules
            .iter()
            .zip(&self.stats)
            .zip(self.live_count.iter().zip(&self.win_count))
            .map(|((r, s), (l, w))| (r.prog.name.as_str(), *s, *l, *w))
            .collect()
    }

    /// Closes every window that ended before `now` (the clock moved on without an
    /// event of its context); determinations in order of window end, then creation.
    pub fn advance(&mut self, now: i64) -> Vec<Determination> {
        let mut due: Vec<(i128, u64, usize, String, u16)> = Vec::new();
        for (r, per) in self.windows.iter().enumerate() {
            for (key, wins) in per {
                for (&slot, w) in wins {
                    if w.due(now) {
                        due.push((w.end(), w.created, r, key.clone(), slot));
                    }
                }
            }
        }
        due.sort_unstable_by_key(|d| (d.0, d.1));
        let mut out = Vec::new();
        for (_, _, r, key, slot) in due {
            self.close(r, &key, slot, &mut out);
        }
        out
    }

    /// Runs every event in order; returns the determinations.
    pub fn feed(&mut self, events: &[Event]) -> Vec<Determination> {
        let mut out = Vec::new();
        let mut slot_of = std::mem::take(&mut self.slot_of);
        for ev in events {
            let seq = self.seq;
            self.seq += 1;
            for (i, (name, _)) in ev.fields.iter().enumerate() {
                if let Some(&g) = self.gids.get(name) {
                    slot_of[g as usize] = i as u32 + 1;
                }
            }
            let view = EvView {
                ev,
                seq,
                slot_of: &slot_of,
                lowered: (0..ev.fields.len()).map(|_| OnceCell::new()).collect(),
                star_lowered: OnceCell::new(),
                type_val: Value::One(Scalar::Str(ev.ty.clone())),
                no_event: false,
            };
            self.event(&view, &mut out);
            for (name, _) in &ev.fields {
                if let Some(&g) = self.gids.get(name) {
                    slot_of[g as usize] = 0;
                }
            }
        }
        self.slot_of = slot_of;
        out
    }

    fn candidates(&mut self, ev: &Event) -> Arc<[u32]> {
        let key = (ev.ty.clone(), ev.source.clone());
        if let Some(c) = self.cand_cache.get(&key) {
            return Arc::clone(c);
        }
        let mut found: Vec<u32> = self.wild.clone();
        for have in [Some(ev.ty.as_str()), ev.source.as_deref()]
            .into_iter()
            .flatten()
        {
            let mut end = 0;
            loop {
                let next = have[end..].find('/').map(|k| end + k);
                let prefix = &have[..next.unwrap_or(have.len())];
                if let Some(rs) = self.index.get(prefix) {
                    found.extend_from_slice(rs);
                }
                match next {
                    Some(k) => end = k + 1,
                    None => break,
                }
            }
        }
        found.sort_unstable();
        found.dedup();
        let arc: Arc<[u32]> = Arc::from(found);
        if self.cand_cache.len() >= 4096 {
            self.cand_cache.clear();
        }
        self.cand_cache.insert(key, Arc::clone(&arc));
        arc
    }

    fn prefilter_pass(&self, view: &EvView<'_>, pass: &mut [u64]) {
        let mut mark = |r: u32| pass[(r / 64) as usize] |= 1 << (r % 64);
        for g in &self.pf_groups {
            let texts: &[String] = if Some(g.gid) == self.star {
                view.star_lowered()
            } else {
                match view.field(g.gid) {
                    Some(i) => view.lowered_of(i),
                    None => continue,
                }
            };
            if texts.is_empty() {
                continue;
            }
            for &r in &g.empty {
                mark(r);
            }
            if let Some(ac) = &g.ac {
                for t in texts {
                    for m in ac.find_overlapping_iter(t.as_str()) {
                        for &r in &g.pat_rules[m.pattern().as_usize()] {
                            mark(r);
                        }
                    }
                }
            }
        }
    }

    fn event(&mut self, view: &EvView<'_>, out: &mut Vec<Determination>) {
        let ev = view.ev;
        let cands = self.candidates(ev);
        let mut pass: Option<Vec<u64>> = None;
        for &ri in cands.iter() {
            let r = ri as usize;
            if self.live_count[r] == 0 && self.win_count[r] == 0 && self.rules[r].prog.launched {
                continue;
            }
            let key_part = |gid: u32| match view.field(gid).map(|i| &ev.fields[i as usize].1) {
                Some(Value::One(Scalar::Str(s))) => Some(s.clone()),
                Some(Value::One(Scalar::Int(n))) => Some(n.to_string()),
                _ => None,
            };
            let key: String = match self.rules[r].context.as_slice() {
                [] => String::new(),
                [gid] => match key_part(*gid) {
                    Some(k) => k,
                    None => continue,
                },
                gids => match gids
                    .iter()
                    .map(|g| key_part(*g))
                    .collect::<Option<Vec<_>>>()
                {
                    Some(parts) => json_key(&parts),
                    None => continue,
                },
            };
            if self.win_count[r] > 0 {
                if let Some(wins) = self.windows[r].get(&key) {
                    let mut due: Vec<(i128, u64, u16)> = wins
                        .iter()
                        .filter(|(_, w)| w.due(ev.time))
                        .map(|(&slot, w)| (w.end(), w.created, slot))
                        .collect();
                    due.sort_unstable();
                    for (_, _, slot) in due {
                        self.close(r, &key, slot, out);
                    }
                }
            }
            if self.live_count[r] > 0 && self.live[r].get(&key).is_some_and(|w| !w.is_empty()) {
                let wkeys: Vec<i64> = self.live[r][&key].keys().rev().copied().collect();
                for wk in wkeys {
                    let Some(inst) = self.live[r].get(&key).and_then(|w| w.get(&wk)) else {
                        continue;
                    };
                    if inst.last_seq == view.seq {
                        continue;
                    }
                    if i128::from(ev.time) - i128::from(inst.first_time) > i128::from(inst.timeout)
                    {
                        if let Some(w) = self.live[r].get_mut(&key) {
                            w.remove(&wk);
                        }
                        self.live_count[r] -= 1;
                        self.stats[r][EXPIRED] += 1;
                        continue;
                    }
                    if ev.time < inst.last_time {
                        continue;
                    }
                    if let Some(types) = &inst.types {
                        if !types_match(types, &ev.ty, ev.source.as_deref()) {
                            continue;
                        }
                    }
                    let snapshot = inst.clone();
                    self.exec(
                        ri,
                        &key,
                        (wk + 1) as usize,
                        Run::Resume(wk, snapshot),
                        view,
                        out,
                    );
                }
                if self.live[r].get(&key).is_some_and(BTreeMap::is_empty) {
                    self.live[r].remove(&key);
                }
            }
            if self.rules[r].prog.launched {
                continue;
            }
            if self.rules[r].has_prefilter {
                let p = pass.get_or_insert_with(|| {
                    let mut p = vec![0u64; self.rules.len().div_ceil(64)];
                    self.prefilter_pass(view, &mut p);
                    p
                });
                if p[r / 64] & (1 << (r % 64)) == 0 {
                    self.stats[r][SKIPPED] += 1;
                    continue;
                }
            }
            self.exec(ri, &key, 0, Run::Root, view, out);
        }
    }

    fn place(&mut self, r: usize, key: &str, wkey: i64, inst: Instance, now: i64) {
        let occupied = self.live[r].get(key).is_some_and(|w| w.contains_key(&wkey));
        if !occupied && self.live_count[r] >= self.max {
            let mut expired = 0usize;
            for w in self.live[r].values_mut() {
                w.retain(|_, old| {
                    let keep =
                        i128::from(now) - i128::from(old.first_time) <= i128::from(old.timeout);
                    if !keep {
                        expired += 1;
                    }
                    keep
                });
            }
            self.live[r].retain(|k, w| !w.is_empty() || k == key);
            self.live_count[r] -= expired;
            self.stats[r][EXPIRED] += expired as u64;
            if self.live_count[r] >= self.max {
                let victim = self.live[r]
                    .iter()
                    .flat_map(|(k, w)| {
                        w.iter()
                            .map(move |(wk, old)| ((old.first_time, old.created), k, *wk))
                    })
                    .min_by_key(|(order, _, _)| *order)
                    .map(|(_, k, wk)| (k.clone(), wk));
                if let Some((k, wk)) = victim {
                    if let Some(w) = self.live[r].get_mut(&k) {
                        w.remove(&wk);
                        if w.is_empty() && k != key {
                            self.live[r].remove(&k);
                        }
                    }
                    self.live_count[r] -= 1;
                    self.stats[r][EVICTED] += 1;
                }
            }
        }
        if !occupied {
            self.live_count[r] += 1;
        }
        self.live[r]
            .entry(key.to_owned())
            .or_default()
            .insert(wkey, inst);
    }

    fn remove_instance(&mut self, r: usize, key: &str, wkey: i64) {
        if let Some(w) = self.live[r].get_mut(key) {
            if w.remove(&wkey).is_some() {
                self.live_count[r] -= 1;
            }
        }
    }

    /// The (context, slot) counter, made (evicting the oldest created) if new.
    fn counter(&mut self, r: usize, key: &str, slot: u16) -> &mut Counter {
        let ck = (key.to_owned(), slot);
        if !self.counters[r].contains_key(&ck) {
            if self.counters[r].len() >= self.max {
                let victim = self.counters[r]
                    .iter()
                    .min_by_key(|(_, c)| c.created)
                    .map(|(k, _)| k.clone());
                if let Some(v) = victim {
                    self.counters[r].remove(&v);
                    self.stats[r][EVICTED] += 1;
                }
            }
            self.created += 1;
            let created = self.created;
            self.counters[r].insert(
                ck.clone(),
                Counter {
                    created,
                    times: Vec::new(),
                    values: Vec::new(),
                },
            );
        }
        self.counters[r].entry(ck).or_insert_with(|| Counter {
            created: 0,
            times: Vec::new(),
            values: Vec::new(),
        })
    }

    fn count(&mut self, r: usize, key: &str, slot: u16, need: u32, window: u64, now: i64) -> bool {
        let c = self.counter(r, key, slot);
        c.times
            .retain(|x| i128::from(now) - i128::from(*x) <= i128::from(window));
        c.times.push(now);
        if c.times.len() >= need as usize {
            c.times.clear();
            true
        } else {
            false
        }
    }

    /// An `AGG`: adds the event (or `texts`, for a distinct one) and returns the count.
    #[allow(clippy::too_many_arguments)]
    fn agg(
        &mut self,
        r: usize,
        key: &str,
        ins: &Instr,
        texts: Option<Vec<String>>,
        now: i64,
        first_time: i64,
        chain: impl FnOnce() -> Vec<u64>,
    ) -> u32 {
        let (slot, cap, span) = (ins.x & 0xF, ins.a as usize, ins.imm);
        let distinct = texts.is_some();
        let texts = texts.unwrap_or_default();
        if distinct && texts.is_empty() {
            return 0;
        }
        if ins.x & AGG_DEFERRED != 0 {
            let open = self.windows[r]
                .get(key)
                .is_some_and(|m| m.contains_key(&slot));
            if !open {
                if self.win_count[r] >= self.max {
                    let victim = self.windows[r]
                        .iter()
                        .flat_map(|(k, m)| m.iter().map(move |(s, w)| (w.created, k, *s)))
                        .min_by_key(|v| v.0)
                        .map(|(_, k, s)| (k.clone(), s));
                    if let Some((k, s)) = victim {
                        if let Some(m) = self.windows[r].get_mut(&k) {
                            m.remove(&s);
                            if m.is_empty() {
                                self.windows[r].remove(&k);
                            }
                        }
                        self.win_count[r] -= 1;
                        self.stats[r][EVICTED] += 1;
                    }
                }
                self.created += 1;
                let w = Window {
                    open_time: now,
                    span,
                    cap: ins.a,
                    distinct,
                    first_time,
                    chain: chain(),
                    count: 0,
                    values: Vec::new(),
                    created: self.created,
                    resume: None,
                };
                self.windows[r]
                    .entry(key.to_owned())
                    .or_default()
                    .insert(slot, w);
                self.win_count[r] += 1;
            }
            let Some(w) = self.windows[r].get_mut(key).and_then(|m| m.get_mut(&slot)) else {
                return 0;
            };
            if distinct {
                for v in texts {
                    if w.values.len() < cap && !w.values.contains(&v) {
                        w.values.push(v);
                    }
                }
            } else {
                w.count = (w.count + 1).min(w.cap);
            }
            return w.size();
        }
        let c = self.counter(r, key, slot);
        let fresh = |t: i64| i128::from(now) - i128::from(t) <= i128::from(span);
        if distinct {
            c.values.retain(|(_, last)| fresh(*last));
            for v in texts {
                match c.values.iter_mut().find(|e| e.0 == v) {
                    Some(e) => e.1 = e.1.max(now),
                    None => c.values.push((v, now)),
                }
                while c.values.len() > cap {
                    // drop the value seen longest ago (the first of equals)
                    let Some((i, _)) = c.values.iter().enumerate().min_by_key(|(_, e)| e.1) else {
                        break;
                    };
                    c.values.remove(i);
                }
            }
            u32::try_from(c.values.len()).unwrap_or(u32::MAX)
        } else {
            c.times.retain(|t| fresh(*t));
            c.times.push(now);
            while c.times.len() > cap {
                let Some((i, _)) = c.times.iter().enumerate().min_by_key(|(_, t)| **t) else {
                    break;
                };
                c.times.remove(i);
            }
            u32::try_from(c.times.len()).unwrap_or(u32::MAX)
        }
    }

    /// Closes a window: drops it and resumes the run stopped at its WINDOW, without an event.
    fn close(&mut self, r: usize, key: &str, slot: u16, out: &mut Vec<Determination>) {
        let Some(w) = self.windows[r].get_mut(key).and_then(|m| m.remove(&slot)) else {
            return;
        };
        self.win_count[r] -= 1;
        if self.windows[r].get(key).is_some_and(BTreeMap::is_empty) {
            self.windows[r].remove(key);
        }
        let Some(pc) = w.resume else { return };
        let end = i64::try_from(w.end()).unwrap_or(i64::MAX);
        let none = Event {
            ty: String::new(),
            source: None,
            time: end,
            fields: Vec::new(),
        };
        let view = EvView {
            ev: &none,
            seq: NO_SEQ,
            slot_of: &[],
            lowered: Vec::new(),
            star_lowered: OnceCell::new(),
            type_val: Value::One(Scalar::Null),
            no_event: true,
        };
        self.exec(r as u32, key, pc + 1, Run::Close(w), &view, out);
    }

    fn exec(
        &mut self,
        ri: u32,
        key: &str,
        start: usize,
        run: Run,
        view: &EvView<'_>,
        out: &mut Vec<Determination>,
    ) {
        let r = ri as usize;
        let ev = view.ev;
        let now = ev.time;
        self.stats[r][RUNS] += 1;
        let has_ctx = !self.rules[r].context.is_empty();
        let frame = Frame {
            ctx_val: has_ctx.then(|| Value::One(Scalar::Str(key.to_owned()))),
            view,
        };
        let mut regs = [Reg::Absent; NREGS as usize];
        let mut flag = false;
        let mut pc = start;
        let mut steps = 0u64;
        let (resumed, first_time, base, extra): (Option<i64>, i64, &[u64], Option<u64>) = match &run
        {
            Run::Root => (None, now, &[], Some(view.seq)),
            Run::Resume(wk, inst) => (Some(*wk), inst.first_time, &inst.events, Some(view.seq)),
            Run::Close(w) => {
                regs[self.rules[r].prog.code[start - 1].r as usize] = Reg::Num(w.size());
                (None, w.first_time, &w.chain, None)
            }
        };
        let created_of = match &run {
            Run::Resume(_, inst) => Some(inst.created),
            _ => None,
        };
        let chain = || {
            let mut c = base.to_vec();
            c.extend(extra);
            c
        };
        let seq = if view.no_event { NO_SEQ } else { view.seq };
        loop {
            let rule = &self.rules[r];
            let ins = rule.prog.code[pc];
            steps += 1;
            match ins.op {
                op::LOADF => {
                    let gid = rule.gfields[ins.a as usize];
                    regs[ins.r as usize] = if Some(gid) == self.star && !view.no_event {
                        Reg::Star
                    } else {
                        match view.field(gid) {
                            Some(i) => Reg::Field(i),
                            None => Reg::Absent,
                        }
                    };
                }
                op::JF => {
                    if !flag {
                        pc = ins.a as usize;
                        continue;
                    }
                }
                op::JT => {
                    if flag {
                        pc = ins.a as usize;
                        continue;
                    }
                }
                op::JMP => {
                    pc = ins.a as usize;
                    continue;
                }
                op::NOT => flag = !flag,
                op::EQ..=op::ISNULL | op::INSET | op::ANYOF => {
                    let c = rule.consts.get(ins.a as usize);
                    flag = test(&frame, &ins, c, regs[ins.r as usize], &rule.consts);
                }
                op::ISTYPE => {
                    flag = !view.no_event
                        && rule.type_lists[ins.a as usize]
                            .as_ref()
                            .is_some_and(|t| types_match(t, &ev.ty, ev.source.as_deref()));
                }
                op::LOADCTX => {
                    regs[ins.r as usize] = if has_ctx { Reg::Ctx } else { Reg::Absent };
                }
                op::LOADTYPE => {
                    regs[ins.r as usize] = if view.no_event {
                        Reg::Absent
                    } else {
                        Reg::Type
                    };
                }
                op::LOADK => regs[ins.r as usize] = Reg::Lit(ins.a),
                op::COUNT => {
                    flag = !view.no_event && self.count(r, key, ins.x, ins.a, ins.imm, now);
                }
                op::AGG => {
                    let n = if view.no_event {
                        0
                    } else {
                        let texts = (ins.x & AGG_DISTINCT != 0).then(|| {
                            frame.texts(regs[usize::from((ins.x >> 4) & 0xF)], &rule.consts)
                        });
                        self.agg(r, key, &ins, texts, now, first_time, chain)
                    };
                    regs[ins.r as usize] = Reg::Num(n);
                }
                op::RESET => {
                    self.counters[r].remove(&(key.to_owned(), ins.x));
                }
                op::WINDOW => {
                    if let Some(w) = self.windows[r].get_mut(key).and_then(|m| m.get_mut(&ins.x)) {
                        if w.resume.is_none() {
                            w.resume = Some(pc);
                        }
                    }
                    break; // the run ends; a resumed instance stays waiting
                }
                op::LAUNCH => {
                    let tj = rule.launch_targets[ins.a as usize] as usize;
                    self.created += 1;
                    let inst = Instance {
                        first_time: now,
                        last_time: now,
                        last_seq: seq,
                        events: chain(),
                        timeout: ins.imm,
                        types: None,
                        created: self.created,
                    };
                    self.place(tj, key, -1, inst, now);
                }
                op::WAIT => {
                    let types = if ins.a == NO_INDEX {
                        None
                    } else {
                        rule.type_lists[ins.a as usize].clone()
                    };
                    let created = match (resumed, created_of) {
                        (Some(wk), Some(c)) => {
                            self.remove_instance(r, key, wk);
                            c
                        }
                        _ => {
                            self.created += 1;
                            self.created
                        }
                    };
                    let inst = Instance {
                        first_time,
                        last_time: now,
                        last_seq: seq,
                        events: chain(),
                        timeout: ins.imm,
                        types,
                        created,
                    };
                    self.place(r, key, pc as i64, inst, now);
                    break;
                }
                _ => {
                    // HALT
                    let verdict = ins.x;
                    if verdict != MONITOR {
                        let silent = rule.prog.silent;
                        if let Some(wk) = resumed {
                            self.remove_instance(r, key, wk);
                        }
                        self.stats[r][if verdict == MATCH {
                            MATCHES
                        } else {
                            NO_MATCHES
                        }] += 1;
                        if silent {
                            self.stats[r][SILENT] += 1;
                        } else {
                            out.push(Determination {
                                rule: ri,
                                context: has_ctx.then(|| key.to_owned()),
                                verdict,
                                events: chain(),
                                time: now,
                            });
                        }
                    }
                    break;
                }
            }
            pc += 1;
        }
        self.stats[r][STEPS] += steps;
        self.steps += steps;
    }
}

/// How a run starts: a fresh instance, a waiting one resumed by an event, or a closed window.
enum Run {
    Root,
    Resume(i64, Instance),
    Close(Window),
}
