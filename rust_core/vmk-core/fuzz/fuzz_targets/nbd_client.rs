//! Server bytes into the NBD client: the handshake and the reply parser
//! never panic and never allocate more than their bounds; every call ends in
//! a value or an `NbdError`, and after a failure that breaks the stream every
//! later call is refused with `ENOTCONN`. The first input byte picks a mode:
//! bit 0 puts a valid handshake (with flags and block size from the other
//! bits) before the rest, so that the transmission replies are reached.
//! Run: `cargo +nightly fuzz run nbd_client` in this directory.
#![no_main]

use std::io::{self, Read, Write};

use libfuzzer_sys::fuzz_target;
use vmk_core::nbd::{self, errno, Client, NbdError};

/// A server that sends `input` and then hangs up; what the client sends is dropped.
struct Server<'a> {
    input: &'a [u8],
}

impl Read for Server<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = buf.len().min(self.input.len());
        let (head, tail) = self.input.split_at(n);
        buf[..n].copy_from_slice(head);
        self.input = tail;
        Ok(n)
    }
}

impl Write for Server<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn option_reply(out: &mut Vec<u8>, rtype: u32, payload: &[u8]) {
    out.extend_from_slice(&nbd::REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&nbd::OPT_GO.to_be_bytes());
    out.extend_from_slice(&rtype.to_be_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
}

fn valid_handshake(mode: u8) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&nbd::NBDMAGIC.to_be_bytes());
    out.extend_from_slice(&nbd::IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&nbd::FLAG_FIXED_NEWSTYLE.to_be_bytes());
    let mut flags = nbd::TF_HAS_FLAGS;
    if mode & 2 != 0 {
        flags |= nbd::TF_SEND_FLUSH;
    }
    if mode & 4 != 0 {
        flags |= nbd::TF_SEND_WRITE_ZEROES;
    }
    let mut info = nbd::INFO_EXPORT.to_be_bytes().to_vec();
    info.extend_from_slice(&(1u64 << 20).to_be_bytes());
    info.extend_from_slice(&flags.to_be_bytes());
    option_reply(&mut out, nbd::REP_INFO, &info);
    let maximum: u32 = if mode & 8 != 0 { 4096 } else { 32 << 20 };
    let mut block = nbd::INFO_BLOCK_SIZE.to_be_bytes().to_vec();
    for v in [1u32, 4096, maximum] {
        block.extend_from_slice(&v.to_be_bytes());
    }
    option_reply(&mut out, nbd::REP_INFO, &block);
    option_reply(&mut out, nbd::REP_ACK, &[]);
    out
}

fn breaks_stream(err: &NbdError) -> bool {
    matches!(
        err,
        NbdError::Protocol(_)
            | NbdError::Refused { .. }
            | NbdError::Closed { .. }
            | NbdError::Timeout { .. }
            | NbdError::Io { .. }
    )
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let stream = if mode & 1 != 0 {
        [valid_handshake(mode), rest.to_vec()].concat()
    } else {
        rest.to_vec()
    };
    let client = Client::handshake(Server { input: &stream }, "fuzz.sock", "unit", None);
    let mut client = match client {
        Ok(client) => client,
        Err(err) => {
            assert!(err.errno() != 0 && !err.to_string().is_empty());
            return;
        }
    };
    assert!((nbd::MIN_PAYLOAD..=nbd::MAX_PAYLOAD).contains(&client.max_payload()));
    assert!(client.transmission_flags() & nbd::TF_HAS_FLAGS != 0);
    if mode & 16 != 0 {
        assert!(client.set_max_payload(4096).is_ok());
    }
    let mut buf = vec![0u8; 10_000];
    let (a, b) = buf.split_at_mut(5000);
    let results = [
        client.read_into(a, 0),
        client.write(&[&b[..10], &b[10..]], 100),
        client.write_zeroes(1 << 19, 9000),
        client.flush(),
        client.read_into(&mut b[..1], 0),
    ];
    let mut broken = false;
    for result in results {
        if broken {
            assert!(matches!(result, Err(NbdError::NotConnected { .. })));
            assert_eq!(
                result.as_ref().err().map(NbdError::errno),
                Some(errno::ENOTCONN)
            );
        }
        if let Err(err) = &result {
            assert!(err.errno() != 0 && !err.to_string().is_empty());
            broken |= breaks_stream(err);
        }
    }
    assert_eq!(client.is_connected(), !broken);
    client.close();
    assert!(!client.is_connected());
});
