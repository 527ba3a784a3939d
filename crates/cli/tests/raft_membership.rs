//! Online membership changes of real coordinator processes, driven by the CLI: one founding
//! coordinator grows to three and five with `tessera cluster add-coordinator` (the new ones
//! started with `--join`), then shrinks to three with `remove-coordinator`, while a client keeps
//! generating. Then the Helm chart's way: coordinators started with the chart's flags (one
//! `--peers` for all, naming the founder) join by themselves, 3 → 5, and `tessera cluster scale`
//! (the chart's pre-upgrade hook) shrinks them to 3. Every wait is bounded.

use std::collections::BTreeMap;
use std::process::Child;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tessera_proto::v1 as pb;
use tessera_testkit::{
    Tessera, count_tokens, free_addr, inference_client, kill, lazy_channel, member_args, runtime,
    smollm2_arg as model, story as request, strings, url_list,
};

/// The `tessera` binary under test.
fn tessera() -> Tessera {
    Tessera::new(env!("CARGO_BIN_EXE_tessera"))
}

/// Coordinators by node id, killed (and their data removed) when dropped.
struct Members {
    tessera: Tessera,
    model: String,
    data: std::path::PathBuf,
    /// Public addresses, what clients call.
    addrs: BTreeMap<u64, String>,
    /// Cluster addresses: what members and workers dial, and what membership changes name.
    cluster_addrs: BTreeMap<u64, String>,
    procs: BTreeMap<u64, Child>,
    worker: Option<Child>,
}

/// The tests start five coordinators each: one at a time on a small machine.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

impl Members {
    fn new(model: &str, name: &str) -> Self {
        let data = std::env::temp_dir().join(format!(
            "tessera-raft-members-{name}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&data);
        let addrs = (1..=5).map(|id| (id, free_addr())).collect();
        let cluster_addrs = (1..=5).map(|id| (id, free_addr())).collect();
        Self {
            tessera: tessera(),
            model: model.to_owned(),
            data,
            addrs,
            cluster_addrs,
            procs: BTreeMap::new(),
            worker: None,
        }
    }

    /// Starts node `id`: the founder of a one-member cluster, or a node waiting to be added.
    fn start(&mut self, id: u64, found: bool) {
        let extra = if found {
            strings(&["--peers", &format!("{id}={}", self.cluster_addrs[&id])])
        } else {
            strings(&["--join"])
        };
        self.spawn(id, &extra);
    }

    /// Starts node `id` with `extra` flags.
    fn spawn(&mut self, id: u64, extra: &[String]) {
        let addr = self.addrs[&id].clone();
        let cluster = self.cluster_addrs[&id].clone();
        let dir = self.data.join(format!("c{id}"));
        let mut args = member_args(&addr, &cluster, id, &dir, &self.model);
        args.extend_from_slice(extra);
        let (child, _) = self.tessera.spawn(&args);
        self.procs.insert(id, child);
    }

    /// `ID=ADDR,…` of nodes `ids` at their cluster addresses (as --peers and --voters take it).
    fn voters_arg(&self, ids: impl IntoIterator<Item = u64>) -> String {
        ids.into_iter()
            .map(|id| format!("{id}={}", self.cluster_addrs[&id]))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Starts one worker registering with every node.
    fn start_worker(&mut self) {
        let list = url_list(self.cluster_addrs.values());
        self.worker = Some(self.tessera.spawn_worker(&list, 1, "1GiB", None, &[]));
    }

    /// Waits (bounded) until node `id` serves.
    fn wait_serving(&self, rt: &tokio::runtime::Runtime, id: u64) {
        let deadline = Instant::now() + Duration::from_secs(90);
        while !self.local_status(rt, id).is_ok_and(|s| s.ready) {
            assert!(Instant::now() < deadline, "node {id} never serves");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until every node of `ids`'s own replica shows `want` as voters at the same
    /// commit; that commit index.
    fn agree(&self, rt: &tokio::runtime::Runtime, ids: &[u64], want: &[u64]) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let seen: Vec<_> = ids.iter().map(|id| self.local_status(rt, *id)).collect();
            let views: Vec<_> = seen.iter().flatten().collect();
            if views.len() == ids.len()
                && views.iter().all(|s| voters(s) == want)
                && views
                    .iter()
                    .all(|s| s.commit_index == views[0].commit_index)
            {
                return views[0].commit_index;
            }
            assert!(
                Instant::now() < deadline,
                "members {ids:?} do not agree on voters {want:?}: {seen:#?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn endpoint(&self, id: u64) -> String {
        format!("http://{}", self.addrs[&id])
    }

    /// Node `id`'s cluster port, where membership changes go.
    fn cluster_endpoint(&self, id: u64) -> String {
        format!("http://{}", self.cluster_addrs[&id])
    }

    /// `tessera cluster add-coordinator` through node `via`; returns what it printed.
    fn add(&self, via: u64, id: u64) -> String {
        let out =
            self.tessera
                .add_coordinator(&self.cluster_endpoint(via), id, &self.cluster_addrs[&id]);
        assert!(out.status.success(), "adding {id}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `tessera cluster remove-coordinator` through node `via`; returns what it printed.
    fn remove(&self, via: u64, id: u64) -> String {
        let out = self
            .tessera
            .remove_coordinator(&self.cluster_endpoint(via), id);
        assert!(out.status.success(), "removing {id}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Node `id`'s own replica, not the leader's view (what `tessera status --local` prints).
    fn local_status(
        &self,
        rt: &tokio::runtime::Runtime,
        id: u64,
    ) -> Result<pb::ClusterStatusResponse, tonic::Status> {
        rt.block_on(async {
            inference_client(&self.addrs[&id], Duration::from_secs(10))
                .cluster_status(pb::ClusterStatusRequest { local: true })
                .await
                .map(tonic::Response::into_inner)
        })
    }

    /// Whether node `id`'s public port reports it "a voter that knows its leader" (the
    /// health service Kubernetes readiness asks); `None` when it does not answer.
    fn voter(&self, rt: &tokio::runtime::Runtime, id: u64) -> Option<bool> {
        use tonic_health::pb::health_check_response::ServingStatus;
        rt.block_on(async {
            let ch = lazy_channel(self.endpoint(id), Some(Duration::from_secs(5)));
            let r = tonic_health::pb::health_client::HealthClient::new(ch)
                .check(tonic_health::pb::HealthCheckRequest {
                    service: tessera_coordinator::VOTER_HEALTH.to_owned(),
                })
                .await
                .ok()?;
            Some(r.into_inner().status == ServingStatus::Serving as i32)
        })
    }

    /// Waits (bounded) until node `id`'s voter health is `want`.
    fn wait_voter(&self, rt: &tokio::runtime::Runtime, id: u64, want: bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.voter(rt, id) != Some(want) {
            assert!(
                Instant::now() < deadline,
                "node {id}'s voter health never became {want}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Members {
    fn drop(&mut self) {
        for c in self.worker.iter_mut().chain(self.procs.values_mut()) {
            kill(c);
        }
        let _ = std::fs::remove_dir_all(&self.data);
    }
}

/// Short requests, one after another, through one node (which forwards if it stops
/// leading), counted until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<(usize, Vec<String>)>,
}

impl Load {
    fn start(rt: &tokio::runtime::Runtime, url: String) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let task = rt.spawn(async move {
            let ch = lazy_channel(url, Some(Duration::from_secs(30)));
            let mut client = pb::inference_client::InferenceClient::new(ch);
            let (mut ok, mut failed) = (0_usize, Vec::new());
            while !flag.load(Ordering::SeqCst) {
                match count_tokens(&mut client, request(2)).await {
                    Ok(2) => ok += 1,
                    other => failed.push(format!("{other:?}")),
                }
            }
            (ok, failed)
        });
        Self { stop, task }
    }

    /// Stops it; how many requests completed.
    ///
    /// # Panics
    /// When any failed, or fewer than 3 completed.
    fn stop(self, rt: &tokio::runtime::Runtime) -> usize {
        self.stop.store(true, Ordering::SeqCst);
        let (ok, failed) = rt.block_on(self.task).expect("load task");
        assert!(
            failed.is_empty(),
            "requests failed during the changes: {failed:?}"
        );
        assert!(ok >= 3, "only {ok} requests completed");
        ok
    }
}

/// The voter ids a status lists (members are `ID=ADDR`, learners marked).
fn voters(s: &pb::ClusterStatusResponse) -> Vec<u64> {
    s.members
        .iter()
        .filter(|m| !m.ends_with("(learner)"))
        .filter_map(|m| m.split_once('=')?.0.parse().ok())
        .collect()
}

/// Ensures that coordinators grow 1 → 3 → 5 → 3 online through the CLI, every member agreeing
/// on the voters and the committed state at each size, while generate requests keep succeeding
/// — and that each one's readiness health says "a voter that knows its leader": not before it
/// is added, and not once it is removed.
#[test]
fn membership_grows_and_shrinks_while_serving() {
    let Some(model) = model() else { return };
    let _one = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let rt = runtime();
    let mut m = Members::new(&model, "grow");
    m.start(1, true);
    m.start_worker();
    m.wait_serving(&rt, 1);

    let load = Load::start(&rt, m.endpoint(1));

    for id in [2, 3] {
        m.start(id, false);
    }
    // Up, but not members yet: not ready (a client Service must not send them requests).
    m.wait_voter(&rt, 1, true);
    for id in [2, 3] {
        m.wait_voter(&rt, id, false);
    }
    assert!(
        m.add(1, 2).contains("voters 1,2 "),
        "one at a time, as a voter"
    );
    assert!(m.add(1, 3).contains("voters 1,2,3 "));
    let at3 = m.agree(&rt, &[1, 2, 3], &[1, 2, 3]);
    for id in [2, 3] {
        m.wait_voter(&rt, id, true);
    }

    for id in [4, 5] {
        m.start(id, false);
    }
    // Through followers too: they forward membership changes to the leader.
    m.add(2, 4);
    assert!(m.add(3, 5).contains("voters 1,2,3,4,5 "));
    let at5 = m.agree(&rt, &[1, 2, 3, 4, 5], &[1, 2, 3, 4, 5]);
    assert!(at5 > at3);

    // Shrink by the two highest ids that do not lead, so requests never wait for an election.
    let leader = m.local_status(&rt, 1).expect("status").leader;
    let leader: u64 = leader
        .split_once('=')
        .and_then(|(id, _)| id.parse().ok())
        .expect("a leader");
    let mut gone: Vec<u64> = (2..=5).rev().filter(|id| *id != leader).take(2).collect();
    gone.sort_unstable();
    for id in &gone {
        m.remove(1, *id);
    }
    let stay: Vec<u64> = (1..=5).filter(|id| !gone.contains(id)).collect();
    let at3_again = m.agree(&rt, &stay, &stay);
    assert!(at3_again > at5);
    // Removed: still running, no longer ready.
    for id in &gone {
        m.wait_voter(&rt, *id, false);
    }
    for id in &gone {
        if let Some(mut c) = m.procs.remove(id) {
            kill(&mut c);
        }
    }

    let ok = load.stop(&rt);
    // The remaining three still serve, through any of them.
    for id in &stay {
        let url = m.endpoint(*id);
        let n = rt.block_on(async {
            let ch = lazy_channel(url, None);
            count_tokens(
                &mut pb::inference_client::InferenceClient::new(ch),
                request(2),
            )
            .await
        });
        assert_eq!(n.expect("serves"), 2, "through node {id}");
    }
    eprintln!("membership 1 -> 3 -> 5 -> 3: {ok} requests served, none failed");
}

/// Ensures that the Helm chart's way of scaling works with real processes: coordinators
/// started with the chart's flags — every one given the same `--peers`, naming node 1 alone
/// (the founder) — join by themselves: three make a cluster of three, two more started later
/// make it five (a scale-up needs nothing but more pods); `tessera cluster scale --only add`
/// then has nothing to do, and `--only remove` to three (a scale-down's pre-upgrade hook)
/// removes the extra two, highest id first, each then no longer ready. Requests succeed
/// throughout.
#[test]
fn scale_with_the_chart_s_flags_serves_every_request() {
    let Some(model) = model() else { return };
    let _one = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let rt = runtime();
    let mut m = Members::new(&model, "scale");
    let founder = m.voters_arg([1]);
    for id in 1..=3 {
        m.spawn(id, &strings(&["--peers", &founder]));
    }
    m.start_worker();
    m.wait_serving(&rt, 1);
    m.agree(&rt, &[1, 2, 3], &[1, 2, 3]);
    for id in 1..=3 {
        m.wait_voter(&rt, id, true);
    }
    let load = Load::start(&rt, m.endpoint(1));
    for id in [4, 5] {
        m.spawn(id, &strings(&["--peers", &founder]));
    }
    m.agree(&rt, &[1, 2, 3, 4, 5], &[1, 2, 3, 4, 5]);
    for id in [4, 5] {
        m.wait_voter(&rt, id, true);
    }
    let endpoints = (1..=5)
        .map(|id| m.cluster_endpoint(id))
        .collect::<Vec<_>>()
        .join(",");
    let scale = |voters: &str, only: &str| {
        let out = m.tessera.run(&[
            "cluster",
            "scale",
            "--endpoint",
            &endpoints,
            "--voters",
            voters,
            "--only",
            only,
            "--timeout",
            "60",
        ]);
        assert!(out.status.success(), "scale --only {only}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let (five, three) = (m.voters_arg(1..=5), m.voters_arg(1..=3));
    let out = scale(&five, "add");
    assert!(
        !out.contains("Add") && out.contains("voters 1,2,3,4,5 "),
        "nothing left to add: {out}"
    );
    let out = scale(&five, "remove");
    assert!(!out.contains("Remove"), "nothing to remove: {out}");
    let out = scale(&three, "remove");
    let (at5, at4) = (
        out.find("Remove { id: 5 }").expect("5 removed"),
        out.find("Remove { id: 4 }").expect("4 removed"),
    );
    assert!(at5 < at4, "highest id first: {out}");
    m.agree(&rt, &[1, 2, 3], &[1, 2, 3]);
    for id in [4, 5] {
        m.wait_voter(&rt, id, false);
    }
    let ok = load.stop(&rt);
    eprintln!("chart flags, 3 -> 5 -> 3 coordinators: {ok} requests served, none failed");
}
