//! The `tessera.cluster.v1.Worker` gRPC service: LoadShard, Pipeline and Release, each a thin
//! translation onto the shard handle (and, for Pipeline, a task per inbound stream).

use tessera_proto::cluster::v1 as pb;
use tessera_proto::cluster::v1::worker_server::Worker;
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
}

impl WorkerService {
    /// A service over `shard`; its streams end when `shutdown` turns true.
    pub fn new(shard: ShardHandle, shutdown: watch::Receiver<bool>) -> Self {
        Self { shard, shutdown }
    }
}

#[tonic::async_trait]
impl Worker for WorkerService {
    async fn load_shard(
        &self,
        request: Request<pb::LoadShardRequest>,
    ) -> Result<Response<pb::LoadShardResponse>, Status> {
        let req = request.into_inner();
        let span = tracing::info_span!("LoadShard", epoch = req.plan_epoch, model = %req.model);
        tracing::Instrument::instrument(self.shard.load(req), span)
            .await
            .map(Response::new)
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
        let (tx, rx) = mpsc::channel(RESPONSE_BUFFER);
        tokio::spawn(pipeline::run(
            self.shard.clone(),
            request.into_inner(),
            tx,
            self.shutdown.clone(),
        ));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn release(
        &self,
        request: Request<pb::ReleaseRequest>,
    ) -> Result<Response<pb::ReleaseResponse>, Status> {
        let ids = request.into_inner().seq_ids;
        tracing::debug!(?ids, "Release");
        self.shard.release(ids).await?;
        Ok(Response::new(pb::ReleaseResponse {}))
    }
}
