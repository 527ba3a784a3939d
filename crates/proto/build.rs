//! Compiles proto/ with a vendored protoc, so a fresh machine needs nothing but cargo.
//!
//! Two runs, one per package, each with its own descriptor set: `tessera.v1` (the public API,
//! `inference.proto` alone) and `tessera.cluster.v1` (the cluster protocol), whose references
//! to the public messages resolve to the `v1` module instead of generating them twice. Server
//! reflection on the public port registers the public set only, so it never lists a cluster
//! service.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let public = vec![root.join("tessera/v1/inference.proto")];
    let cluster: Vec<PathBuf> = ["worker.proto", "raft.proto", "forward.proto"]
        .iter()
        .map(|f| root.join("tessera/cluster/v1").join(f))
        .collect();
    for p in public.iter().chain(&cluster) {
        println!("cargo:rerun-if-changed={}", p.display());
    }
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let protoc = protoc_bin_vendored::protoc_bin_path()?;

    let mut config = prost_build::Config::new();
    config.protoc_executable(&protoc);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("tessera_public_descriptor.bin"))
        .compile_with_config(config, &public, std::slice::from_ref(&root))?;

    // Its own directory: generating it also writes a `tessera.v1.rs` (the imported file's
    // services, against the extern path), which must not replace the public one.
    let cluster_out = out.join("cluster");
    std::fs::create_dir_all(&cluster_out)?;
    let mut config = prost_build::Config::new();
    config.protoc_executable(&protoc);
    tonic_prost_build::configure()
        .out_dir(&cluster_out)
        .extern_path(".tessera.v1", "crate::v1")
        .file_descriptor_set_path(out.join("tessera_cluster_descriptor.bin"))
        .compile_with_config(config, &cluster, &[root])?;
    Ok(())
}
