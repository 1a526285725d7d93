//! What starting or waiting for a picoprocess gives back: its [`Exit`],
//! or an [`Error`] saying why it could not run (and which exit code the
//! CLI ends with for it).
use crate::process::SpawnError;
use moat_host_common::protocol::ReportKind;
use moat_policy::PolicyError;

pub use moat_host_common::protocol::{EXIT_BAD_INPUT, EXIT_HOST_FAILURE, EXIT_SANDBOX_VIOLATION};

/// Why a picoprocess could not be started (or waited for).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A grant, manifest or limit is not valid.
    #[error("{0}")]
    Policy(#[from] PolicyError),
    /// The image cannot be used.
    #[error("image `{path}`: {msg}")]
    Image { path: String, msg: String },
    /// Another argument is not valid.
    #[error("{0}")]
    BadInput(String),
    /// The sandbox could not be set up.
    #[error("{0}")]
    Spawn(#[from] SpawnError),
    /// The host failed otherwise.
    #[error("{what}: {err}")]
    Io { what: String, err: std::io::Error },
}

impl Error {
    /// The exit code the CLI ends with for this error:
    /// [`EXIT_BAD_INPUT`] or [`EXIT_HOST_FAILURE`].
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Policy(_) | Error::Image { .. } | Error::BadInput(_) => EXIT_BAD_INPUT,
            Error::Spawn(_) | Error::Io { .. } => EXIT_HOST_FAILURE,
        }
    }

    pub(crate) fn io(what: impl Into<String>, err: std::io::Error) -> Error {
        Error::Io {
            what: what.into(),
            err,
        }
    }
}

/// How a picoprocess ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exit {
    /// Its exit code; killed by signal N: 128 + N; a sandbox violation:
    /// [`EXIT_SANDBOX_VIOLATION`].
    pub code: i32,
    /// The loader's report of an abnormal end, if any.
    pub report: Option<(ReportKind, String)>,
}

impl Exit {
    pub fn success(&self) -> bool {
        self.code == 0
    }
}
