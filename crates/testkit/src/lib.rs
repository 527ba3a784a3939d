//! tessera's test kit, for tests only (crates take it as a dev-dependency): the real model's
//! location, deterministic random data and random-weight models. (The process and cluster
//! fixtures still live in `crates/cli/tests/support`; moving them here is the next step.)

#![forbid(unsafe_code)]

mod real_model;
mod rng;
mod weights;

pub use real_model::{SMOLLM2_FILE, SMOLLM2_NAME, smollm2_gguf};
pub use rng::TestRng;
pub use weights::MemoryWeights;
