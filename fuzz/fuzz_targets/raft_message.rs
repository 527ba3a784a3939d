//! libFuzzer target `raft_message`: see `tessera_fuzz::raft_message`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tessera_fuzz::raft_message(data));
