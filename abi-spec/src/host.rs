//! The Rust module `pal/src/host_calls.rs`: the typed host side of the ABI
//! and its adapter to the raw `Pal` trait (the rules it follows are in
//! `pal/src/host.rs`, which holds what does not depend on the spec).
//!
//! For each call group of the spec, a trait (`memory` -> `MemoryCalls`,
//! `threads` -> `ThreadCalls`, ...), so a host can implement its groups in
//! separate files; `PalHost` is all of them plus `GuestMemory`, and every
//! `PalHost` is a `Pal` through the generated adapter.
//!
//! How argument types become typed parameters and results:
//!
//! | spec type | typed method | adapter |
//! |---|---|---|
//! | integers, `handle` | the integer | passed on |
//! | `bytes_in` (+ its `len`) | `GuestIn` | length in bounds, checked readable |
//! | `bytes_out` (+ its `len`) | `GuestOut` | length in bounds, checked writable |
//! | `handles_in` (+ its count) | `&[u64]` | count in bounds, checked, copied in |
//!
//! A length's bounds are what its doc says (`MIN to LIMIT`, `at least MIN`:
//! see `len_bounds`); a length outside them is `InvalidArgument` before the
//! buffer is looked at.
//! | `handle_out`, `u64_out`, `i32_out`, `attrs_out`, `image_out` | returned | checked writable before, written after |
//! | `u64_inout` | passed in, returned | checked read-write, read before, written after |
//!
//! The result: `()` for a call whose result is "0", else `u64`, then the
//! out-values; a single item is returned bare, several as a tuple.
//!
//! The output is not laid out; the committed file is it passed through
//! rustfmt (see `tests/generated.rs`).

use std::fmt::Write;

use crate::{snake_case, Arg, Call, Spec};

/// The trait of a call group.
pub fn group_trait(group: &str) -> String {
    let mut name: String = group
        .split('_')
        .map(|p| {
            let mut c = p.chars();
            c.next()
                .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                .unwrap_or_default()
        })
        .collect();
    // "threads" -> "Thread", "streams" -> "Stream": one call of the group.
    if name.ends_with('s') && name != "Process" {
        name.pop();
    }
    format!("{name}Calls")
}

/// The typed method's name: the call's name without its `Dk` prefix.
fn method(c: &Call) -> String {
    snake_case(c.name.strip_prefix("Dk").unwrap_or(&c.name))
}

/// The Rust type an out-value of spec type `ty` is returned as.
fn out_type(ty: &str) -> Option<&'static str> {
    Some(match ty {
        "handle_out" | "u64_out" | "u64_inout" => "u64",
        "i32_out" => "i32",
        "attrs_out" => "StreamAttributes",
        "image_out" => "ImageInfo",
        _ => return None,
    })
}

fn plain_type(ty: &str) -> Option<&'static str> {
    Some(match ty {
        "u32" => "u32",
        "i32" => "i32",
        "u64" | "handle" => "u64",
        "i64" => "i64",
        _ => return None,
    })
}

/// Whether `a` is the length of another argument (folded into it).
fn is_len_of_another(c: &Call, a: &Arg) -> bool {
    c.args
        .iter()
        .any(|b| b.len.as_deref() == Some(a.name.as_str()))
}

fn result_types(c: &Call) -> Vec<&'static str> {
    let mut r = Vec::new();
    if c.result.trim() != "0" {
        r.push("u64");
    }
    for a in &c.args {
        if let Some(t) = out_type(&a.ty) {
            r.push(t);
        }
    }
    r
}

fn result_type(c: &Call) -> String {
    let r = result_types(c);
    match r.len() {
        0 => "()".into(),
        1 => r[0].into(),
        _ => format!("({})", r.join(", ")),
    }
}

/// The typed method's parameters (after `&self`).
fn typed_params(c: &Call) -> Vec<String> {
    let mut p = Vec::new();
    for a in &c.args {
        if is_len_of_another(c, a) {
            continue;
        }
        let t = match a.ty.as_str() {
            "bytes_in" => "GuestIn".to_string(),
            "bytes_out" => "GuestOut".to_string(),
            "handles_in" => "&[u64]".to_string(),
            "u64_inout" => "u64".to_string(),
            t if out_type(t).is_some() => continue,
            t => plain_type(t).expect("validated").to_string(),
        };
        p.push(format!("{}: {t}", a.name));
    }
    p
}

fn doc(w: &mut String, text: &str) {
    for line in text.lines() {
        let _ = writeln!(w, "/// {}", line.trim_end());
    }
}

pub fn render_rust_host(spec: &Spec) -> String {
    let mut w = String::new();
    let _ = writeln!(w, "{}", crate::rust::RUST_HEADER);
    w.push_str(
        "//! The typed host side of the ABI, one trait per call group, and the\n\
         //! adapter that makes every [`PalHost`] a [`Pal`] (see [`crate::host`]\n\
         //! for the rules it follows).\n\
         #![allow(clippy::too_many_arguments)]\n\
         use crate::abi::*;\n\
         use crate::host::{GuestIn, GuestMemory, GuestOut};\n\
         use crate::PalResult;\n\n",
    );
    let groups = spec.groups();
    for g in &groups {
        let _ = writeln!(w, "/// The `{g}` calls of the ABI, typed.");
        let _ = writeln!(w, "pub trait {} {{", group_trait(g));
        for c in spec.calls.iter().filter(|c| &c.group == g) {
            doc(
                &mut w,
                &format!("`{}` (number {}): {}", c.name, c.number, c.doc),
            );
            let ret = if c.is_never() {
                "!".to_string()
            } else {
                format!("PalResult<{}>", result_type(c))
            };
            let mut params = vec!["&self".to_string()];
            params.extend(typed_params(c));
            let _ = writeln!(w, "fn {}({}) -> {ret};", method(c), params.join(", "));
        }
        let _ = writeln!(w, "}}\n");
    }
    let bounds: Vec<String> = groups.iter().map(|g| group_trait(g)).collect();
    let _ = writeln!(
        w,
        "/// A host: its guest memory and every call group. Every `PalHost` is a\n\
         /// [`Pal`] through the adapter below.\n\
         pub trait PalHost: GuestMemory + {} + Send + Sync {{}}\n\n\
         impl<T: GuestMemory + {} + Send + Sync> PalHost for T {{}}\n",
        bounds.join(" + "),
        bounds.join(" + ")
    );
    let _ = writeln!(
        w,
        "/// A call without a result value, as the ABI's return value.\n\
         fn done(r: PalResult<()>) -> i64 {{ crate::encode(r.map(|()| 0)) }}\n"
    );
    let _ = writeln!(w, "impl<H: PalHost> Pal for H {{");
    for c in &spec.calls {
        adapter_method(&mut w, spec, c);
    }
    let _ = writeln!(w, "}}");
    w
}

fn raw_type(ty: &str) -> &'static str {
    crate::arg_rust_type(ty).expect("validated")
}

fn adapter_method(w: &mut String, spec: &Spec, c: &Call) {
    let params: Vec<String> = c
        .args
        .iter()
        .map(|a| format!("{}: {}", a.name, raw_type(&a.ty)))
        .collect();
    let ret = if c.is_never() { "!" } else { "i64" };
    let _ = writeln!(
        w,
        "fn {}(&self, {}) -> {ret} {{",
        snake_case(&c.name),
        params.join(", ")
    );
    // 1. Lengths, then pointers.
    let max_handles = spec
        .limits
        .0
        .iter()
        .find(|(k, _)| k == "max_wait_handles")
        .map(|(_, v)| *v)
        .expect("validated");
    let mut call_args = Vec::new();
    let mut outs: Vec<(&Arg, &'static str)> = Vec::new();
    assert!(
        !c.is_never() || c.args.iter().all(|a| plain_type(&a.ty).is_some()),
        "{}: a call that does not return takes no pointer",
        c.name
    );
    let fail = "return e.code()";
    // 1a. Every length outside the bounds its doc gives is refused first,
    // before any pointer is looked at (so a call with a bad length fails
    // with InvalidArgument whichever of its pointers is also bad).
    for a in &c.args {
        if let Some(len) = &a.len {
            let doc = c
                .args
                .iter()
                .find(|b| &b.name == len)
                .and_then(|b| b.doc.as_deref());
            let len_ty = c
                .args
                .iter()
                .find(|b| &b.name == len)
                .map(|b| b.ty.as_str());
            let v = if len_ty == Some("u64") {
                len.clone()
            } else {
                format!("u64::from({len})")
            };
            let cond = match doc.and_then(|d| crate::len_bounds(&spec.limits, d)) {
                Some((0, Some(max))) => Some(format!("{v} > {max}")),
                Some((min, Some(max))) => Some(format!("!({min}..={max}).contains(&{v})")),
                Some((0, None)) | None => None,
                Some((min, None)) => Some(format!("{v} < {min}")),
            };
            if let Some(cond) = cond {
                let _ = writeln!(w, "if {cond} {{ return Error::InvalidArgument.code(); }}");
            }
        }
    }
    // 1b. Then every pointer, in argument order.
    for a in &c.args {
        let n = &a.name;
        match a.ty.as_str() {
            "bytes_in" | "bytes_out" => {
                let len = a.len.as_deref().expect("validated");
                let ty = if a.ty == "bytes_in" {
                    "GuestIn"
                } else {
                    "GuestOut"
                };
                let _ = writeln!(
                    w,
                    "let {n} = match {ty}::checked(self, {n} as u64, {len}) {{ Ok(r) => r, Err(e) => {fail} }};"
                );
                call_args.push(n.clone());
            }
            "handles_in" => {
                let count = a.len.as_deref().expect("validated");
                let _ = writeln!(
                    w,
                    "if {count} as u64 > {max_handles} {{ return Error::InvalidArgument.code(); }}\n\
                     if let Err(e) = self.check_guest({n} as u64, {count} as u64 * 8, prot::READ) {{ {fail} }}\n\
                     let mut {n}_in = [0u64; {max_handles}];\n\
                     for (i, h) in {n}_in.iter_mut().take({count} as usize).enumerate() {{ *h = self.read_value::<u64>({n} as u64 + i as u64 * 8); }}\n\
                     let {n} = &{n}_in[..{count} as usize];"
                );
                call_args.push(n.clone());
            }
            "u64_inout" => {
                let _ = writeln!(
                    w,
                    "if let Err(e) = self.check_guest({n} as u64, 8, prot::READ | prot::WRITE) {{ {fail} }}\n\
                     let {n}_addr = {n} as u64;\n\
                     let {n} = self.read_value::<u64>({n}_addr);"
                );
                call_args.push(n.clone());
                outs.push((a, "u64"));
            }
            t if out_type(t).is_some() => {
                let ot = out_type(t).expect("checked");
                let _ = writeln!(
                    w,
                    "if let Err(e) = self.check_guest({n} as u64, core::mem::size_of::<{ot}>() as u64, prot::READ | prot::WRITE) {{ {fail} }}\n\
                     let {n}_addr = {n} as u64;"
                );
                outs.push((a, ot));
            }
            _ if is_len_of_another(c, a) => {}
            _ => call_args.push(n.clone()),
        }
    }
    // 2. The call.
    let m = method(c);
    if c.is_never() {
        let _ = writeln!(
            w,
            "{}::{m}(self, {})\n}}",
            group_trait(&c.group),
            call_args.join(", ")
        );
        return;
    }
    let has_result = c.result.trim() != "0";
    let _ = writeln!(
        w,
        "match {}::{m}(self, {}) {{",
        group_trait(&c.group),
        call_args.join(", ")
    );
    // 3. Results out.
    let mut names: Vec<String> = Vec::new();
    if has_result {
        names.push("v".into());
    }
    for (a, _) in &outs {
        names.push(format!("{}_v", a.name));
    }
    let pat = match names.len() {
        0 => "()".to_string(),
        1 => names[0].clone(),
        _ => format!("({})", names.join(", ")),
    };
    let _ = writeln!(w, "Ok({pat}) => {{");
    for (a, ot) in &outs {
        let _ = writeln!(
            w,
            "self.write_value::<{ot}>({}_addr, {}_v);",
            a.name, a.name
        );
    }
    if has_result {
        let _ = writeln!(w, "crate::encode(Ok(v))");
    } else {
        let _ = writeln!(w, "done(Ok(()))");
    }
    let _ = writeln!(w, "}}\nErr(e) => e.code(),\n}}\n}}");
}
