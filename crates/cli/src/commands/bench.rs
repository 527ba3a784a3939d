//! `tessera bench`: decode and prefill speed, side by side with llama.cpp in the same run.
//!
//! Both engines get the same GGUF, thread count and token ids. llama.cpp runs through
//! `llama-cpp-python` (`scripts/bench_llama_cpp.py`) in a virtual environment that
//! `scripts/bench.sh` prepares; with `--no-llama` only tessera's figures are printed. With
//! `--profile`, tessera's time is broken down by operation ([`tessera_kernels::profile`]).

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result, bail};
use clap::Args;
use tessera_hub::DEFAULT_MODEL;
use tessera_hub::ModelLocation;
use tessera_kernels::profile;
use tessera_model::engine::{Engine, GenerateRequest, Prompt, ValidGenerateRequest};
use tessera_text::sampling::{SamplingParams, StopConditions};

/// Arguments of `tessera bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// A model name from the cache or a .gguf file (llama.cpp needs GGUF).
    #[arg(long, default_value = DEFAULT_MODEL)]
    pub model: String,
    /// Compute threads for both engines.
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Prompt length for the prefill measurement.
    #[arg(long, default_value_t = 512)]
    pub prefill: usize,
    /// Tokens decoded for the decode measurement.
    #[arg(long, default_value_t = 128)]
    pub decode: usize,
    /// Timed repetitions (after one warm-up); the best is reported.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Python interpreter with llama-cpp-python installed.
    #[arg(
        long,
        env = "TESSERA_LLAMA_PYTHON",
        default_value = "tests/golden/.venv/bin/python"
    )]
    pub llama_python: PathBuf,
    /// The llama.cpp side's script.
    #[arg(long, default_value = "scripts/bench_llama_cpp.py")]
    pub llama_script: PathBuf,
    /// Only measure tessera.
    #[arg(long)]
    pub no_llama: bool,
    /// After the timed runs, one more prefill and decode with per-operation timing, printed as
    /// a table of where tessera's time goes.
    #[arg(long)]
    pub profile: bool,
}

/// Tokens per second of one engine.
#[derive(Debug, Clone, Copy, serde::Deserialize)]
struct Figures {
    prefill_tok_s: f64,
    decode_tok_s: f64,
}

/// A deterministic, varied text to cut prompts from.
const TEXT: &str = "The history of computing is a story of layers: transistors become gates, gates \
become processors, processors run operating systems, and operating systems host the programs we \
write. Each layer hides the one below it, yet performance always leaks through. A matrix multiply \
that fits in cache runs ten times faster than one that does not; a network hop of two hundred \
microseconds dwarfs a kernel of twenty. Engineers who build distributed inference systems must \
keep every layer in mind at once, from the arrangement of quantized weights in memory to the \
consensus protocol that decides which machine holds which shard. ";

/// Runs the benchmark and prints the table.
pub fn run(args: BenchArgs) -> Result<()> {
    let location = super::model::resolve_or_pull(&args.model)?;
    let ModelLocation::Gguf(gguf) = &location else {
        bail!("the benchmark compares against llama.cpp, which needs a GGUF model");
    };
    let mut engine = super::generate::load_engine(&location, args.threads)?;
    let text = TEXT.repeat(args.prefill / 80 + 2);
    let mut ids = engine.tokenizer().encode(&text, false, false)?;
    if ids.len() < args.prefill {
        bail!("the benchmark text is only {} tokens", ids.len());
    }
    ids.truncate(args.prefill);

    let ours = measure(&mut engine, &ids, &args)?;
    if args.profile {
        print_profile(&mut engine, &ids, &args)?;
    }
    println!(
        "model {}  threads {}  prefill {} tokens  decode {} tokens  best of {}",
        gguf.display(),
        args.threads,
        args.prefill,
        args.decode,
        args.runs
    );
    if args.no_llama {
        println!("{:<12} {:>14} {:>14}", "", "prefill tok/s", "decode tok/s");
        println!(
            "{:<12} {:>14.1} {:>14.1}",
            "tessera", ours.prefill_tok_s, ours.decode_tok_s
        );
        return Ok(());
    }
    let theirs = llama_cpp(&args, gguf, &ids)?;
    println!("{:<12} {:>14} {:>14}", "", "prefill tok/s", "decode tok/s");
    println!(
        "{:<12} {:>14.1} {:>14.1}",
        "tessera", ours.prefill_tok_s, ours.decode_tok_s
    );
    println!(
        "{:<12} {:>14.1} {:>14.1}",
        "llama.cpp", theirs.prefill_tok_s, theirs.decode_tok_s
    );
    println!(
        "{:<12} {:>13.2}x {:>13.2}x",
        "ratio",
        ours.prefill_tok_s / theirs.prefill_tok_s,
        ours.decode_tok_s / theirs.decode_tok_s
    );
    Ok(())
}

fn request(engine: &Engine, ids: &[u32], max_tokens: usize) -> Result<ValidGenerateRequest> {
    let cfg = engine.config();
    let stop = StopConditions {
        max_tokens: u32::try_from(max_tokens).context("--decode too large")?,
        stop: Vec::new(),
        stop_token_ids: Vec::new(),
        ignore_eos: true,
    };
    let mut req = engine.validate(&GenerateRequest {
        prompt: Prompt::Text("x".into()),
        sampling: SamplingParams::greedy(),
        stop: stop.clone(),
    })?;
    req.prompt_ids = ids.to_vec();
    req.stop = stop.validate(cfg.vocab_size, ids.len(), cfg.context_len)?;
    Ok(req)
}

fn measure(engine: &mut Engine, ids: &[u32], args: &BenchArgs) -> Result<Figures> {
    let prefill_req = request(engine, ids, 1)?;
    let decode_req = request(engine, &ids[..16.min(ids.len())], args.decode)?;
    let mut best = Figures {
        prefill_tok_s: 0.0,
        decode_tok_s: 0.0,
    };
    for run in 0..=args.runs {
        let out = engine.generate(&prefill_req, &mut |_| ControlFlow::Continue(()))?;
        let prefill = ids.len() as f64 / out.time_to_first_token.as_secs_f64();
        let out = engine.generate(&decode_req, &mut |_| ControlFlow::Continue(()))?;
        let steps = out.tokens.len().saturating_sub(1) as f64;
        let decode = steps / (out.elapsed - out.time_to_first_token).as_secs_f64();
        if run > 0 {
            best.prefill_tok_s = best.prefill_tok_s.max(prefill);
            best.decode_tok_s = best.decode_tok_s.max(decode);
        }
    }
    Ok(best)
}

/// One profiled prefill and one profiled decode run, each printed as a table.
fn print_profile(engine: &mut Engine, ids: &[u32], args: &BenchArgs) -> Result<()> {
    let prefill_req = request(engine, ids, 1)?;
    let decode_req = request(engine, &ids[..16.min(ids.len())], args.decode)?;
    profile::set_enabled(true);
    let tables = profiled_runs(engine, &prefill_req, &decode_req);
    profile::set_enabled(false);
    let (prefill, decode, steps) = tables?;
    println!("where tessera's time goes: prefill of {} tokens", ids.len());
    println!("{prefill}");
    println!("where tessera's time goes: decode of {steps} tokens");
    println!("{decode}");
    Ok(())
}

/// The two runs behind [`print_profile`], with profiling already on.
fn profiled_runs(
    engine: &mut Engine,
    prefill_req: &ValidGenerateRequest,
    decode_req: &ValidGenerateRequest,
) -> Result<(profile::Profile, profile::Profile, usize)> {
    profile::reset();
    let out = engine.generate(prefill_req, &mut |_| ControlFlow::Continue(()))?;
    let prefill = profile::snapshot(out.time_to_first_token);
    // Counting restarts at the first token, so the decode table leaves out the short prefill.
    let mut first = true;
    let out = engine.generate(decode_req, &mut |_| {
        if std::mem::take(&mut first) {
            profile::reset();
        }
        ControlFlow::Continue(())
    })?;
    let decode = profile::snapshot(out.elapsed - out.time_to_first_token);
    Ok((prefill, decode, out.tokens.len().saturating_sub(1)))
}

fn llama_cpp(args: &BenchArgs, gguf: &std::path::Path, ids: &[u32]) -> Result<Figures> {
    if !args.llama_python.exists() {
        bail!(
            "{} not found: run scripts/bench.sh (it installs llama-cpp-python), or pass \
             --llama-python, or --no-llama",
            args.llama_python.display()
        );
    }
    let tokens = serde_json::to_string(ids)?;
    let out = Command::new(&args.llama_python)
        .arg(&args.llama_script)
        .arg("--model")
        .arg(gguf)
        .args(["--threads", &args.threads.to_string()])
        .args(["--decode", &args.decode.to_string()])
        .args(["--runs", &args.runs.to_string()])
        .args(["--tokens", &tokens])
        .output()
        .with_context(|| format!("running {}", args.llama_python.display()))?;
    if !out.status.success() {
        bail!(
            "llama.cpp benchmark failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(line).with_context(|| format!("unexpected llama.cpp output: {stdout}"))
}
