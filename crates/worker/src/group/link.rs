//! One connection between two ranks of a tensor-parallel group.
//!
//! A reduction is a round trip on this connection in the middle of a forward pass, 60 times a
//! token for SmolLM2, so its latency is the cost of tensor parallelism. The executor thread
//! therefore reads and writes the socket itself, without blocking (the socket is in
//! non-blocking mode), and [`super::exchange`] drives all of a group's links at once: a frame
//! that arrives is parsed on the thread that needs it, with no hand-off between threads (a
//! hand-off through a reader thread and a channel cost two thread wake-ups, about 120 µs a
//! round trip on this project's 2-core test machine, against about 45 µs read directly).
//!
//! Rank 0's step frames ([`Frame::Step`], [`Frame::Close`]) arrive while another rank's
//! executor is idle, so on a non-zero rank the link to rank 0 also has a **reader thread**
//! that reads between steps. The two readers take turns under one lock:
//!
//! 1. The reader thread owns the link between steps. It parses rank 0's frames from the
//!    [`Inbox`], reading more as they arrive; a [`Frame::Step`] hands the link to the executor
//!    *before* the step goes to the executor's queue ([`Control::Step`]), and the reader waits.
//!    A [`Frame::Close`] goes to the queue too. Data frames of steps already handed over are
//!    left-overs of a step that failed elsewhere and are dropped; a data frame of a later step
//!    is left in the inbox for the executor.
//! 2. The executor owns the link from that step frame to the end of the step
//!    ([`Link::end_step`]); whatever it read beyond its own frames (the next step, often) stays
//!    in the inbox for the reader.
//!
//! Both read into the one inbox under its lock, so no byte is read twice or lost, whoever
//! reads. The executor never blocks on one peer: while it cannot write (the peer's buffers
//! are full) it keeps reading every link, so ranks writing large partial sums to each other
//! at once cannot deadlock.
//!
//! A dead or stopped peer never hangs a step: its connection's end or error fails the read at
//! once, and a peer that stays silent fails the exchange after its timeout. Dropping the link
//! shuts the socket down and ends the reader thread.
//!
//! Bytes move through the link's [`Transport`] (`secure.rs`): the socket itself in the clear,
//! or a TLS session on it. The transport lives in the inbox, under its lock, so whoever reads
//! drives the one session, and the executor's writes take the lock too (the reader thread
//! holds it only while it reads what has arrived, never while it waits).

use std::net::Shutdown;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Registry, Token};
use tessera_proto::cluster::v1 as pb;

use super::frame::Frame;
use super::secure::{PeerConn, Transport};

/// What rank 0 asks of another rank, delivered to that rank's executor.
#[derive(Debug)]
pub(crate) enum Control {
    /// Run this step of rank 0's inbound stream `stream`.
    Step {
        /// The group's step number.
        tag: u64,
        /// Rank 0's stream.
        stream: u64,
        /// The step.
        request: Box<pb::StepRequest>,
    },
    /// Rank 0's stream ended: free what it created.
    Close {
        /// Rank 0's stream.
        stream: u64,
    },
    /// The link to rank 0 is gone (its process died or it formed a new group).
    Down {
        /// Why.
        reason: String,
    },
}

/// Where a link's control events go (the executor's command queue).
pub(crate) type ControlSink = Arc<dyn Fn(Control) + Send + Sync>;

/// Who reads a link now (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Turn {
    /// The reader thread, between steps.
    Reader,
    /// The executor, inside a step.
    Executor,
    /// The link is dropped: the reader thread ends.
    Closed,
}

/// Bytes read from a link and not yet taken as frames, and whose turn it is to read.
#[derive(Debug)]
struct Inbox {
    buf: Vec<u8>,
    turn: Turn,
    /// The last step the reader thread handed to the executor: data frames up to it are
    /// left-overs.
    last_step: u64,
    /// What moves bytes between the socket and `buf` (and out).
    transport: Transport,
}

impl Inbox {
    /// Reads what has arrived on `stream` into the buffer, without blocking.
    fn fill(&mut self, stream: &TcpStream) -> Result<usize, String> {
        self.transport.fill(stream, &mut self.buf)
    }
}

#[derive(Debug)]
struct Shared {
    inbox: Mutex<Inbox>,
    /// Signalled when the turn changes.
    turned: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inbox> {
        // A panic elsewhere cannot leave the inbox half-written: every change is one push or
        // one drain, so the data stays usable.
        self.inbox.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One peer of a group, from this rank's side.
pub(crate) struct Link {
    /// The peer's rank.
    pub rank: usize,
    /// The peer's address, for messages.
    pub addr: String,
    stream: TcpStream,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("rank", &self.rank)
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl Link {
    /// Wraps a connection whose handshake is done (switching its socket to non-blocking
    /// mode); `control` receives rank 0's step frames (only a non-zero rank's link to rank 0
    /// has one, and a reader thread).
    ///
    /// # Errors
    /// When the socket cannot be configured or cloned, or the reader cannot start.
    pub(crate) fn start(
        rank: usize,
        addr: String,
        conn: PeerConn,
        control: Option<ControlSink>,
    ) -> std::io::Result<Self> {
        let (stream, transport) = conn.into_parts()?;
        stream.set_nodelay(true)?;
        let reader = match control {
            Some(sink) => Some((stream.try_clone()?, sink)),
            None => None,
        };
        // Shared by the clone: both descriptors are non-blocking from here on.
        stream.set_nonblocking(true)?;
        let shared = Arc::new(Shared {
            inbox: Mutex::new(Inbox {
                buf: Vec::new(),
                turn: if reader.is_some() {
                    Turn::Reader
                } else {
                    Turn::Executor
                },
                last_step: 0,
                transport,
            }),
            turned: Condvar::new(),
        });
        if let Some((r, sink)) = reader {
            let mut r = TcpStream::from_std(r);
            let poll = Poll::new()?;
            poll.registry()
                .register(&mut r, Token(0), Interest::READABLE)?;
            let (shared, who) = (Arc::clone(&shared), addr.clone());
            std::thread::Builder::new()
                .name("tessera-peer-read".into())
                .spawn(move || read_between_steps(&r, poll, &shared, &sink, &who))?;
        }
        Ok(Self {
            rank,
            addr,
            stream: TcpStream::from_std(stream),
            shared,
        })
    }

    /// Registers the socket with the group's poller under `token` (readable and writable).
    pub(crate) fn register(&mut self, registry: &Registry, token: Token) -> std::io::Result<()> {
        registry.register(
            &mut self.stream,
            token,
            Interest::READABLE | Interest::WRITABLE,
        )
    }

    /// Writes what the socket takes of `bytes[*sent..]` without blocking, advancing `sent`
    /// by what the link took, and what it took earlier and still holds ([`Link::pending`]);
    /// true when anything moved.
    ///
    /// # Errors
    /// A sentence naming the peer when the connection is broken.
    pub(crate) fn write_some(&self, bytes: &[u8], sent: &mut usize) -> Result<bool, String> {
        self.shared
            .lock()
            .transport
            .write_some(&self.stream, bytes, sent)
            .map_err(|e| self.named(&e))
    }

    /// Whether bytes the link took are still waiting for the socket (TLS records): a frame
    /// is on its way only once every byte is taken and nothing is pending.
    pub(crate) fn pending(&self) -> bool {
        self.shared.lock().transport.pending()
    }

    /// Takes the next data frame of step `tag` or later if it has arrived (reading what the
    /// socket holds, without blocking), skipping frames of earlier steps (left over from a
    /// step that failed elsewhere). Returns whether anything was read, and the frame. Takes
    /// the link from the reader thread if it had it.
    ///
    /// # Errors
    /// A sentence naming the peer when its connection ended or failed, it sent a malformed
    /// frame or a step frame mid-step, or it aborted the step.
    pub(crate) fn take_data(&self, tag: u64) -> Result<(bool, Option<Frame>), String> {
        let mut inbox = self.shared.lock();
        if inbox.turn == Turn::Reader {
            inbox.turn = Turn::Executor;
        }
        let mut read = false;
        loop {
            let parsed = Frame::parse(&inbox.buf)
                .map_err(|e| self.named(&format!("sent a malformed frame: {e}")))?;
            let Some((frame, used)) = parsed else {
                if read {
                    return Ok((true, None));
                }
                // Nothing whole here: read what has arrived, once, and look again.
                read = inbox.fill(&self.stream).map_err(|e| self.named(&e))? > 0;
                if !read {
                    return Ok((false, None));
                }
                continue;
            };
            let t = match &frame {
                Frame::Partial { tag, .. }
                | Frame::Logits { tag, .. }
                | Frame::Abort { tag, .. } => *tag,
                // Left in the inbox for the reader thread, which hands it over after this
                // step ends.
                Frame::Step { tag: next, .. } => {
                    return Err(self.named(&format!(
                        "started step {next} before this rank finished step {tag}"
                    )));
                }
                other => {
                    return Err(self.named(&format!(
                        "sent an unexpected frame mid-step ({:?})",
                        std::mem::discriminant(other)
                    )));
                }
            };
            inbox.buf.drain(..used);
            if t < tag {
                continue;
            }
            if let Frame::Abort { message, .. } = &frame {
                return Err(self.named(&format!("failed the step: {message}")));
            }
            return Ok((read, Some(frame)));
        }
    }

    /// Ends this rank's step on the link: the reader thread (if any) reads again.
    pub(crate) fn end_step(&self) {
        let mut inbox = self.shared.lock();
        if inbox.turn == Turn::Executor {
            inbox.turn = Turn::Reader;
            self.shared.turned.notify_all();
        }
    }

    /// A message about this link's peer.
    pub(crate) fn named(&self, what: &str) -> String {
        format!("stage group rank {} ({}): {what}", self.rank, self.addr)
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.shared.lock().turn = Turn::Closed;
        self.shared.turned.notify_all();
        // Ends a reading reader thread (its socket ends) and tells the peer at once.
        let _ = self.stream.shutdown(Shutdown::Both);
    }
}

/// What one look at the inbox by the reader thread came to.
enum Served {
    /// It handed over a step or read something: look again.
    Again,
    /// Nothing to do until more arrives.
    Idle,
    /// The link is finished (closed, failed, or rank 0 broke the protocol).
    Done,
}

/// The reader thread of a non-zero rank's link to rank 0 (see the module docs).
fn read_between_steps(
    r: &TcpStream,
    mut poll: Poll,
    shared: &Shared,
    sink: &ControlSink,
    who: &str,
) {
    let mut events = Events::with_capacity(4);
    loop {
        let served = {
            let mut inbox = shared.lock();
            while inbox.turn == Turn::Executor {
                inbox = shared
                    .turned
                    .wait(inbox)
                    .unwrap_or_else(PoisonError::into_inner);
            }
            if inbox.turn == Turn::Closed {
                return;
            }
            serve(r, &mut inbox, sink, who)
        };
        match served {
            Served::Again => {}
            Served::Done => return,
            // Edge-triggered: `serve` read until the socket was empty, so the next event is
            // new data (or the end). The timeout only bounds how late a closed link is seen.
            Served::Idle => {
                let _ = poll.poll(&mut events, Some(Duration::from_millis(500)));
            }
        }
    }
}

/// Delivers the frames whole in the inbox, then reads what has arrived.
fn serve(r: &TcpStream, inbox: &mut Inbox, sink: &ControlSink, who: &str) -> Served {
    let down = |reason: String| {
        sink(Control::Down {
            reason: format!("rank 0 ({who}): {reason}"),
        });
        Served::Done
    };
    loop {
        let (frame, used) = match Frame::parse(&inbox.buf) {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) => return down(format!("sent a malformed frame: {e}")),
        };
        match frame {
            Frame::Step {
                tag,
                stream,
                request,
            } => {
                inbox.buf.drain(..used);
                return match <pb::StepRequest as prost::Message>::decode(request.as_slice()) {
                    Ok(req) => {
                        // The executor's turn before it sees the step.
                        inbox.turn = Turn::Executor;
                        inbox.last_step = tag;
                        sink(Control::Step {
                            tag,
                            stream,
                            request: Box::new(req),
                        });
                        Served::Again
                    }
                    Err(e) => down(format!("sent an undecodable step: {e}")),
                };
            }
            Frame::Close { stream } => {
                inbox.buf.drain(..used);
                sink(Control::Close { stream });
            }
            Frame::Partial { tag, .. } | Frame::Logits { tag, .. } | Frame::Abort { tag, .. } => {
                if tag > inbox.last_step {
                    // A step this rank runs without a step frame: the executor takes it.
                    return Served::Idle;
                }
                inbox.buf.drain(..used);
            }
            other => {
                return down(format!(
                    "sent an unexpected frame between steps ({:?})",
                    std::mem::discriminant(&other)
                ));
            }
        }
    }
    match inbox.fill(r) {
        Ok(0) => Served::Idle,
        Ok(_) => Served::Again,
        Err(e) => down(e),
    }
}
