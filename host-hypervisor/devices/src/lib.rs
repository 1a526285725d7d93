//! Device models (in progress).
