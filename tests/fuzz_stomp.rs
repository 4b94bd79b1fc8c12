//! Property-based fuzzing of the STOMP decoder, like `fuzz_protocol.rs` for
//! the native one: whatever bytes a client sends, split however its
//! WebSocket messages fall, the decoder never panics, never buffers more
//! than a frame's limit plus one message, and decodes what the encoder
//! wrote to the same frames wherever the stream is cut.
//!
//! `PROPTEST_CASES=…` raises the budget (`scripts/fuzz.sh`).

use chat_relay::gateway::stomp::frame::{Command, DecodeLimits, Decoder, Frame, encode};
use proptest::prelude::*;

const LIMITS: DecodeLimits = DecodeLimits {
    max_frame: 2048,
    max_headers: 16,
    max_header_line: 256,
};

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3000)
}

/// Bytes biased towards STOMP's own syntax.
fn stompish() -> impl Strategy<Value = Vec<u8>> {
    let piece = prop_oneof![
        Just(b"SEND\n".to_vec()),
        Just(b"CONNECT\n".to_vec()),
        Just(b"SUBSCRIBE\n".to_vec()),
        Just(b"content-length:".to_vec()),
        Just(b"destination:/pub/chat/message\n".to_vec()),
        Just(b"\n".to_vec()),
        Just(b"\r\n".to_vec()),
        Just(b"\0".to_vec()),
        Just(b":".to_vec()),
        Just(b"\\".to_vec()),
        Just(b"\\c".to_vec()),
        "[0-9]{1,6}".prop_map(String::into_bytes),
        proptest::collection::vec(any::<u8>(), 0..40),
    ];
    proptest::collection::vec(piece, 0..40).prop_map(|v| v.concat())
}

/// Feeds `bytes` in chunks cut at `cuts`; returns the frames, or the error
/// that ended the stream. Checks the buffer bound after every chunk.
fn feed(bytes: &[u8], cuts: &[usize]) -> (Vec<Frame>, bool) {
    let mut d = Decoder::new(LIMITS);
    let mut out = Vec::new();
    let mut at = 0;
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
    points.push(bytes.len());
    points.sort_unstable();
    for p in points {
        let chunk = &bytes[at..p];
        at = p;
        d.extend(chunk);
        loop {
            match d.next_frame() {
                Ok(Some(f)) => out.push(f),
                Ok(None) => break,
                Err(_) => return (out, true),
            }
        }
        assert!(
            d.buffered() <= LIMITS.max_frame + chunk.len(),
            "buffered {} after a {}-byte chunk",
            d.buffered(),
            chunk.len()
        );
    }
    (out, false)
}

fn header() -> impl Strategy<Value = (String, String)> {
    ("[a-z][a-z\\-]{0,12}", "(?s).{0,40}")
        .prop_filter("content-length is the encoder's", |(k, _)| {
            k != "content-length"
        })
}

fn client_frame() -> impl Strategy<Value = (Command, Vec<(String, String)>, String)> {
    (
        prop_oneof![
            Just(Command::Send),
            Just(Command::Subscribe),
            Just(Command::Unsubscribe),
            Just(Command::Ack),
            Just(Command::Disconnect),
        ],
        proptest::collection::vec(header(), 0..6),
        "(?s).{0,200}",
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    #[test]
    fn arbitrary_bytes_never_panic_and_stay_bounded(
        bytes in stompish(),
        cuts in proptest::collection::vec(any::<usize>(), 0..8),
    ) {
        let (frames, _) = feed(&bytes, &cuts);
        for f in frames {
            prop_assert!(f.headers.len() <= LIMITS.max_headers);
            prop_assert!(f.body.len() < LIMITS.max_frame);
        }
    }

    #[test]
    fn encoded_frames_decode_the_same_wherever_the_stream_is_cut(
        frames in proptest::collection::vec(client_frame(), 1..5),
        beats in proptest::collection::vec(0usize..3, 5),
        cuts in proptest::collection::vec(any::<usize>(), 0..10),
    ) {
        let mut wire = Vec::new();
        for (i, (c, h, b)) in frames.iter().enumerate() {
            let h: Vec<(&str, &str)> = h.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            wire.extend_from_slice(encode(*c, &h, b).as_bytes());
            // Heart-beats between frames.
            wire.extend(std::iter::repeat_n(b'\n', beats[i % beats.len()]));
        }
        prop_assume!(frames.iter().all(|(_, h, b)| {
            encode(Command::Send, &h.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect::<Vec<_>>(), b).len() < LIMITS.max_frame
                && h.iter().all(|(k, v)| k.len() + 2 * v.len() + 2 < LIMITS.max_header_line)
        }));
        let (got, failed) = feed(&wire, &cuts);
        prop_assert!(!failed, "a valid stream was refused");
        prop_assert_eq!(got.len(), frames.len());
        for (g, (c, h, b)) in got.iter().zip(&frames) {
            prop_assert_eq!(g.command, *c);
            prop_assert_eq!(&g.body, b.as_bytes());
            for (k, v) in h {
                // First occurrence wins.
                let first = h.iter().find(|(k2, _)| k2 == k).map(|(_, v)| v.as_str());
                prop_assert_eq!(g.header(k), first, "header {} = {:?}", k, v);
            }
        }
    }
}
