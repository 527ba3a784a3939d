//! libFuzzer target `stage`: see `tessera_fuzz::stage`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tessera_fuzz::stage(data));
