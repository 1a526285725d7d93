//! `cargo fuzz run checkpoint_file`: hands libFuzzer's input to
//! [`moat_fuzz_targets::checkpoint_file::run`], where the target and its
//! checks are (a library, so that the test suite runs the same code over
//! the corpus).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| moat_fuzz_targets::checkpoint_file::run(data));
