fn main() -> Result<(), Box<dyn std::error::Error>> {
    // A vendored protoc keeps the build free of system packages.
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded.
    unsafe { std::env::set_var("PROTOC", protoc) };
    tonic_prost_build::configure()
        // JSON for the CLI and the dashboard API.
        .type_attribute(".", "#[derive(serde::Serialize)]")
        // Written by hand (src/query_response.rs): a bus sends stored events
        // in the bytes it holds them in.
        .extern_path(".amoskys.v1.QueryResponse", "crate::QueryResponse")
        .compile_protos(&["amoskys/v1/events.proto", "amoskys/v1/bus.proto"], &["."])?;
    println!("cargo:rerun-if-changed=amoskys");
    Ok(())
}
