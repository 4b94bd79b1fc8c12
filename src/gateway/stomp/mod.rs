//! STOMP 1.2 over WebSocket, for clients written against Spring's simple
//! broker (DungeonTalk's web client with `@stomp/stompjs`).
//!
//! A STOMP connection is a member of the same rooms as a `/ws` connection:
//! it enters [`super::rooms::Rooms`] with its own outbound queue, counts in
//! cluster presence, publishes through [`super::Gateway::begin_chat`] under
//! the same limits, and its frames come from the same live consumer. Only the
//! framing differs, so only this module knows STOMP:
//!
//! * [`frame`] — the incremental decoder (limits, escapes, content-length,
//!   frames split across WebSocket messages) and the encoder;
//! * [`session`] — one socket: `CONNECT` and authentication, heart-beats,
//!   `SUBSCRIBE`/`UNSUBSCRIBE`, `SEND` with receipts after the bus accepted,
//!   `ERROR` then close for every refusal, `DISCONNECT`.
//!
//! The mapping (Spring's destinations → rooms):
//!
//! | STOMP | room |
//! |---|---|
//! | `SUBSCRIBE /sub/chat/room/{id}` | `chat.{id}` |
//! | `SUBSCRIBE /sub/aichat/room/{id}` | `ai.{id}` |
//! | `SEND /pub/chat/message` `{"roomId":id,"content":…}` | `chat.{id}` |
//! | `SEND /pub/aichat/send` `{"roomId":id,"content":…}` | `ai.{id}` |

pub mod frame;
pub mod session;

use crate::protocol::{RoomId, RoomKind};

/// The room a subscription destination names, if it is one of ours.
pub fn subscription_room(destination: &str) -> Option<RoomId> {
    if let Some(id) = destination.strip_prefix("/sub/chat/room/") {
        RoomId::parse(&format!("chat.{id}"))
    } else if let Some(id) = destination.strip_prefix("/sub/aichat/room/") {
        RoomId::parse(&format!("ai.{id}"))
    } else {
        None
    }
}

/// The kind of room a `SEND` destination publishes to.
pub fn send_kind(destination: &str) -> Option<RoomKind> {
    match destination {
        "/pub/chat/message" => Some(RoomKind::Chat),
        "/pub/aichat/send" => Some(RoomKind::Ai),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destinations_map_to_rooms() {
        assert_eq!(
            subscription_room("/sub/chat/room/1").map(|r| r.to_string()),
            Some("chat.1".into())
        );
        assert_eq!(
            subscription_room("/sub/aichat/room/q-7").map(|r| r.to_string()),
            Some("ai.q-7".into())
        );
        for bad in [
            "/sub/chat/room/",
            "/sub/chat/room/a/b",
            "/sub/chat/room/a b",
            "/topic/x",
            "/sub/chat/room/../x",
        ] {
            assert!(subscription_room(bad).is_none(), "{bad}");
        }
        assert_eq!(send_kind("/pub/chat/message"), Some(RoomKind::Chat));
        assert_eq!(send_kind("/pub/aichat/send"), Some(RoomKind::Ai));
        assert_eq!(send_kind("/pub/other"), None);
    }
}
