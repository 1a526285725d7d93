//! The monitor's side of the loader wire: bytes a confined process sends
//! are decoded as a [`Request`] ([`protocol::decode`], what the monitor's
//! loop does with each packet) and, when they decode, answered by the
//! broker ([`Broker::handle`]) of a real [`Session`] whose policy grants
//! one temporary directory read-write and another read-only.
//!
//! The checks: nothing panics; every log line is one line; every
//! descriptor the broker hands back is `/dev/null`, the console, or an
//! object inside a grant (opened read-only when the grant is); and nothing
//! outside the read-write grant is created, changed, renamed or deleted:
//! the read-only grant, a sibling directory and a sibling file (which
//! symlinks in the grant point at) keep their contents, and the parent
//! gains no entry.
//!
//! Each input is a few messages. A message is either raw bytes (what the
//! fuzzer makes of postcard) or a request built from a vocabulary of URIs
//! that reach the grants, their edges and the other schemes, then encoded
//! with postcard and decoded like any other.
use crate::input::Input;
use moat_host_common::protocol::{self, ReportKind, Request, Response};
use moat_monitor::broker::Broker;
use moat_monitor::session::{LogSink, Session};
use moat_policy::{Access, Policy};
use std::collections::BTreeMap;
use std::fs;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

/// Most messages of one input.
const MAX_MESSAGES: usize = 8;

/// The directories and the session, made once per process.
struct World {
    root: PathBuf,
    session: Arc<Session>,
    /// What must never change: path (relative to `root`) -> what it is.
    frozen: BTreeMap<String, String>,
}

static WORLD: OnceLock<World> = OnceLock::new();

fn world() -> &'static World {
    WORLD.get_or_init(|| {
        remove_stale();
        let root = std::env::temp_dir().join(format!("moat-fuzz-monitor-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(root.join("outside/deeper")).unwrap();
        fs::write(root.join("outside/secret"), b"outside the grant").unwrap();
        fs::write(root.join("outside/deeper/more"), b"further outside").unwrap();
        fs::write(root.join("sibling-file"), b"a sibling of the grant").unwrap();
        fs::create_dir_all(root.join("ro/sub")).unwrap();
        fs::write(root.join("ro/file"), b"read-only grant").unwrap();
        fs::write(root.join("ro/sub/inner"), b"read-only, deeper").unwrap();
        std::os::unix::fs::symlink("../outside", root.join("ro/escape")).unwrap();
        // The read-write grant's name has a prefix in common with a
        // sibling's (`grant` and `grant-sibling`): a grant covers whole
        // path components only.
        fs::create_dir_all(root.join("grant-sibling")).unwrap();
        fs::write(root.join("grant-sibling/file"), b"not granted").unwrap();
        let root = fs::canonicalize(&root).unwrap();
        let mut policy = Policy::default();
        let uri = |p: &str| format!("file:{}/{p}", root.display());
        policy.allow(&uri("grant"), Access::Rw).unwrap();
        policy.allow(&uri("ro"), Access::Ro).unwrap();
        let log = LogSink::callback(|line: &str| {
            assert!(!line.contains('\n'), "a log line spans lines: {line:?}");
        });
        let session = Session::with_null_console(policy, log).unwrap();
        reset_grant(&root);
        let frozen = snapshot(&root);
        World {
            root,
            session,
            frozen,
        }
    })
}

/// Remove what earlier fuzzing processes left (libFuzzer ends without
/// running [`cleanup`]): the folders of processes that are gone.
fn remove_stale() {
    let Ok(rd) = fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix("moat-fuzz-monitor-") else {
            continue;
        };
        if pid.parse::<u32>().is_ok() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = fs::remove_dir_all(e.path());
        }
    }
}

/// Lay the read-write grant out afresh: files, a directory, and symlinks
/// that lead out of it.
fn reset_grant(root: &Path) {
    let g = root.join("grant");
    if fs::symlink_metadata(&g).is_ok_and(|m| m.is_dir()) {
        fs::remove_dir_all(&g).unwrap();
    } else {
        let _ = fs::remove_file(&g);
    }
    fs::create_dir_all(g.join("sub/deeper")).unwrap();
    fs::write(g.join("file"), b"granted").unwrap();
    fs::write(g.join("sub/inner"), b"granted, deeper").unwrap();
    std::os::unix::fs::symlink("../outside", g.join("escape")).unwrap();
    std::os::unix::fs::symlink(root.join("outside/secret"), g.join("abs")).unwrap();
    std::os::unix::fs::symlink("../../sibling-file", g.join("sub/up")).unwrap();
    std::os::unix::fs::symlink("/dev/zero", g.join("device")).unwrap();
}

/// Everything under `root` but the read-write grant: each path with its
/// type and contents (or link target).
fn snapshot(root: &Path) -> BTreeMap<String, String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
        let mut entries: Vec<_> = fs::read_dir(dir).unwrap().map(|e| e.unwrap()).collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let p = e.path();
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            if rel == "grant" {
                continue;
            }
            let m = fs::symlink_metadata(&p).unwrap();
            let what = if m.is_symlink() {
                format!("link {}", fs::read_link(&p).unwrap().display())
            } else if m.is_dir() {
                walk(root, &p, out);
                format!("dir {:o}", m.mode_bits())
            } else {
                let data = fs::read(&p).unwrap();
                format!(
                    "file {:o} {:?}",
                    m.mode_bits(),
                    String::from_utf8_lossy(&data)
                )
            };
            out.insert(rel, what);
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

trait ModeBits {
    fn mode_bits(&self) -> u32;
}

impl ModeBits for fs::Metadata {
    fn mode_bits(&self) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        self.permissions().mode() & 0o7777
    }
}

/// A URI from the vocabulary: a base that reaches a grant, its edges or
/// another scheme, then a suffix from the input.
fn uri(w: &World, inp: &mut Input) -> String {
    let root = w.root.display().to_string();
    let base = match inp.u8() % 24 {
        0..=3 => format!("file:{root}/grant"),
        4 => format!("file:{root}/grant/"),
        5 => format!("file:{root}/grant/sub"),
        6 => format!("file:{root}/grant/escape"),
        7 => format!("file:{root}/grant/abs"),
        8 => format!("file:{root}/grant/sub/up"),
        9 => format!("file:{root}/grant/.."),
        10 => format!("file:{root}/ro"),
        11 => format!("file:{root}/ro/escape"),
        12 => format!("file:{root}/outside"),
        13 => format!("file:{root}/grant-sibling"),
        14 => format!("file:{root}"),
        15 => "file:/".to_string(),
        16 => format!("file:{root}/grant/device"),
        17 => "pipe.server:".to_string(),
        18 => "pipe.client:".to_string(),
        19 => "tcp.client:127.0.0.1:".to_string(),
        20 => "tcp.server:127.0.0.1:".to_string(),
        21 => "null:".to_string(),
        22 => {
            ["stdin:", "stdout:", "stderr:", "dev:", "dns:"][usize::from(inp.u8() % 5)].to_string()
        }
        _ => String::new(),
    };
    format!("{base}{}", inp.string(64))
}

/// One message's bytes.
fn message(w: &World, inp: &mut Input) -> Vec<u8> {
    let sel = inp.u8();
    if sel.is_multiple_of(4) {
        return inp.string_bytes(512).to_vec();
    }
    let req = match sel / 4 % 8 {
        0 | 1 => Request::Open {
            uri: uri(w, inp),
            access: u32::from(inp.u8() % 8),
            create: u32::from(inp.u8() % 5),
            options: u32::from(inp.u8() % 4),
        },
        2 => Request::Stat { uri: uri(w, inp) },
        3 => Request::Rename {
            from: uri(w, inp),
            to: uri(w, inp),
        },
        4 => Request::Delete { uri: uri(w, inp) },
        5 => Request::ProcessCreate {
            uri: uri(w, inp),
            args: (0..inp.u8() % 4).map(|_| inp.string(16)).collect(),
        },
        6 => Request::Listen { uri: uri(w, inp) },
        _ => match inp.u8() % 2 {
            0 => Request::Debug {
                text: inp.string(128),
            },
            _ => Request::Report {
                kind: ReportKind::Violation,
                text: inp.string(128),
            },
        },
    };
    postcard::to_allocvec(&req).unwrap()
}

/// Where a descriptor the broker handed back leads, and whether it is
/// open for writing.
fn fd_target(fd: &OwnedFd) -> (String, bool) {
    let n = fd.as_raw_fd();
    let path = fs::read_link(format!("/proc/self/fd/{n}"))
        .unwrap()
        .display()
        .to_string();
    let info = fs::read_to_string(format!("/proc/self/fdinfo/{n}")).unwrap();
    let flags = info
        .lines()
        .find_map(|l| l.strip_prefix("flags:"))
        .and_then(|f| u32::from_str_radix(f.trim(), 8).ok())
        .unwrap();
    // O_ACCMODE: 0 read-only, 1 write-only, 2 read-write.
    let path = path.strip_suffix(" (deleted)").unwrap_or(&path).to_string();
    (path, flags & 3 != 0)
}

/// The broker's answer to a request that decoded.
fn check_reply(w: &World, req: &Request, reply: Option<moat_monitor::broker::Reply>) {
    let root = w.root.display().to_string();
    let Some(reply) = reply else {
        assert!(
            matches!(req, Request::Debug { .. } | Request::Report { .. }),
            "{req:?} got no answer"
        );
        return;
    };
    match reply.response {
        Response::Fd { .. } => assert!(!reply.fds.is_empty(), "{req:?}: Fd without one"),
        _ => assert!(reply.fds.is_empty(), "{req:?}: descriptors with {reply:?}"),
    }
    for fd in &reply.fds {
        let (path, write) = fd_target(fd);
        let in_grant =
            path == format!("{root}/grant") || path.starts_with(&format!("{root}/grant/"));
        let in_ro = path == format!("{root}/ro") || path.starts_with(&format!("{root}/ro/"));
        let ok = in_grant
            || (in_ro && !write)
            || path == "/dev/null"
            // ProcessCreate's exit-code pipe (no child is started here).
            || path.starts_with("pipe:");
        assert!(ok, "{req:?} handed out {path} (write: {write})");
    }
}

/// Remove the directories [`run`] made (for a process that runs the
/// target and goes on, such as the test suite's replay).
pub fn cleanup() {
    if let Some(w) = WORLD.get() {
        let _ = fs::remove_dir_all(&w.root);
    }
}

/// Run one input: a few messages, each decoded and, if it decodes,
/// handled; then nothing outside the read-write grant has changed.
pub fn run(data: &[u8]) {
    let w = world();
    let mut inp = Input::new(data);
    let mut broker = Broker::new(w.session.clone(), "fuzz");
    for _ in 0..MAX_MESSAGES {
        if inp.is_empty() {
            break;
        }
        let bytes = message(w, &mut inp);
        let Ok(req) = protocol::decode::<Request>(&bytes) else {
            continue;
        };
        let reply = broker.handle(req.clone());
        check_reply(w, &req, reply);
    }
    let now = snapshot(&w.root);
    assert_eq!(
        now, w.frozen,
        "something outside the read-write grant changed"
    );
    reset_grant(&w.root);
}
