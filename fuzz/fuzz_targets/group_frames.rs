//! libFuzzer target `group_frames`: see `tessera_fuzz::group_frames`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tessera_fuzz::group_frames(data));
