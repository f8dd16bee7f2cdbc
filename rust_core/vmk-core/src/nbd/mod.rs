//! NBD client: the network block device protocol, client side.
//!
//! Design: storage units of the network backend live in images that qemu-nbd
//! serves on a unix socket. [`Client`] speaks the subset they need: the fixed
//! newstyle handshake with one `NBD_OPT_GO` that also asks for the block-size
//! constraints, then `READ`, `WRITE`, `WRITE_ZEROES`, `FLUSH` and `DISC` with
//! simple replies, one request in flight at a time. It is generic over any
//! `Read + Write` stream so that the same parser runs over an in-memory
//! stream (unit tests, the fuzz target); [`connect`] opens one over a
//! [`UnixStream`] with read and write timeouts.
//!
//! The server is not trusted. Every length it sends is bounded before
//! anything is read or allocated: an option reply carries at most 64 KiB and
//! at most 64 of them come before the acknowledgement; reply data only ever
//! lands in the caller's buffer, whose length the client chose. Every failure
//! is an [`NbdError`] carrying the errno that the pure-Python reference
//! (`vmkernel/reference/nbd.py`) raises for it. A failure that leaves the
//! byte stream out of step (a protocol error, a timeout, a dropped socket)
//! drops the connection, so a later call fails with `ENOTCONN` instead of
//! taking stale bytes for its reply; an error the server reports in a reply
//! leaves the session usable.

use std::fmt;
use std::io::{self, IoSlice, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

#[cfg(test)]
mod tests;

/// Server greeting magic (`NBDMAGIC`).
pub const NBDMAGIC: u64 = 0x4E42_444D_4147_4943;
/// Newstyle option magic (`IHAVEOPT`).
pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
/// Option reply magic.
pub const REPLY_MAGIC: u64 = 0x0003_E889_0455_65A9;
/// Transmission request magic.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Simple reply magic.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

/// Handshake flag: the server speaks fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1;
/// Handshake flag: no 124 zero bytes after the export data.
pub const FLAG_NO_ZEROES: u16 = 2;
/// Option: select an export and enter transmission.
pub const OPT_GO: u32 = 7;
/// Option reply: the option is done.
pub const REP_ACK: u32 = 1;
/// Option reply: information about the export.
pub const REP_INFO: u32 = 3;
/// Option reply types with this bit set are errors.
pub const REP_ERR_BIT: u32 = 1 << 31;
/// Information type: export size and transmission flags.
pub const INFO_EXPORT: u16 = 0;
/// Information type: block-size constraints.
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flag: the flags field is valid.
pub const TF_HAS_FLAGS: u16 = 1;
/// Transmission flag: the export is read-only.
pub const TF_READ_ONLY: u16 = 2;
/// Transmission flag: the export supports `FLUSH`.
pub const TF_SEND_FLUSH: u16 = 4;
/// Transmission flag: the export supports `WRITE_ZEROES`.
pub const TF_SEND_WRITE_ZEROES: u16 = 64;

/// Command: read.
pub const CMD_READ: u16 = 0;
/// Command: write.
pub const CMD_WRITE: u16 = 1;
/// Command: disconnect.
pub const CMD_DISC: u16 = 2;
/// Command: flush.
pub const CMD_FLUSH: u16 = 3;
/// Command: write zeroes.
pub const CMD_WRITE_ZEROES: u16 = 6;

/// The export that qemu-nbd serves for a unit image.
pub const DEFAULT_EXPORT: &str = "unit";
/// Longest export name the protocol allows, in bytes.
pub const MAX_EXPORT_NAME: usize = 4096;
/// Largest option reply payload accepted (the protocol caps strings at 4 KiB).
pub const MAX_OPTION_PAYLOAD: u32 = 64 << 10;
/// Most option replies accepted before the acknowledgement.
pub const MAX_OPTION_REPLIES: usize = 64;
/// Smallest request payload the client splits at.
pub const MIN_PAYLOAD: u32 = 4096;
/// Largest request payload the client sends or asks for (qemu's limit).
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// Largest single `WRITE_ZEROES` request (its length field is 32 bits).
pub const MAX_ZEROES_REQUEST: u64 = 1 << 31;
/// Most buffers handed to one vectored write (Linux `IOV_MAX`).
const MAX_IOVECS: usize = 1024;

/// Linux errno values the client reports (NBD error values are the Linux ones).
pub mod errno {
    /// The server refused the export.
    pub const ENOENT: u32 = 2;
    /// A socket failed without an errno.
    pub const EIO: u32 = 5;
    /// A request no export can satisfy.
    pub const EINVAL: u32 = 22;
    /// The server broke the protocol.
    pub const EPROTO: u32 = 71;
    /// The export lacks a needed feature.
    pub const ENOTSUP: u32 = 95;
    /// The connection is closed or was dropped.
    pub const ENOTCONN: u32 = 107;
    /// The server closed the connection.
    pub const ESHUTDOWN: u32 = 108;
    /// The server stalled past the timeout.
    pub const ETIMEDOUT: u32 = 110;
}

/// Why an NBD call failed. [`NbdError::errno`] gives the errno that the
/// Python `OSError` carries; `Display` gives its message.
#[derive(Debug, Clone, PartialEq)]
pub enum NbdError {
    /// The server answered outside the protocol (`EPROTO`).
    Protocol(String),
    /// The server refused the export (`ENOENT`).
    Refused {
        /// The export asked for.
        export: String,
        /// The error reply type.
        reply_type: u32,
        /// The server's message (lossy UTF-8).
        message: String,
    },
    /// The server closed the connection (`ESHUTDOWN`).
    Closed {
        /// The server's socket path.
        peer: String,
    },
    /// The server moved no byte within the timeout (`ETIMEDOUT`).
    Timeout {
        /// The server's socket path.
        peer: String,
        /// The timeout in seconds, when one was set.
        seconds: Option<f64>,
    },
    /// A socket call failed with `errno`.
    Io {
        /// The operating system's errno.
        errno: u32,
        /// What was being done, e.g. "cannot connect to NBD server at /run/x.sock".
        context: String,
    },
    /// The server answered a request with an error; the session goes on.
    Server {
        /// The NBD error value (a Linux errno).
        errno: u32,
        /// The server's socket path.
        peer: String,
        /// The command's name.
        command: &'static str,
        /// The request offset.
        offset: u64,
        /// The request length.
        length: u64,
    },
    /// `FLUSH` on an export that does not support it (`ENOTSUP`).
    FlushUnsupported {
        /// The export.
        export: String,
        /// The server's socket path.
        peer: String,
    },
    /// The connection was closed, or dropped after an error (`ENOTCONN`).
    NotConnected {
        /// The server's socket path.
        peer: String,
        /// The errno of the failure that dropped it; `None` after `close`.
        dropped_by: Option<u32>,
    },
    /// An argument no export can accept (`EINVAL`).
    Invalid {
        /// The argument.
        thing: &'static str,
        /// Its value, rendered.
        value: String,
        /// What would have been accepted.
        expected: String,
    },
}

impl NbdError {
    /// The errno of the `OSError` this failure becomes.
    pub fn errno(&self) -> u32 {
        match self {
            Self::Protocol(_) => errno::EPROTO,
            Self::Refused { .. } => errno::ENOENT,
            Self::Closed { .. } => errno::ESHUTDOWN,
            Self::Timeout { .. } => errno::ETIMEDOUT,
            Self::Io { errno, .. } | Self::Server { errno, .. } => *errno,
            Self::FlushUnsupported { .. } => errno::ENOTSUP,
            Self::NotConnected { .. } => errno::ENOTCONN,
            Self::Invalid { .. } => errno::EINVAL,
        }
    }

    /// Whether the failure leaves the byte stream out of step (the client
    /// then drops the connection).
    fn breaks_stream(&self) -> bool {
        matches!(
            self,
            Self::Protocol(_)
                | Self::Refused { .. }
                | Self::Closed { .. }
                | Self::Timeout { .. }
                | Self::Io { .. }
        )
    }
}

/// The operating system's description of `errno` (`strerror`), as std knows it.
fn describe(errno: u32) -> String {
    let text = i32::try_from(errno)
        .map(|e| io::Error::from_raw_os_error(e).to_string())
        .unwrap_or_else(|_| format!("unknown error {errno}"));
    // std appends " (os error N)"; the message already names the errno.
    match text.rfind(" (os error ") {
        Some(at) => text[..at].to_owned(),
        None => text,
    }
}

impl fmt::Display for NbdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Protocol(detail) => write!(f, "NBD protocol error: {detail}"),
            Self::Refused {
                export,
                reply_type,
                message,
            } => write!(f, "NBD export {export} refused ({reply_type:#x}): {message}"),
            Self::Closed { peer } => write!(f, "NBD server at {peer} closed the connection"),
            Self::Timeout { peer, seconds } => match seconds {
                Some(s) => write!(f, "NBD server at {peer} stalled for {s} s (the timeout)"),
                None => write!(f, "NBD server at {peer} stalled past the timeout"),
            },
            Self::Io { errno, context } => write!(f, "{context}: {}", describe(*errno)),
            Self::Server {
                errno,
                peer,
                command,
                offset,
                length,
            } => write!(
                f,
                "NBD server at {peer}: {command} of {length} bytes at offset {offset} failed: {}",
                describe(*errno)
            ),
            Self::FlushUnsupported { export, peer } => write!(
                f,
                "NBD export {export} at {peer} does not support FLUSH; writes could not be made durable"
            ),
            Self::NotConnected { peer, dropped_by } => match dropped_by {
                None => write!(f, "NBD connection to {peer} is closed"),
                Some(e) => write!(
                    f,
                    "NBD connection to {peer} was dropped after an error (errno {e})"
                ),
            },
            Self::Invalid {
                thing,
                value,
                expected,
            } => write!(f, "{thing}: got {value}, expected {expected}"),
        }
    }
}

impl std::error::Error for NbdError {}

/// How a transport call failed, before it is given its context.
enum Transport {
    Eof,
    Timeout,
    Os(u32),
}

fn transport(err: &io::Error) -> Transport {
    match err.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => Transport::Timeout,
        _ => match err.raw_os_error().and_then(|e| u32::try_from(e).ok()) {
            Some(e) => Transport::Os(e),
            None if err.kind() == io::ErrorKind::InvalidInput => Transport::Os(errno::EINVAL),
            None => Transport::Os(errno::EIO),
        },
    }
}

fn recv_exact<S: Read>(stream: &mut S, mut buf: &mut [u8]) -> Result<(), Transport> {
    while !buf.is_empty() {
        match stream.read(buf) {
            Ok(0) => return Err(Transport::Eof),
            Ok(n) => buf = buf.get_mut(n..).unwrap_or_default(),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(transport(&e)),
        }
    }
    Ok(())
}

fn send_all<S: Write>(stream: &mut S, parts: &[&[u8]]) -> Result<(), Transport> {
    let mut slices: Vec<IoSlice<'_>> = parts
        .iter()
        .filter(|p| !p.is_empty())
        .map(|p| IoSlice::new(p))
        .collect();
    let mut rest = &mut slices[..];
    while !rest.is_empty() {
        let batch = rest.len().min(MAX_IOVECS);
        match stream.write_vectored(&rest[..batch]) {
            Ok(0) => return Err(Transport::Eof),
            Ok(n) => IoSlice::advance_slices(&mut rest, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(transport(&e)),
        }
    }
    Ok(())
}

fn be_u16(b: &[u8], at: usize) -> u16 {
    let mut v = [0u8; 2];
    if let Some(s) = b.get(at..at + 2) {
        v.copy_from_slice(s);
    }
    u16::from_be_bytes(v)
}

fn be_u32(b: &[u8], at: usize) -> u32 {
    let mut v = [0u8; 4];
    if let Some(s) = b.get(at..at + 4) {
        v.copy_from_slice(s);
    }
    u32::from_be_bytes(v)
}

fn be_u64(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    if let Some(s) = b.get(at..at + 8) {
        v.copy_from_slice(s);
    }
    u64::from_be_bytes(v)
}

/// Checks an export name: at most [`MAX_EXPORT_NAME`] bytes.
pub fn check_export(export: &str) -> Result<(), NbdError> {
    if export.len() > MAX_EXPORT_NAME {
        return Err(NbdError::Invalid {
            thing: "export",
            value: format!("a name of {} bytes", export.len()),
            expected: format!("a str of at most {MAX_EXPORT_NAME} UTF-8 bytes"),
        });
    }
    Ok(())
}

/// Checks that a request stays inside the 64-bit offset range.
pub fn check_range(offset: u64, length: u64) -> Result<(), NbdError> {
    if offset.checked_add(length).is_none() {
        return Err(NbdError::Invalid {
            thing: "offset + length",
            value: (u128::from(offset) + u128::from(length)).to_string(),
            expected: "at most 2**64 (the NBD offset range)".to_owned(),
        });
    }
    Ok(())
}

/// Checks a split size for [`Client::set_max_payload`].
pub fn check_max_payload(value: u64) -> Result<u32, NbdError> {
    match u32::try_from(value) {
        Ok(v) if (MIN_PAYLOAD..=MAX_PAYLOAD).contains(&v) => Ok(v),
        _ => Err(NbdError::Invalid {
            thing: "max_payload",
            value: value.to_string(),
            expected: format!("an integer in [{MIN_PAYLOAD}, {MAX_PAYLOAD}]"),
        }),
    }
}

enum State<S> {
    Open(S),
    Closed,
    Dropped(u32),
}

/// One connection to an NBD export, in transmission phase.
pub struct Client<S> {
    state: State<S>,
    peer: String,
    export: String,
    timeout: Option<f64>,
    handle: u64,
    size: u64,
    transmission_flags: u16,
    max_payload: u32,
}

/// Connects to the NBD server on the unix socket `path` and negotiates
/// `export`; every socket read and write times out after `timeout` seconds.
pub fn connect(path: &str, export: &str, timeout: f64) -> Result<Client<UnixStream>, NbdError> {
    check_export(export)?;
    let duration = Duration::try_from_secs_f64(timeout)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| NbdError::Invalid {
            thing: "timeout",
            value: timeout.to_string(),
            expected: "a positive number of seconds".to_owned(),
        })?;
    let context = || format!("cannot connect to NBD server at {path}");
    let io_err = |e: io::Error| match transport(&e) {
        Transport::Os(errno) => NbdError::Io {
            errno,
            context: context(),
        },
        Transport::Eof | Transport::Timeout => NbdError::Timeout {
            peer: path.to_owned(),
            seconds: Some(timeout),
        },
    };
    let stream = UnixStream::connect(path).map_err(io_err)?;
    stream.set_read_timeout(Some(duration)).map_err(io_err)?;
    stream.set_write_timeout(Some(duration)).map_err(io_err)?;
    Client::handshake(stream, path, export, Some(timeout))
}

impl<S: Read + Write> Client<S> {
    /// Runs the handshake over `stream` (a connected server); `peer` names
    /// the server in messages and `timeout` is the stream's timeout, if any.
    pub fn handshake(
        stream: S,
        peer: &str,
        export: &str,
        timeout: Option<f64>,
    ) -> Result<Self, NbdError> {
        check_export(export)?;
        let mut client = Self {
            state: State::Open(stream),
            peer: peer.to_owned(),
            export: export.to_owned(),
            timeout,
            handle: 0,
            size: 0,
            transmission_flags: 0,
            max_payload: MAX_PAYLOAD,
        };
        client.negotiate()?;
        Ok(client)
    }

    /// The socket path (or other name) of the server.
    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// The export's name.
    pub fn export(&self) -> &str {
        &self.export
    }

    /// The export's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The export's transmission flags (`TF_*`).
    pub fn transmission_flags(&self) -> u16 {
        self.transmission_flags
    }

    /// The largest payload of one request; longer reads and writes are split.
    pub fn max_payload(&self) -> u32 {
        self.max_payload
    }

    /// Sets the split size (in `[MIN_PAYLOAD, MAX_PAYLOAD]`).
    pub fn set_max_payload(&mut self, value: u64) -> Result<(), NbdError> {
        self.max_payload = check_max_payload(value)?;
        Ok(())
    }

    /// Whether `close` was called or a failure dropped the connection.
    pub fn is_connected(&self) -> bool {
        matches!(self.state, State::Open(_))
    }

    fn not_connected(&self) -> NbdError {
        NbdError::NotConnected {
            peer: self.peer.clone(),
            dropped_by: match self.state {
                State::Dropped(e) => Some(e),
                State::Open(_) | State::Closed => None,
            },
        }
    }

    /// Records a failure; one that leaves the stream out of step drops the connection.
    fn fail(&mut self, err: NbdError) -> NbdError {
        if err.breaks_stream() && matches!(self.state, State::Open(_)) {
            self.state = State::Dropped(err.errno());
        }
        err
    }

    fn protocol(&mut self, detail: String) -> NbdError {
        self.fail(NbdError::Protocol(detail))
    }

    fn transport_err(&mut self, t: Transport, what: &str) -> NbdError {
        let err = match t {
            Transport::Eof => NbdError::Closed {
                peer: self.peer.clone(),
            },
            Transport::Timeout => NbdError::Timeout {
                peer: self.peer.clone(),
                seconds: self.timeout,
            },
            Transport::Os(errno) => NbdError::Io {
                errno,
                context: format!("cannot {what} NBD server at {}", self.peer),
            },
        };
        self.fail(err)
    }

    fn recv(&mut self, buf: &mut [u8]) -> Result<(), NbdError> {
        let State::Open(stream) = &mut self.state else {
            return Err(self.not_connected());
        };
        recv_exact(stream, buf).map_err(|t| self.transport_err(t, "receive from"))
    }

    fn send(&mut self, parts: &[&[u8]]) -> Result<(), NbdError> {
        let State::Open(stream) = &mut self.state else {
            return Err(self.not_connected());
        };
        send_all(stream, parts).map_err(|t| self.transport_err(t, "send to"))
    }

    fn live(&self) -> Result<(), NbdError> {
        match self.state {
            State::Open(_) => Ok(()),
            State::Closed | State::Dropped(_) => Err(self.not_connected()),
        }
    }

    // ------------------------------------------------------------ handshake

    fn negotiate(&mut self) -> Result<(), NbdError> {
        let mut greeting = [0u8; 18];
        self.recv(&mut greeting)?;
        let (magic, opt_magic, flags) = (
            be_u64(&greeting, 0),
            be_u64(&greeting, 8),
            be_u16(&greeting, 16),
        );
        if magic != NBDMAGIC || opt_magic != IHAVEOPT {
            return Err(self.protocol(format!(
                "greeting {magic:#x}/{opt_magic:#x}, expected fixed newstyle"
            )));
        }
        if flags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(self.protocol(format!("handshake flags {flags:#x} lack FIXED_NEWSTYLE")));
        }
        let client_flags = u32::from(FLAG_FIXED_NEWSTYLE | (flags & FLAG_NO_ZEROES));
        let name = self.export.as_bytes().to_vec();
        // check_export bounds the name, so its length fits the u32 fields.
        let name_len = u32::try_from(name.len()).unwrap_or(u32::MAX);
        let mut head = Vec::with_capacity(24);
        head.extend_from_slice(&client_flags.to_be_bytes());
        head.extend_from_slice(&IHAVEOPT.to_be_bytes());
        head.extend_from_slice(&OPT_GO.to_be_bytes());
        head.extend_from_slice(&(name_len.saturating_add(8)).to_be_bytes());
        head.extend_from_slice(&name_len.to_be_bytes());
        let tail = [&1u16.to_be_bytes()[..], &INFO_BLOCK_SIZE.to_be_bytes()[..]].concat();
        self.send(&[&head, &name, &tail])?;

        let mut acked = false;
        for _ in 0..MAX_OPTION_REPLIES {
            let mut reply = [0u8; 20];
            self.recv(&mut reply)?;
            let (magic, option, rtype, length) = (
                be_u64(&reply, 0),
                be_u32(&reply, 8),
                be_u32(&reply, 12),
                be_u32(&reply, 16),
            );
            if magic != REPLY_MAGIC || option != OPT_GO {
                return Err(self.protocol(format!("option reply {magic:#x} for option {option}")));
            }
            if length > MAX_OPTION_PAYLOAD {
                return Err(self.protocol(format!(
                    "option reply of {length} bytes (at most {MAX_OPTION_PAYLOAD})"
                )));
            }
            // Bounded just above: at most 64 KiB.
            let mut payload = vec![0u8; length as usize];
            self.recv(&mut payload)?;
            if rtype & REP_ERR_BIT != 0 {
                let err = NbdError::Refused {
                    export: self.export.clone(),
                    reply_type: rtype,
                    message: String::from_utf8_lossy(&payload).into_owned(),
                };
                return Err(self.fail(err));
            }
            if rtype == REP_ACK {
                acked = true;
                break;
            }
            if rtype == REP_INFO && payload.len() >= 2 {
                match be_u16(&payload, 0) {
                    INFO_EXPORT => {
                        if payload.len() != 12 {
                            return Err(self.protocol(format!(
                                "NBD_INFO_EXPORT of {} bytes, expected 12",
                                payload.len()
                            )));
                        }
                        self.size = be_u64(&payload, 2);
                        self.transmission_flags = be_u16(&payload, 10);
                    }
                    INFO_BLOCK_SIZE => {
                        if payload.len() != 14 {
                            return Err(self.protocol(format!(
                                "NBD_INFO_BLOCK_SIZE of {} bytes, expected 14",
                                payload.len()
                            )));
                        }
                        let maximum = be_u32(&payload, 10);
                        self.max_payload = maximum.clamp(MIN_PAYLOAD, MAX_PAYLOAD);
                    }
                    _ => {}
                }
            }
        }
        if !acked {
            return Err(self.protocol(format!(
                "no NBD_REP_ACK after {MAX_OPTION_REPLIES} option replies"
            )));
        }
        if self.transmission_flags & TF_HAS_FLAGS == 0 {
            return Err(self.protocol("export information missing".to_owned()));
        }
        Ok(())
    }

    // --------------------------------------------------------- transmission

    /// Sends one request (with its payload) and reads its simple reply,
    /// then the reply data into `into`.
    fn request(
        &mut self,
        cmd: u16,
        offset: u64,
        length: u32,
        payload: &[&[u8]],
        into: Option<&mut [u8]>,
    ) -> Result<(), NbdError> {
        self.handle = self.handle.wrapping_add(1);
        let mut head = [0u8; 28];
        head[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        head[6..8].copy_from_slice(&cmd.to_be_bytes());
        head[8..16].copy_from_slice(&self.handle.to_be_bytes());
        head[16..24].copy_from_slice(&offset.to_be_bytes());
        head[24..28].copy_from_slice(&length.to_be_bytes());
        let mut parts: Vec<&[u8]> = Vec::with_capacity(payload.len() + 1);
        parts.push(&head);
        parts.extend_from_slice(payload);
        self.send(&parts)?;
        let mut reply = [0u8; 16];
        self.recv(&mut reply)?;
        let (magic, error, handle) = (be_u32(&reply, 0), be_u32(&reply, 4), be_u64(&reply, 8));
        if magic != SIMPLE_REPLY_MAGIC || handle != self.handle {
            let expected = self.handle;
            return Err(self.protocol(format!(
                "reply magic {magic:#x} handle {handle}, expected handle {expected}"
            )));
        }
        if error != 0 {
            return Err(NbdError::Server {
                errno: error,
                peer: self.peer.clone(),
                command: command_name(cmd),
                offset,
                length: u64::from(length),
            });
        }
        match into {
            Some(buf) => self.recv(buf),
            None => Ok(()),
        }
    }

    /// Reads `buf.len()` bytes at `offset` into `buf`, in requests of at
    /// most `max_payload` bytes.
    pub fn read_into(&mut self, buf: &mut [u8], offset: u64) -> Result<(), NbdError> {
        check_range(offset, buf.len() as u64)?;
        self.live()?;
        let step = self.max_payload as usize;
        let mut at = offset;
        for chunk in buf.chunks_mut(step) {
            let n = chunk.len() as u64;
            // `chunk.len() <= max_payload`, a u32.
            self.request(CMD_READ, at, n as u32, &[], Some(chunk))?;
            at += n;
        }
        Ok(())
    }

    /// Writes the concatenation of `parts` at `offset`, in requests of at
    /// most `max_payload` bytes.
    pub fn write(&mut self, parts: &[&[u8]], offset: u64) -> Result<(), NbdError> {
        let total: u64 = parts.iter().map(|p| p.len() as u64).sum();
        check_range(offset, total)?;
        self.live()?;
        let step = u64::from(self.max_payload);
        let mut pieces = parts.iter().copied().filter(|p| !p.is_empty());
        let mut current: &[u8] = &[];
        let mut done = 0u64;
        let mut chunk: Vec<&[u8]> = Vec::new();
        while done < total {
            chunk.clear();
            let mut need = step.min(total - done);
            let mut n = 0u64;
            while need > 0 {
                if current.is_empty() {
                    match pieces.next() {
                        Some(p) => current = p,
                        None => break,
                    }
                }
                let take = (need as usize).min(current.len());
                let (head, tail) = current.split_at(take);
                chunk.push(head);
                current = tail;
                need -= take as u64;
                n += take as u64;
            }
            if n == 0 {
                break;
            }
            // n <= max_payload, a u32.
            self.request(CMD_WRITE, offset + done, n as u32, &chunk, None)?;
            done += n;
        }
        Ok(())
    }

    /// Makes `length` bytes at `offset` read as zeros: `WRITE_ZEROES` when
    /// the export supports it, zero-filled writes otherwise.
    pub fn write_zeroes(&mut self, offset: u64, length: u64) -> Result<(), NbdError> {
        check_range(offset, length)?;
        self.live()?;
        if self.transmission_flags & TF_SEND_WRITE_ZEROES == 0 {
            let step = u64::from(self.max_payload);
            // At most max_payload (32 MiB) of zeros, sent as often as needed.
            let zeros = vec![0u8; step.min(length) as usize];
            let mut done = 0u64;
            while done < length {
                let n = step.min(length - done);
                let part = zeros.get(..n as usize).unwrap_or_default();
                self.request(CMD_WRITE, offset + done, n as u32, &[part], None)?;
                done += n;
            }
            return Ok(());
        }
        let mut done = 0u64;
        while done < length {
            let n = MAX_ZEROES_REQUEST.min(length - done);
            // n <= 2**31.
            self.request(CMD_WRITE_ZEROES, offset + done, n as u32, &[], None)?;
            done += n;
        }
        Ok(())
    }

    /// Makes every acknowledged write durable (`ENOTSUP` when the export
    /// cannot flush).
    pub fn flush(&mut self) -> Result<(), NbdError> {
        self.live()?;
        if self.transmission_flags & TF_SEND_FLUSH == 0 {
            return Err(NbdError::FlushUnsupported {
                export: self.export.clone(),
                peer: self.peer.clone(),
            });
        }
        self.request(CMD_FLUSH, 0, 0, &[], None)
    }

    /// Sends `DISC` (ignoring failures) and closes the connection; a second
    /// call does nothing.
    pub fn close(&mut self) {
        if let State::Open(stream) = &mut self.state {
            self.handle = self.handle.wrapping_add(1);
            let mut head = [0u8; 28];
            head[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
            head[6..8].copy_from_slice(&CMD_DISC.to_be_bytes());
            head[8..16].copy_from_slice(&self.handle.to_be_bytes());
            let _ = send_all(stream, &[&head]);
        }
        self.state = State::Closed;
    }
}

fn command_name(cmd: u16) -> &'static str {
    match cmd {
        CMD_READ => "READ",
        CMD_WRITE => "WRITE",
        CMD_DISC => "DISC",
        CMD_FLUSH => "FLUSH",
        CMD_WRITE_ZEROES => "WRITE_ZEROES",
        _ => "command",
    }
}
