//! The replicated state machine seam: what the Raft log drives.
//!
//! The Raft layer is generic over [`StateMachine`] so it can be tested with a toy key-value
//! store and later drive the coordinator's cluster state without knowing its commands.

/// A command the state machine refused. The refusal is part of the replicated history: every
/// node refuses the same command the same way, and the state is left unchanged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ApplyError(pub String);

/// A deterministic state machine replicated by Raft.
///
/// The node calls these methods from its own thread, in log order, never concurrently.
/// `apply` must be a pure function of the current state, the index and the bytes: any
/// nondeterminism (clocks, randomness, I/O) makes replicas diverge.
///
/// The state machine is not persisted by itself: a restarted node restores the latest snapshot
/// and re-applies the committed log after it. So `apply` must also be cheap enough to replay
/// up to one snapshot interval of entries at start-up.
pub trait StateMachine: Send + 'static {
    /// Applies the committed command `data` at log `index` and returns its result, handed to
    /// the proposer.
    ///
    /// # Errors
    /// [`ApplyError`] when the command is refused; the state must then be unchanged.
    fn apply(&mut self, index: u64, data: &[u8]) -> Result<Vec<u8>, ApplyError>;

    /// Serialises the whole state (as of the last applied index) for a snapshot.
    fn snapshot(&self) -> Vec<u8>;

    /// Replaces the whole state with one produced by [`StateMachine::snapshot`].
    ///
    /// # Errors
    /// [`ApplyError`] when `data` cannot be decoded; the node then stops, since it cannot
    /// serve a state it does not have.
    fn restore(&mut self, data: &[u8]) -> Result<(), ApplyError>;
}
