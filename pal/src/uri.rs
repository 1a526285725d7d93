//! Stream URI parsing, shared by every host and by the policy checks.
//!
//! A URI is `scheme:rest`. Parsing is strict: unknown schemes, empty or
//! oversized parts, NUL bytes, relative paths and `..` components are all
//! refused with [`Error::InvalidUri`], so a policy check never sees a path
//! that could mean two things.
use crate::{limits, Error, PalResult};
use alloc::string::String;
use core::net::SocketAddr;

/// A parsed stream URI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Uri {
    /// `file:/abs/path`, normalised: no `.`/`..` components, no `//`, no
    /// trailing `/` (except for `/` itself).
    File(String),
    Null,
    Stdin,
    Stdout,
    Stderr,
    PipeServer(String),
    PipeClient(String),
    TcpClient(SocketAddr),
    TcpServer(SocketAddr),
    Dns(String),
    Dev(String),
    /// `shm:NAME` a shared section of the session (ABI 1.1).
    Shm(String),
}

impl Uri {
    /// Parse raw URI bytes as given to an ABI call.
    pub fn parse_bytes(b: &[u8]) -> PalResult<Uri> {
        if b.is_empty() || b.len() as u64 > limits::MAX_URI_LEN {
            return Err(Error::InvalidArgument);
        }
        let s = core::str::from_utf8(b).map_err(|_| Error::InvalidUri)?;
        Uri::parse(s)
    }

    pub fn parse(s: &str) -> PalResult<Uri> {
        if s.bytes().any(|c| c == 0) {
            return Err(Error::InvalidUri);
        }
        let (scheme, rest) = s.split_once(':').ok_or(Error::InvalidUri)?;
        let empty = |u: Uri| {
            if rest.is_empty() {
                Ok(u)
            } else {
                Err(Error::InvalidUri)
            }
        };
        match scheme {
            "file" => Ok(Uri::File(normalize_path(rest)?)),
            "null" => empty(Uri::Null),
            "stdin" => empty(Uri::Stdin),
            "stdout" => empty(Uri::Stdout),
            "stderr" => empty(Uri::Stderr),
            "pipe.server" => Ok(Uri::PipeServer(check_name(rest)?)),
            "pipe.client" => Ok(Uri::PipeClient(check_name(rest)?)),
            "tcp" | "tcp.client" => Ok(Uri::TcpClient(parse_addr(rest)?)),
            "tcp.server" => Ok(Uri::TcpServer(parse_addr(rest)?)),
            "dns" => Ok(Uri::Dns(check_host(rest)?)),
            "dev" => Ok(Uri::Dev(check_name(rest)?)),
            "shm" => Ok(Uri::Shm(check_name(rest)?)),
            _ => Err(Error::InvalidUri),
        }
    }

    /// The canonical text form (what policies are matched against).
    pub fn canonical(&self) -> String {
        use alloc::format;
        match self {
            Uri::File(p) => format!("file:{p}"),
            Uri::Null => "null:".into(),
            Uri::Stdin => "stdin:".into(),
            Uri::Stdout => "stdout:".into(),
            Uri::Stderr => "stderr:".into(),
            Uri::PipeServer(n) => format!("pipe.server:{n}"),
            Uri::PipeClient(n) => format!("pipe.client:{n}"),
            Uri::TcpClient(a) => format!("tcp.client:{a}"),
            Uri::TcpServer(a) => format!("tcp.server:{a}"),
            Uri::Dns(n) => format!("dns:{n}"),
            Uri::Dev(n) => format!("dev:{n}"),
            Uri::Shm(n) => format!("shm:{n}"),
        }
    }

    pub fn scheme(&self) -> &'static str {
        match self {
            Uri::File(_) => "file",
            Uri::Null => "null",
            Uri::Stdin => "stdin",
            Uri::Stdout => "stdout",
            Uri::Stderr => "stderr",
            Uri::PipeServer(_) => "pipe.server",
            Uri::PipeClient(_) => "pipe.client",
            Uri::TcpClient(_) => "tcp.client",
            Uri::TcpServer(_) => "tcp.server",
            Uri::Dns(_) => "dns",
            Uri::Dev(_) => "dev",
            Uri::Shm(_) => "shm",
        }
    }
}

/// Normalise an absolute path: refuse relative paths and `..`; drop `.`
/// components and repeated slashes.
pub fn normalize_path(p: &str) -> PalResult<String> {
    if !p.starts_with('/') {
        return Err(Error::InvalidUri);
    }
    let mut out = String::with_capacity(p.len());
    for comp in p.split('/') {
        match comp {
            "" | "." => continue,
            ".." => return Err(Error::InvalidUri),
            c => {
                out.push('/');
                out.push_str(c);
            }
        }
    }
    if out.is_empty() {
        out.push('/');
    }
    Ok(out)
}

/// Whether `path` is `prefix` or lies below it (component-wise).
pub fn path_within(path: &str, prefix: &str) -> bool {
    if prefix == "/" {
        return path.starts_with('/');
    }
    path == prefix || (path.starts_with(prefix) && path.as_bytes().get(prefix.len()) == Some(&b'/'))
}

fn check_name(n: &str) -> PalResult<String> {
    if n.is_empty()
        || n.len() > 64
        || !n
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
    {
        return Err(Error::InvalidUri);
    }
    Ok(n.into())
}

fn check_host(n: &str) -> PalResult<String> {
    if n.is_empty()
        || n.len() > 253
        || !n
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'-'))
    {
        return Err(Error::InvalidUri);
    }
    Ok(n.into())
}

fn parse_addr(s: &str) -> PalResult<SocketAddr> {
    s.parse::<SocketAddr>().map_err(|_| Error::InvalidUri)
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn files() {
        assert_eq!(
            Uri::parse("file:/a//b/./c/").unwrap(),
            Uri::File("/a/b/c".into())
        );
        assert_eq!(Uri::parse("file:/").unwrap(), Uri::File("/".into()));
        assert_eq!(Uri::parse("file:/a/../b"), Err(Error::InvalidUri));
        assert_eq!(Uri::parse("file:a/b"), Err(Error::InvalidUri));
        assert_eq!(Uri::parse("file:"), Err(Error::InvalidUri));
        assert_eq!(Uri::parse("file:/a\0b"), Err(Error::InvalidUri));
    }
    #[test]
    fn others() {
        assert_eq!(Uri::parse("null:").unwrap(), Uri::Null);
        assert_eq!(Uri::parse("null:x"), Err(Error::InvalidUri));
        assert_eq!(Uri::parse("http://x"), Err(Error::InvalidUri));
        assert_eq!(Uri::parse("nothing"), Err(Error::InvalidUri));
        assert!(matches!(
            Uri::parse("tcp:127.0.0.1:80").unwrap(),
            Uri::TcpClient(_)
        ));
        assert!(matches!(
            Uri::parse("tcp.server:[::1]:80").unwrap(),
            Uri::TcpServer(_)
        ));
        assert_eq!(
            Uri::parse("tcp.client:localhost:80"),
            Err(Error::InvalidUri)
        );
        assert_eq!(Uri::parse("pipe.server:a/b"), Err(Error::InvalidUri));
        assert_eq!(
            Uri::parse("pipe.client:ok-1.x").unwrap(),
            Uri::PipeClient("ok-1.x".into())
        );
        assert_eq!(Uri::parse("shm:ring-0").unwrap(), Uri::Shm("ring-0".into()));
        assert_eq!(Uri::parse("shm:"), Err(Error::InvalidUri));
        assert_eq!(Uri::parse("shm:a/b"), Err(Error::InvalidUri));
        assert_eq!(
            Uri::parse(&alloc::format!("shm:{}", "x".repeat(65))),
            Err(Error::InvalidUri)
        );
        assert_eq!(Uri::parse("shm:r").unwrap().canonical(), "shm:r");
        assert_eq!(
            Uri::parse("tcp:127.0.0.1:80").unwrap().canonical(),
            "tcp.client:127.0.0.1:80"
        );
    }
    #[test]
    fn within() {
        assert!(path_within("/a/b", "/a"));
        assert!(path_within("/a", "/a"));
        assert!(!path_within("/ab", "/a"));
        assert!(path_within("/x", "/"));
    }
}
