//! Live delivery: this instance's own consumer group (`live-<INSTANCE_ID>`), so
//! every instance receives every message of the rooms it serves and pushes it
//! to its own sockets. Sockets never talk to the bus: they only have a queue
//! this worker fills.
//!
//! The bus payload is already the client frame, so it is forwarded as bytes:
//! parsed once per message (for the id and presence), never per recipient.

use std::sync::Arc;

use axum::extract::ws::Utf8Bytes;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use super::backoff;
use crate::bus::{MessageBus, SubscribeOptions};
use crate::gateway::rooms::{Frame, Rooms};
use crate::protocol::PresenceEvent;

#[derive(Deserialize)]
struct Peek<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    #[serde(default)]
    id: Option<&'a str>,
    #[serde(default)]
    user: Option<&'a str>,
    #[serde(default)]
    event: Option<PresenceEvent>,
    #[serde(default)]
    instance: Option<&'a str>,
}

/// Subscribes the instance group and signals `ready` once live; re-subscribes
/// (re-adding every local room) if the subscription ever ends.
pub async fn run(
    bus: Arc<dyn MessageBus>,
    rooms: Arc<Rooms>,
    group: String,
    ready: tokio::sync::watch::Sender<bool>,
    shutdown: CancellationToken,
) {
    let backend = bus.backend();
    let mut attempt = 0;
    while !shutdown.is_cancelled() {
        let mut sub = match bus
            .subscribe(SubscribeOptions::instance(group.clone()))
            .await
        {
            Ok(s) => s,
            Err(e) => {
                attempt += 1;
                let _ = ready.send(false);
                tracing::warn!(error = %e, "live delivery: subscribe failed, retrying");
                tokio::select! { _ = shutdown.cancelled() => break, _ = tokio::time::sleep(backoff(attempt)) => {} }
                continue;
            }
        };
        if let Err(e) = rooms.set_interest(sub.interest.clone()).await {
            attempt += 1;
            tracing::warn!(error = %e, "live delivery: re-adding rooms failed, retrying");
            tokio::select! { _ = shutdown.cancelled() => break, _ = tokio::time::sleep(backoff(attempt)) => {} }
            continue;
        }
        attempt = 0;
        let _ = ready.send(true);
        tracing::info!(%group, backend, "live delivery subscribed");
        loop {
            let d = tokio::select! {
                _ = shutdown.cancelled() => break,
                d = sub.next() => match d { Some(d) => d, None => break },
            };
            let text = match Utf8Bytes::try_from(d.payload.clone()) {
                Ok(t) => t,
                Err(_) => {
                    metrics::counter!("live_undecodable_total").increment(1);
                    let _ = d.ack().await;
                    continue;
                }
            };
            let id = match serde_json::from_slice::<Peek>(&d.payload) {
                Ok(p) => {
                    if p.kind == "presence"
                        && let (Some(inst), Some(user), Some(ev)) = (p.instance, p.user, p.event)
                    {
                        rooms.remote_presence(&d.room, inst, user, ev);
                    }
                    p.id.map(Arc::from)
                }
                Err(_) => {
                    metrics::counter!("live_undecodable_total").increment(1);
                    let _ = d.ack().await;
                    continue;
                }
            };
            let n = rooms.dispatch(&d.room, Frame { id, text });
            metrics::counter!("messages_out_total", "backend" => backend).increment(n as u64);
            let _ = d.ack().await;
        }
        let _ = ready.send(false);
    }
}
