//! One CUDA device: its context, a compute stream, loaded kernel modules and 16-bit tensors.
//!
//! [`Device::new`] checks for the driver library and the device before creating a context, so
//! a machine without either gets [`CudaError::NoDriver`] / [`CudaError::NoDevice`]. Kernels are
//! loaded lazily: the first launch of a module compiles it (see [`super::compile`]) for the
//! device's architecture and loads it into the context; later launches reuse the handle.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, sys};

use crate::dtype::DType;
use crate::error::{CudaError, Result};
use crate::kernels::KernelModule;

use super::compile::compile_ptx;
use super::libs::probe_driver;

/// Turns a driver error into [`CudaError::Driver`] for the operation `op`.
pub(crate) fn drv(op: &'static str) -> impl FnOnce(cudarc::driver::DriverError) -> CudaError {
    move |e| CudaError::Driver {
        op,
        message: e.to_string(),
    }
}

/// A device tensor of 16-bit floats: raw words plus the dtype that says how to read them.
#[derive(Debug)]
pub struct Tensor16 {
    /// The words, row-major in whatever layout the operation documents.
    pub data: CudaSlice<u16>,
    /// How to interpret the words.
    pub dtype: DType,
}

impl Tensor16 {
    /// Number of elements.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// Whether the tensor has no element.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
}

/// A CUDA device with a compute stream and a cache of loaded kernel modules.
pub struct Device {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    cc: u32,
    n_sms: usize,
    name: String,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("ordinal", &self.ctx.ordinal())
            .field("name", &self.name)
            .field("cc", &self.cc)
            .field("n_sms", &self.n_sms)
            .finish()
    }
}

impl Device {
    /// Number of CUDA devices the driver reports.
    ///
    /// # Errors
    /// [`CudaError::NoDriver`] without `libcuda`; [`CudaError::Driver`] when the driver fails to
    /// initialise (e.g. a driver without a working kernel module).
    pub fn count() -> Result<usize> {
        probe_driver()?;
        let n = CudaContext::device_count().map_err(drv("cuDeviceGetCount"))?;
        Ok(n.max(0) as usize)
    }

    /// Opens device `ordinal` (its primary context) with a fresh compute stream.
    ///
    /// # Errors
    /// [`CudaError::NoDriver`], [`CudaError::NoDevice`] when the ordinal is not present,
    /// [`CudaError::Driver`] when context or stream creation fails.
    pub fn new(ordinal: usize) -> Result<Self> {
        let count = Self::count()?;
        if ordinal >= count {
            return Err(CudaError::NoDevice { ordinal, count });
        }
        let ctx = CudaContext::new(ordinal).map_err(drv("cuCtxCreate"))?;
        let (major, minor) = ctx
            .compute_capability()
            .map_err(drv("compute capability"))?;
        let n_sms = ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(drv("multiprocessor count"))?;
        let name = ctx.name().map_err(drv("device name"))?;
        let stream = ctx.new_stream().map_err(drv("cuStreamCreate"))?;
        Ok(Self {
            ctx,
            stream,
            cc: (major * 10 + minor) as u32,
            n_sms: n_sms.max(1) as usize,
            name,
            modules: Mutex::new(HashMap::new()),
        })
    }

    /// The device's total memory, bytes.
    ///
    /// # Errors
    /// [`CudaError::Driver`] when the driver cannot say.
    pub fn total_memory(&self) -> Result<u64> {
        let bytes = self.ctx.total_mem().map_err(drv("cuDeviceTotalMem"))?;
        Ok(bytes as u64)
    }

    /// Memory free on the device now, bytes.
    ///
    /// # Errors
    /// [`CudaError::Driver`] when the driver cannot say.
    pub fn free_memory(&self) -> Result<u64> {
        let (free, _total) = self.ctx.mem_get_info().map_err(drv("cuMemGetInfo"))?;
        Ok(free as u64)
    }

    /// Peak memory bandwidth, bytes per second: double data rate × memory clock × bus width,
    /// from the attributes the driver reports (H100 SXM: 2619 MHz × 5120 bits ≈ 3.35 TB/s).
    ///
    /// # Errors
    /// [`CudaError::Driver`] when the driver cannot say.
    pub fn peak_bandwidth(&self) -> Result<u64> {
        use sys::CUdevice_attribute as A;
        let clock_khz = self
            .ctx
            .attribute(A::CU_DEVICE_ATTRIBUTE_MEMORY_CLOCK_RATE)
            .map_err(drv("memory clock rate"))?;
        let bus_bits = self
            .ctx
            .attribute(A::CU_DEVICE_ATTRIBUTE_GLOBAL_MEMORY_BUS_WIDTH)
            .map_err(drv("memory bus width"))?;
        Ok(peak_bandwidth(
            clock_khz.max(0) as u64,
            bus_bits.max(0) as u64,
        ))
    }

    /// The device's name, e.g. `NVIDIA H200`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Compute capability as major·10 + minor (90 for Hopper).
    pub fn compute_capability(&self) -> u32 {
        self.cc
    }

    /// Streaming multiprocessors (the split-KV planner fills them).
    pub fn n_sms(&self) -> usize {
        self.n_sms
    }

    /// The CUDA context.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The compute stream every launcher of this crate enqueues on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Waits for all work queued on the compute stream.
    ///
    /// # Errors
    /// [`CudaError::Driver`] when a kernel failed or the device was lost.
    pub fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(drv("cuStreamSynchronize"))
    }

    /// The kernel `entry` of `module`, compiling and loading the module on first use.
    ///
    /// # Errors
    /// [`CudaError::NoNvrtc`] / [`CudaError::Compile`] from compilation, [`CudaError::Driver`]
    /// when loading fails or the entry does not exist.
    pub fn function(&self, module: &KernelModule, entry: &str) -> Result<CudaFunction> {
        let loaded = {
            let mut map = self.modules.lock().unwrap_or_else(|p| p.into_inner());
            match map.get(module.name) {
                Some(m) => m.clone(),
                None => {
                    let ptx = compile_ptx(module, self.cc)?;
                    let m = self
                        .ctx
                        .load_module(cudarc::nvrtc::Ptx::from_src(ptx.to_string()))
                        .map_err(drv("cuModuleLoadData"))?;
                    map.insert(module.name, m.clone());
                    m
                }
            }
        };
        loaded
            .load_function(entry)
            .map_err(drv("cuModuleGetFunction"))
    }

    /// Copies f32 values to the device as `dtype`.
    ///
    /// # Errors
    /// [`CudaError::Driver`] on allocation or copy failure.
    pub fn upload(&self, dtype: DType, xs: &[f32]) -> Result<Tensor16> {
        let words = dtype.encode(xs);
        let data = self.stream.clone_htod(&words).map_err(drv("upload"))?;
        Ok(Tensor16 { data, dtype })
    }

    /// A zeroed tensor of `n` elements.
    ///
    /// # Errors
    /// [`CudaError::Driver`] on allocation failure.
    pub fn zeros(&self, dtype: DType, n: usize) -> Result<Tensor16> {
        let data = self.stream.alloc_zeros::<u16>(n).map_err(drv("alloc"))?;
        Ok(Tensor16 { data, dtype })
    }

    /// Copies a tensor back as f32 (waits for the stream).
    ///
    /// # Errors
    /// [`CudaError::Driver`] on copy failure (including an earlier kernel's failure).
    pub fn download(&self, t: &Tensor16) -> Result<Vec<f32>> {
        let words = self.stream.clone_dtoh(&t.data).map_err(drv("download"))?;
        Ok(t.dtype.decode(&words))
    }

    /// Copies plain values (f32, u32, i32) to the device.
    ///
    /// # Errors
    /// [`CudaError::Driver`] on allocation or copy failure.
    pub fn upload_raw<T: cudarc::driver::DeviceRepr>(&self, xs: &[T]) -> Result<CudaSlice<T>> {
        self.stream.clone_htod(xs).map_err(drv("upload"))
    }

    /// A zeroed buffer of `n` plain values.
    ///
    /// # Errors
    /// [`CudaError::Driver`] on allocation failure.
    pub fn zeros_raw<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
        &self,
        n: usize,
    ) -> Result<CudaSlice<T>> {
        self.stream.alloc_zeros::<T>(n).map_err(drv("alloc"))
    }

    /// Copies plain values back (waits for the stream).
    ///
    /// # Errors
    /// [`CudaError::Driver`] on copy failure.
    pub fn download_raw<T: cudarc::driver::DeviceRepr>(&self, x: &CudaSlice<T>) -> Result<Vec<T>> {
        self.stream.clone_dtoh(x).map_err(drv("download"))
    }
}

/// Bytes per second a memory of `clock_khz` (the driver's memory clock attribute) on a bus of
/// `bus_bits` moves: two transfers per clock.
pub fn peak_bandwidth(clock_khz: u64, bus_bits: u64) -> u64 {
    2 * clock_khz * 1000 * (bus_bits / 8)
}
