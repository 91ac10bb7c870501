//! Fuzz target `vhost_user_messages`: raw input to `splitvisor_blk::fuzzing::vhost_user_messages` (see there for the input layout).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| splitvisor_blk::fuzzing::vhost_user_messages(data));
