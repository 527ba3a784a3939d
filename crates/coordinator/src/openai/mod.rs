//! The OpenAI-compatible HTTP API, on the coordinator's `--http-listen` port:
//!
//! | route | what |
//! |---|---|
//! | `POST /v1/chat/completions` | chat, streamed as server-sent events or whole |
//! | `POST /v1/completions` | text completion, likewise |
//! | `POST /v1/embeddings` | embeddings, on a cluster that serves an encoder ([`embeddings`]) |
//! | `GET /v1/models`, `GET /v1/models/{id}` | the served model |
//! | `GET /health` | 200 while the process serves |
//! | `GET /ready` | 200 when this coordinator knows its Raft leader and a plan serves the model; 503 with the reason otherwise |
//!
//! It is a translation layer over the public gRPC API and nothing else: each choice is one
//! `tessera.v1.Inference/Generate` call on this process's own [`Api`] — validated by the same
//! code, queued by the same scheduler, and forwarded to the leader by the same forwarder when
//! this coordinator follows. So a follower serves HTTP exactly as it serves gRPC, and the two
//! APIs give the same text for the same request.
//!
//! API keys ([`ApiKeys`]) guard `/v1/*`; the health routes stay open. Errors have OpenAI's
//! shape ([`error::ApiError`]); 429 and 503 carry `Retry-After`.

mod embeddings;
mod error;
pub(crate) mod listener;
mod request;
mod respond;
mod resume;

use std::sync::Arc;

use axum::Router;
use axum::body::Body as HttpBody;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use tessera_proto::status;
use tessera_proto::v1 as pb;
use tessera_proto::v1::inference_server::Inference as _;
use tessera_text::sampling::Rng;
use tracing::Instrument as _;

pub use error::{ApiError, Endpoint};
pub use request::{COMPLETIONS_DEFAULT_MAX_TOKENS, MAX_CHOICES, ValidCompletion, parse};

use crate::services::api::Api;
use crate::services::auth::ApiKeys;
use crate::state::cluster::Cluster;

/// Body bytes accepted beyond the longest prompt: the JSON around it (messages, fields).
const BODY_SLACK: usize = 64 * 1024;

/// The HTTP API's shared state.
#[derive(Clone, Debug)]
pub struct OpenAi {
    api: Api,
    cluster: Arc<Cluster>,
    keys: ApiKeys,
    /// The longest body read; a longer one is refused with 413 before it is parsed.
    body_limit: usize,
    /// When the process started (the model's `created`).
    started: u64,
}

impl OpenAi {
    /// The API over `api` (this process's Inference service), guarded by `keys`; bodies over
    /// `max_prompt_bytes` plus room for the JSON around the prompt are refused unread.
    pub fn new(api: Api, cluster: Arc<Cluster>, keys: ApiKeys, max_prompt_bytes: usize) -> Self {
        Self {
            api,
            cluster,
            keys,
            body_limit: max_prompt_bytes.saturating_add(BODY_SLACK),
            started: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        }
    }

    /// The routes.
    pub fn router(self) -> Router {
        Router::new()
            .route("/v1/chat/completions", post(chat))
            .route("/v1/completions", post(completions))
            .route("/v1/embeddings", post(embeddings::embeddings))
            .route("/v1/models", get(models))
            .route("/v1/models/{id}", get(model))
            .route("/health", get(health))
            .route("/ready", get(ready))
            .fallback(not_found)
            .with_state(Arc::new(self))
    }

    fn model_name(&self) -> &str {
        &self.cluster.cfg.model
    }

    fn authorize(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let value = headers.get(header::AUTHORIZATION).map(|v| v.as_bytes());
        self.keys.check(value).map_err(ApiError::unauthorized)
    }

    /// Reads a request body, refusing one over the body limit (413) unread.
    async fn read_body(&self, body: HttpBody) -> Result<axum::body::Bytes, ApiError> {
        axum::body::to_bytes(body, self.body_limit)
            .await
            .map_err(|_| ApiError {
                status: StatusCode::PAYLOAD_TOO_LARGE,
                kind: "invalid_request_error",
                param: None,
                code: Some("request_too_large"),
                message: format!(
                    "body: larger than {} bytes (the longest prompt this cluster accepts, \
                     plus the JSON around it), or not fully received",
                    self.body_limit
                ),
            })
    }

    /// A completion of either endpoint: parse, validate, one generate call per choice, then
    /// the whole response or its stream.
    async fn complete(
        &self,
        headers: HeaderMap,
        body: HttpBody,
        endpoint: Endpoint,
    ) -> Result<Response, ApiError> {
        self.authorize(&headers)?;
        let bytes = self.read_body(body).await?;
        let valid = request::parse(endpoint, &bytes, self.model_name())?;
        // Every choice is seeded, so that a client can resume it (`resume.rs`): the seed is
        // drawn here when the request has none.
        let seed = valid.seed.unwrap_or_else(Rng::entropy_seed);
        let valid = valid.seeded(seed);
        let env = respond::Envelope::new(&valid, self.model_name(), Rng::entropy_seed());
        let span = tracing::info_span!("openai", id = %env.id, endpoint = ?env.endpoint,
            choices = valid.choices.len(), stream = valid.stream);
        let mut streams = respond::Choices::new();
        async {
            for (i, mut req) in valid.choices.into_iter().enumerate() {
                req.request_id = format!("{}-{i}", env.id);
                let mut call = tonic::Request::new(req);
                // A client's W3C trace context joins its spans, as on gRPC.
                for key in ["traceparent", "tracestate"] {
                    if let Some(v) = headers.get(key).and_then(|v| v.to_str().ok())
                        && let Ok(v) = v.parse()
                    {
                        call.metadata_mut().insert(key, v);
                    }
                }
                let stream = self
                    .api
                    .generate(call)
                    .await
                    .map_err(|s| ApiError::from_status(&s, env.endpoint))?;
                streams.insert(i, stream.into_inner());
            }
            Ok::<_, ApiError>(())
        }
        .instrument(span.clone())
        .await?;
        let id = env.id.clone();
        let mut response = if valid.stream {
            respond::stream(env, streams)
        } else {
            let body = respond::collect(&env, streams).instrument(span).await?;
            json_body(&body)
        };
        // What a client needs to resume the answer on another coordinator (`resume.rs`).
        let headers = response.headers_mut();
        if let Ok(v) = axum::http::HeaderValue::from_str(&id) {
            headers.insert(status::REQUEST_ID_HEADER, v);
        }
        headers.insert(status::SEED_HEADER, axum::http::HeaderValue::from(seed));
        Ok(response)
    }

    fn model_object(&self, info: &pb::ModelInfo) -> Value {
        json!({
            "id": info.name,
            "object": "model",
            "created": self.started,
            "owned_by": "tessera",
            "architecture": info.architecture,
            "context_length": info.context_length,
            "ready": info.ready,
        })
    }

    /// The served model, read linearizably when a leader confirms this replica current
    /// (the second value says whether one did; see `ListModelsResponse.linearizable`).
    async fn model_info(&self) -> Result<(pb::ModelInfo, bool), ApiError> {
        let list = self
            .api
            .list_models(tonic::Request::new(pb::ListModelsRequest::default()))
            .await
            .map_err(|s| ApiError::from_status(&s, Endpoint::Chat))?
            .into_inner();
        let info = list.models.into_iter().next().ok_or_else(|| {
            ApiError::from_status(&tonic::Status::internal("no model listed"), Endpoint::Chat)
        })?;
        Ok((info, list.linearizable))
    }
}

/// Header saying whether a model read was confirmed current (ReadIndex): `true` or `false`.
const LINEARIZABLE_HEADER: &str = "x-tessera-linearizable";

/// `response` with [`LINEARIZABLE_HEADER`] set.
fn with_linearizable(mut response: Response, linearizable: bool) -> Response {
    response.headers_mut().insert(
        LINEARIZABLE_HEADER,
        axum::http::HeaderValue::from_static(if linearizable { "true" } else { "false" }),
    );
    response
}

/// A JSON response body.
pub(crate) fn json_body(v: &Value) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], v.to_string()).into_response()
}

fn either(r: Result<Response, ApiError>) -> Response {
    r.unwrap_or_else(IntoResponse::into_response)
}

async fn chat(State(s): State<Arc<OpenAi>>, headers: HeaderMap, body: HttpBody) -> Response {
    either(s.complete(headers, body, Endpoint::Chat).await)
}

async fn completions(State(s): State<Arc<OpenAi>>, headers: HeaderMap, body: HttpBody) -> Response {
    either(s.complete(headers, body, Endpoint::Completions).await)
}

async fn models(State(s): State<Arc<OpenAi>>, headers: HeaderMap) -> Response {
    either(
        async {
            s.authorize(&headers)?;
            let (info, linearizable) = s.model_info().await?;
            Ok(with_linearizable(
                json_body(&json!({"object": "list", "data": [s.model_object(&info)]})),
                linearizable,
            ))
        }
        .await,
    )
}

async fn model(
    State(s): State<Arc<OpenAi>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    either(
        async {
            s.authorize(&headers)?;
            let (info, linearizable) = s.model_info().await?;
            if id != info.name {
                return Err(ApiError::model_not_found(&id, &info.name));
            }
            Ok(with_linearizable(
                json_body(&s.model_object(&info)),
                linearizable,
            ))
        }
        .await,
    )
}

async fn health() -> Response {
    json_body(&json!({"status": "ok"}))
}

/// Ready: a Raft member that knows its leader (or is it) and a plan that serves the model.
async fn ready(State(s): State<Arc<OpenAi>>) -> Response {
    let leader = s.cluster.replica().is_leading() || s.cluster.leader_address().is_some();
    let plan = s.cluster.serving().is_some();
    let reason = match (leader, plan) {
        (true, true) => return json_body(&json!({"status": "ready"})),
        (false, _) => "no Raft leader is known to this coordinator",
        (true, false) => "no plan serves the model (too few workers, or loading)",
    };
    let mut r = json_body(&json!({"status": "not ready", "reason": reason}));
    *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    r
}

async fn not_found() -> Response {
    ApiError {
        status: StatusCode::NOT_FOUND,
        kind: "invalid_request_error",
        param: None,
        code: Some("unknown_url"),
        message: "unknown route; this server serves /v1/chat/completions, /v1/completions, \
                  /v1/embeddings, /v1/models, /health and /ready"
            .into(),
    }
    .into_response()
}
