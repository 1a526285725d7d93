//! The generated C header compiles as C11 and has the Rust layout.

use std::process::Command;

const CHECK: &str = r#"
#include <stddef.h>
#include "moat_abi.h"

_Static_assert(sizeof(moat_pal_table) == 8 + 8 + MOAT_NUM_CALLS * 8, "moat_pal_table size");
_Static_assert(sizeof(moat_pal_table) == 8 + 8 + 45 * 8, "moat_pal_table size");
_Static_assert(offsetof(moat_pal_table, ctx) == 8, "ctx offset");
_Static_assert(offsetof(moat_pal_table, dk_virtual_memory_alloc) == 16, "first call");
_Static_assert(offsetof(moat_pal_table, dk_debug_string_print) == 16 + 44 * 8, "last call");
_Static_assert(sizeof(moat_stream_attributes) == 48, "moat_stream_attributes size");
_Static_assert(offsetof(moat_stream_attributes, size) == 16, "size offset");
_Static_assert(offsetof(moat_stream_attributes, dev_io_base) == 32, "dev_io_base offset");
_Static_assert(sizeof(moat_image_info) == 24, "moat_image_info size");
_Static_assert(sizeof(moat_exception_info) == 40, "moat_exception_info size");
_Static_assert(offsetof(moat_exception_info, fault_addr) == 8, "fault_addr offset");
_Static_assert(sizeof(moat_startup_block) == 64, "moat_startup_block size");
_Static_assert(offsetof(moat_startup_block, table) == 16, "table offset");
_Static_assert(offsetof(moat_startup_block, exception_upcall) == 48, "exception_upcall offset");
_Static_assert(MOAT_ABI_VERSION == 0x00010001, "version");
_Static_assert(MOAT_E_INVALID_ARGUMENT == 1, "first error");
_Static_assert(MOAT_PROT_READ == 1, "prot");
_Static_assert(MOAT_TIMEOUT_INFINITE == -1, "timeout");

static int64_t call_alloc(const moat_pal_table *t) {
    return t->dk_virtual_memory_alloc(t->ctx, 0, 4096, MOAT_PROT_READ | MOAT_PROT_WRITE);
}

static void exit_thread(const moat_pal_table *t) {
    t->dk_thread_exit(t->ctx, 0);
}

int use_it(const moat_pal_table *t) {
    moat_lib_os_initialize_fn init = 0;
    moat_lib_os_exception_dispatch_fn dispatch = 0;
    (void)init;
    (void)dispatch;
    if (call_alloc(t) < 0) {
        exit_thread(t);
    }
    return 0;
}
"#;

#[test]
fn c_header_compiles() {
    if Command::new("cc").arg("--version").output().is_err() {
        println!("skipped: no `cc` on PATH");
        return;
    }
    let dir = std::env::temp_dir().join(format!("moat-abi-c-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("moat_abi.h"), moat_abi_spec::render("c").unwrap()).unwrap();
    std::fs::write(dir.join("check.c"), CHECK).unwrap();
    let out = Command::new("cc")
        .args([
            "-std=c11",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-fsyntax-only",
            "-I",
        ])
        .arg(&dir)
        .arg(dir.join("check.c"))
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success(),
        "cc rejected moat_abi.h:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
