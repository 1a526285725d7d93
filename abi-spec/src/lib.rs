//! The moat picoprocess ABI as data.
//!
//! `abi.toml` (next to this crate's `Cargo.toml`) is the single source of
//! truth: every call with its number, arguments, result and errors, the
//! upcalls, the error codes, constants, structs and URI schemes. This crate
//! parses and validates it ([`spec`], [`parse`]) and renders it as JSON
//! ([`render_json`]), a Markdown reference ([`render_markdown`]), a C header
//! ([`render_c_header`]), the Rust modules `pal/src/abi.rs`
//! ([`render_rust`]),
//! `pal/src/layer.rs` ([`render_rust_layer`]) and
//! `pal/src/dispatch.rs` ([`render_rust_dispatch`]), and libos's raw calls
//! `libos/src/raw/calls.rs` ([`render_libos_raw_calls`]).
//!
//! The generated files are committed; `tests/generated.rs` checks that they
//! are up to date (`MOAT_BLESS=1 cargo test -p moat-abi-spec` rewrites them)
//! and `tests/freeze.rs` checks that released versions never change.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::OnceLock;

use serde::de::{MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

mod c;
mod dispatch;
mod host;
mod json;
mod layer;
mod libos_raw;
mod markdown;
mod rust;

pub use c::render_c_header;
pub use dispatch::render_rust_dispatch;
pub use host::{group_trait, render_rust_host};
pub use json::render_json;
pub use layer::render_rust_layer;
pub use libos_raw::render_libos_raw_calls;
pub use markdown::render_markdown;
pub use rust::render_rust;

/// The text of the embedded `abi.toml`.
pub const SPEC_TOML: &str = include_str!("../abi.toml");

/// The magic value of `StartupBlock.magic` ("MOAT" read as a little-endian u32).
pub const STARTUP_MAGIC: u64 = 0x5441_4f4d;

/// The whole ABI.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    /// "MAJOR.MINOR".
    pub version: String,
    /// Numeric limits, in file order.
    pub limits: Limits,
    #[serde(rename = "error", default)]
    pub errors: Vec<ErrorDef>,
    #[serde(rename = "constant", default)]
    pub constants: Vec<ConstantGroup>,
    #[serde(rename = "struct", default)]
    pub structs: Vec<StructDef>,
    #[serde(rename = "call", default)]
    pub calls: Vec<Call>,
    #[serde(rename = "upcall", default)]
    pub upcalls: Vec<Upcall>,
    #[serde(rename = "scheme", default)]
    pub schemes: Vec<Scheme>,
}

/// The `[limits]` table, keeping the file's order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Limits(pub Vec<(String, u64)>);

impl<'de> Deserialize<'de> for Limits {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Limits;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a table of non-negative integers")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Limits, A::Error> {
                let mut out = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, u64>()? {
                    out.push((k, v));
                }
                Ok(Limits(out))
            }
        }
        d.deserialize_map(V)
    }
}

impl Serialize for Limits {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            m.serialize_entry(k, v)?;
        }
        m.end()
    }
}

/// One error code.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorDef {
    pub name: String,
    /// Positive; a call returns `-code`.
    pub code: u32,
    pub doc: String,
}

/// A named group of constants.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConstantGroup {
    pub group: String,
    pub doc: String,
    pub values: Vec<ConstantValue>,
}

impl ConstantGroup {
    /// `"i64"` if any value is negative, else `"u32"`.
    pub fn value_type(&self) -> &'static str {
        if self.values.iter().any(|v| v.value < 0) {
            "i64"
        } else {
            "u32"
        }
    }
}

/// One constant of a group.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ConstantValue {
    pub name: String,
    pub value: i64,
}

/// A `#[repr(C)]` struct shared by host and guest.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StructDef {
    pub name: String,
    pub doc: String,
    pub fields: Vec<Field>,
}

/// A struct field.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Field {
    pub name: String,
    #[serde(rename = "type")]
    pub ty: String,
    pub doc: String,
}

/// One call of the PAL table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Call {
    pub name: String,
    pub number: u32,
    pub group: String,
    pub doc: String,
    pub args: Vec<Arg>,
    /// Meaning of a non-negative result, or `never`.
    pub result: String,
    pub errors: Vec<String>,
}

impl Call {
    /// Whether the call does not return.
    pub fn is_never(&self) -> bool {
        self.result == "never"
    }
}

/// A call or upcall argument.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Arg {
    pub name: String,
    #[serde(rename = "type")]
    pub ty: String,
    /// For pointer arguments: the argument giving the length or count.
    #[serde(default)]
    pub len: Option<String>,
    #[serde(default)]
    pub doc: Option<String>,
}

/// A function the guest provides and the host calls.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Upcall {
    pub name: String,
    /// `never` or `i64`.
    pub result: String,
    pub doc: String,
    pub args: Vec<Arg>,
}

/// A stream URI scheme.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Scheme {
    pub name: String,
    pub doc: String,
}

/// Why a spec is invalid.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("abi.toml does not parse: {0}")]
    Toml(#[from] toml::de::Error),
    #[error("bad version {0:?}: expected MAJOR.MINOR")]
    Version(String),
    #[error(
        "call {name} has number {found}, expected {expected} (numbers are 1..=N in file order)"
    )]
    CallNumber {
        name: String,
        expected: u32,
        found: u32,
    },
    #[error("duplicate {what} name {name:?}")]
    DuplicateName { what: &'static str, name: String },
    #[error("duplicate error code {code} ({name})")]
    DuplicateErrorCode { name: String, code: u32 },
    #[error("{owner}: {arg} has unknown type {ty:?}")]
    UnknownType {
        owner: String,
        arg: String,
        ty: String,
    },
    #[error("{call}: {arg} has bad `len` {len:?}: {why}")]
    BadLen {
        call: String,
        arg: String,
        len: String,
        why: &'static str,
    },
    #[error("{call}: unknown error {error:?}")]
    UnknownError { call: String, error: String },
    #[error("{0}")]
    Invalid(String),
}

/// Argument types of calls: (name, Rust type, C type).
pub const ARG_TYPES: &[(&str, &str, &str)] = &[
    ("u32", "u32", "uint32_t"),
    ("i32", "i32", "int32_t"),
    ("u64", "u64", "uint64_t"),
    ("i64", "i64", "int64_t"),
    ("handle", "u64", "uint64_t"),
    ("bytes_in", "*const u8", "const uint8_t *"),
    ("bytes_out", "*mut u8", "uint8_t *"),
    ("handles_in", "*const u64", "const uint64_t *"),
    ("handle_out", "*mut u64", "uint64_t *"),
    ("u64_out", "*mut u64", "uint64_t *"),
    ("u64_inout", "*mut u64", "uint64_t *"),
    ("i32_out", "*mut i32", "int32_t *"),
    (
        "attrs_out",
        "*mut StreamAttributes",
        "moat_stream_attributes *",
    ),
    ("image_out", "*mut ImageInfo", "moat_image_info *"),
];

/// Argument types of upcalls: (name, Rust type, C type).
pub const UPCALL_ARG_TYPES: &[(&str, &str, &str)] = &[
    ("u32", "u32", "uint32_t"),
    ("i32", "i32", "int32_t"),
    ("u64", "u64", "uint64_t"),
    ("i64", "i64", "int64_t"),
    (
        "startup_ptr",
        "*const StartupBlock",
        "const moat_startup_block *",
    ),
    (
        "exception_ptr",
        "*mut ExceptionInfo",
        "moat_exception_info *",
    ),
];

/// Struct field types: (name, Rust type, C type).
pub const FIELD_TYPES: &[(&str, &str, &str)] = &[
    ("u32", "u32", "uint32_t"),
    ("i32", "i32", "int32_t"),
    ("u64", "u64", "uint64_t"),
    ("i64", "i64", "int64_t"),
    (
        "table_ptr",
        "*const PalTable",
        "const struct moat_pal_table *",
    ),
];

/// The bounds a length argument's doc gives: `MIN to LIMIT` (a name of
/// the `[limits]` table) or `at least MIN`, as `(min, max)`; `None` if the
/// doc says neither. The generated host adapter refuses a length outside
/// them with `InvalidArgument` before it checks the buffer.
pub fn len_bounds(limits: &Limits, doc: &str) -> Option<(u64, Option<u64>)> {
    let doc = doc.trim();
    if let Some(min) = doc.strip_prefix("at least ") {
        return Some((min.trim().parse().ok()?, None));
    }
    let (min, max) = doc.split_once(" to ")?;
    let min = min.trim().parse().ok()?;
    let max = limits.0.iter().find(|(k, _)| k == max.trim())?.1;
    Some((min, Some(max)))
}

/// Argument types that point at a buffer whose size another argument gives.
pub const LEN_TYPES: &[&str] = &["bytes_in", "bytes_out", "handles_in"];

fn lookup(
    table: &[(&str, &'static str, &'static str)],
    ty: &str,
) -> Option<(&'static str, &'static str)> {
    table
        .iter()
        .find(|(n, _, _)| *n == ty)
        .map(|(_, r, c)| (*r, *c))
}

/// Rust type of a call argument type.
pub fn arg_rust_type(ty: &str) -> Option<&'static str> {
    lookup(ARG_TYPES, ty).map(|t| t.0)
}

/// C type of a call argument type.
pub fn arg_c_type(ty: &str) -> Option<&'static str> {
    lookup(ARG_TYPES, ty).map(|t| t.1)
}

/// Rust type of an upcall argument type.
pub fn upcall_arg_rust_type(ty: &str) -> Option<&'static str> {
    lookup(UPCALL_ARG_TYPES, ty).map(|t| t.0)
}

/// C type of an upcall argument type.
pub fn upcall_arg_c_type(ty: &str) -> Option<&'static str> {
    lookup(UPCALL_ARG_TYPES, ty).map(|t| t.1)
}

/// Rust type of a struct field type.
pub fn field_rust_type(ty: &str) -> Option<&'static str> {
    lookup(FIELD_TYPES, ty).map(|t| t.0)
}

/// C type of a struct field type.
pub fn field_c_type(ty: &str) -> Option<&'static str> {
    lookup(FIELD_TYPES, ty).map(|t| t.1)
}

/// `DkVirtualMemoryAlloc` -> `dk_virtual_memory_alloc`.
pub fn snake_case(name: &str) -> String {
    let chars: Vec<char> = name.chars().collect();
    let mut out = String::new();
    for (i, &c) in chars.iter().enumerate() {
        if c.is_ascii_uppercase() {
            let prev_lower =
                i > 0 && (chars[i - 1].is_ascii_lowercase() || chars[i - 1].is_ascii_digit());
            let acronym_end = i > 0
                && chars[i - 1].is_ascii_uppercase()
                && chars.get(i + 1).is_some_and(|n| n.is_ascii_lowercase());
            if prev_lower || acronym_end {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// `DkVirtualMemoryAlloc` -> `DK_VIRTUAL_MEMORY_ALLOC`.
pub fn upper_snake_case(name: &str) -> String {
    snake_case(name).to_ascii_uppercase()
}

impl Spec {
    /// (major, minor) of `version`.
    pub fn version_parts(&self) -> (u16, u16) {
        parse_version(&self.version).expect("validated")
    }

    /// The error named `name`.
    pub fn error(&self, name: &str) -> Option<&ErrorDef> {
        self.errors.iter().find(|e| e.name == name)
    }

    /// Call groups in order of first appearance.
    pub fn groups(&self) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        for c in &self.calls {
            if !out.contains(&c.group.as_str()) {
                out.push(&c.group);
            }
        }
        out
    }
}

/// Parse "MAJOR.MINOR".
pub fn parse_version(v: &str) -> Option<(u16, u16)> {
    let (a, b) = v.split_once('.')?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(a) || !digits(b) {
        return None;
    }
    Some((a.parse().ok()?, b.parse().ok()?))
}

fn is_ident(s: &str) -> bool {
    let mut it = s.chars();
    matches!(it.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && it.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn unique<'a>(
    what: &'static str,
    names: impl IntoIterator<Item = &'a str>,
) -> Result<(), SpecError> {
    let mut seen = BTreeSet::new();
    for n in names {
        if !seen.insert(n) {
            return Err(SpecError::DuplicateName {
                what,
                name: n.to_string(),
            });
        }
    }
    Ok(())
}

fn invalid(msg: impl Into<String>) -> SpecError {
    SpecError::Invalid(msg.into())
}

/// Parse and validate a spec.
pub fn parse(text: &str) -> Result<Spec, SpecError> {
    let spec: Spec = toml::from_str(text)?;
    validate(&spec)?;
    Ok(spec)
}

fn validate(spec: &Spec) -> Result<(), SpecError> {
    if parse_version(&spec.version).is_none() {
        return Err(SpecError::Version(spec.version.clone()));
    }

    // limits
    unique("limit", spec.limits.0.iter().map(|(k, _)| k.as_str()))?;
    for (k, _) in &spec.limits.0 {
        if !is_ident(k) || k.chars().any(|c| c.is_ascii_uppercase()) {
            return Err(invalid(format!("limit name {k:?} is not snake_case")));
        }
    }

    // errors
    unique("error", spec.errors.iter().map(|e| e.name.as_str()))?;
    let mut codes = BTreeMap::new();
    for e in &spec.errors {
        if !is_ident(&e.name) {
            return Err(invalid(format!(
                "error name {:?} is not an identifier",
                e.name
            )));
        }
        if e.code == 0 || e.code > i32::MAX as u32 {
            return Err(invalid(format!(
                "error {} has code {}, expected 1..2^31",
                e.name, e.code
            )));
        }
        if codes.insert(e.code, &e.name).is_some() {
            return Err(SpecError::DuplicateErrorCode {
                name: e.name.clone(),
                code: e.code,
            });
        }
    }

    // constants
    unique(
        "constant group",
        spec.constants.iter().map(|g| g.group.as_str()),
    )?;
    for g in &spec.constants {
        if !is_ident(&g.group) {
            return Err(invalid(format!(
                "constant group {:?} is not an identifier",
                g.group
            )));
        }
        unique("constant", g.values.iter().map(|v| v.name.as_str()))?;
        for v in &g.values {
            if !is_ident(&v.name) {
                return Err(invalid(format!(
                    "constant {:?} is not an identifier",
                    v.name
                )));
            }
            if g.value_type() == "u32" && v.value > u32::MAX as i64 {
                return Err(invalid(format!(
                    "constant {}::{} does not fit u32",
                    g.group, v.name
                )));
            }
        }
    }

    // structs
    unique("struct", spec.structs.iter().map(|s| s.name.as_str()))?;
    for s in &spec.structs {
        if !is_ident(&s.name) {
            return Err(invalid(format!(
                "struct name {:?} is not an identifier",
                s.name
            )));
        }
        unique("field", s.fields.iter().map(|f| f.name.as_str()))?;
        for f in &s.fields {
            if field_rust_type(&f.ty).is_none() {
                return Err(SpecError::UnknownType {
                    owner: s.name.clone(),
                    arg: f.name.clone(),
                    ty: f.ty.clone(),
                });
            }
        }
    }
    for needed in [
        "StreamAttributes",
        "ImageInfo",
        "ExceptionInfo",
        "StartupBlock",
    ] {
        if !spec.structs.iter().any(|s| s.name == needed) {
            return Err(invalid(format!(
                "struct {needed} is missing (argument types refer to it)"
            )));
        }
    }

    // calls
    unique("call", spec.calls.iter().map(|c| c.name.as_str()))?;
    for (i, c) in spec.calls.iter().enumerate() {
        let expected = i as u32 + 1;
        if c.number != expected {
            return Err(SpecError::CallNumber {
                name: c.name.clone(),
                expected,
                found: c.number,
            });
        }
        if !is_ident(&c.name) {
            return Err(invalid(format!(
                "call name {:?} is not an identifier",
                c.name
            )));
        }
        if c.group.is_empty() {
            return Err(invalid(format!("{}: empty group", c.name)));
        }
        unique("argument", c.args.iter().map(|a| a.name.as_str()))?;
        for a in &c.args {
            if !is_ident(&a.name) || a.name == "ctx" || a.name == "self" {
                return Err(invalid(format!(
                    "{}: bad argument name {:?}",
                    c.name, a.name
                )));
            }
            if arg_rust_type(&a.ty).is_none() {
                return Err(SpecError::UnknownType {
                    owner: c.name.clone(),
                    arg: a.name.clone(),
                    ty: a.ty.clone(),
                });
            }
            let bad_len = |len: &str, why| SpecError::BadLen {
                call: c.name.clone(),
                arg: a.name.clone(),
                len: len.to_string(),
                why,
            };
            match (&a.len, LEN_TYPES.contains(&a.ty.as_str())) {
                (Some(len), true) => match c.args.iter().find(|b| &b.name == len) {
                    None => return Err(bad_len(len, "no such argument")),
                    Some(b) if b.ty != "u64" && !(a.ty == "handles_in" && b.ty == "u32") => {
                        return Err(bad_len(len, "the length argument must be u64"))
                    }
                    Some(b) => {
                        if let Some(d) = &b.doc {
                            if len_bounds(&spec.limits, d).is_none() {
                                return Err(bad_len(
                                    len,
                                    "its doc must say its bounds as `MIN to LIMIT` (a [limits] name) or `at least MIN`",
                                ));
                            }
                        }
                    }
                },
                (Some(len), false) => {
                    return Err(bad_len(
                        len,
                        "only bytes_in, bytes_out and handles_in take `len`",
                    ))
                }
                (None, true) => return Err(bad_len("", "a buffer argument needs `len`")),
                (None, false) => {}
            }
        }
        unique("error in call", c.errors.iter().map(|e| e.as_str()))?;
        for e in &c.errors {
            if spec.error(e).is_none() {
                return Err(SpecError::UnknownError {
                    call: c.name.clone(),
                    error: e.clone(),
                });
            }
        }
        if c.is_never() && !c.errors.is_empty() {
            return Err(invalid(format!(
                "{}: a call that does not return has no errors",
                c.name
            )));
        }
    }

    // upcalls
    unique("upcall", spec.upcalls.iter().map(|u| u.name.as_str()))?;
    for u in &spec.upcalls {
        if !is_ident(&u.name) {
            return Err(invalid(format!(
                "upcall name {:?} is not an identifier",
                u.name
            )));
        }
        if u.result != "never" && u.result != "i64" {
            return Err(invalid(format!(
                "{}: result must be `never` or `i64`",
                u.name
            )));
        }
        unique("argument", u.args.iter().map(|a| a.name.as_str()))?;
        for a in &u.args {
            if upcall_arg_rust_type(&a.ty).is_none() {
                return Err(SpecError::UnknownType {
                    owner: u.name.clone(),
                    arg: a.name.clone(),
                    ty: a.ty.clone(),
                });
            }
            if a.len.is_some() {
                return Err(invalid(format!(
                    "{}: upcall arguments take no `len`",
                    u.name
                )));
            }
        }
    }

    unique("scheme", spec.schemes.iter().map(|s| s.name.as_str()))?;
    Ok(())
}

/// The embedded spec, parsed once.
///
/// Panics if the embedded `abi.toml` is invalid (a test guards this).
pub fn spec() -> &'static Spec {
    static SPEC: OnceLock<Spec> = OnceLock::new();
    SPEC.get_or_init(|| match parse(SPEC_TOML) {
        Ok(s) => s,
        Err(e) => panic!("the embedded abi.toml is invalid: {e}"),
    })
}

/// Render the embedded spec: `json`, `md` or `c`.
pub fn render(format: &str) -> Option<String> {
    let s = spec();
    match format {
        "json" => Some(render_json(s)),
        "md" => Some(render_markdown(s)),
        "c" => Some(render_c_header(s)),
        _ => None,
    }
}

#[cfg(test)]
mod tests;
