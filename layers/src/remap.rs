//! The remap layer: the manifest's `[[remap]]` mappings applied to every
//! `file:` URI the guest names (DkStreamOpen, DkStreamAttributesQuery,
//! DkStreamRename's new name, DkProcessCreate's image), in the layer, so
//! both hosts map alike (`moat_policy::remap` has the rules).
//!
//! Hostile input: the guest's URI is copied in once through the host's
//! checks ([`GuestAccess`]) and parsed as the PAL parses it
//! (`moat_pal::uri`: a `..` component is refused, `.` and empty ones
//! dropped, nothing is percent-decoded, so `%2e%2e` is a name), then
//! mapped by whole components. The host-side URI goes down in memory the
//! layer allocates through the PAL below for the call, and the PAL and
//! the monitor check it as they check any URI: the grants decide, and
//! file opens resolve beneath the grant (`openat2(RESOLVE_BENEATH)`), so
//! neither `..` nor a symlink leaves it. Grant each mapping's target, and
//! a symlink cannot leave the mapping either.
//!
//! A mapping is a view, not a boundary: a guest can still name a host
//! URI directly, and gets what the grants give it. A read-only mapping
//! refuses opens for writing or creation and renames into it
//! (PermissionDenied, with a log line); handles opened through it are
//! read-only, so the PAL refuses writes on them, and the layer remembers
//! them, so deleting or renaming through one is refused too.
//!
//! URIs that are not `file:`, are under no mapping, or do not parse pass
//! down unchanged (the PAL gives its own answer). Each mapped call costs
//! an allocation and a free of the page(s) holding the host URI, counted
//! against the picoprocess's memory limit while the call runs.
use crate::{GuestAccess, LogSink};
use moat_pal::layer::Layer;
use moat_pal::uri::Uri;
use moat_pal::{access, create, limits, prot, Error, Pal};
use moat_policy::remap::{map_path, Mapped, Remap};
use std::collections::HashMap;
use std::sync::Mutex;

/// The remap layer.
pub struct RemapLayer {
    inner: &'static dyn Pal,
    mem: &'static dyn GuestAccess,
    remaps: Vec<Remap>,
    log: LogSink,
    /// Handles opened through a read-only mapping, with their references
    /// (DkObjectReference adds one, DkObjectClose takes one); bounded by
    /// the picoprocess's handle limit.
    read_only: Mutex<HashMap<u64, u32>>,
}

/// What to do with a URI argument.
enum Decision {
    /// Pass the call down as it is.
    Pass,
    /// Answer this error.
    Refuse(Error),
    /// Pass the call down with this URI (and whether its mapping is
    /// read-only).
    Host(String, bool),
}

impl RemapLayer {
    pub fn new(
        inner: &'static dyn Pal,
        mem: &'static dyn GuestAccess,
        remaps: Vec<Remap>,
        log: LogSink,
    ) -> RemapLayer {
        RemapLayer {
            inner,
            mem,
            remaps,
            log,
            read_only: Mutex::new(HashMap::new()),
        }
    }

    fn is_read_only(&self, h: u64) -> bool {
        self.read_only
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(&h)
    }

    fn refuse_read_only(&self, what: &str) -> i64 {
        (self.log)(format_args!(
            "remap: refused to {what} a stream opened through a read-only mapping"
        ));
        Error::PermissionDenied.code()
    }

    fn decide(&self, uri: *const u8, len: u64, writes: bool) -> Decision {
        if !(1..=limits::MAX_URI_LEN).contains(&len) {
            return Decision::Pass;
        }
        // Copied once; what is parsed and mapped is this copy.
        let Ok(bytes) = self.mem.copy_in(uri as u64, len) else {
            return Decision::Pass;
        };
        let Ok(Uri::File(path)) = Uri::parse_bytes(&bytes) else {
            return Decision::Pass;
        };
        match map_path(&self.remaps, &path) {
            Mapped::Unmapped => Decision::Pass,
            Mapped::To(_, true) if writes => {
                (self.log)(format_args!(
                    "remap: refused `file:{path}` for writing: its mapping is read-only"
                ));
                Decision::Refuse(Error::PermissionDenied)
            }
            Mapped::To(host, ro) => Decision::Host(format!("file:{host}"), ro),
        }
    }

    /// Run `call` with `uri` in guest memory the layer owns for the call.
    fn with_uri(&self, uri: &str, call: impl FnOnce(*const u8, u64) -> i64) -> i64 {
        let len = uri.len() as u64;
        let size = (len + 4095) & !4095;
        let at = self
            .inner
            .dk_virtual_memory_alloc(0, size, prot::READ | prot::WRITE);
        if at < 0 {
            return at;
        }
        let r = match self.mem.copy_out(at as u64, uri.as_bytes()) {
            Ok(()) => call(at as *const u8, len),
            Err(e) => e.code(),
        };
        self.inner.dk_virtual_memory_free(at as u64, size);
        r
    }

    fn mapped(
        &self,
        uri: *const u8,
        len: u64,
        writes: bool,
        call: impl FnOnce(*const u8, u64) -> i64,
    ) -> i64 {
        self.mapped_ro(uri, len, writes, call).0
    }

    /// [`RemapLayer::mapped`], and whether the URI was in a read-only
    /// mapping.
    fn mapped_ro(
        &self,
        uri: *const u8,
        len: u64,
        writes: bool,
        call: impl FnOnce(*const u8, u64) -> i64,
    ) -> (i64, bool) {
        match self.decide(uri, len, writes) {
            Decision::Pass => (call(uri, len), false),
            Decision::Refuse(e) => (e.code(), false),
            Decision::Host(h, ro) => (self.with_uri(&h, call), ro),
        }
    }
}

impl Layer for RemapLayer {
    type Token = ();

    fn inner(&self) -> &dyn Pal {
        self.inner
    }

    fn dk_stream_open(
        &self,
        uri: *const u8,
        uri_len: u64,
        acc: u32,
        cr: u32,
        options: u32,
        stream: *mut u64,
    ) -> i64 {
        let writes = acc & (access::WRITE | access::APPEND) != 0 || cr != create::OPEN_EXISTING;
        let (r, ro) = self.mapped_ro(uri, uri_len, writes, |u, n| {
            self.inner.dk_stream_open(u, n, acc, cr, options, stream)
        });
        if r >= 0 && ro {
            // The new handle, as the PAL wrote it (it checked the pointer).
            if let Ok(b) = self.mem.copy_in(stream as u64, 8) {
                let h = u64::from_le_bytes(b.try_into().unwrap_or_default());
                self.read_only
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(h, 1);
            }
        }
        r
    }

    fn dk_stream_delete(&self, stream: u64, which: u32) -> i64 {
        if self.is_read_only(stream) {
            return self.refuse_read_only("delete");
        }
        self.inner.dk_stream_delete(stream, which)
    }

    fn dk_object_reference(&self, object: u64) -> i64 {
        let r = self.inner.dk_object_reference(object);
        if r >= 0 {
            if let Some(n) = self
                .read_only
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get_mut(&object)
            {
                *n = n.saturating_add(1);
            }
        }
        r
    }

    fn dk_object_close(&self, object: u64) -> i64 {
        let r = self.inner.dk_object_close(object);
        if r >= 0 {
            let mut ro = self.read_only.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(n) = ro.get_mut(&object) {
                *n -= 1;
                if *n == 0 {
                    ro.remove(&object);
                }
            }
        }
        r
    }

    fn dk_stream_attributes_query(
        &self,
        uri: *const u8,
        uri_len: u64,
        attrs: *mut moat_pal::StreamAttributes,
    ) -> i64 {
        self.mapped(uri, uri_len, false, |u, n| {
            self.inner.dk_stream_attributes_query(u, n, attrs)
        })
    }

    fn dk_stream_rename(&self, stream: u64, new_uri: *const u8, new_uri_len: u64) -> i64 {
        if self.is_read_only(stream) {
            return self.refuse_read_only("rename");
        }
        self.mapped(new_uri, new_uri_len, true, |u, n| {
            self.inner.dk_stream_rename(stream, u, n)
        })
    }

    fn dk_process_create(
        &self,
        uri: *const u8,
        uri_len: u64,
        args: *const u8,
        args_len: u64,
        process: *mut u64,
    ) -> i64 {
        self.mapped(uri, uri_len, false, |u, n| {
            self.inner.dk_process_create(u, n, args, args_len, process)
        })
    }
}
