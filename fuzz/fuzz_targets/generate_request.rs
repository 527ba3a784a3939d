//! libFuzzer target `generate_request`: see `tessera_fuzz::generate_request`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tessera_fuzz::generate_request(data));
