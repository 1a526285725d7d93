//! The start-up block a host hands the guest's entry (with the argument
//! bytes after it, in one guest-writable region: the guest stores its
//! exception upcall in the block), written the same way by the loader and
//! the VMM.
use crate::pal::LinuxPal;
use crate::sys;
use moat_pal::{PalTable, StartupBlock};
use std::sync::atomic::Ordering;

/// The arguments as the block carries them, and the bytes the block and
/// they take, in whole pages.
pub fn layout(args: &[String]) -> (Vec<u8>, u64) {
    let argbytes = moat_pal::validate::join_args(args);
    let need = std::mem::size_of::<StartupBlock>() as u64 + argbytes.len() as u64;
    (argbytes, need.div_ceil(4096) * 4096)
}

/// Write the block at `page` (guest memory of [`layout`]'s length, mapped
/// read-write and in the region map), the argument bytes after it, and
/// record it in the PAL (the signal handlers read the upcall from it).
pub fn write(
    pal: &LinuxPal,
    page: u64,
    table: *const PalTable,
    args: &[String],
    argbytes: &[u8],
    host_kind: u32,
) {
    let args_addr = page + std::mem::size_of::<StartupBlock>() as u64;
    sys::copy_out(args_addr, argbytes);
    sys::put(
        page,
        StartupBlock {
            magic: moat_pal::STARTUP_MAGIC,
            abi_version: moat_pal::ABI_VERSION,
            host_kind,
            table,
            args: args_addr,
            args_len: argbytes.len() as u64,
            argc: args.len() as u64,
            exception_upcall: 0,
            process_handle: 0,
        },
    );
    pal.startup.store(page, Ordering::Release);
}
