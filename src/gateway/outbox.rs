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

struct State {
    /// `None` once the writer is done: later frames are dropped (the
    /// connection is going away).
    sink: Option<WsSink>,
    queue: VecDeque<Utf8Bytes>,
    /// Frames were handed to the sink and its flush has not completed yet.
    unflushed: bool,
    /// A write failed: the peer is gone.
    failed: bool,
    /// The reader is done: the writer ends once everything queued is written.
    finishing: bool,
}

pub struct Outbox {
    state: Mutex<State>,
    writer: Arc<WriterWake>,
    /// Built once from `writer`: cloned into the socket's registration only
    /// when a write has to wait.
    waker: Waker,
    cap: usize,
}

/// What [`Outbox::run`] ends with.
pub enum Finished {
    /// Everything was written after [`Outbox::finish`]; the sink is returned
    /// to send the close frame.
    Drained(WsSink),
    /// A write failed: the peer is gone.
    Failed,
}

impl Outbox {
    pub fn new(sink: WsSink, cap: usize) -> Arc<Self> {
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

    fn fail(&self, st: &mut State) {
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
    pub fn take(&self) -> Option<WsSink> {
        self.state.lock().ok().and_then(|mut st| st.sink.take())
    }

    /// The writer task's loop: writes what [`Outbox::push`] had to queue and
    /// completes flushes it started, until [`Outbox::finish`] and an empty
    /// queue, or a failed write.
    pub async fn run(&self) -> Finished {
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
fn drive(st: &mut State, cx: &mut Context<'_>) -> Poll<Result<(), ()>> {
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
