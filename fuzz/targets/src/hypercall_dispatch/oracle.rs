//! The oracle: from the ABI spec and the guest's memory before a call,
//! what the adapter must do with it ([`expect`]), and the check of what it
//! did ([`verify`]); and the argument words the fuzzer tries ([`word`]).
use super::*;

/// Values worth trying for an argument word: bounds of the spec's limits,
/// the window's edges, overflows, truncations.
const SPECIAL: [u64; 32] = [
    0,
    1,
    8,
    64,
    65,
    255,
    256,
    4095,
    4096,
    4097,
    4096 * 4,
    65536,
    65537,
    1 << 30,
    (1 << 30) + 1,
    u32::MAX as u64,
    1 << 32,
    (1 << 32) + 1,
    (1 << 32) + 64,
    (1 << 32) + 65,
    i64::MAX as u64,
    1 << 63,
    u64::MAX,
    u64::MAX - 7,
    u64::MAX / 8 + 1,
    LO,
    LO - 8,
    HI,
    HI - 8,
    HI - 1,
    LO + PAGE,
    0x0000_8000_0000_0000,
];

/// One argument word: small numbers, guest addresses and edge values
/// are likelier than a uniform `u64` would make them.
pub(super) fn word(inp: &mut Input) -> u64 {
    let sel = inp.u8();
    let hi = u64::from(sel >> 3);
    match sel & 7 {
        0 => hi,
        1 => inp.u8().into(),
        2 => inp.u16().into(),
        3 => inp.u64(),
        4 | 5 => LO + u64::from(inp.u16()),
        6 => LO + u64::from(inp.u8() % PAGES as u8) * PAGE + hi * 8,
        _ => SPECIAL[(hi as usize) % SPECIAL.len()],
    }
}

/// What the spec says the adapter must do with a call.
#[derive(Debug)]
pub(super) enum Expect {
    /// No such call, or one that does not return: not dispatched.
    NotDispatched,
    /// Refused before the host is called.
    Refused(Error),
    /// The host is called with these; then these `(addr, size)` are
    /// written, in order, on success.
    Called {
        call: HostCall,
        writes: Vec<(u64, u64)>,
    },
}

/// An argument word as the dispatcher truncates it to the spec's type.
fn truncate(w: u64, ty: &str) -> u64 {
    match ty {
        "u32" | "i32" => u64::from(w as u32),
        _ => w,
    }
}

/// Bytes an out-pointer of type `ty` receives.
fn out_size(ty: &str) -> Option<u64> {
    Some(match ty {
        "handle_out" | "u64_inout" => 8,
        "i32_out" => 4,
        "attrs_out" => std::mem::size_of::<StreamAttributes>() as u64,
        "image_out" => std::mem::size_of::<ImageInfo>() as u64,
        _ => return None,
    })
}

/// The oracle: what the adapter must do with call `nr` and `words`, from
/// the spec and the guest's memory as it is before the call.
pub(super) fn expect(spec: &Spec, g: &Guest, nr: u32, words: &[u64; 6]) -> Expect {
    let Some(c) = spec.calls.iter().find(|c| c.number == nr) else {
        return Expect::NotDispatched;
    };
    if c.is_never() {
        return Expect::NotDispatched;
    }
    assert!(c.args.len() <= 6, "{} has more than six arguments", c.name);
    let index = |name: &str| c.args.iter().position(|a| a.name == name).unwrap();
    let value = |i: usize| truncate(words[i], &c.args[i].ty);
    let len_args: Vec<usize> = c
        .args
        .iter()
        .filter(|a| LEN_TYPES.contains(&a.ty.as_str()))
        .map(|a| index(a.len.as_deref().unwrap()))
        .collect();
    // Lengths first.
    for &j in &len_args {
        let l = value(j);
        let doc = c.args[j].doc.as_deref().unwrap_or("");
        if let Some((min, max)) = len_bounds(&spec.limits, doc) {
            if l < min || max.is_some_and(|m| l > m) {
                return Expect::Refused(Error::InvalidArgument);
            }
        }
    }
    // Then pointers, in argument order.
    let mut call = HostCall {
        nr,
        ..HostCall::default()
    };
    let mut writes = Vec::new();
    for (i, a) in c.args.iter().enumerate() {
        let w = words[i];
        let len = || value(index(a.len.as_deref().unwrap()));
        let ok = match a.ty.as_str() {
            "bytes_in" => {
                let l = len();
                call.ins.push((w, l));
                l == 0 || g.model_ok(w, l, prot::READ)
            }
            "bytes_out" => {
                let l = len();
                call.outs.push((w, l));
                l == 0 || g.model_ok(w, l, prot::READ | prot::WRITE)
            }
            "handles_in" => {
                let n = len();
                let ok = n
                    .checked_mul(8)
                    .is_some_and(|b| g.model_ok(w, b, prot::READ));
                if ok {
                    call.handles = (0..n).map(|k| g.ram_u64(w + 8 * k)).collect();
                }
                ok
            }
            t => match out_size(t) {
                Some(size) => {
                    let ok = g.model_ok(w, size, prot::READ | prot::WRITE);
                    if ok && t == "u64_inout" {
                        call.inout = Some(g.ram_u64(w));
                    }
                    writes.push((w, size));
                    ok
                }
                None => {
                    if !len_args.contains(&i) {
                        call.scalars.push(value(i));
                    }
                    true
                }
            },
        };
        if !ok {
            return Expect::Refused(Error::BadAddress);
        }
    }
    Expect::Called { call, writes }
}

/// Check what happened against what the oracle said.
pub(super) fn verify(expect: Expect, nr: u32, ret: Option<i64>, events: &[Event]) {
    match expect {
        Expect::NotDispatched => {
            assert_eq!(ret, None, "call {nr} should not be dispatched");
            assert!(events.is_empty(), "call {nr}: {events:?}");
        }
        Expect::Refused(e) => {
            assert_eq!(ret, Some(e.code()), "call {nr} should fail with {e:?}");
            assert!(
                !events.iter().any(|e| matches!(e, Event::Call(_))),
                "call {nr} reached the host though it should fail: {events:?}"
            );
            assert!(
                !events.iter().any(|e| matches!(e, Event::Write { .. })),
                "call {nr} failed but wrote guest memory: {events:?}"
            );
        }
        Expect::Called { call, writes } => {
            let calls: Vec<&HostCall> = events
                .iter()
                .filter_map(|e| match e {
                    Event::Call(c) => Some(c),
                    _ => None,
                })
                .collect();
            assert_eq!(calls.len(), 1, "call {nr}: the host was called {calls:?}");
            let got = calls[0];
            let mut want = call;
            want.ret = got.ret;
            want.out_values = got.out_values.clone();
            assert_eq!(*got, want, "call {nr}: the host got other arguments");
            let done: Vec<(u64, u64, Option<u64>)> = events
                .iter()
                .skip_while(|e| !matches!(e, Event::Call(_)))
                .filter_map(|e| match e {
                    Event::Write { addr, size, value } => Some((*addr, *size, *value)),
                    _ => None,
                })
                .collect();
            match got.ret {
                Ok(r) => {
                    assert_eq!(ret, Some(r), "call {nr}: wrong return value");
                    let at: Vec<(u64, u64)> = done.iter().map(|w| (w.0, w.1)).collect();
                    assert_eq!(at, writes, "call {nr}: out-values written elsewhere");
                    let values: Vec<u64> = done.iter().filter_map(|w| w.2).collect();
                    assert_eq!(values, got.out_values, "call {nr}: wrong out-values");
                }
                Err(e) => {
                    assert_eq!(ret, Some(e.code()), "call {nr}: the host's error is lost");
                    assert!(done.is_empty(), "call {nr} failed but wrote {done:?}");
                }
            }
            assert!(
                !events
                    .iter()
                    .take_while(|e| !matches!(e, Event::Call(_)))
                    .any(|e| matches!(e, Event::Write { .. })),
                "call {nr}: guest memory written before the call"
            );
        }
    }
}
