//! Mapping a checked image into the picoprocess: the loader's first image,
//! and every image `DkStreamMapPeBinary` maps later. Works on the guest's
//! region map (not on the PAL), so the PAL can use it without a cycle.
use crate::elf::{self, Image};
use crate::sys;
use moat_pal::memory::{RegionKind, RegionMap};
use moat_pal::{prot, Error, PalResult};
use std::os::fd::RawFd;
use std::sync::RwLock;

/// Why an image could not be mapped.
#[derive(Debug, thiserror::Error)]
pub enum MapError {
    /// The image failed its checks (or does not fit the memory limit).
    #[error("{0}")]
    Invalid(elf::ImageError),
    #[error("image range {base:#x}..{end:#x} overlaps memory already in use")]
    Overlaps { base: u64, end: u64 },
    #[error("cannot map image segment at {start:#x} (+{len:#x}): {err}")]
    Map {
        start: u64,
        len: u64,
        err: std::io::Error,
    },
    #[error("cannot protect image segment: {0}")]
    Protect(std::io::Error),
}

impl MapError {
    /// The ABI error a guest's `DkStreamMapPeBinary` gets for it.
    pub fn to_pal(&self) -> Error {
        match self {
            MapError::Overlaps { .. } | MapError::Map { .. } => Error::AlreadyExists,
            MapError::Invalid(elf::ImageError::TooBig(..)) => Error::NoMemory,
            MapError::Invalid(_) | MapError::Protect(_) => Error::InvalidArgument,
        }
    }
}

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
/// `mem_limit` bounds the guest's memory, what `regions` holds included.
pub fn map(regions: &RwLock<RegionMap>, mem_limit: u64, bytes: &[u8]) -> Result<Image, MapError> {
    let limit = mem_limit.saturating_sub(regions.read().unwrap().total());
    let img = elf::parse(bytes, limit).map_err(MapError::Invalid)?;
    let mut regions = regions.write().unwrap();
    if regions.overlaps(img.base, img.end) {
        return Err(MapError::Overlaps {
            base: img.base,
            end: img.end,
        });
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
            return Err(MapError::Map {
                start,
                len,
                err: std::io::Error::from_raw_os_error(e),
            });
        }
        mapped.push((start, len));
        let src = &bytes[s.offset as usize..(s.offset + s.filesz) as usize];
        sys::copy_out(s.vaddr, src);
        if let Err(e) = sys::mprotect(start, len, s.prot) {
            undo(&mapped);
            return Err(MapError::Protect(std::io::Error::from_raw_os_error(e)));
        }
    }
    for s in &img.segments {
        let start = s.vaddr & !0xfff;
        let end = (s.vaddr + s.memsz + 0xfff) & !0xfff;
        // The checks refuse overlapping segments; the map agrees.
        regions
            .insert(start, end - start, s.prot, RegionKind::Image)
            .map_err(|_| MapError::Overlaps { base: start, end })?;
    }
    Ok(img)
}

/// DkStreamMapPeBinary: map another image from an open file.
pub fn load_from_fd(regions: &RwLock<RegionMap>, mem_limit: u64, fd: RawFd) -> PalResult<Image> {
    let bytes = read_all(fd)?;
    map(regions, mem_limit, &bytes).map_err(|e| e.to_pal())
}
