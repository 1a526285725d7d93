//! TAP interfaces (Ethernet frames through `/dev/net/tun`): made in this
//! process's network namespace or in a named one (`ip netns`), each
//! living as long as its descriptor. The only `unsafe` here is the
//! `TUNSETIFF` request.
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

/// The longest interface name (IFNAMSIZ less the NUL).
pub const MAX_NAME: usize = 15;

const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
/// Fail if the interface exists (no attaching to a persistent one made
/// between the check and the request).
const IFF_TUN_EXCL: libc::c_short = 0x8000u16 as libc::c_short;

nix::ioctl_write_ptr_bad!(tunsetiff, 0x4004_54ca, libc::ifreq);

/// Whether `name` is a name an interface can have.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_NAME {
        return Err(format!(
            "interface name `{name}` must be 1 to {MAX_NAME} bytes"
        ));
    }
    if name == "."
        || name == ".."
        || name
            .bytes()
            .any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace() || b.is_ascii_control())
    {
        return Err(format!(
            "interface name `{name}` may not contain `/`, `:` or spaces"
        ));
    }
    Ok(())
}

/// Makes the TAP interface `name` in this thread's network namespace,
/// refusing one that exists. It lives until the descriptor is closed.
pub fn create(name: &str) -> io::Result<OwnedFd> {
    check_name(name).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    if nix::net::if_::if_nametoindex(name).is_ok() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("an interface named `{name}` exists already"),
        ));
    }
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")?;
    // SAFETY: ifreq is plain data; all zeros is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    ifr.ifr_ifru.ifru_flags = IFF_TAP | IFF_NO_PI | IFF_TUN_EXCL;
    // SAFETY: TUNSETIFF reads one ifreq from the pointer, which is valid
    // for the call; the descriptor is /dev/net/tun's, open.
    unsafe { tunsetiff(f.as_raw_fd(), &ifr) }.map_err(|e| {
        io::Error::new(
            io::Error::from(e).kind(),
            format!("cannot make interface `{name}`: {e} (it needs CAP_NET_ADMIN)"),
        )
    })?;
    Ok(f.into())
}

/// Makes the TAP interface `name` in the network namespace `netns` (a
/// name under /run/netns, as `ip netns add` makes them), from a thread
/// that enters it: this process stays where it is.
pub fn create_in(netns: &str, name: &str) -> io::Result<OwnedFd> {
    if netns.is_empty() || netns.contains('/') || netns == "." || netns == ".." {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("`{netns}` is not a network namespace name"),
        ));
    }
    let path = format!("/run/netns/{netns}");
    let ns = File::open(&path).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!(
                "no network namespace `{netns}` ({path}: {e}); make it with `ip netns add {netns}`"
            ),
        )
    })?;
    let name = name.to_string();
    let netns = netns.to_string();
    std::thread::spawn(move || {
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| {
            io::Error::new(
                io::Error::from(e).kind(),
                format!("cannot enter network namespace `{netns}`: {e}"),
            )
        })?;
        create(&name)
    })
    .join()
    .map_err(|_| io::Error::other("the thread making the interface failed"))?
}
