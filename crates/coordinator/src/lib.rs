//! The tessera coordinator (being built).
