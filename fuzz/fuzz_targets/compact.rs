//! Compaction, junk erasing, online compaction and a reclaimer pass on an arbitrary byte string as an image; see
//! `compact` in the shared bodies.
#![no_main]

// The bodies live with the crate's tests so that `cargo test` replays every regression input through them.
#[path = "../../crates/qcow/tests/fuzz_bodies/mod.rs"]
mod bodies;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    bodies::compact(data);
});
