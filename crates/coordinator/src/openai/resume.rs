//! Resuming an HTTP completion after a coordinator's death: the `resume` extension of both
//! endpoints' bodies, read into the `Resume` of each choice's `GenerateRequest`.
//!
//! A streamed answer breaks when the coordinator serving the connection dies (a follower
//! relaying to a dead leader resumes by itself; a client connected to the coordinator that
//! died cannot be helped by anyone but itself). Such a client has what it needs to continue:
//! the response's id (`x-request-id`, each chunk's `id`), its seed (`x-tessera-seed`, drawn by
//! the server when the request had none) and, with `return_token_ids`, the ids of the tokens
//! it received. It sends the same body to any coordinator with `seed` and
//! `resume: {"id", "token_ids": [[…] per choice]}`; each choice is then the gRPC request
//! resumed with those tokens (same request id `<id>-<i>`, same seed), and the stream carries
//! exactly the tokens that follow (see `docs/ARCHITECTURE.md`, "A coordinator dies").

use serde_json::Value;
use tessera_proto::v1 as pb;

use super::error::{ApiError, Endpoint};
use super::request::{Body, ValidCompletion};

/// `resume` of a body: the id of the response it continues and, per choice, the token ids
/// the client has.
pub(super) struct Resume {
    id: String,
    token_ids: Vec<Vec<u32>>,
}

impl ValidCompletion {
    /// Sets each choice's resume tokens and checks their count against the choices.
    pub(super) fn resumed(mut self, resume: Option<Resume>) -> Result<Self, ApiError> {
        let Some(resume) = resume else {
            return Ok(self);
        };
        if resume.token_ids.len() != self.choices.len() {
            return Err(ApiError::invalid(
                "resume.token_ids",
                format!(
                    "expected one list per choice ({}), got {}",
                    self.choices.len(),
                    resume.token_ids.len()
                ),
            ));
        }
        for (req, tokens) in self.choices.iter_mut().zip(resume.token_ids) {
            req.resume = Some(pb::Resume { tokens });
        }
        self.resume_id = Some(resume.id);
        Ok(self)
    }
}

/// `resume`: `{"id": <a response id of this endpoint>, "token_ids": [[ids], …]}`; only
/// with `seed` (the first response's `x-tessera-seed`), or the sampling would differ.
pub(super) fn parse(body: &Body, endpoint: Endpoint) -> Result<Option<Resume>, ApiError> {
    let Some(v) = body.get("resume") else {
        return Ok(None);
    };
    let o = v
        .as_object()
        .ok_or_else(|| ApiError::invalid("resume", "expected an object"))?;
    let prefix = match endpoint {
        Endpoint::Chat => "chatcmpl-",
        Endpoint::Completions => "cmpl-",
    };
    let id = o
        .get("id")
        .and_then(Value::as_str)
        .filter(|id| {
            id.len() <= 64
                && id.strip_prefix(prefix).is_some_and(|rest| {
                    !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_alphanumeric())
                })
        })
        .ok_or_else(|| {
            ApiError::invalid(
                "resume.id",
                format!("required: the id of the response resumed ({prefix}…)"),
            )
        })?;
    let lists = o
        .get("token_ids")
        .and_then(Value::as_array)
        .ok_or_else(|| {
            ApiError::invalid("resume.token_ids", "required: one array of ids per choice")
        })?;
    let token_ids = lists
        .iter()
        .enumerate()
        .map(|(i, list)| {
            let at = || format!("resume.token_ids[{i}]");
            list.as_array()
                .ok_or_else(|| ApiError::invalid(at(), "expected an array of token ids"))?
                .iter()
                .map(|t| {
                    t.as_u64()
                        .and_then(|n| u32::try_from(n).ok())
                        .ok_or_else(|| ApiError::invalid(at(), "expected token ids"))
                })
                .collect()
        })
        .collect::<Result<_, _>>()?;
    if body.get("seed").is_none() {
        return Err(ApiError::invalid(
            "seed",
            "required with resume: the seed the first response named (x-tessera-seed)",
        ));
    }
    Ok(Some(Resume {
        id: id.to_owned(),
        token_ids,
    }))
}
