//! A follower's relay of a generate stream it forwarded to the leader — resumed on the next
//! leader when that one dies, so a client connected to a follower sees no error.
//!
//! The relay keeps the client's request, pinned to the request id and seed the leader's
//! response headers named, and the ids of the tokens it has passed on. When the leader's
//! stream breaks in a way that resuming cures ([`status::resumable`]: the connection was torn,
//! or the leader said UNAVAILABLE without marking it final — it stopped leading), the relay
//! routes again (waiting for the election) and sends the same request with a `Resume` of
//! those tokens: to the new leader, or to this node's own scheduler when this node won. The
//! new stream carries the tokens after them — the ones the broken stream would have carried
//! (see the scheduler's `migrate` module) — and the client's stream goes on. At most
//! [`MAX_RESUMES`] resumptions, each within [`REOPEN_WAIT`]; past that the client gets the
//! last error, as UNAVAILABLE.

use std::time::{Duration, Instant};

use tessera_proto::cluster::v1 as cpb;
use tessera_proto::status;
use tessera_proto::v1 as pb;
use tessera_proto::v1::generate_event::Event;
use tokio::sync::mpsc;
use tokio_stream::StreamExt as _;
use tonic::metadata::MetadataMap;
use tonic::transport::Channel;
use tonic::{Request, Status, Streaming};

use crate::control::scheduler::EventResult;
use crate::services::api::Api;
use crate::services::forward::{ACCEPT_TIMEOUT, Route};

/// The most times one relayed stream is resumed.
pub const MAX_RESUMES: u32 = 3;
/// How long one resumption may take to find a leader that accepts it (an election, then the
/// call).
pub const REOPEN_WAIT: Duration = Duration::from_secs(15);
/// Pause between two attempts to reopen while the old leader is still named.
const RETRY_PAUSE: Duration = Duration::from_millis(100);

/// Request headers a forwarded call carries on: the client's trace context, so the leader's
/// spans join its trace.
const CARRIED: [&str; 2] = ["traceparent", "tracestate"];

/// One relayed generate stream.
pub struct Relay {
    api: Api,
    /// The client's request, with the request id and seed of the first response.
    req: pb::GenerateRequest,
    /// The client's trace context headers.
    carried: MetadataMap,
    deadline: Option<Instant>,
    /// Ids of the tokens passed on to the client.
    tokens: Vec<u32>,
    resumes: u32,
    events: mpsc::UnboundedSender<EventResult>,
}

/// Where a (re)opened request streams from.
enum Opened {
    /// A leader's stream.
    Leader(Box<Streaming<pb::GenerateEvent>>),
    /// This node's scheduler, which sends to the client's channel itself.
    Local,
}

impl Relay {
    /// Forwards `req` to `leader` and relays its stream to `events` on a task; returns the
    /// leader's response headers (request id and seed) for the client.
    ///
    /// # Errors
    /// The leader's refusal (INVALID_ARGUMENT and the like, as it sent them), or UNAVAILABLE
    /// when it could not be reached or did not accept within [`ACCEPT_TIMEOUT`].
    pub async fn start(
        api: Api,
        leader: cpb::forward_client::ForwardClient<Channel>,
        req: pb::GenerateRequest,
        metadata: &MetadataMap,
        deadline: Option<Instant>,
        events: mpsc::UnboundedSender<EventResult>,
    ) -> Result<MetadataMap, Status> {
        let mut carried = MetadataMap::new();
        for key in CARRIED {
            if let Some(v) = metadata.get(key) {
                carried.insert(key, v.clone());
            }
        }
        let mut relay = Self {
            api,
            req,
            carried,
            deadline,
            tokens: Vec::new(),
            resumes: 0,
            events,
        };
        let (stream, headers) = relay.forward(leader).await?;
        // Pinned to the id and seed of the first response, so a resumption continues it.
        status::pin_to_response(&mut relay.req, &headers);
        tokio::spawn(relay.run(stream));
        // Only the request's own headers: the rest (content type, date) are this hop's.
        let mut client = MetadataMap::new();
        for key in [status::REQUEST_ID_HEADER, status::SEED_HEADER] {
            if let Some(v) = headers.get(key) {
                client.insert(key, v.clone());
            }
        }
        Ok(client)
    }

    /// Relays `stream` to the client, resuming it when it breaks (see the module docs). Ends
    /// at the Finished event, at an error that resuming does not cure, or when the client
    /// goes away.
    async fn run(mut self, mut stream: Box<Streaming<pb::GenerateEvent>>) {
        loop {
            let broke = loop {
                match stream.next().await {
                    Some(Ok(ev)) => {
                        let finished = matches!(ev.event, Some(Event::Finished(_)));
                        if let Some(Event::Token(t)) = &ev.event {
                            self.tokens.push(t.id);
                        }
                        if self.events.send(Ok(ev)).is_err() || finished {
                            return;
                        }
                    }
                    Some(Err(s)) => break s,
                    None => break Status::unavailable("the leader's stream ended unfinished"),
                }
            };
            if !status::resumable(&broke) || self.resumes >= MAX_RESUMES {
                let broke = status::lost_peer(broke, "the coordinator leader");
                let _ = self.events.send(Err(broke));
                return;
            }
            self.resumes += 1;
            tracing::warn!(request_id = %self.req.request_id, tokens = self.tokens.len(),
                resume = self.resumes, error = %broke.message(),
                "the leader's stream broke; resuming the request");
            self.req.resume = Some(pb::Resume {
                tokens: self.tokens.clone(),
            });
            match self.reopen().await {
                Ok(Opened::Leader(s)) => stream = s,
                // The scheduler streams to the client itself from here.
                Ok(Opened::Local) => return,
                Err(e) => {
                    let _ = self.events.send(Err(e));
                    return;
                }
            }
        }
    }

    /// Sends the (resumed) request to whoever leads now — waiting through an election, and
    /// retrying while the dead leader is still named — within [`REOPEN_WAIT`].
    async fn reopen(&mut self) -> Result<Opened, Status> {
        let until = Instant::now() + REOPEN_WAIT;
        loop {
            let err = match self.api.route().await {
                Ok(Route::Local) => {
                    self.api
                        .submit_local(
                            self.req.clone(),
                            Instant::now(),
                            &self.carried,
                            self.events.clone(),
                        )
                        .await?;
                    return Ok(Opened::Local);
                }
                Ok(Route::Leader(leader)) => match self.forward(leader).await {
                    Ok((stream, _)) => return Ok(Opened::Leader(stream)),
                    Err(e) if status::resumable(&e) => e,
                    Err(e) => return Err(e),
                },
                Err(e) => Status::from(e),
            };
            if Instant::now() + RETRY_PAUSE >= until {
                return Err(Status::unavailable(format!(
                    "the request could not be resumed on a new leader within \
                     {REOPEN_WAIT:?}: {}",
                    err.message()
                )));
            }
            tokio::time::sleep(RETRY_PAUSE).await;
        }
    }

    /// One forwarded call of the request to `leader`: its stream and response headers.
    async fn forward(
        &self,
        mut leader: cpb::forward_client::ForwardClient<Channel>,
    ) -> Result<(Box<Streaming<pb::GenerateEvent>>, MetadataMap), Status> {
        let mut call = Request::new(self.req.clone());
        if let Some(d) = self.deadline {
            call.set_timeout(d.saturating_duration_since(Instant::now()));
        }
        for key in CARRIED {
            if let Some(v) = self.carried.get(key) {
                call.metadata_mut().insert(key, v.clone());
            }
        }
        let resp = tokio::time::timeout(ACCEPT_TIMEOUT, leader.generate(call))
            .await
            .map_err(|_| {
                Status::unavailable(format!(
                    "the coordinator leader did not accept the request within \
                     {ACCEPT_TIMEOUT:?} (cut off, or overloaded)"
                ))
            })?
            .map_err(|s| status::lost_peer(s, "the coordinator leader"))?;
        let (headers, stream, _) = resp.into_parts();
        Ok((Box::new(stream), headers))
    }
}
