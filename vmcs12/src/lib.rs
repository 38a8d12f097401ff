//! A software model of what a VMX CPU does with a VMCS.
//!
//! Pure: no KVM, no `unsafe`. See `docs/` for the layout of the 4 KiB VMCS
//! region and the conformance table.
#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub mod field;
pub mod mem;
pub mod outcome;
pub mod vmcs;

pub use field::{
    AccessType, EncodingError, EncodingLayout, FieldAccess, FieldKind, FieldWidth, VmcsField,
};
pub use mem::{FlatMemory, GuestPhysMemory, OutOfRange};
pub use outcome::{VmInstructionError, VmxFault, VmxOutcome};
pub use vmcs::Vmcs12;
pub mod caps;
pub mod controls;
pub use caps::{VmxCapabilities, VMCS_REVISION_ID};
pub mod entry;
