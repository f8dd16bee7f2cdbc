//! Rule table: tuple space search with merged tuples.
//!
//! Design: rules are grouped into *tuples*, hash tables keyed by the masked
//! fields an exact match can cover (the two address prefixes, and the family,
//! VLAN and VNI when pinned). Every field a hash cannot cover (port *ranges*,
//! protocol and TCP flag masks, direction) is checked in the bucket, so a
//! port range never explodes into prefixes. Plain tuple space search
//! (Srinivasan et al.) makes one tuple per distinct prefix-length pair, which
//! for ClassBench ACLs is dozens of hash probes per packet; here tuples are
//! merged as in TupleMerge (Daly and Torng): a rule may live in any tuple
//! whose prefix lengths are no longer than its own, a new tuple's lengths
//! are rounded down to a 16-bit boundary, and a bucket is capped at
//! [`BUCKET_LIMIT`] rules, beyond which a rule goes to a tighter tuple. The
//! bucket check is the complete rule match, so placement only affects speed,
//! never results. Tuples are visited in order of their best rule and the
//! search stops once no remaining tuple can beat the match in hand
//! (priority sorting, as Open vSwitch does).
//!
//! Building is linear in rules times tuples plus one sort: 10,000 rules
//! build in milliseconds.

use std::collections::HashMap;

use super::parse::{Key, NO_VLAN, NO_VNI, TCP_FLAGS_MASK};
use super::rules::{mask128, Rule};

/// Most rules per bucket before a rule is placed in a tighter tuple: the
/// bucket scan is a few compares per rule, a probe of another tuple costs
/// about as much as eight of them.
pub const BUCKET_LIMIT: usize = 8;
/// Leaf value meaning "any VLAN" / "any VNI".
const ANY: u32 = u32::MAX;

/// The masked fields of a key that one tuple hashes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
struct HKey {
    src: u128,
    dst: u128,
    /// family | vlan << 8 | vni << 32 (each masked).
    misc: u64,
}

/// The hashed shape of a tuple.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Shape {
    family: bool,
    src_len: u8,
    dst_len: u8,
    vlan: bool,
    vni: bool,
}

impl Shape {
    /// Whether every rule matching a packet hashes like the packet here.
    fn admits(&self, r: &Shape) -> bool {
        (!self.family || r.family)
            && self.src_len <= r.src_len
            && self.dst_len <= r.dst_len
            && (!self.vlan || r.vlan)
            && (!self.vni || r.vni)
    }

    fn specificity(&self) -> u32 {
        u32::from(self.src_len) + u32::from(self.dst_len)
    }
}

/// A complete rule match, packed into one cache line for the bucket scan.
/// IPv4 rules need only the low 64 bits of the mapped addresses (the family
/// check covers the rest); IPv6 prefixes and pinned VLAN / VNI spill into an
/// [`Ext`] record that is read only when the cheap checks pass.
#[derive(Debug, Clone, Copy)]
struct Leaf {
    src_lo: u64,
    src_mask_lo: u64,
    dst_lo: u64,
    dst_mask_lo: u64,
    precedence: u64,
    sport: (u16, u16),
    dport: (u16, u16),
    flags_value: u16,
    flags_mask: u16,
    proto_value: u8,
    proto_mask: u8,
    direction: u8,
    family: u8,
    /// Index into the table's rule list.
    rule: u32,
    /// Index into the tuple's `exts`, or [`NO_EXT`].
    ext: u32,
}

/// The rarely needed rest of a rule match.
#[derive(Debug, Clone, Copy)]
struct Ext {
    src_hi: u64,
    src_mask_hi: u64,
    dst_hi: u64,
    dst_mask_hi: u64,
    vlan: u32,
    vni: u32,
}

const NO_EXT: u32 = u32::MAX;

impl Leaf {
    fn of(r: &Rule, index: u32, exts: &mut Vec<Ext>) -> Leaf {
        let src_mask = mask128(r.wide_len(r.src_len));
        let dst_mask = mask128(r.wide_len(r.dst_len));
        let (src, dst) = (r.src & src_mask, r.dst & dst_mask);
        let ext = Ext {
            src_hi: (src >> 64) as u64,
            src_mask_hi: (src_mask >> 64) as u64,
            dst_hi: (dst >> 64) as u64,
            dst_mask_hi: (dst_mask >> 64) as u64,
            vlan: r.vlan.map_or(ANY, u32::from),
            vni: r.vni.unwrap_or(ANY),
        };
        // An IPv4 key's high half is always zero, and the family check
        // already requires an IPv4 key: only IPv6 prefixes need the high half.
        let needs_ext = (r.family == 6 && (ext.src_mask_hi | ext.dst_mask_hi) != 0)
            || ext.vlan != ANY
            || ext.vni != ANY;
        let ext_index = if needs_ext {
            exts.push(ext);
            (exts.len() - 1) as u32
        } else {
            NO_EXT
        };
        Leaf {
            src_lo: src as u64,
            src_mask_lo: src_mask as u64,
            dst_lo: dst as u64,
            dst_mask_lo: dst_mask as u64,
            precedence: r.precedence(),
            sport: r.sport,
            dport: r.dport,
            flags_value: r.flags.0 & r.flags.1 & TCP_FLAGS_MASK,
            flags_mask: r.flags.1 & TCP_FLAGS_MASK,
            proto_value: r.proto.0 & r.proto.1,
            proto_mask: r.proto.1,
            direction: r.direction,
            family: r.family,
            rule: index,
            ext: ext_index,
        }
    }

    #[inline(always)]
    fn matches(&self, key: &Key, dir: u8, exts: &[Ext]) -> bool {
        // Non-short-circuit `&` on the cheap compares: one branch instead
        // of a string of hard-to-predict ones.
        let cheap = (key.src as u64 & self.src_mask_lo == self.src_lo)
            & (key.dst as u64 & self.dst_mask_lo == self.dst_lo)
            & (self.direction & dir != 0)
            & (self.sport.0 <= key.sport)
            & (key.sport <= self.sport.1)
            & (self.dport.0 <= key.dport)
            & (key.dport <= self.dport.1)
            & (key.proto & self.proto_mask == self.proto_value)
            & (key.flags & self.flags_mask == self.flags_value)
            & ((self.family == 0) | (self.family == key.family));
        cheap
            && (self.ext == NO_EXT
                || exts.get(self.ext as usize).is_some_and(|e| {
                    ((key.src >> 64) as u64 & e.src_mask_hi == e.src_hi)
                        && ((key.dst >> 64) as u64 & e.dst_mask_hi == e.dst_hi)
                        && (e.vlan == ANY || e.vlan == u32::from(key.vlan))
                        && (e.vni == ANY || e.vni == key.vni)
                }))
    }
}

/// An open-addressing slot: the high 32 bits of the key's hash (a
/// fingerprint) and the entry index plus one; 0 is empty. Slots are 8 bytes
/// so a tuple's whole index stays in L1 and a miss costs no key compare.
type Slot = u64;

fn slot_of(h: u64, entry: usize) -> Slot {
    (h & 0xFFFF_FFFF_0000_0000) | (entry as u64 + 1)
}

#[derive(Debug, Clone)]
struct Tuple {
    src_mask: u128,
    dst_mask: u128,
    misc_mask: u64,
    /// Precedence of the best rule in this tuple.
    best: u64,
    /// Power-of-two open-addressing table of [`Slot`]s.
    slots: Vec<Slot>,
    /// Entry -> its key and its bucket (`start..end` in `leaves`).
    keys: Vec<HKey>,
    spans: Vec<(u32, u32)>,
    leaves: Vec<Leaf>,
    exts: Vec<Ext>,
}

#[inline(always)]
fn hash(k: &HKey) -> u64 {
    const K: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut h = (k.src as u64) ^ ((k.src >> 64) as u64).rotate_left(17);
    h = (h ^ (k.dst as u64).rotate_left(31)).wrapping_mul(K);
    h = (h ^ ((k.dst >> 64) as u64).rotate_left(7) ^ k.misc).wrapping_mul(K);
    h ^ (h >> 29)
}

#[inline(always)]
fn misc_of(family: u8, vlan: u16, vni: u32) -> u64 {
    u64::from(family) | (u64::from(vlan) << 8) | (u64::from(vni) << 32)
}

struct Draft {
    shape: Shape,
    buckets: HashMap<HKey, Vec<u32>>,
    order: Vec<HKey>,
}

impl Draft {
    fn masks(&self) -> (u128, u128, u64) {
        (
            mask128(self.shape.src_len),
            mask128(self.shape.dst_len),
            misc_of(
                if self.shape.family { 0xFF } else { 0 },
                if self.shape.vlan { 0xFFFF } else { 0 },
                if self.shape.vni { u32::MAX } else { 0 },
            ),
        )
    }

    fn key_of(&self, r: &Rule) -> HKey {
        let (sm, dm, mm) = self.masks();
        HKey {
            src: r.src & sm,
            dst: r.dst & dm,
            misc: misc_of(r.family, r.vlan.unwrap_or(NO_VLAN), r.vni.unwrap_or(NO_VNI)) & mm,
        }
    }

    fn room(&self, r: &Rule) -> bool {
        self.buckets
            .get(&self.key_of(r))
            .is_none_or(|b| b.len() < BUCKET_LIMIT)
    }

    fn add(&mut self, r: &Rule, index: u32) {
        let hk = self.key_of(r);
        let order = &mut self.order;
        self.buckets
            .entry(hk)
            .or_insert_with(|| {
                order.push(hk);
                Vec::new()
            })
            .push(index);
    }

    fn freeze(self, rules: &[Rule]) -> Tuple {
        let (src_mask, dst_mask, misc_mask) = self.masks();
        let cap = (self.order.len() * 2).next_power_of_two().max(4);
        let mut t = Tuple {
            src_mask,
            dst_mask,
            misc_mask,
            best: u64::MAX,
            slots: vec![0; cap],
            keys: Vec::with_capacity(self.order.len()),
            spans: Vec::with_capacity(self.order.len()),
            leaves: Vec::new(),
            exts: Vec::new(),
        };
        for hk in &self.order {
            let start = t.leaves.len() as u32;
            for &i in &self.buckets[hk] {
                let leaf = Leaf::of(&rules[i as usize], i, &mut t.exts);
                t.best = t.best.min(leaf.precedence);
                t.leaves.push(leaf);
            }
            let h = hash(hk);
            let mut s = (h as usize) & (cap - 1);
            while t.slots[s] != 0 {
                s = (s + 1) & (cap - 1);
            }
            t.slots[s] = slot_of(h, t.keys.len());
            t.keys.push(*hk);
            t.spans.push((start, t.leaves.len() as u32));
        }
        t
    }
}

fn exact_shape(r: &Rule) -> Shape {
    Shape {
        family: r.family != 0,
        src_len: r.wide_len(r.src_len),
        dst_len: r.wide_len(r.dst_len),
        vlan: r.vlan.is_some(),
        vni: r.vni.is_some(),
    }
}

/// The shape a new tuple gets for `r`: prefix lengths rounded down to a
/// multiple of 16 bits, so neighbours can share it (16 measured best on
/// ClassBench ACLs among 8, 16 and 32).
fn relaxed_shape(r: &Rule) -> Shape {
    let step = 16;
    let round = |len: u8| r.wide_len(len - len % step);
    Shape {
        src_len: round(r.src_len),
        dst_len: round(r.dst_len),
        ..exact_shape(r)
    }
}

impl Tuple {
    #[inline(always)]
    fn find(&self, key: &Key) -> Option<&[Leaf]> {
        let hk = HKey {
            src: key.src & self.src_mask,
            dst: key.dst & self.dst_mask,
            misc: misc_of(key.family, key.vlan, key.vni) & self.misc_mask,
        };
        let h = hash(&hk);
        let fingerprint = h & 0xFFFF_FFFF_0000_0000;
        let mask = self.slots.len() - 1;
        let mut i = (h as usize) & mask;
        loop {
            let slot = self.slots[i];
            if slot == 0 {
                return None;
            }
            if slot & 0xFFFF_FFFF_0000_0000 == fingerprint {
                let entry = (slot as u32 as usize).wrapping_sub(1);
                if self.keys.get(entry) == Some(&hk) {
                    let (start, end) = self.spans.get(entry).copied().unwrap_or((0, 0));
                    return self.leaves.get(start as usize..end as usize);
                }
            }
            i = (i + 1) & mask;
        }
    }
}

/// An immutable, searchable rule table.
#[derive(Debug, Clone, Default)]
pub struct Table {
    rules: Vec<Rule>,
    tuples: Vec<Tuple>,
}

impl Table {
    /// Builds the table. Rule ids must be the rules' positions.
    pub fn build(rules: Vec<Rule>) -> Table {
        let mut order: Vec<u32> = (0..rules.len() as u32).collect();
        order.sort_by_key(|&i| rules[i as usize].precedence());
        let mut drafts: Vec<Draft> = Vec::new();
        for &i in &order {
            let r = &rules[i as usize];
            let exact = exact_shape(r);
            // The most specific existing tuple that admits the rule and has room.
            let home = drafts
                .iter()
                .enumerate()
                .filter(|(_, d)| d.shape.admits(&exact) && d.room(r))
                .max_by_key(|(_, d)| d.shape.specificity())
                .map(|(n, _)| n);
            let n = match home {
                Some(n) => n,
                None => {
                    let relaxed = relaxed_shape(r);
                    let shape = if drafts.iter().any(|d| d.shape == relaxed) {
                        exact
                    } else {
                        relaxed
                    };
                    match drafts.iter().position(|d| d.shape == shape) {
                        // Same exact prefixes beyond the limit: the bucket grows.
                        Some(n) => n,
                        None => {
                            drafts.push(Draft {
                                shape,
                                buckets: HashMap::new(),
                                order: Vec::new(),
                            });
                            drafts.len() - 1
                        }
                    }
                }
            };
            drafts[n].add(r, i);
        }
        let mut tuples: Vec<Tuple> = drafts.into_iter().map(|d| d.freeze(&rules)).collect();
        tuples.sort_by_key(|t| t.best);
        Table { rules, tuples }
    }

    /// The rules, in id order.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// Number of tuples.
    pub fn tuple_count(&self) -> usize {
        self.tuples.len()
    }

    /// The best (lowest precedence) rule matching `key` in direction `dir`.
    #[inline]
    pub fn lookup(&self, key: &Key, dir: u8) -> Option<&Rule> {
        let mut best = u64::MAX;
        let mut found = u32::MAX;
        for t in &self.tuples {
            if t.best >= best {
                break;
            }
            let Some(bucket) = t.find(key) else { continue };
            for leaf in bucket {
                if leaf.precedence >= best {
                    break;
                }
                if leaf.matches(key, dir, &t.exts) {
                    best = leaf.precedence;
                    found = leaf.rule;
                    break;
                }
            }
        }
        self.rules.get(found as usize)
    }
}

/// Whether `rule` matches `key` in direction `dir` (the definition the table
/// must agree with; used by tests and by the linear reference).
pub fn rule_matches(rule: &Rule, key: &Key, dir: u8) -> bool {
    let src_mask = mask128(rule.wide_len(rule.src_len));
    let dst_mask = mask128(rule.wide_len(rule.dst_len));
    rule.direction & dir != 0
        && (rule.family == 0 || rule.family == key.family)
        && (key.src & src_mask) == rule.src & src_mask
        && (key.dst & dst_mask) == rule.dst & dst_mask
        && key.proto & rule.proto.1 == rule.proto.0
        && (rule.sport.0..=rule.sport.1).contains(&key.sport)
        && (rule.dport.0..=rule.dport.1).contains(&key.dport)
        && key.flags & rule.flags.1 & super::parse::TCP_FLAGS_MASK
            == rule.flags.0 & rule.flags.1 & super::parse::TCP_FLAGS_MASK
        && rule.vlan.is_none_or(|v| v == key.vlan)
        && rule.vni.is_none_or(|v| v == key.vni)
}
