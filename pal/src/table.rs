//! What the function table needs that does not depend on the spec: the
//! context type every function takes first, and the [`TablePal`] type,
//! which calls a [`Pal`](crate::Pal) through a table. Its methods, which
//! name the generated `PalTable`, are generated in `abi.rs` (so this
//! module depends on nothing generated).

/// The table's context, passed to every function.
pub type Ctx = *mut core::ffi::c_void;

/// Implements [`Pal`](crate::Pal) by calling through a table (made with
/// `TablePal::new`).
#[derive(Debug, Clone, Copy)]
pub struct TablePal {
    /// The `PalTable` called through (see `TablePal::new`'s contract),
    /// or with `indirect` where its address is kept (`TablePal::through`).
    pub(crate) table: *const core::ffi::c_void,
    pub(crate) indirect: bool,
}

// SAFETY: the table is immutable and its functions may be called from any thread.
unsafe impl Send for TablePal {}
// SAFETY: as for `Send`.
unsafe impl Sync for TablePal {}
