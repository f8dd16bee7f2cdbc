//! Flow cache: verdicts the security component programmed for whole flows.
//!
//! Design: the cache is written only by the security component (through
//! `Prefilter::program_flow`), never by the classifier itself, so a packet
//! can never grant itself a bypass. A flow is direction-free: the two
//! endpoints are put in a canonical order so a reply hits its request's
//! entry. The cache is bounded; when full, new flows are refused (and keep
//! going to the security component) rather than evicting approved ones,
//! which keeps behaviour deterministic and fail-closed.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use super::parse::Key;

/// Direction-free identity of a flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlowKey {
    a: u128,
    b: u128,
    vni: u32,
    a_port: u16,
    b_port: u16,
    vlan: u16,
    family: u8,
    proto: u8,
}

impl FlowKey {
    /// The flow a parsed packet belongs to.
    pub fn of(key: &Key) -> Self {
        let (a, a_port, b, b_port) = if (key.src, key.sport) <= (key.dst, key.dport) {
            (key.src, key.sport, key.dst, key.dport)
        } else {
            (key.dst, key.dport, key.src, key.sport)
        };
        FlowKey {
            a,
            b,
            vni: key.vni,
            a_port,
            b_port,
            vlan: key.vlan,
            family: key.family,
            proto: key.proto,
        }
    }
}

/// A small multiply-xor hasher: flow keys are not attacker-chosen hash
/// floods in this emulator, and SipHash would dominate the lookup.
#[derive(Default)]
pub struct FlowHasher(u64);

impl Hasher for FlowHasher {
    fn finish(&self) -> u64 {
        self.0 ^ (self.0 >> 31)
    }
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut w = [0u8; 8];
            w[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(w));
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
    fn write_u128(&mut self, n: u128) {
        self.write_u64(n as u64);
        self.write_u64((n >> 64) as u64);
    }
    fn write_u32(&mut self, n: u32) {
        self.write_u64(u64::from(n));
    }
    fn write_u16(&mut self, n: u16) {
        self.write_u64(u64::from(n));
    }
    fn write_u8(&mut self, n: u8) {
        self.write_u64(u64::from(n));
    }
}

/// Bounded map from flow to programmed verdict.
#[derive(Debug, Clone)]
pub struct FlowCache {
    map: HashMap<FlowKey, u8, BuildHasherDefault<FlowHasher>>,
    capacity: usize,
}

impl FlowCache {
    /// An empty cache holding at most `capacity` flows.
    pub fn new(capacity: usize) -> Self {
        FlowCache {
            map: HashMap::default(),
            capacity,
        }
    }

    /// The programmed verdict of the packet's flow.
    #[inline]
    pub fn get(&self, key: &Key) -> Option<u8> {
        if self.map.is_empty() {
            return None;
        }
        self.map.get(&FlowKey::of(key)).copied()
    }

    /// Programs a verdict; false when the cache is full and the flow is new.
    pub fn insert(&mut self, key: &Key, verdict: u8) -> bool {
        let fk = FlowKey::of(key);
        if self.map.len() >= self.capacity && !self.map.contains_key(&fk) {
            return false;
        }
        self.map.insert(fk, verdict);
        true
    }

    /// Forgets the packet's flow; true when it was cached.
    pub fn remove(&mut self, key: &Key) -> bool {
        self.map.remove(&FlowKey::of(key)).is_some()
    }

    /// Forgets every flow; returns how many there were.
    pub fn clear(&mut self) -> usize {
        let n = self.map.len();
        self.map.clear();
        n
    }

    /// Number of cached flows.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether no flow is cached.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The capacity in flows.
    pub fn capacity(&self) -> usize {
        self.capacity
    }
}
