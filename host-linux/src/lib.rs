//! moat's Linux host.
//!
//! - [`Sandbox`] / [`Picoprocess`]: the embedding API (what the `moat` CLI
//!   uses): start a picoprocess image under a [`Policy`](moat_policy::Policy),
//!   feed its console, wait for its [`Exit`].
//! - [`monitor`], [`broker`], [`spawn`]: the host side. The monitor starts
//!   the sandboxed loader ([`spawn`]), then answers its requests with the
//!   policy as the only authority ([`broker`]).
//! - [`loader`]: the sandboxed process (binary `moat-loader`) that maps the
//!   image and implements the ABI in-process; [`protocol`] is the wire
//!   between the two; [`elf`] checks images.
pub mod broker;
pub mod disklock;
pub mod elf;
pub mod loader;
pub mod monitor;
pub mod protocol;
pub mod spawn;
pub(crate) mod zygote;

pub use broker::LogSink;
pub use monitor::{
    Error, Exit, Killer, Picoprocess, Sandbox, Stdio, EXIT_BAD_INPUT, EXIT_HOST_FAILURE,
    EXIT_SANDBOX_VIOLATION,
};
pub use protocol::ReportKind;

/// Where a picoprocess runs. The same image, policy and console work on
/// both; only [`Host::Kvm`] can be granted devices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum Host {
    /// A confined Linux process (`moat-loader`): seccomp, Landlock,
    /// namespaces, rlimits.
    #[default]
    Linux,
    /// A KVM micro-VM with no guest kernel (`moat-vmm`, from
    /// moat-host-hypervisor): every ABI call is a hypercall.
    Kvm,
}

impl Host {
    pub fn name(self) -> &'static str {
        match self {
            Host::Linux => "linux",
            Host::Kvm => "kvm",
        }
    }
}

impl std::str::FromStr for Host {
    type Err = String;
    fn from_str(s: &str) -> Result<Host, String> {
        match s {
            "linux" => Ok(Host::Linux),
            "kvm" => Ok(Host::Kvm),
            other => Err(format!(
                "unknown host `{other}`; the hosts are `linux` and `kvm`"
            )),
        }
    }
}
