//! The public `tessera.v1.Inference` service: Generate (streamed through the scheduler),
//! Tokenize, ListModels and ClusterStatus.

use std::sync::Arc;
use std::time::Instant;

use tessera_proto::v1 as pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::{Request, Response, Status};

use crate::cluster::Cluster;
use crate::controller::assignment;
use crate::error::CoordinatorError;
use crate::scheduler::{EventResult, SchedulerHandle};
use crate::validate::Validator;

/// The Inference service.
#[derive(Clone, Debug)]
pub struct Api {
    cluster: Arc<Cluster>,
    validator: Validator,
    scheduler: SchedulerHandle,
}

impl Api {
    /// The service over the shared cluster, its validator and scheduler.
    pub fn new(cluster: Arc<Cluster>, validator: Validator, scheduler: SchedulerHandle) -> Self {
        Self {
            cluster,
            validator,
            scheduler,
        }
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
        let req = request.into_inner();
        let valid = self.validator.validate(req, received).map_err(|e| {
            tracing::info!(error = %e, "generate request rejected");
            Status::from(e)
        })?;
        let (tx, rx) = mpsc::unbounded_channel();
        self.scheduler.submit(valid, tx)?;
        Ok(Response::new(UnboundedReceiverStream::new(rx)))
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
        _request: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        let cfg = self.validator.frontend().config();
        let arch = format!("{:?}", cfg.arch).to_lowercase();
        Ok(Response::new(pb::ListModelsResponse {
            models: vec![pb::ModelInfo {
                name: self.cluster.cfg.model.clone(),
                architecture: arch,
                layers: cfg.n_layers as u32,
                context_length: self.validator.context() as u32,
                vocab_size: cfg.vocab_size as u32,
                ready: self.cluster.serving().is_some(),
            }],
        }))
    }

    async fn cluster_status(
        &self,
        _request: Request<pb::ClusterStatusRequest>,
    ) -> Result<Response<pb::ClusterStatusResponse>, Status> {
        let st = self.cluster.state();
        let seen = self.cluster.seen();
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
                        devices: w.devices.clone(),
                    }),
                    resident_bytes: s.map_or(0, |s| s.resident_bytes),
                    weight_bytes: s.map_or(0, |s| s.weight_bytes),
                    last_seen_ms: s
                        .map_or(u64::MAX, |s| now.duration_since(s.at).as_millis() as u64),
                    shard: st.plan().and_then(|p| p.stage_of(&w.id)).map(assignment),
                }
            })
            .collect();
        Ok(Response::new(pb::ClusterStatusResponse {
            model: st.model().to_owned(),
            plan_epoch: st.plan_epoch(),
            ready: self.cluster.serving().is_some(),
            workers,
            running_requests: self.cluster.running() as u32,
            leader: String::new(),
            term: 0,
            commit_index: 0,
            members: Vec::new(),
        }))
    }
}
