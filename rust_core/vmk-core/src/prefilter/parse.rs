//! Frame parser: Ethernet (802.1Q, QinQ), NSH, IPv4, IPv6 with an
//! extension-header walk, TCP, UDP (VXLAN / Geneve VNI), SCTP, ICMP.
//!
//! Design: one forward pass over the frame with every offset a named
//! constant and every read bounds-checked (`be16`/`be32` return `None` past
//! the end). The parser never guesses: anything it cannot fully account for
//! (a truncated or malformed header, IPv4 options, an unknown IPv6 extension
//! header, a routing header still in transit, a non-first fragment, an
//! exhausted walk budget) is a [`Reason`], and the classifier sends such
//! frames to the security component. Addresses are kept as `u128` in IPv6
//! form, IPv4 mapped into `::ffff:0:0/96`, so one rule table covers both.

/// Ethernet header length (two MACs and the EtherType).
pub const ETH_HDR_LEN: usize = 14;
/// Offset of the EtherType in an untagged Ethernet header.
pub const ETH_TYPE_OFF: usize = 12;
/// Length of one 802.1Q / 802.1ad tag (TCI + inner EtherType).
pub const VLAN_TAG_LEN: usize = 4;
/// VLAN tags walked before giving up: QinQ is two; a third is refused.
pub const MAX_VLAN_TAGS: usize = 2;
/// Mask of the VLAN id inside the TCI.
pub const VLAN_VID_MASK: u16 = 0x0FFF;

/// EtherType of IPv4.
pub const ETHERTYPE_IPV4: u16 = 0x0800;
/// EtherType of IPv6.
pub const ETHERTYPE_IPV6: u16 = 0x86DD;
/// EtherType of an 802.1Q customer tag.
pub const ETHERTYPE_VLAN: u16 = 0x8100;
/// EtherType of an 802.1ad service tag (QinQ outer tag).
pub const ETHERTYPE_QINQ: u16 = 0x88A8;
/// Pre-standard QinQ EtherType still seen on the wire.
pub const ETHERTYPE_QINQ_OLD: u16 = 0x9100;
/// EtherType of the Network Service Header (RFC 8300).
pub const ETHERTYPE_NSH: u16 = 0x894F;

/// NSH base header plus service path header, in bytes.
pub const NSH_MIN_LEN: usize = 8;
/// Offset of the 6-bit length field (in 4-byte words) in the NSH base header.
pub const NSH_LEN_OFF: usize = 1;
/// Offset of the next-protocol byte in the NSH base header.
pub const NSH_NEXT_PROTO_OFF: usize = 3;
/// Offset of the service path header (24-bit SPI, 8-bit SI).
pub const NSH_SP_OFF: usize = 4;
/// NSH next protocol: IPv4.
pub const NSH_NP_IPV4: u8 = 1;
/// NSH next protocol: IPv6.
pub const NSH_NP_IPV6: u8 = 2;
/// NSH next protocol: Ethernet.
pub const NSH_NP_ETHERNET: u8 = 3;

/// Minimum IPv4 header length.
pub const IPV4_MIN_HDR: usize = 20;
/// Offset of the total-length field.
pub const IPV4_TOTAL_LEN_OFF: usize = 2;
/// Offset of the flags / fragment-offset field.
pub const IPV4_FRAG_OFF: usize = 6;
/// Offset of the protocol field.
pub const IPV4_PROTO_OFF: usize = 9;
/// Offset of the source address.
pub const IPV4_SRC_OFF: usize = 12;
/// Offset of the destination address.
pub const IPV4_DST_OFF: usize = 16;
/// The reserved ("evil") flag bit.
pub const IPV4_FLAG_RESERVED: u16 = 0x8000;
/// The more-fragments flag bit.
pub const IPV4_FLAG_MF: u16 = 0x2000;
/// Mask of the fragment offset (in 8-byte units).
pub const IPV4_FRAG_OFFSET_MASK: u16 = 0x1FFF;

/// Fixed IPv6 header length.
pub const IPV6_HDR_LEN: usize = 40;
/// Offset of the payload-length field.
pub const IPV6_PAYLOAD_LEN_OFF: usize = 4;
/// Offset of the next-header field.
pub const IPV6_NEXT_HDR_OFF: usize = 6;
/// Offset of the source address.
pub const IPV6_SRC_OFF: usize = 8;
/// Offset of the destination address.
pub const IPV6_DST_OFF: usize = 24;
/// Extension headers walked before the walk is declared exhausted. Real
/// traffic carries at most a handful (RFC 8200 4.1 order has six kinds);
/// long chains are an evasion technique, so the budget is small.
pub const MAX_EXT_HEADERS: usize = 8;

/// IPv6 hop-by-hop options header.
pub const NH_HOP_BY_HOP: u8 = 0;
/// IPv6 routing header.
pub const NH_ROUTING: u8 = 43;
/// IPv6 fragment header.
pub const NH_FRAGMENT: u8 = 44;
/// IPsec ESP (payload is opaque: an upper layer for the classifier).
pub const NH_ESP: u8 = 50;
/// IPsec authentication header.
pub const NH_AH: u8 = 51;
/// IPv6 destination options header.
pub const NH_DEST_OPTS: u8 = 60;
/// IANA extension headers the walker does not interpret (mobility, HIP,
/// shim6, experimental): their length is not trustworthy, so fail closed.
pub const NH_UNKNOWN_EXT: [u8; 5] = [135, 139, 140, 253, 254];
/// Length of the IPv6 fragment header.
pub const IPV6_FRAG_HDR_LEN: usize = 8;

/// Protocol number of ICMP.
pub const PROTO_ICMP: u8 = 1;
/// Protocol number of TCP.
pub const PROTO_TCP: u8 = 6;
/// Protocol number of UDP.
pub const PROTO_UDP: u8 = 17;
/// Protocol number of ICMPv6.
pub const PROTO_ICMPV6: u8 = 58;
/// Protocol number of SCTP.
pub const PROTO_SCTP: u8 = 132;

/// Minimum TCP header length.
pub const TCP_MIN_HDR: usize = 20;
/// Offset of the data-offset nibble (and the NS flag bit).
pub const TCP_DOFF_OFF: usize = 12;
/// Offset of the flags byte.
pub const TCP_FLAGS_OFF: usize = 13;
/// The flag bits the key carries: NS (bit 8) and the eight flag bits.
pub const TCP_FLAGS_MASK: u16 = 0x01FF;
/// FIN flag.
pub const TCP_FIN: u16 = 0x01;
/// SYN flag.
pub const TCP_SYN: u16 = 0x02;
/// RST flag.
pub const TCP_RST: u16 = 0x04;
/// UDP header length.
pub const UDP_HDR_LEN: usize = 8;
/// SCTP common header length.
pub const SCTP_HDR_LEN: usize = 12;
/// ICMP / ICMPv6 bytes needed (type, code, checksum).
pub const ICMP_MIN_HDR: usize = 4;
/// UDP destination port of VXLAN.
pub const VXLAN_PORT: u16 = 4789;
/// UDP destination port of Geneve.
pub const GENEVE_PORT: u16 = 6081;
/// VXLAN / Geneve header length.
pub const TUNNEL_HDR_LEN: usize = 8;
/// Offset of the 24-bit VNI in a VXLAN / Geneve header.
pub const TUNNEL_VNI_OFF: usize = 4;
/// VXLAN "VNI valid" flag.
pub const VXLAN_FLAG_I: u8 = 0x08;

/// The key value meaning "no VLAN tag".
pub const NO_VLAN: u16 = 0xFFFF;
/// The key value meaning "not a VXLAN / Geneve packet".
pub const NO_VNI: u32 = u32::MAX;
/// Prefix of IPv4-mapped IPv6 addresses (`::ffff:0:0/96`).
pub const V4_MAPPED: u128 = 0xFFFF_u128 << 32;

/// Why a frame could not be fully parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, displaydoc::Display)]
pub enum Reason {
    /// truncated
    Truncated,
    /// malformed
    Malformed,
    /// not-ip
    NotIp,
    /// vlan-depth
    VlanDepth,
    /// ipv4-options
    Ipv4Options,
    /// non-first-fragment
    NonFirstFragment,
    /// unknown-extension-header
    UnknownExtension,
    /// routing-header
    RoutingHeader,
    /// header-budget
    HeaderBudget,
    /// nsh-si-zero
    NshSiZero,
}

impl Reason {
    /// Every reason, in declaration order.
    pub const ALL: [Reason; 10] = [
        Reason::Truncated,
        Reason::Malformed,
        Reason::NotIp,
        Reason::VlanDepth,
        Reason::Ipv4Options,
        Reason::NonFirstFragment,
        Reason::UnknownExtension,
        Reason::RoutingHeader,
        Reason::HeaderBudget,
        Reason::NshSiZero,
    ];

    /// The reason's stable name (as shown to Python).
    pub fn name(self) -> &'static str {
        match self {
            Reason::Truncated => "truncated",
            Reason::Malformed => "malformed",
            Reason::NotIp => "not-ip",
            Reason::VlanDepth => "vlan-depth",
            Reason::Ipv4Options => "ipv4-options",
            Reason::NonFirstFragment => "non-first-fragment",
            Reason::UnknownExtension => "unknown-extension-header",
            Reason::RoutingHeader => "routing-header",
            Reason::HeaderBudget => "header-budget",
            Reason::NshSiZero => "nsh-si-zero",
        }
    }
}

/// The classification key of a fully parsed packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Key {
    /// Source address, IPv4 mapped into `::ffff:0:0/96`.
    pub src: u128,
    /// Destination address, same form.
    pub dst: u128,
    /// VXLAN / Geneve network identifier, or [`NO_VNI`].
    pub vni: u32,
    /// Source port (ICMP: type; other protocols: 0).
    pub sport: u16,
    /// Destination port (ICMP: code; other protocols: 0).
    pub dport: u16,
    /// TCP flags (NS and the eight flag bits); 0 for other protocols.
    pub flags: u16,
    /// Outer VLAN id, or [`NO_VLAN`].
    pub vlan: u16,
    /// Inner VLAN id of a QinQ frame, or [`NO_VLAN`].
    pub inner_vlan: u16,
    /// 4 or 6.
    pub family: u8,
    /// IP protocol (IPv6: the upper-layer header after the walk).
    pub proto: u8,
    /// True for the first fragment of a fragmented packet.
    pub first_fragment: bool,
}

impl Key {
    /// Whether the packet is a TCP handshake packet (SYN, FIN or RST set):
    /// those always go to the security component.
    pub fn is_handshake(&self) -> bool {
        self.proto == PROTO_TCP && self.flags & (TCP_SYN | TCP_FIN | TCP_RST) != 0
    }
}

/// The service path header of an NSH-encapsulated frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Nsh {
    /// 24-bit service path identifier.
    pub spi: u32,
    /// 8-bit service index.
    pub si: u8,
}

/// The outcome of parsing one frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parsed {
    /// The NSH service path header, when the frame carried one.
    pub nsh: Option<Nsh>,
    /// The key, or why there is none.
    pub key: Result<Key, Reason>,
}

fn be16(b: &[u8], off: usize) -> Option<u16> {
    let s = b.get(off..off.checked_add(2)?)?;
    Some(u16::from_be_bytes([s[0], s[1]]))
}

fn be32(b: &[u8], off: usize) -> Option<u32> {
    let s = b.get(off..off.checked_add(4)?)?;
    Some(u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
}

fn addr4(b: &[u8], off: usize) -> Option<u128> {
    Some(u128::from(be32(b, off)?))
}

fn addr6(b: &[u8], off: usize) -> Option<u128> {
    let s: [u8; 16] = b.get(off..off.checked_add(16)?)?.try_into().ok()?;
    Some(u128::from_be_bytes(s))
}

fn byte(b: &[u8], off: usize) -> Option<u8> {
    b.get(off).copied()
}

/// Parses an Ethernet frame.
pub fn parse_frame(frame: &[u8]) -> Parsed {
    let mut nsh = None;
    let key = parse_ethernet(frame, true, &mut nsh);
    Parsed { nsh, key }
}

fn parse_ethernet(frame: &[u8], allow_nsh: bool, nsh: &mut Option<Nsh>) -> Result<Key, Reason> {
    let mut off = ETH_TYPE_OFF;
    let mut ethertype = be16(frame, off).ok_or(Reason::Truncated)?;
    let mut vlans = [NO_VLAN; MAX_VLAN_TAGS];
    let mut tags = 0;
    while matches!(
        ethertype,
        ETHERTYPE_VLAN | ETHERTYPE_QINQ | ETHERTYPE_QINQ_OLD
    ) {
        if tags == MAX_VLAN_TAGS {
            return Err(Reason::VlanDepth);
        }
        let tci = be16(frame, off + 2).ok_or(Reason::Truncated)?;
        vlans[tags] = tci & VLAN_VID_MASK;
        tags += 1;
        off += VLAN_TAG_LEN;
        ethertype = be16(frame, off).ok_or(Reason::Truncated)?;
    }
    let l3 = frame.get(off + 2..).ok_or(Reason::Truncated)?;
    let mut key = match ethertype {
        ETHERTYPE_IPV4 => parse_ipv4(l3)?,
        ETHERTYPE_IPV6 => parse_ipv6(l3)?,
        ETHERTYPE_NSH if allow_nsh => return parse_nsh(l3, nsh),
        _ => return Err(Reason::NotIp),
    };
    key.vlan = vlans[0];
    key.inner_vlan = vlans[1];
    Ok(key)
}

fn parse_nsh(b: &[u8], nsh: &mut Option<Nsh>) -> Result<Key, Reason> {
    let sp = be32(b, NSH_SP_OFF).ok_or(Reason::Truncated)?;
    let found = Nsh {
        spi: sp >> 8,
        si: (sp & 0xFF) as u8,
    };
    if found.si == 0 {
        return Err(Reason::NshSiZero);
    }
    *nsh = Some(found);
    let version = b[0] >> 6;
    let words = usize::from(b[NSH_LEN_OFF] & 0x3F);
    let len = words * 4;
    if version != 0 || len < NSH_MIN_LEN {
        return Err(Reason::Malformed);
    }
    let inner = b.get(len..).ok_or(Reason::Truncated)?;
    match b[NSH_NEXT_PROTO_OFF] {
        NSH_NP_IPV4 => parse_ipv4(inner),
        NSH_NP_IPV6 => parse_ipv6(inner),
        NSH_NP_ETHERNET => parse_ethernet(inner, false, &mut None),
        _ => Err(Reason::NotIp),
    }
}

fn blank_key(family: u8) -> Key {
    Key {
        src: 0,
        dst: 0,
        vni: NO_VNI,
        sport: 0,
        dport: 0,
        flags: 0,
        vlan: NO_VLAN,
        inner_vlan: NO_VLAN,
        family,
        proto: 0,
        first_fragment: false,
    }
}

fn parse_ipv4(b: &[u8]) -> Result<Key, Reason> {
    if b.len() < IPV4_MIN_HDR {
        return Err(Reason::Truncated);
    }
    if b[0] >> 4 != 4 {
        return Err(Reason::Malformed);
    }
    let ihl = usize::from(b[0] & 0x0F) * 4;
    if ihl < IPV4_MIN_HDR {
        return Err(Reason::Malformed);
    }
    if ihl > IPV4_MIN_HDR {
        // Options (source routing, timestamps...) are not interpreted.
        return Err(Reason::Ipv4Options);
    }
    let total = usize::from(be16(b, IPV4_TOTAL_LEN_OFF).ok_or(Reason::Truncated)?);
    if total < ihl {
        return Err(Reason::Malformed);
    }
    if total > b.len() {
        return Err(Reason::Truncated);
    }
    let frag = be16(b, IPV4_FRAG_OFF).ok_or(Reason::Truncated)?;
    if frag & IPV4_FLAG_RESERVED != 0 {
        return Err(Reason::Malformed);
    }
    if frag & IPV4_FRAG_OFFSET_MASK != 0 {
        return Err(Reason::NonFirstFragment);
    }
    let mut key = blank_key(4);
    key.first_fragment = frag & IPV4_FLAG_MF != 0;
    key.proto = b[IPV4_PROTO_OFF];
    key.src = V4_MAPPED | addr4(b, IPV4_SRC_OFF).ok_or(Reason::Truncated)?;
    key.dst = V4_MAPPED | addr4(b, IPV4_DST_OFF).ok_or(Reason::Truncated)?;
    parse_l4(&b[ihl..total], &mut key)?;
    Ok(key)
}

fn parse_ipv6(b: &[u8]) -> Result<Key, Reason> {
    if b.len() < IPV6_HDR_LEN {
        return Err(Reason::Truncated);
    }
    if b[0] >> 4 != 6 {
        return Err(Reason::Malformed);
    }
    let payload = usize::from(be16(b, IPV6_PAYLOAD_LEN_OFF).ok_or(Reason::Truncated)?);
    let end = IPV6_HDR_LEN + payload;
    if end > b.len() {
        return Err(Reason::Truncated);
    }
    let mut key = blank_key(6);
    key.src = addr6(b, IPV6_SRC_OFF).ok_or(Reason::Truncated)?;
    key.dst = addr6(b, IPV6_DST_OFF).ok_or(Reason::Truncated)?;
    let body = &b[IPV6_HDR_LEN..end];
    let mut nh = b[IPV6_NEXT_HDR_OFF];
    let mut off = 0usize;
    let mut walked = 0usize;
    let mut seen_fragment = false;
    loop {
        let hdr_len = match nh {
            NH_HOP_BY_HOP | NH_DEST_OPTS | NH_ROUTING | NH_AH | NH_FRAGMENT => {
                if walked == MAX_EXT_HEADERS {
                    return Err(Reason::HeaderBudget);
                }
                if nh == NH_HOP_BY_HOP && walked != 0 {
                    // RFC 8200: hop-by-hop options only directly after the header.
                    return Err(Reason::Malformed);
                }
                let ext_len = byte(body, off + 1).ok_or(Reason::Truncated)?;
                let len = match nh {
                    NH_AH => (usize::from(ext_len) + 2) * 4,
                    NH_FRAGMENT => IPV6_FRAG_HDR_LEN,
                    _ => (usize::from(ext_len) + 1) * 8,
                };
                if off + len > body.len() {
                    return Err(Reason::Truncated);
                }
                if nh == NH_ROUTING && body[off + 3] != 0 {
                    // Segments left: the destination is not the final one yet.
                    return Err(Reason::RoutingHeader);
                }
                if nh == NH_FRAGMENT {
                    if seen_fragment {
                        return Err(Reason::Malformed);
                    }
                    seen_fragment = true;
                    let fo = be16(body, off + 2).ok_or(Reason::Truncated)?;
                    if fo >> 3 != 0 {
                        return Err(Reason::NonFirstFragment);
                    }
                    key.first_fragment = fo & 1 != 0;
                }
                len
            }
            _ if NH_UNKNOWN_EXT.contains(&nh) => return Err(Reason::UnknownExtension),
            _ => break,
        };
        nh = body[off];
        off += hdr_len;
        walked += 1;
    }
    key.proto = nh;
    parse_l4(&body[off..], &mut key)?;
    Ok(key)
}

fn parse_l4(l4: &[u8], key: &mut Key) -> Result<(), Reason> {
    match key.proto {
        PROTO_TCP => {
            if l4.len() < TCP_MIN_HDR {
                return Err(Reason::Truncated);
            }
            let doff = usize::from(l4[TCP_DOFF_OFF] >> 4) * 4;
            if doff < TCP_MIN_HDR {
                return Err(Reason::Malformed);
            }
            if doff > l4.len() {
                return Err(Reason::Truncated);
            }
            key.sport = be16(l4, 0).ok_or(Reason::Truncated)?;
            key.dport = be16(l4, 2).ok_or(Reason::Truncated)?;
            key.flags = be16(l4, TCP_DOFF_OFF).ok_or(Reason::Truncated)? & TCP_FLAGS_MASK;
        }
        PROTO_UDP => {
            if l4.len() < UDP_HDR_LEN {
                return Err(Reason::Truncated);
            }
            key.sport = be16(l4, 0).ok_or(Reason::Truncated)?;
            key.dport = be16(l4, 2).ok_or(Reason::Truncated)?;
            if key.dport == VXLAN_PORT || key.dport == GENEVE_PORT {
                let tun = &l4[UDP_HDR_LEN..];
                if tun.len() < TUNNEL_HDR_LEN {
                    return Err(Reason::Truncated);
                }
                let ok = if key.dport == VXLAN_PORT {
                    tun[0] & VXLAN_FLAG_I != 0
                } else {
                    tun[0] >> 6 == 0
                };
                if !ok {
                    return Err(Reason::Malformed);
                }
                key.vni = be32(tun, TUNNEL_VNI_OFF).ok_or(Reason::Truncated)? >> 8;
            }
        }
        PROTO_SCTP => {
            if l4.len() < SCTP_HDR_LEN {
                return Err(Reason::Truncated);
            }
            key.sport = be16(l4, 0).ok_or(Reason::Truncated)?;
            key.dport = be16(l4, 2).ok_or(Reason::Truncated)?;
        }
        PROTO_ICMP | PROTO_ICMPV6 if (key.proto == PROTO_ICMP) == (key.family == 4) => {
            if l4.len() < ICMP_MIN_HDR {
                return Err(Reason::Truncated);
            }
            key.sport = u16::from(l4[0]);
            key.dport = u16::from(l4[1]);
        }
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn eth(ethertype: u16, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; 12];
        f.extend_from_slice(&ethertype.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    fn ipv4(proto: u8, l4: &[u8]) -> Vec<u8> {
        let total = (20 + l4.len()) as u16;
        let mut h = vec![
            0x45, 0, 0, 0, 0, 0, 0, 0, 64, proto, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
        ];
        h[2..4].copy_from_slice(&total.to_be_bytes());
        h.extend_from_slice(l4);
        h
    }

    fn tcp(sport: u16, dport: u16, flags: u8) -> Vec<u8> {
        let mut t = vec![0u8; 20];
        t[0..2].copy_from_slice(&sport.to_be_bytes());
        t[2..4].copy_from_slice(&dport.to_be_bytes());
        t[12] = 0x50;
        t[13] = flags;
        t
    }

    #[test]
    fn tcp_over_ipv4() {
        let p = parse_frame(&eth(ETHERTYPE_IPV4, &ipv4(6, &tcp(1234, 80, 0x02))));
        let k = p.key.unwrap();
        assert_eq!(
            (k.family, k.proto, k.sport, k.dport, k.flags),
            (4, 6, 1234, 80, 2)
        );
        assert_eq!(k.src, V4_MAPPED | 0x0A00_0001);
        assert!(k.is_handshake());
    }

    #[test]
    fn every_truncation_fails_closed() {
        let f = eth(ETHERTYPE_IPV4, &ipv4(6, &tcp(1, 2, 0x10)));
        for n in 0..f.len() {
            assert!(parse_frame(&f[..n]).key.is_err(), "prefix {n}");
        }
    }

    #[test]
    fn options_and_fragments_fail_closed() {
        let mut ip = ipv4(17, &[0, 53, 0, 53, 0, 8, 0, 0]);
        ip[6] = 0x00;
        ip[7] = 0x10;
        assert_eq!(
            parse_frame(&eth(ETHERTYPE_IPV4, &ip)).key,
            Err(Reason::NonFirstFragment)
        );
        let mut ip = ipv4(17, &[0, 53, 0, 53, 0, 8, 0, 0, 0, 0, 0, 0]);
        ip[0] = 0x46;
        assert_eq!(
            parse_frame(&eth(ETHERTYPE_IPV4, &ip)).key,
            Err(Reason::Ipv4Options)
        );
        ip[0] = 0x44;
        assert_eq!(
            parse_frame(&eth(ETHERTYPE_IPV4, &ip)).key,
            Err(Reason::Malformed)
        );
    }
}
