//! A local cluster as child processes: [`LocalCluster::start`] gives the coordinators their
//! ports (picked, or read back from a kept data directory's `up.json`), starts them as one
//! Raft group and then the workers, and keeps each as a supervised [`Member`] with the
//! arguments it is restarted with; [`LocalCluster::shutdown`] stops them all. The data
//! directory is a temporary one, removed when the cluster is dropped, unless the spec names
//! one to keep.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use super::child::{CoordinatorAddrs, coordinator_addresses, listening_address, spawn};
use super::pinned::{self, CoordinatorPorts, Pinned};
use super::supervise::{Addresses, Chaos, Member, supervise};

/// Coordinators and workers running as child processes of this one.
pub struct LocalCluster {
    /// The first coordinator's public endpoint, `http://host:port`.
    pub endpoint: String,
    /// Every coordinator's public endpoint.
    pub endpoints: Vec<String>,
    /// Every coordinator's cluster endpoint (what workers and peers dial), in the same order.
    pub cluster_endpoints: Vec<String>,
    /// Every coordinator's HTTP API (`host:port`), when served, in the same order.
    pub http: Vec<String>,
    /// The coordinators first (`coordinator 1`…), then the workers (`worker 0`…).
    members: Vec<Member>,
    /// Every address the workers have listened on in this run, restarts included.
    worker_addresses: Addresses,
    /// Where the coordinators keep their Raft data. Declared after `members`, so that a
    /// temporary one is removed after the children are gone.
    data: DataDir,
}

/// A free loopback port (released before the coordinator binds it: a race other processes
/// rarely win).
pub(crate) fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr().context("finding a free port")?.port())
}

/// How to start a [`LocalCluster`].
#[derive(Clone, Debug)]
pub struct LocalClusterSpec {
    /// The first coordinator's public address (port 0: any).
    pub listen: SocketAddr,
    /// The first coordinator's cluster address (port 0: any).
    pub cluster_listen: SocketAddr,
    /// The first coordinator's HTTP API address (port 0: any); `None`: no HTTP API.
    pub http_listen: Option<SocketAddr>,
    /// Model name or path.
    pub model: String,
    /// Workers to start.
    pub workers: u32,
    /// Threads per worker.
    pub threads: u32,
    /// Memory per worker in bytes.
    pub memory: u64,
    /// Coordinators (one Raft group when more than one).
    pub coordinators: u32,
    /// Extra coordinator arguments.
    pub coordinator_args: Vec<String>,
    /// Extra worker arguments.
    pub worker_args: Vec<String>,
    /// The certificate directory the cluster protocol's mutual TLS uses (certificates for
    /// every process are issued into it as needed); `None`: the cluster runs with
    /// `--insecure-cluster`.
    pub certs: Option<PathBuf>,
    /// Where the coordinators keep their Raft data and `up.json` (their ports), kept after
    /// the cluster stops and reused by the next start; `None`: a temporary directory.
    pub data_dir: Option<PathBuf>,
    /// Prometheus metrics for every child: coordinator `i` (from 0) on this port + `i`,
    /// worker `j` on this port + coordinators + `j` (port 0: a free port each); `None`: none.
    pub metrics: Option<SocketAddr>,
}

impl LocalClusterSpec {
    /// `--model-dir` for a model given as a path: its directory, which the workers may then
    /// load from (they open only the store's models otherwise).
    fn model_dir_flags(&self) -> Vec<String> {
        tessera_hub::model_dir(&self.model).map_or_else(Vec::new, |dir| {
            vec!["--model-dir".to_owned(), dir.to_string_lossy().into_owned()]
        })
    }

    /// The name of worker `i`, which is also its certificate's.
    fn worker_name(i: u32) -> String {
        format!("worker-{i}")
    }

    /// Issues what `certs` lacks (coordinators 1..n, the workers, the operator) and returns
    /// the cluster-protocol flags every child gets.
    fn cluster_flags(&self) -> Result<Vec<String>> {
        let Some(dir) = &self.certs else {
            return Ok(vec!["--insecure-cluster".to_owned()]);
        };
        let mut members: Vec<tessera_tls::Identity> = (1..=u64::from(self.coordinators.max(1)))
            .map(tessera_tls::Identity::coordinator)
            .collect();
        for i in 0..self.workers {
            members.push(tessera_tls::Identity::new(
                tessera_tls::Role::Worker,
                &Self::worker_name(i),
            )?);
        }
        members.push(tessera_tls::Identity::new(
            tessera_tls::Role::Admin,
            super::super::certs::OPERATOR,
        )?);
        super::super::certs::issue(dir, &members)?;
        Ok(vec![
            "--certs".to_owned(),
            dir.to_string_lossy().into_owned(),
        ])
    }

    /// The arguments of coordinator `i` (from 0) of the group at `ports`: the same at its
    /// first start and at every restart. `--peers` founds the group on empty data and is
    /// ignored on kept data, so a restarted coordinator comes back as the same member.
    fn coordinator_args(
        &self,
        i: usize,
        ports: &[CoordinatorPorts],
        data: &Path,
        tls_flags: &[String],
        metrics: Option<SocketAddr>,
    ) -> Vec<String> {
        let me = ports[i];
        let peers = ports
            .iter()
            .enumerate()
            .map(|(j, p)| format!("{}={}", j + 1, p.cluster))
            .collect::<Vec<_>>()
            .join(",");
        let mut args = vec![
            "coordinator".into(),
            "--listen".into(),
            me.public.to_string(),
            "--cluster-listen".into(),
            me.cluster.to_string(),
            "--model".into(),
            self.model.clone(),
            "--min-workers".into(),
            self.workers.to_string(),
            "--exit-on-stdin-eof".into(),
            "--id".into(),
            (i + 1).to_string(),
            "--peers".into(),
            peers,
            "--data-dir".into(),
            coordinator_dir(data, i).to_string_lossy().into_owned(),
        ];
        args.extend(tls_flags.iter().cloned());
        if let Some(http) = me.http {
            args.extend(["--http-listen".into(), http.to_string()]);
        }
        if let Some(m) = metrics {
            args.extend(["--metrics-listen".into(), m.to_string()]);
        }
        args.extend(self.coordinator_args.iter().cloned());
        args
    }

    /// The arguments of worker `j`: the same at its first start and at every restart (its
    /// Worker-service port is a free one each time; it registers anew under the same name).
    fn worker_args(
        &self,
        j: u32,
        coordinators: &str,
        tls_flags: &[String],
        metrics: Option<SocketAddr>,
    ) -> Vec<String> {
        let mut args = vec![
            "worker".into(),
            "--coordinator".into(),
            coordinators.to_owned(),
            "--threads".into(),
            self.threads.to_string(),
            "--memory".into(),
            self.memory.to_string(),
            "--name".into(),
            Self::worker_name(j),
            "--exit-on-stdin-eof".into(),
        ];
        args.extend(tls_flags.iter().cloned());
        args.extend(self.model_dir_flags());
        if let Some(m) = metrics {
            args.extend(["--metrics-listen".into(), m.to_string()]);
        }
        args.extend(self.worker_args.iter().cloned());
        args
    }

    /// Fresh ports for `n` coordinators: the spec's for the first, when not 0, else free ones.
    fn pick_ports(&self, n: u32) -> Result<Vec<CoordinatorPorts>> {
        (0..n)
            .map(|i| {
                let pick = |want: SocketAddr| -> Result<SocketAddr> {
                    let port = if i == 0 && want.port() != 0 {
                        want.port()
                    } else {
                        free_port()?
                    };
                    Ok(SocketAddr::new(want.ip(), port))
                };
                Ok(CoordinatorPorts {
                    public: pick(self.listen)?,
                    cluster: pick(self.cluster_listen)?,
                    http: self.http_listen.map(pick).transpose()?,
                })
            })
            .collect()
    }
}

/// Coordinator `i`'s (from 0) Raft data directory.
fn coordinator_dir(data: &Path, i: usize) -> PathBuf {
    data.join(format!("coordinator-{}", i + 1))
}

/// The metrics address of each of `count` children from `base` (see
/// [`LocalClusterSpec::metrics`]).
fn metrics_addresses(base: Option<SocketAddr>, count: u32) -> Result<Vec<Option<SocketAddr>>> {
    let Some(base) = base else {
        return Ok(vec![None; count as usize]);
    };
    (0..count)
        .map(|k| {
            let port = if base.port() == 0 {
                free_port()?
            } else {
                u16::try_from(u32::from(base.port()) + k)
                    .ok()
                    .with_context(|| {
                        format!("--metrics-listen {base}: {count} ports from it pass 65535")
                    })?
            };
            Ok(Some(SocketAddr::new(base.ip(), port)))
        })
        .collect()
}

/// The data directory of a local cluster.
struct DataDir {
    path: PathBuf,
    /// Removed on drop.
    temporary: bool,
}

impl DataDir {
    /// `kept`, or a fresh temporary directory (named by this process and a counter, so that
    /// clusters of one process never share one).
    fn new(kept: Option<&Path>) -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        match kept {
            Some(p) => Self {
                path: p.to_owned(),
                temporary: false,
            },
            None => Self {
                path: std::env::temp_dir().join(format!(
                    "tessera-up-{}-{}",
                    std::process::id(),
                    NEXT.fetch_add(1, Ordering::Relaxed)
                )),
                temporary: true,
            },
        }
    }
}

impl Drop for DataDir {
    fn drop(&mut self) {
        if self.temporary {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// Coordinators started: their addresses and supervised processes.
type Started = (Vec<CoordinatorAddrs>, Vec<Member>);

/// Starts the coordinators at `ports` as one Raft group (they know each other by `--peers`),
/// each once its predecessor listens; on failure the ones started are killed.
async fn start_group(
    spec: &LocalClusterSpec,
    ports: &[CoordinatorPorts],
    data: &Path,
    tls_flags: &[String],
    metrics: &[Option<SocketAddr>],
) -> Result<Started> {
    let mut addrs = Vec::new();
    let mut members: Vec<Member> = Vec::new();
    for i in 0..ports.len() {
        let args = spec.coordinator_args(i, ports, data, tls_flags, metrics[i]);
        let what = format!("coordinator {}", i + 1);
        let started = async {
            let mut c = spawn(&args)?;
            let a = coordinator_addresses(&mut c, &what).await?;
            Ok::<_, anyhow::Error>((c, a))
        }
        .await;
        match started {
            Ok((c, a)) => {
                addrs.push(a);
                members.push(Member::new(what, args, metrics[i], c, None));
            }
            Err(e) => {
                for mut m in members {
                    m.stop(Duration::ZERO).await;
                }
                return Err(e);
            }
        }
    }
    Ok((addrs, members))
}

impl LocalCluster {
    /// Notes the coordinators' addresses, in start order.
    fn record(&mut self, addrs: Vec<CoordinatorAddrs>) {
        for a in addrs {
            self.endpoints.push(format!("http://{}", a.public));
            self.cluster_endpoints.push(format!("http://{}", a.cluster));
            self.http.extend(a.http);
        }
    }

    /// The ports the coordinators take: a kept data directory's (checked against the spec),
    /// else `None` (to be picked).
    fn stored_ports(spec: &LocalClusterSpec, data: &DataDir, n: u32) -> Result<Option<Pinned>> {
        if data.temporary {
            return Ok(None);
        }
        let dir = &data.path;
        let Some(p) = pinned::load(dir)? else {
            if (0..n as usize).any(|i| coordinator_dir(dir, i).exists()) {
                bail!(
                    "{} holds coordinator data but no {}, so the ports that data expects are \
                     unknown: use an empty or new --data-dir",
                    dir.display(),
                    pinned::FILE
                );
            }
            return Ok(None);
        };
        if p.coordinators.len() != n as usize {
            bail!(
                "{} is the data of {} coordinator(s): run with --coordinators {} (or another \
                 --data-dir)",
                dir.display(),
                p.coordinators.len(),
                p.coordinators.len()
            );
        }
        if p.model != spec.model {
            bail!(
                "{} is the data of a cluster serving {:?}: run with --model {:?} (or another \
                 --data-dir)",
                dir.display(),
                p.model,
                p.model
            );
        }
        eprintln!(
            "reusing the cluster in {} on the ports stored in {} (the Raft data names them)",
            dir.display(),
            pinned::path(dir).display()
        );
        Ok(Some(p))
    }

    /// Starts the coordinators, then the workers, each once its predecessor listens.
    ///
    /// # Errors
    /// When a process cannot start or does not listen within two minutes, or a kept data
    /// directory does not fit the spec.
    pub async fn start(spec: &LocalClusterSpec) -> Result<Self> {
        let n = spec.coordinators.max(1);
        let tls_flags = spec.cluster_flags()?;
        let data = DataDir::new(spec.data_dir.as_deref());
        let metrics = metrics_addresses(spec.metrics, n + spec.workers)?;
        let stored = Self::stored_ports(spec, &data, n)?;
        let mut cluster = Self {
            endpoint: String::new(),
            endpoints: Vec::new(),
            cluster_endpoints: Vec::new(),
            http: Vec::new(),
            members: Vec::new(),
            worker_addresses: Addresses::default(),
            data,
        };
        // Peers must know each other's addresses before any of them starts, so ports are
        // picked up front; another process can take one in between, so a failed start is
        // retried on fresh ports (not with stored ones: the kept data names those).
        let mut attempt = 0;
        loop {
            attempt += 1;
            let ports = match &stored {
                Some(p) => p.coordinators.clone(),
                None => {
                    let ports = spec.pick_ports(n)?;
                    // Written before the first start: data that exists has its ports beside it.
                    pinned::save(
                        &cluster.data.path,
                        &Pinned {
                            model: spec.model.clone(),
                            coordinators: ports.clone(),
                        },
                    )?;
                    ports
                }
            };
            match start_group(spec, &ports, &cluster.data.path, &tls_flags, &metrics).await {
                Ok((addrs, members)) => {
                    cluster.members = members;
                    cluster.record(addrs);
                    break;
                }
                Err(e) if stored.is_none() && attempt < 3 => {
                    tracing::warn!(attempt, "starting the coordinators failed: {e:#}; retrying");
                    for i in 0..n as usize {
                        let _ = std::fs::remove_dir_all(coordinator_dir(&cluster.data.path, i));
                    }
                }
                Err(e) => return Err(e),
            }
        }
        cluster.endpoint = cluster.endpoints[0].clone();
        // Workers speak only the cluster protocol.
        let coordinators = cluster.cluster_endpoints.join(",");
        for j in 0..spec.workers {
            let m = metrics[(n + j) as usize];
            let args = spec.worker_args(j, &coordinators, &tls_flags, m);
            let what = format!("worker {j}");
            let mut worker = spawn(&args)?;
            let addr = listening_address(&mut worker, &what).await?;
            cluster
                .worker_addresses
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(addr);
            let addresses = Some(Arc::clone(&cluster.worker_addresses));
            cluster
                .members
                .push(Member::new(what, args, m, worker, addresses));
        }
        Ok(cluster)
    }

    /// The children, coordinators first.
    pub(crate) fn members(&self) -> &[Member] {
        &self.members
    }

    /// Every address the workers have listened on in this run, restarts included.
    pub(crate) fn worker_addresses(&self) -> Addresses {
        Arc::clone(&self.worker_addresses)
    }

    /// The data directory, and whether it is kept after the cluster stops.
    pub(crate) fn data_dir(&self) -> (&Path, bool) {
        (&self.data.path, !self.data.temporary)
    }

    /// Restarts every child that exits, for as long as the future runs (see
    /// [`supervise`]).
    pub(crate) async fn supervise(&mut self, chaos: Option<Chaos>) -> Infallible {
        supervise(&mut self.members, chaos).await
    }

    /// Closes every child's stdin (their signal to stop), workers first — a stopping worker
    /// leaves the cluster, which needs a coordinator that answers — waits a little, then kills
    /// stragglers; a temporary data directory is removed.
    pub async fn shutdown(mut self) {
        let (workers, coordinators): (Vec<_>, Vec<_>) = self
            .members
            .iter_mut()
            .partition(|m| m.what.starts_with("worker"));
        for group in [workers, coordinators] {
            let mut group = group;
            for m in &mut group {
                m.ask_to_stop();
            }
            for m in &mut group {
                m.stop(Duration::from_secs(5)).await;
            }
        }
    }
}
