//! What a machine without a GPU can check of the runtime: opening a device fails with a typed
//! error naming what is missing instead of panicking.
#![cfg(feature = "cuda")]

use tessera_cuda::CudaError;
use tessera_cuda::runtime::Device;
use tessera_cuda::runtime::libs::probe_driver;

/// Ensures that `Device::new` returns `NoDriver` exactly when libcuda cannot be loaded, and an
/// out-of-range ordinal is `NoDevice`, never a panic.
#[test]
fn missing_driver_or_device_is_a_typed_error() {
    let driver = probe_driver();
    match Device::new(0) {
        Ok(dev) => {
            eprintln!("device 0: {dev:?}");
            let count = Device::count().expect("count");
            match Device::new(count) {
                Err(CudaError::NoDevice { ordinal, count: c }) => {
                    assert_eq!((ordinal, c), (count, count))
                }
                other => panic!("expected NoDevice, got {other:?}"),
            }
        }
        Err(CudaError::NoDriver) => assert!(driver.is_err(), "driver present but NoDriver"),
        Err(e @ (CudaError::NoDevice { .. } | CudaError::Driver { .. })) => {
            assert!(driver.is_ok(), "NoDriver expected without libcuda, got {e}");
            eprintln!("no usable device: {e}");
        }
        Err(e) => panic!("unexpected error kind: {e}"),
    }
}
