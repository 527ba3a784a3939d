//! libFuzzer target `openai`: see `tessera_fuzz::openai`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tessera_fuzz::openai(data));
