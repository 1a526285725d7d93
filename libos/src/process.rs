//! The picoprocess and its children.
use alloc::vec::Vec;

use moat_pal::timeout;

use crate::{raw, Error, Result};

/// Flush stdout and end the picoprocess with `code`.
pub fn exit(code: i32) -> ! {
    crate::io::try_flush_stdout();
    exit_now(code)
}

/// End the picoprocess at once (nothing flushed).
pub fn exit_now(code: i32) -> ! {
    raw::process_exit(code)
}

/// End the process with 134 after printing `msg` on stderr.
pub fn abort(msg: &str) -> ! {
    crate::eprintln!("{}", msg);
    exit(134)
}

/// A child picoprocess; its handle is closed on drop (the child runs on).
#[derive(Debug)]
pub struct Child {
    handle: u64,
}

/// Start a child picoprocess from the image at `uri` (a `file:` URI) with
/// `args` after the image name.
pub fn spawn(uri: &str, args: &[&str]) -> Result<Child> {
    let mut packed = Vec::new();
    for a in args {
        if a.as_bytes().contains(&0) {
            return Err(Error::InvalidArgument);
        }
        packed.extend_from_slice(a.as_bytes());
        packed.push(0);
    }
    Ok(Child {
        handle: raw::process_create(uri, &packed)?,
    })
}

impl Child {
    /// The process handle (signalled when the child exits).
    pub fn handle(&self) -> u64 {
        self.handle
    }

    /// Wait for the child to exit; its exit code.
    pub fn wait(&self) -> Result<i32> {
        crate::sync::wait_one(self.handle, timeout::INFINITE)?;
        raw::process_get_exit_code(self.handle)
    }

    /// Wait at most `timeout_micros`; `Err(TimedOut)` if it still runs.
    pub fn wait_timeout(&self, timeout_micros: i64) -> Result<i32> {
        crate::sync::wait_one(self.handle, timeout_micros)?;
        raw::process_get_exit_code(self.handle)
    }

    /// The exit code if the child has exited, `None` if it still runs.
    pub fn try_exit_code(&self) -> Result<Option<i32>> {
        match raw::process_get_exit_code(self.handle) {
            Ok(c) => Ok(Some(c)),
            Err(Error::WouldBlock) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        let _ = raw::object_close(self.handle);
    }
}
