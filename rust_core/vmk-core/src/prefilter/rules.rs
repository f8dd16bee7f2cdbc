//! Pre-filter rules and their three formats: the line-oriented text format,
//! JSON, and the ClassBench filter format.
//!
//! Design: a [`Rule`] is plain data in the same shape for every format;
//! addresses are `u128` in IPv6 form with IPv4 mapped into `::ffff:0:0/96`
//! and a prefix length counted in the rule's own family (0..=32 or 0..=128).
//! Port ranges stay ranges: nothing is expanded into prefixes. Parsing is
//! all-or-nothing: the first bad token is a [`RuleError`] with its line and
//! column (or JSON path), so a caller never installs half a rule set.
//! Tokens are separated by spaces and tabs only and lines by `\n` (a trailing
//! `\r` is dropped), so the pure-Python reference tokenises identically.

use std::fmt::Write as _;
use std::net::{Ipv4Addr, Ipv6Addr};

use super::parse::V4_MAPPED;

/// What a matching rule does with a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// Forward straight to the destination.
    Bypass,
    /// Send to the security component on service path `spi`, index `si`.
    Redirect {
        /// 24-bit service path identifier.
        spi: u32,
        /// Starting service index (1..=255).
        si: u8,
    },
    /// Discard.
    Drop,
}

/// Direction bit: traffic arriving at the VM's NIC.
pub const DIR_IN: u8 = 1;
/// Direction bit: traffic leaving the VM's NIC.
pub const DIR_OUT: u8 = 2;
/// Both directions.
pub const DIR_INOUT: u8 = 3;

/// Largest service path identifier (24 bits).
pub const MAX_SPI: u32 = 0x00FF_FFFF;
/// Largest VNI (24 bits).
pub const MAX_VNI: u32 = 0x00FF_FFFF;
/// Largest VLAN id.
pub const MAX_VLAN: u16 = 4095;
/// Rules per table: bounds memory and build time (10,000-rule tables are
/// the benchmark target; a hundred times that is still a fraction of a GiB).
pub const MAX_RULES: usize = 1_000_000;

/// One classification rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Rule {
    /// Position in the rule set (0-based); breaks priority ties.
    pub id: u32,
    /// Lower is consulted first.
    pub priority: u32,
    /// What a match does.
    pub action: Action,
    /// [`DIR_IN`], [`DIR_OUT`] or [`DIR_INOUT`].
    pub direction: u8,
    /// 4, 6, or 0 for rules that match either family (both addresses `any`).
    pub family: u8,
    /// Source prefix (IPv6 form, host bits cleared).
    pub src: u128,
    /// Source prefix length in the rule's family.
    pub src_len: u8,
    /// Destination prefix.
    pub dst: u128,
    /// Destination prefix length.
    pub dst_len: u8,
    /// Inclusive source port range.
    pub sport: (u16, u16),
    /// Inclusive destination port range.
    pub dport: (u16, u16),
    /// Protocol value (already masked) and mask.
    pub proto: (u8, u8),
    /// TCP flags value (already masked) and mask, as written; matching uses
    /// only the bits of `parse::TCP_FLAGS_MASK`.
    pub flags: (u16, u16),
    /// VLAN id, or `None` for any.
    pub vlan: Option<u16>,
    /// VNI, or `None` for any.
    pub vni: Option<u32>,
}

impl Rule {
    /// A rule that matches everything, in both directions, with `action`.
    pub fn any(id: u32, action: Action) -> Self {
        Rule {
            id,
            priority: id,
            action,
            direction: DIR_INOUT,
            family: 0,
            src: 0,
            src_len: 0,
            dst: 0,
            dst_len: 0,
            sport: (0, u16::MAX),
            dport: (0, u16::MAX),
            proto: (0, 0),
            flags: (0, 0),
            vlan: None,
            vni: None,
        }
    }

    /// The prefix length over the 128-bit mapped address space.
    pub fn wide_len(&self, len: u8) -> u8 {
        if self.family == 4 {
            len + 96
        } else {
            len
        }
    }

    /// The precedence order key: lower wins.
    pub fn precedence(&self) -> u64 {
        (u64::from(self.priority) << 32) | u64::from(self.id)
    }
}

/// Where a rule error was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// A text or ClassBench line (1-based line and character column).
    Text {
        /// Line number.
        line: usize,
        /// Column of the offending token.
        column: usize,
    },
    /// A JSON syntax error at line / column.
    JsonSyntax {
        /// Line number.
        line: usize,
        /// Column.
        column: usize,
    },
    /// A JSON value, by path (`rules[3].dport`).
    JsonPath(String),
    /// The whole rule set or an option of the call.
    Set(String),
}

/// A rejected rule set: where, the offending text, and what was expected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleError {
    /// Where the problem is.
    pub location: Location,
    /// The offending token or value.
    pub value: String,
    /// What would have been accepted.
    pub expected: String,
}

impl std::fmt::Display for RuleError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:?}: got {:?}, expected {}",
            self.location, self.value, self.expected
        )
    }
}

impl std::error::Error for RuleError {}

/// The input format of a rule set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// The line-oriented `action key=value ...` format.
    Text,
    /// JSON: a list of rule objects, or `{"rules": [...]}`.
    Json,
    /// ClassBench filter lines (`@src dst sp : sp dp : dp proto/mask [flags/mask]`).
    ClassBench,
}

// ---------------------------------------------------------------------------
// Shared value parsers. Each returns `Err(expected)`; callers add the location.

/// Decimal or `0x` hexadecimal, no sign, no underscores.
fn number(tok: &str, max: u64) -> Option<u64> {
    let (digits, radix) = match tok.strip_prefix("0x").or_else(|| tok.strip_prefix("0X")) {
        Some(hex) => (hex, 16),
        None => (tok, 10),
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    // Skip leading zeros so long zero-padded numbers do not overflow.
    let trimmed = digits.trim_start_matches('0');
    if trimmed.len() > 20 {
        return None;
    }
    let v = if trimmed.is_empty() {
        0
    } else {
        u64::from_str_radix(trimmed, radix).ok()?
    };
    (v <= max).then_some(v)
}

fn port_range(tok: &str) -> Result<(u16, u16), &'static str> {
    const EXP: &str = "a port 0..65535, a range LO-HI with LO <= HI, or any";
    if tok == "any" {
        return Ok((0, u16::MAX));
    }
    let (lo, hi) = match tok.split_once('-') {
        Some((a, b)) => (a, b),
        None => (tok, tok),
    };
    let lo = number(lo, 65535).ok_or(EXP)? as u16;
    let hi = number(hi, 65535).ok_or(EXP)? as u16;
    if lo > hi {
        return Err(EXP);
    }
    Ok((lo, hi))
}

fn value_mask(tok: &str, max: u64) -> Option<(u64, u64)> {
    let (v, m) = tok.split_once('/')?;
    Some((number(v, max)?, number(m, max)?))
}

fn protocol(tok: &str) -> Result<(u8, u8), &'static str> {
    const EXP: &str = "tcp, udp, icmp, icmpv6, sctp, a number 0..255, VALUE/MASK or any";
    let named = match tok {
        "any" => return Ok((0, 0)),
        "tcp" => 6,
        "udp" => 17,
        "icmp" => 1,
        "icmpv6" => 58,
        "sctp" => 132,
        _ => {
            if tok.contains('/') {
                let (v, m) = value_mask(tok, 255).ok_or(EXP)?;
                return Ok(((v & m) as u8, m as u8));
            }
            number(tok, 255).ok_or(EXP)?
        }
    };
    Ok((named as u8, 0xFF))
}

/// An address with optional `/len`; returns (family, mapped address, len).
fn prefix(tok: &str) -> Result<(u8, u128, u8), &'static str> {
    const EXP: &str = "an IPv4 or IPv6 address with an optional /LEN, or any";
    let (a, len) = match tok.split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (tok, None),
    };
    let (family, raw, max) = if !a.contains(':') {
        let ip: Ipv4Addr = a.parse().map_err(|_| EXP)?;
        (4u8, V4_MAPPED | u128::from(u32::from(ip)), 32u8)
    } else {
        if a.contains('%') || a.contains('.') {
            // Scoped and dotted-quad-suffixed forms parse differently across
            // implementations; accept the plain forms only.
            return Err(EXP);
        }
        let ip: Ipv6Addr = a.parse().map_err(|_| EXP)?;
        (6u8, u128::from(ip), 128u8)
    };
    let len = match len {
        None => max,
        Some(l) => {
            if !l.chars().all(|c| c.is_ascii_digit()) {
                return Err(EXP);
            }
            number(l, u64::from(max)).ok_or(EXP)? as u8
        }
    };
    let wide = if family == 4 { len + 96 } else { len };
    Ok((family, raw & mask128(wide), len))
}

/// The 128-bit mask of a prefix length.
pub fn mask128(len: u8) -> u128 {
    if len == 0 {
        0
    } else {
        u128::MAX << (128 - u32::from(len.min(128)))
    }
}

fn direction(tok: &str) -> Result<u8, &'static str> {
    match tok {
        "in" => Ok(DIR_IN),
        "out" => Ok(DIR_OUT),
        "inout" => Ok(DIR_INOUT),
        _ => Err("in, out or inout"),
    }
}

/// Parses a direction name given to `classify` (`in` or `out`).
pub fn packet_direction(tok: &str) -> Option<u8> {
    match tok {
        "in" => Some(DIR_IN),
        "out" => Some(DIR_OUT),
        _ => None,
    }
}

// ---------------------------------------------------------------------------
// A format-independent rule builder: fields arrive as (name, text) pairs.

const FIELD_NAMES: [&str; 13] = [
    "prio", "dir", "proto", "src", "dst", "sport", "dport", "flags", "vlan", "vni", "spi", "si",
    "action",
];

struct Builder {
    rule: Rule,
    spi: Option<u32>,
    si: Option<u8>,
    src_family: u8,
    dst_family: u8,
    seen: u16,
}

impl Builder {
    fn new(id: u32, action: Action) -> Self {
        Builder {
            rule: Rule::any(id, action),
            spi: None,
            si: None,
            src_family: 0,
            dst_family: 0,
            seen: 0,
        }
    }

    /// Sets one field; `Err(expected)` on a bad name or value.
    fn set(&mut self, name: &str, value: &str) -> Result<(), String> {
        let Some(idx) = FIELD_NAMES.iter().position(|n| *n == name) else {
            return Err(format!(
                "a field name, one of {}",
                FIELD_NAMES[..12].join(", ")
            ));
        };
        if self.seen & (1 << idx) != 0 {
            return Err(format!("{name} given once"));
        }
        self.seen |= 1 << idx;
        let r = &mut self.rule;
        match name {
            "prio" => {
                r.priority =
                    number(value, u64::from(u32::MAX)).ok_or("a priority 0..4294967295")? as u32
            }
            "dir" => r.direction = direction(value)?,
            "proto" => r.proto = protocol(value)?,
            "src" | "dst" => {
                let (family, addr, len) = if value == "any" {
                    (0, 0, 0)
                } else {
                    prefix(value)?
                };
                let other = if name == "src" {
                    self.dst_family
                } else {
                    self.src_family
                };
                if family != 0 && other != 0 && family != other {
                    return Err("an address of the same family as the other address".into());
                }
                if name == "src" {
                    self.src_family = family;
                    (r.src, r.src_len) = (addr, len);
                } else {
                    self.dst_family = family;
                    (r.dst, r.dst_len) = (addr, len);
                }
            }
            "sport" => r.sport = port_range(value)?,
            "dport" => r.dport = port_range(value)?,
            "flags" => {
                r.flags = if value == "any" {
                    (0, 0)
                } else {
                    let (v, m) = value_mask(value, 0xFFFF)
                        .ok_or("VALUE/MASK with each 0..0xffff, or any")?;
                    ((v & m) as u16, m as u16)
                }
            }
            "vlan" => {
                r.vlan = if value == "any" {
                    None
                } else {
                    Some(
                        number(value, u64::from(MAX_VLAN)).ok_or("a VLAN id 0..4095 or any")?
                            as u16,
                    )
                }
            }
            "vni" => {
                r.vni = if value == "any" {
                    None
                } else {
                    Some(
                        number(value, u64::from(MAX_VNI)).ok_or("a VNI 0..16777215 or any")? as u32,
                    )
                }
            }
            "spi" => {
                self.spi =
                    Some(number(value, u64::from(MAX_SPI)).ok_or("an SPI 0..16777215")? as u32)
            }
            "si" => {
                let si = number(value, 255)
                    .filter(|v| *v >= 1)
                    .ok_or("an SI 1..255")?;
                self.si = Some(si as u8);
            }
            _ => return Err("a field name other than action".into()),
        }
        Ok(())
    }

    /// Finishes the rule: `Err((field, expected))` when fields do not fit together.
    fn finish(mut self) -> Result<Rule, (&'static str, String)> {
        // A family-specific rule whose other address is `any` means any
        // address of that family (IPv4: the whole mapped /96).
        if let Action::Redirect { .. } = self.rule.action {
            let Some(spi) = self.spi else {
                return Err(("spi", "spi=N on a redirect rule".into()));
            };
            self.rule.action = Action::Redirect {
                spi,
                si: self.si.unwrap_or(255),
            };
        } else if self.spi.is_some() {
            return Err(("spi", "no spi on a bypass or drop rule".into()));
        } else if self.si.is_some() {
            return Err(("si", "no si on a bypass or drop rule".into()));
        }
        self.rule.family = self.src_family.max(self.dst_family);
        if self.rule.family == 4 {
            self.rule.src |= if self.rule.src_len == 0 { V4_MAPPED } else { 0 };
            self.rule.dst |= if self.rule.dst_len == 0 { V4_MAPPED } else { 0 };
        }
        Ok(self.rule)
    }
}

fn action_of(word: &str) -> Option<Action> {
    match word {
        "bypass" => Some(Action::Bypass),
        "drop" => Some(Action::Drop),
        "redirect" => Some(Action::Redirect { spi: 0, si: 255 }),
        _ => None,
    }
}

/// Splits on `\n`, dropping one trailing `\r` per line; yields (1-based line, text).
fn lines(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.split('\n')
        .enumerate()
        .map(|(i, l)| (i + 1, l.strip_suffix('\r').unwrap_or(l)))
}

/// Tokens separated by spaces and tabs, each with its 1-based character column.
fn tokens(line: &str) -> Vec<(usize, &str)> {
    let mut out = Vec::new();
    let mut start: Option<(usize, usize)> = None;
    let mut col = 0usize;
    for (byte_idx, ch) in line.char_indices() {
        col += 1;
        if ch == ' ' || ch == '\t' {
            if let Some((b, c)) = start.take() {
                out.push((c, &line[b..byte_idx]));
            }
        } else if start.is_none() {
            start = Some((byte_idx, col));
        }
    }
    if let Some((b, c)) = start {
        out.push((c, &line[b..]));
    }
    out
}

fn strip_comment(line: &str) -> &str {
    match line.find('#') {
        Some(i) => &line[..i],
        None => line,
    }
}

fn text_err(line: usize, column: usize, value: &str, expected: impl Into<String>) -> RuleError {
    RuleError {
        location: Location::Text { line, column },
        value: value.to_string(),
        expected: expected.into(),
    }
}

fn check_count(n: usize) -> Result<u32, RuleError> {
    if n >= MAX_RULES {
        return Err(RuleError {
            location: Location::Set("rule count".into()),
            value: (n + 1).to_string(),
            expected: format!("at most {MAX_RULES} rules"),
        });
    }
    Ok(n as u32)
}

/// Parses the text format.
pub fn parse_text(text: &str) -> Result<Vec<Rule>, RuleError> {
    let mut rules = Vec::new();
    for (lineno, raw) in lines(text) {
        let toks = tokens(strip_comment(raw));
        let Some(&(col, word)) = toks.first() else {
            continue;
        };
        let id = check_count(rules.len())?;
        let action = action_of(word)
            .ok_or_else(|| text_err(lineno, col, word, "bypass, redirect or drop"))?;
        let mut b = Builder::new(id, action);
        let mut given: [Option<(usize, &str)>; FIELD_NAMES.len()] = [None; FIELD_NAMES.len()];
        for &(col, tok) in &toks[1..] {
            let Some((name, value)) = tok.split_once('=') else {
                return Err(text_err(lineno, col, tok, "NAME=VALUE"));
            };
            if let Some(i) = FIELD_NAMES.iter().position(|n| *n == name) {
                given[i] = Some((col, tok));
            }
            b.set(name, value)
                .map_err(|exp| text_err(lineno, col, tok, exp))?;
        }
        let rule = b.finish().map_err(|(field, exp)| {
            let at = FIELD_NAMES
                .iter()
                .position(|n| *n == field)
                .and_then(|i| given[i])
                .unwrap_or((col, word));
            text_err(lineno, at.0, at.1, exp)
        })?;
        rules.push(rule);
    }
    Ok(rules)
}

/// Parses ClassBench filter lines; every rule gets `action` and both directions.
pub fn parse_classbench(text: &str, action: Action) -> Result<Vec<Rule>, RuleError> {
    let mut rules = Vec::new();
    for (lineno, raw) in lines(text) {
        let toks = tokens(raw);
        let Some(&(col0, first)) = toks.first() else {
            continue;
        };
        if first.starts_with('#') {
            continue;
        }
        let id = check_count(rules.len())?;
        let Some(src) = first.strip_prefix('@') else {
            return Err(text_err(
                lineno,
                col0,
                first,
                "a filter line starting with @",
            ));
        };
        let mut fields: Vec<(usize, &str)> = Vec::with_capacity(9);
        fields.push((col0 + 1, src));
        fields.extend_from_slice(&toks[1..]);
        let mut it = fields.into_iter();
        let mut rule = Rule::any(id, action);
        rule.family = 4;
        let mut next = |what: &'static str| {
            it.next()
                .ok_or_else(|| text_err(lineno, raw.chars().count() + 1, "", what))
        };
        for slot in 0..2 {
            let (c, tok) = next("a source and a destination prefix")?;
            let (fam, addr, len) = prefix(tok).map_err(|e| text_err(lineno, c, tok, e))?;
            if fam != 4 || !tok.contains('/') {
                return Err(text_err(lineno, c, tok, "an IPv4 prefix A.B.C.D/LEN"));
            }
            if slot == 0 {
                (rule.src, rule.src_len) = (addr, len);
            } else {
                (rule.dst, rule.dst_len) = (addr, len);
            }
        }
        for slot in 0..2 {
            let (c, lo) = next("a port range LO : HI")?;
            let (lo_s, hi_s, hc) = if let Some((a, b)) = lo.split_once(':') {
                (a, b, c)
            } else {
                let (cs, sep) = next("a port range LO : HI")?;
                if sep != ":" {
                    return Err(text_err(lineno, cs, sep, ":"));
                }
                let (ch, hi) = next("a port range LO : HI")?;
                (lo, hi, ch)
            };
            let lo_v =
                number(lo_s, 65535).ok_or_else(|| text_err(lineno, c, lo_s, "a port 0..65535"))?;
            let hi_v =
                number(hi_s, 65535).ok_or_else(|| text_err(lineno, hc, hi_s, "a port 0..65535"))?;
            if lo_v > hi_v {
                return Err(text_err(lineno, hc, hi_s, "a high port >= the low port"));
            }
            let range = (lo_v as u16, hi_v as u16);
            if slot == 0 {
                rule.sport = range;
            } else {
                rule.dport = range;
            }
        }
        let (c, p) = next("a protocol VALUE/MASK")?;
        let (v, m) = value_mask(p, 255)
            .ok_or_else(|| text_err(lineno, c, p, "a protocol VALUE/MASK, each 0..0xff"))?;
        rule.proto = ((v & m) as u8, m as u8);
        if let Some((c, f)) = it.next() {
            let (v, m) = value_mask(f, 0xFFFF)
                .ok_or_else(|| text_err(lineno, c, f, "a flags VALUE/MASK, each 0..0xffff"))?;
            rule.flags = ((v & m) as u16, m as u16);
        }
        if let Some((c, extra)) = it.next() {
            return Err(text_err(lineno, c, extra, "the end of the filter line"));
        }
        rule.src |= if rule.src_len == 0 { V4_MAPPED } else { 0 };
        rule.dst |= if rule.dst_len == 0 { V4_MAPPED } else { 0 };
        rules.push(rule);
    }
    Ok(rules)
}

fn json_err(path: String, value: &serde_json::Value, expected: impl Into<String>) -> RuleError {
    RuleError {
        location: Location::JsonPath(path),
        value: value.to_string(),
        expected: expected.into(),
    }
}

/// Parses the JSON format.
pub fn parse_json(text: &str) -> Result<Vec<Rule>, RuleError> {
    let doc: serde_json::Value = serde_json::from_str(text).map_err(|e| RuleError {
        location: Location::JsonSyntax {
            line: e.line(),
            column: e.column(),
        },
        value: e.to_string(),
        expected: "a JSON document".into(),
    })?;
    let list = match &doc {
        serde_json::Value::Array(items) => items,
        serde_json::Value::Object(obj) if obj.len() == 1 && obj.contains_key("rules") => {
            match &obj["rules"] {
                serde_json::Value::Array(items) => items,
                other => return Err(json_err("rules".into(), other, "a list of rule objects")),
            }
        }
        other => {
            return Err(json_err(
                "$".into(),
                other,
                "a list of rule objects or {\"rules\": [...]}",
            ))
        }
    };
    let mut rules = Vec::with_capacity(list.len());
    for (i, item) in list.iter().enumerate() {
        let id = check_count(i)?;
        let path = format!("rules[{i}]");
        let serde_json::Value::Object(obj) = item else {
            return Err(json_err(path, item, "a rule object"));
        };
        let action = match obj.get("action") {
            Some(serde_json::Value::String(s)) => action_of(s),
            _ => None,
        }
        .ok_or_else(|| {
            json_err(
                format!("{path}.action"),
                obj.get("action").unwrap_or(&serde_json::Value::Null),
                "\"bypass\", \"redirect\" or \"drop\"",
            )
        })?;
        let mut b = Builder::new(id, action);
        // Visit fields in a fixed order so the first error is the same in
        // every implementation, whatever the key order in the document.
        let mut names: Vec<&String> = obj.keys().collect();
        names.sort();
        for name in names {
            if name == "action" {
                continue;
            }
            let v = &obj[name.as_str()];
            let fpath = format!("{path}.{name}");
            let text = match (name.as_str(), v) {
                (_, serde_json::Value::String(s)) => s.clone(),
                (_, serde_json::Value::Number(n)) if n.is_u64() => n.to_string(),
                ("sport" | "dport", serde_json::Value::Array(pair)) if pair.len() == 2 => {
                    match (&pair[0], &pair[1]) {
                        (serde_json::Value::Number(a), serde_json::Value::Number(b))
                            if a.is_u64() && b.is_u64() =>
                        {
                            format!("{a}-{b}")
                        }
                        _ => return Err(json_err(fpath, v, "[LO, HI] with integer ports")),
                    }
                }
                _ => return Err(json_err(fpath, v, "a string or a non-negative integer")),
            };
            if !FIELD_NAMES.contains(&name.as_str()) {
                return Err(json_err(
                    fpath,
                    v,
                    format!("no such field; fields are {}", FIELD_NAMES.join(", ")),
                ));
            }
            b.set(name, &text).map_err(|exp| json_err(fpath, v, exp))?;
        }
        let rule = b.finish().map_err(|(field, exp)| {
            json_err(
                format!("{path}.{field}"),
                obj.get(field).unwrap_or(&serde_json::Value::Null),
                exp,
            )
        })?;
        rules.push(rule);
    }
    Ok(rules)
}

// ---------------------------------------------------------------------------
// Writers.

fn fmt_addr(family: u8, addr: u128) -> String {
    if family == 4 {
        Ipv4Addr::from((addr & 0xFFFF_FFFF) as u32).to_string()
    } else {
        fmt_v6(addr)
    }
}

/// RFC 5952 text of an IPv6 address, always in hex groups (never a dotted
/// quad), so every implementation writes the same text.
pub fn fmt_v6(addr: u128) -> String {
    let groups: Vec<u16> = (0..8).map(|i| (addr >> (112 - 16 * i)) as u16).collect();
    // Longest run of zero groups (at least two), leftmost on a tie.
    let (mut best_start, mut best_len) = (8usize, 0usize);
    let mut i = 0;
    while i < 8 {
        if groups[i] == 0 {
            let start = i;
            while i < 8 && groups[i] == 0 {
                i += 1;
            }
            if i - start > best_len {
                (best_start, best_len) = (start, i - start);
            }
        } else {
            i += 1;
        }
    }
    let hex = |gs: &[u16]| {
        gs.iter()
            .map(|g| format!("{g:x}"))
            .collect::<Vec<_>>()
            .join(":")
    };
    if best_len < 2 {
        return hex(&groups);
    }
    format!(
        "{}::{}",
        hex(&groups[..best_start]),
        hex(&groups[best_start + best_len..])
    )
}

fn fmt_prefix(family: u8, addr: u128, len: u8) -> String {
    match family {
        0 => "any".into(),
        _ => format!("{}/{}", fmt_addr(family, addr), len),
    }
}

fn fmt_range(r: (u16, u16)) -> String {
    if r == (0, u16::MAX) {
        "any".into()
    } else if r.0 == r.1 {
        r.0.to_string()
    } else {
        format!("{}-{}", r.0, r.1)
    }
}

/// Writes rules in the text format; `parse_text` of the result gives them back.
pub fn write_text(rules: &[Rule]) -> String {
    let mut out = String::new();
    for r in rules {
        match r.action {
            Action::Bypass => out.push_str("bypass"),
            Action::Drop => out.push_str("drop"),
            Action::Redirect { spi, si } => {
                let _ = write!(out, "redirect spi={spi} si={si}");
            }
        }
        let _ = write!(out, " prio={}", r.priority);
        if r.direction != DIR_INOUT {
            out.push_str(if r.direction == DIR_IN {
                " dir=in"
            } else {
                " dir=out"
            });
        }
        if r.family != 0 {
            let _ = write!(
                out,
                " src={} dst={}",
                fmt_prefix(r.family, r.src, r.src_len),
                fmt_prefix(r.family, r.dst, r.dst_len)
            );
        }
        if r.proto.1 != 0 {
            let _ = write!(out, " proto={}/{}", r.proto.0, r.proto.1);
        }
        let _ = write!(
            out,
            " sport={} dport={}",
            fmt_range(r.sport),
            fmt_range(r.dport)
        );
        if r.flags.1 != 0 {
            let _ = write!(out, " flags=0x{:x}/0x{:x}", r.flags.0, r.flags.1);
        }
        if let Some(v) = r.vlan {
            let _ = write!(out, " vlan={v}");
        }
        if let Some(v) = r.vni {
            let _ = write!(out, " vni={v}");
        }
        out.push('\n');
    }
    out
}

/// Writes rules as ClassBench filter lines, in precedence order; `Err` names
/// the first rule the format cannot express (IPv6, VLAN, VNI, one direction).
pub fn write_classbench(rules: &[Rule]) -> Result<String, RuleError> {
    let mut sorted: Vec<&Rule> = rules.iter().collect();
    sorted.sort_by_key(|r| r.precedence());
    let mut out = String::new();
    for r in sorted {
        if r.family == 6 || r.vlan.is_some() || r.vni.is_some() || r.direction != DIR_INOUT {
            return Err(RuleError {
                location: Location::Set(format!("rule {}", r.id)),
                value: write_text(std::slice::from_ref(r)).trim_end().to_string(),
                expected: "an IPv4 rule for both directions without vlan or vni (ClassBench has no other fields)".into(),
            });
        }
        let fam = 4;
        let _ = writeln!(
            out,
            "@{}/{}\t{}/{}\t{} : {}\t{} : {}\t0x{:02x}/0x{:02x}\t0x{:04x}/0x{:04x}",
            fmt_addr(fam, r.src),
            r.src_len,
            fmt_addr(fam, r.dst),
            r.dst_len,
            r.sport.0,
            r.sport.1,
            r.dport.0,
            r.dport.1,
            r.proto.0,
            r.proto.1,
            r.flags.0,
            r.flags.1
        );
    }
    Ok(out)
}

fn json_str(s: &str) -> String {
    serde_json::Value::String(s.to_string()).to_string()
}

/// Writes rules as JSON (`{"rules": [...]}`), one rule object per line.
pub fn write_json(rules: &[Rule]) -> String {
    let mut out = String::from("{\"rules\": [");
    for (i, r) in rules.iter().enumerate() {
        out.push_str(if i == 0 { "\n  {" } else { ",\n  {" });
        match r.action {
            Action::Bypass => out.push_str("\"action\": \"bypass\""),
            Action::Drop => out.push_str("\"action\": \"drop\""),
            Action::Redirect { spi, si } => {
                let _ = write!(
                    out,
                    "\"action\": \"redirect\", \"spi\": {spi}, \"si\": {si}"
                );
            }
        }
        let _ = write!(out, ", \"prio\": {}", r.priority);
        let dir = match r.direction {
            DIR_IN => "in",
            DIR_OUT => "out",
            _ => "inout",
        };
        let _ = write!(out, ", \"dir\": \"{dir}\"");
        if r.family != 0 {
            let _ = write!(
                out,
                ", \"src\": {}, \"dst\": {}",
                json_str(&fmt_prefix(r.family, r.src, r.src_len)),
                json_str(&fmt_prefix(r.family, r.dst, r.dst_len))
            );
        }
        if r.proto.1 != 0 {
            let _ = write!(out, ", \"proto\": \"{}/{}\"", r.proto.0, r.proto.1);
        }
        let _ = write!(
            out,
            ", \"sport\": [{}, {}], \"dport\": [{}, {}]",
            r.sport.0, r.sport.1, r.dport.0, r.dport.1
        );
        if r.flags.1 != 0 {
            let _ = write!(out, ", \"flags\": \"0x{:x}/0x{:x}\"", r.flags.0, r.flags.1);
        }
        if let Some(v) = r.vlan {
            let _ = write!(out, ", \"vlan\": {v}");
        }
        if let Some(v) = r.vni {
            let _ = write!(out, ", \"vni\": {v}");
        }
        out.push('}');
    }
    out.push_str(if rules.is_empty() { "]}\n" } else { "\n]}\n" });
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn text_round_trip() {
        let text =
            "redirect spi=7 si=200 dir=out src=10.0.0.0/8 dport=80-443 proto=tcp flags=0x02/0x12\n\
                    # comment\n\
                    drop src=2001:db8::/32 vlan=10 vni=5000\n\
                    bypass\n";
        let rules = parse_text(text).unwrap();
        assert_eq!(rules.len(), 3);
        assert_eq!(rules[0].action, Action::Redirect { spi: 7, si: 200 });
        assert_eq!(rules[1].family, 6);
        assert_eq!(parse_text(&write_text(&rules)).unwrap(), rules);
        assert_eq!(parse_json(&write_json(&rules)).unwrap(), rules);
    }

    #[test]
    fn classbench_round_trip() {
        let text = "@10.1.0.0/16\t0.0.0.0/0\t0 : 65535\t80 : 80\t0x06/0xFF\t0x0000/0x0000\t\n\
                    @0.0.0.0/0\t192.168.1.7/32\t1024 : 2048\t0 : 65535\t0x00/0x00\n";
        let rules = parse_classbench(text, Action::Bypass).unwrap();
        assert_eq!(rules.len(), 2);
        assert_eq!(rules[1].dst_len, 32);
        let again = parse_classbench(&write_classbench(&rules).unwrap(), Action::Bypass).unwrap();
        assert_eq!(again, rules);
    }

    #[test]
    fn errors_carry_line_and_column() {
        let err = parse_text("bypass\nbypass dport=80-70\n").unwrap_err();
        assert_eq!(err.location, Location::Text { line: 2, column: 8 });
        let err = parse_text("redirect src=1.2.3.4\n").unwrap_err();
        assert_eq!(err.location, Location::Text { line: 1, column: 1 });
        let err = parse_classbench("@1.2.3.4/33 0.0.0.0/0 0 : 1 0 : 1 0x06/0xff", Action::Drop)
            .unwrap_err();
        assert_eq!(err.location, Location::Text { line: 1, column: 2 });
    }
}
