//! The ABI conformance suite: named cases, one line each
//! (`ok NAME`, `FAIL NAME: detail`, `skip NAME: reason`), then
//! `conformance: N passed, M failed, K skipped`.
//!
//! Arguments: 1 (optional) a writable scratch directory URI (`file:/tmp/x`),
//! 2 (optional) a readable `file:` URI of the `exit-code` image,
//! 3 (optional) run only the cases whose name contains this text,
//! 4 (optional) a readable `file:` URI of the `shm-peer` image,
//! 5 (optional) `hop`: halfway, wait for a checkpoint and restore and
//! check what it carried (see `hop`).
//! An argument `-` stands for "absent".
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use moat_libos::moat_pal::{Error, TablePal};
use moat_libos::println;

mod exception;
mod files;
mod handles;
mod hop;
mod memory;
mod misc;
mod net;
mod process;
mod shm;
mod streams;
mod sync;
mod threads;
mod wx;

/// Why a case did not pass.
pub enum Fail {
    Fail(String),
    Skip(String),
}

pub type R = Result<(), Fail>;

/// What the cases know about the run.
pub struct Ctx {
    pub scratch: Option<String>,
    pub exit_image: Option<String>,
    pub shm_peer: Option<String>,
    pub host_kind: u32,
}

impl Ctx {
    /// The scratch directory, or a skip.
    pub fn scratch(&self) -> Result<&str, Fail> {
        self.scratch
            .as_deref()
            .ok_or_else(|| Fail::Skip(String::from("no scratch dir")))
    }

    /// A fresh name under the scratch directory.
    pub fn scratch_path(&self, name: &str) -> Result<String, Fail> {
        let dir = self.scratch()?;
        let dir = dir.trim_end_matches('/');
        Ok(format!("{}/{}-{:08x}", dir, name, rand32()))
    }
}

pub type Case = (&'static str, fn(&Ctx) -> R);

macro_rules! fail {
    ($($a:tt)*) => { return Err($crate::conformance::Fail::Fail(alloc::format!($($a)*))) };
}
macro_rules! skip {
    ($($a:tt)*) => { return Err($crate::conformance::Fail::Skip(alloc::format!($($a)*))) };
}
macro_rules! ensure {
    ($c:expr, $($a:tt)*) => { if !$c { $crate::conformance::fail!($($a)*) } };
}
pub(crate) use {ensure, fail, skip};

/// The PAL.
pub fn p() -> TablePal {
    moat_libos::pal()
}

/// An ABI result as text.
pub fn show(ret: i64) -> String {
    if ret >= 0 {
        format!("Ok({})", ret)
    } else {
        match Error::from_code(ret) {
            Some(e) => format!("Err({})", e.name()),
            None => format!("Err(unknown {})", ret),
        }
    }
}

/// Require success; the value.
pub fn ok(ret: i64, what: &str) -> Result<u64, Fail> {
    if ret >= 0 {
        Ok(ret as u64)
    } else {
        Err(Fail::Fail(format!(
            "{}: expected success, got {}",
            what,
            show(ret)
        )))
    }
}

/// Require the error `want`.
pub fn err(ret: i64, want: Error, what: &str) -> R {
    if ret == want.code() {
        Ok(())
    } else {
        Err(Fail::Fail(format!(
            "{}: expected Err({}), got {}",
            what,
            want.name(),
            show(ret)
        )))
    }
}

/// Require one of the errors in `want`.
pub fn err_any(ret: i64, want: &[Error], what: &str) -> R {
    if want.iter().any(|e| e.code() == ret) {
        Ok(())
    } else {
        let names: Vec<&str> = want.iter().map(|e| e.name()).collect();
        Err(Fail::Fail(format!(
            "{}: expected one of {:?}, got {}",
            what,
            names,
            show(ret)
        )))
    }
}

/// A handle closed on drop.
pub struct H(pub u64);

impl Drop for H {
    fn drop(&mut self) {
        if self.0 != 0 {
            let _ = moat_libos::raw::object_close(self.0);
        }
    }
}

pub fn rand32() -> u32 {
    moat_libos::random::u64().unwrap_or(0x5eed) as u32
}

/// A notification event (`initial` set or not), as an owned handle.
pub fn notif(initial: bool) -> Result<H, Fail> {
    match moat_libos::raw::notification_event_create(initial) {
        Ok(h) => Ok(H(h)),
        Err(e) => Err(Fail::Fail(format!(
            "DkNotificationEventCreate: {}",
            e.name()
        ))),
    }
}

/// Open a URI; the handle.
pub fn open(uri: &str, access: u32, create: u32, options: u32) -> Result<H, Fail> {
    let mut h = 0u64;
    use moat_libos::Pal;
    let r = p().dk_stream_open(
        uri.as_ptr(),
        uri.len() as u64,
        access,
        create,
        options,
        &mut h,
    );
    ok(r, &format!("DkStreamOpen({})", uri))?;
    Ok(H(h))
}

/// Addresses no call may accept as a buffer: null, 0x1, a kernel address,
/// and (if `freed` is given) memory just freed.
pub fn bad_ptrs(freed: Option<u64>) -> Vec<u64> {
    let mut v = alloc::vec![0u64, 0x1, 0xffff_8000_0000_0000];
    if let Some(f) = freed {
        v.push(f);
    }
    v
}

/// Allocate one page and free it again: an address that is now unmapped.
pub fn freed_page() -> Result<u64, Fail> {
    use moat_libos::moat_pal::prot;
    use moat_libos::Pal;
    let a = ok(
        p().dk_virtual_memory_alloc(0, 4096, prot::READ | prot::WRITE),
        "alloc",
    )?;
    ok(p().dk_virtual_memory_free(a, 4096), "free")?;
    Ok(a)
}

fn all_cases() -> Vec<Case> {
    let mut v: Vec<Case> = Vec::new();
    v.extend_from_slice(memory::CASES);
    v.extend_from_slice(handles::CASES);
    v.extend_from_slice(sync::CASES);
    v.extend_from_slice(threads::CASES);
    v.extend_from_slice(misc::CASES);
    v.extend_from_slice(streams::CASES);
    v.extend_from_slice(files::CASES);
    v.extend_from_slice(net::CASES);
    v.extend_from_slice(process::CASES);
    v.extend_from_slice(shm::CASES);
    // Last: these take exceptions.
    v.extend_from_slice(exception::CASES);
    v.extend_from_slice(wx::CASES);
    v
}

fn arg(args: &[String], i: usize) -> Option<String> {
    args.get(i)
        .filter(|a| !a.is_empty() && a.as_str() != "-")
        .cloned()
}

/// Run the suite; the exit code.
pub fn run() -> i32 {
    let args = moat_libos::env::args();
    let hop_at = (arg(&args, 5).as_deref() == Some("hop")).then(|| all_cases().len() / 2);
    let mut ctx = Ctx {
        scratch: arg(&args, 1),
        exit_image: arg(&args, 2),
        shm_peer: arg(&args, 4),
        host_kind: moat_libos::env::host_kind(),
    };
    let filter = arg(&args, 3);
    let (mut passed, mut failed, mut skipped) = (0u32, 0u32, 0u32);
    for (i, (name, case)) in all_cases().into_iter().enumerate() {
        if hop_at == Some(i) {
            match hop::hop(&ctx) {
                Ok(()) => {
                    passed += 1;
                    println!("ok hop_state_carried");
                }
                Err(Fail::Fail(why)) | Err(Fail::Skip(why)) => {
                    failed += 1;
                    println!("FAIL hop_state_carried: {}", why);
                }
            }
            // Maybe another host now.
            ctx.host_kind = moat_libos::env::host_kind();
        }
        if let Some(f) = &filter {
            if !name.contains(f.as_str()) {
                continue;
            }
        }
        match case(&ctx) {
            Ok(()) => {
                passed += 1;
                println!("ok {}", name);
            }
            Err(Fail::Fail(why)) => {
                failed += 1;
                println!("FAIL {}: {}", name, why);
            }
            Err(Fail::Skip(why)) => {
                skipped += 1;
                println!("skip {}: {}", name, why);
            }
        }
    }
    println!(
        "conformance: {} passed, {} failed, {} skipped",
        passed, failed, skipped
    );
    if failed == 0 {
        0
    } else {
        1
    }
}
