//! tessera's test kit, for tests only (every crate takes it as a dev-dependency): the real
//! model's location, deterministic random data and random-weight models, temporary
//! directories, and fixtures that start real `tessera` processes and clusters on 127.0.0.1.

#![forbid(unsafe_code)]

mod real_model;
mod rng;
mod weights;

pub use real_model::{SMOLLM2_FILE, SMOLLM2_NAME, smollm2_gguf};
pub use rng::TestRng;
pub use weights::MemoryWeights;
