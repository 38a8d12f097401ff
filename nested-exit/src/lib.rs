//! Nested VMX exit handling, as pure functions over the `vmcs12` model.
//!
//! The path of one reflected L2 exit: an exit [`exit::Exit`] is built from
//! what L0 observed; `decide()` says who handles it; `prepare_vmcs12()`
//! writes exit information and guest state into vmcs12; and
//! `load_vmcs12_host_state()` gives L1 its host state. No KVM types here.
#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub mod decide;
pub mod ept;
pub mod exit;
pub mod exit_info;
pub mod record;
pub mod state;
pub mod transfer;
pub mod walk;

pub use decide::{decide, Decision, Disposition, L0Policy};
pub use decide::{decide_ept_violation, EptExitDecision};
pub use exit::{Exit, ExitContext, ExitDecodeError};
pub use exit_info::ExitInfo;
pub use state::{DescriptorTable, Gprs, PendingEvent, Segment, VcpuState, VmxMsrs};
pub use transfer::{
    load_vmcs12_host_state, merge_cr, prepare_vmcs02, prepare_vmcs12, unmerge_cr, EntryFailure,
    MsrAccess, MsrEntry, Vmcs02, VmxAbort,
};
