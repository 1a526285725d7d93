//! Image names to paths.
//!
//! `moat run IMAGE`: a path containing `/`, or an existing file, is used as
//! it is; a bare name is looked up in the directories of
//! `$MOAT_IMAGE_PATH` (colon-separated), then in the directory of the
//! `moat` executable, and the first file `NAME` there that is a moat image
//! (it has a `.moat_abi` section) is taken.
use moat_host_common::elf;
use std::path::{Path, PathBuf};

/// Where bare image names are looked up, in order.
pub fn search_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(p) = std::env::var_os("MOAT_IMAGE_PATH") {
        dirs.extend(std::env::split_paths(&p).filter(|d| !d.as_os_str().is_empty()));
    }
    if let Some(d) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
    {
        dirs.push(d);
    }
    dirs
}

/// Whether `path` is a moat image: a valid ELF image with the `.moat_abi`
/// marker section.
pub fn is_moat_image(path: &Path) -> bool {
    let Ok(meta) = std::fs::metadata(path) else {
        return false;
    };
    if !meta.is_file() || meta.len() > elf::MAX_IMAGE_BYTES as u64 {
        return false;
    }
    match std::fs::read(path) {
        Ok(bytes) => elf::parse(&bytes, u64::MAX).is_ok_and(|i| i.abi_version.is_some()),
        Err(_) => false,
    }
}

/// Resolve `name` to an image path, or say why not.
pub fn resolve(name: &str) -> Result<PathBuf, String> {
    let p = Path::new(name);
    if name.contains('/') || p.is_file() {
        return Ok(p.to_path_buf());
    }
    if name.is_empty() {
        return Err("the image name is empty".into());
    }
    for d in search_dirs() {
        let cand = d.join(name);
        if is_moat_image(&cand) {
            return Ok(cand);
        }
    }
    Err(format!(
        "image `{name}` not found; `moat images` lists the built images; build them with `cargo build`"
    ))
}
