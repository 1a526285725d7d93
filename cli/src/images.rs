//! `moat images`: the built images `moat run` finds by name (see
//! [`crate::resolve::search_dirs`] and [`crate::resolve::is_moat_image`]).
//!
//! Only the ELF header, the section headers and the `.moat_abi` marker of
//! each file are read ([`moat_host_common::elf::read_abi_marker`]), so that
//! listing a build directory of large debug images stays fast.
use clap::Args;
use moat_host_common::elf;
use std::collections::BTreeMap;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct ImagesArgs {}

/// One image found: its path, ABI version and file size.
struct Found {
    path: PathBuf,
    abi: u32,
    size: u64,
}

pub fn main(_args: ImagesArgs) -> i32 {
    let mut found: BTreeMap<String, Found> = BTreeMap::new();
    let dirs = crate::resolve::search_dirs();
    for dir in &dirs {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        let mut names: Vec<_> = entries.flatten().collect();
        names.sort_by_key(|e| e.file_name());
        for e in names {
            let Some(name) = e.file_name().to_str().map(str::to_string) else {
                continue;
            };
            if found.contains_key(&name) {
                continue; // the first directory wins, as for `moat run NAME`
            }
            let path = e.path();
            // Follows symlinks, as `moat run` does.
            let Ok(meta) = std::fs::metadata(&path) else {
                continue;
            };
            if !meta.is_file() || meta.len() > elf::MAX_IMAGE_BYTES as u64 {
                continue;
            }
            let Ok(f) = std::fs::File::open(&path) else {
                continue;
            };
            if let Some(abi) = elf::read_abi_marker(&f) {
                found.insert(
                    name,
                    Found {
                        path,
                        abi,
                        size: meta.len(),
                    },
                );
            }
        }
    }
    let width = found.keys().map(String::len).max().unwrap_or(0);
    let mut out = String::new();
    for (name, f) in &found {
        out.push_str(&format!(
            "{name:width$}  {}  (abi {}.{}, {} KiB)\n",
            f.path.display(),
            f.abi >> 16,
            f.abi & 0xffff,
            f.size.div_ceil(1024),
        ));
    }
    print!("{out}");
    if found.is_empty() {
        let dirs: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
        eprintln!(
            "moat: no images in {}; build them with `cargo build`, or add their directory to MOAT_IMAGE_PATH",
            dirs.join(", ")
        );
    }
    0
}
