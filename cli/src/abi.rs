//! `moat abi`: the picoprocess ABI (from `moat-abi-spec`).
use clap::Args;

#[derive(Args, Debug)]
pub struct AbiArgs {}

pub fn main(_args: AbiArgs) -> i32 {
    crate::bad_input("`moat abi` is not yet implemented")
}
