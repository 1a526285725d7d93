//! The Rust module `pal/src/dispatch.rs`: calls a `Pal` method by call
//! number with raw argument words, as a hypercall delivers them. Hosts
//! whose guests leave through a trap (the KVM host) decode with it, and
//! any layer (tracing) sits in between unchanged.
//!
//! The raw output is not laid out; the committed file is this output
//! passed through rustfmt (see `tests/generated.rs`).

use std::fmt::Write;

use crate::{arg_rust_type, snake_case, upper_snake_case, Spec};

pub fn render_rust_dispatch(spec: &Spec) -> String {
    let mut w = String::new();
    let _ = writeln!(w, "{}", crate::rust::RUST_HEADER);
    w.push_str(
        "//! Calling a [`Pal`] by call number with raw argument words (as a\n\
         //! hypercall delivers them): integers are truncated to their type,\n\
         //! pointers are passed on as the addresses they are (the `Pal` checks\n\
         //! them). Calls that do not return are not dispatched: a host ends the\n\
         //! picoprocess (or thread) itself on those numbers.\n\
         use crate::abi::*;\n\n\
         /// Whether the call never returns (DkThreadExit, DkProcessExit).\n\
         pub fn is_exit(nr: u32) -> bool {\n    matches!(nr, ",
    );
    let exits: Vec<String> = spec
        .calls
        .iter()
        .filter(|c| c.is_never())
        .map(|c| format!("nr::{}", upper_snake_case(&c.name)))
        .collect();
    let _ = writeln!(w, "{})\n}}\n", exits.join(" | "));
    w.push_str(
        "/// Call `pal`'s method for call number `nr`. `None`: no such call, or a\n\
         /// call that does not return (see [`is_exit`]).\n\
         pub fn dispatch(pal: &dyn Pal, nr: u32, a: &[u64; 6]) -> Option<i64> {\n    Some(match nr {\n",
    );
    for c in spec.calls.iter().filter(|c| !c.is_never()) {
        let args: Vec<String> = c
            .args
            .iter()
            .enumerate()
            .map(|(i, a)| {
                let t = arg_rust_type(&a.ty).expect("validated");
                if t == "u64" {
                    format!("a[{i}]")
                } else {
                    format!("a[{i}] as {t}")
                }
            })
            .collect();
        let _ = writeln!(
            w,
            "nr::{} => pal.{}({}),",
            upper_snake_case(&c.name),
            snake_case(&c.name),
            args.join(", ")
        );
    }
    w.push_str("        _ => return None,\n    })\n}\n");
    w
}
