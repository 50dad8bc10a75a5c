//! Compiles `proto/` with protox (pure Rust, so no system `protoc`) and writes the
//! descriptor set that gRPC server reflection serves. Without the `service` feature (the fuzz targets' build) there is no gRPC code to generate.

#[cfg(feature = "service")]
use std::path::PathBuf;

#[cfg(feature = "service")]
use prost::Message as _;

#[cfg(feature = "service")]
const PROTOS: &[&str] = &[
    "proto/builder/imgbuilder.proto",
    "proto/contentservice/initializer.proto",
    "proto/kiln/admin/v1/admin.proto",
];

#[cfg(not(feature = "service"))]
fn main() {}

#[cfg(feature = "service")]
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(PROTOS, ["proto"])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out_dir.join("kiln_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    // Gitpod's supervisor messages, for the log endpoint's grpc-web answers. Not in the
    // reflection set: the gRPC port does not serve them.
    let supervisor = protox::compile(["proto/supervisor/supervisor.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(false)
        .compile_fds(supervisor)?;
    Ok(())
}
