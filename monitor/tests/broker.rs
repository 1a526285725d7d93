//! The broker against real directories, sockets and the real kernel
//! resolution rules: escapes by symlink and `..`, read-only grants, the
//! pipe registry, TCP listeners.
use moat_host_common::protocol::{Request, Response};
use moat_monitor::broker::{Broker, LogSink, Reply, Session};
use moat_pal::{access, create, open_option, stream_kind, Error};
use moat_policy::{Access, Policy};
use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::os::unix::fs::symlink;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "moat-broker-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).unwrap();
        // Resolve symlinks in the temp dir itself (e.g. /tmp -> /private/tmp).
        TempDir(fs::canonicalize(&p).unwrap())
    }
    fn path(&self, rel: &str) -> PathBuf {
        self.0.join(rel)
    }
    fn uri(&self, rel: &str) -> String {
        if rel.is_empty() {
            format!("file:{}", self.0.display())
        } else {
            format!("file:{}/{rel}", self.0.display())
        }
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn broker(policy: Policy) -> (Broker, Arc<Mutex<Vec<String>>>) {
    let (sink, lines) = LogSink::buffer();
    let session = Session::with_null_console(policy, sink).unwrap();
    (Broker::new(session, "test"), lines)
}

fn policy(grants: &[(&str, Access)]) -> Policy {
    let mut p = Policy::default();
    for (g, a) in grants {
        p.allow(g, *a).unwrap();
    }
    p
}

fn err_of(r: &Reply) -> Option<Error> {
    match r.response {
        Response::Err { code } => {
            Some(Error::from_code(-(code as i64)).expect("a known error code"))
        }
        _ => None,
    }
}

fn open(
    b: &mut Broker,
    uri: &str,
    acc: u32,
    disp: u32,
    options: u32,
) -> Result<(u32, OwnedFd), Error> {
    let mut r = b
        .handle(Request::Open {
            uri: uri.into(),
            access: acc,
            create: disp,
            options,
        })
        .unwrap();
    if let Some(e) = err_of(&r) {
        assert!(r.fds.is_empty());
        return Err(e);
    }
    let Response::Fd { kind } = r.response else {
        panic!("unexpected {:?}", r.response)
    };
    assert_eq!(r.fds.len(), 1);
    Ok((kind, r.fds.pop().unwrap()))
}

fn read_file(b: &mut Broker, uri: &str) -> Result<(u32, OwnedFd), Error> {
    open(b, uri, access::READ, create::OPEN_EXISTING, 0)
}

fn simple(b: &mut Broker, req: Request) -> Result<(), Error> {
    resp(b, req).map(|_| ())
}

fn resp(b: &mut Broker, req: Request) -> Result<Response, Error> {
    let r = b.handle(req).unwrap();
    match err_of(&r) {
        Some(e) => Err(e),
        None => Ok(r.response),
    }
}

#[test]
fn symlinks_out_of_the_grant_are_refused() {
    let outside = TempDir::new();
    fs::write(outside.path("secret"), "secret").unwrap();
    let d = TempDir::new();
    fs::create_dir(d.path("sub")).unwrap();
    fs::write(d.path("sub/x"), "inside").unwrap();
    symlink(outside.path("secret"), d.path("abs-link")).unwrap();
    symlink("../../../../../../../../etc/passwd", d.path("rel-link")).unwrap();
    symlink(&outside.0, d.path("dir-link")).unwrap();
    symlink("..", d.path("up")).unwrap();
    symlink("sub/x", d.path("in-link")).unwrap();
    let (mut b, log) = broker(policy(&[(&d.uri(""), Access::Rw)]));

    for rel in [
        "abs-link",
        "rel-link",
        "dir-link/secret",
        "up/x",
        "sub/../../etc/passwd",
    ] {
        let r = read_file(&mut b, &d.uri(rel));
        assert!(
            matches!(r, Err(Error::PermissionDenied) | Err(Error::InvalidUri)),
            "{rel}: {:?}",
            r.map(|x| x.0)
        );
        // Nothing beneath may be created through the link either.
        let w = open(&mut b, &d.uri(rel), access::WRITE, create::OPEN_ALWAYS, 0);
        assert!(w.is_err(), "{rel} writable");
    }
    assert_eq!(
        simple(
            &mut b,
            Request::Stat {
                uri: d.uri("abs-link")
            }
        )
        .unwrap_err(),
        Error::PermissionDenied
    );
    assert!(fs::read_to_string(outside.path("secret")).unwrap() == "secret");
    // A symlink that stays inside works.
    let (kind, fd) = read_file(&mut b, &d.uri("in-link")).unwrap();
    assert_eq!(kind, stream_kind::FILE);
    let mut s = String::new();
    fs::File::from(fd).read_to_string(&mut s).unwrap();
    assert_eq!(s, "inside");
    // Escapes are refused by the kernel, not logged as missing grants.
    assert!(
        log.lock().unwrap().iter().all(|l| !l.contains("abs-link")),
        "{:?}",
        log.lock().unwrap()
    );
}

#[test]
fn dotdot_is_an_invalid_uri() {
    let d = TempDir::new();
    let (mut b, _) = broker(policy(&[(&d.uri(""), Access::Rw)]));
    assert_eq!(
        read_file(&mut b, &format!("{}/../etc/passwd", d.uri(""))).unwrap_err(),
        Error::InvalidUri
    );
    assert_eq!(
        read_file(&mut b, "file:relative").unwrap_err(),
        Error::InvalidUri
    );
    assert_eq!(
        read_file(&mut b, "http://x").unwrap_err(),
        Error::InvalidUri
    );
    assert_eq!(read_file(&mut b, "").unwrap_err(), Error::InvalidArgument);
    assert_eq!(
        read_file(&mut b, &"file:/a".repeat(2000)).unwrap_err(),
        Error::InvalidArgument
    );
}

#[test]
fn ungranted_paths_are_refused_and_logged() {
    let d = TempDir::new();
    let (mut b, log) = broker(policy(&[(&d.uri("sub"), Access::Ro)]));
    assert_eq!(
        read_file(&mut b, "file:/etc/passwd").unwrap_err(),
        Error::PermissionDenied
    );
    let l = log.lock().unwrap().clone();
    assert_eq!(l, vec!["moat: refused file:/etc/passwd (not granted; grant it with --allow-ro file:/etc/passwd)".to_string()]);
    // A sibling whose name starts like the grant is not covered.
    fs::write(d.path("subx"), "x").unwrap();
    assert_eq!(
        read_file(&mut b, &d.uri("subx")).unwrap_err(),
        Error::PermissionDenied
    );
    // Hostile text in the URI is escaped in the log line.
    let _ = read_file(&mut b, "file:/x\n\u{1b}[31mfake");
    assert!(log
        .lock()
        .unwrap()
        .last()
        .unwrap()
        .contains("\\n\\u{1b}[31mfake"));
}

#[test]
fn read_only_grant_refuses_every_change() {
    let d = TempDir::new();
    fs::write(d.path("f"), "data").unwrap();
    fs::create_dir(d.path("dir")).unwrap();
    let (mut b, log) = broker(policy(&[(&d.uri(""), Access::Ro)]));
    assert!(read_file(&mut b, &d.uri("f")).is_ok());
    let denied = Err(Error::PermissionDenied);
    assert_eq!(
        open(&mut b, &d.uri("f"), access::WRITE, create::OPEN_EXISTING, 0).map(|x| x.0),
        denied
    );
    assert_eq!(
        open(
            &mut b,
            &d.uri("f"),
            access::READ | access::APPEND,
            create::OPEN_EXISTING,
            0
        )
        .map(|x| x.0),
        denied
    );
    assert_eq!(
        open(&mut b, &d.uri("new"), access::READ, create::OPEN_ALWAYS, 0).map(|x| x.0),
        denied
    );
    assert_eq!(
        open(&mut b, &d.uri("f"), access::READ, create::CREATE_ALWAYS, 0).map(|x| x.0),
        denied
    );
    assert_eq!(
        open(
            &mut b,
            &d.uri("nd"),
            access::READ,
            create::CREATE_NEW,
            open_option::DIRECTORY
        )
        .map(|x| x.0),
        denied
    );
    assert_eq!(
        simple(&mut b, Request::Delete { uri: d.uri("f") }),
        Err(Error::PermissionDenied)
    );
    assert_eq!(
        simple(&mut b, Request::Delete { uri: d.uri("dir") }),
        Err(Error::PermissionDenied)
    );
    assert_eq!(
        simple(
            &mut b,
            Request::Rename {
                from: d.uri("f"),
                to: d.uri("g")
            }
        ),
        Err(Error::PermissionDenied)
    );
    assert_eq!(fs::read_to_string(d.path("f")).unwrap(), "data");
    assert!(d.path("dir").is_dir() && !d.path("new").exists() && !d.path("nd").exists());
    let l = log.lock().unwrap();
    assert!(
        l[0].contains("not granted for writing; grant it with --allow file:"),
        "{l:?}"
    );
    // Stat says it is not writable.
    drop(l);
    let Response::Attrs {
        kind,
        size,
        readable,
        writable,
        executable,
    } = resp(&mut b, Request::Stat { uri: d.uri("f") }).unwrap()
    else {
        panic!()
    };
    assert_eq!(
        (kind, size, readable, writable, executable),
        (stream_kind::FILE, 4, true, false, false)
    );
}

#[test]
fn rename_needs_both_ends_writable() {
    let ro = TempDir::new();
    let rw = TempDir::new();
    fs::write(rw.path("f"), "x").unwrap();
    fs::write(ro.path("r"), "x").unwrap();
    let (mut b, _) = broker(policy(&[
        (&ro.uri(""), Access::Ro),
        (&rw.uri(""), Access::Rw),
    ]));
    assert_eq!(
        simple(
            &mut b,
            Request::Rename {
                from: rw.uri("f"),
                to: ro.uri("f")
            }
        ),
        Err(Error::PermissionDenied)
    );
    assert_eq!(
        simple(
            &mut b,
            Request::Rename {
                from: ro.uri("r"),
                to: rw.uri("r")
            }
        ),
        Err(Error::PermissionDenied)
    );
    assert!(rw.path("f").exists() && ro.path("r").exists());
}

#[test]
fn read_write_grant_creates_renames_deletes() {
    let d = TempDir::new();
    let (mut b, _) = broker(policy(&[(&d.uri(""), Access::Rw)]));
    let (kind, fd) = open(
        &mut b,
        &d.uri("a.txt"),
        access::READ | access::WRITE,
        create::CREATE_NEW,
        0,
    )
    .unwrap();
    assert_eq!(kind, stream_kind::FILE);
    fs::File::from(fd).write_all(b"hello").unwrap();
    assert_eq!(fs::read_to_string(d.path("a.txt")).unwrap(), "hello");
    assert_eq!(
        open(
            &mut b,
            &d.uri("a.txt"),
            access::WRITE,
            create::CREATE_NEW,
            0
        )
        .map(|x| x.0),
        Err(Error::AlreadyExists)
    );
    // Append.
    let (_, fd) = open(
        &mut b,
        &d.uri("a.txt"),
        access::APPEND,
        create::OPEN_EXISTING,
        0,
    )
    .unwrap();
    fs::File::from(fd).write_all(b"!").unwrap();
    assert_eq!(fs::read_to_string(d.path("a.txt")).unwrap(), "hello!");
    // Truncating create.
    let (_, fd) = open(
        &mut b,
        &d.uri("a.txt"),
        access::WRITE,
        create::CREATE_ALWAYS,
        0,
    )
    .unwrap();
    drop(fd);
    assert_eq!(fs::read_to_string(d.path("a.txt")).unwrap(), "");
    assert_eq!(
        read_file(&mut b, &d.uri("missing")).map(|x| x.0),
        Err(Error::NotFound)
    );
    assert_eq!(
        read_file(&mut b, &d.uri("a.txt/x")).map(|x| x.0),
        Err(Error::NotDirectory)
    );

    // Directories.
    let (kind, _) = open(
        &mut b,
        &d.uri("dir"),
        access::READ,
        create::CREATE_NEW,
        open_option::DIRECTORY,
    )
    .unwrap();
    assert_eq!(kind, stream_kind::DIRECTORY);
    assert!(d.path("dir").is_dir());
    assert_eq!(
        open(
            &mut b,
            &d.uri("dir"),
            access::READ,
            create::CREATE_NEW,
            open_option::DIRECTORY
        )
        .map(|x| x.0),
        Err(Error::AlreadyExists)
    );
    assert!(open(
        &mut b,
        &d.uri("dir"),
        access::READ,
        create::OPEN_ALWAYS,
        open_option::DIRECTORY
    )
    .is_ok());
    assert_eq!(
        read_file(&mut b, &d.uri("dir")).unwrap().0,
        stream_kind::DIRECTORY
    );
    assert_eq!(
        read_file(&mut b, &d.uri("")).unwrap().0,
        stream_kind::DIRECTORY
    );
    assert_eq!(
        open(
            &mut b,
            &d.uri("dir"),
            access::WRITE,
            create::OPEN_EXISTING,
            0
        )
        .map(|x| x.0),
        Err(Error::IsDirectory)
    );
    assert_eq!(
        open(
            &mut b,
            &d.uri("a.txt"),
            access::READ,
            create::OPEN_EXISTING,
            open_option::DIRECTORY
        )
        .map(|x| x.0),
        Err(Error::NotDirectory)
    );
    let Response::Attrs { kind, .. } = resp(&mut b, Request::Stat { uri: d.uri("dir") }).unwrap()
    else {
        panic!()
    };
    assert_eq!(kind, stream_kind::DIRECTORY);

    // Rename and delete.
    fs::write(d.path("dir/inner"), "i").unwrap();
    assert_eq!(
        simple(&mut b, Request::Delete { uri: d.uri("dir") }),
        Err(Error::DirectoryNotEmpty)
    );
    assert_eq!(
        simple(
            &mut b,
            Request::Rename {
                from: d.uri("dir/inner"),
                to: d.uri("moved")
            }
        ),
        Ok(())
    );
    assert!(d.path("moved").exists() && !d.path("dir/inner").exists());
    assert_eq!(
        simple(
            &mut b,
            Request::Rename {
                from: d.uri("moved"),
                to: d.uri("a.txt")
            }
        ),
        Err(Error::AlreadyExists)
    );
    assert_eq!(
        simple(&mut b, Request::Delete { uri: d.uri("dir") }),
        Ok(())
    );
    assert_eq!(
        simple(
            &mut b,
            Request::Delete {
                uri: d.uri("moved")
            }
        ),
        Ok(())
    );
    assert_eq!(
        simple(
            &mut b,
            Request::Delete {
                uri: d.uri("moved")
            }
        ),
        Err(Error::NotFound)
    );
    assert!(!d.path("dir").exists() && !d.path("moved").exists());
    // Deleting a symlink removes the link, not its target.
    let outside = TempDir::new();
    fs::write(outside.path("t"), "t").unwrap();
    symlink(outside.path("t"), d.path("l")).unwrap();
    assert_eq!(simple(&mut b, Request::Delete { uri: d.uri("l") }), Ok(()));
    assert!(outside.path("t").exists());
}

#[test]
fn bad_flags_are_invalid_arguments() {
    let d = TempDir::new();
    let (mut b, _) = broker(policy(&[(&d.uri(""), Access::Rw)]));
    for (a, c, o) in [
        (0, 0, 0),
        (8, 0, 0),
        (access::READ, 4, 0),
        (access::READ, 0, 4),
    ] {
        assert_eq!(
            open(&mut b, &d.uri("x"), a, c, o).map(|x| x.0),
            Err(Error::InvalidArgument),
            "{a} {c} {o}"
        );
    }
}

#[test]
fn a_file_grant_covers_that_file_only() {
    let d = TempDir::new();
    fs::write(d.path("only"), "only").unwrap();
    fs::write(d.path("other"), "other").unwrap();
    let (mut b, _) = broker(policy(&[
        (&d.uri("only"), Access::Ro),
        (&d.uri("new"), Access::Rw),
    ]));
    assert_eq!(
        read_file(&mut b, &d.uri("only")).unwrap().0,
        stream_kind::FILE
    );
    assert_eq!(
        read_file(&mut b, &d.uri("other")).map(|x| x.0),
        Err(Error::PermissionDenied)
    );
    // A file grant for a path that does not exist yet allows creating it.
    let (_, fd) = open(&mut b, &d.uri("new"), access::WRITE, create::CREATE_NEW, 0).unwrap();
    drop(fd);
    assert!(d.path("new").exists());
    // Replaced by a symlink after the grant: not followed.
    fs::remove_file(d.path("only")).unwrap();
    symlink(d.path("other"), d.path("only")).unwrap();
    assert_eq!(
        read_file(&mut b, &d.uri("only")).map(|x| x.0),
        Err(Error::PermissionDenied)
    );
}

#[test]
fn special_files_are_not_passed_on() {
    let d = TempDir::new();
    let fifo = std::ffi::CString::new(d.path("fifo").to_str().unwrap()).unwrap();
    assert_eq!(
        nix::unistd::mkfifo(
            fifo.as_c_str(),
            nix::sys::stat::Mode::from_bits_truncate(0o600)
        ),
        Ok(())
    );
    let (mut b, _) = broker(policy(&[(&d.uri(""), Access::Rw)]));
    // Would block forever if opened blocking with no writer.
    assert_eq!(
        read_file(&mut b, &d.uri("fifo")).map(|x| x.0),
        Err(Error::NotSupported)
    );
    // Refused by its type before any open runs: opening a FIFO for writing
    // with no reader would fail in the open itself (ENXIO, an I/O error).
    assert_eq!(
        open(&mut b, &d.uri("fifo"), access::WRITE, 0, 0).map(|x| x.0),
        Err(Error::NotSupported)
    );
}

#[test]
fn console_null_and_unsupported_schemes() {
    let (mut b, log) = broker(Policy::default());
    for u in ["stdin:", "stdout:", "stderr:"] {
        assert_eq!(
            open(&mut b, u, access::READ | access::WRITE, 0, 0)
                .unwrap()
                .0,
            stream_kind::CONSOLE
        );
    }
    let (kind, fd) = open(&mut b, "null:", access::WRITE, 0, 0).unwrap();
    assert_eq!(kind, stream_kind::NULL);
    fs::File::from(fd).write_all(b"gone").unwrap();
    let Response::Attrs { kind, .. } = resp(
        &mut b,
        Request::Stat {
            uri: "null:".into(),
        },
    )
    .unwrap() else {
        panic!()
    };
    assert_eq!(kind, stream_kind::NULL);
    let Response::Attrs { kind, .. } = resp(
        &mut b,
        Request::Stat {
            uri: "stdout:".into(),
        },
    )
    .unwrap() else {
        panic!()
    };
    assert_eq!(kind, stream_kind::CONSOLE);
    assert_eq!(
        open(&mut b, "dns:example.org", access::READ, 0, 0).map(|x| x.0),
        Err(Error::NotSupported)
    );
    assert_eq!(
        open(&mut b, "dev:blk0", access::READ, 0, 0).map(|x| x.0),
        Err(Error::NotSupported)
    );
    assert!(log
        .lock()
        .unwrap()
        .iter()
        .any(|l| l.contains("devices are granted only by --host kvm")));
    // Servers are opened with Listen, not Open.
    assert_eq!(
        open(&mut b, "pipe.server:x", access::READ, 0, 0).map(|x| x.0),
        Err(Error::InvalidArgument)
    );
    // Not granted.
    assert_eq!(
        simple(
            &mut b,
            Request::Listen {
                uri: "pipe.server:x".into()
            }
        ),
        Err(Error::PermissionDenied)
    );
    assert_eq!(
        open(&mut b, "tcp:127.0.0.1:1", access::READ, 0, 0).map(|x| x.0),
        Err(Error::PermissionDenied)
    );
    // Debug and Report take no answer.
    assert!(b
        .handle(Request::Debug {
            text: "hi\n".into()
        })
        .is_none());
    assert!(log
        .lock()
        .unwrap()
        .iter()
        .any(|l| l == "[picoprocess test] hi"));
    assert!(b
        .handle(Request::Report {
            kind: moat_monitor::ReportKind::Exception,
            text: "boom".into()
        })
        .is_none());
    assert_eq!(
        b.report(),
        Some((moat_monitor::ReportKind::Exception, "boom".to_string()))
    );
}

#[test]
fn pipe_client_before_server() {
    let (mut b, _) = broker(policy(&[
        ("pipe.server:svc", Access::Rw),
        ("pipe.client:svc", Access::Rw),
    ]));
    // The client connects first: into the listener's backlog.
    let (kind, client) = open(
        &mut b,
        "pipe.client:svc",
        access::READ | access::WRITE,
        0,
        0,
    )
    .unwrap();
    assert_eq!(kind, stream_kind::PIPE);
    let Ok(Response::Fd { kind }) = resp(
        &mut b,
        Request::Listen {
            uri: "pipe.server:svc".into(),
        },
    ) else {
        panic!()
    };
    assert_eq!(kind, stream_kind::PIPE_SERVER);
    let mut r = b
        .handle(Request::Listen {
            uri: "pipe.server:svc".into(),
        })
        .unwrap();
    let listener = UnixListener::from(r.fds.pop().unwrap());
    let (mut server_side, _) = listener.accept().unwrap();
    let mut client = UnixStream::from(client);
    client.write_all(b"ping").unwrap();
    let mut buf = [0u8; 4];
    server_side.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ping");
    // Another session does not see this session's pipe.
    let (mut other, _) = broker(policy(&[("pipe.server:svc", Access::Rw)]));
    let mut r2 = other
        .handle(Request::Listen {
            uri: "pipe.server:svc".into(),
        })
        .unwrap();
    let l2 = UnixListener::from(r2.fds.pop().unwrap());
    l2.set_nonblocking(true).unwrap();
    assert!(l2.accept().is_err());
    // The pipe name is checked.
    assert_eq!(
        open(&mut b, "pipe.client:a/b", access::READ, 0, 0).map(|x| x.0),
        Err(Error::InvalidUri)
    );
}

#[test]
fn tcp_server_and_client() {
    // Pick a free port.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (mut b, _) = broker(policy(&[
        ("tcp.server:127.0.0.1:", Access::Rw),
        ("tcp.client:127.0.0.1:", Access::Ro),
    ]));
    let uri = format!("tcp.server:127.0.0.1:{port}");
    let mut r = b.handle(Request::Listen { uri: uri.clone() }).unwrap();
    assert!(
        matches!(
            r.response,
            Response::Fd {
                kind: stream_kind::TCP_SERVER
            }
        ),
        "{:?}",
        r.response
    );
    let listener = TcpListener::from(r.fds.pop().unwrap());
    // A second Listen of the same URI shares the listener.
    let mut r2 = b.handle(Request::Listen { uri }).unwrap();
    let listener2 = TcpListener::from(r2.fds.pop().unwrap());
    assert_eq!(
        listener2.local_addr().unwrap(),
        listener.local_addr().unwrap()
    );

    let (kind, c) = open(
        &mut b,
        &format!("tcp:127.0.0.1:{port}"),
        access::READ | access::WRITE,
        0,
        0,
    )
    .unwrap();
    assert_eq!(kind, stream_kind::TCP);
    let (mut s, _) = listener.accept().unwrap();
    TcpStream::from(c).write_all(b"hey").unwrap();
    let mut buf = [0u8; 3];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"hey");
    // Nobody listening.
    let free = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    assert_eq!(
        open(&mut b, &format!("tcp:127.0.0.1:{free}"), access::READ, 0, 0).map(|x| x.0),
        Err(Error::ConnectionRefused)
    );
    // Other addresses are not granted.
    assert_eq!(
        open(&mut b, "tcp:127.0.0.2:80", access::READ, 0, 0).map(|x| x.0),
        Err(Error::PermissionDenied)
    );
}

#[test]
fn process_create_checks_policy_limits_and_image() {
    let d = TempDir::new();
    fs::write(d.path("not-elf"), "#!/bin/sh\n").unwrap();
    let mut p = policy(&[(&d.uri(""), Access::Ro)]);
    let (mut b, log) = broker(p.clone());
    let pc = |uri: String| Request::ProcessCreate {
        uri,
        args: vec!["a".into()],
    };
    assert_eq!(
        simple(&mut b, pc("file:/bin/sh".into())),
        Err(Error::PermissionDenied)
    );
    assert_eq!(simple(&mut b, pc(d.uri("missing"))), Err(Error::NotFound));
    assert_eq!(
        simple(&mut b, pc(d.uri("not-elf"))),
        Err(Error::InvalidArgument)
    );
    assert!(log
        .lock()
        .unwrap()
        .iter()
        .any(|l| l.contains("not an ELF file")));
    assert_eq!(
        simple(&mut b, pc("null:".into())),
        Err(Error::InvalidArgument)
    );
    assert_eq!(
        simple(
            &mut b,
            Request::ProcessCreate {
                uri: d.uri("not-elf"),
                args: vec!["x\0y".into()]
            }
        ),
        Err(Error::InvalidArgument)
    );
    assert_eq!(
        simple(
            &mut b,
            Request::ProcessCreate {
                uri: d.uri("not-elf"),
                args: vec!["x".repeat(70000)]
            }
        ),
        Err(Error::InvalidArgument)
    );
    // No child allowed at all.
    p.limits.processes = 0;
    fs::write(d.path("img"), tiny_elf()).unwrap();
    let (mut b, log) = broker(p);
    assert_eq!(simple(&mut b, pc(d.uri("img"))), Err(Error::LimitExceeded));
    assert!(log
        .lock()
        .unwrap()
        .iter()
        .any(|l| l.contains("process limit (0)")));
}

/// The smallest image `elf::parse` accepts: one R+X page at 0x400000.
fn tiny_elf() -> Vec<u8> {
    let mut v = vec![0u8; 0x1000];
    v[..4].copy_from_slice(b"\x7fELF");
    v[4] = 2; // 64-bit
    v[5] = 1; // little-endian
    v[6] = 1; // version
    let put16 = |v: &mut Vec<u8>, o: usize, x: u16| v[o..o + 2].copy_from_slice(&x.to_le_bytes());
    let put32 = |v: &mut Vec<u8>, o: usize, x: u32| v[o..o + 4].copy_from_slice(&x.to_le_bytes());
    let put64 = |v: &mut Vec<u8>, o: usize, x: u64| v[o..o + 8].copy_from_slice(&x.to_le_bytes());
    put16(&mut v, 16, 2); // ET_EXEC
    put16(&mut v, 18, 62); // x86-64
    put32(&mut v, 20, 1);
    put64(&mut v, 24, 0x400000 + 0x100); // entry
    put64(&mut v, 32, 64); // phoff
    put16(&mut v, 52, 64); // ehsize
    put16(&mut v, 54, 56); // phentsize
    put16(&mut v, 56, 1); // phnum
    put16(&mut v, 58, 64); // shentsize
                           // PT_LOAD R+X covering the page.
    put32(&mut v, 64, 1);
    put32(&mut v, 68, 5);
    put64(&mut v, 72, 0); // offset
    put64(&mut v, 80, 0x400000); // vaddr
    put64(&mut v, 88, 0x400000); // paddr
    put64(&mut v, 96, 0x1000); // filesz
    put64(&mut v, 104, 0x1000); // memsz
    put64(&mut v, 112, 0x1000); // align
    v[0x100] = 0xf4; // hlt
    v
}

#[test]
fn tiny_elf_is_an_image() {
    moat_host_common::elf::parse(&tiny_elf(), 1 << 30).unwrap();
}

#[test]
fn symlinks_planted_after_the_grant_are_not_followed() {
    let outside = TempDir::new();
    fs::write(outside.path("secret"), "secret").unwrap();
    let d = TempDir::new();
    fs::create_dir(d.path("g")).unwrap();
    let (mut b, _) = broker(policy(&[
        (&d.uri("g"), Access::Rw),
        (&d.uri("newdir"), Access::Rw),
    ]));
    // The granted directory itself is swapped for a symlink.
    fs::remove_dir(d.path("g")).unwrap();
    symlink(&outside.0, d.path("g")).unwrap();
    assert_eq!(
        read_file(&mut b, &d.uri("g/secret")).map(|x| x.0),
        Err(Error::PermissionDenied)
    );
    // A grant of a directory not made yet, planted as a symlink.
    symlink(&outside.0, d.path("newdir")).unwrap();
    assert_eq!(
        open(
            &mut b,
            &d.uri("newdir"),
            access::READ,
            create::OPEN_ALWAYS,
            open_option::DIRECTORY
        )
        .map(|x| x.0),
        Err(Error::PermissionDenied)
    );
    assert_eq!(
        read_file(&mut b, &d.uri("newdir")).map(|x| x.0),
        Err(Error::PermissionDenied)
    );
}
