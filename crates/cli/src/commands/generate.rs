//! `tessera generate`: stream a completion from a cluster (`--endpoint`, by default the local
//! one `tessera up` starts) or from the embedded engine (`--embedded`).

use std::io::Write;
use std::ops::ControlFlow;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use tessera_hub::DEFAULT_MODEL;
use tessera_model::engine::{Engine, EngineOptions, GenerateRequest, Prompt};
use tessera_proto::v1 as pb;

use super::client::{
    API_KEY_ENV, Client, DEFAULT_ENDPOINT, Streamed, connect_with_key, stream_generate,
    stream_generate_resuming,
};
use super::request::RequestArgs;

use crate::progress::Bar;

/// Arguments of `tessera generate`.
#[derive(Args, Debug)]
#[command(allow_negative_numbers = true)]
pub struct GenerateArgs {
    /// The prompt.
    pub prompt: String,
    /// A model name from the cache, a .gguf file, or a Hugging Face directory (embedded; the
    /// default is smollm2-135m-instruct), or a model the cluster serves (default: its own).
    #[arg(long)]
    pub model: Option<String>,
    /// Chat formatting, sampling, stop conditions and logprobs (shared with `tessera up`).
    #[command(flatten)]
    pub request: RequestArgs,
    /// Compute threads (0: one per core), with --embedded.
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// The cluster to ask: one coordinator, or several separated by commas — the first that
    /// answers streams the reply, and should it die mid-answer the next one resumes it.
    #[arg(long, default_value = DEFAULT_ENDPOINT)]
    pub endpoint: String,
    /// The API key, when the cluster requires one (sent as `authorization: Bearer KEY`).
    #[arg(long, env = API_KEY_ENV, hide_env_values = true)]
    pub api_key: Option<String>,
    /// Run the model in this process instead of asking a cluster.
    #[arg(long)]
    pub embedded: bool,
}

/// Runs `tessera generate` against a cluster.
async fn run_remote(args: GenerateArgs) -> Result<()> {
    let mut endpoints: Vec<String> = args
        .endpoint
        .split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .map(str::to_owned)
        .collect();
    if endpoints.is_empty() {
        anyhow::bail!("--endpoint names no coordinator");
    }
    // Some coordinator must answer, and the request starts on the first that does (one that
    // is down is skipped, as a resumption would); when none does, the first one's error says
    // why, with a hint.
    let mut first_error = None;
    let mut answering = None;
    for (i, e) in endpoints.iter().enumerate() {
        match connect_with_key(e, Duration::from_secs(3), args.api_key.as_deref()).await {
            Ok(_) => {
                answering = Some(i);
                break;
            }
            Err(err) => {
                first_error.get_or_insert(err);
            }
        }
    }
    let Some(i) = answering else {
        return Err(first_error.unwrap_or_else(|| anyhow::anyhow!("no coordinator answers")));
    };
    endpoints.rotate_left(i);
    let model = args.model.as_deref().unwrap_or_default();
    let request = args.request.to_proto(&args.prompt, model);
    let mut stdout = std::io::stdout();
    let show_logprobs = request.logprobs;
    let done = stream_generate_resuming(
        &endpoints,
        args.api_key.as_deref(),
        request,
        &mut stdout,
        &mut |t| print_logprobs(show_logprobs, t),
    )
    .await?;
    print_summary(&done);
    Ok(())
}

/// Sends `request`, streams its text to stdout, the per-token logprobs (when asked) and the
/// closing statistics to stderr: what `tessera up --prompt` prints (`tessera generate` too,
/// resuming across coordinators).
///
/// # Errors
/// As [`stream_generate`].
pub async fn print_streamed(client: &mut Client, request: pb::GenerateRequest) -> Result<()> {
    let mut stdout = std::io::stdout();
    let show_logprobs = request.logprobs;
    let done = stream_generate(client, request, &mut stdout, &mut |t| {
        print_logprobs(show_logprobs, t);
    })
    .await?;
    print_summary(&done);
    Ok(())
}

/// One token's logprob and alternatives on stderr, when they were asked for.
fn print_logprobs(show: bool, t: &pb::TokenEvent) {
    if show {
        let alts: Vec<String> = t
            .top_logprobs
            .iter()
            .map(|a| format!("{}={:.3}", a.id, a.logprob))
            .collect();
        eprintln!(
            "[{} {:.3}] {}",
            t.id,
            t.logprob.unwrap_or(f32::NAN),
            alts.join(" ")
        );
    }
}

/// The closing statistics of a streamed answer, on stderr (after ending the text's line).
fn print_summary(done: &Streamed) {
    println!();
    let decode_s = (done.total_ms - done.ttft_ms) / 1e3;
    eprintln!(
        "[{} prompt tokens, {} generated, finish: {}, first token {:.0} ms, {:.1} tok/s]",
        done.prompt_tokens,
        done.tokens.len(),
        done.finish.as_deref().unwrap_or("none"),
        done.ttft_ms,
        if decode_s > 0.0 {
            done.tokens.len().saturating_sub(1) as f64 / decode_s
        } else {
            0.0
        }
    );
}

/// Runs `tessera generate`.
pub fn run(args: GenerateArgs) -> Result<()> {
    if !args.embedded {
        return super::runtime()?.block_on(run_remote(args));
    }
    let location = super::model::resolve_or_pull(args.model.as_deref().unwrap_or(DEFAULT_MODEL))?;
    let mut engine = load_engine(&location, args.threads)?;
    let prompt = if args.request.chat {
        Prompt::Chat(args.request.messages(&args.prompt))
    } else {
        Prompt::Text(args.prompt.clone())
    };
    let request = GenerateRequest {
        prompt,
        sampling: args.request.sampling(),
        stop: args.request.stop_conditions(),
    };
    let valid = engine.validate(&request)?;
    let mut stdout = std::io::stdout().lock();
    let show_logprobs = args.request.logprobs > 0;
    let mut write_error = None;
    let out = {
        let tok = std::sync::Arc::clone(engine.tokenizer());
        engine.generate(&valid, &mut |ev| {
            if show_logprobs {
                let alts: Vec<String> = ev
                    .token
                    .top_logprobs
                    .iter()
                    .map(|(id, lp)| format!("{:?}={lp:.3}", tok.token_text(*id).unwrap_or("?")))
                    .collect();
                eprintln!(
                    "[{} {:.3}] {}",
                    ev.token.id,
                    ev.token.logprob.unwrap_or(f32::NAN),
                    alts.join(" ")
                );
            }
            match stdout
                .write_all(ev.text.as_bytes())
                .and_then(|()| stdout.flush())
            {
                Ok(()) => ControlFlow::Continue(()),
                Err(e) => {
                    // A closed pipe (`| head`) ends generation instead of wasting the cores.
                    write_error = Some(e);
                    ControlFlow::Break(())
                }
            }
        })?
    };
    if write_error.is_some() {
        return Ok(());
    }
    writeln!(stdout)?;
    let gen_tokens = out.tokens.len();
    let decode_s = (out.elapsed - out.time_to_first_token).as_secs_f64();
    eprintln!(
        "[{} prompt tokens, {gen_tokens} generated, finish: {}, first token {:.0} ms, {:.1} tok/s]",
        out.prompt_tokens,
        out.finish_reason
            .map_or("cancelled".to_owned(), |r| format!("{r:?}").to_lowercase()),
        out.time_to_first_token.as_secs_f64() * 1e3,
        if decode_s > 0.0 {
            (gen_tokens.saturating_sub(1)) as f64 / decode_s
        } else {
            0.0
        },
    );
    Ok(())
}

/// Loads the engine with a progress bar over its layers.
pub fn load_engine(location: &tessera_hub::ModelLocation, threads: usize) -> Result<Engine> {
    let mut bar = None;
    let engine = Engine::load(
        location,
        EngineOptions {
            threads,
            ..EngineOptions::default()
        },
        &mut |done, total| {
            let b = bar.get_or_insert_with(|| Bar::steps("loading", total as u64));
            b.set_position(done as u64);
        },
    )
    .context("loading the model")?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    Ok(engine)
}
