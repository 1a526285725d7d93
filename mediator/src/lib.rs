//! The safe mediator (in progress).
