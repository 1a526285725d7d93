//! `moat inspect`: check an image and report on it (`moat_host_linux::elf`).
use clap::Args;

#[derive(Args, Debug)]
pub struct InspectArgs {}

pub fn main(_args: InspectArgs) -> i32 {
    crate::bad_input("`moat inspect` is not yet implemented")
}
