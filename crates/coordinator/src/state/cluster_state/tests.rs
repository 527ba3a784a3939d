//! Unit tests and proptests of the cluster state.

use proptest::prelude::*;

use super::*;
use crate::state::planner::PlanStage;

fn register(state: &ClusterState, address: &str) -> Command {
    Command::RegisterWorker {
        id: state.next_worker_id(),
        address: address.into(),
        name: address.into(),
        memory_bytes: 1 << 30,
        threads: 2,
        devices: vec![],
        peer_address: String::new(),
    }
}

fn one_stage_plan(worker: &str) -> Plan {
    Plan {
        stages: vec![PlanStage {
            worker_id: worker.into(),
            stage: 0,
            tp_rank: 0,
            cp_rank: 0,
            cp_ranks: 1,
            layers: 0..30,
            embed: true,
            head: true,
            weight_bytes: 1,
            kv_bytes: 1,
            tp_ranks: 1,
            kv_heads: 0..3,
            ffn: 0..1536,
            vocab: 0..49152,
        }],
    }
}

/// Ensures that registration assigns fresh ids and a re-registration at the same address
/// replaces the old incarnation with a higher liveness epoch.
#[test]
fn register_assigns_ids_and_replaces_same_address() {
    let mut s = ClusterState::new("m");
    s.apply(register(&s, "a:1")).expect("register a");
    s.apply(register(&s, "b:1")).expect("register b");
    assert_eq!(
        s.workers().map(|w| w.id.as_str()).collect::<Vec<_>>(),
        ["w1", "w2"]
    );
    s.apply(register(&s, "a:1")).expect("re-register a");
    let ids: Vec<_> = s.workers().map(|w| (w.id.as_str(), w.epoch)).collect();
    assert_eq!(ids, [("w2", 2), ("w3", 3)]);
    let dup = Command::RegisterWorker {
        id: "w2".into(),
        address: "c:1".into(),
        name: String::new(),
        memory_bytes: 0,
        threads: 1,
        devices: vec![],
        peer_address: String::new(),
    };
    assert_eq!(s.apply(dup), Err(StateError::DuplicateId("w2".into())));
}

/// Ensures that plans move forward by epoch, become ready only when current, and are dropped
/// when one of their workers goes.
#[test]
fn plan_lifecycle() {
    let mut s = ClusterState::new("m");
    s.apply(register(&s, "a:1")).expect("register");
    assert_eq!(
        s.apply(Command::SetPlan {
            epoch: 1,
            plan: Some(one_stage_plan("w9"))
        }),
        Err(StateError::UnknownWorker("w9".into()))
    );
    s.apply(Command::SetPlan {
        epoch: 1,
        plan: Some(one_stage_plan("w1")),
    })
    .expect("plan");
    assert!(!s.ready());
    assert!(s.apply(Command::PlanReady { epoch: 2 }).is_err());
    s.apply(Command::PlanReady { epoch: 1 }).expect("ready");
    assert!(s.ready());
    assert!(
        s.apply(Command::SetPlan {
            epoch: 1,
            plan: None
        })
        .is_err()
    );
    s.apply(Command::RemoveWorker { id: "w1".into() })
        .expect("remove");
    assert!(!s.ready() && s.plan().is_none());
    assert_eq!(s.plan_epoch(), 1);
    assert!(s.apply(Command::RemoveWorker { id: "w1".into() }).is_err());
}

/// Ensures that the state survives a serde round trip unchanged (it will travel in Raft).
#[test]
fn serde_round_trip() {
    let mut s = ClusterState::new("m");
    s.apply(register(&s, "a:1")).expect("register");
    s.apply(Command::SetPlan {
        epoch: 3,
        plan: Some(one_stage_plan("w1")),
    })
    .expect("plan");
    let json = serde_json::to_string(&s).expect("serialize");
    let back: ClusterState = serde_json::from_str(&json).expect("deserialize");
    assert_eq!(back, s);
    let cmd = Command::PlanReady { epoch: 3 };
    let json = serde_json::to_string(&cmd).expect("serialize");
    assert_eq!(
        serde_json::from_str::<Command>(&json).expect("deserialize"),
        cmd
    );
}

fn arb_command() -> impl Strategy<Value = (u8, u8, u64)> {
    (0u8..5, 0u8..6, 0u64..8)
}

proptest! {
    /// Ensures that applying the same commands to two states gives equal states, that a
    /// refused command changes nothing, and that the invariants hold after every step: ids
    /// unique per address, plan workers registered, ready only with a plan.
    #[test]
    fn apply_is_deterministic_and_keeps_invariants(cmds in prop::collection::vec(arb_command(), 0..60)) {
        let mut a = ClusterState::new("m");
        let mut b = ClusterState::new("m");
        for (kind, who, epoch) in cmds {
            let cmd = match kind {
                0 => register(&a, &format!("h:{who}")),
                1 => Command::RemoveWorker { id: format!("w{who}") },
                2 => Command::SetPlan { epoch, plan: Some(one_stage_plan(&format!("w{who}"))) },
                3 => Command::PlanReady { epoch },
                _ => Command::SetPlan { epoch, plan: None },
            };
            let before = a.clone();
            let ra = a.apply(cmd.clone());
            let rb = b.apply(cmd);
            prop_assert_eq!(&ra, &rb);
            prop_assert_eq!(&a, &b);
            if ra.is_err() {
                prop_assert_eq!(&a, &before);
            }
            let mut addrs: Vec<_> = a.workers().map(|w| w.address.clone()).collect();
            let n = addrs.len();
            addrs.sort();
            addrs.dedup();
            prop_assert_eq!(addrs.len(), n);
            if let Some(p) = a.plan() {
                for s in &p.stages {
                    prop_assert!(a.worker(&s.worker_id).is_some());
                }
            }
            prop_assert!(!a.ready() || a.plan().is_some());
        }
    }
}
