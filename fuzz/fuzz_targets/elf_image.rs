//! `cargo fuzz run elf_image`: hands libFuzzer's input to
//! [`moat_fuzz_targets::elf_image::run`], where the target and its checks are
//! (a library, so that the test suite runs the same code over the corpus).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| moat_fuzz_targets::elf_image::run(data));
