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
use tessera_text::sampling::{SamplingParams, StopConditions};
use tessera_text::tokenizer::ChatMessage;

use super::client::{DEFAULT_ENDPOINT, connect, stream_generate};

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
    /// Apply the model's chat template to the prompt (as a user message).
    #[arg(long)]
    pub chat: bool,
    /// A system message, with --chat.
    #[arg(long, requires = "chat")]
    pub system: Option<String>,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.7)]
    pub temperature: f32,
    /// Keep only the k most likely tokens (0: off).
    #[arg(long, default_value_t = 40)]
    pub top_k: u32,
    /// Nucleus sampling mass (1: off).
    #[arg(long, default_value_t = 0.95)]
    pub top_p: f32,
    /// Drop tokens below this fraction of the top token's probability (0: off).
    #[arg(long, default_value_t = 0.05)]
    pub min_p: f32,
    /// Repetition penalty over prompt and output (1: off).
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f32,
    /// Frequency penalty over the output.
    #[arg(long, default_value_t = 0.0)]
    pub frequency_penalty: f32,
    /// Presence penalty over the output.
    #[arg(long, default_value_t = 0.0)]
    pub presence_penalty: f32,
    /// Random seed; the same seed gives the same output.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 256)]
    pub max_tokens: u32,
    /// Stop when this text is produced (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Print the top-N log-probabilities of each token to standard error.
    #[arg(long, default_value_t = 0)]
    pub logprobs: u32,
    /// Compute threads (0: one per core), with --embedded.
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// The cluster to ask.
    #[arg(long, default_value = DEFAULT_ENDPOINT)]
    pub endpoint: String,
    /// Run the model in this process instead of asking a cluster.
    #[arg(long)]
    pub embedded: bool,
}

impl GenerateArgs {
    fn messages(&self) -> Vec<ChatMessage> {
        let mut messages = Vec::new();
        if let Some(system) = &self.system {
            messages.push(ChatMessage {
                role: "system".into(),
                content: system.clone(),
            });
        }
        messages.push(ChatMessage {
            role: "user".into(),
            content: self.prompt.clone(),
        });
        messages
    }

    /// The request as the public gRPC API spells it.
    pub fn to_proto(&self) -> pb::GenerateRequest {
        let prompt = if self.chat {
            pb::generate_request::Prompt::Chat(pb::ChatMessages {
                messages: self
                    .messages()
                    .into_iter()
                    .map(|m| pb::ChatMessage {
                        role: m.role,
                        content: m.content,
                    })
                    .collect(),
            })
        } else {
            pb::generate_request::Prompt::Text(self.prompt.clone())
        };
        pb::GenerateRequest {
            request_id: String::new(),
            model: self.model.clone().unwrap_or_default(),
            prompt: Some(prompt),
            sampling: Some(pb::SamplingParams {
                temperature: Some(self.temperature),
                top_k: self.top_k,
                top_p: Some(self.top_p),
                min_p: self.min_p,
                repetition_penalty: Some(self.repetition_penalty),
                frequency_penalty: self.frequency_penalty,
                presence_penalty: self.presence_penalty,
                seed: self.seed,
            }),
            stop: Some(pb::StopConditions {
                max_tokens: Some(self.max_tokens),
                stop: self.stop.clone(),
                stop_token_ids: Vec::new(),
                ignore_eos: false,
            }),
            logprobs: self.logprobs > 0,
            top_logprobs: self.logprobs,
        }
    }
}

/// Runs `tessera generate` against a cluster.
async fn run_remote(args: GenerateArgs) -> Result<()> {
    let mut client = connect(&args.endpoint, Duration::from_secs(3)).await?;
    let mut stdout = std::io::stdout();
    let show_logprobs = args.logprobs > 0;
    let done = stream_generate(&mut client, args.to_proto(), &mut stdout, &mut |t| {
        if show_logprobs {
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
    })
    .await?;
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
    Ok(())
}

/// Runs `tessera generate`.
pub fn run(args: GenerateArgs) -> Result<()> {
    if !args.embedded {
        return super::runtime()?.block_on(run_remote(args));
    }
    let location = super::model::resolve_or_pull(args.model.as_deref().unwrap_or(DEFAULT_MODEL))?;
    let mut engine = load_engine(&location, args.threads)?;
    let prompt = if args.chat {
        Prompt::Chat(args.messages())
    } else {
        Prompt::Text(args.prompt.clone())
    };
    let request = GenerateRequest {
        prompt,
        sampling: SamplingParams {
            temperature: args.temperature,
            top_k: args.top_k,
            top_p: args.top_p,
            min_p: args.min_p,
            repetition_penalty: args.repetition_penalty,
            frequency_penalty: args.frequency_penalty,
            presence_penalty: args.presence_penalty,
            seed: args.seed,
            logprobs: args.logprobs > 0,
            top_logprobs: args.logprobs,
        },
        stop: StopConditions {
            max_tokens: args.max_tokens,
            stop: args.stop.clone(),
            stop_token_ids: Vec::new(),
            ignore_eos: false,
        },
    };
    let valid = engine.validate(&request)?;
    let mut stdout = std::io::stdout().lock();
    let show_logprobs = args.logprobs > 0;
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
