//! NCCL on the devices present (one GPU: world size 1): all-reduce sum and send/recv, checked
//! for values and timed. Ignored without a device (`scripts/gpu-check.sh` runs it); run, a
//! missing driver, device or NCCL fails naming it.
#![cfg(feature = "cuda")]

mod common;

use std::time::Instant;

use common::device;
use tessera_cuda::DType;
use tessera_cuda::runtime::libs::probe_nccl;
use tessera_cuda::runtime::nccl::{Communicator, UniqueId};

/// Ensures that a world-size-1 communicator bootstrapped through the id's bytes all-reduces
/// (sum over one rank is the identity) and sends/receives to itself, f32 and 16-bit, and prints
/// the bandwidth of both.
#[test]
#[ignore = "needs a CUDA device: scripts/gpu-check.sh runs it"]
fn nccl_world_of_one() {
    let dev = device();
    if let Err(e) = probe_nccl() {
        panic!("this test needs NCCL: {e}");
    }
    let id = UniqueId::new().expect("unique id");
    // The coordinator carries the id as bytes: go through them as it would.
    let id = UniqueId::from_bytes(&id.to_bytes()).expect("bytes");
    let comm = Communicator::new(&dev, id, 0, 1).expect("communicator");
    assert_eq!((comm.rank(), comm.world_size()), (0, 1));

    let n = 16 << 20; // 64 MiB of f32
    let host: Vec<f32> = (0..n).map(|i| (i % 1000) as f32 * 0.5).collect();
    let mut buf = dev.upload_raw(&host).expect("upload");
    comm.all_reduce_sum(&mut buf).expect("all-reduce");
    comm.synchronize().expect("sync");
    assert_eq!(dev.download_raw(&buf).expect("download"), host);
    let iters = 10;
    let t = Instant::now();
    for _ in 0..iters {
        comm.all_reduce_sum(&mut buf).expect("all-reduce");
    }
    comm.synchronize().expect("sync");
    let ar = t.elapsed().as_secs_f64() / iters as f64;

    let mut dst = dev.zeros_raw::<f32>(n).expect("dst");
    comm.group(|c| {
        c.send(&buf, 0)?;
        c.recv(&mut dst, 0)
    })
    .expect("send/recv");
    comm.synchronize().expect("sync");
    assert_eq!(dev.download_raw(&dst).expect("download"), host);
    let t = Instant::now();
    for _ in 0..iters {
        comm.group(|c| {
            c.send(&buf, 0)?;
            c.recv(&mut dst, 0)
        })
        .expect("send/recv");
    }
    comm.synchronize().expect("sync");
    let sr = t.elapsed().as_secs_f64() / iters as f64;

    let vals: Vec<f32> = (0..1000).map(|i| i as f32 * 0.25).collect();
    let src = dev.upload(DType::Bf16, &vals).expect("bf16");
    let mut back = dev.zeros(DType::Bf16, vals.len()).expect("bf16");
    comm.group(|c| {
        c.send_tensor(&src, 0)?;
        c.recv_tensor(&mut back, 0)
    })
    .expect("send/recv tensor");
    comm.synchronize().expect("sync");
    assert_eq!(dev.download(&back).expect("download"), vals);

    let bytes = (n * 4) as f64;
    println!(
        "BENCH kernel=nccl world_size=1 bytes={} all_reduce_us={:.1} all_reduce_gbps={:.1} send_recv_us={:.1} send_recv_gbps={:.1}",
        n * 4,
        ar * 1e6,
        bytes / ar / 1e9,
        sr * 1e6,
        bytes / sr / 1e9
    );
}
