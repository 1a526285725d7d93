//! The Rust module `pal/src/layer.rs`: what a layer is written against,
//! generated from the spec. A layer is a `Pal` over another `Pal`; in
//! Rust, without delegation, that means writing every call. [`Layer`]
//! gives each call a default that forwards to the PAL below, plus two
//! hooks around every call (`enter`, `leave`), so a layer overrides only
//! the calls it changes; `Layered` makes any `Layer` a `Pal`.
//!
//! The raw output is not laid out; the committed file is this output
//! passed through rustfmt (see `tests/generated.rs`).

use std::fmt::Write;

use crate::{arg_rust_type, snake_case, upper_snake_case, Spec};

/// A call's method signature, as both impls write it.
struct Sig<'a> {
    name: String,
    params: Vec<String>,
    names: Vec<&'a str>,
    sep: &'static str,
    ret: &'static str,
}

fn sig(c: &crate::Call) -> Sig<'_> {
    let names: Vec<&str> = c.args.iter().map(|a| a.name.as_str()).collect();
    Sig {
        name: snake_case(&c.name),
        params: c
            .args
            .iter()
            .map(|a| format!("{}: {}", a.name, arg_rust_type(&a.ty).expect("validated")))
            .collect(),
        sep: if names.is_empty() { "" } else { ", " },
        names,
        ret: if c.is_never() { "!" } else { "i64" },
    }
}

pub fn render_rust_layer(spec: &Spec) -> String {
    let mut w = String::new();
    let _ = writeln!(w, "{}", crate::rust::RUST_HEADER);
    w.push_str(
        "//! Writing a layer: a [`Pal`] over another [`Pal`], the same ABI in and\n\
         //! out. Implement [`Layer`]: say which PAL is below ([`Layer::inner`]),\n\
         //! override the calls the layer changes (every other call is passed\n\
         //! down unchanged) and, for what concerns every call, the hooks\n\
         //! [`Layer::enter`] and [`Layer::leave`]. [`Layered`] makes the layer a\n\
         //! [`Pal`], to stack under another layer or to make a table from.\n\
         //!\n\
         //! Arguments are what the guest passed: pointers are guest addresses,\n\
         //! not yet checked (the PAL at the bottom checks them), so a layer\n\
         //! that reads through one must check it as a PAL does, or leave it\n\
         //! alone. Calls that do not return get `enter` only.\n\
         #![allow(clippy::too_many_arguments)]\n\
         use crate::abi::*;\n\n\
         /// How a call's arguments are laid out, per argument (for layers that\n\
         /// read them generically, as the tracer does): the kind in the low\n\
         /// nibble ([`arg`]), for bytes the index of the length argument in\n\
         /// the high one. Indexed by call number - 1; unused slots are 0.\n\
         pub mod arg {\n\
         /// An integer (or flags).\n\
         pub const INT: u8 = 0;\n\
         /// A handle.\n\
         pub const HANDLE: u8 = 1;\n\
         /// Bytes the guest passes in (length: the argument in the high nibble).\n\
         pub const BYTES_IN: u8 = 2;\n\
         /// Bytes the call writes out (capacity: the argument in the high nibble).\n\
         pub const BYTES_OUT: u8 = 3;\n\
         /// Where the call writes a new handle.\n\
         pub const HANDLE_OUT: u8 = 4;\n\
         /// Where the call writes (or reads and writes) one value.\n\
         pub const VALUE_OUT: u8 = 5;\n\
         /// Any other pointer (a struct, an array of handles, code).\n\
         pub const OTHER_PTR: u8 = 6;\n\
         }\n\n\
         /// A layer: every call defaults to the PAL below.\n\
         pub trait Layer: Send + Sync {\n\
         /// What [`Layer::enter`] hands [`Layer::leave`] for the same call (a\n\
         /// start time, ...); `()` for most layers.\n\
         type Token: Copy + Default;\n\
         /// The PAL below this layer.\n\
         fn inner(&self) -> &dyn Pal;\n\
         /// Before every call, with its number ([`nr`]) and argument words\n\
         /// (as the guest passed them; unused ones 0).\n\
         fn enter(&self, _nr: u32, _args: &[u64; 6]) -> Self::Token {\n\
         Self::Token::default()\n\
         }\n\
         /// After every call that returns, with its result.\n\
         fn leave(&self, _nr: u32, _args: &[u64; 6], _result: i64, _token: Self::Token) {}\n",
    );
    for c in &spec.calls {
        let Sig {
            name,
            params,
            names,
            sep,
            ret,
        } = sig(c);
        let _ = writeln!(w, "/// `{}`: passed down.", c.name);
        let _ = writeln!(w, "fn {name}(&self{sep}{}) -> {ret} {{", params.join(", "));
        let _ = writeln!(w, "self.inner().{name}({})", names.join(", "));
        let _ = writeln!(w, "}}");
    }
    w.push_str(
        "}\n\n\
         /// A [`Layer`] as a [`Pal`]: each call runs [`Layer::enter`], the\n\
         /// layer's method, then [`Layer::leave`].\n\
         pub struct Layered<L>(pub L);\n\n\
         impl<L: Layer> Pal for Layered<L> {\n",
    );
    for c in &spec.calls {
        let Sig {
            name,
            params,
            names,
            sep,
            ret,
        } = sig(c);
        let nr = format!("nr::{}", upper_snake_case(&c.name));
        // `u64` arguments as they are (no cast for clippy to flag).
        let mut words: Vec<String> = c
            .args
            .iter()
            .map(|a| match a.ty.as_str() {
                "u64" | "handle" => a.name.clone(),
                _ => format!("{} as u64", a.name),
            })
            .collect();
        words.resize(6, "0".into());
        let _ = writeln!(w, "fn {name}(&self{sep}{}) -> {ret} {{", params.join(", "));
        let _ = writeln!(w, "let call_args = [{}];", words.join(", "));
        if c.is_never() {
            let _ = writeln!(w, "self.0.enter({nr}, &call_args);");
            let _ = writeln!(w, "Layer::{name}(&self.0{sep}{})", names.join(", "));
        } else {
            let _ = writeln!(w, "let t = self.0.enter({nr}, &call_args);");
            let _ = writeln!(
                w,
                "let r = Layer::{name}(&self.0{sep}{});",
                names.join(", ")
            );
            let _ = writeln!(w, "self.0.leave({nr}, &call_args, r, t);");
            let _ = writeln!(w, "r");
        }
        let _ = writeln!(w, "}}");
    }
    w.push_str("}\n\n");
    let _ = writeln!(
        w,
        "/// Argument layout per call (see [`arg`]), indexed by call number - 1.\n\
         pub const ARGS: [[u8; 6]; {}] = [",
        spec.calls.len()
    );
    for c in &spec.calls {
        let mut cells = Vec::new();
        for a in &c.args {
            // The values of the `arg` constants above.
            let kind = match a.ty.as_str() {
                "u32" | "i32" | "u64" | "i64" => 0,
                "handle" => 1,
                "bytes_in" => 2,
                "bytes_out" => 3,
                "handle_out" => 4,
                "i32_out" | "u64_inout" => 5,
                _ => 6,
            };
            let len = a
                .len
                .as_ref()
                .and_then(|l| c.args.iter().position(|x| &x.name == l))
                .unwrap_or(0);
            cells.push(format!("{:#04x}", kind | (len << 4)));
        }
        cells.resize(6, "0".into());
        let names: Vec<&str> = c.args.iter().map(|a| a.name.as_str()).collect();
        let _ = writeln!(
            w,
            "// {}({})\n[{}],",
            c.name,
            names.join(", "),
            cells.join(", ")
        );
    }
    w.push_str("];\n\n");
    let _ = writeln!(
        w,
        "/// Argument names per call, indexed by call number - 1.\n\
         pub const ARG_NAMES: [&[&str]; {}] = [",
        spec.calls.len()
    );
    for c in &spec.calls {
        let names: Vec<String> = c.args.iter().map(|a| format!("\"{}\"", a.name)).collect();
        let _ = writeln!(w, "&[{}],", names.join(", "));
    }
    w.push_str("];\n\n");
    let _ = writeln!(
        w,
        "/// Each call's group (`memory`, `threads`, ...), indexed by call number - 1.\n\
         pub const CALL_GROUPS: [&str; {}] = [",
        spec.calls.len()
    );
    for c in &spec.calls {
        let _ = writeln!(w, "\"{}\",", c.group);
    }
    w.push_str("];\n");
    w
}
