//! Manifests and device declarations, the policy's text inputs: a
//! manifest ([`Manifest::parse`], TOML) and the policy made from it
//! ([`Policy::from_manifest`]), and `--device NAME=KIND[:ARG]` lines
//! ([`DeviceSpec::parse`]).
//!
//! The checks: nothing panics; an accepted manifest serializes to TOML
//! that parses back to the same manifest, and to postcard (how the monitor
//! sends limits and devices to a loader or VMM in its `Config`) that
//! decodes to the same values; the policy made from it lets each grant's
//! own URI through; an accepted device line prints back (`Display`) to a
//! line that parses to the same declaration, and the manifest form of a
//! declaration converts back to it.
//!
//! The whole input is the manifest text; each of its lines is also tried
//! as a device declaration.
use moat_host_common::protocol::Config;
use moat_pal::uri::Uri;
use moat_policy::device::{check_unique_names, ManifestDevice};
use moat_policy::{DeviceSpec, Manifest, Policy};

/// Most lines tried as device declarations.
const MAX_LINES: usize = 32;

fn device(line: &str) {
    let Ok(d) = DeviceSpec::parse(line) else {
        return;
    };
    let printed = d.to_string();
    assert_eq!(
        DeviceSpec::parse(&printed).as_ref(),
        Ok(&d),
        "{line:?} parsed, printed as {printed:?}, which parses otherwise"
    );
    let m = ManifestDevice::from(d.clone());
    assert_eq!(DeviceSpec::try_from(m.clone()).as_ref(), Ok(&d), "{m:?}");
    let wire = postcard::to_allocvec(&d).unwrap();
    assert_eq!(postcard::from_bytes::<DeviceSpec>(&wire).unwrap(), d);
}

fn manifest(text: &str) {
    let m = match Manifest::parse(text, "fuzz.toml") {
        Ok(m) => m,
        Err(e) => {
            std::hint::black_box(e.to_string());
            return;
        }
    };
    let again = toml::to_string(&m).unwrap_or_else(|e| panic!("{m:?} does not serialize: {e}"));
    match Manifest::parse(&again, "again.toml") {
        Ok(m2) => assert_eq!(m2, m, "the manifest changed through TOML:\n{again}"),
        Err(e) => panic!("{m:?} serialized as\n{again}\nwhich does not parse: {e}"),
    }
    assert!(check_unique_names(&m.devices).is_ok() || Policy::from_manifest(&m).is_err());
    // What the monitor sends a loader or VMM, through postcard.
    let config = Config {
        args: m.args.clone().unwrap_or_default(),
        limits: m.limits,
        trace: false,
        trace_ring: None,
        layers: Vec::new(),
        remaps: Vec::new(),
        devices: m.devices.clone(),
        device_files: m.devices.iter().map(|d| d.backing.is_some()).collect(),
        stats: false,
        checkpoint: false,
        restore: false,
        template: false,
    };
    let wire = postcard::to_allocvec(&config).unwrap();
    let back: Config = postcard::from_bytes(&wire).unwrap();
    assert_eq!(
        format!("{back:?}"),
        format!("{config:?}"),
        "Config through postcard"
    );
    let Ok(p) = Policy::from_manifest(&m) else {
        return;
    };
    assert_eq!(p.limits, m.limits);
    for g in &m.grants {
        let Ok(u) = Uri::parse_bytes(g.uri.as_bytes()) else {
            continue;
        };
        // The URI parses as a whole (a grant is a prefix, which need not).
        assert!(
            p.check(&u, false).is_ok(),
            "the grant {:?} does not cover its own URI {u:?}",
            g.uri
        );
    }
}

/// Run one input: the manifest, then each line as a device declaration.
pub fn run(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    manifest(&text);
    for line in text.lines().take(MAX_LINES) {
        device(line);
    }
}
