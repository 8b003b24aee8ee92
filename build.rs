//! Compiles `proto/fleetevents/v1/*.proto` with `protox` (a pure-Rust protobuf compiler, so no
//! system `protoc` is needed) and generates the tonic client and server code. The encoded file
//! descriptor set is also written to `OUT_DIR` so the server can offer gRPC reflection.

use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/fleetevents/v1/fleetevents.proto"];
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["proto"])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    std::fs::write(
        out.join("fleetevents_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
