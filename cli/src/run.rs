//! `moat run`: run one picoprocess image in the sandbox.
use crate::bad_input;
use clap::{Args, ValueEnum};
use moat_monitor::{Sandbox, EXIT_HOST_FAILURE};
use moat_policy::{Access, Manifest, Policy};
use std::path::{Path, PathBuf};

const EXIT_CODES: &str = "\
Exit codes:
  N        the picoprocess's own exit code (0 to 255)
  2        bad input: missing or malformed image, manifest or argument
  125      moat failed to start the sandbox
  128+N    the picoprocess was killed by signal N, or ended on an exception
           no handler took (the report on standard error says which)
  159      sandbox violation: the picoprocess made a system call outside the
           allow-list (the report on standard error names it)

Devices (--host kvm only): `--device com1=uart` grants a 16550 UART wired
to the console; `--device blk0=virtio-blk:disk.img` a virtio-mmio disk
backed by disk.img (which must exist). The picoprocess opens them as
`dev:com1`, `dev:blk0`; nothing else is mapped.

Grants: nothing is reachable but the console (stdin:, stdout:, stderr:) and
null: unless granted. `--allow-ro file:/srv/data` grants reading everything
below /srv/data; `--allow` also grants writing, creating, renaming and
deleting there; `--allow tcp.client:127.0.0.1:` grants connecting to every
port of that address. A refused open prints the grant that would allow it.";

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Host {
    /// A Linux process confined by namespaces, rlimits, Landlock and seccomp.
    Linux,
    /// A KVM micro-VM (the only host that grants devices).
    Kvm,
}

#[derive(Args, Debug)]
#[command(after_help = EXIT_CODES)]
pub struct RunArgs {
    /// The host to run on.
    #[arg(long, value_enum, default_value_t = Host::Linux)]
    pub host: Host,
    /// A manifest (TOML) with grants, limits, and optionally image and args.
    #[arg(long, value_name = "FILE")]
    pub manifest: Option<PathBuf>,
    /// Grant reading and writing below URI_PREFIX (repeatable):
    /// file:/dir, pipe.server:NAME, tcp.client:HOST:, shm:NAME (a shared
    /// section), shm: (every one), ...
    #[arg(long, value_name = "URI_PREFIX")]
    pub allow: Vec<String>,
    /// Grant reading below URI_PREFIX (repeatable); a shared section
    /// granted so opens and maps read-only.
    #[arg(long = "allow-ro", value_name = "URI_PREFIX")]
    pub allow_ro: Vec<String>,
    /// Grant a device (kvm only, repeatable): NAME=uart (a 16550 UART wired
    /// to the console) or NAME=virtio-blk:FILE (a virtio-mmio disk backed
    /// by FILE).
    #[arg(long = "device", value_name = "NAME=KIND[:ARG]")]
    pub devices: Vec<String>,
    /// Trace every ABI call (a trace layer outermost, records in a ring
    /// the monitor drains) and every brokered request: decoded lines on
    /// standard error, or with FILE saved for `moat trace FILE`.
    /// `lossless`: the guest waits for the reader instead of records being
    /// dropped (and counted). `--trace=lossless,FILE` for both.
    #[arg(long, value_name = "lossless|FILE", num_args = 0..=1, require_equals = true, default_missing_value = "")]
    pub trace: Option<String>,
    /// Trace only these calls: names (DkStreamOpen) and groups (memory,
    /// threads, sync, process, streams, other), comma-separated.
    #[arg(long = "trace-filter", value_name = "CALLS")]
    pub trace_filter: Option<String>,
    /// The trace ring's size in records (a power of two, 64 to 1048576;
    /// 256 bytes each; default 16384).
    #[arg(long = "trace-ring", value_name = "RECORDS")]
    pub trace_ring: Option<u64>,
    /// Stack layers between the picoprocess and the PAL, outermost first
    /// (comma-separated, on either host): `trace` (a line per call),
    /// `count` (calls counted by name, one line at the end), `remap` (the
    /// manifest's `[[remap]]` mappings; added innermost when there are any).
    #[arg(long = "layer", value_name = "NAME[,NAME...]")]
    pub layer: Option<String>,
    /// Make the picoprocess checkpointable: `moat checkpoint <this moat's
    /// pid> FILE` freezes it and writes it to FILE (`moat restore FILE`
    /// resumes it, on either host).
    #[arg(long)]
    pub checkpointable: bool,
    /// Take a template: the picoprocess is checkpointed to FILE at its
    /// first stream open other than its console (before that open is
    /// made) and goes on. `moat restore FILE` starts from there, as often
    /// as wanted, with its own grants (the open is made under them), its
    /// memory mapped copy-on-write from FILE. Written beside FILE and
    /// renamed once whole; a picoprocess that never opens a stream leaves
    /// no FILE.
    #[arg(long, value_name = "FILE")]
    pub template: Option<PathBuf>,
    /// IMAGE is a checkpoint to restore (`moat restore`).
    #[arg(skip)]
    pub restore: bool,
    /// The image: a path, or the name of a built image (see `moat images`).
    #[arg(value_name = "IMAGE")]
    pub image: Option<String>,
    /// Arguments for the picoprocess (after `--`, or after IMAGE).
    #[arg(
        value_name = "ARGS",
        trailing_var_arg = true,
        allow_hyphen_values = true
    )]
    pub args: Vec<String>,
}

/// Turn the command line into a sandbox to start, or a bad-input message.
fn prepare(a: RunArgs) -> Result<Sandbox, String> {
    let manifest = match &a.manifest {
        Some(p) => Some(Manifest::load(p).map_err(|e| e.to_string())?),
        None => None,
    };
    let mut policy = Policy::default();
    let mut image = a.image.clone();
    let mut args = a.args.clone();
    if let (Some(m), Some(mpath)) = (&manifest, &a.manifest) {
        policy = Policy::from_manifest(m).map_err(|e| e.to_string())?;
        // A relative backing file is relative to the manifest too.
        for d in &mut policy.devices {
            if let Some(b) = &d.backing {
                if b.is_relative() {
                    d.backing = Some(mpath.parent().unwrap_or(Path::new(".")).join(b));
                }
            }
        }
        if image.is_none() {
            // A relative path in the manifest is relative to the manifest.
            image = m.image.as_ref().map(|i| {
                if i.contains('/') && !i.starts_with('/') {
                    let base = mpath.parent().unwrap_or(Path::new("."));
                    base.join(i).display().to_string()
                } else {
                    i.clone()
                }
            });
        }
        if args.is_empty() {
            args = m.args.clone().unwrap_or_default();
        }
    }
    for g in &a.allow {
        policy.allow(g, Access::Rw).map_err(|e| e.to_string())?;
    }
    for g in &a.allow_ro {
        policy.allow(g, Access::Ro).map_err(|e| e.to_string())?;
    }
    for d in &a.devices {
        let spec = moat_policy::DeviceSpec::parse(d).map_err(|e| e.to_string())?;
        policy.add_device(spec).map_err(|e| e.to_string())?;
    }
    if let (Host::Linux, Some(d)) = (a.host, policy.devices.first()) {
        return Err(format!(
            "device `{}` is declared, but only the kvm host grants devices: add --host kvm",
            d.name
        ));
    }
    let image =
        image.ok_or("no image given: `moat run IMAGE` (or `image = \"...\"` in the manifest)")?;
    let path = if a.restore {
        PathBuf::from(&image)
    } else {
        crate::resolve::resolve(&image)?
    };
    let host = match a.host {
        Host::Linux => moat_monitor::Host::Linux,
        Host::Kvm => moat_monitor::Host::Kvm,
    };
    let layers = match &a.layer {
        Some(l) => moat_layers::LayerName::parse_list(l).map_err(|e| format!("--layer: {e}"))?,
        None => Vec::new(),
    };
    let traced = a.trace.is_some() || layers.contains(&moat_layers::LayerName::Trace);
    if !traced && (a.trace_filter.is_some() || a.trace_ring.is_some()) {
        return Err("--trace-filter and --trace-ring need --trace (or a trace layer)".into());
    }
    let mut trace = moat_monitor::trace::TraceOptions::parse(a.trace.as_deref())?;
    if let Some(f) = &a.trace_filter {
        trace.filter = moat_monitor::trace::parse_filter(f)?;
    }
    if let Some(n) = a.trace_ring {
        moat_layers::ring::check_records(n).map_err(|e| format!("--trace-ring: {e}"))?;
        trace.records = n;
    }
    let mut sandbox = if a.restore {
        Sandbox::restore(path)
    } else {
        Sandbox::new(path)
    };
    if a.checkpointable {
        sandbox = sandbox.checkpointable();
    }
    if a.trace.is_some() {
        sandbox = sandbox.trace_with(trace);
    } else if traced {
        // A trace layer named in the stack: the ring's options, no layer
        // added on top.
        sandbox = sandbox.trace_ring(trace);
    }
    let mut layers = layers;
    if a.checkpointable && !layers.contains(&moat_layers::LayerName::Checkpoint) {
        layers.push(moat_layers::LayerName::Checkpoint);
    }
    Ok(sandbox.args(args).policy(policy).layers(&layers).host(host))
}

pub fn main(a: RunArgs) -> i32 {
    let checkpointable = a.checkpointable;
    let template = a.template.clone();
    let sandbox = match prepare(a) {
        Ok(s) => s,
        Err(msg) => return bad_input(msg),
    };
    let (sandbox, tmp) = match &template {
        None => (sandbox, None),
        Some(path) => match crate::control::create_beside(path) {
            Ok((tmp, file)) => (sandbox.template(file), Some(tmp)),
            Err(msg) => return bad_input(msg),
        },
    };
    let mut p = match sandbox.spawn() {
        Ok(p) => p,
        Err(e) => {
            if let Some(t) = &tmp {
                let _ = std::fs::remove_file(t);
            }
            eprintln!("moat: {e}");
            return e.exit_code();
        }
    };
    // The template comes while the picoprocess runs: kept (renamed over
    // FILE) once whole, removed otherwise.
    let keeper = tmp.zip(template).map(|(tmp, path)| {
        let ctl = p.controller();
        std::thread::spawn(move || loop {
            match ctl.template_written(std::time::Duration::from_secs(1)) {
                Ok(None) => continue,
                Ok(Some(bytes)) => match std::fs::rename(&tmp, &path) {
                    Ok(()) => {
                        eprintln!(
                            "moat: template written to {} ({bytes} bytes)",
                            path.display()
                        );
                        return;
                    }
                    Err(e) => {
                        eprintln!("moat: cannot write {}: {e}", path.display());
                        let _ = std::fs::remove_file(&tmp);
                        return;
                    }
                },
                Err(e) => {
                    eprintln!("moat: {e}");
                    let _ = std::fs::remove_file(&tmp);
                    return;
                }
            }
        })
    });
    if checkpointable {
        if let Err(e) = crate::control::listen(p.controller()) {
            eprintln!("moat: {e}");
            let _ = p.kill();
            return EXIT_HOST_FAILURE;
        }
    }
    let waited = p.wait();
    if let Some(k) = keeper {
        let _ = k.join();
    }
    match waited {
        Ok(exit) => {
            if let Some((_, text)) = &exit.report {
                eprintln!("moat: {}", text.trim_end());
            }
            exit.code
        }
        Err(e) => {
            eprintln!("moat: {e}");
            EXIT_HOST_FAILURE
        }
    }
}
