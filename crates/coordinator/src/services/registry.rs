//! Worker registry: the `tessera.cluster.v1.Coordination` service (Register assigns ids,
//! Heartbeat refreshes). Dropping silent workers is [`crate::control::liveness`]'s job.
//!
//! Under mutual TLS only workers may call it, a worker is registered under the name its
//! certificate gives (whatever name it sends), and a heartbeat for a worker id is accepted only
//! from the certificate that id was registered with: one worker cannot keep another alive, or
//! speak for it.

use std::sync::Arc;
use std::time::Instant;

use tessera_proto::cluster::v1 as pb;
use tessera_tls::Role;
use tonic::{Request, Response, Status};

use crate::error::CoordinatorError;
use crate::state::cluster::{Cluster, Seen};
use crate::state::{Command, DeviceRecord};

/// The Coordination service.
#[derive(Clone, Debug)]
pub struct Registry {
    cluster: Arc<Cluster>,
}

impl Registry {
    /// A registry over the shared cluster.
    pub fn new(cluster: Arc<Cluster>) -> Self {
        Self { cluster }
    }
}

impl Registry {
    /// Authorizes a worker's call about the worker id `id` names (see [`Self::check_owner`])
    /// and unwraps it.
    fn authorize_worker<T>(
        &self,
        request: Request<T>,
        what: &str,
        id: impl Fn(&T) -> &String,
    ) -> Result<T, Status> {
        let caller = self
            .cluster
            .cfg
            .cluster_tls
            .authorize(&request, &[Role::Worker])?;
        let req = request.into_inner();
        self.check_owner(caller.as_ref(), id(&req), what)?;
        Ok(req)
    }

    /// On a follower: the leader's cluster address, for the worker to call there instead;
    /// UNAVAILABLE when no leader is known.
    fn leader(&self) -> Result<String, Status> {
        self.cluster.leader_address().ok_or_else(|| {
            CoordinatorError::Unavailable("no coordinator leader elected yet; retry".into()).into()
        })
    }

    /// Under mutual TLS: refuses a call about a registered worker id from another
    /// certificate than the one it registered with (an unknown id passes: nothing to protect).
    fn check_owner(
        &self,
        caller: Option<&tessera_tls::Identity>,
        worker_id: &str,
        what: &str,
    ) -> Result<(), Status> {
        let Some(caller) = caller else {
            return Ok(());
        };
        let owner = self
            .cluster
            .replica()
            .with(|st| st.worker(worker_id).map(|w| w.name.clone()));
        if owner.is_some_and(|name| name != caller.name()) {
            tracing::warn!(%caller, worker = %worker_id, what, "call for another worker refused");
            return Err(Status::permission_denied(format!(
                "{caller} may not {what} for another worker's id"
            )));
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl pb::coordination_server::Coordination for Registry {
    async fn register(
        &self,
        request: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        let caller = self
            .cluster
            .cfg
            .cluster_tls
            .authorize(&request, &[Role::Worker])?;
        let mut req = request.into_inner();
        if let Some(caller) = caller {
            req.name = caller.name().to_owned();
        }
        if req.address.is_empty() {
            return Err(CoordinatorError::invalid("address", "required (host:port)").into());
        }
        if !self.cluster.replica().is_leading() {
            // Only the leader, once it has caught up with the log, assigns ids; point the
            // worker there.
            let leader = self.leader()?;
            return Ok(Response::new(pb::RegisterResponse {
                worker_id: String::new(),
                heartbeat_interval_ms: 0,
                leader,
            }));
        }
        let cap = req.capacity.unwrap_or_default();
        let devices = valid_devices(&cap.devices)?;
        let id = self
            .cluster
            .commit_with(|st| {
                let id = st.next_worker_id();
                (
                    Command::RegisterWorker {
                        id: id.clone(),
                        address: req.address.clone(),
                        name: req.name.clone(),
                        memory_bytes: cap.memory_bytes,
                        threads: cap.threads,
                        devices: devices.clone(),
                        peer_address: req.peer_address.clone(),
                    },
                    id,
                )
            })
            .await?;
        self.cluster.heartbeat(&id, Seen::at(Instant::now()));
        tracing::info!(worker = %id, address = %req.address, memory = cap.memory_bytes,
            threads = cap.threads, devices = ?devices.iter().map(|d| &d.name).collect::<Vec<_>>(),
            "worker registered");
        self.cluster.replan.request();
        let interval = self.cluster.cfg.heartbeat_interval.as_millis();
        Ok(Response::new(pb::RegisterResponse {
            worker_id: id,
            heartbeat_interval_ms: u32::try_from(interval).unwrap_or(u32::MAX),
            leader: String::new(),
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let req = self.authorize_worker(request, "heartbeat", |r| &r.worker_id)?;
        if !self.cluster.replica().is_leading() {
            // The worker's id is valid cluster-wide; it only has to talk to the leader. Only
            // the leader, once caught up, may call a worker unknown: a lagging replica (a
            // follower, or a leader still committing its barrier) has not applied every
            // registration, and a wrong "unknown" would make the worker re-register and its
            // shard reload.
            // A follower that knows no leader (an election, or cut off from the majority)
            // must not count as an answer, or the worker would stay with it and miss the
            // leader the rest of the cluster elects: UNAVAILABLE makes it try the next one.
            let Some(leader) = self.cluster.leader_address() else {
                return Err(CoordinatorError::Unavailable(
                    "this coordinator knows no leader (election in progress, or cut off from \
                     the majority); try another"
                        .into(),
                )
                .into());
            };
            return Ok(Response::new(pb::HeartbeatResponse {
                known: true,
                leader,
            }));
        }
        let known = self.cluster.heartbeat(
            &req.worker_id,
            Seen {
                at: Instant::now(),
                resident_bytes: req.resident_bytes,
                weight_bytes: req.weight_bytes,
                plan_epoch: req.plan_epoch,
                kv_bytes: req.kv_bytes,
                link_rtt_us: req.link_rtt_us,
                tp_steps: req.tp_steps,
                tp_reduce_us: req.tp_reduce_us,
                peer_bytes_sent: req.peer_bytes_sent,
                kv_used_bytes: req.kv_used_bytes,
                step_busy_ms: req.step_busy_ms,
            },
        );
        Ok(Response::new(pb::HeartbeatResponse {
            known,
            leader: String::new(),
        }))
    }

    async fn leave(
        &self,
        request: Request<pb::LeaveRequest>,
    ) -> Result<Response<pb::LeaveResponse>, Status> {
        let req = self.authorize_worker(request, "leave", |r| &r.worker_id)?;
        if req.worker_id.is_empty() {
            return Err(CoordinatorError::invalid("worker_id", "required").into());
        }
        if !self.cluster.replica().is_leading() {
            let leader = self.leader()?;
            return Ok(Response::new(pb::LeaveResponse { leader }));
        }
        self.cluster.remove_worker(&req.worker_id).await?;
        self.cluster.metrics.worker_left();
        tracing::info!(worker = %req.worker_id, "worker left; re-planning without it");
        Ok(Response::new(pb::LeaveResponse {
            leader: String::new(),
        }))
    }
}

/// The most accelerators one worker may declare (a host has at most 16 GPUs today).
const MAX_DEVICES: usize = 16;
/// The longest device id or name accepted, in bytes.
const MAX_DEVICE_TEXT: usize = 256;

/// A registration's devices, checked: each has an id (unique), a name, and memory; the list
/// is short and its strings bounded (they are replicated in the log and shown in status).
///
/// # Errors
/// INVALID_ARGUMENT naming `capacity.devices[i]`'s field.
fn valid_devices(
    devices: &[tessera_proto::v1::Device],
) -> Result<Vec<DeviceRecord>, CoordinatorError> {
    if devices.len() > MAX_DEVICES {
        return Err(CoordinatorError::invalid(
            "capacity.devices",
            format!("{} devices; at most {MAX_DEVICES}", devices.len()),
        ));
    }
    let mut out: Vec<DeviceRecord> = Vec::with_capacity(devices.len());
    for (i, d) in devices.iter().enumerate() {
        let field = |f: &str| format!("capacity.devices[{i}].{f}");
        for (name, text) in [("id", &d.id), ("name", &d.name)] {
            if text.is_empty() || text.len() > MAX_DEVICE_TEXT {
                return Err(CoordinatorError::invalid(
                    field(name),
                    format!("must be 1 to {MAX_DEVICE_TEXT} bytes"),
                ));
            }
        }
        if d.memory_bytes == 0 {
            return Err(CoordinatorError::invalid(
                field("memory_bytes"),
                "must be above 0",
            ));
        }
        if out.iter().any(|o| o.id == d.id) {
            return Err(CoordinatorError::invalid(
                field("id"),
                format!("{:?} is declared twice", d.id),
            ));
        }
        out.push(DeviceRecord {
            id: d.id.clone(),
            name: d.name.clone(),
            memory_bytes: d.memory_bytes,
            bandwidth_bytes_s: d.bandwidth_bytes_s,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use tessera_proto::v1::Device;

    use super::*;

    fn device(id: &str, memory_bytes: u64) -> Device {
        Device {
            id: id.into(),
            name: "NVIDIA H200".into(),
            memory_bytes,
            bandwidth_bytes_s: 4_800_000_000_000,
        }
    }

    /// Ensures that a registration's devices are kept as declared when sound, and refused
    /// naming the field otherwise: too many, an empty or oversized id or name, no memory, an
    /// id declared twice.
    #[test]
    fn devices_are_checked_naming_the_field() {
        let ok = valid_devices(&[device("cuda:0", 1 << 30), device("cuda:1", 1 << 30)])
            .expect("two devices");
        assert_eq!(
            ok.iter().map(|d| d.id.as_str()).collect::<Vec<_>>(),
            ["cuda:0", "cuda:1"]
        );
        assert_eq!(ok[0].bandwidth_bytes_s, 4_800_000_000_000);
        let long = "x".repeat(MAX_DEVICE_TEXT + 1);
        let mut unnamed = device("cuda:0", 1);
        unnamed.name.clear();
        let cases: Vec<(Vec<Device>, &str)> = vec![
            (
                vec![device("cuda:0", 1); MAX_DEVICES + 1],
                "capacity.devices",
            ),
            (vec![device("", 1)], "capacity.devices[0].id"),
            (vec![device(&long, 1)], "capacity.devices[0].id"),
            (vec![unnamed], "capacity.devices[0].name"),
            (
                vec![device("cuda:0", 0)],
                "capacity.devices[0].memory_bytes",
            ),
            (
                vec![device("cuda:0", 1), device("cuda:0", 1)],
                "capacity.devices[1].id",
            ),
        ];
        for (devices, field) in cases {
            match valid_devices(&devices) {
                Err(CoordinatorError::InvalidArgument { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{field}: {other:?}"),
            }
        }
    }
}
