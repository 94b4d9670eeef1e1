//! Fuzz target `load_model`: see `fuzz/bodies.rs` for what it runs and
//! checks, and `fuzz/mutator.rs` for the structure-aware mutations.
#![no_main]

#[path = "../alloc_cap.rs"]
mod alloc_cap;
#[path = "../bodies.rs"]
mod bodies;
#[path = "../mutator.rs"]
mod mutator;

libfuzzer_sys::fuzz_target!(|data: &[u8]| bodies::load_model(data));

libfuzzer_sys::fuzz_mutator!(|data: &mut [u8], size: usize, max_size: usize, seed: u32| {
    mutator::mutate(data, size, max_size, seed)
});
