//! Frame bytes into the pre-filter: no panic, the tuple-space table agrees
//! with the linear definition, and nothing unparsed is ever bypassed.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use vmk_core::prefilter::parse::parse_frame;
use vmk_core::prefilter::rules::{parse_text, DIR_IN, DIR_OUT};
use vmk_core::prefilter::table::rule_matches;
use vmk_core::prefilter::{Prefilter, BYPASS, NO_RULE};

const RULES: &str = "\
redirect spi=1 proto=tcp dport=80-443 flags=0x02/0x12
bypass src=10.0.0.0/8 dst=10.0.0.0/8 proto=udp dport=53
drop src=2001:db8::/32 proto=tcp
bypass vlan=100 vni=5000
redirect spi=9 dir=in proto=sctp sport=1-1024
bypass prio=50 src=0.0.0.0/0 dport=1024-65535
drop prio=60 proto=icmp
bypass prio=70 src=::/0 proto=58
";

fn prefilter() -> &'static Prefilter {
    static PF: OnceLock<Prefilter> = OnceLock::new();
    PF.get_or_init(|| Prefilter::new(parse_text(RULES).unwrap_or_default(), 1, 255, 64))
}

fuzz_target!(|data: &[u8]| {
    let pf = prefilter();
    for dir in [DIR_IN, DIR_OUT] {
        let d = pf.classify(data, dir);
        let parsed = parse_frame(data);
        match parsed.key {
            Ok(key) => {
                let linear = pf
                    .rules()
                    .iter()
                    .filter(|r| rule_matches(r, &key, dir))
                    .min_by_key(|r| r.precedence())
                    .map_or(NO_RULE, |r| r.id);
                if parsed.nsh.map_or(true, |n| n.si != 0) {
                    assert_eq!(d.rule_id, linear);
                }
            }
            Err(_) => {
                assert_ne!(d.verdict, BYPASS);
                assert_eq!(d.rule_id, NO_RULE);
            }
        }
    }
});
