//! Capture files: classic pcap and pcapng, read into one flat buffer of
//! Ethernet frames plus offset and length arrays.
//!
//! Design: the reader is a pure function of the file bytes. Every length
//! read from the file is checked against what remains before it is used,
//! and per-record limits bound memory, so a hostile capture yields a
//! [`CaptureError`] with the byte offset, never a panic or a huge
//! allocation. Frames of non-Ethernet link types (raw IP, BSD loopback,
//! Linux cooked capture v1/v2) get a synthetic 14-byte Ethernet header so the
//! classifier sees one format; frames of other link types get a header with
//! EtherType 0xFFFF, which the parser treats as not-IP (fail closed).

/// Classic pcap magic, microsecond timestamps, as read little-endian.
pub const PCAP_MAGIC_US: u32 = 0xA1B2_C3D4;
/// Classic pcap magic, nanosecond timestamps.
pub const PCAP_MAGIC_NS: u32 = 0xA1B2_3C4D;
/// Classic pcap global header length.
pub const PCAP_HDR_LEN: usize = 24;
/// Offset of the link type in the classic pcap global header.
pub const PCAP_LINKTYPE_OFF: usize = 20;
/// Classic pcap per-record header length.
pub const PCAP_REC_LEN: usize = 16;
/// pcapng section header block type.
pub const PCAPNG_SHB: u32 = 0x0A0D_0D0A;
/// pcapng byte-order magic.
pub const PCAPNG_BOM: u32 = 0x1A2B_3C4D;
/// pcapng interface description block.
pub const PCAPNG_IDB: u32 = 1;
/// pcapng obsolete packet block.
pub const PCAPNG_PB: u32 = 2;
/// pcapng simple packet block.
pub const PCAPNG_SPB: u32 = 3;
/// pcapng enhanced packet block.
pub const PCAPNG_EPB: u32 = 6;
/// Largest frame accepted from a capture (the largest snap length tools
/// write is 262,144).
pub const MAX_FRAME: usize = 262_144;
/// Largest pcapng block accepted.
pub const MAX_BLOCK: usize = 16 * 1024 * 1024;

/// Link type: Ethernet.
pub const LINK_ETHERNET: u32 = 1;
/// Link type: BSD loopback (host-order 4-byte family).
pub const LINK_NULL: u32 = 0;
/// Link type: OpenBSD loopback (network-order family).
pub const LINK_LOOP: u32 = 108;
/// Link type: raw IP.
pub const LINK_RAW: u32 = 101;
/// Link type: raw IP (historic value on some systems).
pub const LINK_RAW_OLD: u32 = 12;
/// Link type: raw IPv4.
pub const LINK_IPV4: u32 = 228;
/// Link type: raw IPv6.
pub const LINK_IPV6: u32 = 229;
/// Link type: Linux cooked capture.
pub const LINK_SLL: u32 = 113;
/// Link type: Linux cooked capture v2.
pub const LINK_SLL2: u32 = 276;

/// Why a capture could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaptureError {
    /// Byte offset of the problem in the file.
    pub offset: usize,
    /// What was found.
    pub problem: String,
    /// What was expected.
    pub expected: String,
}

impl std::fmt::Display for CaptureError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "at byte {}: {}, expected {}",
            self.offset, self.problem, self.expected
        )
    }
}

impl std::error::Error for CaptureError {}

/// Frames of a capture in one buffer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Frames {
    /// Concatenated Ethernet frames.
    pub data: Vec<u8>,
    /// Start of each frame in `data`.
    pub offsets: Vec<u32>,
    /// Length of each frame.
    pub lengths: Vec<u32>,
}

fn err(offset: usize, problem: impl Into<String>, expected: impl Into<String>) -> CaptureError {
    CaptureError {
        offset,
        problem: problem.into(),
        expected: expected.into(),
    }
}

#[derive(Clone, Copy)]
struct Endian(bool);

impl Endian {
    fn u32(self, b: &[u8], off: usize) -> Option<u32> {
        let s: [u8; 4] = b.get(off..off.checked_add(4)?)?.try_into().ok()?;
        Some(if self.0 {
            u32::from_le_bytes(s)
        } else {
            u32::from_be_bytes(s)
        })
    }
    fn u16(self, b: &[u8], off: usize) -> Option<u16> {
        let s: [u8; 2] = b.get(off..off.checked_add(2)?)?.try_into().ok()?;
        Some(if self.0 {
            u16::from_le_bytes(s)
        } else {
            u16::from_be_bytes(s)
        })
    }
}

impl Frames {
    fn push(&mut self, link: u32, frame: &[u8], at: usize) -> Result<(), CaptureError> {
        let start = self.data.len();
        let ethertype = |version_byte: Option<&u8>| match version_byte.map(|b| b >> 4) {
            Some(4) => 0x0800u16,
            Some(6) => 0x86DD,
            _ => 0xFFFF,
        };
        let (ethertype, payload): (u16, &[u8]) = match link {
            LINK_ETHERNET => {
                self.data.extend_from_slice(frame);
                (0, &[])
            }
            LINK_RAW | LINK_RAW_OLD | LINK_IPV4 | LINK_IPV6 => (ethertype(frame.first()), frame),
            LINK_NULL | LINK_LOOP => {
                let body = frame.get(4..).unwrap_or(&[]);
                (ethertype(body.first()), body)
            }
            LINK_SLL => match frame.get(14..16) {
                Some(p) => (u16::from_be_bytes([p[0], p[1]]), &frame[16..]),
                None => (0xFFFF, frame),
            },
            LINK_SLL2 => match frame.get(0..2) {
                Some(p) if frame.len() >= 20 => (u16::from_be_bytes([p[0], p[1]]), &frame[20..]),
                _ => (0xFFFF, frame),
            },
            _ => (0xFFFF, frame),
        };
        if link != LINK_ETHERNET {
            self.data.extend_from_slice(&[0u8; 12]);
            self.data.extend_from_slice(&ethertype.to_be_bytes());
            self.data.extend_from_slice(payload);
        }
        let len = self.data.len() - start;
        if self.data.len() > u32::MAX as usize {
            return Err(err(
                at,
                "more than 4 GiB of frames",
                "a capture whose frames fit in 4 GiB",
            ));
        }
        self.offsets.push(start as u32);
        self.lengths.push(len as u32);
        Ok(())
    }
}

/// Reads a classic pcap or pcapng capture from its bytes.
pub fn read_capture(file: &[u8]) -> Result<Frames, CaptureError> {
    let magic_le = Endian(true).u32(file, 0).ok_or_else(|| {
        err(
            0,
            format!("{} bytes", file.len()),
            "a pcap or pcapng file (at least 4 bytes of magic)",
        )
    })?;
    if magic_le == PCAPNG_SHB {
        return read_pcapng(file);
    }
    let endian = match magic_le {
        PCAP_MAGIC_US | PCAP_MAGIC_NS => Endian(true),
        m if m.swap_bytes() == PCAP_MAGIC_US || m.swap_bytes() == PCAP_MAGIC_NS => Endian(false),
        m => {
            return Err(err(
                0,
                format!("magic 0x{m:08x}"),
                "a pcap magic (a1b2c3d4, a1b23c4d) or the pcapng section header 0a0d0d0a",
            ))
        }
    };
    if file.len() < PCAP_HDR_LEN {
        return Err(err(
            file.len(),
            "end of file in the pcap header",
            "a 24-byte pcap header",
        ));
    }
    let link = endian.u32(file, PCAP_LINKTYPE_OFF).unwrap_or(0) & 0x0FFF_FFFF;
    let mut frames = Frames::default();
    let mut off = PCAP_HDR_LEN;
    while off < file.len() {
        let (Some(caplen), Some(_)) = (endian.u32(file, off + 8), endian.u32(file, off + 12))
        else {
            return Err(err(
                off,
                "end of file in a record header",
                "a 16-byte record header",
            ));
        };
        let caplen = caplen as usize;
        if caplen > MAX_FRAME {
            return Err(err(
                off + 8,
                format!("captured length {caplen}"),
                format!("at most {MAX_FRAME}"),
            ));
        }
        let start = off + PCAP_REC_LEN;
        let data = file.get(start..start + caplen).ok_or_else(|| {
            err(
                start,
                format!("end of file inside a {caplen}-byte record"),
                "the whole record",
            )
        })?;
        frames.push(link, data, off)?;
        off = start + caplen;
    }
    Ok(frames)
}

fn read_pcapng(file: &[u8]) -> Result<Frames, CaptureError> {
    let mut frames = Frames::default();
    let mut endian = Endian(true);
    // (link type, snap length) per interface of the current section.
    let mut ifaces: Vec<(u32, u32)> = Vec::new();
    let mut off = 0usize;
    while off < file.len() {
        let block_type_le = Endian(true).u32(file, off);
        if block_type_le == Some(PCAPNG_SHB) {
            let bom = file.get(off + 8..off + 12).ok_or_else(|| {
                err(
                    off,
                    "end of file in a section header",
                    "a 12-byte section header start",
                )
            })?;
            endian = match u32::from_le_bytes([bom[0], bom[1], bom[2], bom[3]]) {
                PCAPNG_BOM => Endian(true),
                m if m.swap_bytes() == PCAPNG_BOM => Endian(false),
                m => {
                    return Err(err(
                        off + 8,
                        format!("byte-order magic 0x{m:08x}"),
                        "1a2b3c4d in either byte order",
                    ))
                }
            };
            let major = endian.u16(file, off + 12).ok_or_else(|| {
                err(
                    off,
                    "end of file in a section header",
                    "a section header with a version",
                )
            })?;
            if major != 1 {
                let minor = endian.u16(file, off + 14).unwrap_or(0);
                return Err(err(
                    off + 12,
                    format!("section version {major}.{minor}"),
                    "pcapng version 1.x",
                ));
            }
            ifaces.clear();
        }
        let (Some(btype), Some(blen)) = (endian.u32(file, off), endian.u32(file, off + 4)) else {
            return Err(err(
                off,
                "end of file in a block header",
                "an 8-byte block header",
            ));
        };
        let blen = blen as usize;
        if blen < 12 || blen % 4 != 0 || blen > MAX_BLOCK {
            return Err(err(
                off + 4,
                format!("block length {blen}"),
                format!("a multiple of 4 between 12 and {MAX_BLOCK}"),
            ));
        }
        let block = file.get(off..off + blen).ok_or_else(|| {
            err(
                off,
                format!("end of file inside a {blen}-byte block"),
                "the whole block",
            )
        })?;
        if endian.u32(block, blen - 4) != Some(blen as u32) {
            return Err(err(
                off + blen - 4,
                "trailing block length differs",
                format!("{blen} (the leading length)"),
            ));
        }
        let body = &block[8..blen - 4];
        match btype {
            PCAPNG_IDB => {
                let (Some(link), Some(snap)) = (endian.u16(body, 0), endian.u32(body, 4)) else {
                    return Err(err(
                        off,
                        "short interface description block",
                        "link type and snap length",
                    ));
                };
                ifaces.push((u32::from(link), snap));
            }
            PCAPNG_EPB | PCAPNG_PB => {
                let (Some(iface), Some(caplen)) = (
                    if btype == PCAPNG_EPB {
                        endian.u32(body, 0)
                    } else {
                        endian.u16(body, 0).map(u32::from)
                    },
                    endian.u32(body, 12),
                ) else {
                    return Err(err(
                        off,
                        "short packet block",
                        "a 20-byte packet block header",
                    ));
                };
                let &(link, _) = ifaces.get(iface as usize).ok_or_else(|| {
                    err(
                        off + 8,
                        format!("interface {iface}"),
                        format!("one of the {} interfaces described", ifaces.len()),
                    )
                })?;
                let caplen = caplen as usize;
                let data = body
                    .get(20..20 + caplen)
                    .filter(|_| caplen <= MAX_FRAME)
                    .ok_or_else(|| {
                        err(
                            off + 20,
                            format!("captured length {caplen}"),
                            "a length within the block",
                        )
                    })?;
                frames.push(link, data, off)?;
            }
            PCAPNG_SPB => {
                let Some(orig) = endian.u32(body, 0) else {
                    return Err(err(
                        off,
                        "short simple packet block",
                        "a 4-byte original length",
                    ));
                };
                let &(link, snap) = ifaces.first().ok_or_else(|| {
                    err(
                        off,
                        "simple packet block before any interface",
                        "an interface description first",
                    )
                })?;
                let mut caplen = orig as usize;
                if snap != 0 {
                    caplen = caplen.min(snap as usize);
                }
                caplen = caplen.min(body.len() - 4);
                frames.push(link, &body[4..4 + caplen], off)?;
            }
            _ => {}
        }
        off += blen;
    }
    Ok(frames)
}
