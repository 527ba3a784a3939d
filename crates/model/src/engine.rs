//! The single-process engine: a loaded model with its tokenizer, KV cache and thread pool,
//! turning a generate request into a stream of tokens.
//!
//! This is the reference every sharded path is judged against, and what `tessera generate`
//! runs when no cluster is involved. Requests are validated once into
//! [`ValidGenerateRequest`]; generation itself cannot fail on user input after that.

use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::Result;
use crate::kv_cache::{KvCacheConfig, PagedKvCache};
use crate::layers::SeqStep;
use crate::llama::{Llama, LoadSpec};
use crate::stage::StageScratch;
use tessera_format::ModelConfig;
use tessera_format::{ModelLocation, open_weights};
use tessera_kernels::ThreadPool;
use tessera_kernels::profile::{self, Op};
use tessera_text::frontend::{Frontend, OutputStream};
pub use tessera_text::frontend::{GenerateRequest, Prompt, TokenEvent, ValidGenerateRequest};
use tessera_text::sampling::{FinishReason, SampledToken, Sampler};

use tessera_text::tokenizer::{ChatMessage, Tokenizer};

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
    frontend: Frontend,
    cache: PagedKvCache,
    pool: ThreadPool,
    scratch: StageScratch,
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
        // The GGUF header is read twice (weights, then tokenizer); it is small and this keeps
        // one code path for the request side.
        let (store, cfg) = open_weights(location)?;
        let frontend = Frontend::open(location)?;
        let model = Llama::load(store.as_ref(), &cfg, LoadSpec::full(&cfg), progress)?;
        Self::new(model, frontend, opts)
    }

    /// An engine over an already loaded model and its frontend.
    ///
    /// # Errors
    /// When the KV cache or the thread pool cannot be set up.
    pub fn new(model: Llama, frontend: Frontend, opts: EngineOptions) -> Result<Self> {
        let cfg = model.config().clone();
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
            frontend,
            cache,
            pool,
            scratch: StageScratch::default(),
            opts,
        })
    }

    /// The model's configuration.
    pub fn config(&self) -> &ModelConfig {
        self.model.config()
    }

    /// The model's tokenizer, shareable with threads that detokenize.
    pub fn tokenizer(&self) -> &Arc<Tokenizer> {
        self.frontend.tokenizer()
    }

    /// The request side: tokenizer, chat template, validation.
    pub fn frontend(&self) -> &Frontend {
        &self.frontend
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
        Ok(self.frontend.render_chat(messages)?)
    }

    /// Tokenizes a prompt the way generation will.
    ///
    /// # Errors
    /// As [`Engine::render_chat`] and the tokenizer.
    pub fn tokenize_prompt(&self, prompt: &Prompt) -> Result<Vec<u32>> {
        Ok(self.frontend.tokenize_prompt(prompt)?)
    }

    /// The longest sequence this engine can hold: the model's context, or less when the KV
    /// cache is smaller.
    pub fn context(&self) -> usize {
        self.config()
            .context_len
            .min(self.cache.config().num_blocks * self.opts.block_size)
    }

    /// Validates a request once: everything generation needs to trust.
    ///
    /// # Errors
    /// [`crate::ModelError::InvalidArgument`] / [`crate::ModelError::Text`] naming the
    /// field at fault.
    pub fn validate(&self, req: &GenerateRequest) -> Result<ValidGenerateRequest> {
        Ok(self.frontend.validate(req, self.context())?)
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
        let mut output = self.frontend.output(req);
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
            let timer = profile::scope(Op::Sample);
            let sampled = sampler.sample(&mut self.scratch.logits);
            if out.tokens.is_empty() {
                out.time_to_first_token = start.elapsed();
            }
            let next = sampled.id;
            let flow = Self::emit(sampled, &mut output, &mut out, on_token);
            drop(timer);
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
        out.text.push_str(&output.flush());
        out.elapsed = start.elapsed();
        Ok(out)
    }

    /// Records a sampled token, feeds the stop checker, and tells the caller.
    fn emit(
        token: SampledToken,
        output: &mut OutputStream,
        out: &mut GenerateOutput,
        on_token: &mut dyn FnMut(&TokenEvent) -> ControlFlow<()>,
    ) -> ControlFlow<()> {
        let (event, finished) = output.push(token);
        out.text.push_str(&event.text);
        out.finish_reason = finished;
        out.tokens.push(event.token.clone());
        on_token(&event)
    }
}
