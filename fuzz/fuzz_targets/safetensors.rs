//! libFuzzer target `safetensors`: see `tessera_fuzz::safetensors`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tessera_fuzz::safetensors(data));
