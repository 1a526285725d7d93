//! The other calls: time, random bits, handles (reference, close), the
//! debug string, and what this host does not offer (input events, frame
//! buffers).
use super::LinuxPal;
use crate::errno::to_pal as map_errno;
use crate::protocol::Request;
use crate::sys;
use moat_pal::host::{GuestIn, GuestMemory, GuestOut};
use moat_pal::host_calls::OtherCalls;
use moat_pal::{limits, prot, validate, Error, PalResult};

impl OtherCalls for LinuxPal {
    fn system_time_query(&self) -> PalResult<u64> {
        Ok(sys::realtime_micros())
    }

    fn random_bits_read(&self, buf: GuestOut) -> PalResult<u64> {
        let n = validate::check_io_len(buf.len())?;
        if n == 0 {
            return Ok(0);
        }
        let mut tmp = vec![0u8; n.min(1 << 20)];
        let mut done = 0;
        while done < n {
            let k = (n - done).min(tmp.len());
            sys::getrandom(&mut tmp[..k]).map_err(map_errno)?;
            sys::copy_out(buf.addr() + done as u64, &tmp[..k]);
            done += k;
        }
        Ok(n as u64)
    }

    fn instruction_cache_flush(&self, addr: u64, size: u64) -> PalResult<()> {
        // x86 keeps instruction and data caches coherent; only check the range.
        if size == 0 {
            return Ok(());
        }
        self.check_guest(addr, size, prot::READ)
    }

    fn object_reference(&self, object: u64) -> PalResult<()> {
        self.handles.lock().unwrap().reference(object)?;
        Ok(())
    }

    fn object_close(&self, object: u64) -> PalResult<()> {
        let last = self.close_handle(object)?;
        // Drop the object (and its descriptor) outside the table lock.
        drop(last);
        Ok(())
    }

    fn input_event_read(&self, _buf: GuestOut) -> PalResult<u64> {
        Err(Error::NotSupported)
    }

    fn frame_buffer_export(&self, _addr: u64, _width: u32, _height: u32) -> PalResult<()> {
        Err(Error::NotSupported)
    }

    fn frame_buffer_notify_update(
        &self,
        _x: u32,
        _y: u32,
        _width: u32,
        _height: u32,
    ) -> PalResult<()> {
        Err(Error::NotSupported)
    }

    fn debug_string_print(&self, msg: GuestIn) -> PalResult<()> {
        if msg.len() > limits::MAX_DEBUG_STRING_LEN {
            return Err(Error::InvalidArgument);
        }
        let bytes = sys::copy_in(msg.addr(), msg.len() as usize);
        let text = String::from_utf8_lossy(&bytes).into_owned();
        self.tell(&Request::Debug { text });
        Ok(())
    }
}
