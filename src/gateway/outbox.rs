//! A `/ws` connection's outbound side. Whoever has a frame for the socket —
//! the live consumer fanning a message out, the reader answering a `send` —
//! writes it into the socket itself, in its own task: one `write` syscall, no
//! queue, no wake-up of another task. Only what the socket cannot take at once
//! (its kernel buffer is full, or the reader half holds the shared stream
//! lock) is queued, and the connection's writer task finishes it when the
//! socket is writable again.
//!
//! Why: with a queue and a writer task per socket, every delivery woke a task,
//! often on the other worker thread, and the scheduling cost more than the
//! write (`perf`: context switches and futex wake-ups were the largest share
//! of the relay's CPU per delivery against `floor`, which writes the same way
//! as this module; BENCHMARKS.md).
//!
//! Order: a frame goes straight to the socket only while nothing is queued or
//! waiting to be flushed, so frames leave in the order they were pushed.
//! Bound: at most `cap` frames are queued; one more and the client is too
//! slow ([`Full`]: the caller kicks it), as with the queue this replaces.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use axum::extract::ws::{Message, Utf8Bytes, WebSocket};
use futures::Sink;
use futures::stream::SplitSink;
use futures::task::{ArcWake, AtomicWaker};

type WsSink = SplitSink<WebSocket, Message>;

/// The socket's queue is full: the client reads slower than it is sent to.
#[derive(Debug, thiserror::Error)]
#[error("outbound queue full")]
pub struct Full;

/// Wakes the writer task. Used as the waker of every poll made outside the
/// writer, so whatever the socket (or the stream lock) has to say later
/// reaches the task that can act on it.
struct WriterWake(AtomicWaker);

impl ArcWake for WriterWake {
    fn wake_by_ref(arc_self: &Arc<Self>) {
        arc_self.0.wake();
    }
}

struct State<S> {
    /// `None` once the writer is done: later frames are dropped (the
    /// connection is going away).
    sink: Option<S>,
    queue: VecDeque<Utf8Bytes>,
    /// Frames were handed to the sink and its flush has not completed yet.
    unflushed: bool,
    /// A write failed: the peer is gone.
    failed: bool,
    /// The reader is done: the writer ends once everything queued is written.
    finishing: bool,
}

/// Generic over the sink only so the ordering and bound rules can be unit
/// tested without a socket; the server uses the default.
pub struct Outbox<S = WsSink> {
    state: Mutex<State<S>>,
    writer: Arc<WriterWake>,
    /// Built once from `writer`: cloned into the socket's registration only
    /// when a write has to wait.
    waker: Waker,
    cap: usize,
}

/// What [`Outbox::run`] ends with.
pub enum Finished<S = WsSink> {
    /// Everything was written after [`Outbox::finish`]; the sink is returned
    /// to send the close frame.
    Drained(S),
    /// A write failed: the peer is gone.
    Failed,
}

impl<S: Sink<Message> + Unpin> Outbox<S> {
    pub fn new(sink: S, cap: usize) -> Arc<Self> {
        let writer = Arc::new(WriterWake(AtomicWaker::new()));
        Arc::new(Outbox {
            state: Mutex::new(State {
                sink: Some(sink),
                queue: VecDeque::new(),
                unflushed: false,
                failed: false,
                finishing: false,
            }),
            waker: futures::task::waker(writer.clone()),
            writer,
            cap: cap.max(1),
        })
    }

    /// Writes `text` to the socket now if it takes it, else queues it for
    /// the writer. `Err(Full)` when `cap` frames are already queued.
    pub fn push(&self, text: Utf8Bytes) -> Result<(), Full> {
        let Ok(mut st) = self.state.lock() else {
            return Ok(());
        };
        let st = &mut *st;
        let Some(sink) = st.sink.as_mut() else {
            return Ok(());
        };
        if st.queue.is_empty() && !st.unflushed && !st.failed {
            let mut cx = Context::from_waker(&self.waker);
            match Pin::new(&mut *sink).poll_ready(&mut cx) {
                Poll::Ready(Ok(())) => {
                    if Pin::new(&mut *sink)
                        .start_send(Message::Text(text))
                        .is_err()
                    {
                        self.fail(st);
                        return Ok(());
                    }
                    match Pin::new(sink).poll_flush(&mut cx) {
                        Poll::Ready(Ok(())) => {}
                        Poll::Ready(Err(_)) => self.fail(st),
                        // The writer is woken when the socket can take more.
                        Poll::Pending => st.unflushed = true,
                    }
                    return Ok(());
                }
                Poll::Ready(Err(_)) => {
                    self.fail(st);
                    return Ok(());
                }
                Poll::Pending => {}
            }
        }
        if st.queue.len() >= self.cap {
            return Err(Full);
        }
        st.queue.push_back(text);
        self.writer.0.wake();
        Ok(())
    }

    fn fail(&self, st: &mut State<S>) {
        st.failed = true;
        self.writer.0.wake();
    }

    /// The reader is done: the writer writes what is queued, then ends.
    pub fn finish(&self) {
        if let Ok(mut st) = self.state.lock() {
            st.finishing = true;
        }
        self.writer.0.wake();
    }

    /// Takes the sink away (later frames are dropped), e.g. to close the
    /// socket at once after a kick.
    pub fn take(&self) -> Option<S> {
        self.state.lock().ok().and_then(|mut st| st.sink.take())
    }

    /// The writer task's loop: writes what [`Outbox::push`] had to queue and
    /// completes flushes it started, until [`Outbox::finish`] and an empty
    /// queue, or a failed write.
    pub async fn run(&self) -> Finished<S> {
        std::future::poll_fn(|cx| {
            self.writer.0.register(cx.waker());
            let Ok(mut st) = self.state.lock() else {
                return Poll::Ready(Finished::Failed);
            };
            let st = &mut *st;
            match drive(st, cx) {
                Poll::Ready(Ok(())) if st.finishing => Poll::Ready(match st.sink.take() {
                    Some(s) => Finished::Drained(s),
                    None => Finished::Failed,
                }),
                Poll::Ready(Ok(())) => Poll::Pending,
                Poll::Ready(Err(())) => {
                    st.sink = None;
                    Poll::Ready(Finished::Failed)
                }
                Poll::Pending => Poll::Pending,
            }
        })
        .await
    }
}

/// Writes the queue and completes the flush. `Ready(Ok)` when nothing is
/// left to do, `Pending` when the socket (or the stream lock) must be waited
/// for — `cx` is registered then.
fn drive<S: Sink<Message> + Unpin>(
    st: &mut State<S>,
    cx: &mut Context<'_>,
) -> Poll<Result<(), ()>> {
    if st.failed {
        return Poll::Ready(Err(()));
    }
    let Some(sink) = st.sink.as_mut() else {
        return Poll::Ready(Err(()));
    };
    loop {
        if st.unflushed {
            match Pin::new(&mut *sink).poll_flush(cx) {
                Poll::Ready(Ok(())) => st.unflushed = false,
                Poll::Ready(Err(_)) => return Poll::Ready(Err(())),
                Poll::Pending => return Poll::Pending,
            }
        }
        if st.queue.is_empty() {
            return Poll::Ready(Ok(()));
        }
        while !st.queue.is_empty() {
            match Pin::new(&mut *sink).poll_ready(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(_)) => return Poll::Ready(Err(())),
                Poll::Pending if st.unflushed => break,
                Poll::Pending => return Poll::Pending,
            }
            let Some(text) = st.queue.pop_front() else {
                break;
            };
            if Pin::new(&mut *sink)
                .start_send(Message::Text(text))
                .is_err()
            {
                return Poll::Ready(Err(()));
            }
            st.unflushed = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// A socket whose readiness the test controls: it records what was
    /// written, and while `blocked` it takes nothing (like a full kernel
    /// buffer) and wakes the waiting writer when unblocked.
    #[derive(Clone, Default)]
    struct Gate {
        blocked: Arc<AtomicBool>,
        waiter: Arc<Mutex<Option<Waker>>>,
        written: Arc<Mutex<Vec<String>>>,
    }

    impl Gate {
        fn set_blocked(&self, b: bool) {
            self.blocked.store(b, Ordering::SeqCst);
            if !b && let Some(w) = self.waiter.lock().unwrap().take() {
                w.wake();
            }
        }
        fn written(&self) -> Vec<String> {
            self.written.lock().unwrap().clone()
        }
    }

    impl Sink<Message> for Gate {
        type Error = ();
        fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), ()>> {
            if self.blocked.load(Ordering::SeqCst) {
                *self.waiter.lock().unwrap() = Some(cx.waker().clone());
                Poll::Pending
            } else {
                Poll::Ready(Ok(()))
            }
        }
        fn start_send(self: Pin<&mut Self>, m: Message) -> Result<(), ()> {
            if let Message::Text(t) = m {
                self.written.lock().unwrap().push(t.to_string());
            }
            Ok(())
        }
        fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), ()>> {
            self.poll_ready(cx)
        }
        fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), ()>> {
            Poll::Ready(Ok(()))
        }
    }

    fn push(o: &Outbox<Gate>, s: &str) -> Result<(), Full> {
        o.push(Utf8Bytes::from(s.to_string()))
    }

    #[tokio::test]
    async fn frames_leave_in_push_order_across_the_direct_and_the_queued_path() {
        let gate = Gate::default();
        let o = Outbox::new(gate.clone(), 8);
        let writer = tokio::spawn({
            let o = o.clone();
            async move { o.run().await }
        });
        push(&o, "a").unwrap();
        assert_eq!(gate.written(), ["a"], "an open socket is written at once");
        gate.set_blocked(true);
        push(&o, "b").unwrap();
        push(&o, "c").unwrap();
        assert_eq!(gate.written(), ["a"]);
        // The socket can take more again, but b and c are still queued: d
        // must not overtake them.
        gate.blocked.store(false, Ordering::SeqCst);
        push(&o, "d").unwrap();
        assert_eq!(gate.written(), ["a"], "nothing overtakes queued frames");
        gate.set_blocked(false);
        o.finish();
        assert!(matches!(writer.await.unwrap(), Finished::Drained(_)));
        assert_eq!(gate.written(), ["a", "b", "c", "d"]);
    }

    #[tokio::test]
    async fn a_blocked_socket_holds_at_most_cap_frames() {
        let gate = Gate::default();
        gate.set_blocked(true);
        let o = Outbox::new(gate.clone(), 3);
        for f in ["a", "b", "c"] {
            push(&o, f).unwrap();
        }
        assert!(
            push(&o, "d").is_err(),
            "the fourth frame finds the queue full"
        );
        // Once taken away (a kick), frames are dropped, not queued.
        assert!(o.take().is_some());
        push(&o, "e").unwrap();
        assert!(gate.written().is_empty());
    }
}
