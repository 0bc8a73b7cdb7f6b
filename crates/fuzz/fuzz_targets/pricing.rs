#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ketchup_fuzz::pricing::run(data));
