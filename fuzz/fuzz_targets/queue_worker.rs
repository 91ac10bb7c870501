//! Fuzz target `queue_worker`: raw input to `splitvisor_blk::fuzzing::queue_worker` (see there for the input layout).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| splitvisor_blk::fuzzing::queue_worker(data));
