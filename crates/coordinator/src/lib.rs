//! The tessera coordinator (being built).

pub mod raft;
