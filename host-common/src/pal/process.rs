//! The process calls: a child picoprocess is the monitor's to start (it
//! checks the policy and the image); here, its handle, its exit code and
//! the end of this one.
use super::LinuxPal;
use crate::objects::{Object, ProcessObj};
use crate::protocol::Request;
use crate::sys;
use moat_pal::host::GuestIn;
use moat_pal::host_calls::ProcessCalls;
use moat_pal::uri::Uri;
use moat_pal::{limits, validate, Error, PalResult};
use std::sync::Mutex;

impl ProcessCalls for LinuxPal {
    fn process_create(&self, uri: GuestIn, args: GuestIn) -> PalResult<u64> {
        let u = self.uri_in(uri)?;
        if !matches!(u, Uri::File(_)) {
            return Err(Error::InvalidUri);
        }
        if args.len() > limits::MAX_ARGS_LEN {
            return Err(Error::InvalidArgument);
        }
        let argv = if args.is_empty() {
            Vec::new()
        } else {
            validate::split_args(&sys::copy_in(args.addr(), args.len() as usize))?
        };
        let (fd, _) = self.ask_fd(&Request::ProcessCreate {
            uri: u.canonical(),
            args: argv,
        })?;
        self.insert(Object::Process(ProcessObj {
            pipe: fd,
            code: Mutex::new(None),
        }))
    }

    fn process_get_exit_code(&self, process: u64) -> PalResult<i32> {
        let o = self.obj(process)?;
        let Object::Process(p) = &*o else {
            return Err(Error::WrongHandleKind);
        };
        p.exit_code()
    }

    fn process_exit(&self, code: i32) -> ! {
        sys::exit_process(code)
    }
}
