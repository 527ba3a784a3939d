//! Host-side launch planning: parameter validation, launch geometry, split-KV planning and
//! block-table checks for the attention kernels.
//!
//! Everything here is pure (no CUDA), so it is unit-tested on any machine; the runtime only
//! turns these plans into launches. The constants and the shared-memory formula mirror the
//! CUDA C in [`crate::kernels::attn_core`] and must change together with it.

use crate::error::{CudaError, Result};

/// Warps per attention block (`WARPS` in the attention core).
pub const WARPS: u32 = 4;
/// Keys per shared-memory tile (`TILE`): one per lane.
pub const TILE_KEYS: usize = 32;
/// Largest head dim any attention kernel supports.
pub const MAX_HEAD_DIM: usize = 256;
/// Default dynamic shared memory a block may use without opting in (48 KiB).
pub const DEFAULT_SMEM_LIMIT: usize = 48 * 1024;
/// A decode split shorter than this costs more to merge than it saves.
pub const MIN_KEYS_PER_SPLIT: usize = 256;
const _: () = assert!(MIN_KEYS_PER_SPLIT.is_multiple_of(TILE_KEYS));
/// Decode blocks per SM the split planner aims for: decode is bandwidth-bound, and a decode
/// block is small (128 threads, ~20 KiB of shared memory at head dim 128), so several per SM
/// keep enough loads in flight.
pub const DECODE_BLOCKS_PER_SM: usize = 8;
/// Threads of the grid-stride elementwise kernels.
pub const ELEMENTWISE_THREADS: u32 = 256;
/// Cap on elementwise blocks (the kernels loop, so more add nothing).
const MAX_ELEMENTWISE_BLOCKS: usize = 65_535;

/// Static shared memory of an attention block besides the dynamic part: 32 row descriptors of
/// 32 bytes and the block's key limit (see `attn_core`/`prefill`/`decode`).
pub const ATTN_STATIC_SMEM: usize = 32 * 32 + 16;

/// Query rows per block of the tensor-core prefill (`TC_BM`).
pub const TC_ROWS: usize = 64;
/// Keys per tile of the tensor-core prefill (`TC_BN`).
pub const TC_KEYS: usize = 64;
/// Oldest compute capability with the `mma.sync` shapes the tensor-core prefill uses.
pub const TC_MIN_CC: u32 = 80;

/// Which prefill kernel runs a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PrefillPath {
    /// Tensor cores when the head dim (64 or 128) and the device (sm_80+) allow, else SIMT.
    Auto,
    /// The SIMT kernel, any head dim (tests compare both paths with it).
    Simt,
}

/// Which register-resident head-dim variant of a kernel runs a head dim.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HeadDimClass {
    /// Head dims 1..=64.
    D64,
    /// Head dims 65..=128.
    D128,
    /// Head dims 129..=256.
    D256,
}

impl HeadDimClass {
    /// The class holding `head_dim`.
    ///
    /// # Errors
    /// [`CudaError::InvalidArgument`] (`head_dim`) outside `1..=MAX_HEAD_DIM`.
    pub fn for_head_dim(head_dim: usize) -> Result<Self> {
        match head_dim {
            1..=64 => Ok(Self::D64),
            65..=128 => Ok(Self::D128),
            129..=MAX_HEAD_DIM => Ok(Self::D256),
            _ => Err(CudaError::invalid(
                "head_dim",
                format!("{head_dim} is outside 1..={MAX_HEAD_DIM}"),
            )),
        }
    }

    /// Kernel-name suffix (`d64`, `d128`, `d256`).
    pub fn suffix(self) -> &'static str {
        match self {
            Self::D64 => "d64",
            Self::D128 => "d128",
            Self::D256 => "d256",
        }
    }

    /// Query rows per warp of the prefill variant (`RPW` in `prefill.rs`).
    pub fn prefill_rows_per_warp(self) -> usize {
        match self {
            Self::D64 | Self::D128 => 8,
            Self::D256 => 2,
        }
    }

    /// Query rows per warp of the decode variant (`RPW` in `decode.rs`).
    pub fn decode_rows_per_warp(self) -> usize {
        2
    }
}

/// Dynamic shared memory of an attention block with `rows` query rows of `head_dim`: queries in
/// f32, one K tile with an odd-word row stride, one V tile (see `attn_core`).
pub fn attn_smem_bytes(head_dim: usize, rows: usize) -> usize {
    let hp = (head_dim + 1) & !1;
    let mut words = hp / 2;
    if words.is_multiple_of(2) {
        words += 1;
    }
    let kst = words * 2;
    rows * hp * 4 + TILE_KEYS * kst * 2 + TILE_KEYS * hp * 2
}

/// Dynamic shared memory of the tensor-core prefill: K and V tiles of [`TC_KEYS`] rows padded
/// by 8 elements.
pub fn tc_smem_bytes(head_dim: usize) -> usize {
    2 * TC_KEYS * (head_dim + 8) * 2
}

/// Grid, block and dynamic shared memory of one launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchGeometry {
    /// Blocks in x, y, z.
    pub grid: (u32, u32, u32),
    /// Threads in x, y, z.
    pub block: (u32, u32, u32),
    /// Dynamic shared memory per block, bytes.
    pub smem_bytes: u32,
}

/// Parameters of one prefill attention call (see [`crate::kernels::prefill`] for layouts).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PrefillParams {
    /// Independent sequences of equal length.
    pub batch: usize,
    /// Query rows per sequence.
    pub seq_q: usize,
    /// Keys per sequence.
    pub seq_k: usize,
    /// Query heads; a multiple of `n_kv_heads`.
    pub n_heads: usize,
    /// Key/value heads.
    pub n_kv_heads: usize,
    /// Values per head, `1..=MAX_HEAD_DIM`.
    pub head_dim: usize,
    /// Bottom-right causal mask.
    pub causal: bool,
    /// Score scale, usually `1/sqrt(head_dim)`; finite.
    pub scale: f32,
}

/// A grid's x extent (up to 2^31 - 1 blocks).
fn grid_x(field: &'static str, v: usize) -> Result<u32> {
    u32::try_from(v)
        .ok()
        .filter(|&x| x <= i32::MAX as u32)
        .ok_or_else(|| CudaError::invalid(field, format!("{v} blocks exceed the grid's x limit")))
}

/// A grid's y or z extent (up to 65535 blocks).
fn grid_yz(field: &'static str, v: usize) -> Result<u32> {
    u32::try_from(v)
        .ok()
        .filter(|&x| x <= 65_535)
        .ok_or_else(|| CudaError::invalid(field, format!("{v} exceeds the grid's limit of 65535")))
}

fn check_heads(n_heads: usize, n_kv_heads: usize) -> Result<()> {
    if n_kv_heads == 0 {
        return Err(CudaError::invalid("n_kv_heads", "must be at least 1"));
    }
    if n_heads == 0 || !n_heads.is_multiple_of(n_kv_heads) {
        return Err(CudaError::invalid(
            "n_heads",
            format!("{n_heads} is not a positive multiple of n_kv_heads = {n_kv_heads}"),
        ));
    }
    Ok(())
}

fn check_scale(scale: f32) -> Result<()> {
    if scale.is_finite() {
        Ok(())
    } else {
        Err(CudaError::invalid(
            "scale",
            format!("{scale} is not finite"),
        ))
    }
}

/// Checks that `v` fits an `i32` kernel argument.
fn fits_i32(field: &'static str, v: usize) -> Result<()> {
    if v <= i32::MAX as usize {
        Ok(())
    } else {
        Err(CudaError::invalid(field, format!("{v} exceeds i32::MAX")))
    }
}

impl PrefillParams {
    /// Checks the parameters and returns the kernel variant and its launch geometry.
    ///
    /// # Errors
    /// [`CudaError::InvalidArgument`] naming the field: zero `batch`/`seq_q`, `n_heads` not a
    /// multiple of `n_kv_heads`, `head_dim` out of range, non-finite `scale`, or sizes beyond
    /// the launch limits.
    pub fn geometry(&self) -> Result<(HeadDimClass, LaunchGeometry)> {
        if self.batch == 0 {
            return Err(CudaError::invalid("batch", "must be at least 1"));
        }
        if self.seq_q == 0 {
            return Err(CudaError::invalid("seq_q", "must be at least 1"));
        }
        check_heads(self.n_heads, self.n_kv_heads)?;
        check_scale(self.scale)?;
        fits_i32("seq_k", self.seq_k)?;
        let class = HeadDimClass::for_head_dim(self.head_dim)?;
        let rows = WARPS as usize * class.prefill_rows_per_warp();
        let geometry = LaunchGeometry {
            grid: (
                grid_x("seq_q", self.seq_q.div_ceil(rows))?,
                grid_yz("n_heads", self.n_heads)?,
                grid_yz("batch", self.batch)?,
            ),
            block: (WARPS * 32, 1, 1),
            smem_bytes: attn_smem_bytes(self.head_dim, rows) as u32,
        };
        Ok((class, geometry))
    }

    /// The tensor-core variant's launch, when `path` and `cc` allow it for this head dim (64
    /// or 128); `None` means the SIMT kernel runs. Call after [`PrefillParams::geometry`]
    /// accepted the parameters.
    pub fn tc_geometry(&self, path: PrefillPath, cc: u32) -> Option<LaunchGeometry> {
        let eligible = path == PrefillPath::Auto
            && cc >= TC_MIN_CC
            && matches!(self.head_dim, 64 | 128)
            && self.seq_q.div_ceil(TC_ROWS) <= i32::MAX as usize;
        eligible.then(|| LaunchGeometry {
            grid: (
                self.seq_q.div_ceil(TC_ROWS) as u32,
                self.n_heads as u32,
                self.batch as u32,
            ),
            block: (WARPS * 32, 1, 1),
            smem_bytes: tc_smem_bytes(self.head_dim) as u32,
        })
    }

    /// Floating-point operations of the call (two matmuls of `2·d` flops per visible
    /// query-key pair), the usual basis of attention TFLOP/s.
    pub fn flops(&self) -> f64 {
        let pairs: f64 = if self.causal {
            (0..self.seq_q)
                .map(|i| {
                    (i + self.seq_k + 1)
                        .saturating_sub(self.seq_q)
                        .min(self.seq_k) as f64
                })
                .sum()
        } else {
            (self.seq_q * self.seq_k) as f64
        };
        4.0 * pairs * (self.batch * self.n_heads * self.head_dim) as f64
    }
}

/// How the keys of a decode call are split across blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SplitPlan {
    /// Number of key ranges (at least 1).
    pub n_splits: usize,
    /// Keys per range, a multiple of [`TILE_KEYS`]; the last range may be shorter.
    pub keys_per_split: usize,
}

impl SplitPlan {
    /// Splits `len` keys so that `base_blocks` blocks per split fill about
    /// `DECODE_BLOCKS_PER_SM · n_sms` blocks, without making a split shorter than
    /// [`MIN_KEYS_PER_SPLIT`] (unless there is only one). Every key falls in exactly one split,
    /// and no split is empty unless `len == 0` (then one empty split).
    pub fn new(len: usize, base_blocks: usize, n_sms: usize) -> Self {
        if len == 0 {
            return Self {
                n_splits: 1,
                keys_per_split: TILE_KEYS,
            };
        }
        let target = (DECODE_BLOCKS_PER_SM * n_sms.max(1)).div_ceil(base_blocks.max(1));
        let by_len = len.div_ceil(MIN_KEYS_PER_SPLIT);
        let wanted = target.clamp(1, by_len.max(1));
        // Rounding the split length down (to whole tiles) errs towards more splits than wanted,
        // so the device is filled; the minimum keeps each split worth its merge.
        let keys_per_split = if wanted == 1 {
            len.next_multiple_of(TILE_KEYS)
        } else {
            (len / wanted / TILE_KEYS * TILE_KEYS).max(MIN_KEYS_PER_SPLIT)
        };
        Self {
            n_splits: len.div_ceil(keys_per_split),
            keys_per_split,
        }
    }

    /// The key range of split `s`.
    pub fn range(&self, s: usize, len: usize) -> std::ops::Range<usize> {
        let start = (s * self.keys_per_split).min(len);
        start..((s + 1) * self.keys_per_split).min(len)
    }
}

/// Parameters of one paged decode attention call (see [`crate::kernels::decode`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DecodeParams {
    /// Query tokens (1 for plain decode, a few for speculative or chunked steps).
    pub seq_q: usize,
    /// Query heads; a multiple of `n_kv_heads`.
    pub n_heads: usize,
    /// Key/value heads.
    pub n_kv_heads: usize,
    /// Values per head, `1..=MAX_HEAD_DIM`.
    pub head_dim: usize,
    /// Visible keys.
    pub len: usize,
    /// Tokens per KV block.
    pub block_size: usize,
    /// Blocks in the K and V pools.
    pub num_blocks: usize,
    /// Bottom-right causal mask among the query tokens.
    pub causal: bool,
    /// Score scale; finite.
    pub scale: f32,
}

/// A decode launch: the variant, the key split, and the geometries of both kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodePlan {
    /// Head-dim variant.
    pub class: HeadDimClass,
    /// Key split.
    pub split: SplitPlan,
    /// The split attention kernel's launch.
    pub attend: LaunchGeometry,
    /// The combine kernel's launch.
    pub combine: LaunchGeometry,
}

impl DecodeParams {
    /// Checks the parameters (not the block table's contents: see [`validate_block_table`])
    /// and plans the launch for a device with `n_sms` multiprocessors.
    ///
    /// # Errors
    /// [`CudaError::InvalidArgument`] naming the field: zero `seq_q` or `block_size`, head
    /// counts, `head_dim`, `scale`, or sizes beyond the launch limits.
    pub fn plan(&self, n_sms: usize) -> Result<DecodePlan> {
        if self.seq_q == 0 {
            return Err(CudaError::invalid("seq_q", "must be at least 1"));
        }
        if self.block_size == 0 {
            return Err(CudaError::invalid("block_size", "must be at least 1"));
        }
        check_heads(self.n_heads, self.n_kv_heads)?;
        check_scale(self.scale)?;
        fits_i32("len", self.len)?;
        fits_i32("block_size", self.block_size)?;
        let class = HeadDimClass::for_head_dim(self.head_dim)?;
        let rows_per_block = WARPS as usize * class.decode_rows_per_warp();
        let group = self.n_heads / self.n_kv_heads;
        let row_chunks = (self.seq_q * group).div_ceil(rows_per_block);
        let split = SplitPlan::new(self.len, self.n_kv_heads * row_chunks, n_sms);
        let attend = LaunchGeometry {
            grid: (
                grid_x("len", split.n_splits)?,
                grid_yz("n_kv_heads", self.n_kv_heads)?,
                grid_yz("seq_q", row_chunks)?,
            ),
            block: (WARPS * 32, 1, 1),
            smem_bytes: attn_smem_bytes(self.head_dim, rows_per_block) as u32,
        };
        Ok(DecodePlan {
            class,
            split,
            attend,
            combine: warp_per_row_geometry(self.seq_q * self.n_heads)?,
        })
    }
}

/// One warp per row, four warps per block (combine and merge kernels).
///
/// # Errors
/// [`CudaError::InvalidArgument`] (`rows`) past the grid limit.
pub fn warp_per_row_geometry(rows: usize) -> Result<LaunchGeometry> {
    fits_i32("rows", rows)?;
    Ok(LaunchGeometry {
        grid: (grid_x("rows", rows.div_ceil(4).max(1))?, 1, 1),
        block: (128, 1, 1),
        smem_bytes: 0,
    })
}

/// Grid-stride launch over `n` elements.
pub fn elementwise_geometry(n: usize) -> LaunchGeometry {
    let blocks = n
        .div_ceil(ELEMENTWISE_THREADS as usize)
        .clamp(1, MAX_ELEMENTWISE_BLOCKS);
    LaunchGeometry {
        grid: (blocks as u32, 1, 1),
        block: (ELEMENTWISE_THREADS, 1, 1),
        smem_bytes: 0,
    }
}

/// Checks that a block table covers `len` tokens of `block_size` and only names blocks of a
/// pool of `num_blocks`.
///
/// # Errors
/// [`CudaError::InvalidArgument`] (`block_table`) when it is too short or an entry is past the
/// pool, (`block_size`) when it is 0.
pub fn validate_block_table(
    table: &[u32],
    block_size: usize,
    len: usize,
    num_blocks: usize,
) -> Result<()> {
    if block_size == 0 {
        return Err(CudaError::invalid("block_size", "must be at least 1"));
    }
    let needed = len.div_ceil(block_size);
    if table.len() < needed {
        return Err(CudaError::invalid(
            "block_table",
            format!(
                "{} entries, but {len} tokens of block size {block_size} need {needed}",
                table.len()
            ),
        ));
    }
    if let Some((i, &b)) = table[..needed]
        .iter()
        .enumerate()
        .find(|&(_, &b)| b as usize >= num_blocks)
    {
        return Err(CudaError::invalid(
            "block_table",
            format!("entry {i} names block {b}, past the pool of {num_blocks} blocks"),
        ));
    }
    Ok(())
}

/// The checks every RMSNorm (both launchers, and `stage::HostOps`) makes of buffers of
/// `(x, w, out)` elements: `dim` divides `x`, `w` holds `dim`, `out` holds as many as `x`,
/// `eps` is finite and non-negative. Returns `(rows, dim)` as kernel arguments, or `None` when
/// there is no row.
pub(crate) fn norm_rows(
    (x, w, out): (usize, usize, usize),
    dim: usize,
    eps: f32,
) -> Result<Option<(i32, i32)>> {
    if dim == 0 || !x.is_multiple_of(dim) {
        return Err(CudaError::invalid(
            "dim",
            format!("{dim} does not divide x's {x} elements"),
        ));
    }
    if w != dim {
        return Err(CudaError::invalid("w", format!("must be {dim} values")));
    }
    if out != x {
        return Err(CudaError::invalid(
            "out",
            format!("has {out} elements, x has {x}"),
        ));
    }
    if !(eps.is_finite() && eps >= 0.0) {
        return Err(CudaError::invalid(
            "eps",
            format!("{eps} is not a finite non-negative value"),
        ));
    }
    if x == 0 {
        return Ok(None);
    }
    let arg = |field: &'static str, v: usize| {
        i32::try_from(v).map_err(|_| CudaError::invalid(field, format!("{v} exceeds i32::MAX")))
    };
    Ok(Some((arg("rows", x / dim)?, arg("dim", dim)?)))
}

#[cfg(test)]
mod tests;

/// Pair layout of rotary embeddings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeLayout {
    /// Adjacent pairs `(2p, 2p + 1)` (GGUF/llama.cpp "normal", Meta's Llama).
    Interleaved,
    /// Halves `(p, p + head_dim / 2)` (GPT-NeoX, Hugging Face Llama).
    Neox,
}
