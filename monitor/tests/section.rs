//! Shared sections as the broker hands them out, against the real kernel:
//! no memory before the section is sized, sized once, sealed (no
//! descriptor handed out can change its size), read-only for a side
//! without write access (the kernel refuses a writable shared mapping),
//! the doorbells both sides get, and a host section given to a session.
use moat_host_common::protocol::{Request, Response};
use moat_monitor::broker::{Broker, LogSink, Reply, Session};
use moat_monitor::HostSection;
use moat_pal::{access, create, stream_kind, Error};
use moat_policy::{Access, Policy};
use std::os::fd::{AsRawFd, OwnedFd};

fn broker(grants: &[(&str, Access)]) -> Broker {
    let mut p = Policy::default();
    for (g, a) in grants {
        p.allow(g, *a).unwrap();
    }
    let session = Session::with_null_console(p, LogSink::buffer().0).unwrap();
    Broker::new(session, "test")
}

fn ask(b: &mut Broker, req: Request) -> Result<Reply, Error> {
    let r = b.handle(req).unwrap();
    match r.response {
        Response::Err { code } => Err(Error::from_code(-(code as i64)).unwrap()),
        _ => Ok(r),
    }
}

fn open(
    b: &mut Broker,
    uri: &str,
    acc: u32,
    disp: u32,
) -> Result<(u64, bool, Vec<OwnedFd>), Error> {
    let r = ask(
        b,
        Request::Open {
            uri: uri.into(),
            access: acc,
            create: disp,
            options: 0,
        },
    )?;
    let Response::Section { size, creator } = r.response else {
        panic!("{:?}", r.response)
    };
    Ok((size, creator, r.fds))
}

fn size(b: &mut Broker, uri: &str, size: u64) -> Result<OwnedFd, Error> {
    let mut r = ask(
        b,
        Request::SectionSize {
            uri: uri.into(),
            size,
        },
    )?;
    assert!(matches!(r.response, Response::Memory { size: s } if s == size));
    assert_eq!(r.fds.len(), 1);
    Ok(r.fds.pop().unwrap())
}

fn map(fd: &OwnedFd, len: usize, write: bool) -> std::io::Result<*mut libc::c_void> {
    let prot = libc::PROT_READ | if write { libc::PROT_WRITE } else { 0 };
    // SAFETY: a fresh shared mapping of a descriptor we hold, at an
    // address the kernel chooses; the test unmaps it.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            prot,
            libc::MAP_SHARED,
            fd.as_raw_fd(),
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    Ok(p)
}

const RW: u32 = access::READ | access::WRITE;

#[test]
fn sized_once_sealed_and_read_only_for_readers() {
    let mut b = broker(&[("shm:", Access::Rw)]);
    let (sz, creator, fds) = open(&mut b, "shm:s", RW, create::CREATE_NEW).unwrap();
    assert_eq!(
        (sz, creator, fds.len()),
        (0, true, 2),
        "no memory before sizing"
    );
    let (_, creator, _) = open(&mut b, "shm:s", RW, create::OPEN_EXISTING).unwrap();
    assert!(!creator, "a later opener is the other side");
    assert_eq!(
        size(&mut b, "shm:s", 4095).unwrap_err(),
        Error::InvalidArgument
    );
    assert_eq!(size(&mut b, "shm:s", 1 << 40).unwrap_err(), Error::NoMemory);
    let rw = size(&mut b, "shm:s", 8192).unwrap();
    assert_eq!(
        size(&mut b, "shm:s", 16384).unwrap_err(),
        Error::PermissionDenied
    );
    // Sealed: whoever holds it cannot change its size.
    for len in [0, 4096, 1 << 20] {
        assert_eq!(
            nix::unistd::ftruncate(&rw, len).unwrap_err(),
            nix::Error::EPERM,
            "ftruncate to {len}"
        );
    }
    // A read-only side gets a read-only descriptor.
    let (sz, _, mut fds) = open(&mut b, "shm:s", access::READ, create::OPEN_EXISTING).unwrap();
    assert_eq!((sz, fds.len()), (8192, 3));
    let ro = fds.pop().unwrap();
    assert_eq!(
        map(&ro, 8192, true).unwrap_err().raw_os_error(),
        Some(libc::EACCES),
        "a writable mapping of the read-only descriptor"
    );
    let w = map(&rw, 8192, true).unwrap();
    let r = map(&ro, 8192, false).unwrap();
    // SAFETY: both mappings are 8192 bytes long, live until unmapped below.
    unsafe {
        *(w as *mut u8).add(4100) = 0x5a;
        assert_eq!(*(r as *const u8).add(4100), 0x5a);
        // Making the read-only mapping writable fails too.
        assert_ne!(
            libc::mprotect(r, 8192, libc::PROT_READ | libc::PROT_WRITE),
            0
        );
        libc::munmap(w, 8192);
        libc::munmap(r, 8192);
    }
    // The memory on request, for a side that opened before sizing.
    let r = ask(
        &mut b,
        Request::SectionMemory {
            uri: "shm:s".into(),
            write: false,
        },
    )
    .unwrap();
    assert!(matches!(r.response, Response::Memory { size: 8192 }));
    let r = ask(
        &mut b,
        Request::Stat {
            uri: "shm:s".into(),
        },
    )
    .unwrap();
    assert!(
        matches!(r.response, Response::Attrs { kind, size: 8192, .. } if kind == stream_kind::SHM)
    );
}

#[test]
fn policy_and_dispositions() {
    let mut b = broker(&[("shm:ro", Access::Ro), ("shm:rw", Access::Rw)]);
    assert_eq!(
        open(&mut b, "shm:rw", RW, create::OPEN_EXISTING).unwrap_err(),
        Error::NotFound
    );
    assert_eq!(
        open(&mut b, "shm:rw", RW, create::CREATE_ALWAYS).unwrap_err(),
        Error::InvalidArgument
    );
    open(&mut b, "shm:rw", RW, create::OPEN_ALWAYS).unwrap();
    assert_eq!(
        open(&mut b, "shm:rw", RW, create::CREATE_NEW).unwrap_err(),
        Error::AlreadyExists
    );
    assert_eq!(
        open(&mut b, "shm:ro", access::READ, create::CREATE_NEW).unwrap_err(),
        Error::PermissionDenied
    );
    assert_eq!(
        open(&mut b, "shm:other", access::READ, create::OPEN_EXISTING).unwrap_err(),
        Error::PermissionDenied
    );
    assert_eq!(
        size(&mut b, "shm:ro", 4096).unwrap_err(),
        Error::PermissionDenied
    );
    assert_eq!(
        open(&mut b, "shm:a/b", RW, create::OPEN_ALWAYS).unwrap_err(),
        Error::InvalidUri
    );
}

#[test]
fn a_host_section_is_the_creator_side() {
    let mut b = broker(&[("shm:", Access::Rw)]);
    let h = HostSection::new(4096).unwrap();
    b.session().shm_attach("h", &h).unwrap();
    assert!(
        b.session().shm_attach("h", &h).is_err(),
        "one name, one section"
    );
    h.write(0, b"hi").unwrap();
    let (sz, creator, fds) = open(&mut b, "shm:h", RW, create::OPEN_EXISTING).unwrap();
    assert_eq!((sz, creator, fds.len()), (4096, false, 3));
    assert_eq!(
        size(&mut b, "shm:h", 8192).unwrap_err(),
        Error::PermissionDenied
    );
    // The picoprocess side rings the creator's doorbell (fds[0]): the host
    // sees it once.
    let one = 1u64.to_ne_bytes();
    // SAFETY: writes 8 bytes from a local to an eventfd we hold.
    let n = unsafe { libc::write(fds[0].as_raw_fd(), one.as_ptr().cast(), 8) };
    assert_eq!(n, 8);
    assert!(h.wait(Some(std::time::Duration::from_secs(1))));
    assert!(!h.wait(Some(std::time::Duration::ZERO)), "consumed");
    // The host rings the other side's (fds[1]).
    h.ring();
    let mut v = [0u8; 8];
    // SAFETY: reads 8 bytes into a local from an eventfd we hold.
    let n = unsafe { libc::read(fds[1].as_raw_fd(), v.as_mut_ptr().cast(), 8) };
    assert_eq!(n, 8);
    let w = map(&fds[2], 4096, false).unwrap();
    // SAFETY: a 4096-byte mapping, unmapped right after.
    unsafe {
        assert_eq!(std::slice::from_raw_parts(w as *const u8, 2), b"hi");
        libc::munmap(w, 4096);
    }
    assert!(HostSection::new(4097).is_err() && HostSection::new(0).is_err());
    assert!(h.atomic_u64(4).is_none(), "misaligned");
    assert!(h.atomic_u64(4096).is_none(), "past the end");
    assert!(h.read(4095, &mut [0u8; 2]).is_err());
}
