#![no_main]

#[path = "../targets/gateway_config.rs"]
mod target;

libfuzzer_sys::fuzz_target!(|data: &[u8]| target::run(data));
