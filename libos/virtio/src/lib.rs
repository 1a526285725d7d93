//! virtio-drivers Hal (in progress).
#![no_std]
