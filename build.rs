//! Compiles `proto/onnx.proto` into Rust types with prost.
//!
//! protox parses the schema in pure Rust, so the build needs no `protoc`.
//! `raw_data` is decoded as `bytes::Bytes`: decoding a memory-mapped file then
//! slices tensor payloads out of the mapping instead of copying them.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/onnx.proto");
    let descriptors = protox::compile(["onnx.proto"], ["proto"])?;
    prost_build::Config::new()
        .bytes([".onnx.TensorProto.raw_data"])
        .compile_fds(descriptors)?;
    Ok(())
}
