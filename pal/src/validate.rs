//! Argument checks every host applies before acting on a call.
use crate::{limits, prot, Error, PalResult};

pub const PAGE: u64 = limits::PAGE_SIZE;

/// Protection bits: only READ|WRITE|EXEC, never WRITE together with EXEC.
pub fn check_prot(p: u32) -> PalResult<u32> {
    if p & !(prot::READ | prot::WRITE | prot::EXEC) != 0 {
        return Err(Error::InvalidArgument);
    }
    if p & prot::WRITE != 0 && p & prot::EXEC != 0 {
        return Err(Error::InvalidArgument);
    }
    Ok(p)
}

/// A page-aligned, non-empty, non-wrapping range below the 47-bit user limit.
pub fn check_page_range(addr: u64, size: u64) -> PalResult<()> {
    // PAGE is a power of two (a mask, not `is_multiple_of`: that needs Rust 1.87).
    if size == 0 || addr & (PAGE - 1) != 0 || size & (PAGE - 1) != 0 {
        return Err(Error::InvalidArgument);
    }
    let end = addr.checked_add(size).ok_or(Error::InvalidArgument)?;
    if end > USER_LIMIT {
        return Err(Error::InvalidArgument);
    }
    Ok(())
}

/// Highest user address (exclusive) on x86-64 with 4-level paging.
pub const USER_LIMIT: u64 = 0x0000_8000_0000_0000;

/// A byte count for I/O: at most `limits::MAX_IO_LEN`.
pub fn check_io_len(len: u64) -> PalResult<usize> {
    if len > limits::MAX_IO_LEN {
        return Err(Error::InvalidArgument);
    }
    Ok(len as usize)
}

/// A URI length: 1 to `limits::MAX_URI_LEN`.
pub fn check_uri_len(len: u64) -> PalResult<usize> {
    if len == 0 || len > limits::MAX_URI_LEN {
        return Err(Error::InvalidArgument);
    }
    Ok(len as usize)
}

/// Access bits for DkStreamOpen: at least READ or WRITE, no unknown bits.
pub fn check_access(a: u32) -> PalResult<u32> {
    use crate::access::*;
    if a & !(READ | WRITE | APPEND) != 0 || a & (READ | WRITE) == 0 {
        return Err(Error::InvalidArgument);
    }
    if a & APPEND != 0 && a & WRITE == 0 {
        return Err(Error::InvalidArgument);
    }
    Ok(a)
}

/// Creation disposition for DkStreamOpen.
pub fn check_create(c: u32) -> PalResult<u32> {
    if c > crate::create::OPEN_ALWAYS {
        return Err(Error::InvalidArgument);
    }
    Ok(c)
}

/// Open options for DkStreamOpen.
pub fn check_options(o: u32) -> PalResult<u32> {
    use crate::open_option::*;
    if o & !(DIRECTORY | NONBLOCK) != 0 {
        return Err(Error::InvalidArgument);
    }
    Ok(o)
}

/// Split NUL-terminated argument bytes into strings (each must be UTF-8).
pub fn split_args(bytes: &[u8]) -> PalResult<alloc::vec::Vec<alloc::string::String>> {
    if bytes.is_empty() {
        return Ok(alloc::vec::Vec::new());
    }
    if *bytes.last().unwrap() != 0 {
        return Err(Error::InvalidArgument);
    }
    bytes[..bytes.len() - 1]
        .split(|b| *b == 0)
        .map(|s| {
            core::str::from_utf8(s)
                .map(alloc::string::String::from)
                .map_err(|_| Error::InvalidArgument)
        })
        .collect()
}

/// Join strings as NUL-terminated argument bytes.
pub fn join_args<S: AsRef<str>>(args: &[S]) -> alloc::vec::Vec<u8> {
    let mut v = alloc::vec::Vec::new();
    for a in args {
        v.extend_from_slice(a.as_ref().as_bytes());
        v.push(0);
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn prot_rules() {
        assert!(check_prot(prot::READ | prot::WRITE).is_ok());
        assert!(check_prot(prot::READ | prot::EXEC).is_ok());
        assert_eq!(
            check_prot(prot::WRITE | prot::EXEC),
            Err(Error::InvalidArgument)
        );
        assert_eq!(check_prot(8), Err(Error::InvalidArgument));
    }
    #[test]
    fn ranges() {
        assert!(check_page_range(0x1000, 0x1000).is_ok());
        assert!(check_page_range(0x1001, 0x1000).is_err());
        assert!(check_page_range(0x1000, 0).is_err());
        assert!(check_page_range(u64::MAX - 0xfff, 0x1000).is_err());
        assert!(check_page_range(USER_LIMIT - 0x1000, 0x2000).is_err());
    }
    #[test]
    fn args_round_trip() {
        let b = join_args(&["a", "bc", ""]);
        assert_eq!(split_args(&b).unwrap(), ["a", "bc", ""]);
        assert!(split_args(b"abc").is_err());
        assert!(split_args(&[0xff, 0]).is_err());
    }
}
