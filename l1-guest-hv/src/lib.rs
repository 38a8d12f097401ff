//! The tiny L1 hypervisor's pieces that do not need bare metal.
#![no_std]
