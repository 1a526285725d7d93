//! Checking an image file in the host before any loader sees it (the
//! loader checks it again; this refuses bad input early, with exit 2).
use moat_policy::Limits;
use std::fs::File;
use std::io::Read;
use std::sync::Mutex;

/// Check an image file in the host before any loader sees it.
pub(crate) fn check_image(image: &File, limits: &Limits) -> Result<(), String> {
    let meta = image.metadata().map_err(|e| format!("cannot read: {e}"))?;
    if !meta.is_file() {
        return Err("not a regular file".into());
    }
    if meta.len() > moat_host_common::elf::MAX_IMAGE_BYTES as u64 {
        return Err(moat_host_common::elf::ImageError::TooLarge(meta.len() as usize).to_string());
    }
    // Refuse before reading: a file larger than the picoprocess's memory
    // cannot be an image it can run.
    if meta.len() > limits.memory_mib << 20 {
        return Err(format!(
            "image is {} bytes; the memory limit is {} MiB",
            meta.len(),
            limits.memory_mib
        ));
    }
    // An image that passed unchanged (same file, size and change time)
    // under at least this memory limit passes again without re-reading.
    use std::os::unix::fs::MetadataExt;
    let key = (
        meta.dev(),
        meta.ino(),
        meta.len(),
        meta.ctime(),
        meta.ctime_nsec(),
    );
    if CHECKED
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&key)
        .is_some_and(|&m| m <= limits.memory_mib)
    {
        return Ok(());
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    image
        .take(moat_host_common::elf::MAX_IMAGE_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read: {e}"))?;
    moat_host_common::elf::parse(&bytes, limits.memory_mib << 20).map_err(|e| e.to_string())?;
    let mut c = CHECKED.lock().unwrap_or_else(|e| e.into_inner());
    if c.len() >= 1024 {
        c.clear();
    }
    c.insert(key, limits.memory_mib);
    Ok(())
}

/// Images that passed `check_image`: (device, inode, size, ctime) -> the
/// memory limit (MiB) they passed under. The loader checks every image
/// again anyway; this only spares the monitor re-reading a known file.
type ImageKey = (u64, u64, u64, i64, i64);
static CHECKED: std::sync::LazyLock<Mutex<std::collections::HashMap<ImageKey, u64>>> =
    std::sync::LazyLock::new(Default::default);
