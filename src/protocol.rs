//! The wire protocol, in one place: room ids, client frames, server frames and
//! error codes. External clients and the k6 load tests depend on these names,
//! so they change only together with the README's protocol section.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// Longest room name after the `chat.`/`ai.` prefix.
pub const MAX_ROOM_NAME: usize = 64;
/// Longest user name, in characters.
pub const MAX_USER_NAME: usize = 32;

/// A validated room id: `chat.<name>` (player room) or `ai.<name>` (AI-game room),
/// `<name>` being 1–64 characters of `[A-Za-z0-9_-]`.
///
/// Cheap to clone (`Arc<str>`) because it is copied into every delivery.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RoomId(Arc<str>);

/// The two kinds of room the original design has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RoomKind {
    /// `chat.<name>`: players talking to players.
    Chat,
    /// `ai.<name>`: an AI-game room.
    Ai,
}

impl RoomId {
    /// Validates and builds a room id; `None` for anything that is not a valid id.
    pub fn parse(s: &str) -> Option<RoomId> {
        let (_, name) = split_room(s)?;
        if name.is_empty()
            || name.len() > MAX_ROOM_NAME
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return None;
        }
        Some(RoomId(Arc::from(s)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn kind(&self) -> RoomKind {
        if self.0.starts_with("ai.") {
            RoomKind::Ai
        } else {
            RoomKind::Chat
        }
    }

    /// The part after `chat.` / `ai.`.
    pub fn name(&self) -> &str {
        split_room(&self.0).map(|(_, n)| n).unwrap_or_default()
    }
}

fn split_room(s: &str) -> Option<(RoomKind, &str)> {
    if let Some(n) = s.strip_prefix("chat.") {
        Some((RoomKind::Chat, n))
    } else {
        s.strip_prefix("ai.").map(|n| (RoomKind::Ai, n))
    }
}

impl fmt::Display for RoomId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for RoomId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RoomId({})", self.0)
    }
}

impl Serialize for RoomId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for RoomId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        RoomId::parse(&s).ok_or_else(|| serde::de::Error::custom("invalid room id"))
    }
}

/// Validates a user name: 1–32 characters, no control characters, not all whitespace.
pub fn valid_user(name: &str) -> bool {
    let n = name.chars().count();
    (1..=MAX_USER_NAME).contains(&n)
        && !name.chars().any(char::is_control)
        && !name.trim().is_empty()
}

/// Frames a client sends. Decoded by [`decode_client_frame`], which maps every
/// failure onto a precise [`ErrorCode`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientFrame {
    Join {
        room: RoomId,
        /// The last message id the client saw in this room.
        since: Option<String>,
        /// The room position (`seq`) of that message, with the `epoch` the
        /// server reported in `joined`: the cursor recovery proves gaps with.
        since_seq: Option<i64>,
        epoch: Option<String>,
    },
    Leave {
        room: RoomId,
    },
    Send {
        room: RoomId,
        text: String,
        cid: Option<String>,
    },
}

/// Loose shape used for decoding, so that we can tell "unknown type" from
/// "missing field" from "bad room" instead of a single serde error.
#[derive(Deserialize)]
struct RawFrame {
    #[serde(rename = "type")]
    kind: Option<String>,
    room: Option<String>,
    since: Option<String>,
    since_seq: Option<serde_json::Value>,
    epoch: Option<String>,
    text: Option<String>,
    cid: Option<serde_json::Value>,
}

/// A decoding failure: the code to send back, a human message and the `cid`
/// (when the frame carried one) so the client can match the error to its send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameError {
    pub code: ErrorCode,
    pub message: String,
    pub cid: Option<String>,
}

/// Longest client-chosen id echoed back in `ack`/`error`.
pub const MAX_CID: usize = 128;
/// Longest `since` id accepted (ULIDs are 26 characters).
pub const MAX_SINCE: usize = 64;

/// Decodes one client text frame. `max_text` is the limit on `text` in bytes.
pub fn decode_client_frame(raw: &str, max_text: usize) -> Result<ClientFrame, FrameError> {
    let err = |code, message: &str, cid: Option<String>| FrameError {
        code,
        message: message.to_string(),
        cid,
    };
    let f: RawFrame = serde_json::from_str(raw).map_err(|e| {
        if e.is_data() {
            err(ErrorCode::BadFrame, "frame must be a JSON object", None)
        } else {
            err(ErrorCode::InvalidJson, "frame is not valid JSON", None)
        }
    })?;
    let cid = match f.cid {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(s)) if s.len() <= MAX_CID => Some(s),
        Some(serde_json::Value::Number(n)) => Some(n.to_string()),
        Some(_) => {
            return Err(err(
                ErrorCode::BadFrame,
                "cid must be a string of at most 128 bytes",
                None,
            ));
        }
    };
    let kind = f
        .kind
        .ok_or_else(|| err(ErrorCode::MissingField, "missing field `type`", cid.clone()))?;
    let room = |cid: &Option<String>| -> Result<RoomId, FrameError> {
        let r = f
            .room
            .as_deref()
            .ok_or_else(|| err(ErrorCode::MissingField, "missing field `room`", cid.clone()))?;
        RoomId::parse(r).ok_or_else(|| {
            err(
                ErrorCode::BadRoom,
                "room must be chat.<name> or ai.<name>, name 1-64 chars of [A-Za-z0-9_-]",
                cid.clone(),
            )
        })
    };
    match kind.as_str() {
        "join" => {
            let room = room(&cid)?;
            let since = f.since.filter(|s| !s.is_empty());
            if since.as_ref().is_some_and(|s| s.len() > MAX_SINCE) {
                return Err(err(ErrorCode::BadFrame, "since is too long", cid));
            }
            let since_seq = match f.since_seq {
                None | Some(serde_json::Value::Null) => None,
                Some(v) => match v.as_i64() {
                    Some(n) if n >= 0 => Some(n),
                    _ => {
                        return Err(err(
                            ErrorCode::BadFrame,
                            "since_seq must be a non-negative integer",
                            cid,
                        ));
                    }
                },
            };
            let epoch = f.epoch.filter(|e| !e.is_empty());
            if epoch.as_ref().is_some_and(|e| e.len() > MAX_SINCE) {
                return Err(err(ErrorCode::BadFrame, "epoch is too long", cid));
            }
            Ok(ClientFrame::Join {
                room,
                since,
                since_seq,
                epoch,
            })
        }
        "leave" => Ok(ClientFrame::Leave { room: room(&cid)? }),
        "send" => {
            let room = room(&cid)?;
            let text = f
                .text
                .ok_or_else(|| err(ErrorCode::MissingField, "missing field `text`", cid.clone()))?;
            if text.trim().is_empty() {
                return Err(err(ErrorCode::EmptyText, "text is empty", cid));
            }
            if text.len() > max_text {
                return Err(FrameError {
                    code: ErrorCode::TextTooLong,
                    message: format!("text is longer than {max_text} bytes"),
                    cid,
                });
            }
            Ok(ClientFrame::Send { room, text, cid })
        }
        _ => Err(err(
            ErrorCode::UnknownType,
            "type must be join, leave or send",
            cid,
        )),
    }
}

/// Machine-readable error codes carried by `error` frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    InvalidJson,
    BadFrame,
    UnknownType,
    MissingField,
    BadRoom,
    EmptyText,
    TextTooLong,
    BinaryNotSupported,
    NotJoined,
    RateLimited,
    BusUnavailable,
    Forbidden,
    TooManyRooms,
    RoomFull,
    Internal,
    // Refusals answered as HTTP statuses (upgrade, history, POST, stats).
    Unauthorized,
    ForbiddenOrigin,
    TooManyConnections,
    ShuttingDown,
    BadLimit,
    DbUnavailable,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidJson => "invalid_json",
            ErrorCode::BadFrame => "bad_frame",
            ErrorCode::UnknownType => "unknown_type",
            ErrorCode::MissingField => "missing_field",
            ErrorCode::BadRoom => "bad_room",
            ErrorCode::EmptyText => "empty_text",
            ErrorCode::TextTooLong => "text_too_long",
            ErrorCode::BinaryNotSupported => "binary_not_supported",
            ErrorCode::NotJoined => "not_joined",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::BusUnavailable => "bus_unavailable",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::TooManyRooms => "too_many_rooms",
            ErrorCode::RoomFull => "room_full",
            ErrorCode::Internal => "internal",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::ForbiddenOrigin => "forbidden_origin",
            ErrorCode::TooManyConnections => "too_many_connections",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::BadLimit => "bad_limit",
            ErrorCode::DbUnavailable => "db_unavailable",
        }
    }
}

/// `kind` of a chat message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MessageKind {
    Chat,
    System,
}

impl MessageKind {
    pub fn as_str(self) -> &'static str {
        match self {
            MessageKind::Chat => "chat",
            MessageKind::System => "system",
        }
    }
    pub fn parse(s: &str) -> MessageKind {
        if s == "system" {
            MessageKind::System
        } else {
            MessageKind::Chat
        }
    }
}

/// A chat message as stored and relayed. Its JSON form (with `"type":"message"`)
/// is exactly what travels on the bus and what clients receive, so an instance
/// forwards bus payloads to sockets without re-serialising them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub room: RoomId,
    pub id: String,
    pub user: String,
    pub text: String,
    pub ts: i64,
    pub kind: MessageKind,
    /// The message's position in its room (see `Store::next_seq`): ordered
    /// per room across instances; absent on rows stored before cursors existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<i64>,
}

/// `join` / `leave` in a presence event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PresenceEvent {
    Join,
    Leave,
}

/// What travels on the bus: the server→client frame itself. `instance` on
/// presence lets other instances keep a member list per origin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum BusEvent {
    Message(ChatMessage),
    Presence {
        room: RoomId,
        user: String,
        event: PresenceEvent,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        instance: Option<String>,
    },
}

impl BusEvent {
    pub fn room(&self) -> &RoomId {
        match self {
            BusEvent::Message(m) => &m.room,
            BusEvent::Presence { room, .. } => room,
        }
    }

    pub fn to_json(&self) -> String {
        // Serialising these plain structs cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// Frames the server sends that are built per connection (messages and
/// presence come from the bus as [`BusEvent`] JSON).
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ServerFrame<'a> {
    Joined {
        room: &'a RoomId,
        members: Vec<String>,
        recovered: bool,
        /// The room's cursor epoch and last position at the time of the join
        /// (absent while the room has no message yet).
        #[serde(skip_serializing_if = "Option::is_none")]
        epoch: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        seq: Option<i64>,
    },
    Left {
        room: &'a RoomId,
    },
    /// This instance's live stream of the room was interrupted and the
    /// messages at positions `from_seq+1 ..= to_seq` could not all be
    /// recovered: the client should rejoin (it will get `recovered:false`
    /// and the latest history).
    Gap {
        room: &'a RoomId,
        from_seq: i64,
        /// Absent when the room's head could not be read (DB down).
        #[serde(skip_serializing_if = "Option::is_none")]
        to_seq: Option<i64>,
    },
    Ack {
        cid: Option<&'a str>,
        id: &'a str,
    },
    Error {
        code: &'static str,
        message: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        cid: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        room: Option<&'a RoomId>,
    },
}

impl ServerFrame<'_> {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// Builds an `error` frame.
pub fn error_frame(code: ErrorCode, message: &str, cid: Option<&str>) -> String {
    ServerFrame::Error {
        code: code.as_str(),
        message,
        cid,
        room: None,
    }
    .to_json()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_ids() {
        assert!(RoomId::parse("chat.lobby").is_some());
        assert!(RoomId::parse("ai.dungeon-1_x").is_some());
        assert_eq!(RoomId::parse("ai.x").map(|r| r.kind()), Some(RoomKind::Ai));
        for bad in [
            "", "chat.", "lobby", "chat.a b", "chat.<b>", "x.y", "chat.a.b", "AI.x",
        ] {
            assert!(RoomId::parse(bad).is_none(), "{bad:?} accepted");
        }
        assert!(RoomId::parse(&format!("chat.{}", "a".repeat(64))).is_some());
        assert!(RoomId::parse(&format!("chat.{}", "a".repeat(65))).is_none());
    }

    #[test]
    fn decode_errors_have_codes() {
        let code = |s: &str| decode_client_frame(s, 10).unwrap_err().code;
        assert_eq!(code("{"), ErrorCode::InvalidJson);
        assert_eq!(code("[1]"), ErrorCode::BadFrame);
        assert_eq!(code(r#"{"room":"chat.a"}"#), ErrorCode::MissingField);
        assert_eq!(code(r#"{"type":"dance"}"#), ErrorCode::UnknownType);
        assert_eq!(code(r#"{"type":"join"}"#), ErrorCode::MissingField);
        assert_eq!(code(r#"{"type":"join","room":"nope"}"#), ErrorCode::BadRoom);
        assert_eq!(
            code(r#"{"type":"send","room":"chat.a","text":"12345678901"}"#),
            ErrorCode::TextTooLong
        );
        assert_eq!(
            code(r#"{"type":"send","room":"chat.a","text":"  "}"#),
            ErrorCode::EmptyText
        );
        let e = decode_client_frame(r#"{"type":"send","room":"bad","cid":"c1","text":"x"}"#, 10)
            .unwrap_err();
        assert_eq!(e.cid.as_deref(), Some("c1"));
    }

    #[test]
    fn bus_event_json_is_the_client_frame() {
        let m = BusEvent::Message(ChatMessage {
            room: RoomId::parse("chat.a").unwrap(),
            id: "01J".into(),
            user: "bob".into(),
            text: "<b>hi</b>".into(),
            ts: 1,
            kind: MessageKind::Chat,
            seq: Some(7),
        });
        let j = m.to_json();
        assert!(j.starts_with(r#"{"type":"message","room":"chat.a","id":"01J""#));
        assert!(j.ends_with(r#","seq":7}"#));
        assert_eq!(serde_json::from_str::<BusEvent>(&j).unwrap(), m);
    }

    #[test]
    fn user_names() {
        assert!(valid_user("bob"));
        assert!(!valid_user(""));
        assert!(!valid_user("   "));
        assert!(!valid_user("a\nb"));
        assert!(!valid_user(&"x".repeat(33)));
    }
}
