//! Fuzz target `parse_plan`: see `fuzz/bodies.rs` for what it runs and checks.
#![no_main]

#[path = "../alloc_cap.rs"]
mod alloc_cap;
#[path = "../bodies.rs"]
mod bodies;

libfuzzer_sys::fuzz_target!(|data: &[u8]| bodies::parse_plan(data));
