//! One connection between two ranks of a tensor-parallel group.
//!
//! The executor thread writes frames itself (blocking, `TCP_NODELAY`); a reader thread per
//! link reads every frame the peer sends. Rank 0's step frames ([`Frame::Step`],
//! [`Frame::Close`]) become [`Control`] events for the executor; data frames (partial sums,
//! logits, aborts) queue for [`Link::recv`]. Because the reader always drains the socket, two
//! ranks writing large partial sums to each other at once cannot deadlock on full socket
//! buffers.
//!
//! A dead or stopped peer never hangs a step: its connection's end or error reaches
//! [`Link::recv`] at once as an error, and a peer that stays silent fails the wait after the
//! link's timeout. Dropping the link shuts the socket down, which ends the reader thread.

use std::net::{Shutdown, TcpStream};
use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use tessera_proto::cluster::v1 as pb;

use super::frame::Frame;

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

/// One peer of a group, from this rank's side.
pub(crate) struct Link {
    /// The peer's rank.
    pub rank: usize,
    /// The peer's address, for messages.
    pub addr: String,
    stream: TcpStream,
    data: Receiver<Result<Frame, String>>,
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
    /// Wraps a connected socket and starts its reader; `control` receives rank 0's step
    /// frames (only a non-zero rank's link to rank 0 has one).
    ///
    /// # Errors
    /// When the socket cannot be cloned for the reader or the thread cannot start.
    pub(crate) fn start(
        rank: usize,
        addr: String,
        stream: TcpStream,
        control: Option<ControlSink>,
    ) -> std::io::Result<Self> {
        stream.set_nodelay(true)?;
        stream.set_read_timeout(None)?;
        let reader = stream.try_clone()?;
        let (tx, rx) = mpsc::channel();
        let who = addr.clone();
        std::thread::Builder::new()
            .name("tessera-peer-read".into())
            .spawn(move || read_loop(reader, &tx, control.as_ref(), &who))?;
        Ok(Self {
            rank,
            addr,
            stream,
            data: rx,
        })
    }

    /// Writes one encoded frame.
    ///
    /// # Errors
    /// A sentence naming the peer when the connection is broken.
    pub(crate) fn send(&mut self, bytes: &[u8]) -> Result<(), String> {
        use std::io::Write;
        self.stream
            .write_all(bytes)
            .map_err(|e| format!("tensor-parallel rank {} ({}): {e}", self.rank, self.addr))
    }

    /// The next data frame of step `tag`, skipping frames of earlier steps (left over from a
    /// step that failed elsewhere), waiting at most `timeout`.
    ///
    /// # Errors
    /// A sentence naming the peer when its connection ended or failed, it sent nothing in
    /// time, or it aborted the step.
    pub(crate) fn recv(&mut self, tag: u64, timeout: Duration) -> Result<Frame, String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let frame = match self.data.recv_timeout(left) {
                Ok(Ok(f)) => f,
                Ok(Err(e)) => return Err(self.named(&e)),
                Err(RecvTimeoutError::Timeout) => {
                    return Err(self.named(&format!(
                        "sent nothing for {} ms (stopped or overloaded)",
                        timeout.as_millis()
                    )));
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(self.named("connection lost"));
                }
            };
            let t = match &frame {
                Frame::Partial { tag, .. }
                | Frame::Logits { tag, .. }
                | Frame::Abort { tag, .. } => *tag,
                _ => continue,
            };
            if t < tag {
                continue;
            }
            if let Frame::Abort { message, .. } = &frame {
                return Err(self.named(&format!("failed the step: {message}")));
            }
            return Ok(frame);
        }
    }

    fn named(&self, what: &str) -> String {
        format!("tensor-parallel rank {} ({}): {what}", self.rank, self.addr)
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        // Ends the reader thread (its read fails) and tells the peer at once.
        let _ = self.stream.shutdown(Shutdown::Both);
    }
}

fn read_loop(
    mut r: TcpStream,
    data: &Sender<Result<Frame, String>>,
    control: Option<&ControlSink>,
    who: &str,
) {
    loop {
        match Frame::read_from(&mut r) {
            Ok(Frame::Step {
                tag,
                stream,
                request,
            }) => {
                let Some(sink) = control else {
                    let _ = data.send(Err("sent a step to a rank that is not its group's".into()));
                    return;
                };
                match <pb::StepRequest as prost::Message>::decode(request.as_slice()) {
                    Ok(req) => sink(Control::Step {
                        tag,
                        stream,
                        request: Box::new(req),
                    }),
                    Err(e) => {
                        sink(Control::Down {
                            reason: format!("rank 0 ({who}) sent an undecodable step: {e}"),
                        });
                        return;
                    }
                }
            }
            Ok(Frame::Close { stream }) => {
                if let Some(sink) = control {
                    sink(Control::Close { stream });
                }
            }
            Ok(f @ (Frame::Partial { .. } | Frame::Logits { .. } | Frame::Abort { .. })) => {
                if data.send(Ok(f)).is_err() {
                    return;
                }
            }
            Ok(other) => {
                let _ = data.send(Err(format!(
                    "unexpected frame {:?} mid-group",
                    std::mem::discriminant(&other)
                )));
                return;
            }
            Err(e) => {
                let reason = if e.kind() == std::io::ErrorKind::UnexpectedEof {
                    "connection closed".to_owned()
                } else {
                    format!("connection failed: {e}")
                };
                if let Some(sink) = control {
                    sink(Control::Down {
                        reason: format!("rank 0 ({who}): {reason}"),
                    });
                }
                let _ = data.send(Err(reason));
                return;
            }
        }
    }
}
