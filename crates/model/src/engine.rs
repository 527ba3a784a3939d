//! The single-process engine: a loaded model with its tokenizer, KV cache and thread pool,
//! turning a generate request into a stream of tokens.
//!
//! This is the reference every sharded path is judged against, and what `tessera generate`
//! runs when no cluster is involved. Requests are validated once into
//! [`ValidGenerateRequest`]; generation itself cannot fail on user input after that.

use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::ThreadPool;
use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::kv_cache::{KvCacheConfig, PagedKvCache};
use crate::layers::SeqStep;
use crate::llama::{ForwardScratch, Llama, LoadSpec};
use crate::sampling::{
    FinishReason, SampledToken, Sampler, SamplingParams, StopChecker, StopConditions,
    ValidSamplingParams, ValidStopConditions,
};
use crate::source::ModelLocation;
use crate::tokenizer::{ChatMessage, ChatTemplate, IncrementalDecoder, Tokenizer};
use crate::weights::{GgufWeights, SafetensorsWeights, WeightStore};

/// How to run the engine.
#[derive(Clone, Debug)]
pub struct EngineOptions {
    /// Compute threads; 0 = one per core.
    pub threads: usize,
    /// Tokens of KV cache to allocate; `None` = the model's context length.
    pub kv_tokens: Option<usize>,
    /// Tokens per KV cache block.
    pub block_size: usize,
    /// Longest prompt chunk prefilled in one step.
    pub prefill_chunk: usize,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            threads: 0,
            kv_tokens: None,
            block_size: 16,
            prefill_chunk: 512,
        }
    }
}

/// What to generate from.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Prompt {
    /// Raw text, tokenized as is (special-token text recognised).
    Text(String),
    /// Chat messages, rendered with the model's chat template.
    Chat(Vec<ChatMessage>),
}

/// A generate request as a caller writes it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GenerateRequest {
    /// The prompt.
    pub prompt: Prompt,
    /// How to pick tokens.
    pub sampling: SamplingParams,
    /// When to stop.
    pub stop: StopConditions,
}

/// A request that passed validation: tokenized, within the context, parameters in range.
#[derive(Clone, Debug)]
pub struct ValidGenerateRequest {
    /// The prompt's token ids.
    pub prompt_ids: Vec<u32>,
    /// Validated sampling parameters.
    pub sampling: ValidSamplingParams,
    /// Validated stop conditions.
    pub stop: ValidStopConditions,
}

/// One generated token as it is streamed.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenEvent {
    /// The token and its log-probabilities.
    pub token: SampledToken,
    /// Text that became final with this token (may be empty while a multi-byte character or
    /// a possible stop string is incomplete).
    pub text: String,
}

/// The end of a generation.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerateOutput {
    /// All emitted text.
    pub text: String,
    /// Every sampled token, including one that ended generation.
    pub tokens: Vec<SampledToken>,
    /// Why generation stopped; `None` when the caller cancelled.
    pub finish_reason: Option<FinishReason>,
    /// Prompt length in tokens.
    pub prompt_tokens: usize,
    /// Time from the start of the request to the first sampled token.
    pub time_to_first_token: Duration,
    /// Total time.
    pub elapsed: Duration,
}

/// A model ready to generate on this process's CPU.
pub struct Engine {
    model: Llama,
    tokenizer: Arc<Tokenizer>,
    template: Option<ChatTemplate>,
    cache: PagedKvCache,
    pool: ThreadPool,
    scratch: ForwardScratch,
    opts: EngineOptions,
}

impl Engine {
    /// Loads a model, calling `progress(done, total)` as layers load.
    ///
    /// # Errors
    /// When the model cannot be read or is not supported, or the tokenizer or chat template in
    /// it is invalid.
    pub fn load(
        location: &ModelLocation,
        opts: EngineOptions,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Self> {
        let (store, cfg, tokenizer): (Box<dyn WeightStore>, ModelConfig, Tokenizer) = match location
        {
            ModelLocation::Gguf(path) => {
                let w = GgufWeights::open(path)?;
                let cfg = w.config()?;
                let tok = Tokenizer::from_gguf(w.content())?;
                (Box::new(w), cfg, tok)
            }
            ModelLocation::HfDir(dir) => {
                let cfg = ModelConfig::from_hf_json(&dir.join("config.json"))?;
                let tok = Tokenizer::from_hf_file(&dir.join("tokenizer.json"))?;
                (Box::new(SafetensorsWeights::open_dir(dir)?), cfg, tok)
            }
        };
        let model = Llama::load(store.as_ref(), &cfg, LoadSpec::full(&cfg), progress)?;
        Self::new(model, tokenizer, opts)
    }

    /// An engine over an already loaded model.
    ///
    /// # Errors
    /// When the chat template does not compile or the thread pool cannot start.
    pub fn new(model: Llama, tokenizer: Tokenizer, opts: EngineOptions) -> Result<Self> {
        let cfg = model.config().clone();
        let token_text = |id: Option<u32>| {
            id.and_then(|i| tokenizer.token_text(i))
                .unwrap_or_default()
                .to_owned()
        };
        let template = match tokenizer.chat_template() {
            Some(src) => Some(ChatTemplate::new(
                src,
                &token_text(tokenizer.bos_id()),
                &token_text(tokenizer.eos_id()),
            )?),
            None => None,
        };
        let kv_tokens = opts.kv_tokens.unwrap_or(cfg.context_len).max(1);
        let cache = PagedKvCache::new(KvCacheConfig {
            n_layers: cfg.n_layers,
            n_kv_heads: cfg.n_kv_heads,
            head_dim: cfg.head_dim,
            block_size: opts.block_size,
            num_blocks: kv_tokens.div_ceil(opts.block_size),
        })?;
        let pool = ThreadPool::new(opts.threads)?;
        Ok(Self {
            model,
            tokenizer: Arc::new(tokenizer),
            template,
            cache,
            pool,
            scratch: ForwardScratch::default(),
            opts,
        })
    }

    /// The model's configuration.
    pub fn config(&self) -> &ModelConfig {
        self.model.config()
    }

    /// The model's tokenizer, shareable with threads that detokenize.
    pub fn tokenizer(&self) -> &Arc<Tokenizer> {
        &self.tokenizer
    }

    /// The loaded model.
    pub fn model(&self) -> &Llama {
        &self.model
    }

    /// The compute threads.
    pub fn pool(&self) -> &ThreadPool {
        &self.pool
    }

    /// Renders chat messages with the model's template, ready for generation.
    ///
    /// # Errors
    /// When the model has no chat template, or rendering fails.
    pub fn render_chat(&self, messages: &[ChatMessage]) -> Result<String> {
        let template = self
            .template
            .as_ref()
            .ok_or_else(|| ModelError::InvalidArgument {
                field: "messages",
                reason: "this model has no chat template; send a plain prompt".into(),
            })?;
        Ok(template.render(messages, true)?)
    }

    /// Tokenizes a prompt the way generation will.
    ///
    /// # Errors
    /// As [`Engine::render_chat`] and the tokenizer.
    pub fn tokenize_prompt(&self, prompt: &Prompt) -> Result<Vec<u32>> {
        let text = match prompt {
            Prompt::Text(t) => std::borrow::Cow::Borrowed(t.as_str()),
            Prompt::Chat(m) => std::borrow::Cow::Owned(self.render_chat(m)?),
        };
        Ok(self.tokenizer.encode(&text, true, true)?)
    }

    /// Validates a request once: everything generation needs to trust.
    ///
    /// # Errors
    /// [`ModelError::InvalidArgument`] / [`ModelError::Sampling`] naming the field at fault.
    pub fn validate(&self, req: &GenerateRequest) -> Result<ValidGenerateRequest> {
        let prompt_ids = self.tokenize_prompt(&req.prompt)?;
        if prompt_ids.is_empty() {
            return Err(ModelError::InvalidArgument {
                field: "prompt",
                reason: "the prompt is empty".into(),
            });
        }
        let cfg = self.config();
        let context = cfg
            .context_len
            .min(self.cache.config().num_blocks * self.opts.block_size);
        if prompt_ids.len() >= context {
            return Err(ModelError::InvalidArgument {
                field: "prompt",
                reason: format!(
                    "the prompt is {} tokens, the context holds {context}",
                    prompt_ids.len()
                ),
            });
        }
        let sampling = req.sampling.validate(cfg.vocab_size)?;
        let stop = req
            .stop
            .validate(cfg.vocab_size, prompt_ids.len(), context)?;
        Ok(ValidGenerateRequest {
            prompt_ids,
            sampling,
            stop,
        })
    }

    /// Generates, calling `on_token` for every sampled token; returning `Break` from it cancels.
    ///
    /// # Errors
    /// Only internal failures (the KV cache exhausted by a request larger than validation
    /// allowed); user errors were caught by [`Engine::validate`].
    pub fn generate(
        &mut self,
        req: &ValidGenerateRequest,
        on_token: &mut dyn FnMut(&TokenEvent) -> ControlFlow<()>,
    ) -> Result<GenerateOutput> {
        let start = Instant::now();
        let _span = tracing::info_span!("generate", prompt_tokens = req.prompt_ids.len()).entered();
        let mut seq = self.cache.new_seq();
        let mut sampler = Sampler::new(req.sampling.clone(), &req.prompt_ids);
        let mut stop = StopChecker::new(req.stop.clone());
        let mut decoder = IncrementalDecoder::new(true);
        let mut out = GenerateOutput {
            text: String::new(),
            tokens: Vec::new(),
            finish_reason: None,
            prompt_tokens: req.prompt_ids.len(),
            time_to_first_token: Duration::ZERO,
            elapsed: Duration::ZERO,
        };
        // Prefill in chunks; only the last chunk's last token needs logits.
        let chunk_len = self.opts.prefill_chunk.max(1);
        let n_chunks = req.prompt_ids.len().div_ceil(chunk_len);
        for (i, chunk) in req.prompt_ids.chunks(chunk_len).enumerate() {
            let last = i + 1 == n_chunks;
            let _s = tracing::debug_span!("prefill", tokens = chunk.len()).entered();
            let mut batch = [SeqStep {
                tokens: chunk,
                seq: &mut seq,
                logits: last,
            }];
            self.model
                .forward(&mut batch, &mut self.cache, &mut self.scratch, &self.pool)?;
        }
        loop {
            // The sampler may scribble on the logits: they are scratch the next step rewrites.
            let sampled = sampler.sample(&mut self.scratch.logits);
            if out.tokens.is_empty() {
                out.time_to_first_token = start.elapsed();
            }
            let next = sampled.id;
            let flow = self.emit(sampled, &mut stop, &mut decoder, &mut out, on_token);
            if flow.is_break() || out.finish_reason.is_some() {
                break;
            }
            let _s = tracing::trace_span!("decode").entered();
            let tokens = [next];
            let mut batch = [SeqStep {
                tokens: &tokens,
                seq: &mut seq,
                logits: true,
            }];
            self.model
                .forward(&mut batch, &mut self.cache, &mut self.scratch, &self.pool)?;
        }
        if out.finish_reason.is_some() {
            out.text.push_str(&stop.flush());
        }
        out.elapsed = start.elapsed();
        Ok(out)
    }

    /// Records a sampled token, feeds the stop checker, and tells the caller.
    fn emit(
        &self,
        token: SampledToken,
        stop: &mut StopChecker,
        decoder: &mut IncrementalDecoder,
        out: &mut GenerateOutput,
        on_token: &mut dyn FnMut(&TokenEvent) -> ControlFlow<()>,
    ) -> ControlFlow<()> {
        let is_eog = self.tokenizer.is_eog(token.id);
        let delta = if is_eog {
            String::new()
        } else {
            decoder.push(&self.tokenizer, token.id)
        };
        let step = stop.push(token.id, is_eog, &delta);
        out.text.push_str(&step.text);
        out.finish_reason = step.finished;
        out.tokens.push(token.clone());
        on_token(&TokenEvent {
            token,
            text: step.text,
        })
    }
}
