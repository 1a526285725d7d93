//! `moat images`: the built images `moat run` finds by name (see
//! [`crate::resolve::search_dirs`] and [`crate::resolve::is_moat_image`]).
use clap::Args;

#[derive(Args, Debug)]
pub struct ImagesArgs {}

pub fn main(_args: ImagesArgs) -> i32 {
    crate::bad_input("`moat images` is not yet implemented")
}
