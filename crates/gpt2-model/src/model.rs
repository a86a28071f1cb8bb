//! The model: embeddings, the blocks, the final norm and the LM head; checked entry points for a
//! prefill ([`Gpt2Model::forward`]) and a batched decode step ([`Gpt2Model::forward_step`]).

use std::path::Path;

use candle_core::{DType, Device, Tensor};

use std::sync::Arc;

use crate::kernels::bf16::{self, Bf16Matrix};
use crate::kernels::panel_f32::PanelMatrix;
use crate::layers::{Block, LayerNorm};
use crate::linear::{Conv1D, WeightFormat};
use crate::weights::{self, NamedTensors, WeightFiles};
use crate::{Gpt2Config, KvCache, KvFormat, ModelError};

/// The next chunk of one prompt, for [`Gpt2Model::forward_mixed`]: `tokens` `(1, len)`
/// continue the one sequence `cache` holds (or start it).
#[derive(Debug)]
pub struct PromptChunk<'a> {
    /// The chunk's token ids, `(1, len)`.
    pub tokens: &'a Tensor,
    /// The prompt's cache, which the chunk extends by `len` positions.
    pub cache: &'a mut KvCache,
    /// Which of the chunk's positions get logits.
    pub logits_for: LogitsFor,
}

/// Which positions of the input get logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsFor {
    /// Only the last position of each sequence: what generation needs.
    Last,
    /// Every position (parity tests, scoring).
    All,
    /// No position: the chunks of a prompt before its last only fill the cache (the LM head
    /// reads 154 MB of f32 weights on the 124M shape, even for one row).
    None,
}

impl Gpt2Model {
    /// Loads `config.json` and the weights of a model directory onto `device`.
    pub fn load(dir: impl AsRef<Path>, device: &Device) -> Result<Self, ModelError> {
        Self::load_with_weight_format(dir, device, WeightFormat::F32)
    }

    /// [`Self::load`] then [`Self::with_weight_format`], except that bf16 and q8_0 convert each
    /// tensor straight from the checkpoint as it is read, so the f32 weights never all sit in
    /// memory: loading peaks near the converted model's size, and skips a pass over an f32 copy.
    /// (q8_0 keeps the token embeddings in f32 for the lookups; its tied LM head is quantized
    /// from them.)
    pub fn load_with_weight_format(
        dir: impl AsRef<Path>,
        device: &Device,
        format: WeightFormat,
    ) -> Result<Self, ModelError> {
        let dir = dir.as_ref();
        let config = Gpt2Config::from_file(&dir.join("config.json"))?;
        let files = WeightFiles::find(dir)?;
        let streamed = if format != WeightFormat::F32 && matches!(device, Device::Cpu) {
            format
        } else {
            WeightFormat::F32
        };
        let weights = weights::NamedTensors::load(&files, device)?.with_format(streamed);
        Self::from_named_tensors(config, weights, device)?.with_weight_format(format)
    }

    /// Builds a model from tensors under HF names (either key layout).
    pub fn from_tensors(
        config: Gpt2Config,
        tensors: std::collections::HashMap<String, candle_core::Tensor>,
        device: &Device,
    ) -> Result<Self, ModelError> {
        let tensors = tensors
            .into_iter()
            .map(|(name, t)| {
                let name = name
                    .strip_prefix("transformer.")
                    .unwrap_or(&name)
                    .to_string();
                (name, t)
            })
            .collect();
        Self::from_named_tensors(
            config,
            weights::NamedTensors::from_map(tensors, "the given tensors"),
            device,
        )
    }

    /// Writes `config.json` and `model.safetensors` (bare key layout) into `dir`.
    pub fn save(&self, dir: impl AsRef<Path>) -> Result<(), ModelError> {
        let dir = dir.as_ref();
        let io = |path: &Path| {
            let path = path.display().to_string();
            move |e| ModelError::Io { path, source: e }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let config_path = dir.join("config.json");
        std::fs::write(&config_path, crate::demo::hf_config_json(self.config()))
            .map_err(io(&config_path))?;
        let weights_path = dir.join("model.safetensors");
        let named = self.named_weights()?;
        let named: std::collections::HashMap<String, candle_core::Tensor> =
            named.into_iter().collect();
        candle_core::safetensors::save(&named, &weights_path).map_err(|e| ModelError::Weights {
            path: weights_path.display().to_string(),
            reason: e.to_string(),
        })
    }
}

/// GPT-2: token and position embeddings, `n_layer` pre-norm transformer blocks, a final layer
/// norm and the LM head.
#[derive(Debug, Clone)]
pub struct Gpt2Model {
    config: Gpt2Config,
    wte: TokenEmbeddings,
    wpe: Tensor,
    blocks: Vec<Block>,
    ln_f: LayerNorm,
    /// `(vocab, n_embd)` with a zero bias; the same tensor as `wte` when the embeddings are tied
    /// and the weights are f32 or bf16.
    lm_head: Conv1D,
    weight_format: WeightFormat,
    kv_format: KvFormat,
    device: Device,
}

impl Gpt2Model {
    pub(crate) fn from_named_tensors(
        config: Gpt2Config,
        mut weights: NamedTensors,
        device: &Device,
    ) -> Result<Self, ModelError> {
        config.validate()?;
        let cfg = &config;
        let streamed = weights.format();
        let wte_shape = [cfg.vocab_size, cfg.n_embd];
        let wte = if streamed == WeightFormat::Bf16 && cfg.n_embd.is_multiple_of(2) {
            TokenEmbeddings::Bf16(Arc::new(weights.take_bf16(
                "wte.weight",
                &wte_shape,
                bf16::Source::OutIn,
            )?))
        } else if streamed == WeightFormat::F32 && cfg.tie_word_embeddings {
            TokenEmbeddings::Panels(Arc::new(
                weights.take_panels_out_in("wte.weight", &wte_shape)?,
            ))
        } else {
            TokenEmbeddings::F32(weights.take_huge("wte.weight", &wte_shape, false)?)
        };
        let wpe = weights.take("wpe.weight", &[cfg.n_positions, cfg.n_embd])?;
        let blocks = (0..cfg.n_layer)
            .map(|idx| Block::load(&mut weights, idx, cfg))
            .collect::<Result<Vec<_>, _>>()?;
        let ln_f = LayerNorm::load(&mut weights, "ln_f", cfg)?;
        let lm_head_bias = Tensor::zeros(cfg.vocab_size, DType::F32, device)?;
        let lm_head = match (&wte, cfg.tie_word_embeddings) {
            (TokenEmbeddings::F32(wte), true) => Conv1D::dense(wte.clone(), lm_head_bias),
            (TokenEmbeddings::Panels(wte), true) => Conv1D::panels(wte.clone(), lm_head_bias),
            (TokenEmbeddings::Bf16(wte), true) => Conv1D::bf16(wte.clone(), lm_head_bias),
            (_, false) if streamed == WeightFormat::F32 => Conv1D::panels(
                Arc::new(weights.take_panels_out_in("lm_head.weight", &wte_shape)?),
                lm_head_bias,
            ),
            (_, false) => {
                let mut head = Conv1D::dense(
                    weights.take_huge("lm_head.weight", &wte_shape, false)?,
                    lm_head_bias,
                );
                if streamed == WeightFormat::Bf16 {
                    head.store_bf16()?;
                }
                head
            }
        };
        let mut lm_head = lm_head;
        if streamed == WeightFormat::Q8_0 {
            // The tied head is quantized from the f32 embeddings the lookups keep.
            lm_head.quantize_q8()?;
        }
        if cfg.tie_word_embeddings && weights.contains("lm_head.weight") {
            tracing::debug!("lm_head.weight ignored: tie_word_embeddings shares wte");
        }
        Ok(Self {
            config,
            wte,
            wpe,
            blocks,
            ln_f,
            lm_head,
            weight_format: streamed,
            kv_format: KvFormat::F32,
            device: device.clone(),
        })
    }

    /// Converts the linear layers and the LM head of an f32 model to `format`. q8_0 applies to
    /// layers whose input width is a multiple of 32 (all of GPT-2's), bf16 to those of even
    /// width; others stay f32. With bf16 the token embeddings become bf16 too (one matrix with
    /// the tied LM head); position embeddings and layer norms stay f32. Each matrix is converted
    /// and its f32 copy freed in turn. A model already in another format than f32 is refused.
    pub fn with_weight_format(mut self, format: WeightFormat) -> Result<Self, ModelError> {
        if format == self.weight_format {
            return Ok(self);
        }
        if self.weight_format != WeightFormat::F32 {
            return Err(ModelError::Input(format!(
                "weights already stored as {:?} cannot become {format:?}",
                self.weight_format
            )));
        }
        if format == WeightFormat::Bf16 {
            let wte = match &self.wte {
                TokenEmbeddings::F32(wte) => Some(wte.clone()),
                TokenEmbeddings::Panels(_) => Some(self.wte.tensor()?),
                TokenEmbeddings::Bf16(_) => None,
            };
            if let Some(wte) = wte {
                if let Some(packed) = crate::linear::dense_bf16(&wte)? {
                    let packed = Arc::new(packed);
                    if self.config.tie_word_embeddings {
                        self.lm_head = Conv1D::bf16(packed.clone(), self.lm_head.bias.clone());
                    }
                    self.wte = TokenEmbeddings::Bf16(packed);
                }
            }
        }
        let mut layers: Vec<&mut Conv1D> = Vec::new();
        for block in &mut self.blocks {
            layers.push(&mut block.attn.c_attn);
            layers.push(&mut block.attn.c_proj);
            layers.push(&mut block.mlp.c_fc);
            layers.push(&mut block.mlp.c_proj);
        }
        layers.push(&mut self.lm_head);
        for layer in layers {
            match format {
                WeightFormat::Q8_0 => layer.quantize_q8()?,
                WeightFormat::Bf16 => layer.store_bf16()?,
                WeightFormat::F32 => true,
            };
        }
        self.weight_format = format;
        Ok(self)
    }

    /// Makes [`Self::new_cache`] and [`Self::new_cache_with_capacity`] store keys and values
    /// as `format`. f16 halves the caches' memory; every cached value is rounded to f16.
    pub fn with_kv_format(mut self, format: KvFormat) -> Self {
        self.kv_format = format;
        self
    }

    /// How new caches store keys and values.
    pub fn kv_format(&self) -> KvFormat {
        self.kv_format
    }

    /// How the linear layers' weights are stored.
    pub fn weight_format(&self) -> WeightFormat {
        self.weight_format
    }

    /// The model's configuration.
    pub fn config(&self) -> &Gpt2Config {
        &self.config
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// An empty cache for this model, growing as sequences do.
    pub fn new_cache(&self) -> KvCache {
        self.new_cache_with_capacity(64)
    }

    /// An empty cache with room for `positions` positions per sequence (at most `n_positions`),
    /// so that decoding up to that length never reallocates.
    pub fn new_cache_with_capacity(&self, positions: usize) -> KvCache {
        let c = &self.config;
        KvCache::new(
            c.n_layer,
            c.n_head,
            c.head_dim(),
            positions.clamp(1, c.n_positions),
            self.kv_format,
        )
    }

    /// The bytes the KV caches of `rows` sequences of up to `positions` positions take in this
    /// model's cache format: keys and values of every layer (a reorder renames rows and needs no
    /// staging area).
    pub fn kv_cache_bytes(&self, rows: usize, positions: usize) -> usize {
        let c = &self.config;
        let element = match self.kv_format {
            KvFormat::F32 => 4,
            KvFormat::F16 => 2,
        };
        let buffer = rows
            .saturating_mul(c.n_head * c.head_dim())
            .saturating_mul(positions.clamp(1, c.n_positions))
            .saturating_mul(element);
        buffer.saturating_mul(2 * c.n_layer)
    }

    /// Runs `tokens` (`(batch, new)`, u32) after what `cache` already holds, appends their keys
    /// and values to `cache`, and returns logits `(batch, positions, vocab)`, where positions is
    /// 1 for [`LogitsFor::Last`], `new` for [`LogitsFor::All`] and 0 for [`LogitsFor::None`].
    ///
    /// Every sequence of the batch continues from the same past length.
    pub fn forward(
        &self,
        tokens: &Tensor,
        cache: &mut KvCache,
        logits_for: LogitsFor,
    ) -> Result<Tensor, ModelError> {
        let (past, new) = self.check_prefill(tokens, cache)?;
        // On a pool thread, as a decode step (see there).
        let logits = rayon::scope(|_| self.forward_unchecked(tokens, cache, logits_for))?;
        cache.commit(past + new);
        Ok(logits)
    }

    /// Checks a prefill's input against its cache; returns `(past, new)`.
    fn check_prefill(
        &self,
        tokens: &Tensor,
        cache: &KvCache,
    ) -> Result<(usize, usize), ModelError> {
        let (batch, new) = tokens.dims2()?;
        if new == 0 || batch == 0 {
            return Err(ModelError::Input("no tokens to run".into()));
        }
        let c = &self.config;
        if !cache.fits(c.n_layer, c.n_head, c.head_dim()) {
            return Err(ModelError::Input(
                "the cache was made for another model".into(),
            ));
        }
        if cache.seq_len() > 0 && cache.batch_size() != Some(batch) {
            return Err(ModelError::Input(format!(
                "cache holds {:?} sequences, input has {batch}",
                cache.batch_size()
            )));
        }
        let past = cache.seq_len();
        if past + new > self.config.n_positions {
            return Err(ModelError::SequenceTooLong {
                length: past + new,
                n_positions: self.config.n_positions,
            });
        }
        let max_id = tokens
            .flatten_all()
            .and_then(|t| t.max(0))
            .and_then(|t| t.to_scalar::<u32>())?;
        if max_id as usize >= self.config.vocab_size {
            return Err(ModelError::Input(format!(
                "token id {max_id} is outside the vocabulary (size {})",
                self.config.vocab_size
            )));
        }
        Ok((past, new))
    }

    /// A decode step ([`Self::forward_step`]) and the next chunk of several prompts (each as
    /// [`Self::forward`] with a batch of 1) in one pass: their rows go through each layer
    /// together, attention apart. Each result has exactly the bits of its separate call; with
    /// bf16 or q8_0 weights, whose decode and prefill kernels are the same, every weight is read
    /// once for all of them, so small chunks of waiting prompts hardly slow the running streams.
    /// Returns the step's logits (one row per token, row-major) and each chunk's (`(1,
    /// positions, vocab)`), in the order of `chunks`. The step may be empty (no token, no cache)
    /// when there are chunks: they then share a pass on their own. Nothing moves in any cache on
    /// an error.
    pub fn forward_mixed(
        &self,
        step: (&[u32], &mut [&mut KvCache]),
        chunks: &mut [PromptChunk<'_>],
    ) -> Result<(Vec<f32>, Vec<Tensor>), ModelError> {
        let (tokens, caches) = step;
        let positions = if tokens.is_empty() && caches.is_empty() && !chunks.is_empty() {
            Vec::new()
        } else {
            self.check_step(tokens, caches)?
        };
        let mut spans = Vec::with_capacity(chunks.len());
        for chunk in chunks.iter() {
            let (past, new) = self.check_prefill(chunk.tokens, chunk.cache)?;
            if chunk.tokens.dim(0)? != 1 {
                return Err(ModelError::Input(
                    "a chunk beside a decode step is one sequence".into(),
                ));
            }
            spans.push(past + new);
        }
        let (logits, chunk_logits) =
            rayon::scope(|_| self.forward_mixed_unchecked(tokens, &positions, caches, chunks))?;
        for cache in caches.iter_mut() {
            let positions = cache.seq_len() + 1;
            cache.commit(positions);
        }
        for (chunk, span) in chunks.iter_mut().zip(spans) {
            chunk.cache.commit(span);
        }
        Ok((logits, chunk_logits))
    }

    fn forward_mixed_unchecked(
        &self,
        tokens: &[u32],
        positions: &[u32],
        caches: &mut [&mut KvCache],
        chunks: &mut [PromptChunk<'_>],
    ) -> candle_core::Result<(Vec<f32>, Vec<Tensor>)> {
        let n_embd = self.config.n_embd;
        let mut parts = Vec::with_capacity(1 + chunks.len());
        if !tokens.is_empty() {
            parts.push(self.embed_step(tokens, positions, caches)?);
        }
        let mut lens = Vec::with_capacity(chunks.len());
        for chunk in chunks.iter_mut() {
            let new = chunk.tokens.dim(1)?;
            parts.push(
                self.embed_prefill(chunk.tokens, chunk.cache)?
                    .reshape((new, n_embd))?,
            );
            lens.push(new);
        }
        let mut xs = Tensor::cat(&parts, 0)?;
        let mut chunk_caches: Vec<&mut KvCache> =
            chunks.iter_mut().map(|c| &mut *c.cache).collect();
        for (layer, block) in self.blocks.iter().enumerate() {
            xs = block.forward_split(&xs, caches, &mut chunk_caches, &lens, layer)?;
        }
        let which: Vec<LogitsFor> = chunks.iter().map(|c| c.logits_for).collect();
        self.mixed_logits(&xs, tokens.len(), &lens, &which)
    }

    /// The logits of a mixed pass from the last block's output `xs`: the step's `rows` first (as
    /// [`Self::step_logits`] gives them), then those of the chunks whose rows follow (`lens`
    /// rows each), as [`Self::prefill_logits`] gives each alone. The rows that need logits go
    /// through the LM head in one call (`Conv1D::forward_split`: one pass over the head wherever
    /// a step's and a prefill's kernels are the same, and each row computed alike whatever else
    /// is in the call). Before, a pass in which a prompt finished read the f32 head (154 MB on
    /// the 124M shape) twice, once for the step and once for the chunk.
    fn mixed_logits(
        &self,
        xs: &Tensor,
        rows: usize,
        lens: &[usize],
        which: &[LogitsFor],
    ) -> candle_core::Result<(Vec<f32>, Vec<Tensor>)> {
        let vocab = self.config.vocab_size;
        let mut picked = Vec::with_capacity(1 + lens.len());
        if rows > 0 {
            picked.push(xs.narrow(0, 0, rows)?);
        }
        let mut wanted = Vec::with_capacity(lens.len());
        let mut first = rows;
        for (&len, &logits_for) in lens.iter().zip(which) {
            let (from, count) = match logits_for {
                LogitsFor::Last => (first + len - 1, 1),
                LogitsFor::All => (first, len),
                LogitsFor::None => (first, 0),
            };
            if count > 0 {
                picked.push(xs.narrow(0, from, count)?);
            }
            wanted.push(count);
            first += len;
        }
        if picked.is_empty() {
            let none = Tensor::zeros((1, 0, vocab), DType::F32, &self.device)?;
            return Ok((Vec::new(), vec![none; lens.len()]));
        }
        let logits = self
            .lm_head
            .forward_split(&self.ln_f.forward(&Tensor::cat(&picked, 0)?)?, rows)?;
        let step = match rows {
            0 => Vec::new(),
            _ => logits.narrow(0, 0, rows)?.flatten_all()?.to_vec1::<f32>()?,
        };
        let mut chunks = Vec::with_capacity(wanted.len());
        let mut first = rows;
        for count in wanted {
            chunks.push(logits.narrow(0, first, count)?.reshape((1, count, vocab))?);
            first += count;
        }
        Ok((step, chunks))
    }

    fn forward_unchecked(
        &self,
        tokens: &Tensor,
        cache: &mut KvCache,
        logits_for: LogitsFor,
    ) -> candle_core::Result<Tensor> {
        let mut xs = self.embed_prefill(tokens, cache)?;
        for (layer, block) in self.blocks.iter().enumerate() {
            xs = block.forward(&xs, cache, layer)?;
        }
        self.prefill_logits(xs, logits_for)
    }

    /// A prefill's token and position embeddings, `(batch, new, n_embd)`, after the cache has
    /// made room for its positions.
    fn embed_prefill(&self, tokens: &Tensor, cache: &mut KvCache) -> candle_core::Result<Tensor> {
        let (batch, new) = tokens.dims2()?;
        let n_embd = self.config.n_embd;
        let past = cache.seq_len();
        let token_embeddings = self
            .wte
            .lookup(&tokens.flatten_all()?)?
            .reshape((batch, new, n_embd))?;
        let position_embeddings = self.wpe.narrow(0, past, new)?;
        cache.prepare(batch, past + new);
        token_embeddings.broadcast_add(&position_embeddings)
    }

    /// A prefill's logits `(batch, positions, vocab)` from the last block's output.
    fn prefill_logits(&self, xs: Tensor, logits_for: LogitsFor) -> candle_core::Result<Tensor> {
        let (batch, new, n_embd) = xs.dims3()?;
        let xs = match logits_for {
            LogitsFor::Last => xs.narrow(1, new - 1, 1)?,
            LogitsFor::All => xs,
            LogitsFor::None => {
                return Tensor::zeros((batch, 0, self.config.vocab_size), DType::F32, &self.device)
            }
        };
        let positions = xs.dim(1)?;
        let xs = self
            .ln_f
            .forward(&xs)?
            .reshape((batch * positions, n_embd))?;
        self.lm_head
            .forward(&xs)?
            .reshape((batch, positions, self.config.vocab_size))
    }

    /// One decode step for the sequences of several caches at once (continuous batching): cache
    /// `i` holds `caches[i].batch_size()` sequences, all of one length, and `tokens` gives one
    /// token per sequence, grouped by cache in order. Returns the logits, `tokens.len()` rows of
    /// `vocab_size`, row-major.
    ///
    /// Each row's arithmetic is the same whatever else shares the step, so a sequence's logits
    /// do not depend on its batch neighbours.
    pub fn forward_step(
        &self,
        tokens: &[u32],
        caches: &mut [&mut KvCache],
    ) -> Result<Vec<f32>, ModelError> {
        let positions = self.check_step(tokens, caches)?;
        // The step runs on a pool thread, so that its parallel kernels (several per layer, the
        // LM head) fork from a worker: called from outside the pool, each one injected a job,
        // woke the workers and put the caller to sleep on a futex. Those wake-ups
        // (`LockLatch::wait_and_reset`, `finish_task_switch`, `lock_contended`) were ~10% of the
        // CPU samples of a 124M q8_0 request, and a 5-beam one took 1.54 s instead of 1.68 s
        // (medians of 3 interleaved runs, 2-vCPU EPYC). Every kernel writes disjoint outputs,
        // so the thread it runs on changes no bit.
        let logits = rayon::scope(|_| self.forward_step_unchecked(tokens, &positions, caches))?;
        for cache in caches.iter_mut() {
            let positions = cache.seq_len() + 1;
            cache.commit(positions);
        }
        Ok(logits)
    }

    /// Checks a decode step's input against its caches; returns each row's position.
    fn check_step(&self, tokens: &[u32], caches: &[&mut KvCache]) -> Result<Vec<u32>, ModelError> {
        let rows: usize = caches.iter().map(|c| c.rows()).sum();
        if rows != tokens.len() || tokens.is_empty() {
            return Err(ModelError::Input(format!(
                "{} tokens for {rows} cached sequences",
                tokens.len()
            )));
        }
        let c = &self.config;
        let mut positions = Vec::with_capacity(rows);
        for cache in caches.iter() {
            if !cache.fits(c.n_layer, c.n_head, c.head_dim()) {
                return Err(ModelError::Input(
                    "a cache was made for another model".into(),
                ));
            }
            if cache.seq_len() == 0 {
                return Err(ModelError::Input(
                    "decode steps continue a prefilled cache".into(),
                ));
            }
            if cache.seq_len() + 1 > c.n_positions {
                return Err(ModelError::SequenceTooLong {
                    length: cache.seq_len() + 1,
                    n_positions: c.n_positions,
                });
            }
            positions.extend(std::iter::repeat_n(cache.seq_len() as u32, cache.rows()));
        }
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= c.vocab_size) {
            return Err(ModelError::Input(format!(
                "token id {bad} is outside the vocabulary (size {})",
                c.vocab_size
            )));
        }
        Ok(positions)
    }

    fn forward_step_unchecked(
        &self,
        tokens: &[u32],
        positions: &[u32],
        caches: &mut [&mut KvCache],
    ) -> candle_core::Result<Vec<f32>> {
        let mut xs = self.embed_step(tokens, positions, caches)?;
        for (layer, block) in self.blocks.iter().enumerate() {
            xs = block.forward_step(&xs, caches, layer)?;
        }
        self.step_logits(&xs)
    }

    /// A decode step's embeddings `(rows, n_embd)`, after each cache has made room for its
    /// next position.
    fn embed_step(
        &self,
        tokens: &[u32],
        positions: &[u32],
        caches: &mut [&mut KvCache],
    ) -> candle_core::Result<Tensor> {
        let device = &self.device;
        let tokens = Tensor::from_slice(tokens, tokens.len(), device)?;
        let positions = Tensor::from_slice(positions, positions.len(), device)?;
        for cache in caches.iter_mut() {
            let (rows, length) = (cache.rows(), cache.seq_len() + 1);
            cache.prepare(rows, length);
        }
        self.wte.lookup(&tokens)? + self.wpe.index_select(&positions, 0)?
    }

    /// A decode step's logits, row-major, from the last block's output.
    fn step_logits(&self, xs: &Tensor) -> candle_core::Result<Vec<f32>> {
        self.lm_head.forward_step_values(&self.ln_f.forward(xs)?)
    }

    /// The weight tensors under HF's bare names, for writing a checkpoint.
    pub fn named_weights(&self) -> candle_core::Result<Vec<(String, Tensor)>> {
        let mut named = vec![
            ("wte.weight".to_string(), self.wte.tensor()?),
            ("wpe.weight".to_string(), self.wpe.clone()),
        ];
        for (idx, block) in self.blocks.iter().enumerate() {
            let p = format!("h.{idx}");
            let pairs = [
                ("ln_1.weight", block.ln_1.weight.clone()),
                ("ln_1.bias", block.ln_1.bias.clone()),
                ("attn.c_attn.weight", block.attn.c_attn.weight()?),
                ("attn.c_attn.bias", block.attn.c_attn.bias.clone()),
                ("attn.c_proj.weight", block.attn.c_proj.weight()?),
                ("attn.c_proj.bias", block.attn.c_proj.bias.clone()),
                ("ln_2.weight", block.ln_2.weight.clone()),
                ("ln_2.bias", block.ln_2.bias.clone()),
                ("mlp.c_fc.weight", block.mlp.c_fc.weight()?),
                ("mlp.c_fc.bias", block.mlp.c_fc.bias.clone()),
                ("mlp.c_proj.weight", block.mlp.c_proj.weight()?),
                ("mlp.c_proj.bias", block.mlp.c_proj.bias.clone()),
            ];
            named.extend(pairs.into_iter().map(|(n, t)| (format!("{p}.{n}"), t)));
        }
        named.push(("ln_f.weight".to_string(), self.ln_f.weight.clone()));
        named.push(("ln_f.bias".to_string(), self.ln_f.bias.clone()));
        if !self.config.tie_word_embeddings {
            named.push(("lm_head.weight".to_string(), self.lm_head.weight_t()?));
        }
        Ok(named)
    }
}

/// The token embedding table, `(vocab, n_embd)`.
#[derive(Debug, Clone)]
enum TokenEmbeddings {
    F32(Tensor),
    /// f32 in the GEMM's panels, shared with the tied LM head: one kernel for its every row
    /// count, as the blocks' layers. On GPT-2 small's head (`(50257, 768)`, 2-vCPU EPYC) the
    /// panels took 3.5 / 4.0 / 7.4 / 18.8 ms for 1 / 5 / 16 / 48 rows against 4.7 / 4.9 / 8.9 /
    /// 22.6 ms for the streaming dot products over `(out, in)` rows, and a prefill's last row no
    /// longer packs the 154 MB matrix afresh.
    Panels(Arc<PanelMatrix>),
    /// Shared with the LM head when the embeddings are tied.
    Bf16(Arc<Bf16Matrix>),
}

impl TokenEmbeddings {
    /// The rows of `ids` (a 1-D u32 tensor): `(ids, n_embd)`.
    fn lookup(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            TokenEmbeddings::F32(wte) => wte.index_select(ids, 0),
            TokenEmbeddings::Panels(wte) => {
                let ids = ids.to_vec1::<u32>()?;
                let (_, k) = wte.shape();
                let rows = wte.gather(&ids).map_err(candle_core::Error::Msg)?;
                Tensor::from_vec(rows, (ids.len(), k), &Device::Cpu)
            }
            TokenEmbeddings::Bf16(wte) => {
                let ids = ids.to_vec1::<u32>()?;
                let (_, k) = wte.shape();
                Tensor::from_vec(wte.gather(&ids), (ids.len(), k), &Device::Cpu)
            }
        }
    }

    /// The table as an f32 tensor.
    fn tensor(&self) -> candle_core::Result<Tensor> {
        match self {
            TokenEmbeddings::F32(wte) => Ok(wte.clone()),
            TokenEmbeddings::Panels(wte) => {
                Tensor::from_vec(wte.to_out_in(), wte.shape(), &Device::Cpu)
            }
            TokenEmbeddings::Bf16(wte) => {
                Tensor::from_vec(wte.dequantize(), wte.shape(), &Device::Cpu)
            }
        }
    }
}
