//! Mapping a checked image into the picoprocess.
use super::pal::LinuxPal;
use super::sys;
use crate::elf::{self, Image};
use moat_pal::memory::RegionKind;
use moat_pal::{prot, Error, PalResult};
use std::os::fd::RawFd;

/// Read a whole image file from a descriptor (bounded).
pub fn read_all(fd: RawFd) -> PalResult<Vec<u8>> {
    let size = sys::fstat(fd)
        .map(|st| st.st_size.max(0) as usize)
        .unwrap_or(0);
    if size > elf::MAX_IMAGE_BYTES {
        return Err(Error::InvalidArgument);
    }
    let mut out = Vec::with_capacity(size);
    // One byte more than the size, so the end of the file shows as a short read.
    let mut chunk = vec![0u8; (size + 1).clamp(4096, 1 << 20)];
    loop {
        let off = out.len() as u64;
        match sys::pread(fd, chunk.as_mut_ptr() as u64, chunk.len(), off) {
            Ok(0) => return Ok(out),
            Ok(n) => {
                out.extend_from_slice(&chunk[..n]);
                if out.len() > elf::MAX_IMAGE_BYTES {
                    return Err(Error::InvalidArgument);
                }
            }
            Err(libc::EINTR) => continue,
            Err(_) => return Err(Error::Io),
        }
    }
}

/// Check and map an image: each segment becomes fresh memory filled from
/// the file, then gets its final protection (never writable and executable).
pub fn map(pal: &LinuxPal, bytes: &[u8]) -> Result<Image, String> {
    let limit = pal
        .mem_limit
        .saturating_sub(pal.regions.read().unwrap().total());
    let img = elf::parse(bytes, limit).map_err(|e| e.to_string())?;
    let mut regions = pal.regions.write().unwrap();
    if regions.overlaps(img.base, img.end) {
        return Err(format!(
            "image range {:#x}..{:#x} overlaps memory already in use",
            img.base, img.end
        ));
    }
    let mut mapped: Vec<(u64, u64)> = Vec::new();
    let undo = |mapped: &[(u64, u64)]| {
        for &(a, l) in mapped {
            let _ = sys::munmap(a, l);
        }
    };
    for s in &img.segments {
        let start = s.vaddr & !0xfff;
        let end = (s.vaddr + s.memsz + 0xfff) & !0xfff;
        let len = end - start;
        if let Err(e) = sys::mmap_anon(start, len, prot::READ | prot::WRITE) {
            undo(&mapped);
            return Err(format!(
                "cannot map image segment at {start:#x} (+{len:#x}): {}",
                std::io::Error::from_raw_os_error(e)
            ));
        }
        mapped.push((start, len));
        let src = &bytes[s.offset as usize..(s.offset + s.filesz) as usize];
        sys::copy_out(s.vaddr, src);
        if let Err(e) = sys::mprotect(start, len, s.prot) {
            undo(&mapped);
            return Err(format!(
                "cannot protect image segment: {}",
                std::io::Error::from_raw_os_error(e)
            ));
        }
    }
    for s in &img.segments {
        let start = s.vaddr & !0xfff;
        let end = (s.vaddr + s.memsz + 0xfff) & !0xfff;
        regions
            .insert(start, end - start, s.prot, RegionKind::Image)
            .map_err(|e| format!("image segments overlap: {e}"))?;
    }
    Ok(img)
}

/// DkStreamMapPeBinary: map another image from an open file.
pub fn load_from_fd(pal: &LinuxPal, fd: RawFd) -> PalResult<Image> {
    let bytes = read_all(fd)?;
    map(pal, &bytes).map_err(|m| {
        if m.contains("overlaps") || m.contains("cannot map") {
            Error::AlreadyExists
        } else if m.contains("memory limit") {
            Error::NoMemory
        } else {
            Error::InvalidArgument
        }
    })
}
