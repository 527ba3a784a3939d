//! tessera's test kit, for tests only (crates take it as a dev-dependency), one concept a
//! module:
//!
//! - the real models' locations ([`smollm2_gguf`], [`minilm_dir`]) and the embedding goldens
//!   ([`minilm_golden`]), deterministic random data ([`TestRng`]) and
//!   random-weight models ([`MemoryWeights`] in memory, [`write_random_llama`] as GGUF files);
//! - `tessera` processes ([`Tessera`]: start the binary, read the addresses it prints, run it
//!   to completion) and loopback networking ([`free_port`], [`scrape`], the cuttable
//!   [`Proxy`]);
//! - clusters of processes: one coordinator and its workers ([`ProcessCluster`]), three
//!   replicated coordinators that a test can partition ([`RaftCluster`]);
//! - the HTTP API from a client's side ([`http`]: requests, event streams);
//! - the public API from a client's side ([`greedy`] requests, [`collect`] a stream);
//! - the coordinator's side of a worker's `Pipeline` stream ([`Driver`], [`Seq`]).
//!
//! Only the cli crate's tests know where the `tessera` binary is
//! (`env!("CARGO_BIN_EXE_tessera")`): they pass it to [`Tessera::new`].

#![forbid(unsafe_code)]

mod cluster;
mod embedding_golden;
pub mod http;
mod net;
mod pipeline;
mod process;
mod raft_cluster;
mod random_gguf;
mod real_model;
mod requests;
mod rng;
mod streaming;
mod weights;

pub use cluster::{HEARTBEAT_TIMEOUT_MS, KV_TOKENS, ProcessCluster};
pub use embedding_golden::{EmbeddingCase, cosine, minilm_golden, minilm_golden_dir};
pub use net::{Proxy, free_addr, free_port, sample, scrape, url_list};
pub use pipeline::{CHUNK, Driver, Seq, drive, seq_start, seqs_for, to_sampled};
pub use process::{
    Addresses, START_TIMEOUT, Tessera, certs_args, certs_dir, kill, lone_coordinator_args,
    member_args, member_tls, python, python_examples, signal, strings, temp_dir,
};
pub use raft_cluster::RaftCluster;
pub use random_gguf::{RandomLlama, write_random_llama};
pub use real_model::{
    MINILM_NAME, SMOLLM2_FILE, SMOLLM2_NAME, minilm_dir, smollm2_arg, smollm2_gguf,
};
pub use requests::{
    Collected, PROMPTS, Rest, argmax, collect, collect_finished, count_tokens, finish_stream,
    greedy, greedy_exact, greedy_with_logprobs, ids_and_logprobs, inference_client, lazy_channel,
    runtime, seeded_exact, story, stream_error, worker_ids,
};
pub use rng::TestRng;
pub use streaming::{StreamingChild, resumed_after};
pub use tempfile::TempDir;
pub use weights::MemoryWeights;
