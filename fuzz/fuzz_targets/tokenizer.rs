//! libFuzzer target `tokenizer`: see `tessera_fuzz::tokenizer`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tessera_fuzz::tokenizer(data));
