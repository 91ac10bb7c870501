//! Fuzz target `net_rxtx`: raw input to `splitvisor_net::fuzzing::net_rxtx` (see there for the input layout).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| splitvisor_net::fuzzing::net_rxtx(data));
