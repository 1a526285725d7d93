//! `file:` paths resolved where the kernel resolves them: beneath the
//! grant's directory with `openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)`,
//! so neither `..` nor a symlink leaves the grant.
use super::R;
use moat_host_common::errno::to_pal as map_errno;
use moat_pal::Error;
use moat_policy::Grant;
use std::os::fd::{AsFd, OwnedFd};

/// A `file:` path resolved to where the kernel resolves it.
pub(super) enum Target {
    /// `rel` (non-empty; `.` for the grant itself) beneath the grant's
    /// directory `base` (whose absolute path is `base_path`, opened with
    /// `base_resolve`).
    Beneath {
        base: OwnedFd,
        base_path: String,
        base_resolve: u64,
        rel: String,
    },
    /// The grant names a file (or something not there yet): only `name` in
    /// `parent`, no symlinks followed.
    Single { parent: OwnedFd, name: String },
}

fn split_last(p: &str) -> (&str, &str) {
    match p.rfind('/') {
        Some(i) => (&p[..i], &p[i + 1..]),
        None => ("", p),
    }
}

impl Target {
    pub(super) fn resolve(grant: &Grant, path: &str) -> R<Target> {
        let (base, rel) = grant.split_file(path).ok_or(Error::PermissionDenied)?;
        // A grant's real path had its symlinks resolved when it was made:
        // none may have appeared in it since. A grant of a path that did
        // not exist then: its directory as the host has it, and its own
        // name not a symlink.
        let base_resolve = if grant.real_path.is_some() {
            super::at::RESOLVE_NO_SYMLINKS | super::at::RESOLVE_NO_MAGICLINKS
        } else {
            super::at::RESOLVE_NO_MAGICLINKS
        };
        let dir_flags = libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC;
        let opened = if grant.real_path.is_some() || base == "/" {
            super::at::openat2_abs(base, dir_flags, base_resolve)
        } else {
            let (dir, name) = split_last(base);
            let dir = if dir.is_empty() { "/" } else { dir };
            super::at::openat2_abs(dir, dir_flags, base_resolve).and_then(|parent| {
                let no_links = super::at::RESOLVE_BENEATH
                    | super::at::RESOLVE_NO_SYMLINKS
                    | super::at::RESOLVE_NO_MAGICLINKS;
                super::at::openat2(parent.as_fd(), name, dir_flags, 0, no_links)
            })
        };
        match opened {
            Ok(fd) => Ok(Target::Beneath {
                base: fd,
                base_path: base.to_string(),
                base_resolve,
                rel: if rel.is_empty() {
                    ".".into()
                } else {
                    rel.to_string()
                },
            }),
            Err(libc::ENOTDIR | libc::ENOENT) if rel.is_empty() && base != "/" => {
                let (dir, name) = split_last(base);
                let dir = if dir.is_empty() { "/" } else { dir };
                let parent =
                    super::at::openat2_abs(dir, dir_flags, base_resolve).map_err(map_errno)?;
                Ok(Target::Single {
                    parent,
                    name: name.to_string(),
                })
            }
            Err(e) => Err(map_errno(e)),
        }
    }

    /// Open the target itself.
    pub(super) fn open(&self, flags: libc::c_int, mode: u32) -> R<OwnedFd> {
        let beneath = super::at::RESOLVE_BENEATH | super::at::RESOLVE_NO_MAGICLINKS;
        match self {
            Target::Beneath { base, rel, .. } => {
                super::at::openat2(base.as_fd(), rel, flags, mode, beneath)
            }
            Target::Single { parent, name } => super::at::openat2(
                parent.as_fd(),
                name,
                flags,
                mode,
                beneath | super::at::RESOLVE_NO_SYMLINKS,
            ),
        }
        .map_err(map_errno)
    }

    /// The directory the target's name lives in, the name (for mkdir,
    /// unlink, rename: they act on the name, not what it points to), and
    /// the resolve flags to open that name with afterwards.
    pub(super) fn parent(self) -> R<(OwnedFd, String, u64)> {
        let beneath = super::at::RESOLVE_BENEATH | super::at::RESOLVE_NO_MAGICLINKS;
        match self {
            // The name is all the grant covers: never follow it elsewhere.
            Target::Single { parent, name } => {
                Ok((parent, name, beneath | super::at::RESOLVE_NO_SYMLINKS))
            }
            Target::Beneath {
                base_path,
                base_resolve,
                rel,
                ..
            } if rel == "." => {
                // The grant's directory itself.
                if base_path == "/" {
                    return Err(Error::PermissionDenied);
                }
                let (dir, name) = split_last(&base_path);
                let dir = if dir.is_empty() { "/" } else { dir };
                let parent = super::at::openat2_abs(
                    dir,
                    libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
                    base_resolve,
                )
                .map_err(map_errno)?;
                Ok((
                    parent,
                    name.to_string(),
                    beneath | super::at::RESOLVE_NO_SYMLINKS,
                ))
            }
            Target::Beneath { base, rel, .. } => {
                let (dir, name) = split_last(&rel);
                let parent = if dir.is_empty() {
                    base
                } else {
                    super::at::openat2(
                        base.as_fd(),
                        dir,
                        libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
                        0,
                        beneath,
                    )
                    .map_err(map_errno)?
                };
                Ok((parent, name.to_string(), beneath))
            }
        }
    }
}
