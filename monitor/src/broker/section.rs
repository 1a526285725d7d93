//! The broker's side of shared sections (`shm:NAME`, see [`crate::shm`]):
//! opening one (the policy decides; the session makes or finds it), sizing
//! it once, handing out its memory, its attributes. Every answer carries
//! descriptors the monitor made: the doorbells, and the memory only once
//! it is sized and sealed (read-only for a side without write access).
use super::{Broker, Reply, R};
use moat_host_common::protocol::Response;
use moat_pal::uri::Uri;
use moat_pal::{access, create, open_option, stream_kind, Error};

impl Broker {
    /// Open (or create) a section: `Section` with both doorbells, then its
    /// memory if sized.
    pub(super) fn open_section(
        &self,
        u: &Uri,
        name: &str,
        acc: u32,
        disp: u32,
        options: u32,
    ) -> R<Reply> {
        if acc & access::APPEND != 0
            || disp == create::CREATE_ALWAYS
            || options & open_option::DIRECTORY != 0
        {
            return Err(Error::InvalidArgument);
        }
        let write = acc & access::WRITE != 0;
        self.check(u, write || disp != create::OPEN_EXISTING)?;
        let (section, creator) = self.session.section_open(name, disp)?;
        let mut fds: Vec<_> = section.bells().map_err(super::io_err)?.into();
        if let Some(m) = section.memory(write).map_err(super::io_err)? {
            fds.push(m);
        }
        Ok(Reply {
            response: Response::Section {
                size: section.size(),
                creator,
            },
            fds,
        })
    }

    /// Size a section once (DkStreamSetLength): `Memory` with its memory.
    pub(super) fn section_size(&self, uri: &str, size: u64) -> R<Reply> {
        let u = self.parse(uri)?;
        let Uri::Shm(name) = &u else {
            return Err(Error::InvalidArgument);
        };
        self.check(&u, true)?;
        let section = self.session.section(name).ok_or(Error::NotFound)?;
        if section.size() != 0 {
            return Err(Error::PermissionDenied);
        }
        let limit = self.session.policy().limits.memory_mib << 20;
        if size > limit {
            self.log(&format!(
                "moat: refused to size {} to {size} bytes (more than the memory limit, {} MiB)",
                super::sanitize(&u.canonical()),
                limit >> 20
            ));
            return Err(Error::NoMemory);
        }
        section.set_size(size)?;
        self.memory_reply(&section, true)
    }

    /// A section's memory (a side that opened it before it was sized).
    pub(super) fn section_memory(&self, uri: &str, write: bool) -> R<Reply> {
        let u = self.parse(uri)?;
        let Uri::Shm(name) = &u else {
            return Err(Error::InvalidArgument);
        };
        self.check(&u, write)?;
        let section = self.session.section(name).ok_or(Error::NotFound)?;
        self.memory_reply(&section, write)
    }

    fn memory_reply(&self, section: &crate::shm::Section, write: bool) -> R<Reply> {
        let fds = section
            .memory(write)
            .map_err(super::io_err)?
            .into_iter()
            .collect();
        Ok(Reply {
            response: Response::Memory {
                size: section.size(),
            },
            fds,
        })
    }

    /// DkStreamAttributesQuery of `shm:NAME`.
    pub(super) fn stat_section(&self, u: &Uri, name: &str) -> R<Reply> {
        self.check(u, false)?;
        let section = self.session.section(name).ok_or(Error::NotFound)?;
        Ok(Reply {
            response: Response::Attrs {
                kind: stream_kind::SHM,
                size: section.size(),
                readable: true,
                writable: self.session.policy().check(u, true).is_ok(),
                executable: false,
            },
            fds: Vec::new(),
        })
    }
}
