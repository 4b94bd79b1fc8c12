//! Property-based fuzzing of everything a client (or a foreign publisher on the
//! bus) can hand the relay: the client-frame decoder, room-id and user-name
//! validation, and the bus-event decoder. The invariant is "never panics, and
//! whatever is accepted is within the documented limits".
//!
//! CI runs the default budget; `scripts/fuzz.sh` runs a large one
//! (`PROPTEST_CASES=…`) and prints how many inputs were tried.

use chat_relay::protocol::{
    BusEvent, ClientFrame, MAX_CID, MAX_ROOM_NAME, MAX_SINCE, RoomId, decode_client_frame,
    error_frame, valid_user,
};
use proptest::prelude::*;
use serde_json::{Value, json};

const MAX_TEXT: usize = 256;

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4000)
}

/// Arbitrary JSON values, biased towards the protocol's own keys and values.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>().prop_map(|f| json!(f)),
        ".{0,40}".prop_map(Value::String),
        prop_oneof![
            Just("join"),
            Just("leave"),
            Just("send"),
            Just("chat.lobby"),
            Just("ai.quest"),
            Just("chat."),
            Just(""),
            Just(" "),
        ]
        .prop_map(|s| Value::String(s.into())),
        "(chat|ai|x)\\.[A-Za-z0-9_\\-. /]{0,70}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::vec(
                (
                    prop_oneof![
                        Just("type".to_string()),
                        Just("room".to_string()),
                        Just("text".to_string()),
                        Just("since".to_string()),
                        Just("cid".to_string()),
                        ".{0,8}".prop_map(String::from),
                    ],
                    inner
                ),
                0..6
            )
            .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

fn check_decoded(raw: &str) {
    match decode_client_frame(raw, MAX_TEXT) {
        Ok(ClientFrame::Send { room, text, cid }) => {
            assert!(!text.trim().is_empty() && text.len() <= MAX_TEXT);
            assert!(cid.is_none_or(|c| c.len() <= MAX_CID.max(24)));
            assert_eq!(RoomId::parse(room.as_str()).as_ref(), Some(&room));
        }
        Ok(ClientFrame::Join { room, since, .. }) => {
            assert!(since.is_none_or(|s| !s.is_empty() && s.len() <= MAX_SINCE));
            assert!(room.name().len() <= MAX_ROOM_NAME);
        }
        Ok(ClientFrame::Leave { room }) => assert!(RoomId::parse(room.as_str()).is_some()),
        Err(e) => {
            // The error frame we would send back is valid JSON.
            let frame = error_frame(e.code, &e.message, e.cid.as_deref());
            let v: Value = serde_json::from_str(&frame).expect("error frame is JSON");
            assert_eq!(v["type"], "error");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn decoder_never_panics_on_bytes(raw in ".{0,300}") {
        check_decoded(&raw);
    }

    #[test]
    fn decoder_never_panics_on_json(v in json_value()) {
        check_decoded(&v.to_string());
    }

    #[test]
    fn room_ids_are_exactly_the_documented_ones(s in "(chat|ai|CHAT|x|)[.]?[A-Za-z0-9_\\-.é /]{0,70}") {
        let ok = RoomId::parse(&s).is_some();
        let expected = s
            .split_once('.')
            .filter(|(k, _)| *k == "chat" || *k == "ai")
            .is_some_and(|(_, n)| {
                !n.is_empty()
                    && n.len() <= MAX_ROOM_NAME
                    && n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            });
        prop_assert_eq!(ok, expected, "{:?}", s);
    }

    #[test]
    fn user_names_never_panic(s in ".{0,80}") {
        let ok = valid_user(&s);
        if ok {
            prop_assert!(s.chars().count() <= 32 && !s.chars().any(char::is_control));
        }
    }

    #[test]
    fn bus_events_from_strangers_never_panic(v in json_value(), raw in ".{0,120}") {
        // What another publisher on a shared broker could send.
        let _ = serde_json::from_slice::<BusEvent>(v.to_string().as_bytes());
        let _ = serde_json::from_slice::<BusEvent>(raw.as_bytes());
    }
}

/// Prints the budget so a fuzz run's log records how many inputs were tried.
#[test]
fn budget() {
    let n = cases();
    println!(
        "proptest budget: {n} cases per property, 5 properties, {} inputs in all",
        5 * n as u64
    );
}
