//! A mediated interface made a host object: a TAP interface whose frames
//! go through the mediator to the driver ([`export`]), and the software
//! NIC's wire ([`Wire`]): a TCP listener on 127.0.0.1 that each driver
//! connects to (granted as `tcp.client:`), bridged to another TAP
//! interface, the stand-in for the physical network (in a network
//! namespace of the user's). On the wire each frame is a 2-byte
//! little-endian length and the frame.
//!
//! Threads poll with a short timeout so that dropping the handle ends
//! them; a driver's new connection replaces the last one (that driver is
//! gone), and frames in flight on a dead connection are lost.
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use super::MediatedNet;
use crate::block::region::wait_readable;

const TICK: Duration = Duration::from_millis(100);
/// Larger than any frame (the largest MTU and its header).
const FRAME_BUF: usize = 65536;

/// Threads that run until the handle is dropped.
pub struct Running {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    /// Frames the host side dropped (too long for the interface, or no
    /// driver connected to the wire).
    pub dropped: Arc<AtomicU64>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let fl = OFlag::from_bits_truncate(fcntl(fd.as_raw_fd(), FcntlArg::F_GETFL)?);
    fcntl(fd.as_raw_fd(), FcntlArg::F_SETFL(fl | OFlag::O_NONBLOCK))?;
    Ok(())
}

/// One frame from a TAP descriptor, waiting up to a tick.
fn read_tap(tap: &OwnedFd, buf: &mut [u8]) -> Option<usize> {
    let [ready] = wait_readable([Some(tap.as_fd())], TICK);
    if !ready {
        return None;
    }
    nix::unistd::read(tap.as_raw_fd(), buf)
        .ok()
        .filter(|&n| n > 0)
}

/// The client side: frames read from `tap` are sent through `nic`, frames
/// `nic` receives are written to `tap`.
pub fn export(nic: MediatedNet, tap: OwnedFd) -> io::Result<Running> {
    set_nonblocking(&tap)?;
    let tap = Arc::new(tap);
    let stop = Arc::new(AtomicBool::new(false));
    let dropped = Arc::new(AtomicU64::new(0));
    let out = {
        let (nic, tap, stop, dropped) = (nic.clone(), tap.clone(), stop.clone(), dropped.clone());
        std::thread::Builder::new()
            .name("moat-nic-out".into())
            .spawn(move || {
                let mut buf = vec![0u8; FRAME_BUF];
                while !stop.load(Ordering::SeqCst) {
                    if let Some(n) = read_tap(&tap, &mut buf) {
                        if nic.send(&buf[..n]).is_err() {
                            dropped.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            })?
    };
    let inn = {
        let (tap, stop) = (tap.clone(), stop.clone());
        std::thread::Builder::new()
            .name("moat-nic-in".into())
            .spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    if let Some(f) = nic.recv(TICK) {
                        let _ = nix::unistd::write(tap.as_fd(), &f);
                    }
                }
            })?
    };
    Ok(Running {
        stop,
        threads: vec![out, inn],
        dropped,
    })
}

/// The software NIC's wire: the TCP port its drivers connect to, bridged
/// to `tap`.
pub struct Wire {
    pub port: u16,
    pub running: Running,
}

impl Wire {
    /// The wire to `tap`; each driver proves itself with `token` (the
    /// bytes it sends first, see [`preamble`]).
    pub fn start(tap: OwnedFd, token: &str) -> io::Result<Wire> {
        set_nonblocking(&tap)?;
        let token = Arc::new(preamble(token));
        let tap = Arc::new(tap);
        let listener = TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let port = listener.local_addr()?.port();
        let stop = Arc::new(AtomicBool::new(false));
        let dropped = Arc::new(AtomicU64::new(0));
        let conn: Arc<Mutex<Option<TcpStream>>> = Arc::new(Mutex::new(None));
        // Drivers' connections, and what they send, to the TAP.
        let accept = {
            let (tap, stop, conn) = (tap.clone(), stop.clone(), conn.clone());
            std::thread::Builder::new()
                .name("moat-wire-in".into())
                .spawn(move || {
                    let mut readers: Vec<JoinHandle<()>> = Vec::new();
                    while !stop.load(Ordering::SeqCst) {
                        let [ready] = wait_readable([Some(listener.as_fd())], TICK);
                        if !ready {
                            continue;
                        }
                        let Ok((s, _)) = listener.accept() else {
                            continue;
                        };
                        let _ = s.set_nonblocking(false);
                        let _ = s.set_read_timeout(Some(TICK));
                        // A driver that stops reading loses frames, not the
                        // wire's other threads.
                        let _ = s.set_write_timeout(Some(Duration::from_secs(1)));
                        let _ = s.set_nodelay(true);
                        let (tap, stop, conn, token) =
                            (tap.clone(), stop.clone(), conn.clone(), token.clone());
                        readers.retain(|h| !h.is_finished());
                        if let Ok(h) = std::thread::Builder::new()
                            .name("moat-wire-conn".into())
                            .spawn(move || {
                                // Only the driver knows the token: anyone
                                // else on 127.0.0.1 is turned away.
                                if !authenticated(&s, &token) {
                                    return;
                                }
                                let Ok(r) = s.try_clone() else { return };
                                // The last driver is gone: its connection too.
                                if let Some(old) =
                                    conn.lock().unwrap_or_else(|e| e.into_inner()).replace(s)
                                {
                                    let _ = old.shutdown(std::net::Shutdown::Both);
                                }
                                from_driver(r, &tap, &stop)
                            })
                        {
                            readers.push(h);
                        }
                    }
                    for h in readers {
                        let _ = h.join();
                    }
                })?
        };
        // The TAP's frames, to the connected driver.
        let out = {
            let (stop, dropped) = (stop.clone(), dropped.clone());
            std::thread::Builder::new()
                .name("moat-wire-out".into())
                .spawn(move || {
                    let mut buf = vec![0u8; FRAME_BUF];
                    while !stop.load(Ordering::SeqCst) {
                        let Some(n) = read_tap(&tap, &mut buf[2..]) else {
                            continue;
                        };
                        let Ok(len) = u16::try_from(n) else { continue };
                        buf[..2].copy_from_slice(&len.to_le_bytes());
                        let mut c = conn.lock().unwrap_or_else(|e| e.into_inner());
                        let sent = c
                            .as_mut()
                            .is_some_and(|s| s.write_all(&buf[..2 + n]).is_ok());
                        if !sent {
                            dropped.fetch_add(1, Ordering::Relaxed);
                            *c = None;
                        }
                    }
                })?
        };
        Ok(Wire {
            port,
            running: Running {
                stop,
                threads: vec![accept, out],
                dropped,
            },
        })
    }
}

/// What a driver sends first on its wire: `MOATWIRE` and the token.
pub fn preamble(token: &str) -> Vec<u8> {
    let mut p = b"MOATWIRE".to_vec();
    p.extend_from_slice(token.as_bytes());
    p
}

/// A token for a wire: 32 hex digits from the kernel's random source.
pub fn new_token() -> io::Result<String> {
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// Whether the connection starts with `want` (within a second).
fn authenticated(mut s: &TcpStream, want: &[u8]) -> bool {
    let mut got = vec![0u8; want.len()];
    let mut at = 0;
    let until = std::time::Instant::now() + Duration::from_secs(1);
    while at < got.len() && std::time::Instant::now() < until {
        match s.read(&mut got[at..]) {
            Ok(0) => return false,
            Ok(n) => at += n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return false,
        }
    }
    at == got.len() && got == want
}

/// The frames in `b` (length-prefixed), written to the TAP; frames no
/// interface could carry are skipped without a system call. Returns the
/// bytes used (a partial frame stays).
fn deliver(b: &[u8], tap: &OwnedFd) -> usize {
    let mut at = 0;
    while b.len() - at >= 2 {
        let n = usize::from(u16::from_le_bytes([b[at], b[at + 1]]));
        if b.len() - at < 2 + n {
            break;
        }
        if n >= 14 {
            let _ = nix::unistd::write(tap.as_fd(), &b[at + 2..at + 2 + n]);
        }
        at += 2 + n;
    }
    at
}

/// Frames a driver sends on its connection, to the TAP, until it ends.
fn from_driver(mut s: TcpStream, tap: &OwnedFd, stop: &AtomicBool) {
    let mut pending: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; FRAME_BUF];
    while !stop.load(Ordering::SeqCst) {
        match s.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => pending.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(_) => return,
        }
        // One pass per read, one move of what is left.
        let used = deliver(&pending, tap);
        pending.drain(..used);
    }
}
