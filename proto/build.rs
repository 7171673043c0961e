//! Generates the tonic/prost code from `proto/*.proto` with a vendored `protoc`,
//! so a fresh machine needs no system protoc.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    let files = [
        "proto/siterecovery/v1/types.proto",
        "proto/siterecovery/v1/registration.proto",
        "proto/siterecovery/v1/inventory.proto",
        "proto/siterecovery/v1/control.proto",
        "proto/siterecovery/v1/peer.proto",
        "proto/siterecovery/v1/protection.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("siterecovery_descriptor.bin"))
        .compile_with_config(config, &files, &["proto"])?;
    Ok(())
}
