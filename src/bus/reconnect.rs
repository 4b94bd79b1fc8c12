//! The two reconnect loops of the code base, each written once.
//!
//! * [`spawn_session`] — a backend's consumer connection: connect → report
//!   ready to the caller of `subscribe` → pump deliveries → on loss, reconnect
//!   with [`Backoff`] until stopped. Redis Pub/Sub and RabbitMQ use it; Kafka's
//!   client reconnects by itself.
//! * [`resubscribe_loop`] — a role on top of the bus (live delivery,
//!   persistence, analytics): subscribe → `ready=true` → run the session until
//!   the subscription ends → `ready=false` → subscribe again with [`Backoff`].
//!
//! Both stop promptly when their cancellation token fires.

use std::future::Future;
use std::time::Duration;

use tokio::sync::{oneshot, watch};
use tokio_util::sync::CancellationToken;

use super::{BusError, MessageBus, SubscribeOptions, Subscription};

/// Capped exponential backoff: `first`, `2 × first`, `4 × first`, … up to `max`.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub first: Duration,
    pub max: Duration,
}

impl Backoff {
    /// 100 ms doubling up to `max_ms` — the relay's one reconnect schedule.
    pub fn capped_ms(max_ms: u64) -> Backoff {
        Backoff {
            first: Duration::from_millis(100),
            max: Duration::from_millis(max_ms.max(100)),
        }
    }

    /// The wait before attempt number `attempt` (1 = the first retry).
    pub fn delay(&self, attempt: u32) -> Duration {
        let factor = 1u32 << attempt.saturating_sub(1).min(16);
        self.first.saturating_mul(factor).min(self.max)
    }

    /// Sleeps [`Backoff::delay`]; `false` when `stop` fired first.
    pub async fn wait(&self, attempt: u32, stop: &CancellationToken) -> bool {
        tokio::select! {
            _ = stop.cancelled() => false,
            _ = tokio::time::sleep(self.delay(attempt)) => true,
        }
    }
}

/// How one connected session of [`spawn_session`] ended.
pub enum SessionEnd {
    /// Stopped on purpose (unsubscribed, bus closed): do not reconnect.
    Stopped,
    /// The connection was lost: reconnect.
    Lost,
}

/// Runs a backend consumer connection in a task: `connect` opens one session,
/// `pump` consumes it until it ends. Returns once the first connection is up
/// (or with its error, or [`BusError::Unavailable`] after `ready_timeout`), so
/// `subscribe` can honour "live when it returns". Later losses reconnect with
/// `backoff` and count in `bus_reconnects_total{backend}`; the returned
/// counter goes up with every reconnection (for [`super::Subscription::resumed`]).
pub async fn spawn_session<S, C, CF, P, PF>(
    backend: &'static str,
    what: String,
    backoff: Backoff,
    stop: CancellationToken,
    ready_timeout: Duration,
    mut connect: C,
    mut pump: P,
) -> Result<watch::Receiver<u64>, BusError>
where
    S: Send + 'static,
    C: FnMut() -> CF + Send + 'static,
    CF: Future<Output = Result<S, BusError>> + Send,
    P: FnMut(S) -> PF + Send + 'static,
    PF: Future<Output = SessionEnd> + Send,
{
    let (ready_tx, ready_rx) = oneshot::channel::<Result<(), BusError>>();
    let (resumed_tx, resumed_rx) = watch::channel(0u64);
    let task_stop = stop.clone();
    let label = what.clone();
    tokio::spawn(async move {
        let mut ready = Some(ready_tx);
        let mut attempt: u32 = 0;
        while !task_stop.is_cancelled() {
            let session = match connect().await {
                Ok(s) => s,
                Err(e) => {
                    if let Some(r) = ready.take() {
                        let _ = r.send(Err(e));
                        return;
                    }
                    attempt += 1;
                    tracing::warn!(error = %e, backend, %what, "reconnect failed");
                    if !backoff.wait(attempt, &task_stop).await {
                        return;
                    }
                    continue;
                }
            };
            match ready.take() {
                Some(r) => {
                    let _ = r.send(Ok(()));
                }
                None => {
                    metrics::counter!("bus_reconnects_total", "backend" => backend).increment(1);
                    tracing::info!(backend, %what, "reconnected");
                    resumed_tx.send_modify(|n| *n += 1);
                }
            }
            attempt = 0;
            match pump(session).await {
                SessionEnd::Stopped => return,
                SessionEnd::Lost => {
                    tracing::warn!(backend, %what, "connection lost, reconnecting");
                }
            }
        }
    });
    match tokio::time::timeout(ready_timeout, ready_rx).await {
        Ok(Ok(res)) => res.map(|()| resumed_rx),
        _ => {
            stop.cancel();
            Err(BusError::Unavailable(format!(
                "{backend}: {label} not ready in time"
            )))
        }
    }
}

/// A role's subscription loop: subscribes `opts`, reports `ready`, runs
/// `session` on the subscription until it returns (the subscription ended or
/// shutdown), and subscribes again after a [`Backoff`] wait. `session` returns
/// `false` to end the loop for good (shutdown). Returns on shutdown.
pub async fn resubscribe_loop<F, Fut>(
    role: &'static str,
    bus: &dyn MessageBus,
    opts: SubscribeOptions,
    ready: &watch::Sender<bool>,
    shutdown: &CancellationToken,
    mut session: F,
) where
    F: FnMut(Subscription) -> Fut,
    Fut: Future<Output = bool>,
{
    let backoff = Backoff::capped_ms(5_000);
    let mut attempt = 0;
    while !shutdown.is_cancelled() {
        let sub = match bus.subscribe(opts.clone()).await {
            Ok(s) => s,
            Err(e) => {
                attempt += 1;
                let _ = ready.send(false);
                tracing::warn!(error = %e, role, group = %opts.group, "subscribe failed, retrying");
                if !backoff.wait(attempt, shutdown).await {
                    break;
                }
                continue;
            }
        };
        attempt = 0;
        let _ = ready.send(true);
        tracing::info!(role, group = %opts.group, backend = bus.backend(), "subscribed");
        let go_on = session(sub).await;
        let _ = ready.send(false);
        if !go_on {
            break;
        }
    }
    tracing::info!(role, "stopped");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        let b = Backoff::capped_ms(1_000);
        assert_eq!(b.delay(1), Duration::from_millis(100));
        assert_eq!(b.delay(2), Duration::from_millis(200));
        assert_eq!(b.delay(4), Duration::from_millis(800));
        assert_eq!(b.delay(5), Duration::from_millis(1_000));
        assert_eq!(b.delay(1_000), Duration::from_millis(1_000));
    }
}
