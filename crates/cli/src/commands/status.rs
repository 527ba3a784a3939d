//! `tessera status`: what a running cluster looks like — workers, their shards and memory, the
//! plan, and coordinator replication.

use std::fmt::Write as _;
use std::io::Write as _;
use std::time::Duration;

use anyhow::Result;
use clap::Args;
use tessera_proto::v1::ClusterStatusRequest;

use super::client::{API_KEY_ENV, DEFAULT_ENDPOINT, connect_with_key, status_error};

/// Arguments of `tessera status`.
#[derive(Args, Debug)]
pub struct StatusArgs {
    /// The coordinator to ask.
    #[arg(long, default_value = DEFAULT_ENDPOINT)]
    pub endpoint: String,
    /// The API key, when the cluster requires one (sent as `authorization: Bearer KEY`).
    #[arg(long, env = API_KEY_ENV, hide_env_values = true)]
    pub api_key: Option<String>,
    /// Show the asked coordinator's own replica (its term, commit index, workers and plan)
    /// instead of the leader's view.
    #[arg(long)]
    pub local: bool,
    /// Print the raw status as JSON-like debug output instead of a table.
    #[arg(long)]
    pub raw: bool,
}

/// Runs `tessera status`.
pub async fn run(args: StatusArgs) -> Result<()> {
    let mut client = connect_with_key(
        &args.endpoint,
        Duration::from_secs(3),
        args.api_key.as_deref(),
    )
    .await?;
    let s = client
        .cluster_status(ClusterStatusRequest { local: args.local })
        .await
        .map_err(status_error)?
        .into_inner();
    // Rendered whole, then written once: see `print`.
    let mut out = String::new();
    if args.raw {
        let _ = writeln!(out, "{s:#?}");
        return print(&out);
    }
    let _ = writeln!(
        out,
        "model {}  plan epoch {}  {}  running requests {}",
        s.model,
        s.plan_epoch,
        if s.ready { "ready" } else { "NOT READY" },
        s.running_requests
    );
    if !s.leader.is_empty() || s.term > 0 {
        let _ = writeln!(
            out,
            "leader {}  term {}  commit index {}  members {}",
            s.leader,
            s.term,
            s.commit_index,
            s.members.join(", ")
        );
    }
    if !args.local && !s.linearizable {
        let _ = writeln!(
            out,
            "(no leader confirmed this view: it is this coordinator's own replica, which may be \
             behind)"
        );
    }
    let _ = writeln!(
        out,
        "{:<10} {:<22} {:>7} {:>10} {:>10} {:>10} {:>10} {:>9}  shard",
        "worker", "address", "threads", "memory", "resident", "weights", "kv", "seen"
    );
    let mib = |b: u64| format!("{:.1}M", b as f64 / f64::from(1 << 20));
    for w in &s.workers {
        let cap = w.capacity.clone().unwrap_or_default();
        let shard = w.shard.as_ref().map_or("-".to_owned(), |sh| {
            let mut t = format!(
                "stage {} layers {}..{}{}{}",
                sh.stage,
                sh.layer_start,
                sh.layer_end,
                if sh.embed { " +embed" } else { "" },
                if sh.head { " +head" } else { "" }
            );
            if sh.cp_ranks > 1 {
                let _ = write!(t, " | ring {}/{}", sh.cp_rank, sh.cp_ranks);
            }
            if sh.tp_ranks > 1 {
                let _ = write!(
                    t,
                    " | rank {}/{} kv-heads {}..{} ffn {}..{} vocab {}..{}",
                    sh.tp_rank,
                    sh.tp_ranks,
                    sh.kv_head_start,
                    sh.kv_head_end,
                    sh.ffn_start,
                    sh.ffn_end,
                    sh.vocab_start,
                    sh.vocab_end
                );
                if let Some(rtt) = w.link_rtt_us {
                    let _ = write!(t, " rtt {rtt}us");
                }
                if w.tp_steps > 0 {
                    let _ = write!(
                        t,
                        " reduce {:.2}ms/step",
                        w.tp_reduce_us as f64 / 1e3 / w.tp_steps as f64
                    );
                }
            }
            t
        });
        let _ = writeln!(
            out,
            "{:<10} {:<22} {:>7} {:>10} {:>10} {:>10} {:>10} {:>9}  {}",
            w.worker_id,
            w.address,
            cap.threads,
            mib(cap.memory_bytes),
            mib(w.resident_bytes),
            mib(w.weight_bytes),
            mib(w.kv_bytes),
            // A follower's local view has not heard from workers: "-", not a huge number.
            w.last_seen_ms
                .map_or("-".to_owned(), |ms| format!("{ms}ms")),
            shard + &devices(&cap.devices)
        );
    }
    print(&out)
}

/// The accelerators a worker runs on, as the status line's tail: ` on NVIDIA H200 (cuda:0)`;
/// empty for a CPU worker.
fn devices(devices: &[tessera_proto::v1::Device]) -> String {
    devices
        .iter()
        .map(|d| format!(" on {} ({})", d.name, d.id))
        .collect()
}

/// Writes `text` to stdout. A reader that closed the pipe early (`tessera status | head -1`)
/// got what it wanted: that is success, not a panic (which `println!` would give).
fn print(text: &str) -> Result<()> {
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}
