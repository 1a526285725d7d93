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
nix::ioctl_write_ptr_bad!(siocsifhwaddr, libc::SIOCSIFHWADDR, libc::ifreq);
nix::ioctl_write_ptr_bad!(siocsifmtu, libc::SIOCSIFMTU, libc::ifreq);

/// An ifreq naming `name` (checked), all else zero.
fn ifreq(name: &str) -> io::Result<libc::ifreq> {
    check_name(name).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: ifreq is plain data; all zeros is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    Ok(ifr)
}

/// Gives the interface `name` (in this thread's network namespace, and
/// down) the NIC's MAC address and MTU, so that what the kernel sends
/// through it is what the driver's interface carries.
pub fn set_link(name: &str, mac: [u8; 6], mtu: u16) -> io::Result<()> {
    let sock =
        std::net::UdpSocket::bind("0.0.0.0:0").or_else(|_| std::net::UdpSocket::bind("[::]:0"))?;
    let mut ifr = ifreq(name)?;
    let mut hw = libc::sockaddr {
        sa_family: libc::ARPHRD_ETHER,
        sa_data: [0; 14],
    };
    for (d, s) in hw.sa_data.iter_mut().zip(mac) {
        *d = s as libc::c_char;
    }
    ifr.ifr_ifru.ifru_hwaddr = hw;
    // SAFETY: SIOCSIFHWADDR reads one ifreq from the pointer, valid for
    // the call; the descriptor is an open socket.
    unsafe { siocsifhwaddr(sock.as_raw_fd(), &ifr) }
        .map_err(|e| io::Error::other(format!("cannot set {name}'s MAC address: {e}")))?;
    let mut ifr = ifreq(name)?;
    ifr.ifr_ifru.ifru_mtu = i32::from(mtu);
    // SAFETY: as above, for SIOCSIFMTU.
    unsafe { siocsifmtu(sock.as_raw_fd(), &ifr) }
        .map_err(|e| io::Error::other(format!("cannot set {name}'s MTU: {e}")))?;
    Ok(())
}

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
    let mut ifr = ifreq(name)?;
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
                format!(
                    "cannot enter network namespace `{netns}`: {e} (entering it needs CAP_SYS_ADMIN, and making interfaces CAP_NET_ADMIN: run as root)"
                ),
            )
        })?;
        create(&name)
    })
    .join()
    .map_err(|_| io::Error::other("the thread making the interface failed"))?
}
