//! Canonical JSON rendering (also what `frozen/<version>.json` holds).

use serde::Serialize;

use crate::{arg_c_type, field_c_type, upcall_arg_c_type, Arg, ErrorDef, Limits, Scheme, Spec};

#[derive(Serialize)]
struct JSpec<'a> {
    version: &'a str,
    limits: &'a Limits,
    errors: &'a [ErrorDef],
    constants: Vec<JConstants<'a>>,
    structs: Vec<JStruct<'a>>,
    calls: Vec<JCall<'a>>,
    upcalls: Vec<JUpcall<'a>>,
    schemes: &'a [Scheme],
}

#[derive(Serialize)]
struct JConstants<'a> {
    group: &'a str,
    doc: &'a str,
    #[serde(rename = "type")]
    ty: &'static str,
    values: &'a [crate::ConstantValue],
}

#[derive(Serialize)]
struct JStruct<'a> {
    name: &'a str,
    doc: &'a str,
    fields: Vec<JField<'a>>,
}

#[derive(Serialize)]
struct JField<'a> {
    name: &'a str,
    #[serde(rename = "type")]
    ty: &'a str,
    c_type: &'static str,
    doc: &'a str,
}

#[derive(Serialize)]
struct JCall<'a> {
    name: &'a str,
    number: u32,
    group: &'a str,
    doc: &'a str,
    args: Vec<JArg<'a>>,
    result: &'a str,
    errors: &'a [String],
}

#[derive(Serialize)]
struct JArg<'a> {
    name: &'a str,
    #[serde(rename = "type")]
    ty: &'a str,
    c_type: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    len: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    doc: Option<&'a str>,
}

#[derive(Serialize)]
struct JUpcall<'a> {
    name: &'a str,
    doc: &'a str,
    args: Vec<JArg<'a>>,
    result: &'a str,
}

fn jarg<'a>(a: &'a Arg, c_type: Option<&'static str>) -> JArg<'a> {
    JArg {
        name: &a.name,
        ty: &a.ty,
        c_type: c_type.expect("validated"),
        len: a.len.as_deref(),
        doc: a.doc.as_deref(),
    }
}

/// The spec as pretty-printed JSON (ends with a newline).
pub fn render_json(spec: &Spec) -> String {
    let j = JSpec {
        version: &spec.version,
        limits: &spec.limits,
        errors: &spec.errors,
        constants: spec
            .constants
            .iter()
            .map(|g| JConstants {
                group: &g.group,
                doc: &g.doc,
                ty: g.value_type(),
                values: &g.values,
            })
            .collect(),
        structs: spec
            .structs
            .iter()
            .map(|s| JStruct {
                name: &s.name,
                doc: &s.doc,
                fields: s
                    .fields
                    .iter()
                    .map(|f| JField {
                        name: &f.name,
                        ty: &f.ty,
                        c_type: field_c_type(&f.ty).expect("validated"),
                        doc: &f.doc,
                    })
                    .collect(),
            })
            .collect(),
        calls: spec
            .calls
            .iter()
            .map(|c| JCall {
                name: &c.name,
                number: c.number,
                group: &c.group,
                doc: &c.doc,
                args: c.args.iter().map(|a| jarg(a, arg_c_type(&a.ty))).collect(),
                result: &c.result,
                errors: &c.errors,
            })
            .collect(),
        upcalls: spec
            .upcalls
            .iter()
            .map(|u| JUpcall {
                name: &u.name,
                doc: &u.doc,
                args: u
                    .args
                    .iter()
                    .map(|a| jarg(a, upcall_arg_c_type(&a.ty)))
                    .collect(),
                result: &u.result,
            })
            .collect(),
        schemes: &spec.schemes,
    };
    let mut s = serde_json::to_string_pretty(&j).expect("serializable");
    s.push('\n');
    s
}
