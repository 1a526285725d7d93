//! The layers moat stacks between a picoprocess and its PAL: the same ABI
//! in and out, the same code above both hosts. host-linux builds the
//! stack in the loader, over its `LinuxPal`, and makes the guest's PAL
//! table from the top; host-hypervisor builds it in the VMM, over its
//! `KvmPal`, and dispatches the guest's hypercalls to the top.
//!
//! A stack is named outermost first: `--layer count,trace` puts `count`
//! next to the guest and `trace` next to the PAL, so `trace` reports what
//! `count` passed down. `--trace` adds a `trace` layer outermost, seeing
//! exactly what the guest called.
//!
//! - [`LayerName`]: the layers there are (a layer is code in the confined
//!   process, so the set is fixed at build time; adding one is adding a
//!   variant here).
//! - [`Stack`]: a built stack, with the hooks a host calls for the calls
//!   it serves itself rather than through the stack (on kvm the vCPU loop
//!   ends threads and raises exceptions; see [`Stack::enter`]).
//! - [`count`]: the example layer (how to write one), counting calls by
//!   name and reporting them when the picoprocess ends.
//! - [`remap`]: the manifest's `[[remap]]` mappings of `file:` URIs,
//!   through [`GuestAccess`], the host's checked copies of guest memory.
//!   A picoprocess whose policy has mappings gets a `remap` layer
//!   innermost unless its stack names one.
//!
//! Invariant: a layer never makes the ABI tell the guest it is there;
//! the conformance suite runs under every layer and every stack
//! (`tests/tests/layers.rs`).
use core::fmt::Arguments;
use moat_pal::layer::Layered;
use moat_pal::Pal;
use serde::{Deserialize, Serialize};

pub mod checkpointer;
pub mod count;
pub mod remap;
pub mod ring;
pub mod tracer;

/// The layers there are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LayerName {
    /// A binary record per call into the trace ring the monitor drains
    /// ([`tracer`]).
    Trace,
    /// Calls counted by name, one summary line at the end.
    Count,
    /// The policy's `[[remap]]` mappings applied to `file:` URIs.
    Remap,
    /// What the picoprocess holds, for `moat checkpoint` ([`checkpointer`]);
    /// always innermost.
    Checkpoint,
}

impl LayerName {
    /// Every layer, in the order `moat run --help` lists them.
    pub const ALL: [LayerName; 4] = [
        LayerName::Trace,
        LayerName::Count,
        LayerName::Remap,
        LayerName::Checkpoint,
    ];

    /// Its name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            LayerName::Trace => "trace",
            LayerName::Count => "count",
            LayerName::Remap => "remap",
            LayerName::Checkpoint => "checkpoint",
        }
    }

    /// A stack from `--layer`'s list (`count,trace`), outermost first.
    pub fn parse_list(s: &str) -> Result<Vec<LayerName>, String> {
        let names: Vec<&str> = s.split(',').map(str::trim).collect();
        if names.len() > MAX_LAYERS {
            return Err(format!(
                "{} layers named; a stack holds at most {MAX_LAYERS}",
                names.len()
            ));
        }
        names
            .into_iter()
            .map(|n| {
                LayerName::ALL
                    .into_iter()
                    .find(|l| l.name() == n)
                    .ok_or_else(|| {
                        let all: Vec<&str> = LayerName::ALL.iter().map(|l| l.name()).collect();
                        format!("no layer named `{n}` (there are: {})", all.join(", "))
                    })
            })
            .collect()
    }
}

/// The most layers one stack holds (a stack is built once per
/// picoprocess and each layer is a call per ABI call: a bound keeps a
/// hostile manifest from making every call slow).
pub const MAX_LAYERS: usize = 8;

/// Where a layer writes: a line (without its end) to the picoprocess's
/// log, which the host sends to the monitor.
pub type LogSink = fn(Arguments<'_>);

/// The stack a picoprocess runs under: `--trace`'s layer outermost, then
/// `layers`, then (with `remaps`, unless `layers` places it) `remap`, and
/// `checkpoint` innermost wherever it was named (it records what the PAL
/// itself was asked).
pub fn names(trace: bool, layers: &[LayerName], remaps: bool) -> Vec<LayerName> {
    let mut v = Vec::with_capacity(layers.len() + 2);
    if trace {
        v.push(LayerName::Trace);
    }
    v.extend(layers.iter().filter(|l| **l != LayerName::Checkpoint));
    if remaps && !layers.contains(&LayerName::Remap) {
        v.push(LayerName::Remap);
    }
    if layers.contains(&LayerName::Checkpoint) {
        v.push(LayerName::Checkpoint);
    }
    v
}

/// Guest memory as the host checks it, for layers that read or write
/// through a guest pointer: both copy once, after checking the whole
/// range against the picoprocess's memory map.
pub trait GuestAccess: Send + Sync {
    /// `len` bytes from readable guest memory at `addr`, or `BadAddress`.
    fn copy_in(&self, addr: u64, len: u64) -> moat_pal::PalResult<Vec<u8>>;
    /// `data` into writable guest memory at `addr`, or `BadAddress`.
    fn copy_out(&self, addr: u64, data: &[u8]) -> moat_pal::PalResult<()>;
}

/// What the monitor asks of the trace layers (the ring itself is
/// shared memory handed over with the configuration).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceSetup {
    /// The ring's capacity in records (see [`ring::check_records`]).
    pub records: u64,
    /// Bit `nr - 1`: call `nr` is traced ([`tracer::ALL_CALLS`]: all).
    pub filter: u64,
}

/// What a stack is built from besides its names.
pub struct Parts {
    /// Where layers' lines go (the picoprocess's log).
    pub log: LogSink,
    /// The trace ring (required when the stack has a trace layer), and
    /// which calls to trace.
    pub ring: Option<(&'static ring::Producer, u64)>,
    /// The host's checked access to guest memory.
    pub mem: &'static dyn GuestAccess,
    /// The policy's mappings (for `remap`).
    pub remaps: Vec<moat_policy::remap::Remap>,
    /// The host's side of freezing (required when the stack has a
    /// checkpoint layer).
    pub freeze: Option<&'static dyn checkpointer::FreezeHost>,
}

/// A built stack.
pub struct Stack {
    /// What the guest calls: the outermost layer, or the PAL itself.
    pub top: &'static dyn Pal,
    depth: usize,
    hooks: Vec<Hook>,
    checkpointer: Option<&'static checkpointer::Checkpointer>,
}

/// What a layer does for a call the host serves itself.
enum Hook {
    /// The trace layer: its record.
    Trace(&'static Layered<tracer::Tracer>),
    /// A [`Layer`](moat_pal::layer::Layer): its `enter`.
    Layer(&'static dyn Hooks),
}

/// A stack's top as a sized [`Pal`], for [`moat_pal::table_from`].
struct Top(&'static dyn Pal);

impl moat_pal::layer::Layer for Top {
    type Token = ();

    fn inner(&self) -> &dyn Pal {
        self.0
    }
}

/// A layer's hooks, for calls a host serves without the stack.
trait Hooks: Send + Sync {
    fn enter(&self, nr: u32, args: &[u64; 6]);
}

impl<L: moat_pal::layer::Layer> Hooks for Layered<L> {
    fn enter(&self, nr: u32, args: &[u64; 6]) {
        let _ = self.0.enter(nr, args);
    }
}

impl Stack {
    /// Build `names` (outermost first) over `base`. The stack lives as
    /// long as the process (one picoprocess per process). Fails on a
    /// trace layer without a ring.
    pub fn build(
        names: &[LayerName],
        base: &'static dyn Pal,
        parts: Parts,
    ) -> Result<Stack, String> {
        let Parts {
            log,
            ring,
            mem,
            remaps,
            freeze,
        } = parts;
        let mut checkpointer = None;
        let mut traces = names.iter().filter(|n| **n == LayerName::Trace).count();
        let mut top = base;
        let mut hooks: Vec<Hook> = Vec::new();
        for name in names.iter().rev() {
            top = match name {
                LayerName::Trace => {
                    let (producer, filter) =
                        ring.ok_or("a trace layer without a trace ring from the monitor")?;
                    // Numbered outermost first.
                    traces -= 1;
                    let l: &'static Layered<tracer::Tracer> = Box::leak(Box::new(Layered(
                        tracer::Tracer::new(top, mem, producer, traces as u8, filter),
                    )));
                    hooks.push(Hook::Trace(l));
                    l
                }
                LayerName::Count => {
                    let l: &'static Layered<count::Count> =
                        Box::leak(Box::new(Layered(count::Count::new(top, log))));
                    hooks.push(Hook::Layer(l));
                    l
                }
                LayerName::Remap => {
                    let l: &'static Layered<remap::RemapLayer> = Box::leak(Box::new(Layered(
                        remap::RemapLayer::new(top, mem, remaps.clone(), log),
                    )));
                    hooks.push(Hook::Layer(l));
                    l
                }
                // No hook for calls the host serves itself: those end
                // the thread (or raise an exception whose upcall the
                // freeze waits out), so the layer's call depth must not
                // count them.
                LayerName::Checkpoint => {
                    let host = freeze.ok_or("a checkpoint layer without the host's freeze")?;
                    let l: &'static Layered<checkpointer::Checkpointer> = Box::leak(Box::new(
                        Layered(checkpointer::Checkpointer::new(top, mem, host)),
                    ));
                    checkpointer = Some(&l.0);
                    l
                }
            };
        }
        // Outermost first, as the calls pass them.
        hooks.reverse();
        Ok(Stack {
            top,
            depth: names.len(),
            hooks,
            checkpointer,
        })
    }

    /// The stack's checkpoint layer, if it has one.
    pub fn checkpointer(&self) -> Option<&'static checkpointer::Checkpointer> {
        self.checkpointer
    }

    /// Whether the stack is empty (the guest calls the PAL itself).
    pub fn is_empty(&self) -> bool {
        self.depth == 0
    }

    /// A PAL table whose calls enter the stack's top (host-linux hands
    /// the guest this table; with no layers it makes the table from its
    /// PAL directly, one indirection fewer).
    pub fn table(&self) -> moat_pal::PalTable {
        moat_pal::table_from(Box::leak(Box::new(Layered(Top(self.top)))))
    }

    /// A call the host serves itself, not through [`Stack::top`] (on kvm:
    /// DkThreadExit, DkProcessExit and DkThreadRaiseException, which need
    /// the vCPU), with its first two argument words: each layer sees it,
    /// outermost first (a [`Layer`](moat_pal::layer::Layer)'s `enter`; the
    /// trace layer records it, a raised exception without its result), so
    /// what a layer counts or reports is the same on both hosts. A layer
    /// cannot change such a call.
    pub fn enter(&self, nr: u32, args: &[u64; 2]) {
        let words = [args[0], args[1], 0, 0, 0, 0];
        for h in &self.hooks {
            match h {
                Hook::Layer(l) => l.enter(nr, &words),
                Hook::Trace(t) if nr == moat_pal::nr::DK_THREAD_RAISE_EXCEPTION => {
                    t.0.host_served(nr, &words)
                }
                Hook::Trace(t) => {
                    let _ = moat_pal::layer::Layer::enter(&t.0, nr, &words);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_parse_outermost_first_and_bad_names_are_named() {
        assert_eq!(
            LayerName::parse_list("count, trace").unwrap(),
            vec![LayerName::Count, LayerName::Trace]
        );
        let e = LayerName::parse_list("count,remix").unwrap_err();
        assert!(
            e.contains("`remix`") && e.contains("trace, count, remap, checkpoint"),
            "{e}"
        );
        assert!(LayerName::parse_list("").is_err());
        assert!(LayerName::parse_list(&["count"; 9].join(",")).is_err());
    }
}
