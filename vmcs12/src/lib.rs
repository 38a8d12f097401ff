//! A software model of what a VMX CPU does with a VMCS.
//!
//! Pure: no KVM, no `unsafe`. See `docs/` for the layout of the 4 KiB VMCS
//! region and the conformance table. Without the default `std` feature only
//! the field catalogue, the instruction outcomes and the control bits are
//! built (the `no_std` L1 guest shares them with L0).
#![cfg_attr(not(feature = "std"), no_std)]
#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub mod controls;
pub mod field;
pub mod msr;
pub mod outcome;

#[cfg(feature = "std")]
pub mod caps;
#[cfg(feature = "std")]
pub mod entry;
#[cfg(feature = "std")]
pub mod mem;
#[cfg(feature = "std")]
pub mod region;
#[cfg(feature = "std")]
pub mod snapshot;
#[cfg(feature = "std")]
pub mod vmcs;
#[cfg(feature = "std")]
pub mod vmx;

#[cfg(feature = "std")]
pub use caps::{AdvertisedControls, ControlMsr};
#[cfg(feature = "std")]
pub use caps::{VmxCapabilities, VMCS_REVISION_ID};
#[cfg(feature = "std")]
pub use entry::{
    check_vm_entry, check_vm_entry_in, ControlRule, EntryCheckFailure, EntryContext, GuestRule,
    HostRule,
};
pub use field::{
    AccessType, EncodingError, EncodingLayout, FieldAccess, FieldKind, FieldWidth, VmcsField,
};
#[cfg(feature = "std")]
pub use mem::{FlatMemory, GuestPhysMemory, OutOfRange};
pub use outcome::{VmInstructionError, VmxFault, VmxOutcome};
#[cfg(feature = "std")]
pub use region::LaunchState;
#[cfg(feature = "std")]
pub use vmcs::Vmcs12;
#[cfg(feature = "std")]
pub use vmx::{CpuMode, EntryResult, InsnContext, InsnResult, VmxCpu, VmxInstruction};
