//! The remap layer (`layers/src/remap.rs`, mappings in the manifest's
//! `[[remap]]`): the guest names `file:/data`, the host opens the mapped
//! target, on both hosts alike; grants are checked on the host side; no
//! guest path leaves a mapping (`..`, symlinks, encodings); read-only
//! mappings refuse writes; the conformance suite passes with its scratch
//! directory reached through a mapping.
use moat_tests::*;
use std::path::Path;

struct World {
    dir: tempfile::TempDir,
}

impl World {
    /// `tenant/data/f` ("hello"), `tenant/secret/s` ("topsecret"),
    /// `tenant/data/link` -> `../secret`, `tenant/data/abs` -> the secret
    /// directory by absolute path.
    fn new() -> World {
        let dir = tempfile::tempdir().unwrap();
        let t = dir.path().join("tenant");
        std::fs::create_dir_all(t.join("data")).unwrap();
        std::fs::create_dir_all(t.join("secret")).unwrap();
        std::fs::write(t.join("data/f"), "hello").unwrap();
        std::fs::write(t.join("secret/s"), "topsecret").unwrap();
        std::os::unix::fs::symlink("../secret", t.join("data/link")).unwrap();
        std::os::unix::fs::symlink(t.join("secret"), t.join("data/abs")).unwrap();
        World { dir }
    }

    fn path(&self, rel: &str) -> String {
        self.dir.path().join(rel).display().to_string()
    }

    /// A manifest granting `grant` (read-write) with these mappings.
    fn manifest(&self, grant: &str, remaps: &[(&str, &str, bool)]) -> String {
        let mut m = format!(
            "[[grant]]\nuri = \"file:{}\"\naccess = \"rw\"\n",
            self.path(grant)
        );
        for (g, h, ro) in remaps {
            m += &format!(
                "[[remap]]\nguest = \"{g}\"\nhost = \"file:{}\"\nread_only = {ro}\n",
                self.path(h)
            );
        }
        let p = self.dir.path().join("m.toml");
        std::fs::write(&p, m).unwrap();
        p.display().to_string()
    }
}

/// `files OP ARGS...` on `host` under `manifest`: its one result line.
fn files(host: &str, manifest: &str, args: &[&str]) -> String {
    let img = image("files");
    let mut a = vec![
        "run",
        "--host",
        host,
        "--manifest",
        manifest,
        img.to_str().unwrap(),
        "--",
    ];
    a.extend_from_slice(args);
    let out = moat(&a);
    out.assert_code(0);
    out.stdout.trim().to_string()
}

#[test]
fn mapped_paths_reach_the_target_and_nothing_else() {
    if !sandbox_available() {
        return;
    }
    let w = World::new();
    // The grant is wider than the mapping: what keeps the guest inside is
    // the mapping (resolved beneath its target), not a narrow grant.
    let m = w.manifest(
        "tenant",
        &[
            ("file:/data", "tenant/data", false),
            ("file:/ro", "tenant/data", true),
        ],
    );
    for h in hosts() {
        let f = |args: &[&str]| files(h, &m, args);
        assert_eq!(f(&["read", "file:/data/f"]), "ok hello", "{h}");
        assert_eq!(f(&["read", "file:/data//./f"]), "ok hello", "{h}");
        assert_eq!(f(&["stat", "file:/data/f"]), "ok 5", "{h}");
        assert_eq!(f(&["list", "file:/data"]), "ok abs,f,link", "{h}");
        // Climbing out: `..` is refused by the URI rules, symlinks (relative
        // and absolute) by resolution beneath the mapping's target, and
        // encodings are names, not paths.
        assert_eq!(
            f(&["read", "file:/data/../secret/s"]),
            "error InvalidUri",
            "{h}"
        );
        assert_eq!(
            f(&["read", "file:/data/link/s"]),
            "error PermissionDenied",
            "{h}"
        );
        assert_eq!(
            f(&["read", "file:/data/abs/s"]),
            "error PermissionDenied",
            "{h}"
        );
        assert_eq!(
            f(&["read", "file:/data/%2e%2e/secret/s"]),
            "error NotFound",
            "{h}"
        );
        assert_eq!(
            f(&["read", "file:/data/..%2fsecret/s"]),
            "error NotFound",
            "{h}"
        );
        // Whole components: /datax is not under /data (and not granted).
        assert_eq!(f(&["read", "file:/datax"]), "error PermissionDenied", "{h}");
        // Writes land in the target.
        assert_eq!(f(&["write", "file:/data/new", "abc"]), "ok", "{h}");
        assert_eq!(
            std::fs::read_to_string(w.path("tenant/data/new")).unwrap(),
            "abc"
        );
        assert_eq!(
            f(&["rename", "file:/data/new", "file:/data/renamed"]),
            "ok",
            "{h}"
        );
        assert!(Path::new(&w.path("tenant/data/renamed")).exists());
        std::fs::remove_file(w.path("tenant/data/renamed")).unwrap();
        // A read-only mapping of the same target: reads, no writes.
        assert_eq!(f(&["read", "file:/ro/f"]), "ok hello", "{h}");
        assert_eq!(
            f(&["write", "file:/ro/x", "y"]),
            "error PermissionDenied",
            "{h}"
        );
        assert_eq!(
            f(&["rename", "file:/data/f", "file:/ro/f2"]),
            "error PermissionDenied",
            "{h}"
        );
        assert!(!Path::new(&w.path("tenant/data/x")).exists());
        assert!(!Path::new(&w.path("tenant/data/f2")).exists());
        // Nor through a handle opened by it: no delete, no rename out.
        assert_eq!(
            f(&["delete", "file:/ro/f"]),
            "error PermissionDenied",
            "{h}"
        );
        assert_eq!(
            f(&["rename", "file:/ro/f", "file:/data/f3"]),
            "error PermissionDenied",
            "{h}"
        );
        assert!(Path::new(&w.path("tenant/data/f")).exists());
        // The same file through the writable mapping can go.
        std::fs::copy(w.path("tenant/data/f"), w.path("tenant/data/g")).unwrap();
        assert_eq!(f(&["delete", "file:/data/g"]), "ok", "{h}");
        assert!(!Path::new(&w.path("tenant/data/g")).exists());
        // A child's image through a mapping.
        std::fs::copy(image("exit-code"), w.path("tenant/data/child")).unwrap();
        // (exit-code without arguments exits 3)
        assert_eq!(f(&["run", "file:/ro/child"]), "ok 3", "{h}");
        std::fs::remove_file(w.path("tenant/data/child")).unwrap();
    }
}

/// A mapping whose target is a symlink out of the grant narrows nothing:
/// the path resolves beneath the grant, which refuses the way out.
#[test]
fn a_mapping_onto_a_symlink_out_of_the_grant_widens_nothing() {
    if !sandbox_available() {
        return;
    }
    let w = World::new();
    std::fs::create_dir_all(w.path("outside")).unwrap();
    std::fs::write(w.path("outside/o"), "out").unwrap();
    std::os::unix::fs::symlink(w.path("outside"), w.path("tenant/evil")).unwrap();
    let m = w.manifest("tenant", &[("file:/evil", "tenant/evil", false)]);
    for h in hosts() {
        assert_eq!(
            files(h, &m, &["read", "file:/evil/o"]),
            "error PermissionDenied",
            "{h}"
        );
    }
}

#[test]
fn a_mapping_grants_nothing() {
    if !sandbox_available() {
        return;
    }
    let w = World::new();
    // Granted: tenant/data only. Mapped: the secret directory.
    let m = w.manifest("tenant/data", &[("file:/s", "tenant/secret", false)]);
    for h in hosts() {
        let out = moat(&[
            "run",
            "--host",
            h,
            "--manifest",
            &m,
            image("files").to_str().unwrap(),
            "--",
            "read",
            "file:/s/s",
        ]);
        out.assert_code(0);
        assert_eq!(out.stdout.trim(), "error PermissionDenied", "{h}");
        // The refusal names the host-side URI: that is what to grant.
        assert!(
            out.stderr
                .contains(&format!("refused file:{}", w.path("tenant/secret/s"))),
            "{h}: {}",
            out.stderr
        );
    }
}

#[test]
fn bad_mappings_are_bad_input() {
    let d = tempfile::tempdir().unwrap();
    for (body, want) in [
        (
            "guest = \"file:/a/../b\"\nhost = \"file:/x\"",
            "remap `file:/a/../b`",
        ),
        (
            "guest = \"tcp.client:1.2.3.4:5\"\nhost = \"file:/x\"",
            "not a `file:` URI",
        ),
        ("guest = \"file:/a\"\nhst = \"file:/x\"", "unknown field"),
    ] {
        let p = d.path().join("m.toml");
        std::fs::write(&p, format!("[[remap]]\n{body}\n")).unwrap();
        let out = moat(&["run", "--manifest", p.to_str().unwrap(), "hello"]);
        out.assert_code(2);
        assert!(out.stderr.contains(want), "{body}: {}", out.stderr);
    }
}

/// The conformance suite, told to use `file:/scratch`, which a mapping
/// sends to a real temporary directory: every file case (open, create,
/// rename, delete, enumerate, map, attributes, child images) through the
/// layer, on both hosts, alone and under the other layers.
#[test]
fn conformance_passes_through_a_mapping() {
    if !sandbox_available() {
        return;
    }
    for h in hosts() {
        for stack in ["remap", "count,remap,trace"] {
            let scratch = tempfile::tempdir().unwrap();
            let s = file_uri(scratch.path());
            let m = scratch.path().join("..").join(format!(
                "remap-{}.toml",
                scratch.path().file_name().unwrap().to_string_lossy()
            ));
            std::fs::write(
                &m,
                format!("[[remap]]\nguest = \"file:/scratch\"\nhost = \"{s}\"\n"),
            )
            .unwrap();
            conformance_in(
                h,
                &["--manifest", m.to_str().unwrap(), "--layer", stack],
                &[],
                &s,
                "file:/scratch",
            );
            std::fs::remove_file(&m).unwrap();
        }
    }
}
