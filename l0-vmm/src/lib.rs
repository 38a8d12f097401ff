//! The L0 VMM: runs the L1 hypervisor on KVM and emulates VMX for it.
//!
//! The library holds everything; `main.rs` is the CLI on top of it, and the
//! end-to-end tests drive the same functions in-process.
#![deny(missing_docs)]

pub mod bench;
pub mod cli;
pub mod cpuid;
pub mod devices;
pub mod ept_slots;
pub mod hv;
pub mod idt;
pub mod kvm;
pub mod l1_image;
pub mod l1_intercept;
pub mod l1_run;
pub mod loader;
pub mod memory;
pub mod msr;
pub mod nested;
pub mod precise_decode;
pub mod scenario;
pub mod test_support;
pub mod timeline;
pub mod trace;
pub mod vmcall_bench;
pub mod vmx_emul;
