//! The tiny L1 hypervisor's pieces that do not need bare metal: command-line
//! parsing, capability-MSR decoding and control adjustment, VMCS bitmap
//! layout, segment access rights, exit-line formatting, Multiboot structures.
//! The kernel binary (`src/main.rs`, feature `kernel`) uses them; here they
//! are unit-tested on the host.
#![no_std]
#![deny(missing_docs)]
#![forbid(unsafe_code)]

#[cfg(test)]
extern crate std;

pub mod abi;
pub mod bitmaps;
pub mod caps;
pub mod cmdline;
pub mod ept;
pub mod event;
pub mod exit;
pub mod multiboot;
pub mod scenario;
pub mod segment;
pub mod text;
