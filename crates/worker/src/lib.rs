//! A tessera worker (being built).
