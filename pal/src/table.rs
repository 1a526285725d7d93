//! What the function table needs that does not depend on the spec: the
//! context type every function takes first, and [`TablePal`], which calls
//! a [`Pal`](crate::Pal) through a table (its `Pal` impl, one method per
//! call, is generated in `abi.rs`).
use crate::abi::PalTable;

/// The table's context, passed to every function.
pub type Ctx = *mut core::ffi::c_void;

/// Implements [`Pal`](crate::Pal) by calling through a table.
#[derive(Debug, Clone, Copy)]
pub struct TablePal {
    table: *const PalTable,
}

impl TablePal {
    /// Wrap a table.
    ///
    /// # Safety
    ///
    /// `table` must point to a valid [`PalTable`] that outlives the `TablePal`.
    pub const unsafe fn new(table: *const PalTable) -> Self {
        TablePal { table }
    }

    /// The table called through.
    pub fn table(&self) -> *const PalTable {
        self.table
    }

    /// The table, for the generated calls.
    pub(crate) fn t(&self) -> &PalTable {
        // SAFETY: `new`'s contract: the table is valid for as long as `self`.
        unsafe { &*self.table }
    }
}

// SAFETY: the table is immutable and its functions may be called from any thread.
unsafe impl Send for TablePal {}
// SAFETY: as for `Send`.
unsafe impl Sync for TablePal {}
