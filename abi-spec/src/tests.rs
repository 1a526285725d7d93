//! Unit tests: the embedded spec is valid, and validation rejects broken
//! variants of it.

use super::*;

#[test]
fn embedded_spec_is_valid() {
    let s = parse(SPEC_TOML).unwrap();
    assert_eq!(s.calls.len(), 45);
    assert_eq!(s.version_parts(), (1, 1));
    assert!(render("json").is_some() && render("md").is_some() && render("c").is_some());
    assert!(render("xml").is_none());
}

#[test]
fn case_conversion() {
    assert_eq!(
        snake_case("DkVirtualMemoryAlloc"),
        "dk_virtual_memory_alloc"
    );
    assert_eq!(snake_case("DkStreamMapPeBinary"), "dk_stream_map_pe_binary");
    assert_eq!(snake_case("OpenOption"), "open_option");
    assert_eq!(snake_case("Prot"), "prot");
    assert_eq!(upper_snake_case("Io"), "IO");
    assert_eq!(upper_snake_case("InvalidUri"), "INVALID_URI");
}

fn replace_once(text: &str, from: &str, to: &str) -> String {
    assert!(
        text.contains(from),
        "test fixture: {from:?} not in abi.toml"
    );
    text.replacen(from, to, 1)
}

#[test]
fn rejects_renumbered_call() {
    let t = replace_once(SPEC_TOML, "number = 2\n", "number = 1\n");
    assert!(matches!(
        parse(&t),
        Err(SpecError::CallNumber {
            expected: 2,
            found: 1,
            ..
        })
    ));
    let t = replace_once(SPEC_TOML, "number = 45\n", "number = 46\n");
    assert!(matches!(parse(&t), Err(SpecError::CallNumber { .. })));
}

#[test]
fn rejects_duplicate_call_name() {
    let t = replace_once(
        SPEC_TOML,
        "name = \"DkVirtualMemoryFree\"",
        "name = \"DkVirtualMemoryAlloc\"",
    );
    assert!(matches!(
        parse(&t),
        Err(SpecError::DuplicateName { what: "call", .. })
    ));
}

#[test]
fn rejects_unknown_arg_type() {
    let t = replace_once(
        SPEC_TOML,
        "{ name = \"micros\", type = \"u64\"",
        "{ name = \"micros\", type = \"usize\"",
    );
    assert!(matches!(parse(&t), Err(SpecError::UnknownType { ty, .. }) if ty == "usize"));
}

#[test]
fn rejects_len_naming_missing_arg() {
    let t = replace_once(SPEC_TOML, "len = \"uri_len\"", "len = \"url_len\"");
    assert!(matches!(parse(&t), Err(SpecError::BadLen { len, .. }) if len == "url_len"));
}

#[test]
fn rejects_len_naming_non_u64_arg() {
    let t = replace_once(SPEC_TOML, "len = \"uri_len\"", "len = \"access\"");
    assert!(matches!(parse(&t), Err(SpecError::BadLen { .. })));
}

#[test]
fn rejects_unknown_error() {
    let t = replace_once(
        SPEC_TOML,
        "errors = [\"InvalidArgument\", \"NoMemory\", \"AlreadyExists\"]",
        "errors = [\"InvalidArgument\", \"OutOfMemory\", \"AlreadyExists\"]",
    );
    assert!(
        matches!(parse(&t), Err(SpecError::UnknownError { error, .. }) if error == "OutOfMemory")
    );
}

#[test]
fn rejects_unknown_key() {
    let t = replace_once(SPEC_TOML, "number = 3\n", "number = 3\nflags = 1\n");
    assert!(matches!(parse(&t), Err(SpecError::Toml(_))));
    let t = replace_once(
        SPEC_TOML,
        "version = \"1.1\"",
        "version = \"1.1\"\nname = \"x\"",
    );
    assert!(matches!(parse(&t), Err(SpecError::Toml(_))));
}

#[test]
fn rejects_duplicate_error_code() {
    let t = replace_once(SPEC_TOML, "code = 2\n", "code = 1\n");
    assert!(matches!(
        parse(&t),
        Err(SpecError::DuplicateErrorCode { code: 1, .. })
    ));
}

#[test]
fn rejects_unknown_field_type() {
    let t = replace_once(
        SPEC_TOML,
        "{ name = \"base\", type = \"u64\"",
        "{ name = \"base\", type = \"ptr\"",
    );
    assert!(matches!(parse(&t), Err(SpecError::UnknownType { .. })));
}

#[test]
fn rejects_bad_version() {
    let t = replace_once(SPEC_TOML, "version = \"1.1\"", "version = \"1\"");
    assert!(matches!(parse(&t), Err(SpecError::Version(_))));
}

#[test]
fn limits_keep_file_order() {
    let s = spec();
    assert_eq!(s.limits.0[0], ("max_uri_len".to_string(), 4096));
    assert_eq!(s.limits.0.last().unwrap().0, "page_size");
}

#[test]
fn adapter_checks_every_length_before_any_pointer() {
    // The documented order (pal/src/host.rs): lengths, then pointers. A
    // call with two bounded buffers (DkProcessCreate) once checked the
    // first buffer's pointer before the second buffer's length, so a bad
    // pointer there won over a bad length.
    let code = render_rust_host(spec());
    let mut bodies = code.split("fn dk_").skip(1).peekable();
    assert!(bodies.peek().is_some());
    for body in bodies {
        let body = body.split("\n    fn ").next().unwrap();
        let first_pointer = ["checked(self", "check_guest("]
            .iter()
            .filter_map(|p| body.find(p))
            .min();
        let (Some(p), Some(l)) = (first_pointer, body.rfind("InvalidArgument.code()")) else {
            continue;
        };
        let name = body.split('(').next().unwrap();
        assert!(l < p, "dk_{name} checks a length after a pointer");
    }
}
