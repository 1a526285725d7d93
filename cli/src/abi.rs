//! `moat abi`: the picoprocess ABI (from `moat-abi-spec`).
use clap::Args;

#[derive(Args, Debug)]
pub struct AbiArgs {
    /// Output format: md (reference doc), json (machine-readable spec) or
    /// c (C header).
    #[arg(long, value_name = "FORMAT", default_value = "md")]
    pub format: String,
}

pub fn main(args: AbiArgs) -> i32 {
    match moat_abi_spec::render(&args.format) {
        Some(text) => {
            print!("{text}");
            if !text.ends_with('\n') {
                println!();
            }
            0
        }
        None => crate::bad_input(format_args!(
            "unknown format `{}` (use md, json or c)",
            args.format
        )),
    }
}
