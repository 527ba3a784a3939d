//! `tessera plan --simulate`: the example clusters of `deploy/simulate/` plan, print every
//! worker's part of the mesh and a prediction; a refused group size names its reason.

use std::path::PathBuf;
use std::process::Output;

use tessera_testkit::{Tessera, smollm2_arg as model, temp_dir};

/// The `tessera` binary under test.
fn tessera() -> Tessera {
    Tessera::new(env!("CARGO_BIN_EXE_tessera"))
}

/// An example file of `deploy/simulate/`.
fn example(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../deploy/simulate")
        .join(name)
}

fn simulate(path: &std::path::Path) -> Output {
    tessera()
        .command()
        .args(["plan", "--simulate"])
        .arg(path)
        .output()
        .expect("run tessera plan")
}

/// What a successful simulation printed: the rows of the mesh (stage, rank, kv heads) and
/// the figures of its last lines.
struct Printed {
    rows: Vec<(u32, u32, String)>,
    stages: u32,
    ranks: u32,
    used: usize,
    offered: usize,
    single: f64,
    aggregate: f64,
}

fn parse(out: &Output) -> Printed {
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows = text
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let stage = f.first()?.parse().ok()?;
            Some((stage, f.get(1)?.parse().ok()?, f.get(4)?.to_string()))
        })
        .collect();
    let line = |start: &str| {
        text.lines()
            .find(|l| l.starts_with(start))
            .unwrap_or_else(|| panic!("no {start:?} line in\n{text}"))
            .to_owned()
    };
    let numbers = |l: String| -> Vec<f64> {
        l.split(|c: char| !(c.is_ascii_digit() || c == '.'))
            .filter_map(|w| w.parse().ok())
            .collect()
    };
    // "plan: S stages × K ranks = N of W workers"
    let p = numbers(line("plan:"));
    let single = numbers(line("predicted decode:"))[0];
    let aggregate = numbers(line("predicted aggregate:"))[0];
    Printed {
        rows,
        stages: p[0] as u32,
        ranks: p[1] as u32,
        used: p[2] as usize,
        offered: p[3] as usize,
        single,
        aggregate,
    }
}

/// Checks the mesh printed: one row per used worker, stages 0.. in order with ranks 0..K.
fn check_mesh(p: &Printed) {
    assert_eq!(p.rows.len(), p.used);
    assert!(p.used <= p.offered);
    let mut expect = Vec::new();
    for s in 0..p.stages {
        for r in 0..p.ranks {
            expect.push((s, r));
        }
    }
    let got: Vec<_> = p.rows.iter().map(|(s, r, _)| (*s, *r)).collect();
    assert_eq!(got, expect);
    assert!(p.single > 0.0 && p.aggregate >= p.single);
}

/// Ensures that the 64-worker example (an 8B-class model, `tp: auto`) plans a mesh of
/// tensor-parallel groups over several stages and predicts its speed.
#[test]
fn sixty_four_workers() {
    let p = parse(&simulate(&example("64-workers.yaml")));
    check_mesh(&p);
    assert_eq!(p.offered, 64);
    assert!(p.stages > 1 && p.ranks > 1, "{} × {}", p.stages, p.ranks);
    // 8 KV heads over the group's ranks, an equal share each: the first rank's are 0..8/K.
    assert_eq!(p.rows[0].2, format!("0..{}", 8 / p.ranks));
}

/// Ensures that the 512-worker example (a 70B-class model) plans, takes tensor parallelism
/// (80 layers cannot use 512 pipeline stages) and predicts more aggregate than one stream.
#[test]
fn five_hundred_twelve_workers() {
    let p = parse(&simulate(&example("512-workers.yaml")));
    check_mesh(&p);
    assert_eq!(p.offered, 512);
    assert!(p.ranks > 1 && p.used > 80, "{} × {}", p.stages, p.ranks);
    assert!(
        p.aggregate > 10.0 * p.single,
        "{} vs {}",
        p.aggregate,
        p.single
    );
}

/// Ensures that the 8-worker example plans SmolLM2 itself (read from its GGUF) in groups of
/// two, its 3 KV heads split 2 + 1 between a 4-thread and a 2-thread worker.
#[test]
fn eight_workers_on_the_real_model() {
    let Some(gguf) = model() else {
        return;
    };
    let text = std::fs::read_to_string(example("8-workers.yaml")).expect("read the example");
    let dir = temp_dir("plan-simulate");
    let path = dir.path().join("8-workers.yaml");
    let text = text.replace("model: smollm2-135m-instruct", &format!("model: {gguf:?}"));
    std::fs::write(&path, text).expect("write the copy");
    let p = parse(&simulate(&path));
    check_mesh(&p);
    assert_eq!(p.ranks, 2);
    for (_, rank, heads) in &p.rows {
        assert_eq!(heads, if *rank == 0 { "0..2" } else { "2..3" });
    }
}

/// Ensures that a group larger than the KV heads or not dividing the workers is refused with
/// its reason, as is a file naming both a model and a footprint, and that a size that fits
/// plans.
#[test]
fn refusals_are_explained() {
    let dir = temp_dir("plan-refused");
    let path = dir.path().join("cluster.yaml");
    let shape = "footprint: { layers: 30, hidden: 576, intermediate: 1536, heads: 9, \
                 kv_heads: 3, head_dim: 64, vocab: 49152, qtype: q4_1, embed_qtype: q8_0, \
                 tied: true }\n";
    let write = |extra: &str| {
        let yaml = format!(
            "{shape}{extra}workers:\n  - {{ count: 4, memory: 1GiB, threads: 2 }}\n\
             kv_tokens: 1024\n"
        );
        std::fs::write(&path, yaml).expect("write");
    };
    write("tp: 4\n");
    let out = simulate(&path);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("tensor parallelism refused") && err.contains("not replicated"),
        "{err}"
    );
    write("model: smollm2-135m-instruct\n");
    let out = simulate(&path);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("exactly one of"), "{err}");
    write("tp: 3\n");
    let p = parse(&simulate(&path));
    check_mesh(&p);
    assert_eq!(p.ranks, 3, "groups of three, the fourth worker waiting");
    write("tp: 2\n");
    let p = parse(&simulate(&path));
    check_mesh(&p);
    assert_eq!((p.ranks, p.used), (2, 4));
}

/// Ensures that the mixed-cluster example (one GPU worker, four CPU workers) plans every
/// worker into the pipeline and gives the GPU worker — 35 threads' speed — more layers than
/// any CPU worker, saying how fast it counts it.
#[test]
fn a_gpu_worker_takes_the_larger_share() {
    let out = simulate(&example("mixed-gpu.yaml"));
    let p = parse(&out);
    check_mesh(&p);
    assert_eq!((p.used, p.offered), (5, 5));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("w0 is a GPU worker: 300 GB/s at 60% streams as fast as 35 threads"),
        "{text}"
    );
    let layers: Vec<(String, usize)> = text
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.first()?.parse::<u32>().ok()?;
            let (a, b) = f.get(3)?.split_once("..")?;
            Some((
                f.get(2)?.to_string(),
                b.parse::<usize>().ok()? - a.parse::<usize>().ok()?,
            ))
        })
        .collect();
    let gpu = layers
        .iter()
        .find(|(w, _)| w == "w0")
        .expect("w0 planned")
        .1;
    assert!(
        layers.iter().all(|(w, n)| w == "w0" || *n < gpu),
        "{layers:?}"
    );
}
