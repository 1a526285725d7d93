//! Shared code of the driver images (in progress).
#![no_std]
