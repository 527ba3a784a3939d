//! Routes raft-rs's `slog` records into `tracing`, so Raft's own logs land with the rest.
//!
//! raft-rs takes a `slog::Logger`; its default terminal loggers are left out of the build, and
//! this small drain forwards each record (message plus key-values) as a `tracing` event with
//! target `raft` at the matching level.

use std::fmt::{self, Write as _};

use slog::{Drain, KV, Level, Never, OwnedKVList, Record, Serializer};

/// A slog drain that emits tracing events.
struct TracingDrain;

/// Collects `key=value` pairs into one string.
struct KvString(String);

impl Serializer for KvString {
    fn emit_arguments(&mut self, key: slog::Key, val: &fmt::Arguments<'_>) -> slog::Result {
        let _ = write!(self.0, " {key}={val}");
        Ok(())
    }
}

impl Drain for TracingDrain {
    type Ok = ();
    type Err = Never;

    fn log(&self, record: &Record<'_>, values: &OwnedKVList) -> Result<(), Never> {
        let mut kv = KvString(String::new());
        let _ = record.kv().serialize(record, &mut kv);
        let _ = values.serialize(record, &mut kv);
        let msg = record.msg();
        let kv = kv.0;
        match record.level() {
            Level::Critical | Level::Error => tracing::error!(target: "raft", "{msg}{kv}"),
            Level::Warning => tracing::warn!(target: "raft", "{msg}{kv}"),
            Level::Info => tracing::info!(target: "raft", "{msg}{kv}"),
            Level::Debug => tracing::debug!(target: "raft", "{msg}{kv}"),
            Level::Trace => tracing::trace!(target: "raft", "{msg}{kv}"),
        }
        Ok(())
    }
}

/// A raft-rs logger for node `id` that writes through `tracing`.
pub(super) fn logger(id: u64) -> slog::Logger {
    slog::Logger::root(TracingDrain.fuse(), slog::o!("raft_id" => id))
}
