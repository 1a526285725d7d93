//! Manifests and policies.
//!
//! A picoprocess reaches nothing its policy does not grant. The policy is
//! built from the manifest (TOML, see [`Manifest`]) and the command line
//! (`--allow`, `--allow-ro`). Always granted: `stdin:`, `stdout:`,
//! `stderr:` and `null:` (the console the host gives it, and the bit
//! bucket). Everything else needs a grant whose prefix covers the URI:
//! `file:` grants cover a path and everything below it (component-wise);
//! other grants are prefixes of the canonical URI text
//! (`tcp.client:127.0.0.1:` covers every port on that address; `shm:ring`
//! is exactly that shared section, `shm:` every one).
use moat_pal::uri::{normalize_path, path_within, Uri};
use serde::{Deserialize, Serialize};
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("cannot read manifest `{path}`: {err}")]
    Read { path: String, err: std::io::Error },
    #[error("manifest `{path}` is not valid: {msg}")]
    Parse { path: String, msg: String },
    #[error("grant `{0}` is not a valid URI prefix: {1}")]
    BadGrant(String, String),
    #[error("limit `{0}` = {1} is out of range ({2})")]
    BadLimit(&'static str, u64, &'static str),
    #[error("{0}")]
    Device(#[from] device::DeviceSpecError),
    #[error("{0}")]
    Remap(#[from] remap::RemapError),
}

/// Access a grant gives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Access {
    /// Read only: open for reading, attributes, enumerate.
    Ro,
    /// Read and write: also create, write, truncate, rename, delete.
    Rw,
}

/// One grant of the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantSpec {
    /// URI prefix, e.g. `file:/srv/data` or `tcp.client:127.0.0.1:`.
    pub uri: String,
    /// `ro` or `rw` (default `ro`).
    #[serde(default = "default_access")]
    pub access: Access,
}

fn default_access() -> Access {
    Access::Ro
}

pub mod device;
pub mod remap;

/// The most guest memory the kvm host gives a picoprocess (its layout
/// keeps the fourth GiB for device windows).
pub const KVM_MAX_MEMORY_MIB: u64 = 3072;
pub use device::{DeviceKind, DeviceSpec};

/// Resource limits of a picoprocess (and, for `processes`, its whole tree).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Address-space limit in MiB (RLIMIT_AS of the sandbox process).
    pub memory_mib: u64,
    /// Guest threads at once.
    pub threads: u64,
    /// Open handles at once.
    pub handles: u64,
    /// Live child picoprocesses of the whole tree at once.
    pub processes: u64,
    /// CPU seconds (0: unlimited).
    pub cpu_seconds: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory_mib: 1024,
            threads: 64,
            handles: 1024,
            processes: 16,
            cpu_seconds: 0,
        }
    }
}

impl Limits {
    pub fn validate(&self) -> Result<(), PolicyError> {
        let r = |n, v: u64, lo: u64, hi: u64, why| {
            if v < lo || v > hi {
                Err(PolicyError::BadLimit(n, v, why))
            } else {
                Ok(())
            }
        };
        r("memory_mib", self.memory_mib, 64, 65536, "64 to 65536")?;
        r("threads", self.threads, 1, 4096, "1 to 4096")?;
        r("handles", self.handles, 16, 65536, "16 to 65536")?;
        r("processes", self.processes, 0, 1024, "0 to 1024")?;
        r("cpu_seconds", self.cpu_seconds, 0, 1 << 32, "0 to 2^32")?;
        Ok(())
    }
}

/// The manifest file: TOML. Unknown keys are refused with their name.
///
/// ```toml
/// image = "hello"                 # optional; the command line's IMAGE wins
/// args = ["a", "b"]               # optional; the command line's ARGS win
/// [limits]
/// memory_mib = 1024
/// threads = 64
/// handles = 1024
/// processes = 16
/// cpu_seconds = 0
/// [[grant]]
/// uri = "file:/srv/data"
/// access = "rw"
/// [[device]]                      # host-hypervisor only
/// name = "blk0"
/// kind = "virtio-blk"
/// backing = "/srv/disk.img"
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    #[serde(default)]
    pub image: Option<String>,
    #[serde(default)]
    pub args: Option<Vec<String>>,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default, rename = "grant")]
    pub grants: Vec<GrantSpec>,
    #[serde(default, rename = "device")]
    pub devices: Vec<DeviceSpec>,
    /// `[[remap]]`: guest `file:` prefixes shown as host ones (see
    /// [`remap`]).
    #[serde(default, rename = "remap")]
    pub remaps: Vec<remap::RemapSpec>,
}

impl Manifest {
    pub fn parse(text: &str, path: &str) -> Result<Manifest, PolicyError> {
        let m: Manifest = toml::from_str(text).map_err(|e| PolicyError::Parse {
            path: path.into(),
            msg: e.message().trim().to_string(),
        })?;
        m.limits.validate()?;
        Ok(m)
    }

    pub fn load(path: &Path) -> Result<Manifest, PolicyError> {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|err| PolicyError::Read {
            path: p.clone(),
            err,
        })?;
        Self::parse(&text, &p)
    }
}

/// A grant ready for matching.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    /// Canonical prefix text (`file:/a/b`, `tcp.client:127.0.0.1:`).
    pub prefix: String,
    /// For `file:` grants: the normalised path as written.
    pub path: Option<String>,
    /// For `file:` grants: the path with symlinks resolved at grant time
    /// (the directory the host opens requests beneath), if it exists.
    pub real_path: Option<String>,
    pub access: Access,
}

impl Grant {
    pub fn new(uri: &str, access: Access) -> Result<Grant, PolicyError> {
        let bad = |m: &str| PolicyError::BadGrant(uri.to_string(), m.to_string());
        let (scheme, rest) = uri.split_once(':').ok_or_else(|| bad("no `scheme:`"))?;
        match scheme {
            "file" => {
                let path = normalize_path(rest)
                    .map_err(|_| bad("file: grants need an absolute path without `..`"))?;
                let real_path = std::fs::canonicalize(&path)
                    .ok()
                    .map(|p| p.display().to_string());
                Ok(Grant {
                    prefix: format!("file:{path}"),
                    path: Some(path),
                    real_path,
                    access,
                })
            }
            "tcp" | "tcp.client" | "tcp.server" | "pipe.server" | "pipe.client" | "dns" | "dev"
            | "shm" | "null" | "stdin" | "stdout" | "stderr" => {
                let scheme = if scheme == "tcp" {
                    "tcp.client"
                } else {
                    scheme
                };
                if rest.bytes().any(|c| c == 0 || c == b'/') && scheme != "dns" {
                    return Err(bad("unexpected character"));
                }
                Ok(Grant {
                    prefix: format!("{scheme}:{rest}"),
                    path: None,
                    real_path: None,
                    access,
                })
            }
            _ => Err(bad("unknown scheme")),
        }
    }

    /// Whether this grant covers `uri` (ignoring access).
    pub fn covers(&self, uri: &Uri) -> bool {
        match (uri, &self.path) {
            (Uri::File(p), Some(gp)) => {
                path_within(p, gp)
                    || self
                        .real_path
                        .as_deref()
                        .is_some_and(|rp| path_within(p, rp))
            }
            (Uri::File(_), None) => false,
            (_, Some(_)) => false,
            // Non-file grants: a grant ending in `:` covers every URI it
            // prefixes (`pipe.server:` any name, `tcp.client:127.0.0.1:`
            // any port); any other grant covers exactly its own URI.
            (u, None) => {
                let c = u.canonical();
                if self.prefix.ends_with(':') {
                    c.starts_with(&self.prefix)
                } else {
                    c == self.prefix
                }
            }
        }
    }

    /// For a covered `file:` URI: the directory to resolve beneath (the
    /// grant's real path) and the relative rest ("" for the grant itself).
    pub fn split_file<'a>(&'a self, path: &'a str) -> Option<(&'a str, &'a str)> {
        let gp = self.path.as_deref()?;
        let rp = self.real_path.as_deref().unwrap_or(gp);
        for base in [gp, rp] {
            if path_within(path, base) {
                let rest = path[base.len()..].trim_start_matches('/');
                return Some((rp, rest));
            }
        }
        None
    }
}

/// What a picoprocess may reach.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    pub grants: Vec<Grant>,
    pub limits: Limits,
    /// Devices granted (the hypervisor host only; names are unique).
    pub devices: Vec<DeviceSpec>,
    /// `file:` prefixes remapped by the `remap` layer (see [`remap`]).
    pub remaps: Vec<remap::Remap>,
    /// Each mapping's host target as a directory to resolve beneath (its
    /// symlinks resolved now, as a grant's are): see [`Policy::resolve_in`].
    pub remap_roots: Vec<Grant>,
}

/// Why a URI was refused, for the one-line report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub uri: String,
    pub wanted_write: bool,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let how = if self.wanted_write {
            "--allow"
        } else {
            "--allow-ro"
        };
        write!(
            f,
            "`{}` is not granted{}; grant it with `{how} {}`",
            self.uri,
            if self.wanted_write {
                " for writing"
            } else {
                ""
            },
            self.uri
        )
    }
}

impl Policy {
    pub fn from_manifest(m: &Manifest) -> Result<Policy, PolicyError> {
        let mut p = Policy {
            grants: Vec::new(),
            limits: m.limits,
            devices: Vec::new(),
            remaps: remap::check_all(&m.remaps)?,
            remap_roots: Vec::new(),
        };
        for r in &p.remaps {
            p.remap_roots
                .push(Grant::new(&format!("file:{}", r.host), Access::Ro)?);
        }
        for g in &m.grants {
            p.grants.push(Grant::new(&g.uri, g.access)?);
        }
        for d in &m.devices {
            p.add_device(d.clone())?;
        }
        Ok(p)
    }

    /// Grant a device (names must be unique).
    pub fn add_device(&mut self, d: DeviceSpec) -> Result<(), PolicyError> {
        if self.devices.iter().any(|x| x.name == d.name) {
            return Err(PolicyError::Device(
                device::DeviceSpecError::DuplicateName {
                    name: d.name.clone(),
                },
            ));
        }
        self.devices.push(d);
        Ok(())
    }

    pub fn allow(&mut self, uri: &str, access: Access) -> Result<(), PolicyError> {
        self.grants.push(Grant::new(uri, access)?);
        Ok(())
    }

    /// Where a `file:` path that `grant` lets through is resolved: beneath
    /// the target of the innermost mapping it lies in, where that target
    /// lies in the grant (so neither `..` nor a symlink leaves a mapping,
    /// whether the guest named the path through it or directly), else
    /// beneath the grant. Authority is the grant's; this only narrows
    /// where the kernel resolves. A target counts only as its symlinks
    /// resolved when the policy was made (its real path), inside the
    /// grant's real path: a target that is (or sits below) a symlink out
    /// of the grant narrows nothing, and one that became a symlink since
    /// is refused when resolved (its real path is opened without
    /// following symlinks), so a mapping never widens where a path
    /// resolves.
    pub fn resolve_in<'a>(&'a self, uri: &Uri, grant: &'a Grant) -> &'a Grant {
        let (Uri::File(path), Some(gp)) = (uri, grant.path.as_deref()) else {
            return grant;
        };
        let g_real = grant.real_path.as_deref().unwrap_or(gp);
        self.remap_roots
            .iter()
            .filter(|r| {
                let (Some(rp), Some(rr)) = (r.path.as_deref(), r.real_path.as_deref()) else {
                    return false;
                };
                use moat_pal::uri::path_within;
                (path_within(path, rp) || path_within(path, rr)) && path_within(rr, g_real)
            })
            .max_by_key(|r| r.real_path.as_ref().map_or(0, |p| p.len()))
            .unwrap_or(grant)
    }

    /// The grant that lets `uri` be used (`write`: with write access).
    /// Console streams and `null:` are always granted.
    pub fn check(&self, uri: &Uri, write: bool) -> Result<Option<&Grant>, Refusal> {
        if matches!(uri, Uri::Stdin | Uri::Stdout | Uri::Stderr | Uri::Null) {
            return Ok(None);
        }
        let mut best: Option<&Grant> = None;
        for g in self.grants.iter().filter(|g| g.covers(uri)) {
            if write && g.access != Access::Rw {
                continue;
            }
            // The most specific grant wins (its base is what file opens resolve beneath).
            if best.is_none_or(|b| g.prefix.len() > b.prefix.len()) {
                best = Some(g);
            }
        }
        best.map(Some).ok_or_else(|| Refusal {
            uri: uri.canonical(),
            wanted_write: write,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_unknown_key_named() {
        let e = Manifest::parse("imag = \"x\"\n", "m.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("imag"), "{e}");
        let e = Manifest::parse("[limits]\nmemory = 3\n", "m.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("memory"), "{e}");
    }

    #[test]
    fn manifest_full() {
        let m = Manifest::parse(
            "image = \"hello\"\n[limits]\nthreads = 4\n[[grant]]\nuri = \"file:/tmp\"\naccess = \"rw\"\n",
            "m",
        )
        .unwrap();
        assert_eq!(m.limits.threads, 4);
        assert_eq!(m.limits.handles, 1024);
        let p = Policy::from_manifest(&m).unwrap();
        assert!(p.check(&Uri::parse("file:/tmp/a").unwrap(), true).is_ok());
        assert!(Manifest::parse("[limits]\nthreads = 0\n", "m").is_err());
    }

    #[test]
    fn checks() {
        let mut p = Policy::default();
        p.allow("file:/srv/ro", Access::Ro).unwrap();
        p.allow("file:/srv/ro/rw", Access::Rw).unwrap();
        p.allow("tcp:127.0.0.1:", Access::Rw).unwrap();
        let u = |s| Uri::parse(s).unwrap();
        assert!(p.check(&u("file:/srv/ro/x"), false).is_ok());
        assert!(p.check(&u("file:/srv/ro/x"), true).is_err());
        assert!(p.check(&u("file:/srv/ro/rw/x"), true).is_ok());
        assert!(p.check(&u("file:/srv/rox"), false).is_err());
        assert!(p.check(&u("file:/etc/passwd"), false).is_err());
        assert!(p.check(&u("tcp.client:127.0.0.1:80"), false).is_ok());
        assert!(p.check(&u("tcp.server:127.0.0.1:80"), false).is_err());
        assert!(p.check(&u("stdout:"), true).is_ok());
        // Exact grants are exact: no name or port extends them.
        let mut q = Policy::default();
        q.allow("pipe.server:svc", Access::Rw).unwrap();
        q.allow("tcp.server:127.0.0.1:80", Access::Rw).unwrap();
        assert!(q.check(&u("pipe.server:svc"), true).is_ok());
        assert!(q.check(&u("pipe.server:svc2"), true).is_err());
        assert!(q.check(&u("tcp.server:127.0.0.1:80"), true).is_ok());
        assert!(q.check(&u("tcp.server:127.0.0.1:8080"), true).is_err());
        // Sections: exact names, or every name with `shm:`; read-only
        // grants open (and map) read-only.
        q.allow("shm:ring", Access::Ro).unwrap();
        assert!(q.check(&u("shm:ring"), false).is_ok());
        assert!(q.check(&u("shm:ring"), true).is_err());
        assert!(q.check(&u("shm:ring2"), false).is_err());
        q.allow("shm:", Access::Rw).unwrap();
        assert!(q.check(&u("shm:ring2"), true).is_ok());
        let r = p.check(&u("file:/etc/passwd"), false).unwrap_err();
        assert!(r.to_string().contains("--allow-ro file:/etc/passwd"));
        assert!(Grant::new("file:rel", Access::Ro).is_err());
        assert!(Grant::new("http:x", Access::Ro).is_err());
    }
}
