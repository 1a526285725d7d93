//! The one map from a Linux errno to the ABI's [`Error`], used by the PAL
//! (for calls it makes itself) and by the monitor's broker (for calls it
//! makes for the guest), so the same failure gives the guest the same
//! error whichever of them met it.
use moat_pal::Error;

/// errno -> ABI error. Escape attempts refused by `RESOLVE_BENEATH`
/// (`EXDEV`, `ELOOP`), writes to a read-only file system (`EROFS`) and
/// descriptors used for what they were not opened for (`EBADF`) are
/// permission errors; anything without an ABI counterpart is `Io`.
pub fn to_pal(e: i32) -> Error {
    match e {
        libc::ENOENT => Error::NotFound,
        libc::EEXIST => Error::AlreadyExists,
        libc::EACCES | libc::EPERM | libc::EBADF | libc::EXDEV | libc::ELOOP | libc::EROFS => {
            Error::PermissionDenied
        }
        libc::EISDIR => Error::IsDirectory,
        libc::ENOTDIR => Error::NotDirectory,
        libc::ENOTEMPTY => Error::DirectoryNotEmpty,
        libc::ECONNREFUSED => Error::ConnectionRefused,
        libc::EPIPE | libc::ECONNRESET => Error::BrokenPipe,
        libc::EAGAIN => Error::WouldBlock,
        libc::EFAULT => Error::BadAddress,
        libc::EMFILE | libc::ENFILE => Error::LimitExceeded,
        libc::ENAMETOOLONG | libc::EINVAL => Error::InvalidArgument,
        libc::ENOMEM => Error::NoMemory,
        _ => Error::Io,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_mapped_errno_gives_a_distinct_meaningful_error() {
        assert_eq!(to_pal(libc::ENOENT), Error::NotFound);
        assert_eq!(to_pal(libc::ELOOP), Error::PermissionDenied);
        assert_eq!(to_pal(libc::ENOTEMPTY), Error::DirectoryNotEmpty);
        assert_eq!(to_pal(libc::EAGAIN), Error::WouldBlock);
        assert_eq!(to_pal(libc::EPIPE), Error::BrokenPipe);
        assert_eq!(to_pal(libc::EIO), Error::Io);
    }
}
