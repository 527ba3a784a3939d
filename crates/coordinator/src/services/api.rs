//! The public `tessera.v1.Inference` service: Generate (streamed through the scheduler),
//! Embed (through the embedding scheduler, on a cluster that serves an encoder), Tokenize,
//! ListModels and ClusterStatus. On a follower, Generate, Embed and ClusterStatus are
//! forwarded to the leader; Tokenize and ListModels are answered locally (same model, and
//! readiness comes from the replicated state, confirmed current by a ReadIndex first).

use std::sync::Arc;
use std::time::Instant;

use tessera_proto::status;
use tessera_proto::v1 as pb;
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::{Request, Response, Status};

use crate::control::embedder::EmbedderHandle;
use crate::control::plan::assignment;
use crate::control::scheduler::{EventResult, SchedulerHandle};
use crate::error::CoordinatorError;
use crate::services::forward::{Forwarder, Route};
use crate::services::relay::Relay;
use crate::services::validate::Validator;
use crate::state::cluster::Cluster;

/// How long a follower waits for the leader's status before answering from its own replica.
const STATUS_FORWARD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);
/// How long a status or model read waits for its replica to be confirmed current (ReadIndex)
/// before answering from it unconfirmed (`linearizable: false`).
const CONFIRM_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// The Inference service.
#[derive(Clone, Debug)]
pub struct Api {
    cluster: Arc<Cluster>,
    validator: Validator,
    serve: Serve,
    forward: Arc<Forwarder>,
    /// Tokenization runs on blocking threads, this many at a time: however many requests
    /// arrive, the async runtime (and the Raft node on it) keeps its threads.
    tokenizers: Arc<Semaphore>,
}

/// What serves this cluster's model: the generation scheduler (a decoder), or the embedding
/// scheduler (an encoder). Validation refuses the other kind of request first.
#[derive(Clone, Debug)]
pub enum Serve {
    /// Generate requests.
    Generate(SchedulerHandle),
    /// Embed requests.
    Embed(EmbedderHandle),
}

impl Api {
    /// The service over the shared cluster, its validator and what serves the model.
    pub fn new(cluster: Arc<Cluster>, validator: Validator, serve: Serve) -> Self {
        Self {
            cluster,
            validator,
            serve,
            forward: Arc::new(Forwarder::default()),
            tokenizers: Arc::new(Semaphore::new(
                std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get),
            )),
        }
    }

    /// Whether this node's replica is confirmed current (Raft's ReadIndex, through the leader
    /// when this node follows) within [`CONFIRM_TIMEOUT`]: reading it right after is then
    /// linearizable.
    async fn confirm_replica(&self) -> bool {
        let read = tokio::time::timeout(CONFIRM_TIMEOUT, self.cluster.raft().read_index()).await;
        match read {
            Ok(Ok(_)) => true,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "the replica could not be confirmed current");
                false
            }
            Err(_) => {
                tracing::debug!("confirming the replica current timed out");
                false
            }
        }
    }

    /// Validates on a blocking thread (tokenization can take a while on a long prompt),
    /// waiting for a free tokenizer slot first.
    async fn validate(
        &self,
        req: pb::GenerateRequest,
        received: Instant,
    ) -> Result<crate::validate::ValidRequest, CoordinatorError> {
        let permit = Arc::clone(&self.tokenizers)
            .acquire_owned()
            .await
            .map_err(|_| CoordinatorError::Internal("the tokenizer pool is closed".into()))?;
        let validator = self.validator.clone();
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            validator.validate(req, received)
        })
        .await
        .map_err(|e| CoordinatorError::Internal(format!("tokenization task: {e}")))?
    }

    /// Validates `req` and hands it to this node's scheduler, its events to `events`; returns
    /// the response headers that name its id and seed (what a client resuming it sends back).
    pub(super) async fn submit_local(
        &self,
        req: pb::GenerateRequest,
        received: Instant,
        metadata: &MetadataMap,
        events: mpsc::UnboundedSender<EventResult>,
    ) -> Result<MetadataMap, Status> {
        let valid = self
            .validate(req, received)
            .await
            .map_err(|e| self.refused(e))?;
        let mut headers = MetadataMap::new();
        if let Ok(v) = MetadataValue::try_from(valid.request_id.as_str()) {
            headers.insert(status::REQUEST_ID_HEADER, v);
        }
        headers.insert(status::SEED_HEADER, MetadataValue::from(valid.seed));
        let Serve::Generate(scheduler) = &self.serve else {
            // Validation refuses Generate on an encoder.
            return Err(self.refused(CoordinatorError::Internal(
                "no generation scheduler on an embedding cluster".into(),
            )));
        };
        scheduler
            .submit(valid, events, metadata)
            .map_err(|e| self.refused(e))?;
        Ok(headers)
    }

    /// Validates an embed request (tokenizing on a blocking thread, as Generate does) and
    /// waits for this node's embedding scheduler to answer it.
    async fn embed_local(
        &self,
        req: pb::EmbedRequest,
        received: Instant,
    ) -> Result<pb::EmbedResponse, Status> {
        let permit = Arc::clone(&self.tokenizers)
            .acquire_owned()
            .await
            .map_err(|_| Status::internal("the tokenizer pool is closed"))?;
        let validator = self.validator.clone();
        let valid = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            validator.validate_embed(req, received)
        })
        .await
        .map_err(|e| Status::internal(format!("tokenization task: {e}")))?
        .map_err(|e| self.refused(e))?;
        let Serve::Embed(embedder) = &self.serve else {
            return Err(self.refused(CoordinatorError::Internal(
                "no embedding scheduler on a generation cluster".into(),
            )));
        };
        let (request_id, tokens) = (valid.request_id.clone(), valid.tokens());
        let answer = embedder.submit(valid).map_err(|e| self.refused(e))?;
        let vectors = answer
            .await
            .map_err(|_| Status::internal("the embedding scheduler dropped the request"))??;
        Ok(pb::EmbedResponse {
            request_id,
            embeddings: vectors
                .into_iter()
                .enumerate()
                .map(|(i, values)| pb::Embedding {
                    index: i as u32,
                    values,
                })
                .collect(),
            prompt_tokens: tokens as u32,
            model: self.cluster.cfg.model.clone(),
        })
    }

    /// Where this node's calls go now (see [`Forwarder::route`]).
    pub(super) async fn route(&self) -> Result<Route, CoordinatorError> {
        self.forward.route(&self.cluster).await
    }

    /// Counts and logs a refused request.
    fn refused(&self, e: CoordinatorError) -> Status {
        tracing::info!(error = %e, "generate request refused");
        let outcome = match e {
            CoordinatorError::InvalidArgument { .. } => "invalid",
            CoordinatorError::ResourceExhausted(_) => "rejected",
            _ => "error",
        };
        self.cluster.metrics.request_ended(outcome);
        Status::from(e)
    }
}

#[tonic::async_trait]
impl pb::inference_server::Inference for Api {
    type GenerateStream = UnboundedReceiverStream<EventResult>;

    async fn generate(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        let received = Instant::now();
        let (metadata, _, req) = request.into_parts();
        // Refused before it is forwarded or tokenized: a huge request costs a length check.
        self.validator
            .check_size(&req)
            .map_err(|e| self.refused(e))?;
        let deadline = grpc_timeout(&metadata).map(|t| received + t);
        let (tx, rx) = mpsc::unbounded_channel();
        let mut resp = Response::new(UnboundedReceiverStream::new(with_deadline(rx, deadline)));
        if let Route::Leader(leader) = self.forward.route(&self.cluster).await? {
            // Relayed, and resumed on the next leader should this one die (see `relay`).
            let headers = Relay::start(self.clone(), leader, req, &metadata, deadline, tx).await?;
            *resp.metadata_mut() = headers;
            return Ok(resp);
        }
        let headers = self.submit_local(req, received, &metadata, tx).await?;
        *resp.metadata_mut() = headers;
        Ok(resp)
    }

    async fn embed(
        &self,
        request: Request<pb::EmbedRequest>,
    ) -> Result<Response<pb::EmbedResponse>, Status> {
        let received = Instant::now();
        let (metadata, extensions, req) = request.into_parts();
        // Refused before it is forwarded or tokenized: a huge request costs a length check.
        self.validator
            .check_embed_size(&req)
            .map_err(|e| self.refused(e))?;
        if let Route::Leader(mut leader) = self.forward.route(&self.cluster).await? {
            let forwarded = Request::from_parts(metadata, extensions, req);
            return leader.embed(forwarded).await;
        }
        let fut = self.embed_local(req, received);
        match grpc_timeout(&metadata) {
            Some(t) => tokio::time::timeout(t, fut)
                .await
                .map_err(|_| Status::deadline_exceeded("the request's deadline passed"))?
                .map(Response::new),
            None => fut.await.map(Response::new),
        }
    }

    async fn tokenize(
        &self,
        request: Request<pb::TokenizeRequest>,
    ) -> Result<Response<pb::TokenizeResponse>, Status> {
        let req = request.into_inner();
        self.validator.check_model(&req.model)?;
        let (text, chat) = match req.prompt {
            Some(pb::tokenize_request::Prompt::Text(t)) => (Some(t), None),
            Some(pb::tokenize_request::Prompt::Chat(c)) => (None, Some(c)),
            None => (None, None),
        };
        let prompt = Validator::prompt(text, chat)?;
        let frontend = self.validator.frontend();
        let text = frontend
            .prompt_text(&prompt)
            .map_err(CoordinatorError::from)?
            .into_owned();
        let ids = frontend
            .tokenize_prompt(&prompt)
            .map_err(CoordinatorError::from)?;
        Ok(Response::new(pb::TokenizeResponse { ids, text }))
    }

    async fn list_models(
        &self,
        request: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        // Readiness comes from the replicated state, which this coordinator (leader or
        // follower) confirms current before reading it.
        let linearizable = !request.get_ref().local && self.confirm_replica().await;
        let cfg = self.validator.frontend().config();
        let arch = cfg.arch.name().to_owned();
        Ok(Response::new(pb::ListModelsResponse {
            models: vec![pb::ModelInfo {
                name: self.cluster.cfg.model.clone(),
                architecture: arch,
                layers: cfg.n_layers as u32,
                context_length: self.validator.context() as u32,
                vocab_size: cfg.vocab_size as u32,
                ready: self.cluster.serving().is_some(),
            }],
            linearizable,
        }))
    }

    async fn cluster_status(
        &self,
        request: Request<pb::ClusterStatusRequest>,
    ) -> Result<Response<pb::ClusterStatusResponse>, Status> {
        let local = request.get_ref().local;
        // The leader knows liveness and load; when it cannot be reached, this node answers
        // from its own replica.
        if !local
            && !self.cluster.replica().is_leading()
            && self.cluster.leader_address().is_some()
            && let Ok(Route::Leader(mut leader)) = self.forward.route(&self.cluster).await
        {
            let req = request.into_inner();
            match tokio::time::timeout(STATUS_FORWARD_TIMEOUT, leader.cluster_status(req)).await {
                Ok(Ok(resp)) => return Ok(resp),
                Ok(Err(e)) => tracing::debug!(error = %e, "status from the leader failed"),
                Err(_) => tracing::debug!("status from the leader timed out"),
            }
        }
        // This node confirms its view before reading it: a leader cut off from the others may
        // not know yet that it was deposed, and a follower may lag; either replica may be stale.
        let linearizable = !local && self.confirm_replica().await;
        let raft = self.cluster.raft().status();
        let st = self.cluster.state();
        let seen = self.cluster.liveness.snapshot();
        let now = Instant::now();
        let workers = st
            .workers()
            .map(|w| {
                let s = seen.get(&w.id);
                pb::WorkerStatus {
                    worker_id: w.id.clone(),
                    address: w.address.clone(),
                    capacity: Some(pb::Capacity {
                        memory_bytes: w.memory_bytes,
                        threads: w.threads,
                        devices: w
                            .devices
                            .iter()
                            .map(|d| pb::Device {
                                id: d.id.clone(),
                                name: d.name.clone(),
                                memory_bytes: d.memory_bytes,
                                bandwidth_bytes_s: d.bandwidth_bytes_s,
                            })
                            .collect(),
                    }),
                    resident_bytes: s.map_or(0, |s| s.resident_bytes),
                    weight_bytes: s.map_or(0, |s| s.weight_bytes),
                    last_seen_ms: s.map(|s| now.duration_since(s.at).as_millis() as u64),
                    shard: st.plan().and_then(|p| p.stage_of(&w.id)).map(assignment),
                    kv_bytes: s.map_or(0, |s| s.kv_bytes),
                    link_rtt_us: s.and_then(|s| (s.link_rtt_us > 0).then_some(s.link_rtt_us)),
                    tp_steps: s.map_or(0, |s| s.tp_steps),
                    tp_reduce_us: s.map_or(0, |s| s.tp_reduce_us),
                    peer_bytes_sent: s.map_or(0, |s| s.peer_bytes_sent),
                    kv_used_bytes: s.map_or(0, |s| s.kv_used_bytes),
                }
            })
            .collect();
        Ok(Response::new(pb::ClusterStatusResponse {
            model: st.model().to_owned(),
            plan_epoch: st.plan_epoch(),
            ready: self.cluster.serving().is_some(),
            workers,
            running_requests: self.cluster.load.running() as u32,
            leader: raft
                .leader
                .and_then(|l| raft.addresses.get(&l).map(|a| format!("{l}={a}")))
                .unwrap_or_default(),
            term: raft.term,
            commit_index: raft.commit,
            members: raft
                .members
                .voters
                .iter()
                .map(|id| {
                    let addr = raft.addresses.get(id).map_or("?", String::as_str);
                    format!("{id}={addr}")
                })
                .chain(raft.members.learners.iter().map(|id| {
                    let addr = raft.addresses.get(id).map_or("?", String::as_str);
                    format!("{id}={addr} (learner)")
                }))
                .collect(),
            linearizable,
        }))
    }
}

/// The time a gRPC client gives its call (`grpc-timeout`: up to 8 digits and a unit, H M S
/// m u n), if it set one.
fn grpc_timeout(metadata: &tonic::metadata::MetadataMap) -> Option<std::time::Duration> {
    use std::time::Duration;
    let v = metadata.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// `events`, ended with DEADLINE_EXCEEDED at `deadline` (when set). Dropping the scheduler's
/// receiver then cancels the request there, so its queue place and KV are freed; a client
/// that goes away ends the relay at once.
fn with_deadline(
    mut events: mpsc::UnboundedReceiver<EventResult>,
    deadline: Option<Instant>,
) -> mpsc::UnboundedReceiver<EventResult> {
    let Some(deadline) = deadline else {
        return events;
    };
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let expired = tokio::time::sleep_until(deadline.into());
        tokio::pin!(expired);
        loop {
            tokio::select! {
                ev = events.recv() => match ev {
                    Some(ev) => if tx.send(ev).is_err() { return },
                    None => return,
                },
                () = &mut expired => {
                    let _ = tx.send(Err(Status::deadline_exceeded(
                        "the request did not finish within the client's deadline (grpc-timeout)",
                    )));
                    return;
                }
                () = tx.closed() => return,
            }
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Ensures that every `grpc-timeout` unit parses, and malformed values are ignored.
    #[test]
    fn parses_grpc_timeouts() {
        let table = [
            ("5S", Some(Duration::from_secs(5))),
            ("2H", Some(Duration::from_secs(7200))),
            ("3M", Some(Duration::from_secs(180))),
            ("250m", Some(Duration::from_millis(250))),
            ("7u", Some(Duration::from_micros(7))),
            ("9n", Some(Duration::from_nanos(9))),
            ("S", None),
            ("123456789S", None),
            ("5s", None),
            ("x5S", None),
        ];
        for (v, want) in table {
            let mut m = tonic::metadata::MetadataMap::new();
            m.insert("grpc-timeout", v.parse().expect("ascii"));
            assert_eq!(grpc_timeout(&m), want, "{v}");
        }
        assert_eq!(grpc_timeout(&tonic::metadata::MetadataMap::new()), None);
    }
}
