//! Packet pre-filter for service insertion.
//!
//! Design: a frame sent by a VM is parsed ([`parse`]) into a key, the rule
//! table ([`table`], tuple space search) picks the best matching rule, and
//! the verdict is BYPASS (deliver), REDIRECT (send to the security component
//! on an NSH-style service path) or DROP. Everything the classifier cannot
//! vouch for fails closed: a parse failure or no matching rule is a REDIRECT
//! on the default path, never a BYPASS. Only the security component can open
//! a flow, by programming the flow cache ([`cache`]); the cache then lets
//! later non-handshake packets of that flow skip it. Rule tables are replaced
//! whole: a new table is built and validated completely before it replaces
//! the old one, the revision is bumped and the flow cache is flushed (old
//! verdicts were made under old rules).
//!
//! Frames that carry an NSH header are already on a service path: the
//! pre-filter acts as one hop on it, so a non-dropped frame keeps its SPI and
//! leaves with SI one lower; a frame arriving with SI 0 is dropped.

pub mod cache;
pub mod capture;
pub mod parse;
pub mod rules;
pub mod table;

use cache::FlowCache;
use parse::{parse_frame, Parsed, Reason};
use rules::{Action, Format, Rule, RuleError};
use table::Table;

/// Verdict: forward to the destination.
pub const BYPASS: u8 = 0;
/// Verdict: send to the security component.
pub const REDIRECT: u8 = 1;
/// Verdict: discard.
pub const DROP: u8 = 2;
/// Rule id meaning "no rule matched".
pub const NO_RULE: u32 = u32::MAX;
/// Default flow-cache capacity in flows.
pub const DEFAULT_FLOW_CAPACITY: usize = 65_536;

/// The classifier's answer for one frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Decision {
    /// [`BYPASS`], [`REDIRECT`] or [`DROP`].
    pub verdict: u8,
    /// The matching rule's id, or [`NO_RULE`].
    pub rule_id: u32,
    /// Service path id for REDIRECT (0 otherwise).
    pub spi: u32,
    /// Service index for REDIRECT (0 otherwise).
    pub si: u8,
}

impl Decision {
    const fn new(verdict: u8, rule_id: u32, spi: u32, si: u8) -> Self {
        Decision {
            verdict,
            rule_id,
            spi,
            si,
        }
    }
}

pub use crate::batch::BatchLayoutError;

/// Validates a batch layout; returns the number of items.
pub fn check_batch(
    data_len: usize,
    offsets: &[u32],
    lengths: &[u32],
) -> Result<usize, BatchLayoutError> {
    crate::batch::check_layout(data_len, offsets, lengths)
}

/// Output arrays of a batch, one item per frame.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchOut {
    /// Verdicts.
    pub verdicts: Vec<u8>,
    /// Rule ids ([`NO_RULE`] for none).
    pub rule_ids: Vec<u32>,
    /// Service path ids.
    pub spis: Vec<u32>,
    /// Service indexes.
    pub sis: Vec<u8>,
}

/// A pre-filter: rule table, revision, default service path and flow cache.
#[derive(Debug, Clone)]
pub struct Prefilter {
    table: Table,
    revision: u64,
    default_spi: u32,
    default_si: u8,
    cache: FlowCache,
    cache_enabled: bool,
}

/// Parses a rule set in `format`; `action` applies to ClassBench rules.
pub fn parse_rules(text: &str, format: Format, action: Action) -> Result<Vec<Rule>, RuleError> {
    match format {
        Format::Text => rules::parse_text(text),
        Format::Json => rules::parse_json(text),
        Format::ClassBench => rules::parse_classbench(text, action),
    }
}

impl Prefilter {
    /// A pre-filter with `rules` (revision 0). `default_spi`/`default_si`
    /// is the path of fail-closed redirects; the caller validates ranges.
    pub fn new(rules: Vec<Rule>, default_spi: u32, default_si: u8, flow_capacity: usize) -> Self {
        Prefilter {
            table: Table::build(rules),
            revision: 0,
            default_spi,
            default_si,
            cache: FlowCache::new(flow_capacity),
            cache_enabled: true,
        }
    }

    /// Replaces the rule table; bumps the revision and flushes the flow cache.
    pub fn replace(&mut self, rules: Vec<Rule>) -> u64 {
        let table = Table::build(rules);
        self.table = table;
        self.revision += 1;
        self.cache.clear();
        self.revision
    }

    /// Parses and installs a rule set; on error the old table stays.
    pub fn load(&mut self, text: &str, format: Format, action: Action) -> Result<u64, RuleError> {
        let rules = parse_rules(text, format, action)?;
        Ok(self.replace(rules))
    }

    /// The current table revision.
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// The installed rules in id order.
    pub fn rules(&self) -> &[Rule] {
        self.table.rules()
    }

    /// Number of tuples in the table.
    pub fn tuple_count(&self) -> usize {
        self.table.tuple_count()
    }

    /// The default (fail-closed) service path.
    pub fn default_path(&self) -> (u32, u8) {
        (self.default_spi, self.default_si)
    }

    /// Whether the flow cache is consulted.
    pub fn cache_enabled(&self) -> bool {
        self.cache_enabled
    }

    /// Switches the flow cache on or off (its contents are kept).
    pub fn set_cache_enabled(&mut self, on: bool) {
        self.cache_enabled = on;
    }

    /// The flow cache.
    pub fn cache(&self) -> &FlowCache {
        &self.cache
    }

    /// Classifies one frame travelling in direction `dir` (`rules::DIR_IN` / `DIR_OUT`).
    #[inline]
    pub fn classify(&self, frame: &[u8], dir: u8) -> Decision {
        let parsed = parse_frame(frame);
        let rule = match &parsed.key {
            Ok(key) => self.table.lookup(key, dir),
            Err(_) => None,
        };
        self.decide(&parsed, rule)
    }

    /// The decision for a parsed frame whose best rule is `rule`.
    #[inline]
    fn decide(&self, parsed: &Parsed, rule: Option<&Rule>) -> Decision {
        let Parsed { nsh, key } = parsed;
        if *key == Err(Reason::NshSiZero) {
            return Decision::new(DROP, NO_RULE, 0, 0);
        }
        // On a service path already: this is one hop on it.
        let (spi, si) = match nsh {
            Some(n) => (n.spi, n.si - 1),
            None => (self.default_spi, self.default_si),
        };
        let Ok(key) = key else {
            return Decision::new(REDIRECT, NO_RULE, spi, si);
        };
        let rule_id = rule.map_or(NO_RULE, |r| r.id);
        let (rspi, rsi) = match rule.map(|r| r.action) {
            Some(Action::Bypass) => return Decision::new(BYPASS, rule_id, 0, 0),
            Some(Action::Drop) => return Decision::new(DROP, rule_id, 0, 0),
            Some(Action::Redirect { spi: rs, si: ri }) if nsh.is_none() => (rs, ri),
            _ => (spi, si),
        };
        if self.cache_enabled && !key.is_handshake() {
            match self.cache.get(key) {
                Some(BYPASS) => return Decision::new(BYPASS, rule_id, 0, 0),
                Some(DROP) => return Decision::new(DROP, rule_id, 0, 0),
                _ => {}
            }
        }
        Decision::new(REDIRECT, rule_id, rspi, rsi)
    }

    /// Classifies a batch (validated first: on error nothing is classified).
    pub fn classify_batch(
        &self,
        data: &[u8],
        offsets: &[u32],
        lengths: &[u32],
        dir: u8,
    ) -> Result<BatchOut, BatchLayoutError> {
        let n = check_batch(data.len(), offsets, lengths)?;
        let mut out = BatchOut {
            verdicts: Vec::with_capacity(n),
            rule_ids: Vec::with_capacity(n),
            spis: Vec::with_capacity(n),
            sis: Vec::with_capacity(n),
        };
        for (&o, &l) in offsets.iter().zip(lengths) {
            let start = o as usize;
            let d = self.classify(&data[start..start + l as usize], dir);
            out.verdicts.push(d.verdict);
            out.rule_ids.push(d.rule_id);
            out.spis.push(d.spi);
            out.sis.push(d.si);
        }
        Ok(out)
    }

    /// Programs the security component's verdict (BYPASS or DROP) for the
    /// frame's flow. Returns false when the frame does not parse or the cache
    /// is full. The caller rejects other verdicts.
    pub fn program_flow(&mut self, frame: &[u8], verdict: u8) -> bool {
        match parse_frame(frame).key {
            Ok(key) => self.cache.insert(&key, verdict),
            Err(_) => false,
        }
    }

    /// Forgets the frame's flow; true when it was cached.
    pub fn evict_flow(&mut self, frame: &[u8]) -> bool {
        match parse_frame(frame).key {
            Ok(key) => self.cache.remove(&key),
            Err(_) => false,
        }
    }

    /// Forgets every programmed flow; returns how many there were.
    pub fn flush_flows(&mut self) -> usize {
        self.cache.clear()
    }

    /// The default security component: inspects a batch and programs the
    /// flow cache. Returns one verdict per frame, BYPASS (deliver) or DROP.
    /// An IP frame that does not parse is dropped; non-IP frames are
    /// delivered. A TCP SYN approves its flow, FIN or RST forgets it, and the
    /// first packet of any non-TCP flow approves that flow.
    pub fn inspect_batch(
        &mut self,
        data: &[u8],
        offsets: &[u32],
        lengths: &[u32],
    ) -> Result<Vec<u8>, BatchLayoutError> {
        check_batch(data.len(), offsets, lengths)?;
        let mut out = Vec::with_capacity(offsets.len());
        for (&o, &l) in offsets.iter().zip(lengths) {
            let start = o as usize;
            let key = match parse_frame(&data[start..start + l as usize]).key {
                Ok(key) => key,
                Err(reason) => {
                    out.push(if reason == Reason::NotIp {
                        BYPASS
                    } else {
                        DROP
                    });
                    continue;
                }
            };
            if key.proto == parse::PROTO_TCP {
                if key.flags & (parse::TCP_FIN | parse::TCP_RST) != 0 {
                    self.cache.remove(&key);
                } else if key.flags & parse::TCP_SYN != 0 {
                    self.cache.insert(&key, BYPASS);
                }
            } else {
                self.cache.insert(&key, BYPASS);
            }
            out.push(BYPASS);
        }
        Ok(out)
    }
}

/// Wraps an Ethernet frame in Ethernet + NSH (MD type 2, no metadata) on
/// path (`spi`, `si`); the MAC addresses are copied from the inner frame.
pub fn nsh_encap(frame: &[u8], spi: u32, si: u8) -> Vec<u8> {
    let mut out = Vec::with_capacity(frame.len() + 22);
    let mut macs = [0u8; 12];
    let n = frame.len().min(12);
    macs[..n].copy_from_slice(&frame[..n]);
    out.extend_from_slice(&macs);
    out.extend_from_slice(&parse::ETHERTYPE_NSH.to_be_bytes());
    // Version 0, TTL 63, length 2 words, MD type 2, next protocol Ethernet.
    out.extend_from_slice(&[0x0F, 0xC2, 0x02, parse::NSH_NP_ETHERNET]);
    out.extend_from_slice(&(((spi & rules::MAX_SPI) << 8) | u32::from(si)).to_be_bytes());
    out.extend_from_slice(frame);
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::rules::{DIR_IN, DIR_OUT};
    use super::*;

    fn udp_frame(dport: u16) -> Vec<u8> {
        let mut f = vec![0u8; 12];
        f.extend_from_slice(&[0x08, 0x00]);
        let mut ip = vec![
            0x45, 0, 0, 28, 0, 0, 0, 0, 64, 17, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
        ];
        ip.extend_from_slice(&[0x30, 0x39]);
        ip.extend_from_slice(&dport.to_be_bytes());
        ip.extend_from_slice(&[0, 8, 0, 0]);
        f.extend_from_slice(&ip);
        f
    }

    #[test]
    fn fail_closed_and_rules() {
        let rules =
            rules::parse_text("bypass dport=53 dir=out\nredirect spi=9 si=7 proto=udp\n").unwrap();
        let pf = Prefilter::new(rules, 1, 255, 16);
        assert_eq!(
            pf.classify(&udp_frame(53), DIR_OUT),
            Decision::new(BYPASS, 0, 0, 0)
        );
        assert_eq!(
            pf.classify(&udp_frame(53), DIR_IN),
            Decision::new(REDIRECT, 1, 9, 7)
        );
        let f = udp_frame(53);
        for n in 0..f.len() {
            assert_eq!(
                pf.classify(&f[..n], DIR_OUT),
                Decision::new(REDIRECT, NO_RULE, 1, 255)
            );
        }
    }

    #[test]
    fn nsh_hops_decrement_si() {
        let pf = Prefilter::new(Vec::new(), 1, 255, 16);
        let mut frame = udp_frame(80);
        let mut si = 3u8;
        loop {
            let d = pf.classify(&nsh_encap(&frame, 42, si), DIR_OUT);
            if si == 0 {
                assert_eq!(d.verdict, DROP);
                break;
            }
            assert_eq!((d.verdict, d.spi, d.si), (REDIRECT, 42, si - 1));
            si = d.si;
            frame = udp_frame(80);
        }
    }

    #[test]
    fn cache_only_from_programming_and_flushed_on_swap() {
        let mut pf = Prefilter::new(Vec::new(), 1, 255, 16);
        let f = udp_frame(80);
        assert_eq!(pf.classify(&f, DIR_OUT).verdict, REDIRECT);
        assert!(pf.program_flow(&f, BYPASS));
        assert_eq!(pf.classify(&f, DIR_OUT).verdict, BYPASS);
        pf.replace(Vec::new());
        assert_eq!(pf.classify(&f, DIR_OUT).verdict, REDIRECT);
    }
}
