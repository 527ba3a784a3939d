//! Driving all of a group's links at once for one collective: sending frames to some peers
//! and taking one frame (or one partial in chunks) from some peers, on the executor thread,
//! without blocking on any one of them.
//!
//! The loop writes what each socket takes and reads what each holds; while nothing moves it
//! first spins (a peer running the same layers is usually microseconds behind, and waking a
//! sleeping thread costs tens of microseconds on a virtual machine), then yields the CPU (a
//! peer on the same core gets to run), then sleeps in the poller until a socket is ready or
//! the timeout passes with nothing moved. Every socket is read and written until it would
//! block before the poller waits, which the poller's edge-triggered readiness requires.
//! Under TLS a write is done only when the link holds no record the socket has not taken
//! ([`Link::pending`]), so no frame waits in rustls while the exchange waits for an answer.

use std::time::{Duration, Instant};

use mio::{Events, Poll, Token};

use super::frame::{Frame, MORE};
use super::link::Link;

/// How long an idle exchange busy-waits before yielding the CPU.
const SPIN: Duration = Duration::from_micros(50);
/// How long an idle exchange keeps polling its sockets (yielding between looks) before it
/// sleeps in the poller.
const WATCH: Duration = Duration::from_micros(300);

/// A group's poller and the state of one exchange.
#[derive(Debug)]
pub(crate) struct Wire {
    poll: Poll,
    events: Events,
    /// Bytes of the outgoing frame written, per link.
    sent: Vec<usize>,
    /// The frame taken from each link in the last exchange.
    pub got: Vec<Option<Frame>>,
    /// Bytes written to the links since last taken.
    pub written: u64,
    /// The chunks of a partial taken so far, per link ([`Wire::exchange_partials`]).
    chunks: Vec<Vec<f32>>,
}

impl Wire {
    /// A poller watching every link (token = the link's index).
    ///
    /// # Errors
    /// When the poller cannot be made or a socket registered.
    pub(crate) fn new(links: &mut [Link]) -> std::io::Result<Self> {
        let poll = Poll::new()?;
        for (i, l) in links.iter_mut().enumerate() {
            l.register(poll.registry(), Token(i))?;
        }
        Ok(Self {
            poll,
            events: Events::with_capacity(8),
            sent: Vec::new(),
            got: Vec::new(),
            written: 0,
            chunks: Vec::new(),
        })
    }

    /// Sends `bytes` to every link `to` selects and takes one data frame of step `tag` from
    /// every link `from` selects (into [`Wire::got`], by link index), within `timeout`.
    ///
    /// # Errors
    /// The first link's failure (see [`Link::take_data`]), or a sentence naming the first
    /// peer still owed a frame (or still not taking one) when the timeout passes.
    pub(crate) fn exchange(
        &mut self,
        links: &[Link],
        bytes: &[u8],
        to: impl Fn(usize) -> bool,
        from: impl Fn(usize) -> bool,
        tag: u64,
        timeout: Duration,
    ) -> Result<(), String> {
        let sent = |i| if to(i) { 0 } else { bytes.len() };
        self.exchange_from(links, bytes, sent, from, tag, timeout)
    }

    /// [`Wire::exchange`] of a frame already partly sent: `sent(i)` bytes of `bytes` are on
    /// link `i`'s wire (`bytes.len()` for a link it does not go to).
    ///
    /// # Errors
    /// As [`Wire::exchange`].
    pub(crate) fn exchange_from(
        &mut self,
        links: &[Link],
        bytes: &[u8],
        sent: impl Fn(usize) -> usize,
        from: impl Fn(usize) -> bool,
        tag: u64,
        timeout: Duration,
    ) -> Result<(), String> {
        self.drive(links, bytes, sent, from, (tag, None), timeout)
    }

    /// [`Wire::exchange`] for partials that may travel in chunks (`frame::encode_partial`):
    /// sends `bytes` (one partial's frames) to every link `to` selects, and from every link
    /// `from` selects takes the chunks of step `tag`'s partial at `layer` and `point` until the
    /// last, leaving in [`Wire::got`] one [`Frame::Partial`] (with `point`) holding their
    /// values in order. A frame that is not the expected chunk is left in `got` as it came
    /// and ends that link's part, for the caller's check to name; the frames a link sent
    /// after it stay unread.
    ///
    /// # Errors
    /// As [`Wire::exchange`].
    pub(crate) fn exchange_partials(
        &mut self,
        links: &[Link],
        bytes: &[u8],
        to: impl Fn(usize) -> bool,
        from: impl Fn(usize) -> bool,
        key: (u64, u32, u8),
        timeout: Duration,
    ) -> Result<(), String> {
        let sent = |i| if to(i) { 0 } else { bytes.len() };
        self.exchange_partials_from(links, bytes, sent, from, key, timeout)
    }

    /// [`Wire::exchange_partials`] of frames already partly sent: `sent(i)` bytes of `bytes`
    /// are on link `i`'s wire (`bytes.len()` for a link they do not go to).
    ///
    /// # Errors
    /// As [`Wire::exchange`].
    pub(crate) fn exchange_partials_from(
        &mut self,
        links: &[Link],
        bytes: &[u8],
        sent: impl Fn(usize) -> usize,
        from: impl Fn(usize) -> bool,
        (tag, layer, point): (u64, u32, u8),
        timeout: Duration,
    ) -> Result<(), String> {
        self.drive(
            links,
            bytes,
            sent,
            from,
            (tag, Some((layer, point))),
            timeout,
        )
    }

    /// The exchange loop: writes what each socket takes, and takes every frame that has
    /// arrived on each link `from` selects until that link's part is whole — one frame, or
    /// with `partial` = (layer, point) the chunks of that partial — whether or not this
    /// rank's own writes are done: reads never wait on writes, so ranks that all send more
    /// than the sockets buffer cannot wait on each other. Fails when nothing has moved for
    /// `timeout`: a peer still sending a long partial is alive, however long it takes.
    fn drive(
        &mut self,
        links: &[Link],
        bytes: &[u8],
        sent: impl Fn(usize) -> usize,
        from: impl Fn(usize) -> bool,
        (tag, partial): (u64, Option<(u32, u8)>),
        timeout: Duration,
    ) -> Result<(), String> {
        let n = links.len();
        self.sent.clear();
        self.sent.extend((0..n).map(sent));
        self.got.clear();
        self.got.resize_with(n, || None);
        self.chunks.resize_with(n, Vec::new);
        for c in &mut self.chunks {
            c.clear();
        }
        let mut idle_since = Instant::now();
        loop {
            let mut moved = false;
            let mut done = true;
            for (i, l) in links.iter().enumerate() {
                // A link's part is done once every byte is taken and none waits in it (TLS
                // records rustls made but the socket did not take yet).
                if self.sent[i] < bytes.len() || l.pending() {
                    let before = self.sent[i];
                    moved |= l.write_some(bytes, &mut self.sent[i])?;
                    self.written += (self.sent[i] - before) as u64;
                    done &= self.sent[i] == bytes.len() && !l.pending();
                }
            }
            for (i, l) in links.iter().enumerate() {
                while from(i) && self.got[i].is_none() {
                    let (read, frame) = l.take_data(tag)?;
                    moved |= read || frame.is_some();
                    let Some(frame) = frame else { break };
                    self.got[i] = match partial {
                        None => Some(frame),
                        Some((layer, point)) => self.chunk(i, frame, (tag, layer, point)),
                    };
                }
                done &= !from(i) || self.got[i].is_some();
            }
            if done {
                return Ok(());
            }
            let now = Instant::now();
            if moved {
                idle_since = now;
                continue;
            }
            let idle = now - idle_since;
            if idle >= timeout {
                return Err(self.late(links, &from, bytes.len(), timeout));
            }
            if idle < SPIN {
                std::hint::spin_loop();
            } else if idle < WATCH {
                std::thread::yield_now();
            } else {
                self.poll
                    .poll(&mut self.events, Some(timeout - idle))
                    .map_err(|e| format!("tensor-parallel group: waiting for peers: {e}"))?;
            }
        }
    }

    /// Link `i`'s next frame in a chunked partial of step `tag` at (`layer`, `point`): a
    /// chunk marked "more" is kept (`None`: the part goes on); the last comes back holding
    /// every chunk's values in order; any other frame comes back as it is.
    fn chunk(
        &mut self,
        i: usize,
        frame: Frame,
        (tag, layer, point): (u64, u32, u8),
    ) -> Option<Frame> {
        match frame {
            Frame::Partial {
                tag: t,
                layer: y,
                point: p,
                data,
            } if t == tag && y == layer && p == point | MORE => {
                self.chunks[i].extend_from_slice(&data);
                None
            }
            Frame::Partial {
                tag: t,
                layer: y,
                point: p,
                mut data,
            } if t == tag && y == layer && p == point && !self.chunks[i].is_empty() => {
                let mut all = std::mem::take(&mut self.chunks[i]);
                all.append(&mut data);
                Some(Frame::Partial {
                    tag,
                    layer,
                    point,
                    data: all,
                })
            }
            other => Some(other),
        }
    }

    /// The timeout's message, naming the first peer that held the exchange up.
    fn late(
        &self,
        links: &[Link],
        from: &impl Fn(usize) -> bool,
        total: usize,
        timeout: Duration,
    ) -> String {
        let ms = timeout.as_millis();
        for (i, l) in links.iter().enumerate() {
            if from(i) && self.got[i].is_none() {
                return l.named(&format!("sent nothing for {ms} ms (stopped or overloaded)"));
            }
        }
        for (i, l) in links.iter().enumerate() {
            if self.sent[i] < total || l.pending() {
                return l.named(&format!("took nothing for {ms} ms (stopped or overloaded)"));
            }
        }
        format!("tensor-parallel group: peers took no data for {ms} ms (stopped or overloaded)")
    }
}
