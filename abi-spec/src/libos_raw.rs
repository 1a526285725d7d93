//! The Rust module `libos/src/raw/calls.rs`: the guest side's raw calls,
//! one `unsafe fn` per call of the spec. Each loads the call's entry from
//! the function table the host handed over in the start-up block (libos's
//! `crate::boot::pal_table()`), and calls it with the table's `ctx` and the
//! arguments as the spec types them; the result is the raw `i64`. libos's
//! hand-written wrappers in `libos/src/raw.rs` (slices, `Result`s) sit on
//! top of these.
//!
//! Layout: the output is not laid out by hand; the committed file is this
//! output passed through `rustfmt --edition 2021` by the generated-files
//! test (`tests/generated.rs`), which both checks and, with
//! `MOAT_BLESS=1`, writes it. Imitating rustfmt here would have to track
//! its line-breaking rules for every signature and call; running it is
//! simpler and cannot drift. Nothing here is too long for rustfmt to fit
//! (which would make it leave the code as given); only doc comments, which
//! rustfmt never rewraps, are wrapped here. `pal/src/abi.rs` is the one
//! generated Rust file laid out by hand, for the reason given in `rust.rs`.

use std::fmt::Write;

use crate::{arg_rust_type, snake_case, Arg, Call, Spec};

/// Wrap `text` as `///` lines of at most about 80 columns.
fn doc(w: &mut String, text: &str) {
    for para in text.split("\n\n") {
        if para.trim().is_empty() {
            continue;
        }
        let mut line = String::new();
        for word in para.split_whitespace() {
            if !line.is_empty() && line.len() + 1 + word.len() > 76 {
                let _ = writeln!(w, "/// {line}");
                line.clear();
            }
            if !line.is_empty() {
                line.push(' ');
            }
            line.push_str(word);
        }
        let _ = writeln!(w, "/// {line}");
        let _ = writeln!(w, "///");
    }
}

/// What the caller must make true of a pointer argument, or `None` for a
/// value argument.
fn pointer_rule(a: &Arg) -> Option<String> {
    let ty = arg_rust_type(&a.ty).expect("validated");
    let (access, pointee) = if let Some(t) = ty.strip_prefix("*const ") {
        ("readable", t)
    } else if let Some(t) = ty.strip_prefix("*mut ") {
        if a.ty.ends_with("_inout") {
            ("readable and writable", t)
        } else {
            ("writable", t)
        }
    } else {
        return None;
    };
    let amount = match &a.len {
        Some(len) if pointee == "u8" => format!("`{len}` bytes"),
        Some(len) => format!("`{len}` `{pointee}`s"),
        None => format!("one `{pointee}`"),
    };
    Some(format!("- `{}` must be {access} for {amount}.", a.name))
}

fn call_doc(c: &Call) -> String {
    let name = snake_case(&c.name);
    let mut d = format!("`{}` (number {}): {}\n\n", c.name, c.number, c.doc);
    if c.is_never() {
        d.push_str("Does not return.");
    } else {
        let _ = write!(
            d,
            "Result: {}, or a negative error code.",
            c.result.trim_end_matches('.')
        );
    }
    let _ = write!(
        d,
        " Arguments and errors: [`Pal::{name}`](moat_pal::Pal::{name}).\n\n"
    );
    d
}

/// The spec's calls as the libos module `libos/src/raw/calls.rs` (not yet
/// laid out: see the module docs).
pub fn render_libos_raw_calls(spec: &Spec) -> String {
    let mut w = String::new();
    let _ = writeln!(w, "{}", crate::rust::RUST_HEADER);
    let _ = write!(
        w,
        "//! The raw ABI calls (ABI {}): one function per call of the host's\n\
         //! function table, generated from `abi-spec/abi.toml`.\n\
         //!\n\
         //! Each function loads the call's entry from the table the host handed\n\
         //! over in the start-up block ([`crate::boot::pal_table`], which faults\n\
         //! before start-up) and calls it with the table's `ctx` and the\n\
         //! arguments as the spec types them. The result is the call's raw `i64`:\n\
         //! [`moat_pal::decode`] turns it into a `Result`. The wrappers over\n\
         //! slices and `Result`s are in [`crate::raw`].\n\
         //!\n\
         //! # Safety\n\
         //!\n\
         //! Every function here is `unsafe`: what the call changes (memory\n\
         //! freed, unmapped or re-protected, a thread started at an address,\n\
         //! ...) must not break what the rest of the guest relies on, and its\n\
         //! pointer arguments must be valid as its own `# Safety` says.\n\
         #![allow(clippy::too_many_arguments)]\n",
        spec.version
    );
    // The spec's structs that arguments point at.
    let mut structs: Vec<&str> = spec
        .calls
        .iter()
        .flat_map(|c| &c.args)
        .filter_map(|a| {
            let ty = arg_rust_type(&a.ty).expect("validated");
            let t = ty.rsplit(' ').next().unwrap_or(ty);
            spec.structs
                .iter()
                .find(|s| s.name == t)
                .map(|s| s.name.as_str())
        })
        .collect();
    structs.sort_unstable();
    structs.dedup();
    if !structs.is_empty() {
        let _ = writeln!(w, "use moat_pal::{{{}}};\n", structs.join(", "));
    }
    let _ = writeln!(w, "use crate::boot::pal_table;\n");

    for c in &spec.calls {
        let name = snake_case(&c.name);
        doc(&mut w, &call_doc(c));
        let _ = writeln!(w, "/// # Safety\n///");
        let rules: Vec<String> = c.args.iter().filter_map(pointer_rule).collect();
        if rules.is_empty() {
            let _ = writeln!(w, "/// The [module's rules](self#safety).");
        } else {
            let _ = writeln!(w, "/// The [module's rules](self#safety), and:");
            for rule in rules {
                let _ = writeln!(w, "/// {rule}");
            }
        }
        let params: Vec<String> = c
            .args
            .iter()
            .map(|a| format!("{}: {}", a.name, arg_rust_type(&a.ty).expect("validated")))
            .collect();
        let mut args = vec!["t.ctx"];
        args.extend(c.args.iter().map(|a| a.name.as_str()));
        let ret = if c.is_never() { "!" } else { "i64" };
        let _ = writeln!(
            w,
            "pub unsafe fn {name}({}) -> {ret} {{\n\
             let t = pal_table();\n\
             // SAFETY: the host's entry with its table's ctx; the caller keeps the rules above.\n\
             unsafe {{ (t.{name})({}) }}\n\
             }}\n",
            params.join(", "),
            args.join(", ")
        );
    }
    w
}
