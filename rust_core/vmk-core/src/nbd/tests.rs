//! Unit tests of the NBD client over scripted streams; the Python suites run it against qemu-nbd.
#![allow(clippy::unwrap_used, clippy::panic)]

use std::io::{self, Read, Write};
use std::os::unix::net::UnixListener;

use super::*;

/// A scripted server: reads come from `input`, writes are recorded.
struct Script {
    input: io::Cursor<Vec<u8>>,
    sent: Vec<u8>,
}

impl Read for Script {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.input.read(buf)
    }
}

impl Write for Script {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.sent.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn script(parts: &[Vec<u8>]) -> Script {
    Script {
        input: io::Cursor::new(parts.concat()),
        sent: Vec::new(),
    }
}

fn greeting() -> Vec<u8> {
    [
        &NBDMAGIC.to_be_bytes()[..],
        &IHAVEOPT.to_be_bytes(),
        &FLAG_FIXED_NEWSTYLE.to_be_bytes(),
    ]
    .concat()
}

fn option_reply(rtype: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    [
        &REPLY_MAGIC.to_be_bytes()[..],
        &OPT_GO.to_be_bytes(),
        &rtype.to_be_bytes(),
        &len.to_be_bytes(),
        payload,
    ]
    .concat()
}

fn info_export(size: u64, flags: u16) -> Vec<u8> {
    let payload = [
        &INFO_EXPORT.to_be_bytes()[..],
        &size.to_be_bytes(),
        &flags.to_be_bytes(),
    ]
    .concat();
    option_reply(REP_INFO, &payload)
}

fn info_block(maximum: u32) -> Vec<u8> {
    let payload = [
        &INFO_BLOCK_SIZE.to_be_bytes()[..],
        &1u32.to_be_bytes(),
        &4096u32.to_be_bytes(),
        &maximum.to_be_bytes(),
    ]
    .concat();
    option_reply(REP_INFO, &payload)
}

fn simple_reply(error: u32, handle: u64) -> Vec<u8> {
    [
        &SIMPLE_REPLY_MAGIC.to_be_bytes()[..],
        &error.to_be_bytes(),
        &handle.to_be_bytes(),
    ]
    .concat()
}

const FLAGS: u16 = TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_WRITE_ZEROES;

fn handshake_parts(flags: u16, maximum: u32) -> Vec<Vec<u8>> {
    vec![
        greeting(),
        info_export(1 << 20, flags),
        info_block(maximum),
        option_reply(REP_ACK, &[]),
    ]
}

/// Bytes the client sends in the handshake for export "unit".
const HANDSHAKE_SENT: usize = 4 + 16 + 4 + 4 + 4;

fn open(mut parts: Vec<Vec<u8>>, more: &[Vec<u8>]) -> Client<Script> {
    parts.extend_from_slice(more);
    match Client::handshake(script(&parts), "test.sock", "unit", None) {
        Ok(c) => c,
        Err(e) => panic!("handshake failed: {e}"),
    }
}

fn stream(client: &Client<Script>) -> &Script {
    match &client.state {
        State::Open(s) => s,
        State::Closed | State::Dropped(_) => panic!("connection not open"),
    }
}

/// The requests in `sent` after the handshake: (command, handle, offset, length, payload length).
fn requests(sent: &[u8]) -> Vec<(u16, u64, u64, u32)> {
    let mut out = Vec::new();
    let mut at = HANDSHAKE_SENT;
    while at + 28 <= sent.len() {
        assert_eq!(be_u32(sent, at), REQUEST_MAGIC);
        let cmd = be_u16(sent, at + 6);
        let len = be_u32(sent, at + 24);
        out.push((cmd, be_u64(sent, at + 8), be_u64(sent, at + 16), len));
        at += 28 + if cmd == CMD_WRITE { len as usize } else { 0 };
    }
    assert_eq!(at, sent.len());
    out
}

#[test]
fn magics_spell_the_protocol() {
    assert_eq!(&NBDMAGIC.to_be_bytes(), b"NBDMAGIC");
    assert_eq!(&IHAVEOPT.to_be_bytes(), b"IHAVEOPT");
    assert_eq!(REPLY_MAGIC, 0x0003_e889_0455_65a9);
    assert_eq!(REQUEST_MAGIC, 0x2560_9513);
    assert_eq!(SIMPLE_REPLY_MAGIC, 0x6744_6698);
}

#[test]
fn handshake_reads_export_and_block_size() {
    let client = open(handshake_parts(FLAGS, 1 << 20), &[]);
    assert_eq!(client.size(), 1 << 20);
    assert_eq!(client.transmission_flags(), FLAGS);
    assert_eq!(client.max_payload(), 1 << 20);
    let sent = &stream(&client).sent;
    assert_eq!(sent.len(), HANDSHAKE_SENT);
    assert_eq!(be_u32(sent, 0), u32::from(FLAG_FIXED_NEWSTYLE));
    assert_eq!(be_u64(sent, 4), IHAVEOPT);
    assert_eq!(be_u32(sent, 12), OPT_GO);
    assert_eq!(be_u32(sent, 16), 4 + 4 + 4);
    assert_eq!(be_u32(sent, 20), 4);
    assert_eq!(&sent[24..28], b"unit");
    assert_eq!(be_u16(sent, 28), 1);
    assert_eq!(be_u16(sent, 30), INFO_BLOCK_SIZE);
}

#[test]
fn block_size_is_clamped() {
    assert_eq!(open(handshake_parts(FLAGS, 1), &[]).max_payload(), 4096);
    assert_eq!(
        open(handshake_parts(FLAGS, u32::MAX), &[]).max_payload(),
        32 << 20
    );
}

fn handshake_err(parts: &[Vec<u8>]) -> NbdError {
    match Client::handshake(script(parts), "test.sock", "unit", None) {
        Ok(_) => panic!("handshake accepted a bad stream"),
        Err(e) => e,
    }
}

#[test]
fn handshake_refusals() {
    let err = handshake_err(&[b"SSH-2.0-OpenSSH_9.2\r\n".to_vec(), vec![0; 40]]);
    assert_eq!(err.errno(), errno::EPROTO);
    assert!(err
        .to_string()
        .starts_with("NBD protocol error: greeting 0x5353"));

    let mut old = greeting();
    old[17] = 0;
    let err = handshake_err(&[old]);
    assert_eq!(
        err.to_string(),
        "NBD protocol error: handshake flags 0x0 lack FIXED_NEWSTYLE"
    );

    let err = handshake_err(&[greeting(), option_reply(REP_ERR_BIT | 1, b"no such export")]);
    assert_eq!(err.errno(), errno::ENOENT);
    assert_eq!(
        err.to_string(),
        "NBD export unit refused (0x80000001): no such export"
    );

    let err = handshake_err(&[greeting(), info_export(1, FLAGS)[..20].to_vec()]);
    assert_eq!(err.errno(), errno::ESHUTDOWN);

    let mut short = option_reply(REP_INFO, &[0, 0, 1, 2, 3]);
    short.truncate(25);
    let err = handshake_err(&[greeting(), short]);
    assert_eq!(
        err.to_string(),
        "NBD protocol error: NBD_INFO_EXPORT of 5 bytes, expected 12"
    );

    let err = handshake_err(&[greeting(), option_reply(REP_INFO, &[0, 3, 0, 0])]);
    assert!(err.to_string().contains("NBD_INFO_BLOCK_SIZE of 4 bytes"));

    let err = handshake_err(&[greeting(), option_reply(REP_ACK, &[])]);
    assert_eq!(
        err.to_string(),
        "NBD protocol error: export information missing"
    );
}

#[test]
fn server_lengths_are_bounded_before_reading() {
    // A huge option reply length is refused from the header alone.
    let mut huge = option_reply(REP_INFO, &[]);
    huge[16..20].copy_from_slice(&0xFFFF_FFF0u32.to_be_bytes());
    let err = handshake_err(&[greeting(), huge]);
    assert_eq!(
        err.to_string(),
        "NBD protocol error: option reply of 4294967280 bytes (at most 65536)"
    );
    // 64 replies without an acknowledgement end the handshake.
    let mut parts = vec![greeting()];
    parts.extend((0..MAX_OPTION_REPLIES).map(|_| option_reply(REP_INFO, &[0, 9])));
    parts.push(option_reply(REP_ACK, &[]));
    let err = handshake_err(&parts);
    assert_eq!(
        err.to_string(),
        "NBD protocol error: no NBD_REP_ACK after 64 option replies"
    );
    // Unknown information and non-error reply types are skipped.
    let mut parts = handshake_parts(FLAGS, 1 << 20);
    parts.insert(1, option_reply(REP_INFO, &[0, 9, 1, 2]));
    parts.insert(1, option_reply(5, b"x"));
    assert_eq!(open(parts, &[]).size(), 1 << 20);
}

#[test]
fn reads_and_writes_are_split_at_max_payload() {
    let mut replies = Vec::new();
    for h in 1..=3u64 {
        replies.push(simple_reply(0, h));
        replies.push(vec![h as u8; if h < 3 { 4096 } else { 1000 }]);
    }
    for h in 4..=6u64 {
        replies.push(simple_reply(0, h));
    }
    let mut client = open(handshake_parts(FLAGS, 4096), &replies);
    let mut buf = vec![0u8; 2 * 4096 + 1000];
    assert_eq!(client.read_into(&mut buf, 100), Ok(()));
    assert!(buf[..4096].iter().all(|&b| b == 1));
    assert!(buf[4096..8192].iter().all(|&b| b == 2));
    assert!(buf[8192..].iter().all(|&b| b == 3));
    let data: Vec<u8> = (0..9000u32).map(|i| i as u8).collect();
    assert_eq!(client.write(&[&data[..10], &[], &data[10..]], 7), Ok(()));
    let sent = stream(&client).sent.clone();
    assert_eq!(
        requests(&sent),
        vec![
            (CMD_READ, 1, 100, 4096),
            (CMD_READ, 2, 4196, 4096),
            (CMD_READ, 3, 8292, 1000),
            (CMD_WRITE, 4, 7, 4096),
            (CMD_WRITE, 5, 4103, 4096),
            (CMD_WRITE, 6, 8199, 808),
        ]
    );
    // The payloads are the data, in order.
    let mut payload = Vec::new();
    let mut at = HANDSHAKE_SENT + 3 * 28;
    for len in [4096usize, 4096, 808] {
        payload.extend_from_slice(&sent[at + 28..at + 28 + len]);
        at += 28 + len;
    }
    assert_eq!(payload, data);
}

#[test]
fn server_errors_keep_the_session() {
    let replies = [simple_reply(28, 1), simple_reply(0, 2), vec![7; 4]];
    let mut client = open(handshake_parts(FLAGS, 1 << 20), &replies);
    let err = client.write(&[b"abcd"], 5);
    assert_eq!(
        err.as_ref().map_err(NbdError::errno),
        Err(28),
        "ENOSPC from the server"
    );
    assert!(err
        .unwrap_err()
        .to_string()
        .starts_with("NBD server at test.sock: WRITE of 4 bytes at offset 5 failed: "));
    let mut buf = [0u8; 4];
    assert_eq!(client.read_into(&mut buf, 0), Ok(()));
    assert_eq!(buf, [7; 4]);
}

#[test]
fn a_bad_reply_drops_the_connection() {
    let replies = [simple_reply(0, 2)];
    let mut client = open(handshake_parts(FLAGS, 1 << 20), &replies);
    let err = client.flush();
    assert_eq!(
        err,
        Err(NbdError::Protocol(
            "reply magic 0x67446698 handle 2, expected handle 1".to_owned()
        ))
    );
    assert!(!client.is_connected());
    let err = client.read_into(&mut [0u8; 4], 0);
    assert_eq!(err.as_ref().map_err(NbdError::errno), Err(errno::ENOTCONN));
    assert_eq!(
        err.map_err(|e| e.to_string()),
        Err("NBD connection to test.sock was dropped after an error (errno 71)".to_owned())
    );
    // A truncated reply is the server going away.
    let mut client = open(handshake_parts(FLAGS, 1 << 20), &[simple_reply(0, 1)]);
    let err = client.read_into(&mut [0u8; 4], 0);
    assert_eq!(err.as_ref().map_err(NbdError::errno), Err(errno::ESHUTDOWN));
}

#[test]
fn zeroes_fall_back_to_writes_and_flush_needs_the_flag() {
    let replies: Vec<Vec<u8>> = (1..=3).map(|h| simple_reply(0, h)).collect();
    let mut client = open(handshake_parts(TF_HAS_FLAGS, 4096), &replies);
    assert_eq!(client.write_zeroes(10, 4096 + 50), Ok(()));
    assert_eq!(client.write_zeroes(0, 0), Ok(()));
    let err = client.flush();
    assert_eq!(err.as_ref().map_err(NbdError::errno), Err(errno::ENOTSUP));
    assert!(client.is_connected());
    let sent = stream(&client).sent.clone();
    assert_eq!(
        requests(&sent),
        vec![(CMD_WRITE, 1, 10, 4096), (CMD_WRITE, 2, 4106, 50)]
    );
    assert!(sent[HANDSHAKE_SENT..]
        .chunks(1)
        .skip(28)
        .take(4096)
        .all(|b| b == [0]));

    let mut client = open(handshake_parts(FLAGS, 4096), &replies);
    assert_eq!(client.write_zeroes(1 << 32, 3 << 30), Ok(()));
    assert_eq!(client.flush(), Ok(()));
    assert_eq!(
        requests(&stream(&client).sent),
        vec![
            (CMD_WRITE_ZEROES, 1, 1 << 32, 1 << 31),
            (CMD_WRITE_ZEROES, 2, (1 << 32) + (1 << 31), 1 << 30),
            (CMD_FLUSH, 3, 0, 0),
        ]
    );
}

#[test]
fn close_sends_disc_and_refuses_later_calls() {
    let mut client = open(handshake_parts(FLAGS, 4096), &[]);
    client.close();
    client.close();
    assert!(!client.is_connected());
    let err = client.flush();
    assert_eq!(
        err.map_err(|e| e.to_string()),
        Err("NBD connection to test.sock is closed".to_owned())
    );
}

#[test]
fn arguments_are_checked() {
    let mut client = open(handshake_parts(FLAGS, 4096), &[]);
    let err = client.write_zeroes(u64::MAX, 2);
    assert_eq!(err.as_ref().map_err(NbdError::errno), Err(errno::EINVAL));
    assert!(client.is_connected());
    assert!(client.set_max_payload(100).is_err());
    assert!(client.set_max_payload(1 << 40).is_err());
    assert_eq!(client.set_max_payload(8192), Ok(()));
    assert_eq!(client.max_payload(), 8192);
    let long = "x".repeat(MAX_EXPORT_NAME + 1);
    assert!(matches!(
        Client::handshake(script(&[]), "t", &long, None),
        Err(NbdError::Invalid {
            thing: "export",
            ..
        })
    ));
}

#[test]
fn socket_errors_and_timeouts() {
    let dir = std::env::temp_dir().join(format!("vmk-nbd-test-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join("silent.sock");
    let _ = std::fs::remove_file(&path);
    let path_str = path.to_string_lossy().into_owned();

    let missing = connect(&format!("{path_str}.missing"), "unit", 1.0);
    let err = missing.err().map(|e| (e.errno(), e.to_string()));
    assert_eq!(
        err,
        Some((
            errno::ENOENT,
            format!(
                "cannot connect to NBD server at {path_str}.missing: No such file or directory"
            )
        ))
    );
    assert!(connect(&path_str, "unit", 0.0).is_err());
    assert!(connect(&path_str, "unit", f64::NAN).is_err());

    // A server that accepts and never speaks: the handshake times out.
    let listener = match UnixListener::bind(&path) {
        Ok(l) => l,
        Err(e) => panic!("bind {path_str}: {e}"),
    };
    let err = connect(&path_str, "unit", 0.2).err();
    assert_eq!(
        err.map(|e| (e.errno(), e.to_string())),
        Some((
            errno::ETIMEDOUT,
            format!("NBD server at {path_str} stalled for 0.2 s (the timeout)")
        ))
    );
    drop(listener);
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_dir(&dir);
}
