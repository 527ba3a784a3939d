//! [`CudaOps`]: the [`StageOps`] of a CUDA device — matmuls through cuBLAS (`cublasGemmEx`,
//! 16-bit inputs, f32 accumulation), everything else through our kernels' launchers
//! (`crate::runtime`). Every operation is enqueued on the device's one compute stream, in
//! order; only downloads wait.
//!
//! cuBLAS is column-major. A row-major `out (m, n) = x (m, k) · w (n, k)ᵀ` is, read
//! column-major, `outᶜ (n × m) = op(wᶜ) · xᶜ` with `wᶜ` the `(k × n)` column-major view of `w`
//! transposed (`CUBLAS_OP_T`, `lda = k`) and `xᶜ` the `(k × m)` view of `x` as it is
//! (`CUBLAS_OP_N`, `ldb = k`), `ldc = n`: no copy, no transpose kernel.

use std::sync::Mutex;

use cudarc::cublas::CudaBlas;
use cudarc::cublas::sys::{
    cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType_t,
};
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};

use super::ops::{MatmulDims, Rope, StageOps};
use crate::dtype::DType;
use crate::error::{CudaError, Result, check_range};
use crate::plan::{DecodeParams, PrefillParams};
use crate::runtime::attention::{
    DecodeScratch, DevOut, PagedKv, decode_attention, prefill_attention,
};
use crate::runtime::device::drv;
use crate::runtime::elementwise::{add_f32, bias, rmsnorm_f32in, rope, swiglu};
use crate::runtime::libs::probe_cublas;
use crate::runtime::{Device, Tensor16};

/// The stage operations of one CUDA device (see the module docs).
pub struct CudaOps {
    dev: Device,
    dtype: DType,
    blas: CudaBlas,
    /// The decode launcher's reusable scratch (block table and split partials).
    decode: Mutex<DecodeScratch>,
}

impl std::fmt::Debug for CudaOps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaOps")
            .field("dev", &self.dev)
            .field("dtype", &self.dtype)
            .finish_non_exhaustive()
    }
}

impl CudaOps {
    /// Opens device `ordinal` with a cuBLAS handle on its compute stream; 16-bit values are
    /// stored as `dtype`.
    ///
    /// # Errors
    /// [`CudaError::NoDriver`], [`CudaError::NoDevice`], [`CudaError::NoCublas`] for what is
    /// missing; [`CudaError::Driver`]/[`CudaError::Cublas`] when creation fails.
    pub fn new(ordinal: usize, dtype: DType) -> Result<Self> {
        let dev = Device::new(ordinal)?;
        probe_cublas()?;
        let blas = CudaBlas::new(dev.stream().clone()).map_err(|e| CudaError::Cublas {
            op: "cublasCreate",
            message: e.to_string(),
        })?;
        Ok(Self {
            dev,
            dtype,
            blas,
            decode: Mutex::new(DecodeScratch::default()),
        })
    }

    /// The device.
    pub fn device(&self) -> &Device {
        &self.dev
    }

    fn data_type(&self) -> cudaDataType_t {
        match self.dtype {
            DType::F16 => cudaDataType_t::CUDA_R_16F,
            DType::Bf16 => cudaDataType_t::CUDA_R_16BF,
        }
    }

    /// `cublasGemmEx` of `x (m, k) · w (n, k)ᵀ` into `out` of type `out_type` (see the module
    /// docs for the column-major reading).
    fn gemm(
        &self,
        x: &Tensor16,
        w: &Tensor16,
        (out, out_type): (u64, cudaDataType_t),
        d: MatmulDims,
    ) -> Result<()> {
        let dim = |field: &'static str, v: usize| {
            i32::try_from(v).map_err(|_| CudaError::invalid(field, format!("{v} exceeds i32")))
        };
        let (m, n, k) = (dim("m", d.m)?, dim("n", d.n)?, dim("k", d.k)?);
        if d.m == 0 || d.n == 0 {
            return Ok(());
        }
        let stream = self.dev.stream();
        let (wp, _w_guard) = w.data.device_ptr(stream);
        let (xp, _x_guard) = x.data.device_ptr(stream);
        let (alpha, beta) = (1.0f32, 0.0f32);
        let t = self.data_type();
        // SAFETY: the handle is bound to this device's stream; `w` holds n·k values and `x`
        // m·k (checked by the callers), the output pointer was taken from a buffer of m·n
        // values of `out_type`; alpha/beta are f32 as CUBLAS_COMPUTE_32F requires; the
        // guards keep the stream ordering of the inputs until the call is enqueued.
        unsafe {
            cudarc::cublas::result::gemm_ex(
                *self.blas.handle(),
                cublasOperation_t::CUBLAS_OP_T,
                cublasOperation_t::CUBLAS_OP_N,
                n,
                m,
                k,
                (&alpha as *const f32).cast(),
                wp as *const _,
                t,
                k,
                xp as *const _,
                t,
                k,
                (&beta as *const f32).cast(),
                out as *mut _,
                out_type,
                n,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| CudaError::Cublas {
            op: "cublasGemmEx",
            message: e.to_string(),
        })
    }
}

/// `dst[dst_at..][..n] = src[src_at..][..n]` on the device's stream.
fn copy<T: cudarc::driver::DeviceRepr>(
    dev: &Device,
    (src, src_at): (&CudaSlice<T>, usize),
    (dst, dst_at): (&mut CudaSlice<T>, usize),
    n: usize,
) -> Result<()> {
    let s = check_range("src", src_at, n, src.len())?;
    let d = check_range("dst", dst_at, n, dst.len())?;
    if n == 0 {
        return Ok(());
    }
    dev.stream()
        .memcpy_dtod(&src.slice(s), &mut dst.slice_mut(d))
        .map_err(drv("copy"))
}

impl StageOps for CudaOps {
    type Half = Tensor16;
    type Float = CudaSlice<f32>;
    type Positions = CudaSlice<i32>;

    fn dtype(&self) -> DType {
        self.dtype
    }

    fn half_len(&self, b: &Tensor16) -> usize {
        b.len()
    }

    fn upload_half(&self, xs: &[f32]) -> Result<Tensor16> {
        self.dev.upload(self.dtype, xs)
    }

    fn zeros_half(&self, n: usize) -> Result<Tensor16> {
        self.dev.zeros(self.dtype, n)
    }

    fn upload_float(&self, xs: &[f32]) -> Result<CudaSlice<f32>> {
        self.dev.upload_raw(xs)
    }

    fn zeros_float(&self, n: usize) -> Result<CudaSlice<f32>> {
        self.dev.zeros_raw(n)
    }

    fn download_float(&self, b: &CudaSlice<f32>, out: &mut Vec<f32>) -> Result<()> {
        *out = self.dev.download_raw(b)?;
        Ok(())
    }

    fn copy_half(
        &self,
        src: &Tensor16,
        src_at: usize,
        dst: &mut Tensor16,
        dst_at: usize,
        n: usize,
    ) -> Result<()> {
        copy(&self.dev, (&src.data, src_at), (&mut dst.data, dst_at), n)
    }

    fn copy_float(
        &self,
        src: &CudaSlice<f32>,
        src_at: usize,
        dst: &mut CudaSlice<f32>,
        dst_at: usize,
        n: usize,
    ) -> Result<()> {
        copy(&self.dev, (src, src_at), (dst, dst_at), n)
    }

    fn matmul(&self, x: &Tensor16, w: &Tensor16, out: &mut Tensor16, d: MatmulDims) -> Result<()> {
        d.check(x.len(), w.len(), out.len())?;
        let stream = self.dev.stream().clone();
        let (op, _guard) = out.data.device_ptr_mut(&stream);
        self.gemm(x, w, (op, self.data_type()), d)
    }

    fn matmul_float(
        &self,
        x: &Tensor16,
        w: &Tensor16,
        out: &mut CudaSlice<f32>,
        d: MatmulDims,
    ) -> Result<()> {
        d.check(x.len(), w.len(), out.len())?;
        let stream = self.dev.stream().clone();
        let (op, _guard) = out.device_ptr_mut(&stream);
        self.gemm(x, w, (op, cudaDataType_t::CUDA_R_32F), d)
    }

    fn rmsnorm(
        &self,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        out: &mut Tensor16,
        eps: f32,
    ) -> Result<()> {
        rmsnorm_f32in(&self.dev, x, w, out, w.len(), eps)
    }

    fn bias(&self, x: &mut Tensor16, b: &Tensor16) -> Result<()> {
        bias(&self.dev, x, b)
    }

    fn upload_positions(&self, positions: &[i32]) -> Result<CudaSlice<i32>> {
        self.dev.upload_raw(positions)
    }

    fn rope(
        &self,
        x: &mut Tensor16,
        positions: &CudaSlice<i32>,
        n_heads: usize,
        head_dim: usize,
        r: Rope,
    ) -> Result<()> {
        rope(
            &self.dev, x, positions, n_heads, head_dim, r.theta, r.layout,
        )
    }

    fn swiglu(&self, gate: &Tensor16, up: &Tensor16, out: &mut Tensor16) -> Result<()> {
        swiglu(&self.dev, gate, up, out)
    }

    fn add(&self, x: &mut CudaSlice<f32>, y: &Tensor16) -> Result<()> {
        add_f32(&self.dev, x, y)
    }

    fn prefill(
        &self,
        p: &PrefillParams,
        q: &Tensor16,
        k: &Tensor16,
        v: &Tensor16,
        out: &mut Tensor16,
    ) -> Result<()> {
        let mut lse = self.dev.zeros_raw::<f32>(p.batch * p.seq_q * p.n_heads)?;
        prefill_attention(&self.dev, p, q, k, v, DevOut { out, lse: &mut lse })
    }

    fn paged(
        &self,
        p: &DecodeParams,
        q: &Tensor16,
        (k_pool, v_pool): (&Tensor16, &Tensor16),
        table: &[u32],
        out: &mut Tensor16,
    ) -> Result<()> {
        let mut lse = self.dev.zeros_raw::<f32>(p.seq_q * p.n_heads)?;
        let mut scratch = self
            .decode
            .lock()
            .map_err(|_| CudaError::invalid("decode", "a previous launch panicked"))?;
        let kv = PagedKv {
            k_pool,
            v_pool,
            block_table: table,
        };
        decode_attention(
            &self.dev,
            p,
            q,
            kv,
            &mut scratch,
            DevOut { out, lse: &mut lse },
        )
    }
}
