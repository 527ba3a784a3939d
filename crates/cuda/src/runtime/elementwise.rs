//! Launchers of the elementwise Llama kernels: RMSNorm, RoPE, SwiGLU, embedding gather,
//! residual add (contracts in [`crate::kernels::elementwise`]).
//!
//! Each validates shapes and dtypes into typed errors naming the field and enqueues on the
//! device's compute stream.

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use crate::error::{CudaError, Result};
use crate::kernels::ELEMENTWISE;
use crate::plan::{LaunchGeometry, elementwise_geometry, norm_rows};

use super::device::{Device, Tensor16, drv};

fn cfg(g: LaunchGeometry) -> LaunchConfig {
    LaunchConfig {
        grid_dim: g.grid,
        block_dim: g.block,
        shared_mem_bytes: g.smem_bytes,
    }
}

fn same(field: &'static str, a: &Tensor16, b: &Tensor16) -> Result<()> {
    if a.len() != b.len() {
        return Err(CudaError::invalid(
            field,
            format!("has {} elements, expected {}", b.len(), a.len()),
        ));
    }
    if a.dtype != b.dtype {
        return Err(CudaError::invalid(
            field,
            format!("is {}, expected {}", b.dtype, a.dtype),
        ));
    }
    Ok(())
}

fn fits_i32(field: &'static str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| CudaError::invalid(field, format!("{v} exceeds i32::MAX")))
}

/// `out = x / sqrt(mean(x²) + eps) · w` per row of `dim`.
///
/// # Errors
/// [`CudaError::InvalidArgument`] for `dim == 0`, `x` not a whole number of rows, `w` not of
/// `dim` elements, `out` unlike `x`, mixed dtypes, or a negative/non-finite `eps`.
pub fn rmsnorm(
    dev: &Device,
    x: &Tensor16,
    w: &Tensor16,
    out: &mut Tensor16,
    dim: usize,
    eps: f32,
) -> Result<()> {
    if w.dtype != x.dtype {
        return Err(CudaError::invalid(
            "w",
            format!("must be {dim} {} values", x.dtype),
        ));
    }
    same("out", x, out)?;
    let Some((rows_i, dim_i)) = norm_rows((x.len(), w.len(), out.len()), dim, eps)? else {
        return Ok(());
    };
    let f = dev.function(&ELEMENTWISE, &format!("rmsnorm_{}", x.dtype.suffix()))?;
    let mut b = dev.stream().launch_builder(&f);
    b.arg(&x.data)
        .arg(&w.data)
        .arg(&mut out.data)
        .arg(&rows_i)
        .arg(&dim_i)
        .arg(&eps);
    // SAFETY: x/out hold rows·dim elements and w holds dim (checked above).
    unsafe { b.launch(cfg(norm_geometry(rows_i))) }.map_err(drv("rmsnorm launch"))?;
    Ok(())
}

/// One block of 256 threads per row.
fn norm_geometry(rows: i32) -> LaunchGeometry {
    LaunchGeometry {
        grid: (rows as u32, 1, 1),
        block: (256, 1, 1),
        smem_bytes: 0,
    }
}

pub use crate::plan::RopeLayout;

/// Rotates `x` `(seq, n_heads, head_dim)` in place at the global positions `pos` (one i32 per
/// token, on the device; `seq = pos.len()`).
///
/// # Errors
/// [`CudaError::InvalidArgument`] for an odd or zero `head_dim`, `x` not `(pos.len(),
/// n_heads, head_dim)`, or a non-positive `theta`.
pub fn rope(
    dev: &Device,
    x: &mut Tensor16,
    pos: &CudaSlice<i32>,
    n_heads: usize,
    head_dim: usize,
    theta: f32,
    layout: RopeLayout,
) -> Result<()> {
    if head_dim == 0 || !head_dim.is_multiple_of(2) {
        return Err(CudaError::invalid(
            "head_dim",
            format!("{head_dim} must be even and positive"),
        ));
    }
    let seq = pos.len();
    if x.len() != seq * n_heads * head_dim {
        return Err(CudaError::invalid(
            "x",
            format!(
                "has {} elements, ({seq}, {n_heads}, {head_dim}) needs {}",
                x.len(),
                seq * n_heads * head_dim
            ),
        ));
    }
    if !(theta.is_finite() && theta > 0.0) {
        return Err(CudaError::invalid(
            "theta",
            format!("{theta} must be finite and positive"),
        ));
    }
    if x.is_empty() {
        return Ok(());
    }
    let (seq_i, nh, hd) = (
        fits_i32("pos", seq)?,
        fits_i32("n_heads", n_heads)?,
        fits_i32("head_dim", head_dim)?,
    );
    let neox = i32::from(layout == RopeLayout::Neox);
    let f = dev.function(&ELEMENTWISE, &format!("rope_{}", x.dtype.suffix()))?;
    let g = elementwise_geometry(x.len() / 2);
    let mut b = dev.stream().launch_builder(&f);
    b.arg(&mut x.data)
        .arg(pos)
        .arg(&seq_i)
        .arg(&nh)
        .arg(&hd)
        .arg(&theta)
        .arg(&neox);
    // SAFETY: x holds seq·n_heads·head_dim elements and pos holds seq.
    unsafe { b.launch(cfg(g)) }.map_err(drv("rope launch"))?;
    Ok(())
}

/// `out = silu(gate) · up`.
///
/// # Errors
/// [`CudaError::InvalidArgument`] when `up` or `out` differ from `gate` in length or dtype.
pub fn swiglu(dev: &Device, gate: &Tensor16, up: &Tensor16, out: &mut Tensor16) -> Result<()> {
    same("up", gate, up)?;
    same("out", gate, out)?;
    if gate.is_empty() {
        return Ok(());
    }
    let n = gate.len() as i64;
    let f = dev.function(&ELEMENTWISE, &format!("swiglu_{}", gate.dtype.suffix()))?;
    let mut b = dev.stream().launch_builder(&f);
    b.arg(&gate.data).arg(&up.data).arg(&mut out.data).arg(&n);
    // SAFETY: all three hold n elements.
    unsafe { b.launch(cfg(elementwise_geometry(gate.len()))) }.map_err(drv("swiglu launch"))?;
    Ok(())
}

/// Gathers rows of `table` `(vocab, dim)` for `ids` into `out` `(ids.len(), dim)`. The ids are
/// checked on the host (the kernel cannot report an error) and uploaded.
///
/// # Errors
/// [`CudaError::InvalidArgument`] (`ids`) for an id past the vocabulary, (`dim`/`out`) for
/// shapes that disagree.
pub fn embed(
    dev: &Device,
    ids: &[u32],
    table: &Tensor16,
    dim: usize,
    out: &mut Tensor16,
) -> Result<()> {
    if dim == 0 || !table.len().is_multiple_of(dim) {
        return Err(CudaError::invalid(
            "dim",
            format!("{dim} does not divide the table's {} elements", table.len()),
        ));
    }
    let vocab = table.len() / dim;
    if let Some((i, &id)) = ids
        .iter()
        .enumerate()
        .find(|&(_, &id)| id as usize >= vocab)
    {
        return Err(CudaError::invalid(
            "ids",
            format!("ids[{i}] = {id} is past the vocabulary of {vocab}"),
        ));
    }
    if out.len() != ids.len() * dim || out.dtype != table.dtype {
        return Err(CudaError::invalid(
            "out",
            format!("must be ({}, {dim}) {} values", ids.len(), table.dtype),
        ));
    }
    if ids.is_empty() {
        return Ok(());
    }
    let dev_ids = dev.upload_raw(ids)?;
    let (n, dim_i) = (fits_i32("ids", ids.len())?, fits_i32("dim", dim)?);
    let f = dev.function(&ELEMENTWISE, &format!("embed_{}", table.dtype.suffix()))?;
    let g = elementwise_geometry(out.len());
    let mut b = dev.stream().launch_builder(&f);
    b.arg(&dev_ids)
        .arg(&table.data)
        .arg(&mut out.data)
        .arg(&n)
        .arg(&dim_i);
    // SAFETY: every id is below vocab (checked), out holds n·dim elements.
    unsafe { b.launch(cfg(g)) }.map_err(drv("embed launch"))?;
    Ok(())
}

/// `x += y` (the residual stream).
///
/// # Errors
/// [`CudaError::InvalidArgument`] (`y`) when `y` differs from `x` in length or dtype.
pub fn add(dev: &Device, x: &mut Tensor16, y: &Tensor16) -> Result<()> {
    same("y", x, y)?;
    if x.is_empty() {
        return Ok(());
    }
    let n = x.len() as i64;
    let f = dev.function(&ELEMENTWISE, &format!("add_{}", x.dtype.suffix()))?;
    let g = elementwise_geometry(x.len());
    let mut b = dev.stream().launch_builder(&f);
    b.arg(&mut x.data).arg(&y.data).arg(&n);
    // SAFETY: both hold n elements.
    unsafe { b.launch(cfg(g)) }.map_err(drv("add launch"))?;
    Ok(())
}

/// `out = x / sqrt(mean(x²) + eps) · w` per row of `dim`, from the f32 residual stream `x`
/// with f32 weights `w` into `out`'s dtype.
///
/// # Errors
/// [`CudaError::InvalidArgument`] for `dim == 0`, `x` not a whole number of rows, `w` not of
/// `dim` values, `out` not of `x`'s length, or a negative/non-finite `eps`.
pub fn rmsnorm_f32in(
    dev: &Device,
    x: &CudaSlice<f32>,
    w: &CudaSlice<f32>,
    out: &mut Tensor16,
    dim: usize,
    eps: f32,
) -> Result<()> {
    let Some((rows_i, dim_i)) = norm_rows((x.len(), w.len(), out.len()), dim, eps)? else {
        return Ok(());
    };
    let f = dev.function(
        &ELEMENTWISE,
        &format!("rmsnorm_f32in_{}", out.dtype.suffix()),
    )?;
    let g = norm_geometry(rows_i);
    let mut b = dev.stream().launch_builder(&f);
    b.arg(x)
        .arg(w)
        .arg(&mut out.data)
        .arg(&rows_i)
        .arg(&dim_i)
        .arg(&eps);
    // SAFETY: x/out hold rows·dim elements and w holds dim (checked above); one block per row.
    unsafe { b.launch(cfg(g)) }.map_err(drv("rmsnorm_f32in launch"))?;
    Ok(())
}

/// `x += y` with `x` the f32 residual stream and `y` a 16-bit sub-layer output.
///
/// # Errors
/// [`CudaError::InvalidArgument`] (`y`) when the lengths differ.
pub fn add_f32(dev: &Device, x: &mut CudaSlice<f32>, y: &Tensor16) -> Result<()> {
    if x.len() != y.len() {
        return Err(CudaError::invalid(
            "y",
            format!("has {} elements, x has {}", y.len(), x.len()),
        ));
    }
    if x.is_empty() {
        return Ok(());
    }
    let n = x.len() as i64;
    let f = dev.function(&ELEMENTWISE, &format!("add_f32_{}", y.dtype.suffix()))?;
    let g = elementwise_geometry(y.len());
    let mut b = dev.stream().launch_builder(&f);
    b.arg(x).arg(&y.data).arg(&n);
    // SAFETY: both hold n elements.
    unsafe { b.launch(cfg(g)) }.map_err(drv("add_f32 launch"))?;
    Ok(())
}

/// `x[r, :] += b` for every row of `x` (rows of `b.len()` values).
///
/// # Errors
/// [`CudaError::InvalidArgument`] (`b`) when `b` is empty, does not divide `x` or differs in
/// dtype.
pub fn bias(dev: &Device, x: &mut Tensor16, b: &Tensor16) -> Result<()> {
    if b.is_empty() || !x.len().is_multiple_of(b.len()) || b.dtype != x.dtype {
        return Err(CudaError::invalid(
            "b",
            format!(
                "{} {} values do not divide x's {} {} values",
                b.len(),
                b.dtype,
                x.len(),
                x.dtype
            ),
        ));
    }
    if x.is_empty() {
        return Ok(());
    }
    let (n, dim) = (x.len() as i64, fits_i32("b", b.len())?);
    let f = dev.function(&ELEMENTWISE, &format!("bias_{}", x.dtype.suffix()))?;
    let g = elementwise_geometry(x.len());
    let mut l = dev.stream().launch_builder(&f);
    l.arg(&mut x.data).arg(&b.data).arg(&n).arg(&dim);
    // SAFETY: x holds n elements, b holds dim, and dim divides n (checked above).
    unsafe { l.launch(cfg(g)) }.map_err(drv("bias launch"))?;
    Ok(())
}
