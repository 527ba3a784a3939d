//! The `tessera.cluster.v1.Worker` gRPC service: LoadShard, Pipeline and Release, each a thin
//! translation onto the shard handle (and, for Pipeline, a task per inbound stream).
//!
//! **Who may call.** Under mutual TLS: LoadShard and Release only coordinators; Pipeline the
//! coordinators, and the one worker the current shard names as its upstream (the previous
//! stage's rank 0, `LoadShardRequest.upstream`) — no other worker can feed this shard hidden
//! states. In insecure mode every caller is admitted. Whoever calls, LoadShard opens only
//! models of the store or the allowed directories ([`crate::ModelPaths`]).

use std::sync::{Arc, Mutex, PoisonError};
use tessera_proto::cluster::v1 as pb;
use tessera_proto::cluster::v1::worker_server::Worker;

use tessera_tls::{ClusterTls, Role};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::pipeline;
use crate::shard::ShardHandle;

/// Responses buffered per inbound stream: one per step that may be in flight on it, so the
/// answers of a pipelined caller never wait for it to read the earlier ones.
const RESPONSE_BUFFER: usize = pipeline::MAX_IN_FLIGHT;

/// The Worker service over one shard.
#[derive(Clone, Debug)]
pub(crate) struct WorkerService {
    shard: ShardHandle,
    shutdown: watch::Receiver<bool>,
    tls: ClusterTls,
    model_paths: crate::ModelPaths,
    /// The worker allowed to open Pipeline streams: the last loaded shard's upstream (empty:
    /// coordinators only).
    upstream: Arc<Mutex<String>>,
}

impl WorkerService {
    /// A service over `shard` admitting callers by `tls`; its streams end when `shutdown`
    /// turns true.
    pub fn new(
        shard: ShardHandle,
        shutdown: watch::Receiver<bool>,
        tls: ClusterTls,
        model_paths: crate::ModelPaths,
    ) -> Self {
        Self {
            shard,
            shutdown,
            tls,
            model_paths,
            upstream: Arc::default(),
        }
    }
}

#[tonic::async_trait]
impl Worker for WorkerService {
    async fn load_shard(
        &self,
        request: Request<pb::LoadShardRequest>,
    ) -> Result<Response<pb::LoadShardResponse>, Status> {
        self.tls.authorize(&request, &[Role::Coordinator])?;
        let req = request.into_inner();
        self.model_paths.check(&req.model)?;
        let upstream = req.upstream.clone();
        let span = tracing::info_span!("LoadShard", epoch = req.plan_epoch, model = %req.model);
        tracing::Instrument::instrument(self.shard.load(req), span)
            .await
            .map(|resp| {
                *self.upstream.lock().unwrap_or_else(PoisonError::into_inner) = upstream;
                Response::new(resp)
            })
            .map_err(|e| {
                tracing::warn!(error = %e, "LoadShard failed");
                e.into()
            })
    }

    type PipelineStream = ReceiverStream<Result<pb::StepResponse, Status>>;

    async fn pipeline(
        &self,
        request: Request<Streaming<pb::StepRequest>>,
    ) -> Result<Response<Self::PipelineStream>, Status> {
        let caller = self
            .tls
            .authorize(&request, &[Role::Coordinator, Role::Worker])?;
        if let Some(caller) = caller.filter(|c| c.role() == Role::Worker) {
            let upstream = self
                .upstream
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone();
            if caller.name() != upstream {
                tracing::warn!(%caller, %upstream, "pipeline stream from a worker that is not this shard's upstream refused");
                return Err(Status::permission_denied(format!(
                    "{caller} is not this shard's upstream stage"
                )));
            }
        }
        let (tx, rx) = mpsc::channel(RESPONSE_BUFFER);
        tokio::spawn(pipeline::run(
            self.shard.clone(),
            request.into_inner(),
            tx,
            self.shutdown.clone(),
            self.tls.clone(),
        ));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn release(
        &self,
        request: Request<pb::ReleaseRequest>,
    ) -> Result<Response<pb::ReleaseResponse>, Status> {
        self.tls.authorize(&request, &[Role::Coordinator])?;
        let ids = request.into_inner().seq_ids;
        tracing::debug!(?ids, "Release");
        self.shard.release(ids).await?;
        Ok(Response::new(pb::ReleaseResponse {}))
    }
}
