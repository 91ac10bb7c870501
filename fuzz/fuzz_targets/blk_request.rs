//! Fuzz target `blk_request`: raw input to `splitvisor_blk::fuzzing::blk_request` (see there for the input layout).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| splitvisor_blk::fuzzing::blk_request(data));
