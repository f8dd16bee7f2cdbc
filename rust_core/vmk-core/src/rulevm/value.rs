//! Event values and the views tests take of them.
//!
//! Design: an event field is a scalar or a flat list of scalars (a test on a
//! list holds when it holds for an element). String tests see strings, ints
//! in decimal and booleans as `true`/`false`; number tests see ints,
//! integral floats and strings of decimal digits. Lowercasing maps each
//! character through its full Unicode lowercase mapping, character by
//! character, exactly as the Python reference does.

use std::borrow::Cow;

/// One scalar of an event.
#[derive(Debug, Clone, PartialEq)]
pub enum Scalar {
    /// JSON null / None.
    Null,
    /// Boolean.
    Bool(bool),
    /// Integer within i64.
    Int(i64),
    /// Integer outside i64, kept as its decimal text.
    Big(String),
    /// Float.
    Float(f64),
    /// Text.
    Str(String),
    /// A nested object or anything else: no test sees it.
    Other,
}

/// A field value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// One scalar.
    One(Scalar),
    /// A list of scalars.
    List(Vec<Scalar>),
}

impl Value {
    /// The elements tests look at (null counts as none).
    pub fn elems(&self) -> &[Scalar] {
        match self {
            Value::One(Scalar::Null) => &[],
            Value::One(s) => std::slice::from_ref(s),
            Value::List(v) => v,
        }
    }
}

impl Scalar {
    /// The string view.
    pub fn text(&self) -> Option<Cow<'_, str>> {
        match self {
            Scalar::Str(s) | Scalar::Big(s) => Some(Cow::Borrowed(s)),
            Scalar::Int(i) => Some(Cow::Owned(i.to_string())),
            Scalar::Bool(b) => Some(Cow::Borrowed(if *b { "true" } else { "false" })),
            _ => None,
        }
    }

    /// The number view.
    pub fn number(&self) -> Option<i64> {
        match self {
            Scalar::Int(i) => Some(*i),
            Scalar::Float(f) => {
                if f.is_finite()
                    && f.fract() == 0.0
                    && *f >= -9_223_372_036_854_775_808.0
                    && *f < 9_223_372_036_854_775_808.0
                {
                    #[allow(clippy::cast_possible_truncation)]
                    Some(*f as i64)
                } else {
                    None
                }
            }
            Scalar::Str(s) => parse_decimal(s),
            _ => None,
        }
    }
}

/// `-?[0-9]+` within i64 (leading zeros allowed).
pub fn parse_decimal(s: &str) -> Option<i64> {
    let (neg, digits) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let trimmed = digits.trim_start_matches('0');
    let trimmed = if trimmed.is_empty() { "0" } else { trimmed };
    if trimmed.len() > 19 {
        return None;
    }
    let mag: i128 = trimmed.parse().ok()?;
    let n = if neg { -mag } else { mag };
    i64::try_from(n).ok()
}

/// Per-character full lowercase mapping.
pub fn lower(s: &str) -> String {
    if s.is_ascii() {
        s.to_ascii_lowercase()
    } else {
        let mut out = String::with_capacity(s.len());
        for c in s.chars() {
            out.extend(c.to_lowercase());
        }
        out
    }
}

/// A glob token: `*`, `?` or a literal character.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GTok {
    /// Any run.
    Star,
    /// Any one character.
    Any,
    /// A character.
    Lit(char),
}

/// Tokenises a glob (`\` escapes the next character), lowercasing literals when asked.
pub fn glob_tokens(pattern: &str, lowercase: bool) -> Vec<GTok> {
    let chars: Vec<char> = pattern.chars().collect();
    let mut out = Vec::with_capacity(chars.len());
    let mut i = 0;
    let push_lit = |out: &mut Vec<GTok>, c: char| {
        if lowercase {
            out.extend(c.to_lowercase().map(GTok::Lit));
        } else {
            out.push(GTok::Lit(c));
        }
    };
    while i < chars.len() {
        let c = chars[i];
        if c == '\\' && i + 1 < chars.len() {
            push_lit(&mut out, chars[i + 1]);
            i += 2;
            continue;
        }
        match c {
            '*' => out.push(GTok::Star),
            '?' => out.push(GTok::Any),
            _ => push_lit(&mut out, c),
        }
        i += 1;
    }
    out
}

/// Greedy wildcard match with one backtrack point: O(len(s) * len(pattern)).
pub fn glob_match(toks: &[GTok], s: &str) -> bool {
    let chars: Vec<char> = s.chars().collect();
    let (mut p, mut i) = (0usize, 0usize);
    let mut star: Option<usize> = None;
    let mut mark = 0usize;
    while i < chars.len() {
        match toks.get(p) {
            Some(GTok::Any) => {
                p += 1;
                i += 1;
            }
            Some(GTok::Lit(c)) if *c == chars[i] => {
                p += 1;
                i += 1;
            }
            Some(GTok::Star) => {
                star = Some(p);
                mark = i;
                p += 1;
            }
            _ => match star {
                Some(sp) => {
                    p = sp + 1;
                    mark += 1;
                    i = mark;
                }
                None => return false,
            },
        }
    }
    while p < toks.len() && toks[p] == GTok::Star {
        p += 1;
    }
    p == toks.len()
}
