//! Remapping: the manifest's `[[remap]]` entries, which the `remap` layer
//! (moat-layers) applies to every `file:` URI the guest names, on either
//! host. A mapping is a view, not a grant: the host-side URI it produces
//! is checked against the grants like any other, so a mapping's target
//! must be granted too.
//!
//! ```toml
//! [[remap]]
//! guest = "file:/data"                 # what the guest names
//! host = "file:/srv/tenant7/data"      # what the host opens
//! read_only = true                     # optional: refuse writes, creation, renames into it
//! ```
//!
//! Both sides are `file:` URIs normalised as the PAL normalises them
//! (`moat_pal::uri`: no `..`, `.` and empty components dropped); a guest
//! path is mapped when it is the guest prefix or lies below it, component
//! by component (`/data2` is not below `/data`), by the longest guest
//! prefix that matches.
use moat_pal::uri::{path_within, Uri};
use serde::{Deserialize, Serialize};

/// The most mappings a manifest may hold (each URI a guest names is
/// compared with all of them).
pub const MAX_REMAPS: usize = 32;

/// One mapping, as written in the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemapSpec {
    pub guest: String,
    pub host: String,
    #[serde(default)]
    pub read_only: bool,
}

/// One mapping, checked: both paths normalised, without the scheme.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Remap {
    pub guest: String,
    pub host: String,
    pub read_only: bool,
}

/// Why a mapping was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RemapError {
    #[error("remap `{0}`: {1} (write an absolute `file:` URI without `..`, e.g. `file:/data`)")]
    BadUri(String, &'static str),
    #[error("remap: `{0}` is mapped twice (each guest prefix once)")]
    Duplicate(String),
    #[error("{0} remaps; at most {MAX_REMAPS}")]
    TooMany(usize),
}

fn file_path(uri: &str) -> Result<String, RemapError> {
    match Uri::parse(uri) {
        Ok(Uri::File(p)) => Ok(p),
        Ok(_) => Err(RemapError::BadUri(uri.into(), "not a `file:` URI")),
        Err(_) => Err(RemapError::BadUri(uri.into(), "not a valid URI")),
    }
}

impl Remap {
    pub fn new(s: &RemapSpec) -> Result<Remap, RemapError> {
        Ok(Remap {
            guest: file_path(&s.guest)?,
            host: file_path(&s.host)?,
            read_only: s.read_only,
        })
    }
}

/// Check a manifest's mappings.
pub fn check_all(specs: &[RemapSpec]) -> Result<Vec<Remap>, RemapError> {
    if specs.len() > MAX_REMAPS {
        return Err(RemapError::TooMany(specs.len()));
    }
    let mut out: Vec<Remap> = Vec::with_capacity(specs.len());
    for s in specs {
        let r = Remap::new(s)?;
        if out.iter().any(|o| o.guest == r.guest) {
            return Err(RemapError::Duplicate(s.guest.clone()));
        }
        out.push(r);
    }
    Ok(out)
}

/// What a mapping makes of a guest path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mapped {
    /// Under no mapping: the path as it is.
    Unmapped,
    /// The host path, and whether its mapping is read-only.
    To(String, bool),
}

/// Map a normalised guest path by the longest matching guest prefix.
pub fn map_path(remaps: &[Remap], path: &str) -> Mapped {
    let Some(r) = remaps
        .iter()
        .filter(|r| path_within(path, &r.guest))
        .max_by_key(|r| r.guest.len())
    else {
        return Mapped::Unmapped;
    };
    let rest = if r.guest == "/" {
        if path == "/" {
            ""
        } else {
            path
        }
    } else {
        &path[r.guest.len()..]
    };
    let host = match (r.host.as_str(), rest) {
        (h, "") => h.to_string(),
        ("/", rest) => rest.to_string(),
        (h, rest) => format!("{h}{rest}"),
    };
    Mapped::To(host, r.read_only)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(g: &str, h: &str) -> RemapSpec {
        RemapSpec {
            guest: g.into(),
            host: h.into(),
            read_only: false,
        }
    }

    #[test]
    fn longest_prefix_component_wise() {
        let rs = check_all(&[
            spec("file:/data", "file:/srv/t7/data"),
            spec("file:/data/cache", "file:/var/cache/t7"),
            spec("file:/", "file:/srv/t7/root"),
        ])
        .unwrap();
        let to = |p: &str| match map_path(&rs, p) {
            Mapped::To(h, _) => h,
            Mapped::Unmapped => "-".into(),
        };
        assert_eq!(to("/data"), "/srv/t7/data");
        assert_eq!(to("/data/a/b"), "/srv/t7/data/a/b");
        assert_eq!(to("/data/cache/x"), "/var/cache/t7/x");
        assert_eq!(to("/data2/x"), "/srv/t7/root/data2/x");
        assert_eq!(to("/"), "/srv/t7/root");
        let only = check_all(&[spec("file:/data", "file:/")]).unwrap();
        assert_eq!(map_path(&only, "/data/x"), Mapped::To("/x".into(), false));
        assert_eq!(map_path(&only, "/datax"), Mapped::Unmapped);
    }

    #[test]
    fn bad_mappings_say_what_is_wrong() {
        for (g, h) in [
            ("file:/a/../b", "file:/x"),
            ("file:a", "file:/x"),
            ("tcp.client:1.2.3.4:5", "file:/x"),
            ("file:/a", "pipe.client:x"),
        ] {
            let e = check_all(&[spec(g, h)]).unwrap_err().to_string();
            assert!(e.contains("remap `"), "{e}");
        }
        let e = check_all(&[spec("file:/a/", "file:/x"), spec("file:/a", "file:/y")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("twice"), "{e}");
        assert!(check_all(&vec![spec("file:/a", "file:/b"); 33]).is_err());
        // Normalised as the PAL normalises.
        let r = check_all(&[spec("file://a/./b/", "file:/x//y")]).unwrap();
        assert_eq!((r[0].guest.as_str(), r[0].host.as_str()), ("/a/b", "/x/y"));
    }
}
