//! Launchers of the attention kernels: prefill, split-KV paged decode, and the ring merge.
//!
//! Each launcher validates lengths and dtypes against its parameters (typed errors naming the
//! field), plans the launch with [`crate::plan`], and enqueues on the device's compute stream
//! without waiting. Conventions are those of `tessera_kernels::attention` (see the crate docs).

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use crate::dtype::DType;
use crate::error::{CudaError, Result, check_len};
use crate::kernels::{DECODE, MERGE, PREFILL, PREFILL_TC};
use crate::plan::{
    DecodeParams, LaunchGeometry, PrefillParams, PrefillPath, validate_block_table,
    warp_per_row_geometry,
};

use super::device::{Device, Tensor16, drv};

const LOG2_E: f32 = std::f32::consts::LOG2_E;

fn cfg(g: LaunchGeometry) -> LaunchConfig {
    LaunchConfig {
        grid_dim: g.grid,
        block_dim: g.block,
        shared_mem_bytes: g.smem_bytes,
    }
}

/// Where an attention launch writes: `out` (the input dtype) and the f32 log-sum-exp per row.
#[derive(Debug)]
pub struct DevOut<'a> {
    /// The attention output, `(.., n_heads, head_dim)`.
    pub out: &'a mut Tensor16,
    /// The log-sum-exp per query row and head.
    pub lse: &'a mut CudaSlice<f32>,
}

/// A paged KV cache on the device: pools `(num_blocks, block_size, n_kv_heads, head_dim)` and
/// the sequence's block table (a host copy; [`decode_attention`] validates and uploads it).
#[derive(Clone, Copy, Debug)]
pub struct PagedKv<'a> {
    /// The key pool.
    pub k_pool: &'a Tensor16,
    /// The value pool.
    pub v_pool: &'a Tensor16,
    /// Token `t` lives in block `block_table[t / block_size]`.
    pub block_table: &'a [u32],
}

fn check_dtype(field: &'static str, got: DType, want: DType) -> Result<()> {
    if got == want {
        Ok(())
    } else {
        Err(CudaError::invalid(
            field,
            format!("is {got}, expected {want}"),
        ))
    }
}

fn as_i32(v: usize) -> i32 {
    // Callers have checked every size against i32::MAX in `plan`.
    v as i32
}

/// Prefill attention: `out`/`lse` for `q` over `k`/`v` (layouts in
/// [`crate::kernels::prefill`]), FlashAttention-2 style, on tensor cores where possible
/// ([`PrefillPath::Auto`]).
///
/// # Errors
/// [`CudaError::InvalidArgument`] for invalid parameters, buffer lengths or mixed dtypes;
/// [`CudaError::NoNvrtc`]/[`CudaError::Compile`]/[`CudaError::Driver`] from loading or
/// launching.
pub fn prefill_attention(
    dev: &Device,
    p: &PrefillParams,
    q: &Tensor16,
    k: &Tensor16,
    v: &Tensor16,
    o: DevOut<'_>,
) -> Result<()> {
    prefill_attention_with(dev, PrefillPath::Auto, p, q, k, v, o)
}

/// [`prefill_attention`] with the kernel path chosen by the caller.
///
/// # Errors
/// As [`prefill_attention`].
pub fn prefill_attention_with(
    dev: &Device,
    path: PrefillPath,
    p: &PrefillParams,
    q: &Tensor16,
    k: &Tensor16,
    v: &Tensor16,
    o: DevOut<'_>,
) -> Result<()> {
    let DevOut { out, lse } = o;
    let (class, simt_geometry) = p.geometry()?;
    let q_len = p.batch * p.seq_q * p.n_heads * p.head_dim;
    let kv_len = p.batch * p.seq_k * p.n_kv_heads * p.head_dim;
    check_len("q", q.len(), q_len)?;
    check_len("k", k.len(), kv_len)?;
    check_len("v", v.len(), kv_len)?;
    check_len("out", out.len(), q_len)?;
    check_len("lse", lse.len(), p.batch * p.seq_q * p.n_heads)?;
    for (field, t) in [("k", k.dtype), ("v", v.dtype), ("out", out.dtype)] {
        check_dtype(field, t, q.dtype)?;
    }
    let dt = q.dtype.suffix();
    let (f, geometry, with_hd) = match p.tc_geometry(path, dev.compute_capability()) {
        Some(g) => {
            let entry = format!("attn_prefill_tc_{dt}_d{}", p.head_dim);
            (dev.function(&PREFILL_TC, &entry)?, g, false)
        }
        None => {
            let entry = format!("attn_prefill_{dt}_{}", class.suffix());
            (dev.function(&PREFILL, &entry)?, simt_geometry, true)
        }
    };
    let (seq_q, seq_k) = (as_i32(p.seq_q), as_i32(p.seq_k));
    let (nh, nkv, hd) = (as_i32(p.n_heads), as_i32(p.n_kv_heads), as_i32(p.head_dim));
    let causal = i32::from(p.causal);
    let scale_log2 = p.scale * LOG2_E;
    let mut b = dev.stream().launch_builder(&f);
    b.arg(&q.data)
        .arg(&k.data)
        .arg(&v.data)
        .arg(&mut out.data)
        .arg(lse);
    b.arg(&seq_q).arg(&seq_k).arg(&nh).arg(&nkv);
    // The tensor-core kernels have the head dim baked in; the SIMT ones take it.
    if with_hd {
        b.arg(&hd);
    }
    b.arg(&causal).arg(&scale_log2);
    // SAFETY: every buffer's length was checked against the shape the kernel indexes, the
    // argument list matches the chosen kernel's signature, and the geometry comes from `plan`.
    unsafe { b.launch(cfg(geometry)) }.map_err(drv("prefill launch"))?;
    Ok(())
}

/// Reusable device scratch of [`decode_attention`]: the block table and the per-split partial
/// results. It grows to the largest call seen and is never shrunk, so steady-state decode
/// allocates nothing.
#[derive(Debug, Default)]
pub struct DecodeScratch {
    table: Option<CudaSlice<u32>>,
    part_o: Option<CudaSlice<f32>>,
    part_lse: Option<CudaSlice<f32>>,
}

/// The buffer in `slot`, (re)allocated when it is missing or shorter than `n`.
fn ensure<'s, T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
    dev: &Device,
    slot: &'s mut Option<CudaSlice<T>>,
    n: usize,
) -> Result<&'s mut CudaSlice<T>> {
    if slot.as_ref().is_none_or(|s| s.len() < n) {
        *slot = None;
    }
    match slot {
        Some(s) => Ok(s),
        None => Ok(slot.insert(dev.zeros_raw::<T>(n.max(1))?)),
    }
}

/// Decode attention of `q` `(seq_q, n_heads, head_dim)` over `len` keys held in paged pools
/// `(num_blocks, block_size, n_kv_heads, head_dim)` through `kv.block_table` (host copy; it is
/// validated and uploaded into `scratch`), split across the device (flash-decoding) and combined
/// by log-sum-exp into `out` (input dtype) and `lse` (f32).
///
/// # Errors
/// As [`prefill_attention`], plus [`CudaError::InvalidArgument`] (`block_table`) for a table
/// that does not cover `len` tokens or names a block past the pools.
pub fn decode_attention(
    dev: &Device,
    p: &DecodeParams,
    q: &Tensor16,
    kv: PagedKv<'_>,
    scratch: &mut DecodeScratch,
    o: DevOut<'_>,
) -> Result<()> {
    let PagedKv {
        k_pool,
        v_pool,
        block_table,
    } = kv;
    let DevOut { out, lse } = o;
    let plan = p.plan(dev.n_sms())?;
    let rows = p.seq_q * p.n_heads;
    let pool_len = p.num_blocks * p.block_size * p.n_kv_heads * p.head_dim;
    check_len("q", q.len(), rows * p.head_dim)?;
    check_len("k_pool", k_pool.len(), pool_len)?;
    check_len("v_pool", v_pool.len(), pool_len)?;
    check_len("out", out.len(), rows * p.head_dim)?;
    check_len("lse", lse.len(), rows)?;
    for (field, t) in [
        ("k_pool", k_pool.dtype),
        ("v_pool", v_pool.dtype),
        ("out", out.dtype),
    ] {
        check_dtype(field, t, q.dtype)?;
    }
    validate_block_table(block_table, p.block_size, p.len, p.num_blocks)?;
    let n_splits = plan.split.n_splits;
    let table = ensure(dev, &mut scratch.table, block_table.len())?;
    let part_o = ensure(dev, &mut scratch.part_o, n_splits * rows * p.head_dim)?;
    let part_lse = ensure(dev, &mut scratch.part_lse, n_splits * rows)?;
    if !block_table.is_empty() {
        let mut view = table.slice_mut(..block_table.len());
        dev.stream()
            .memcpy_htod(block_table, &mut view)
            .map_err(drv("block table upload"))?;
    }

    let dt = q.dtype.suffix();
    let f = dev.function(
        &DECODE,
        &format!("attn_decode_{dt}_{}", plan.class.suffix()),
    )?;
    let (bs, len) = (as_i32(p.block_size), as_i32(p.len));
    let (seq_q, nh, nkv, hd) = (
        as_i32(p.seq_q),
        as_i32(p.n_heads),
        as_i32(p.n_kv_heads),
        as_i32(p.head_dim),
    );
    let causal = i32::from(p.causal);
    let scale_log2 = p.scale * LOG2_E;
    let kps = as_i32(plan.split.keys_per_split);
    let mut b = dev.stream().launch_builder(&f);
    b.arg(&q.data)
        .arg(&k_pool.data)
        .arg(&v_pool.data)
        .arg(&*table)
        .arg(&bs)
        .arg(&len);
    b.arg(&mut *part_o).arg(&mut *part_lse);
    b.arg(&seq_q)
        .arg(&nh)
        .arg(&nkv)
        .arg(&hd)
        .arg(&causal)
        .arg(&scale_log2)
        .arg(&kps);
    // SAFETY: lengths checked above; the block table was validated against the pools, so every
    // key row the kernel reads lies inside them; scratch holds n_splits partials.
    unsafe { b.launch(cfg(plan.attend)) }.map_err(drv("decode launch"))?;

    let f = dev.function(&DECODE, &format!("attn_combine_{dt}"))?;
    let (rows_i, splits_i) = (as_i32(rows), as_i32(n_splits));
    let mut b = dev.stream().launch_builder(&f);
    b.arg(&*part_o).arg(&*part_lse).arg(&mut out.data).arg(lse);
    b.arg(&rows_i).arg(&splits_i).arg(&hd);
    // SAFETY: partials are (n_splits, rows, hd) and (n_splits, rows); out/lse checked above.
    unsafe { b.launch(cfg(plan.combine)) }.map_err(drv("combine launch"))?;
    Ok(())
}

/// Merges a partial attention result (`part_o` in its dtype, `part_lse` f32; e.g. one ring
/// step's output) into an f32 accumulator in place, rows of `head_dim`. Start the accumulator
/// at `(0, -inf)`; convert it at the end with [`cast_to`].
///
/// # Errors
/// [`CudaError::InvalidArgument`] for `head_dim == 0` or lengths that disagree on the rows.
pub fn merge_attention(
    dev: &Device,
    acc_o: &mut CudaSlice<f32>,
    acc_lse: &mut CudaSlice<f32>,
    part_o: &Tensor16,
    part_lse: &CudaSlice<f32>,
    head_dim: usize,
) -> Result<()> {
    if head_dim == 0 {
        return Err(CudaError::invalid("head_dim", "must be at least 1"));
    }
    let rows = acc_lse.len();
    check_len("acc_o", acc_o.len(), rows * head_dim)?;
    check_len("part_o", part_o.len(), rows * head_dim)?;
    check_len("part_lse", part_lse.len(), rows)?;
    if rows == 0 {
        return Ok(());
    }
    let geometry = warp_per_row_geometry(rows)?;
    let f = dev.function(&MERGE, &format!("attn_merge_{}", part_o.dtype.suffix()))?;
    let (rows_i, hd) = (as_i32(rows), as_i32(head_dim));
    let mut b = dev.stream().launch_builder(&f);
    b.arg(acc_o)
        .arg(acc_lse)
        .arg(&part_o.data)
        .arg(part_lse)
        .arg(&rows_i)
        .arg(&hd);
    // SAFETY: all four buffers hold `rows` rows (checked above).
    unsafe { b.launch(cfg(geometry)) }.map_err(drv("merge launch"))?;
    Ok(())
}

/// Converts f32 values into `out`'s dtype (round to nearest even).
///
/// # Errors
/// [`CudaError::InvalidArgument`] (`out`) when the lengths differ.
pub fn cast_to(dev: &Device, x: &CudaSlice<f32>, out: &mut Tensor16) -> Result<()> {
    check_len("out", out.len(), x.len())?;
    let f = dev.function(&MERGE, &format!("cast_f32_to_{}", out.dtype.suffix()))?;
    let n = x.len() as i64;
    let mut b = dev.stream().launch_builder(&f);
    b.arg(x).arg(&mut out.data).arg(&n);
    // SAFETY: both buffers hold n elements.
    unsafe { b.launch(cfg(crate::plan::elementwise_geometry(x.len()))) }
        .map_err(drv("cast launch"))?;
    Ok(())
}
