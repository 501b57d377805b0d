#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| amoskys_eventbus::fuzzing::rule_file(data));
