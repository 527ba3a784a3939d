//! Replays every committed fuzz input — the seed corpora (`fuzz/corpus/<target>`) and the
//! inputs that once crashed a target (`fuzz/regressions/<target>`) — through the targets on
//! the stable toolchain, so the test suite runs them all without libFuzzer.

use std::path::{Path, PathBuf};

use tessera_fuzz::TARGETS;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz")
}

/// The files of `dir`, sorted; none when it does not exist.
fn inputs(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    files.retain(|p| p.is_file());
    files.sort();
    files
}

/// Ensures that every target has a committed seed corpus, and that every seed and every
/// regression input runs through its target without a panic or a violated invariant.
#[test]
fn committed_inputs_pass_every_target() {
    let root = fuzz_dir();
    let mut ran = 0;
    for t in TARGETS {
        let seeds = inputs(&root.join("corpus").join(t.name));
        assert!(!seeds.is_empty(), "fuzz/corpus/{} has no seeds", t.name);
        for input in seeds
            .iter()
            .chain(&inputs(&root.join("regressions").join(t.name)))
        {
            let data = std::fs::read(input).expect("readable input");
            eprintln!("{}: {}", t.name, input.display());
            (t.run)(&data);
            ran += 1;
        }
    }
    eprintln!("{ran} inputs replayed");
}

/// Ensures that every target of the library has a cargo-fuzz target of the same name, and
/// that there is no fuzz target the replay would miss.
#[test]
fn every_target_has_a_fuzz_binary() {
    let dir = fuzz_dir().join("fuzz_targets");
    let mut bins: Vec<String> = inputs(&dir)
        .iter()
        .filter_map(|p| Some(p.file_stem()?.to_str()?.to_owned()))
        .collect();
    bins.sort();
    let mut names: Vec<String> = TARGETS.iter().map(|t| t.name.to_owned()).collect();
    names.sort();
    assert_eq!(bins, names);
}

/// Ensures that the committed seed corpora are exactly what the seed generator writes, so a
/// change to an input format shows up here rather than as seeds that silently stop reaching
/// deep into their target.
#[test]
fn committed_seeds_are_the_generators() {
    let root = fuzz_dir().join("corpus");
    for (target, name, bytes) in tessera_fuzz::seeds::seeds() {
        let path = root.join(target).join(&name);
        let committed = std::fs::read(&path).unwrap_or_default();
        assert!(
            committed == bytes,
            "{} differs from the generator's; run `cargo run -p tessera-fuzz --bin fuzz-seeds -- fuzz/corpus`",
            path.display()
        );
    }
}
