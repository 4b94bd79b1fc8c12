//! The WebSocket gateway: one task pair per connection (a reader that handles
//! client frames, a writer that drains the connection's bounded queue) and the
//! room registry the live-delivery worker feeds.

pub mod conn;
pub mod rooms;

use bytes::Bytes;

use crate::app::AppState;
use crate::bus::{Outgoing, Priority};
use crate::protocol::{BusEvent, ChatMessage, MessageKind, RoomId};

/// Publishes one chat message from `user` and returns its id once the bus
/// accepted it, or the human-readable reason it was not sent (the caller
/// answers `bus_unavailable`). Used by WebSocket sends and `POST` alike.
pub async fn publish_chat(
    state: &AppState,
    room: RoomId,
    user: String,
    text: String,
) -> Result<String, String> {
    let msg = ChatMessage {
        room: room.clone(),
        id: state.ids.next(),
        user,
        text,
        ts: chrono::Utc::now().timestamp_millis(),
        kind: MessageKind::Chat,
    };
    let id = msg.id.clone();
    let out = Outgoing {
        room,
        payload: Bytes::from(BusEvent::Message(msg).to_json()),
        priority: Priority::Normal,
    };
    let backend = state.bus.backend();
    let started = std::time::Instant::now();
    let res =
        tokio::time::timeout(state.cfg.limits.publish_timeout(), state.bus.publish(out)).await;
    metrics::histogram!("publish_latency_seconds", "backend" => backend)
        .record(started.elapsed().as_secs_f64());
    match res {
        Ok(Ok(())) => {
            metrics::counter!("messages_in_total", "backend" => backend).increment(1);
            Ok(id)
        }
        Ok(Err(e)) => {
            metrics::counter!("publish_errors_total", "backend" => backend).increment(1);
            Err(format!("message not sent: {e}"))
        }
        Err(_) => {
            metrics::counter!("publish_errors_total", "backend" => backend).increment(1);
            Err("message not sent: the bus did not answer in time".to_string())
        }
    }
}
