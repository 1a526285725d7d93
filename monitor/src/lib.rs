//! moat's trusted side, and the API to embed it.
//!
//! - [`Sandbox`] / [`Picoprocess`]: the embedding API (what the `moat` CLI,
//!   the mediator and the benchmarks use): start a picoprocess image under
//!   a [`Policy`](moat_policy::Policy) on a [`Host`], feed its console,
//!   wait for its [`Exit`].
//! - [`api`]: that API ([`error`]: its errors and exits);
//!   [`session`]: what one picoprocess tree shares; [`shm`]: shared
//!   sections (`shm:NAME`), and [`HostSection`], the
//!   host's side of one.
//! - [`monitor`]: one thread per confined process, answering its requests;
//!   [`broker`] decides each request with the policy as the only
//!   authority, and answers with descriptors.
//! - [`launch`]: starting a loader (`moat-loader`) or a VMM (`moat-vmm`),
//!   from a zygote (`zygote_client`) or in fresh namespaces ([`spawn`]); [`process`]:
//!   waiting for and signalling them.
//! - [`disklock`]: disk files locked while served.
//!
//! Below this crate: `moat-host-common` (the wire, shared with the confined
//! processes). Nothing here runs guest code.
pub mod api;
pub mod broker;
pub mod cgroup;
mod checkpoint_file;
pub mod disklock;
pub mod error;
mod image_check;
pub mod launch;
pub mod monitor;
mod proc;
pub mod process;
pub mod session;
pub mod shm;
pub mod spawn;
pub mod trace;
mod zygote_client;

pub use api::{CheckpointOptions, Controller, Killer, Picoprocess, Sandbox, Stdio};
pub use error::{Error, Exit, EXIT_BAD_INPUT, EXIT_HOST_FAILURE, EXIT_SANDBOX_VIOLATION};
pub use moat_host_common::protocol::ReportKind;
pub use moat_host_common::vmstats::{Counter as VmCounter, VmStats};
pub use session::LogSink;
pub use shm::HostSection;

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
