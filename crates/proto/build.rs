//! Compiles proto/tessera/v1 with a vendored protoc, so a fresh machine needs nothing but cargo.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let protos: Vec<PathBuf> = ["inference.proto", "worker.proto", "raft.proto"]
        .iter()
        .map(|f| root.join("tessera/v1").join(f))
        .collect();
    for p in &protos {
        println!("cargo:rerun-if-changed={}", p.display());
    }
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("tessera_descriptor.bin"))
        .compile_with_config(config, &protos, &[root])?;
    Ok(())
}
