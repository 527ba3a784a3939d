//! A short, bounded fuzz pass on the stable toolchain, in the test suite: every target runs for
//! [`BUDGET`] on mutations of its committed inputs — bit flips, interesting bytes, cuts,
//! duplicated and spliced chunks — so each run of the suite tries inputs no one wrote down.
//! It is blind (no coverage feedback); the coverage-guided campaigns are `scripts/fuzz.sh`
//! (libFuzzer on nightly), whose figures go in the issue notes.
//!
//! The mutations are drawn from a seed: `TESSERA_FUZZ_SEED`, or the clock, printed either way.
//! An input that makes a target panic is written to the temp directory and the test fails
//! naming it and the seed, so it can be replayed and, once fixed, committed to
//! `fuzz/regressions/<target>/` (which `tests/corpus.rs` replays).

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tessera_fuzz::TARGETS;
use tessera_testkit::TestRng;

/// How long each target is fuzzed.
const BUDGET: Duration = Duration::from_secs(2);
/// The longest input a mutation may produce (the seeds are far smaller).
const MAX_LEN: usize = 1 << 20;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz")
}

/// The committed inputs of `target`: its seeds and its regressions.
fn committed(target: &str) -> Vec<Vec<u8>> {
    let root = fuzz_dir();
    let mut out = Vec::new();
    for dir in ["corpus", "regressions"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) else {
            continue;
        };
        let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
        paths.sort();
        out.extend(paths.iter().filter_map(|p| std::fs::read(p).ok()));
    }
    out
}

/// A random index below `n` (n ≥ 1).
fn below(rng: &mut TestRng, n: usize) -> usize {
    (rng.next_u64() % n.max(1) as u64) as usize
}

/// One to four mutations of `input`, with chunks spliced from `pool`.
fn mutate(rng: &mut TestRng, input: &[u8], pool: &[Vec<u8>]) -> Vec<u8> {
    const INTERESTING: [u8; 8] = [0, 1, 0x7f, 0x80, 0xff, b'{', b'"', b'\n'];
    let mut v = input.to_vec();
    for _ in 0..1 + below(rng, 4) {
        match below(rng, 7) {
            // Flip one bit.
            0 if !v.is_empty() => {
                let i = below(rng, v.len());
                v[i] ^= 1 << below(rng, 8);
            }
            // An interesting byte, or a random one, in place.
            1 if !v.is_empty() => {
                let i = below(rng, v.len());
                v[i] = match below(rng, 2) {
                    0 => INTERESTING[below(rng, INTERESTING.len())],
                    _ => rng.next_u64() as u8,
                };
            }
            // Cut a range out.
            2 if !v.is_empty() => {
                let at = below(rng, v.len());
                let len = 1 + below(rng, (v.len() - at).min(64));
                v.drain(at..at + len);
            }
            // Truncate.
            3 if !v.is_empty() => v.truncate(below(rng, v.len())),
            // Duplicate a chunk of itself in place.
            4 if !v.is_empty() => {
                let at = below(rng, v.len());
                let len = 1 + below(rng, (v.len() - at).min(256));
                let chunk = v[at..at + len].to_vec();
                let to = below(rng, v.len() + 1);
                v.splice(to..to, chunk);
            }
            // Splice in a chunk of another input.
            5 => {
                let other = &pool[below(rng, pool.len())];
                if !other.is_empty() {
                    let at = below(rng, other.len());
                    let len = 1 + below(rng, (other.len() - at).min(256));
                    let to = below(rng, v.len() + 1);
                    v.splice(to..to, other[at..at + len].iter().copied());
                }
            }
            // Insert random bytes.
            _ => {
                let to = below(rng, v.len() + 1);
                let bytes: Vec<u8> = (0..1 + below(rng, 16))
                    .map(|_| rng.next_u64() as u8)
                    .collect();
                v.splice(to..to, bytes);
            }
        }
    }
    v.truncate(MAX_LEN);
    v
}

/// Ensures that no target panics (or breaks an invariant it asserts) on mutations of its
/// committed inputs, for [`BUDGET`] each.
#[test]
fn mutated_inputs_pass_every_target() {
    let seed = std::env::var("TESSERA_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        });
    eprintln!("mutations from TESSERA_FUZZ_SEED={seed}");
    // Panics are expected to be caught here and reported once, with the input's path.
    let quiet = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let mut crashes = Vec::new();
    for t in TARGETS {
        let pool = committed(t.name);
        assert!(!pool.is_empty(), "{} has no committed inputs", t.name);
        let mut rng = TestRng::new(seed ^ t.name.len() as u64);
        let started = Instant::now();
        let mut runs = 0u64;
        while started.elapsed() < BUDGET {
            let base = below(&mut rng, pool.len());
            let input = mutate(&mut rng, &pool[base], &pool);
            runs += 1;
            if catch_unwind(AssertUnwindSafe(|| (t.run)(&input))).is_err() {
                let path =
                    std::env::temp_dir().join(format!("tessera-fuzz-{}-{seed}-{runs}", t.name));
                let _ = std::fs::write(&path, &input);
                crashes.push(format!("{}: {}", t.name, path.display()));
                break;
            }
        }
        eprintln!(
            "fuzz (stable, blind): {} {runs} inputs in {:?}",
            t.name,
            started.elapsed()
        );
    }
    std::panic::set_hook(quiet);
    assert!(
        crashes.is_empty(),
        "inputs that crash a target (TESSERA_FUZZ_SEED={seed}); replay one with `cargo \
         test -p tessera-fuzz --test corpus` after copying it to fuzz/regressions/<target>/:\n{}",
        crashes.join("\n")
    );
}
