//! The cluster state: the one value the coordinators replicate (through Raft, in a later
//! issue). It holds the workers, the model and the current plan, and changes only through
//! [`ClusterState::apply`] of a [`Command`]: deterministic, with no clocks or randomness
//! inside, so every replica applying the same log reaches the same state. Ids come in the
//! commands; liveness times (heartbeats) are not replicated and live outside.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::state::planner::{Plan, WorkerCapacity};

/// A registered worker.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerRecord {
    /// Its id, unique for the life of the state.
    pub id: String,
    /// Where its Worker service listens (host:port).
    pub address: String,
    /// A human-readable name.
    pub name: String,
    /// Memory it may use for weights and KV cache; 0 = no limit.
    pub memory_bytes: u64,
    /// Compute threads.
    pub threads: u32,
    /// Accelerators its shard runs on (empty: a CPU worker).
    pub devices: Vec<DeviceRecord>,
    /// Where its peer port listens (tensor-parallel groups dial it); empty for a worker that
    /// did not say (one registered by an older version).
    #[serde(default)]
    pub peer_address: String,
    /// Liveness epoch: the state's registration counter when it (re-)registered, so a process
    /// that comes back at the same address is a newer incarnation.
    pub epoch: u64,
}

impl WorkerRecord {
    /// What the planner needs of it.
    pub fn capacity(&self) -> WorkerCapacity {
        WorkerCapacity {
            id: self.id.clone(),
            // A worker declaring 0 sets no limit.
            memory_bytes: if self.memory_bytes == 0 {
                u64::MAX
            } else {
                self.memory_bytes
            },
            threads: self.threads,
            // Heartbeats carry the measured RTT; the plan controller fills it in.
            link_rtt_us: 0,
            device_bytes_s: self.devices.iter().map(|d| d.bandwidth_bytes_s).sum(),
        }
    }
}

/// An accelerator a worker declared at registration (`tessera.v1.Device`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRecord {
    /// How the worker addresses it (`cuda:0`).
    pub id: String,
    /// The device's name.
    pub name: String,
    /// Its total memory, bytes.
    pub memory_bytes: u64,
    /// Its peak memory bandwidth, bytes per second.
    pub bandwidth_bytes_s: u64,
}

/// A change to the cluster state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Command {
    /// Serve this model (a cache name or a path, sent to workers as is).
    SetModel {
        /// The model.
        model: String,
    },
    /// Adds a worker; replaces any worker registered at the same address (an old incarnation).
    RegisterWorker {
        /// The new worker's id (see [`ClusterState::next_worker_id`]).
        id: String,
        /// Where its Worker service listens.
        address: String,
        /// A human-readable name.
        name: String,
        /// Memory it may use.
        memory_bytes: u64,
        /// Compute threads.
        threads: u32,
        /// Accelerators.
        devices: Vec<DeviceRecord>,
        /// Its peer port.
        #[serde(default)]
        peer_address: String,
    },
    /// Drops a worker; a plan that used it no longer serves.
    RemoveWorker {
        /// The worker.
        id: String,
    },
    /// Installs a new plan (not yet loaded) under a higher epoch, or clears it.
    SetPlan {
        /// The new epoch; must exceed the current one.
        epoch: u64,
        /// The plan; `None` = no plan.
        plan: Option<Plan>,
    },
    /// Every worker of the plan at `epoch` has loaded its shard: it serves.
    PlanReady {
        /// The plan's epoch.
        epoch: u64,
    },
    /// Changes nothing. A new leader commits one to know that its state includes every
    /// command committed before its term, before it acts on that state.
    Barrier,
}

/// Why a command was refused (the state is unchanged).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    /// A command names a worker the state does not have.
    #[error("unknown worker `{0}`")]
    UnknownWorker(String),
    /// A worker id is already taken.
    #[error("worker id `{0}` is already registered")]
    DuplicateId(String),
    /// A plan epoch that does not move forward, or readiness for a plan that is not current.
    #[error("plan epoch {got} is stale (current {current})")]
    StaleEpoch {
        /// The epoch in the command.
        got: u64,
        /// The state's.
        current: u64,
    },
}

/// Workers, model and plan, as replicated.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ClusterState {
    model: String,
    workers: BTreeMap<String, WorkerRecord>,
    plan: Option<Plan>,
    plan_epoch: u64,
    ready: bool,
    registrations: u64,
}

impl ClusterState {
    /// An empty state serving `model`.
    pub fn new(model: &str) -> Self {
        Self {
            model: model.to_owned(),
            ..Self::default()
        }
    }

    /// The model served.
    pub fn model(&self) -> &str {
        &self.model
    }

    /// Registered workers, by id.
    pub fn workers(&self) -> impl Iterator<Item = &WorkerRecord> {
        self.workers.values()
    }

    /// One worker.
    pub fn worker(&self, id: &str) -> Option<&WorkerRecord> {
        self.workers.get(id)
    }

    /// The current plan, loaded or not.
    pub fn plan(&self) -> Option<&Plan> {
        self.plan.as_ref()
    }

    /// The current plan's epoch (0 before the first plan); increases with every plan.
    pub fn plan_epoch(&self) -> u64 {
        self.plan_epoch
    }

    /// Whether the current plan is loaded and serves.
    pub fn ready(&self) -> bool {
        self.ready && self.plan.is_some()
    }

    /// The id the next registration will get: deterministic from the state, so every replica
    /// proposing it agrees.
    pub fn next_worker_id(&self) -> String {
        format!("w{}", self.registrations + 1)
    }

    /// Applies a command; on error the state is unchanged.
    ///
    /// # Errors
    /// [`StateError`] when the command does not apply to this state.
    pub fn apply(&mut self, cmd: Command) -> Result<(), StateError> {
        match cmd {
            Command::SetModel { model } => {
                if model != self.model {
                    self.model = model;
                    self.plan = None;
                    self.ready = false;
                }
            }
            Command::RegisterWorker {
                id,
                address,
                name,
                memory_bytes,
                threads,
                devices,
                peer_address,
            } => {
                if self.workers.contains_key(&id) {
                    return Err(StateError::DuplicateId(id));
                }
                let old: Vec<String> = self
                    .workers
                    .values()
                    .filter(|w| w.address == address)
                    .map(|w| w.id.clone())
                    .collect();
                for o in old {
                    self.remove(&o);
                }
                self.registrations += 1;
                let epoch = self.registrations;
                self.workers.insert(
                    id.clone(),
                    WorkerRecord {
                        id,
                        address,
                        name,
                        memory_bytes,
                        threads,
                        devices,
                        peer_address,
                        epoch,
                    },
                );
            }
            Command::RemoveWorker { id } => {
                if !self.workers.contains_key(&id) {
                    return Err(StateError::UnknownWorker(id));
                }
                self.remove(&id);
            }
            Command::SetPlan { epoch, plan } => {
                if epoch <= self.plan_epoch {
                    return Err(StateError::StaleEpoch {
                        got: epoch,
                        current: self.plan_epoch,
                    });
                }
                if let Some(p) = &plan
                    && let Some(s) = p
                        .stages
                        .iter()
                        .find(|s| !self.workers.contains_key(&s.worker_id))
                {
                    return Err(StateError::UnknownWorker(s.worker_id.clone()));
                }
                self.plan = plan;
                self.plan_epoch = epoch;
                self.ready = false;
            }
            Command::PlanReady { epoch } => {
                if epoch != self.plan_epoch || self.plan.is_none() {
                    return Err(StateError::StaleEpoch {
                        got: epoch,
                        current: self.plan_epoch,
                    });
                }
                self.ready = true;
            }
            Command::Barrier => {}
        }
        Ok(())
    }

    /// Removes a worker; a plan that used it is dropped (its epoch stays, so the next plan's
    /// is higher).
    fn remove(&mut self, id: &str) {
        self.workers.remove(id);
        if self.plan.as_ref().is_some_and(|p| p.stage_of(id).is_some()) {
            self.plan = None;
            self.ready = false;
        }
    }
}

#[cfg(test)]
mod tests;
