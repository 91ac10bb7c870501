//! Fuzz target `http_request`: raw input to `splitvisor_vmm::fuzzing::http_request` (see there for the input layout).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| splitvisor_vmm::fuzzing::http_request(data));
