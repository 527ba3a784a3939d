//! `tessera bench-embed`: sentence-embedding throughput of the encoder (tokenization
//! included, batches of `--batch` inputs, `--threads` compute threads), side by side with
//! sentence-transformers on the same corpus and threads in the same run
//! (`scripts/bench_embeddings.py`, when `--reference` names a Python that has it).
//!
//! The corpus is `tests/golden/minilm/bench_corpus.json` (512 sentences made from the golden
//! ones) or a file of the same shape (`{"sentences": [...]}`, or a JSON list). The two sides
//! alternate — ours, theirs, ours, theirs — each timed over whole passes for at least
//! `--seconds`, and the best pass rate of each is compared, so a burst of load on a shared
//! machine penalizes neither side alone. A benchmark, not a test: it prints figures.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tessera_hub::{ModelCache, ModelLocation};
use tessera_kernels::ThreadPool;
use tessera_model::encoder::{Bert, EncoderInput, EncoderOutput};
use tessera_model::llama::LoadSpec;
use tessera_text::tokenizer::Tokenizer;

/// Arguments of `tessera bench-embed`.
#[derive(clap::Args, Debug)]
pub struct BenchEmbedArgs {
    /// The encoder: a cache name or a Hugging Face directory.
    #[arg(long, default_value = "all-minilm-l6-v2")]
    pub model: String,
    /// Compute threads (both sides).
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Inputs per batch (both sides).
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    /// The corpus (default: the repository's bench corpus).
    #[arg(long)]
    pub corpus: Option<PathBuf>,
    /// Seconds each side is timed for, per round.
    #[arg(long, default_value_t = 10.0)]
    pub seconds: f64,
    /// Rounds of (ours, theirs).
    #[arg(long, default_value_t = 2)]
    pub rounds: usize,
    /// A Python interpreter with torch and sentence-transformers: runs
    /// `scripts/bench_embeddings.py` as the reference.
    #[arg(long)]
    pub reference: Option<PathBuf>,
}

/// The repository root (for the default corpus and the reference script).
fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The corpus's sentences.
fn corpus(path: &Path) -> Result<Vec<String>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text).context("the corpus is not JSON")?;
    let list = v.get("sentences").unwrap_or(&v);
    let sentences: Option<Vec<String>> = list
        .as_array()
        .map(|a| a.iter().map(|s| s.as_str().map(str::to_owned)).collect())
        .unwrap_or_default();
    match sentences {
        Some(s) if !s.is_empty() => Ok(s),
        _ => bail!(
            "{}: expected a list of strings, or {{\"sentences\": [...]}}",
            path.display()
        ),
    }
}

/// Our side: best sentences/s over whole passes of the corpus within `seconds`.
fn ours(
    bert: &mut Bert,
    tokenizer: &Tokenizer,
    sentences: &[String],
    args: &BenchEmbedArgs,
    pool: &ThreadPool,
) -> Result<f64> {
    let limit = bert.config().context_len;
    let pass = |bert: &mut Bert| -> Result<()> {
        for chunk in sentences.chunks(args.batch.max(1)) {
            let mut ids = Vec::new();
            let mut lens = Vec::with_capacity(chunk.len());
            for s in chunk {
                let t = tokenizer.encode_limited(s, limit, true)?;
                lens.push(t.len());
                ids.extend(t);
            }
            match bert.encode(EncoderInput::Tokens(&ids), &lens, pool)? {
                EncoderOutput::Embeddings(e) => std::hint::black_box(e),
                EncoderOutput::Hidden(_) => bail!("a whole model pools"),
            };
        }
        Ok(())
    };
    pass(bert)?; // warm-up: page faults on the weights, scratch buffers grown
    let (start, mut best) = (Instant::now(), 0f64);
    while start.elapsed() < Duration::from_secs_f64(args.seconds) {
        let t = Instant::now();
        pass(bert)?;
        best = best.max(sentences.len() as f64 / t.elapsed().as_secs_f64());
    }
    Ok(best)
}

/// The reference's sentences/s (`scripts/bench_embeddings.py`'s JSON line).
fn theirs(python: &Path, dir: &Path, corpus: &Path, args: &BenchEmbedArgs) -> Result<f64> {
    let script = repo_root().join("scripts/bench_embeddings.py");
    let out = Command::new(python)
        .arg(&script)
        .args(["--model", &dir.to_string_lossy()])
        .args(["--threads", &args.threads.to_string()])
        .args(["--batch", &args.batch.to_string()])
        .args(["--sentences", &corpus.to_string_lossy()])
        .args(["--seconds", &args.seconds.to_string()])
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !out.status.success() {
        bail!(
            "the reference failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(line).context("the reference's JSON line")?;
    v["sentences_per_s"]
        .as_f64()
        .context("the reference printed no sentences_per_s")
}

/// Runs the benchmark.
pub fn run(args: &BenchEmbedArgs) -> Result<()> {
    let cache = ModelCache::from_env()?;
    let ModelLocation::HfDir(dir) = tessera_hub::resolve(&args.model, &cache)? else {
        bail!("{}: an encoder is a Hugging Face directory", args.model);
    };
    let corpus_path = args
        .corpus
        .clone()
        .unwrap_or_else(|| repo_root().join("tests/golden/minilm/bench_corpus.json"));
    let sentences = corpus(&corpus_path)?;
    let (store, cfg) = tessera_format::open_weights(&ModelLocation::HfDir(dir.clone()))?;
    let mut bert = Bert::load(store.as_ref(), &cfg, &LoadSpec::full(&cfg))?;
    let tokenizer = Tokenizer::from_hf_file(&dir.join("tokenizer.json"))?;
    let pool = ThreadPool::new(args.threads)?;
    println!(
        "model {} | {} sentences, batch {}, {} threads, {} rounds of {} s per side",
        args.model,
        sentences.len(),
        args.batch,
        args.threads,
        args.rounds,
        args.seconds
    );
    let (mut best_ours, mut best_theirs) = (0f64, None::<f64>);
    for round in 1..=args.rounds.max(1) {
        let o = ours(&mut bert, &tokenizer, &sentences, args, &pool)?;
        best_ours = best_ours.max(o);
        print!("round {round}: tessera {o:.1} sentences/s");
        if let Some(py) = &args.reference {
            let t = theirs(py, &dir, &corpus_path, args)?;
            best_theirs = Some(best_theirs.map_or(t, |b: f64| b.max(t)));
            print!(", sentence-transformers {t:.1} sentences/s");
        }
        println!();
    }
    match best_theirs {
        Some(t) => println!(
            "best: tessera {best_ours:.1}, sentence-transformers {t:.1} sentences/s: ratio {:.2}x",
            best_ours / t
        ),
        None => println!("best: tessera {best_ours:.1} sentences/s (no --reference given)"),
    }
    Ok(())
}
