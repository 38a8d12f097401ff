//! VM-entry checks (SDM Vol. 3, 27.2 "Checks on VMX Controls and
//! Host-State Area" and 27.3.1 "Checks on the Guest State Area").
//!
//! Every check is a named rule ([`ControlRule`], [`HostRule`],
//! [`GuestRule`]); the first rule that fails, in the SDM's order, is the
//! result. `docs/conformance-entry.md` lists each rule with its section,
//! condition, outcome and test.
//!
//! Model decisions, where the SDM leaves a choice to the implementation:
//! - the control fields are checked against the TRUE capability MSRs
//!   (IA32_VMX_BASIC[55] is advertised), see [`VmxCapabilities::allowed`];
//! - the "deliver-error-code" rule ignores bits 31:16 of the error code
//!   (newer SDM revisions dropped that check);
//! - the RTM bit (16) of the pending debug exceptions and the enclave
//!   interruption bit (4) of the interruptibility state are reserved: this
//!   virtual CPU has neither RTM nor SGX.

use crate::caps::{cr0, cr4, fixed_ok, ControlMsr, VmxCapabilities, VMCS_REVISION_ID};
use crate::controls::{
    intr_info, EntryControls, ExitControls, PinBased, PrimaryProcBased, SecondaryProcBased,
};
use crate::field::VmcsField as F;
use crate::mem::{GuestPhysMemory, OutOfRange};
use crate::outcome::VmInstructionError;
use crate::vmcs::Vmcs12;

/// Exit qualification of a guest-state VM-entry failure (SDM 27.8,
/// Table "Exit Qualification for VM-Entry Failure"): no detail.
pub const ENTRY_FAIL_DEFAULT: u64 = 0;
/// Exit qualification: failure loading or checking the PDPTEs.
pub const ENTRY_FAIL_PDPTE: u64 = 2;
/// Exit qualification: invalid VMCS link pointer.
pub const ENTRY_FAIL_VMCS_LINK_PTR: u64 = 4;

/// A segment register of the guest-state area.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Seg {
    /// ES.
    Es,
    /// CS.
    Cs,
    /// SS.
    Ss,
    /// DS.
    Ds,
    /// FS.
    Fs,
    /// GS.
    Gs,
    /// LDTR.
    Ldtr,
    /// TR.
    Tr,
}

impl core::fmt::Display for Seg {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            Seg::Es => "ES",
            Seg::Cs => "CS",
            Seg::Ss => "SS",
            Seg::Ds => "DS",
            Seg::Fs => "FS",
            Seg::Gs => "GS",
            Seg::Ldtr => "LDTR",
            Seg::Tr => "TR",
        })
    }
}

impl Seg {
    /// The eight guest segment registers in encoding order.
    pub const ALL: [Seg; 8] = [
        Seg::Es,
        Seg::Cs,
        Seg::Ss,
        Seg::Ds,
        Seg::Fs,
        Seg::Gs,
        Seg::Ldtr,
        Seg::Tr,
    ];

    /// The register's guest-state fields: (selector, base, limit, access
    /// rights) (SDM Appendix B). The one table of these fields: the entry
    /// checks and `nested-exit`'s state transfer both read it.
    pub fn fields(self) -> (F, F, F, F) {
        match self {
            Seg::Es => (
                F::GUEST_ES_SELECTOR,
                F::GUEST_ES_BASE,
                F::GUEST_ES_LIMIT,
                F::GUEST_ES_AR_BYTES,
            ),
            Seg::Cs => (
                F::GUEST_CS_SELECTOR,
                F::GUEST_CS_BASE,
                F::GUEST_CS_LIMIT,
                F::GUEST_CS_AR_BYTES,
            ),
            Seg::Ss => (
                F::GUEST_SS_SELECTOR,
                F::GUEST_SS_BASE,
                F::GUEST_SS_LIMIT,
                F::GUEST_SS_AR_BYTES,
            ),
            Seg::Ds => (
                F::GUEST_DS_SELECTOR,
                F::GUEST_DS_BASE,
                F::GUEST_DS_LIMIT,
                F::GUEST_DS_AR_BYTES,
            ),
            Seg::Fs => (
                F::GUEST_FS_SELECTOR,
                F::GUEST_FS_BASE,
                F::GUEST_FS_LIMIT,
                F::GUEST_FS_AR_BYTES,
            ),
            Seg::Gs => (
                F::GUEST_GS_SELECTOR,
                F::GUEST_GS_BASE,
                F::GUEST_GS_LIMIT,
                F::GUEST_GS_AR_BYTES,
            ),
            Seg::Ldtr => (
                F::GUEST_LDTR_SELECTOR,
                F::GUEST_LDTR_BASE,
                F::GUEST_LDTR_LIMIT,
                F::GUEST_LDTR_AR_BYTES,
            ),
            Seg::Tr => (
                F::GUEST_TR_SELECTOR,
                F::GUEST_TR_BASE,
                F::GUEST_TR_LIMIT,
                F::GUEST_TR_AR_BYTES,
            ),
        }
    }
}

/// A descriptor-table register of the guest-state area.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DescTable {
    /// GDTR.
    Gdtr,
    /// IDTR.
    Idtr,
}

impl core::fmt::Display for DescTable {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            DescTable::Gdtr => "GDTR",
            DescTable::Idtr => "IDTR",
        })
    }
}

/// A failed check on the VMX controls (SDM 27.2.1): VMfailValid(7).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum ControlRule {
    /// 27.2.1.1: pin-based controls outside IA32_VMX_TRUE_PINBASED_CTLS.
    #[error("SDM 27.2.1.1: pin-based controls set a bit IA32_VMX_TRUE_PINBASED_CTLS does not allow (or clear a required one)")]
    PinBasedReserved,
    /// 27.2.1.1: primary controls outside IA32_VMX_TRUE_PROCBASED_CTLS.
    #[error(
        "SDM 27.2.1.1: primary processor-based controls do not match IA32_VMX_TRUE_PROCBASED_CTLS"
    )]
    PrimaryReserved,
    /// 27.2.1.1: secondary controls outside IA32_VMX_PROCBASED_CTLS2.
    #[error(
        "SDM 27.2.1.1: secondary processor-based controls do not match IA32_VMX_PROCBASED_CTLS2"
    )]
    SecondaryReserved,
    /// 27.2.1.1: CR3-target count above IA32_VMX_MISC[24:16].
    #[error("SDM 27.2.1.1: CR3-target count exceeds the number IA32_VMX_MISC allows (4)")]
    Cr3TargetCount,
    /// 27.2.1.1: I/O bitmap A or B not 4-KByte aligned or beyond the
    /// physical-address width.
    #[error("SDM 27.2.1.1: I/O-bitmap addresses must be 4-KByte aligned and within the physical-address width")]
    IoBitmapAddress,
    /// 27.2.1.1: MSR-bitmap address not 4-KByte aligned or too wide.
    #[error("SDM 27.2.1.1: MSR-bitmap address must be 4-KByte aligned and within the physical-address width")]
    MsrBitmapAddress,
    /// 27.2.1.1: virtual NMIs without NMI exiting.
    #[error("SDM 27.2.1.1: \"virtual NMIs\" requires \"NMI exiting\"")]
    VirtualNmisWithoutNmiExiting,
    /// 27.2.1.1: NMI-window exiting without virtual NMIs.
    #[error("SDM 27.2.1.1: \"NMI-window exiting\" requires \"virtual NMIs\"")]
    NmiWindowWithoutVirtualNmis,
    /// 27.2.1.1: enable VPID with VPID 0.
    #[error("SDM 27.2.1.1: \"enable VPID\" requires a VPID other than 0")]
    VpidZero,
    /// 27.2.1.1: EPTP memory type (bits 2:0) not supported.
    #[error(
        "SDM 27.2.1.1: EPTP memory type (bits 2:0) is not one IA32_VMX_EPT_VPID_CAP allows (WB)"
    )]
    EptpMemoryType,
    /// 27.2.1.1: EPTP page-walk length (bits 5:3) is not 3 (4 levels).
    #[error("SDM 27.2.1.1: EPTP bits 5:3 must be 3 (4-level EPT walk)")]
    EptpWalkLength,
    /// 27.2.1.1: EPTP bit 6 (A/D flags) without IA32_VMX_EPT_VPID_CAP[21].
    #[error("SDM 27.2.1.1: EPTP bit 6 (accessed/dirty flags) is not supported")]
    EptpAccessedDirty,
    /// 27.2.1.1: EPTP reserved bits (11:7, 63:MAXPHYADDR) set.
    #[error("SDM 27.2.1.1: EPTP sets reserved bits (11:7 or beyond the physical-address width)")]
    EptpReserved,
    /// 27.2.1.1: unrestricted guest without enable EPT.
    #[error("SDM 27.2.1.1: \"unrestricted guest\" requires \"enable EPT\"")]
    UnrestrictedGuestWithoutEpt,
    /// 27.2.1.2: VM-exit controls outside IA32_VMX_TRUE_EXIT_CTLS.
    #[error("SDM 27.2.1.2: VM-exit controls do not match IA32_VMX_TRUE_EXIT_CTLS")]
    ExitReserved,
    /// 27.2.1.2: save preemption-timer value without the timer.
    #[error("SDM 27.2.1.2: \"save VMX-preemption timer value\" requires \"activate VMX-preemption timer\"")]
    SavePreemptionTimerWithoutTimer,
    /// 27.2.1.2: VM-exit MSR-store area misaligned or too wide.
    #[error("SDM 27.2.1.2: VM-exit MSR-store address must be 16-byte aligned and the whole area within the physical-address width")]
    ExitMsrStoreAddress,
    /// 27.2.1.2: VM-exit MSR-load area misaligned or too wide.
    #[error("SDM 27.2.1.2: VM-exit MSR-load address must be 16-byte aligned and the whole area within the physical-address width")]
    ExitMsrLoadAddress,
    /// 27.2.1.3: VM-entry controls outside IA32_VMX_TRUE_ENTRY_CTLS.
    #[error("SDM 27.2.1.3: VM-entry controls do not match IA32_VMX_TRUE_ENTRY_CTLS")]
    EntryReserved,
    /// 27.2.1.3: injected event type reserved (1) or not supported (7
    /// without the monitor trap flag).
    #[error("SDM 27.2.1.3: injected event type is reserved or not supported")]
    EventType,
    /// 27.2.1.3: injected vector inconsistent with its type (NMI not 2,
    /// hardware exception above 31, other event not 0).
    #[error("SDM 27.2.1.3: injected vector does not fit the event type (NMI = 2, exception <= 31, other event = 0)")]
    EventVector,
    /// 27.2.1.3: deliver-error-code bit does not match the event.
    #[error("SDM 27.2.1.3: deliver-error-code must be 1 exactly for #DF, #TS, #NP, #SS, #GP, #PF, #AC in protected mode")]
    EventErrorCode,
    /// 27.2.1.3: bits 30:12 of the interruption-information field set.
    #[error("SDM 27.2.1.3: VM-entry interruption-information bits 30:12 must be 0")]
    EventInfoReserved,
    /// 27.2.1.3: instruction length 0 or above 15 for a software event.
    #[error("SDM 27.2.1.3: software interrupts and exceptions need a VM-entry instruction length of 1 to 15")]
    EventInstructionLength,
    /// 27.2.1.3: VM-entry MSR-load area misaligned or too wide.
    #[error("SDM 27.2.1.3: VM-entry MSR-load address must be 16-byte aligned and the whole area within the physical-address width")]
    EntryMsrLoadAddress,
}

/// A failed check on the host-state area (SDM 27.2.2-27.2.4):
/// VMfailValid(8).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum HostRule {
    /// 27.2.2: HOST_CR0 violates IA32_VMX_CR0_FIXED0/1.
    #[error("SDM 27.2.2: HOST_CR0 must satisfy IA32_VMX_CR0_FIXED0/FIXED1")]
    Cr0Fixed,
    /// 27.2.2: HOST_CR4 violates IA32_VMX_CR4_FIXED0/1.
    #[error("SDM 27.2.2: HOST_CR4 must satisfy IA32_VMX_CR4_FIXED0/FIXED1")]
    Cr4Fixed,
    /// 27.2.2: HOST_CR3 beyond the physical-address width.
    #[error("SDM 27.2.2: HOST_CR3 sets bits beyond the physical-address width")]
    Cr3Width,
    /// 27.2.2: host SYSENTER ESP or EIP not canonical.
    #[error("SDM 27.2.2: HOST_IA32_SYSENTER_ESP/EIP must be canonical")]
    SysenterNotCanonical,
    /// 27.2.2: HOST_IA32_PAT has an invalid memory type.
    #[error("SDM 27.2.2: HOST_IA32_PAT entries must be valid memory types (0, 1, 4-7)")]
    Pat,
    /// 27.2.2: HOST_IA32_EFER sets reserved bits.
    #[error("SDM 27.2.2: HOST_IA32_EFER sets reserved bits")]
    EferReserved,
    /// 27.2.2: HOST_IA32_EFER LMA/LME differ from "host address-space size".
    #[error("SDM 27.2.2: HOST_IA32_EFER.LMA and LME must equal \"host address-space size\"")]
    EferLongMode,
    /// 27.2.3: a host selector has RPL or TI set.
    #[error("SDM 27.2.3: host ES/CS/SS/DS/FS/GS/TR selectors must have RPL 0 and TI 0")]
    SelectorRplTi,
    /// 27.2.3: HOST_CS_SELECTOR is 0.
    #[error("SDM 27.2.3: HOST_CS_SELECTOR must not be 0")]
    CsNull,
    /// 27.2.3: HOST_TR_SELECTOR is 0.
    #[error("SDM 27.2.3: HOST_TR_SELECTOR must not be 0")]
    TrNull,
    /// 27.2.3: HOST_SS_SELECTOR 0 with a 32-bit host.
    #[error("SDM 27.2.3: HOST_SS_SELECTOR may be 0 only with \"host address-space size\"")]
    SsNull,
    /// 27.2.3: FS/GS/GDTR/IDTR/TR base not canonical.
    #[error("SDM 27.2.3: host FS, GS, GDTR, IDTR and TR bases must be canonical")]
    BaseNotCanonical,
    /// 27.2.4: L1 runs in IA-32e mode but "host address-space size" is 0,
    /// or L1 is outside IA-32e mode and it is 1.
    #[error("SDM 27.2.4: \"host address-space size\" must match whether the processor is in IA-32e mode")]
    AddressSpaceSize,
    /// 27.2.4: "IA-32e mode guest" needs an IA-32e host (L1 in IA-32e
    /// mode and "host address-space size").
    #[error(
        "SDM 27.2.4: \"IA-32e mode guest\" requires IA-32e mode and \"host address-space size\""
    )]
    Ia32eGuestWithoutIa32eHost,
    /// 27.2.4: HOST_CR4.PCIDE with a 32-bit host.
    #[error("SDM 27.2.4: HOST_CR4.PCIDE must be 0 without \"host address-space size\"")]
    Pcide,
    /// 27.2.4: HOST_RIP bits 63:32 set with a 32-bit host.
    #[error("SDM 27.2.4: HOST_RIP bits 63:32 must be 0 without \"host address-space size\"")]
    RipHigh,
    /// 27.2.4: HOST_CR4.PAE clear with a 64-bit host.
    #[error("SDM 27.2.4: HOST_CR4.PAE must be 1 with \"host address-space size\"")]
    Cr4Pae,
    /// 27.2.4: HOST_RIP not canonical with a 64-bit host.
    #[error("SDM 27.2.4: HOST_RIP must be canonical with \"host address-space size\"")]
    RipNotCanonical,
}

/// A failed check on the guest-state area (SDM 27.3.1): a VM-entry
/// failure, exit reason 33 | 0x8000_0000, exit qualification
/// [`GuestRule::qualification`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum GuestRule {
    /// 27.3.1.1: GUEST_CR0 violates CR0_FIXED0/1 (PE, PG relaxed with
    /// unrestricted guest).
    #[error("SDM 27.3.1.1: GUEST_CR0 must satisfy IA32_VMX_CR0_FIXED0/FIXED1 (PE and PG may be 0 only with \"unrestricted guest\")")]
    Cr0Fixed,
    /// 27.3.1.1: CR0.PG without CR0.PE.
    #[error("SDM 27.3.1.1: GUEST_CR0.PG requires GUEST_CR0.PE")]
    Cr0PgWithoutPe,
    /// 27.3.1.1: GUEST_CR4 violates CR4_FIXED0/1.
    #[error("SDM 27.3.1.1: GUEST_CR4 must satisfy IA32_VMX_CR4_FIXED0/FIXED1")]
    Cr4Fixed,
    /// 27.3.1.1: GUEST_IA32_DEBUGCTL reserved bits with load debug controls.
    #[error("SDM 27.3.1.1: GUEST_IA32_DEBUGCTL sets reserved bits")]
    DebugctlReserved,
    /// 27.3.1.1: IA-32e mode guest without CR0.PG.
    #[error("SDM 27.3.1.1: \"IA-32e mode guest\" requires GUEST_CR0.PG")]
    Ia32eWithoutPaging,
    /// 27.3.1.1: IA-32e mode guest without CR4.PAE.
    #[error("SDM 27.3.1.1: \"IA-32e mode guest\" requires GUEST_CR4.PAE")]
    Ia32eWithoutPae,
    /// 27.3.1.1: CR4.PCIDE outside IA-32e mode.
    #[error("SDM 27.3.1.1: GUEST_CR4.PCIDE requires \"IA-32e mode guest\"")]
    PcideOutsideIa32e,
    /// 27.3.1.1: GUEST_CR3 beyond the physical-address width.
    #[error("SDM 27.3.1.1: GUEST_CR3 sets bits beyond the physical-address width")]
    Cr3Width,
    /// 27.3.1.1: GUEST_DR7 bits 63:32 with load debug controls.
    #[error("SDM 27.3.1.1: GUEST_DR7 bits 63:32 must be 0")]
    Dr7High,
    /// 27.3.1.1: guest SYSENTER ESP/EIP not canonical.
    #[error("SDM 27.3.1.1: GUEST_SYSENTER_ESP/EIP must be canonical")]
    SysenterNotCanonical,
    /// 27.3.1.1: GUEST_IA32_PAT invalid with load PAT.
    #[error("SDM 27.3.1.1: GUEST_IA32_PAT entries must be valid memory types (0, 1, 4-7)")]
    Pat,
    /// 27.3.1.1: GUEST_IA32_EFER reserved bits with load EFER.
    #[error("SDM 27.3.1.1: GUEST_IA32_EFER sets reserved bits")]
    EferReserved,
    /// 27.3.1.1: EFER.LMA differs from IA-32e mode guest.
    #[error("SDM 27.3.1.1: GUEST_IA32_EFER.LMA must equal \"IA-32e mode guest\"")]
    EferLma,
    /// 27.3.1.1: CR0.PG with EFER.LME != EFER.LMA.
    #[error("SDM 27.3.1.1: with GUEST_CR0.PG, GUEST_IA32_EFER.LME must equal LMA")]
    EferLme,
    /// 27.3.1.2: TR selector TI flag set.
    #[error("SDM 27.3.1.2: GUEST_TR_SELECTOR TI flag must be 0")]
    TrSelectorTi,
    /// 27.3.1.2: usable LDTR selector TI flag set.
    #[error("SDM 27.3.1.2: a usable LDTR selector must have TI 0")]
    LdtrSelectorTi,
    /// 27.3.1.2: SS.RPL != CS.RPL outside virtual-8086 mode without
    /// unrestricted guest.
    #[error("SDM 27.3.1.2: SS.RPL must equal CS.RPL (outside virtual-8086 mode, without \"unrestricted guest\")")]
    SsRplNotCsRpl,
    /// 27.3.1.2: virtual-8086 segment base is not selector << 4.
    #[error(
        "SDM 27.3.1.2: in virtual-8086 mode the {0} base must be the selector shifted left by 4"
    )]
    V86Base(Seg),
    /// 27.3.1.2: base not canonical (TR, FS, GS, usable LDTR).
    #[error("SDM 27.3.1.2: the {0} base must be canonical")]
    BaseNotCanonical(Seg),
    /// 27.3.1.2: base bits 63:32 set (CS, usable SS/DS/ES).
    #[error("SDM 27.3.1.2: the {0} base bits 63:32 must be 0")]
    BaseHigh(Seg),
    /// 27.3.1.2: virtual-8086 segment limit is not 0xffff.
    #[error("SDM 27.3.1.2: in virtual-8086 mode the {0} limit must be 0xffff")]
    V86Limit(Seg),
    /// 27.3.1.2: virtual-8086 access rights are not 0xf3.
    #[error("SDM 27.3.1.2: in virtual-8086 mode the {0} access rights must be 0xf3")]
    V86AccessRights(Seg),
    /// 27.3.1.2: segment type not allowed (CS 9/11/13/15 or 3 with
    /// unrestricted guest; SS 3/7; data accessed, code readable; TR busy
    /// TSS; LDTR 2).
    #[error("SDM 27.3.1.2: the {0} segment type is not allowed")]
    SegmentType(Seg),
    /// 27.3.1.2: descriptor type (S, bit 4) wrong (1 for CS/SS/DS/ES/FS/GS,
    /// 0 for TR/LDTR).
    #[error(
        "SDM 27.3.1.2: the {0} descriptor-type bit S is wrong (1 for code/data, 0 for TR and LDTR)"
    )]
    DescriptorType(Seg),
    /// 27.3.1.2: CS.DPL inconsistent (0 for type 3, = SS.DPL
    /// nonconforming, <= SS.DPL conforming).
    #[error("SDM 27.3.1.2: CS.DPL does not fit its type and SS.DPL")]
    CsDpl,
    /// 27.3.1.2: SS.DPL != SS.RPL without unrestricted guest.
    #[error("SDM 27.3.1.2: SS.DPL must equal SS.RPL without \"unrestricted guest\"")]
    SsDplNotRpl,
    /// 27.3.1.2: SS.DPL not 0 while CS type is 3 or CR0.PE is 0.
    #[error("SDM 27.3.1.2: SS.DPL must be 0 when CS type is 3 or CR0.PE is 0")]
    SsDplNotZero,
    /// 27.3.1.2: data-segment DPL below RPL without unrestricted guest.
    #[error("SDM 27.3.1.2: the {0} DPL must not be below its RPL without \"unrestricted guest\"")]
    DplBelowRpl(Seg),
    /// 27.3.1.2: segment not present (P, bit 7).
    #[error("SDM 27.3.1.2: the {0} segment must be present")]
    NotPresent(Seg),
    /// 27.3.1.2: access-rights reserved bits 11:8 or 31:17 set.
    #[error("SDM 27.3.1.2: the {0} access rights set reserved bits (11:8 or 31:17)")]
    AccessRightsReserved(Seg),
    /// 27.3.1.2: CS.D/B set with CS.L in an IA-32e mode guest.
    #[error("SDM 27.3.1.2: CS.D/B must be 0 when CS.L is 1 in an IA-32e mode guest")]
    CsLongModeDb,
    /// 27.3.1.2: limit and G bit inconsistent.
    #[error("SDM 27.3.1.2: the {0} limit does not fit its G bit (limit[11:0] all ones if G, limit[31:20] zero if not)")]
    Granularity(Seg),
    /// 27.3.1.2: TR marked unusable.
    #[error("SDM 27.3.1.2: TR must be usable")]
    TrUnusable,
    /// 27.3.1.3: GDTR/IDTR base not canonical.
    #[error("SDM 27.3.1.3: the {0} base must be canonical")]
    DescTableBase(DescTable),
    /// 27.3.1.3: GDTR/IDTR limit above 0xffff.
    #[error("SDM 27.3.1.3: the {0} limit bits 31:16 must be 0")]
    DescTableLimit(DescTable),
    /// 27.3.1.4: RIP bits 63:32 set outside 64-bit mode.
    #[error("SDM 27.3.1.4: GUEST_RIP bits 63:32 must be 0 unless the guest is in 64-bit mode")]
    RipHigh,
    /// 27.3.1.4: RIP not canonical in 64-bit mode.
    #[error("SDM 27.3.1.4: GUEST_RIP must be canonical in 64-bit mode")]
    RipNotCanonical,
    /// 27.3.1.4: RFLAGS reserved bits set or bit 1 clear.
    #[error("SDM 27.3.1.4: GUEST_RFLAGS bits 63:22, 15, 5, 3 must be 0 and bit 1 must be 1")]
    RflagsReserved,
    /// 27.3.1.4: RFLAGS.VM in an IA-32e guest or with CR0.PE clear.
    #[error("SDM 27.3.1.4: GUEST_RFLAGS.VM requires CR0.PE and no \"IA-32e mode guest\"")]
    RflagsVm,
    /// 27.3.1.4: injecting an external interrupt with RFLAGS.IF clear.
    #[error("SDM 27.3.1.4: injecting an external interrupt requires GUEST_RFLAGS.IF")]
    RflagsIf,
    /// 27.3.1.5: activity state not supported by IA32_VMX_MISC.
    #[error("SDM 27.3.1.5: GUEST_ACTIVITY_STATE is not supported (active and HLT only)")]
    ActivityState,
    /// 27.3.1.5: HLT activity state with SS.DPL != 0.
    #[error("SDM 27.3.1.5: the HLT activity state requires SS.DPL 0")]
    ActivityHltDpl,
    /// 27.3.1.5: STI or MOV-SS blocking while not active.
    #[error("SDM 27.3.1.5: blocking by STI or MOV SS requires the active activity state")]
    ActivityBlocking,
    /// 27.3.1.5: injected event not allowed in the activity state.
    #[error("SDM 27.3.1.5: the injected event cannot be delivered in this activity state")]
    ActivityInjection,
    /// 27.3.1.5: interruptibility-state reserved bits set.
    #[error("SDM 27.3.1.5: GUEST_INTERRUPTIBILITY_INFO bits 31:4 must be 0")]
    InterruptibilityReserved,
    /// 27.3.1.5: blocking by STI and by MOV SS both set.
    #[error("SDM 27.3.1.5: blocking by STI and blocking by MOV SS cannot both be 1")]
    StiAndMovSs,
    /// 27.3.1.5: blocking by STI with RFLAGS.IF clear.
    #[error("SDM 27.3.1.5: blocking by STI requires GUEST_RFLAGS.IF")]
    StiWithoutIf,
    /// 27.3.1.5: external-interrupt injection under STI/MOV-SS blocking.
    #[error("SDM 27.3.1.5: injecting an external interrupt requires no blocking by STI or MOV SS")]
    InjectExtIntrBlocked,
    /// 27.3.1.5: NMI injection under MOV-SS blocking.
    #[error("SDM 27.3.1.5: injecting an NMI requires no blocking by MOV SS")]
    InjectNmiMovSs,
    /// 27.3.1.5: blocking by SMI outside SMM.
    #[error("SDM 27.3.1.5: blocking by SMI must be 0 outside SMM")]
    SmiBlocking,
    /// 27.3.1.5: NMI injection with virtual NMIs and virtual-NMI blocking.
    #[error("SDM 27.3.1.5: injecting an NMI with \"virtual NMIs\" requires no blocking by NMI")]
    InjectNmiVirtualNmiBlocked,
    /// 27.3.1.5: pending debug exceptions reserved bits set.
    #[error("SDM 27.3.1.5: GUEST_PENDING_DBG_EXCEPTIONS bits 11:4, 13, 15 and 63:16 must be 0")]
    PendingDbgReserved,
    /// 27.3.1.5: pending BS inconsistent with RFLAGS.TF and DEBUGCTL.BTF
    /// while blocking or halted.
    #[error("SDM 27.3.1.5: pending BS must be 1 exactly when RFLAGS.TF is 1 and DEBUGCTL.BTF is 0 (while blocking by STI/MOV SS or in HLT)")]
    PendingDbgBs,
    /// 27.3.1.5: VMCS link pointer not all ones and not a valid VMCS
    /// (qualification 4).
    #[error("SDM 27.3.1.5: VMCS link pointer must be all ones, or a 4-KByte aligned in-width pointer to a VMCS with this revision id and shadow bit equal to \"VMCS shadowing\"")]
    VmcsLinkPointer,
    /// 27.3.1.6: a PDPTE used by PAE paging sets reserved bits or cannot
    /// be read (qualification 2).
    #[error("SDM 27.3.1.6: a present guest PDPTE sets reserved bits (or the PDPTEs at CR3 cannot be read)")]
    Pdpte,
}

impl GuestRule {
    /// The exit qualification a VM-entry failure for this rule reports.
    pub fn qualification(self) -> u64 {
        match self {
            GuestRule::VmcsLinkPointer => ENTRY_FAIL_VMCS_LINK_PTR,
            GuestRule::Pdpte => ENTRY_FAIL_PDPTE,
            _ => ENTRY_FAIL_DEFAULT,
        }
    }
}

/// Why a VM entry failed its checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EntryCheckFailure {
    /// A check on VMX controls failed: VMfailValid(7).
    #[error("VM-entry control check failed: {0}")]
    Control(ControlRule),
    /// A check on the host-state area failed: VMfailValid(8).
    #[error("VM-entry host-state check failed: {0}")]
    HostState(HostRule),
    /// A check on the guest-state area failed: VM-entry failure, exit
    /// reason 33 with bit 31 set, and this exit qualification.
    #[error("VM-entry guest-state check failed (qualification {1}): {0}")]
    GuestState(GuestRule, u64),
}

impl EntryCheckFailure {
    /// The VM-instruction error VMLAUNCH/VMRESUME report, for the control
    /// and host-state failures; `None` for a guest-state failure (that one
    /// is a VM exit, not a VMfail).
    pub fn vm_instruction_error(&self) -> Option<VmInstructionError> {
        match self {
            EntryCheckFailure::Control(_) => Some(VmInstructionError::EntryInvalidControlFields),
            EntryCheckFailure::HostState(_) => {
                Some(VmInstructionError::EntryInvalidHostStateFields)
            }
            EntryCheckFailure::GuestState(..) => None,
        }
    }

    /// The exit qualification of a guest-state failure.
    pub fn exit_qualification(&self) -> Option<u64> {
        match self {
            EntryCheckFailure::GuestState(_, q) => Some(*q),
            _ => None,
        }
    }
}

impl From<GuestRule> for EntryCheckFailure {
    fn from(rule: GuestRule) -> Self {
        EntryCheckFailure::GuestState(rule, rule.qualification())
    }
}

impl From<ControlRule> for EntryCheckFailure {
    fn from(rule: ControlRule) -> Self {
        EntryCheckFailure::Control(rule)
    }
}

impl From<HostRule> for EntryCheckFailure {
    fn from(rule: HostRule) -> Self {
        EntryCheckFailure::HostState(rule)
    }
}

/// What VM entry knows about the logical processor besides the VMCS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryContext {
    /// L1's IA32_EFER.LMA at VMLAUNCH/VMRESUME (SDM 27.2.4).
    pub l1_ia32e: bool,
    /// Guest-physical address of the current VMCS, if known: the VMCS link
    /// pointer must not equal it outside SMM (SDM 27.3.1.5).
    pub current_vmcs: Option<u64>,
}

impl Default for EntryContext {
    /// L1 in IA-32e mode (the lab's L1 is a 64-bit kernel), current-VMCS
    /// pointer unknown.
    fn default() -> Self {
        Self {
            l1_ia32e: true,
            current_vmcs: None,
        }
    }
}

/// Runs every VM-entry check on `vmcs` in the SDM's order: controls,
/// host state, then guest state.
///
/// Assumes [`EntryContext::default`]: L1 executes VMLAUNCH/VMRESUME in
/// IA-32e mode and the current-VMCS pointer is not compared with the link
/// pointer; use [`check_vm_entry_in`] to state both.
pub fn check_vm_entry(
    vmcs: &Vmcs12,
    caps: &VmxCapabilities,
    mem: &dyn GuestPhysMemory,
) -> Result<(), EntryCheckFailure> {
    check_vm_entry_in(vmcs, caps, mem, &EntryContext::default())
}

/// [`check_vm_entry`] with an explicit [`EntryContext`].
pub fn check_vm_entry_in(
    vmcs: &Vmcs12,
    caps: &VmxCapabilities,
    mem: &dyn GuestPhysMemory,
    cx: &EntryContext,
) -> Result<(), EntryCheckFailure> {
    let ctl = Controls::read(vmcs);
    check_controls(vmcs, caps, &ctl)?;
    check_host_state(vmcs, caps, &ctl, cx.l1_ia32e)?;
    check_guest_state(vmcs, caps, &ctl, mem, cx)?;
    Ok(())
}

/// The control fields as VM entry uses them: the secondary controls count
/// as 0 when "activate secondary controls" is clear (SDM 25.6.2).
struct Controls {
    pin: PinBased,
    primary: PrimaryProcBased,
    secondary: SecondaryProcBased,
    exit: ExitControls,
    entry: EntryControls,
    raw_primary: u32,
    raw_pin: u32,
    raw_secondary: u32,
    raw_exit: u32,
    raw_entry: u32,
}

impl Controls {
    fn read(v: &Vmcs12) -> Self {
        let raw_pin = v.get32(F::PIN_BASED_VM_EXEC_CONTROL);
        let raw_primary = v.get32(F::CPU_BASED_VM_EXEC_CONTROL);
        let primary = PrimaryProcBased::from_bits_retain(raw_primary);
        let raw_secondary = v.get32(F::SECONDARY_VM_EXEC_CONTROL);
        let secondary = if primary.contains(PrimaryProcBased::ACTIVATE_SECONDARY) {
            SecondaryProcBased::from_bits_retain(raw_secondary)
        } else {
            SecondaryProcBased::empty()
        };
        let raw_exit = v.get32(F::VM_EXIT_CONTROLS);
        let raw_entry = v.get32(F::VM_ENTRY_CONTROLS);
        Self {
            pin: PinBased::from_bits_retain(raw_pin),
            primary,
            secondary,
            exit: ExitControls::from_bits_retain(raw_exit),
            entry: EntryControls::from_bits_retain(raw_entry),
            raw_primary,
            raw_pin,
            raw_secondary,
            raw_exit,
            raw_entry,
        }
    }

    fn ug(&self) -> bool {
        self.secondary
            .contains(SecondaryProcBased::UNRESTRICTED_GUEST)
    }

    fn ia32e_guest(&self) -> bool {
        self.entry.contains(EntryControls::IA32E_MODE_GUEST)
    }
}

/// Linear addresses are 48 bits wide (4-level paging, no LA57).
const LINEAR_ADDRESS_BITS: u32 = 48;

/// Whether `addr` is canonical for 48-bit linear addresses (bits 63:47
/// all equal).
pub fn is_canonical(addr: u64) -> bool {
    let shift = 64 - LINEAR_ADDRESS_BITS;
    (((addr << shift) as i64) >> shift) as u64 == addr
}

/// Whether every byte of a PAT value is a valid memory type (0, 1, 4-7).
pub fn pat_valid(pat: u64) -> bool {
    pat.to_le_bytes()
        .iter()
        .all(|&b| matches!(b, 0 | 1 | 4 | 5 | 6 | 7))
}

/// IA32_EFER bits this virtual CPU implements: SCE, LME, LMA, NXE.
pub const EFER_VALID_BITS: u64 = (1 << 0) | (1 << 8) | (1 << 10) | (1 << 11);
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// IA32_DEBUGCTL bits this virtual CPU implements: LBR, BTF and 15:6;
/// bits 5:2 and 63:16 are reserved.
pub const DEBUGCTL_VALID_BITS: u64 = 0x3 | 0xffc0;
const DEBUGCTL_BTF: u64 = 1 << 1;

const RFLAGS_FIXED1: u64 = 1 << 1;
const RFLAGS_TF: u64 = 1 << 8;
const RFLAGS_IF: u64 = 1 << 9;
const RFLAGS_VM: u64 = 1 << 17;
/// RFLAGS bits that must be 0: 63:22, 15, 5, 3.
const RFLAGS_RESERVED: u64 = !0x3f_ffff | (1 << 15) | (1 << 5) | (1 << 3);

const ACTIVITY_ACTIVE: u32 = 0;
const ACTIVITY_HLT: u32 = 1;

const INTR_BLOCK_STI: u32 = 1 << 0;
const INTR_BLOCK_MOV_SS: u32 = 1 << 1;
const INTR_BLOCK_SMI: u32 = 1 << 2;
const INTR_BLOCK_NMI: u32 = 1 << 3;

const PENDING_DBG_BS: u64 = 1 << 14;
/// Pending debug exception bits that may be 1: B3-B0, enabled breakpoint
/// (12), BS (14).
const PENDING_DBG_VALID: u64 = 0xf | (1 << 12) | PENDING_DBG_BS;

/// A 4-KByte aligned physical address within the width.
fn page_addr_ok(caps: &VmxCapabilities, pa: u64) -> bool {
    pa & 0xfff == 0 && caps.pa_in_width(pa)
}

/// An MSR area of `count` 16-byte entries at `addr` (SDM 27.2.1.2): the
/// address is 16-byte aligned and its last byte is within the width.
fn msr_area_ok(caps: &VmxCapabilities, addr: u64, count: u32) -> bool {
    if count == 0 {
        return true;
    }
    let last = u64::from(count)
        .checked_mul(16)
        .and_then(|len| addr.checked_add(len - 1));
    addr & 0xf == 0 && last.is_some_and(|l| caps.pa_in_width(l))
}

fn check_controls(v: &Vmcs12, caps: &VmxCapabilities, c: &Controls) -> Result<(), ControlRule> {
    use ControlRule as R;
    // 27.2.1.1 VM-execution control fields.
    if !caps.allowed(ControlMsr::PinBased, c.raw_pin) {
        return Err(R::PinBasedReserved);
    }
    if !caps.allowed(ControlMsr::PrimaryProcBased, c.raw_primary) {
        return Err(R::PrimaryReserved);
    }
    if c.primary.contains(PrimaryProcBased::ACTIVATE_SECONDARY)
        && !caps.allowed(ControlMsr::SecondaryProcBased, c.raw_secondary)
    {
        return Err(R::SecondaryReserved);
    }
    if v.get32(F::CR3_TARGET_COUNT) > u32::from(caps.cr3_target_count) {
        return Err(R::Cr3TargetCount);
    }
    if c.primary.contains(PrimaryProcBased::USE_IO_BITMAPS)
        && !(page_addr_ok(caps, v.get(F::IO_BITMAP_A)) && page_addr_ok(caps, v.get(F::IO_BITMAP_B)))
    {
        return Err(R::IoBitmapAddress);
    }
    if c.primary.contains(PrimaryProcBased::USE_MSR_BITMAPS)
        && !page_addr_ok(caps, v.get(F::MSR_BITMAP))
    {
        return Err(R::MsrBitmapAddress);
    }
    if !c.pin.contains(PinBased::NMI_EXITING) && c.pin.contains(PinBased::VIRTUAL_NMIS) {
        return Err(R::VirtualNmisWithoutNmiExiting);
    }
    if !c.pin.contains(PinBased::VIRTUAL_NMIS)
        && c.primary.contains(PrimaryProcBased::NMI_WINDOW_EXITING)
    {
        return Err(R::NmiWindowWithoutVirtualNmis);
    }
    if c.secondary.contains(SecondaryProcBased::ENABLE_VPID) && v.get(F::VIRTUAL_PROCESSOR_ID) == 0
    {
        return Err(R::VpidZero);
    }
    if c.secondary.contains(SecondaryProcBased::ENABLE_EPT) {
        check_eptp(caps, v.get(F::EPT_POINTER))?;
    }
    if c.ug() && !c.secondary.contains(SecondaryProcBased::ENABLE_EPT) {
        return Err(R::UnrestrictedGuestWithoutEpt);
    }

    // 27.2.1.2 VM-exit control fields.
    if !caps.allowed(ControlMsr::Exit, c.raw_exit) {
        return Err(R::ExitReserved);
    }
    if !c.pin.contains(PinBased::PREEMPTION_TIMER)
        && c.exit.contains(ExitControls::SAVE_PREEMPTION_TIMER)
    {
        return Err(R::SavePreemptionTimerWithoutTimer);
    }
    if !msr_area_ok(
        caps,
        v.get(F::VM_EXIT_MSR_STORE_ADDR),
        v.get32(F::VM_EXIT_MSR_STORE_COUNT),
    ) {
        return Err(R::ExitMsrStoreAddress);
    }
    if !msr_area_ok(
        caps,
        v.get(F::VM_EXIT_MSR_LOAD_ADDR),
        v.get32(F::VM_EXIT_MSR_LOAD_COUNT),
    ) {
        return Err(R::ExitMsrLoadAddress);
    }

    // 27.2.1.3 VM-entry control fields.
    if !caps.allowed(ControlMsr::Entry, c.raw_entry) {
        return Err(R::EntryReserved);
    }
    check_event_injection(v, caps, c)?;
    if !msr_area_ok(
        caps,
        v.get(F::VM_ENTRY_MSR_LOAD_ADDR),
        v.get32(F::VM_ENTRY_MSR_LOAD_COUNT),
    ) {
        return Err(R::EntryMsrLoadAddress);
    }
    Ok(())
}

/// EPTP validity (SDM 27.2.1.1, 25.6.11): the one check that both VM entry
/// ("enable EPT" = 1) and INVEPT single-context (SDM 31 INVEPT: the
/// descriptor's EPTP must pass the VM-entry checks, else VMfailValid(28))
/// apply. Memory type and walk length must be ones IA32_VMX_EPT_VPID_CAP
/// offers (bit 8 UC, 14 WB; bit 6 length 4, bit 7 length 5); bit 6 needs
/// A/D support (cap bit 21), bit 7 supervisor shadow-stack control (cap bit
/// 23); bits 11:8 and bits at or above MAXPHYADDR are reserved.
pub fn check_eptp(caps: &VmxCapabilities, eptp: u64) -> Result<(), ControlRule> {
    use crate::caps::ept_vpid;
    if !caps.ept_memory_type_supported(eptp & 7) {
        return Err(ControlRule::EptpMemoryType);
    }
    let walk_ok = match (eptp >> 3) & 7 {
        3 => caps.ept_vpid_cap & ept_vpid::WALK_LENGTH_4 != 0,
        4 => caps.ept_vpid_cap & ept_vpid::WALK_LENGTH_5 != 0,
        _ => false,
    };
    if !walk_ok {
        return Err(ControlRule::EptpWalkLength);
    }
    if eptp & (1 << 6) != 0 && caps.ept_vpid_cap & ept_vpid::AD_FLAGS == 0 {
        return Err(ControlRule::EptpAccessedDirty);
    }
    let sss_ok = eptp & (1 << 7) == 0 || caps.ept_vpid_cap & ept_vpid::SUPERVISOR_SHADOW_STACK != 0;
    if !sss_ok || eptp & 0xf00 != 0 || !caps.pa_in_width(eptp & !0xfff) {
        return Err(ControlRule::EptpReserved);
    }
    Ok(())
}

/// Event-injection checks on VM_ENTRY_INTR_INFO_FIELD (SDM 27.2.1.3).
fn check_event_injection(
    v: &Vmcs12,
    caps: &VmxCapabilities,
    c: &Controls,
) -> Result<(), ControlRule> {
    let info = v.get32(F::VM_ENTRY_INTR_INFO_FIELD);
    if info & intr_info::VALID == 0 {
        return Ok(());
    }
    let ty = info & intr_info::TYPE_MASK;
    let vector = info & intr_info::VECTOR_MASK;
    let mtf_supported = caps.control_settings(ControlMsr::PrimaryProcBased).1
        & PrimaryProcBased::MONITOR_TRAP_FLAG.bits()
        != 0;
    let type_ok = match ty {
        intr_info::TYPE_OTHER_EVENT => mtf_supported,
        t => t != (1 << 8),
    };
    if !type_ok {
        return Err(ControlRule::EventType);
    }
    let vector_ok = match ty {
        intr_info::TYPE_NMI => vector == 2,
        intr_info::TYPE_HARD_EXCEPTION => vector <= 31,
        intr_info::TYPE_OTHER_EVENT => vector == 0,
        _ => true,
    };
    if !vector_ok {
        return Err(ControlRule::EventVector);
    }
    let protected = !c.ug() || v.get(F::GUEST_CR0) & cr0::PE != 0;
    let wants_error_code = protected
        && ty == intr_info::TYPE_HARD_EXCEPTION
        && matches!(vector, 8 | 10 | 11 | 12 | 13 | 14 | 17);
    if (info & intr_info::DELIVER_ERROR_CODE != 0) != wants_error_code {
        return Err(ControlRule::EventErrorCode);
    }
    if info & 0x7fff_f000 != 0 {
        return Err(ControlRule::EventInfoReserved);
    }
    if matches!(
        ty,
        intr_info::TYPE_SOFT_INTR
            | intr_info::TYPE_PRIV_SW_EXCEPTION
            | intr_info::TYPE_SOFT_EXCEPTION
    ) && !(1..=15).contains(&v.get32(F::VM_ENTRY_INSTRUCTION_LEN))
    {
        return Err(ControlRule::EventInstructionLength);
    }
    Ok(())
}

fn check_host_state(
    v: &Vmcs12,
    caps: &VmxCapabilities,
    c: &Controls,
    l1_ia32e: bool,
) -> Result<(), HostRule> {
    use HostRule as R;
    let host64 = c.exit.contains(ExitControls::HOST_ADDR_SPACE_SIZE);
    let cr4_val = v.get(F::HOST_CR4);
    // 27.2.2 host control registers and MSRs.
    if !caps.cr0_valid(v.get(F::HOST_CR0)) {
        return Err(R::Cr0Fixed);
    }
    if !caps.cr4_valid(cr4_val) {
        return Err(R::Cr4Fixed);
    }
    if !caps.pa_in_width(v.get(F::HOST_CR3)) {
        return Err(R::Cr3Width);
    }
    if !is_canonical(v.get(F::HOST_IA32_SYSENTER_ESP))
        || !is_canonical(v.get(F::HOST_IA32_SYSENTER_EIP))
    {
        return Err(R::SysenterNotCanonical);
    }
    if c.exit.contains(ExitControls::LOAD_PAT) && !pat_valid(v.get(F::HOST_IA32_PAT)) {
        return Err(R::Pat);
    }
    if c.exit.contains(ExitControls::LOAD_EFER) {
        let efer = v.get(F::HOST_IA32_EFER);
        if efer & !EFER_VALID_BITS != 0 {
            return Err(R::EferReserved);
        }
        if (efer & EFER_LMA != 0) != host64 || (efer & EFER_LME != 0) != host64 {
            return Err(R::EferLongMode);
        }
    }
    // 27.2.3 selector, base-address and descriptor-table fields.
    let selectors = [
        F::HOST_ES_SELECTOR,
        F::HOST_CS_SELECTOR,
        F::HOST_SS_SELECTOR,
        F::HOST_DS_SELECTOR,
        F::HOST_FS_SELECTOR,
        F::HOST_GS_SELECTOR,
        F::HOST_TR_SELECTOR,
    ];
    if selectors.iter().any(|&s| v.get(s) & 7 != 0) {
        return Err(R::SelectorRplTi);
    }
    if v.get(F::HOST_CS_SELECTOR) == 0 {
        return Err(R::CsNull);
    }
    if v.get(F::HOST_TR_SELECTOR) == 0 {
        return Err(R::TrNull);
    }
    if v.get(F::HOST_SS_SELECTOR) == 0 && !host64 {
        return Err(R::SsNull);
    }
    let bases = [
        F::HOST_FS_BASE,
        F::HOST_GS_BASE,
        F::HOST_GDTR_BASE,
        F::HOST_IDTR_BASE,
        F::HOST_TR_BASE,
    ];
    if bases.iter().any(|&b| !is_canonical(v.get(b))) {
        return Err(R::BaseNotCanonical);
    }
    // 27.2.4 checks related to address-space size.
    if l1_ia32e != host64 {
        return Err(R::AddressSpaceSize);
    }
    let rip = v.get(F::HOST_RIP);
    if host64 {
        if cr4_val & cr4::PAE == 0 {
            return Err(R::Cr4Pae);
        }
        if !is_canonical(rip) {
            return Err(R::RipNotCanonical);
        }
    } else {
        if c.ia32e_guest() {
            return Err(R::Ia32eGuestWithoutIa32eHost);
        }
        if cr4_val & cr4::PCIDE != 0 {
            return Err(R::Pcide);
        }
        if rip >> 32 != 0 {
            return Err(R::RipHigh);
        }
    }
    Ok(())
}

/// One guest segment register as the checks see it.
#[derive(Debug, Clone, Copy)]
struct SegState {
    seg: Seg,
    sel: u64,
    base: u64,
    limit: u64,
    ar: u64,
}

impl SegState {
    fn read(v: &Vmcs12, seg: Seg) -> Self {
        let (sel, base, limit, ar) = seg.fields();
        Self {
            seg,
            sel: v.get(sel),
            base: v.get(base),
            limit: v.get(limit),
            ar: v.get(ar),
        }
    }

    fn rpl(&self) -> u64 {
        self.sel & 3
    }
    fn ty(&self) -> u64 {
        self.ar & 0xf
    }
    fn s(&self) -> bool {
        self.ar & (1 << 4) != 0
    }
    fn dpl(&self) -> u64 {
        (self.ar >> 5) & 3
    }
    fn present(&self) -> bool {
        self.ar & (1 << 7) != 0
    }
    fn long(&self) -> bool {
        self.ar & (1 << 13) != 0
    }
    fn db(&self) -> bool {
        self.ar & (1 << 14) != 0
    }
    fn usable(&self) -> bool {
        self.ar & (1 << 16) == 0
    }

    /// Present, reserved bits 11:8 and 31:17, and the limit/G rule, which
    /// every usable segment must pass.
    fn check_common(&self) -> Result<(), GuestRule> {
        if !self.present() {
            return Err(GuestRule::NotPresent(self.seg));
        }
        if self.ar & 0xf00 != 0 {
            return Err(GuestRule::AccessRightsReserved(self.seg));
        }
        if !granularity_ok(self.limit, self.ar) {
            return Err(GuestRule::Granularity(self.seg));
        }
        if self.ar & 0xfffe_0000 != 0 {
            return Err(GuestRule::AccessRightsReserved(self.seg));
        }
        Ok(())
    }
}

/// The limit/G rule of SDM 27.3.1.2: if any of limit[11:0] is 0, G must
/// be 0; if any of limit[31:20] is 1, G must be 1.
pub fn granularity_ok(limit: u64, ar: u64) -> bool {
    let g = ar & (1 << 15) != 0;
    if g {
        limit & 0xfff == 0xfff
    } else {
        limit & 0xfff0_0000 == 0
    }
}

fn check_guest_state(
    v: &Vmcs12,
    caps: &VmxCapabilities,
    c: &Controls,
    mem: &dyn GuestPhysMemory,
    cx: &EntryContext,
) -> Result<(), EntryCheckFailure> {
    check_guest_regs(v, caps, c)?;
    check_guest_segments(v, c)?;
    check_guest_desc_tables(v)?;
    check_guest_rip_rflags(v, c)?;
    check_guest_non_register(v, caps, c)?;
    check_vmcs_link_pointer(v, caps, c, mem, cx.current_vmcs)?;
    check_pdptes(v, caps, c, mem)?;
    Ok(())
}

/// 27.3.1.1 control registers, debug registers and MSRs.
fn check_guest_regs(v: &Vmcs12, caps: &VmxCapabilities, c: &Controls) -> Result<(), GuestRule> {
    use GuestRule as R;
    let cr0_val = v.get(F::GUEST_CR0);
    let cr4_val = v.get(F::GUEST_CR4);
    let mut fixed0 = caps.cr0_fixed0();
    if c.ug() {
        fixed0 &= !(cr0::PE | cr0::PG);
    }
    if !fixed_ok(cr0_val, fixed0, caps.cr0_fixed1()) {
        return Err(R::Cr0Fixed);
    }
    if cr0_val & cr0::PG != 0 && cr0_val & cr0::PE == 0 {
        return Err(R::Cr0PgWithoutPe);
    }
    if !caps.cr4_valid(cr4_val) {
        return Err(R::Cr4Fixed);
    }
    let load_debug = c.entry.contains(EntryControls::LOAD_DEBUG_CONTROLS);
    if load_debug && v.get(F::GUEST_IA32_DEBUGCTL) & !DEBUGCTL_VALID_BITS != 0 {
        return Err(R::DebugctlReserved);
    }
    if c.ia32e_guest() {
        if cr0_val & cr0::PG == 0 {
            return Err(R::Ia32eWithoutPaging);
        }
        if cr4_val & cr4::PAE == 0 {
            return Err(R::Ia32eWithoutPae);
        }
    } else if cr4_val & cr4::PCIDE != 0 {
        return Err(R::PcideOutsideIa32e);
    }
    if !caps.pa_in_width(v.get(F::GUEST_CR3)) {
        return Err(R::Cr3Width);
    }
    if load_debug && v.get(F::GUEST_DR7) >> 32 != 0 {
        return Err(R::Dr7High);
    }
    if !is_canonical(v.get(F::GUEST_SYSENTER_ESP)) || !is_canonical(v.get(F::GUEST_SYSENTER_EIP)) {
        return Err(R::SysenterNotCanonical);
    }
    if c.entry.contains(EntryControls::LOAD_PAT) && !pat_valid(v.get(F::GUEST_IA32_PAT)) {
        return Err(R::Pat);
    }
    if c.entry.contains(EntryControls::LOAD_EFER) {
        let efer = v.get(F::GUEST_IA32_EFER);
        if efer & !EFER_VALID_BITS != 0 {
            return Err(R::EferReserved);
        }
        let lma = efer & EFER_LMA != 0;
        if lma != c.ia32e_guest() {
            return Err(R::EferLma);
        }
        if cr0_val & cr0::PG != 0 && (efer & EFER_LME != 0) != lma {
            return Err(R::EferLme);
        }
    }
    Ok(())
}

/// 27.3.1.2 segment registers.
fn check_guest_segments(v: &Vmcs12, c: &Controls) -> Result<(), GuestRule> {
    use GuestRule as R;
    let ug = c.ug();
    let ia32e = c.ia32e_guest();
    let pe = v.get(F::GUEST_CR0) & cr0::PE != 0;
    let v86 = v.get(F::GUEST_RFLAGS) & RFLAGS_VM != 0;
    let cs = SegState::read(v, Seg::Cs);
    let ss = SegState::read(v, Seg::Ss);
    let tr = SegState::read(v, Seg::Tr);
    let ldtr = SegState::read(v, Seg::Ldtr);
    let data: [SegState; 4] = [Seg::Ds, Seg::Es, Seg::Fs, Seg::Gs].map(|s| SegState::read(v, s));
    let v86_segs = [cs, ss, data[0], data[1], data[2], data[3]];

    // Selector fields.
    if tr.sel & 4 != 0 {
        return Err(R::TrSelectorTi);
    }
    if ldtr.usable() && ldtr.sel & 4 != 0 {
        return Err(R::LdtrSelectorTi);
    }
    if !v86 && !ug && ss.rpl() != cs.rpl() {
        return Err(R::SsRplNotCsRpl);
    }

    // Base-address fields.
    if v86 {
        if let Some(s) = v86_segs.iter().find(|s| s.base != s.sel << 4) {
            return Err(R::V86Base(s.seg));
        }
    }
    for s in [tr, data[2], data[3]] {
        if !is_canonical(s.base) {
            return Err(R::BaseNotCanonical(s.seg));
        }
    }
    if ldtr.usable() && !is_canonical(ldtr.base) {
        return Err(R::BaseNotCanonical(Seg::Ldtr));
    }
    if cs.base >> 32 != 0 {
        return Err(R::BaseHigh(Seg::Cs));
    }
    for s in [ss, data[0], data[1]] {
        if s.usable() && s.base >> 32 != 0 {
            return Err(R::BaseHigh(s.seg));
        }
    }

    // Limit and access-rights fields.
    if v86 {
        if let Some(s) = v86_segs.iter().find(|s| s.limit != 0xffff) {
            return Err(R::V86Limit(s.seg));
        }
        if let Some(s) = v86_segs.iter().find(|s| s.ar != 0xf3) {
            return Err(R::V86AccessRights(s.seg));
        }
    } else {
        // CS.
        let cs_type_ok = matches!(cs.ty(), 9 | 11 | 13 | 15) || (ug && cs.ty() == 3);
        if !cs_type_ok {
            return Err(R::SegmentType(Seg::Cs));
        }
        if !cs.s() {
            return Err(R::DescriptorType(Seg::Cs));
        }
        let cs_dpl_ok = match cs.ty() {
            3 => cs.dpl() == 0,
            9 | 11 => cs.dpl() == ss.dpl(),
            _ => cs.dpl() <= ss.dpl(),
        };
        if !cs_dpl_ok {
            return Err(R::CsDpl);
        }
        if !cs.present() {
            return Err(R::NotPresent(Seg::Cs));
        }
        if cs.ar & 0xf00 != 0 {
            return Err(R::AccessRightsReserved(Seg::Cs));
        }
        if ia32e && cs.long() && cs.db() {
            return Err(R::CsLongModeDb);
        }
        if !granularity_ok(cs.limit, cs.ar) {
            return Err(R::Granularity(Seg::Cs));
        }
        if cs.ar & 0xfffe_0000 != 0 {
            return Err(R::AccessRightsReserved(Seg::Cs));
        }

        // SS.
        if ss.usable() {
            if !matches!(ss.ty(), 3 | 7) {
                return Err(R::SegmentType(Seg::Ss));
            }
            if !ss.s() {
                return Err(R::DescriptorType(Seg::Ss));
            }
        }
        if !ug && ss.dpl() != ss.rpl() {
            return Err(R::SsDplNotRpl);
        }
        if (cs.ty() == 3 || !pe) && ss.dpl() != 0 {
            return Err(R::SsDplNotZero);
        }
        if ss.usable() {
            ss.check_common()?;
        }

        // DS, ES, FS, GS.
        for s in data.iter().filter(|s| s.usable()) {
            let code = s.ty() & 8 != 0;
            if s.ty() & 1 == 0 || (code && s.ty() & 2 == 0) {
                return Err(R::SegmentType(s.seg));
            }
            if !s.s() {
                return Err(R::DescriptorType(s.seg));
            }
            if !ug && s.ty() <= 11 && s.dpl() < s.rpl() {
                return Err(R::DplBelowRpl(s.seg));
            }
            s.check_common()?;
        }
    }

    // TR (checked in every mode).
    let tr_type_ok = if ia32e {
        tr.ty() == 11
    } else {
        matches!(tr.ty(), 3 | 11)
    };
    if !tr_type_ok {
        return Err(R::SegmentType(Seg::Tr));
    }
    if tr.s() {
        return Err(R::DescriptorType(Seg::Tr));
    }
    if !tr.present() {
        return Err(R::NotPresent(Seg::Tr));
    }
    if tr.ar & 0xf00 != 0 {
        return Err(R::AccessRightsReserved(Seg::Tr));
    }
    if !granularity_ok(tr.limit, tr.ar) {
        return Err(R::Granularity(Seg::Tr));
    }
    if !tr.usable() {
        return Err(R::TrUnusable);
    }
    if tr.ar & 0xfffe_0000 != 0 {
        return Err(R::AccessRightsReserved(Seg::Tr));
    }

    // LDTR, if usable.
    if ldtr.usable() {
        if ldtr.ty() != 2 {
            return Err(R::SegmentType(Seg::Ldtr));
        }
        if ldtr.s() {
            return Err(R::DescriptorType(Seg::Ldtr));
        }
        ldtr.check_common()?;
    }
    Ok(())
}

/// 27.3.1.3 descriptor-table registers.
fn check_guest_desc_tables(v: &Vmcs12) -> Result<(), GuestRule> {
    for (dt, base, limit) in [
        (DescTable::Gdtr, F::GUEST_GDTR_BASE, F::GUEST_GDTR_LIMIT),
        (DescTable::Idtr, F::GUEST_IDTR_BASE, F::GUEST_IDTR_LIMIT),
    ] {
        if !is_canonical(v.get(base)) {
            return Err(GuestRule::DescTableBase(dt));
        }
        if v.get(limit) >> 16 != 0 {
            return Err(GuestRule::DescTableLimit(dt));
        }
    }
    Ok(())
}

/// 27.3.1.4 RIP and RFLAGS.
fn check_guest_rip_rflags(v: &Vmcs12, c: &Controls) -> Result<(), GuestRule> {
    use GuestRule as R;
    let cs = SegState::read(v, Seg::Cs);
    let rip = v.get(F::GUEST_RIP);
    let long64 = c.ia32e_guest() && cs.long();
    if !long64 && rip >> 32 != 0 {
        return Err(R::RipHigh);
    }
    if long64 && !is_canonical(rip) {
        return Err(R::RipNotCanonical);
    }
    let rflags = v.get(F::GUEST_RFLAGS);
    if rflags & RFLAGS_RESERVED != 0 || rflags & RFLAGS_FIXED1 == 0 {
        return Err(R::RflagsReserved);
    }
    let pe = v.get(F::GUEST_CR0) & cr0::PE != 0;
    if rflags & RFLAGS_VM != 0 && (c.ia32e_guest() || !pe) {
        return Err(R::RflagsVm);
    }
    let info = v.get32(F::VM_ENTRY_INTR_INFO_FIELD);
    if info & intr_info::VALID != 0
        && info & intr_info::TYPE_MASK == intr_info::TYPE_EXT_INTR
        && rflags & RFLAGS_IF == 0
    {
        return Err(R::RflagsIf);
    }
    Ok(())
}

/// 27.3.1.5 non-register state (without the link pointer).
fn check_guest_non_register(
    v: &Vmcs12,
    caps: &VmxCapabilities,
    c: &Controls,
) -> Result<(), GuestRule> {
    use GuestRule as R;
    let activity = v.get32(F::GUEST_ACTIVITY_STATE);
    let intr = v.get32(F::GUEST_INTERRUPTIBILITY_INFO);
    let info = v.get32(F::VM_ENTRY_INTR_INFO_FIELD);
    let injecting = info & intr_info::VALID != 0;
    let ty = info & intr_info::TYPE_MASK;
    let vector = info & intr_info::VECTOR_MASK;
    let rflags = v.get(F::GUEST_RFLAGS);

    // Activity state.
    let supported = match activity {
        ACTIVITY_ACTIVE => true,
        ACTIVITY_HLT => caps.activity_hlt,
        // Shutdown (2) and wait-for-SIPI (3) are not advertised.
        _ => false,
    };
    if !supported {
        return Err(R::ActivityState);
    }
    if activity == ACTIVITY_HLT && SegState::read(v, Seg::Ss).dpl() != 0 {
        return Err(R::ActivityHltDpl);
    }
    if intr & (INTR_BLOCK_STI | INTR_BLOCK_MOV_SS) != 0 && activity != ACTIVITY_ACTIVE {
        return Err(R::ActivityBlocking);
    }
    if injecting && activity == ACTIVITY_HLT {
        let deliverable = match ty {
            intr_info::TYPE_EXT_INTR | intr_info::TYPE_NMI => true,
            intr_info::TYPE_HARD_EXCEPTION => vector == 1 || vector == 18,
            intr_info::TYPE_OTHER_EVENT => vector == 0,
            _ => false,
        };
        if !deliverable {
            return Err(R::ActivityInjection);
        }
    }

    // Interruptibility state.
    if intr & !0xf != 0 {
        return Err(R::InterruptibilityReserved);
    }
    if intr & INTR_BLOCK_STI != 0 && intr & INTR_BLOCK_MOV_SS != 0 {
        return Err(R::StiAndMovSs);
    }
    if intr & INTR_BLOCK_STI != 0 && rflags & RFLAGS_IF == 0 {
        return Err(R::StiWithoutIf);
    }
    if injecting
        && ty == intr_info::TYPE_EXT_INTR
        && intr & (INTR_BLOCK_STI | INTR_BLOCK_MOV_SS) != 0
    {
        return Err(R::InjectExtIntrBlocked);
    }
    if injecting && ty == intr_info::TYPE_NMI && intr & INTR_BLOCK_MOV_SS != 0 {
        return Err(R::InjectNmiMovSs);
    }
    if intr & INTR_BLOCK_SMI != 0 {
        return Err(R::SmiBlocking);
    }
    if injecting
        && ty == intr_info::TYPE_NMI
        && c.pin.contains(PinBased::VIRTUAL_NMIS)
        && intr & INTR_BLOCK_NMI != 0
    {
        return Err(R::InjectNmiVirtualNmiBlocked);
    }

    // Pending debug exceptions.
    let pending = v.get(F::GUEST_PENDING_DBG_EXCEPTIONS);
    if pending & !PENDING_DBG_VALID != 0 {
        return Err(R::PendingDbgReserved);
    }
    if intr & (INTR_BLOCK_STI | INTR_BLOCK_MOV_SS) != 0 || activity == ACTIVITY_HLT {
        let tf = rflags & RFLAGS_TF != 0;
        let btf = v.get(F::GUEST_IA32_DEBUGCTL) & DEBUGCTL_BTF != 0;
        let bs = pending & PENDING_DBG_BS != 0;
        if bs != (tf && !btf) {
            return Err(R::PendingDbgBs);
        }
    }
    Ok(())
}

/// 27.3.1.5 VMCS link pointer: all ones, or a shadow-VMCS candidate whose
/// header matches (revision id, shadow bit = "VMCS shadowing") and that is
/// not the current VMCS (this model has no SMM).
fn check_vmcs_link_pointer(
    v: &Vmcs12,
    caps: &VmxCapabilities,
    c: &Controls,
    mem: &dyn GuestPhysMemory,
    current_vmcs: Option<u64>,
) -> Result<(), GuestRule> {
    let ptr = v.get(F::VMCS_LINK_POINTER);
    if ptr == u64::MAX {
        return Ok(());
    }
    if !page_addr_ok(caps, ptr) || current_vmcs == Some(ptr) {
        return Err(GuestRule::VmcsLinkPointer);
    }
    let header = mem.read_u32(ptr).map_err(|_| GuestRule::VmcsLinkPointer)?;
    let shadowing = c.secondary.contains(SecondaryProcBased::VMCS_SHADOWING);
    if header & 0x7fff_ffff != VMCS_REVISION_ID || (header >> 31 != 0) != shadowing {
        return Err(GuestRule::VmcsLinkPointer);
    }
    Ok(())
}

/// GUEST_PDPTE0-3, in order.
pub const GUEST_PDPTES: [F; 4] = [
    F::GUEST_PDPTE0,
    F::GUEST_PDPTE1,
    F::GUEST_PDPTE2,
    F::GUEST_PDPTE3,
];

/// Whether a PAE PDPTE is present and sets a reserved bit: 2:1, 8:5, or
/// MAXPHYADDR and above, bit 63 included (SDM 4.4.1). The one PDPTE check
/// for VM entry (27.3.1.6), `nested-exit`'s prepare_vmcs02 and the host
/// PDPTEs of a VM exit (28.5.4).
pub fn pdpte_reserved(pdpte: u64, phys_addr_width: u8) -> bool {
    let width_mask = u64::MAX
        .checked_shl(u32::from(phys_addr_width))
        .unwrap_or(0);
    pdpte & 1 != 0 && pdpte & (0x1e6 | width_mask) != 0
}

/// Reads the four PAE PDPTEs from the 32-byte table at CR3 bits 31:5
/// (SDM 4.4.1); an entry outside guest memory is an error.
pub fn read_pdptes(mem: &dyn GuestPhysMemory, cr3: u64) -> Result<[u64; 4], OutOfRange> {
    let table = cr3 & 0xffff_ffe0;
    let mut out = [0u64; 4];
    for (i, slot) in (0u64..).zip(out.iter_mut()) {
        *slot = mem.read_u64(table + 8 * i)?;
    }
    Ok(out)
}

/// 27.3.1.6 PDPTEs, for PAE paging outside IA-32e mode: from the VMCS
/// with EPT, else from guest memory at CR3[31:5].
fn check_pdptes(
    v: &Vmcs12,
    caps: &VmxCapabilities,
    c: &Controls,
    mem: &dyn GuestPhysMemory,
) -> Result<(), GuestRule> {
    let cr0_val = v.get(F::GUEST_CR0);
    let cr4_val = v.get(F::GUEST_CR4);
    if cr0_val & cr0::PG == 0 || cr4_val & cr4::PAE == 0 || c.ia32e_guest() {
        return Ok(());
    }
    let pdptes = if c.secondary.contains(SecondaryProcBased::ENABLE_EPT) {
        GUEST_PDPTES.map(|f| v.get(f))
    } else {
        read_pdptes(mem, v.get(F::GUEST_CR3)).map_err(|_| GuestRule::Pdpte)?
    };
    if pdptes
        .iter()
        .any(|&e| pdpte_reserved(e, caps.phys_addr_width))
    {
        return Err(GuestRule::Pdpte);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::caps::msr;
    use crate::mem::FlatMemory;
    use proptest::prelude::*;

    /// A VMCS plus everything `check_vm_entry_in` reads.
    struct Fx {
        v: Vmcs12,
        caps: VmxCapabilities,
        mem: FlatMemory,
        cx: EntryContext,
    }

    impl Fx {
        fn check(&self) -> Result<(), EntryCheckFailure> {
            check_vm_entry_in(&self.v, &self.caps, &self.mem, &self.cx)
        }
        fn set(&mut self, f: F, value: u64) {
            self.v.set(f, value);
        }
        fn or(&mut self, f: F, bits: u64) {
            let old = self.v.get(f);
            self.v.set(f, old | bits);
        }
        fn clear(&mut self, f: F, bits: u64) {
            let old = self.v.get(f);
            self.v.set(f, old & !bits);
        }
        fn seg(&mut self, s: Seg, sel: u64, base: u64, limit: u64, ar: u64) {
            let (fs, fb, fl, fa) = s.fields();
            self.set(fs, sel);
            self.set(fb, base);
            self.set(fl, limit);
            self.set(fa, ar);
        }
        fn inject(&mut self, info: u32) {
            self.set(F::VM_ENTRY_INTR_INFO_FIELD, u64::from(info));
        }
        fn enable_secondary(&mut self, bits: SecondaryProcBased) {
            self.or(F::SECONDARY_VM_EXEC_CONTROL, u64::from(bits.bits()));
        }
        fn disable_secondary(&mut self, bits: SecondaryProcBased) {
            self.clear(F::SECONDARY_VM_EXEC_CONTROL, u64::from(bits.bits()));
        }
    }

    /// What a real L1 does: the wanted bits, plus the MSR's allowed-0
    /// settings, restricted to its allowed-1 settings.
    fn adjust(caps: &VmxCapabilities, index: u32, want: u32) -> u64 {
        let m = caps.read_msr(index).unwrap();
        u64::from((want | m as u32) & (m >> 32) as u32)
    }

    const PAT: u64 = 0x0007_0406_0007_0406;
    const EFER_64: u64 = 0xd00; // LME | LMA | NXE
    const LINK_VMCS: u64 = 0x30000;
    const CURRENT_VMCS: u64 = 0x31000;
    const PDPT: u64 = 0x20000;

    /// A 64-bit guest under a 64-bit host, the way an L1 writes it.
    fn baseline64() -> Fx {
        let caps = VmxCapabilities::l0_default();
        let mut fx = Fx {
            v: Vmcs12::new(),
            mem: FlatMemory::new(0x40000),
            cx: EntryContext {
                l1_ia32e: true,
                current_vmcs: Some(CURRENT_VMCS),
            },
            caps,
        };
        let c = fx.caps.clone();
        use PrimaryProcBased as P;
        use SecondaryProcBased as S;
        let pin = PinBased::EXT_INTR_EXITING | PinBased::NMI_EXITING | PinBased::VIRTUAL_NMIS;
        fx.set(
            F::PIN_BASED_VM_EXEC_CONTROL,
            adjust(&c, msr::IA32_VMX_TRUE_PINBASED_CTLS, pin.bits()),
        );
        let primary =
            P::HLT_EXITING | P::USE_IO_BITMAPS | P::USE_MSR_BITMAPS | P::ACTIVATE_SECONDARY;
        fx.set(
            F::CPU_BASED_VM_EXEC_CONTROL,
            adjust(&c, msr::IA32_VMX_TRUE_PROCBASED_CTLS, primary.bits()),
        );
        let secondary = S::ENABLE_EPT | S::ENABLE_VPID;
        fx.set(
            F::SECONDARY_VM_EXEC_CONTROL,
            adjust(&c, msr::IA32_VMX_PROCBASED_CTLS2, secondary.bits()),
        );
        let exit = ExitControls::SAVE_DEBUG_CONTROLS
            | ExitControls::HOST_ADDR_SPACE_SIZE
            | ExitControls::ACK_INTR_ON_EXIT
            | ExitControls::SAVE_PAT
            | ExitControls::LOAD_PAT
            | ExitControls::SAVE_EFER
            | ExitControls::LOAD_EFER;
        fx.set(
            F::VM_EXIT_CONTROLS,
            adjust(&c, msr::IA32_VMX_TRUE_EXIT_CTLS, exit.bits()),
        );
        let entry = EntryControls::LOAD_DEBUG_CONTROLS
            | EntryControls::IA32E_MODE_GUEST
            | EntryControls::LOAD_PAT
            | EntryControls::LOAD_EFER;
        fx.set(
            F::VM_ENTRY_CONTROLS,
            adjust(&c, msr::IA32_VMX_TRUE_ENTRY_CTLS, entry.bits()),
        );
        fx.set(F::VIRTUAL_PROCESSOR_ID, 1);
        fx.set(F::EPT_POINTER, 0x5000 | (3 << 3) | 6);
        fx.set(F::IO_BITMAP_A, 0x1000);
        fx.set(F::IO_BITMAP_B, 0x2000);
        fx.set(F::MSR_BITMAP, 0x3000);

        // Host state: 64-bit L1 kernel.
        fx.set(F::HOST_CR0, 0x8005_0033);
        fx.set(F::HOST_CR3, 0x10000);
        fx.set(F::HOST_CR4, 0x2020 | 0x600);
        fx.set(F::HOST_CS_SELECTOR, 0x08);
        for s in [
            F::HOST_SS_SELECTOR,
            F::HOST_DS_SELECTOR,
            F::HOST_ES_SELECTOR,
            F::HOST_FS_SELECTOR,
            F::HOST_GS_SELECTOR,
        ] {
            fx.set(s, 0x10);
        }
        fx.set(F::HOST_TR_SELECTOR, 0x18);
        fx.set(F::HOST_TR_BASE, 0x7000);
        fx.set(F::HOST_GDTR_BASE, 0x6000);
        fx.set(F::HOST_IDTR_BASE, 0x6800);
        fx.set(F::HOST_RIP, 0x40_0000);
        fx.set(F::HOST_RSP, 0x8_0000);
        fx.set(F::HOST_IA32_EFER, EFER_64);
        fx.set(F::HOST_IA32_PAT, PAT);

        // Guest state: 64-bit mode, flat segments.
        fx.set(F::GUEST_CR0, 0x8000_0031);
        fx.set(F::GUEST_CR3, 0x20000);
        fx.set(F::GUEST_CR4, 0x2020);
        fx.set(F::GUEST_DR7, 0x400);
        fx.set(F::GUEST_RFLAGS, 0x2);
        fx.set(F::GUEST_RIP, 0x10_0000);
        fx.set(F::GUEST_RSP, 0x9_0000);
        fx.seg(Seg::Cs, 0x08, 0, 0xffff_ffff, 0xa09b);
        for s in [Seg::Ss, Seg::Ds, Seg::Es, Seg::Fs, Seg::Gs] {
            fx.seg(s, 0x10, 0, 0xffff_ffff, 0xc093);
        }
        fx.seg(Seg::Ldtr, 0, 0, 0, 0x1_0000);
        fx.seg(Seg::Tr, 0x18, 0x7000, 0x67, 0x8b);
        fx.set(F::GUEST_GDTR_BASE, 0x6000);
        fx.set(F::GUEST_GDTR_LIMIT, 0x1f);
        fx.set(F::GUEST_IDTR_BASE, 0x6800);
        fx.set(F::GUEST_IDTR_LIMIT, 0xfff);
        fx.set(F::GUEST_IA32_EFER, EFER_64);
        fx.set(F::GUEST_IA32_PAT, PAT);
        fx.set(F::VMCS_LINK_POINTER, u64::MAX);
        fx.mem.write_u32(LINK_VMCS, VMCS_REVISION_ID).unwrap();
        fx
    }

    /// A 32-bit PAE guest without EPT: PDPTEs come from memory at CR3.
    fn pae32() -> Fx {
        let mut fx = baseline64();
        fx.clear(
            F::VM_ENTRY_CONTROLS,
            u64::from(EntryControls::IA32E_MODE_GUEST.bits()),
        );
        fx.set(F::GUEST_IA32_EFER, 0);
        fx.disable_secondary(SecondaryProcBased::ENABLE_EPT);
        fx.seg(Seg::Cs, 0x08, 0, 0xffff_ffff, 0xc09b);
        fx.set(F::GUEST_CR3, PDPT);
        for i in 0..4 {
            fx.mem
                .write_u64(PDPT + 8 * i, 0x21001 + 0x1000 * i)
                .unwrap();
        }
        fx
    }

    /// Real mode under "unrestricted guest" (CR0.PE = PG = 0).
    fn real_ug() -> Fx {
        let mut fx = baseline64();
        fx.enable_secondary(SecondaryProcBased::UNRESTRICTED_GUEST);
        fx.clear(
            F::VM_ENTRY_CONTROLS,
            u64::from(EntryControls::IA32E_MODE_GUEST.bits()),
        );
        fx.set(F::GUEST_IA32_EFER, 0);
        fx.set(F::GUEST_CR0, 0x30);
        fx.set(F::GUEST_CR4, 0x2000);
        fx.seg(Seg::Cs, 0xf000, 0xf_0000, 0xffff, 0x93);
        for s in [Seg::Ss, Seg::Ds, Seg::Es, Seg::Fs, Seg::Gs] {
            fx.seg(s, 0, 0, 0xffff, 0x93);
        }
        fx.set(F::GUEST_RIP, 0xfff0);
        fx
    }

    /// Virtual-8086 mode inside a 32-bit PAE guest.
    fn v86() -> Fx {
        let mut fx = pae32();
        fx.or(F::GUEST_RFLAGS, RFLAGS_VM);
        for (i, s) in [Seg::Cs, Seg::Ss, Seg::Ds, Seg::Es, Seg::Fs, Seg::Gs]
            .into_iter()
            .enumerate()
        {
            let sel = 0x1000 + 0x100 * i as u64;
            fx.seg(s, sel, sel << 4, 0xffff, 0xf3);
        }
        fx.set(F::GUEST_RIP, 0x100);
        fx
    }

    /// A 32-bit host (L1 outside IA-32e mode) running a 32-bit PAE guest.
    fn host32() -> Fx {
        let mut fx = pae32();
        fx.cx.l1_ia32e = false;
        fx.clear(
            F::VM_EXIT_CONTROLS,
            u64::from(ExitControls::HOST_ADDR_SPACE_SIZE.bits()),
        );
        fx.set(F::HOST_IA32_EFER, 0);
        fx
    }

    /// CR0.PE = 1 (32-bit paging) but CS/SS still hold real-mode values:
    /// a data-type CS (0x93) and SS.RPL != CS.RPL, the state in which KVM
    /// has to emulate without unrestricted guest.
    fn pm_with_real_mode_segments(ug: bool) -> Fx {
        let mut fx = pae32();
        fx.set(F::GUEST_CR4, 0x2000);
        fx.seg(Seg::Cs, 0x1000, 0x1_0000, 0xffff, 0x93);
        fx.seg(Seg::Ss, 0x2003, 0x2_0030, 0xffff, 0x93);
        for s in [Seg::Ds, Seg::Es, Seg::Fs, Seg::Gs] {
            fx.seg(s, 0, 0, 0xffff, 0x93);
        }
        fx.set(F::GUEST_RIP, 0x100);
        if ug {
            fx.enable_secondary(
                SecondaryProcBased::ENABLE_EPT | SecondaryProcBased::UNRESTRICTED_GUEST,
            );
        }
        fx
    }

    /// Baseline passes, the minimal change fails with exactly `expect`.
    macro_rules! violation {
        ($name:ident, $base:ident, |$f:ident| $body:block => $expect:expr) => {
            #[test]
            fn $name() {
                let mut $f = $base();
                assert_eq!($f.check(), Ok(()), "baseline must pass");
                $body
                assert_eq!($f.check(), Err(EntryCheckFailure::from($expect)));
            }
        };
    }

    const PIN: F = F::PIN_BASED_VM_EXEC_CONTROL;
    const PRI: F = F::CPU_BASED_VM_EXEC_CONTROL;
    const EXIT: F = F::VM_EXIT_CONTROLS;
    const ENTRY: F = F::VM_ENTRY_CONTROLS;
    const NONCANON: u64 = 0x0000_8000_0000_0000;
    const V: u32 = intr_info::VALID;
    const EC: u32 = intr_info::DELIVER_ERROR_CODE;

    #[test]
    fn test_baselines_pass() {
        for fx in [
            baseline64(),
            pae32(),
            real_ug(),
            v86(),
            host32(),
            pm_with_real_mode_segments(true),
        ] {
            assert_eq!(fx.check(), Ok(()));
        }
    }

    // ---- 27.2.1.1 VM-execution controls ----
    violation!(test_control_pin_reserved_bit, baseline64, |f| {
        f.or(PIN, u64::from(PinBased::POSTED_INTR.bits()));
    } => ControlRule::PinBasedReserved);
    violation!(test_control_pin_default1_cleared, baseline64, |f| {
        f.clear(PIN, 0x2);
    } => ControlRule::PinBasedReserved);
    violation!(test_control_primary_reserved_bit, baseline64, |f| {
        f.or(PRI, u64::from(PrimaryProcBased::USE_TPR_SHADOW.bits()));
    } => ControlRule::PrimaryReserved);
    violation!(test_control_primary_default1_cleared, baseline64, |f| {
        f.clear(PRI, 0x2);
    } => ControlRule::PrimaryReserved);
    violation!(test_control_secondary_reserved_bit, baseline64, |f| {
        f.enable_secondary(SecondaryProcBased::ENABLE_PML);
    } => ControlRule::SecondaryReserved);
    violation!(test_control_cr3_target_count, baseline64, |f| {
        f.set(F::CR3_TARGET_COUNT, 4);
        assert_eq!(f.check(), Ok(()));
        f.set(F::CR3_TARGET_COUNT, 5);
    } => ControlRule::Cr3TargetCount);
    violation!(test_control_io_bitmap_misaligned, baseline64, |f| {
        f.set(F::IO_BITMAP_B, 0x2008);
    } => ControlRule::IoBitmapAddress);
    violation!(test_control_io_bitmap_beyond_width, baseline64, |f| {
        f.set(F::IO_BITMAP_A, 1 << 39);
    } => ControlRule::IoBitmapAddress);
    violation!(test_control_msr_bitmap_misaligned, baseline64, |f| {
        f.set(F::MSR_BITMAP, 0x3800);
    } => ControlRule::MsrBitmapAddress);
    violation!(test_control_virtual_nmis_without_nmi_exiting, baseline64, |f| {
        f.clear(PIN, u64::from(PinBased::NMI_EXITING.bits()));
    } => ControlRule::VirtualNmisWithoutNmiExiting);
    violation!(test_control_nmi_window_without_virtual_nmis, baseline64, |f| {
        f.or(PRI, u64::from(PrimaryProcBased::NMI_WINDOW_EXITING.bits()));
        assert_eq!(f.check(), Ok(()));
        f.clear(PIN, u64::from(PinBased::VIRTUAL_NMIS.bits()));
    } => ControlRule::NmiWindowWithoutVirtualNmis);
    violation!(test_control_vpid_zero, baseline64, |f| {
        f.set(F::VIRTUAL_PROCESSOR_ID, 0);
    } => ControlRule::VpidZero);
    violation!(test_control_eptp_memory_type_uc, baseline64, |f| {
        f.clear(F::EPT_POINTER, 7);
    } => ControlRule::EptpMemoryType);
    violation!(test_control_eptp_walk_length, baseline64, |f| {
        f.clear(F::EPT_POINTER, 0x38);
        f.or(F::EPT_POINTER, 2 << 3);
    } => ControlRule::EptpWalkLength);
    violation!(test_control_eptp_accessed_dirty, baseline64, |f| {
        f.or(F::EPT_POINTER, 1 << 6);
    } => ControlRule::EptpAccessedDirty);
    violation!(test_control_eptp_reserved_low, baseline64, |f| {
        f.or(F::EPT_POINTER, 1 << 8);
    } => ControlRule::EptpReserved);
    violation!(test_control_eptp_beyond_width, baseline64, |f| {
        f.or(F::EPT_POINTER, 1 << 39);
    } => ControlRule::EptpReserved);
    violation!(test_control_unrestricted_guest_without_ept, baseline64, |f| {
        f.enable_secondary(SecondaryProcBased::UNRESTRICTED_GUEST);
        assert_eq!(f.check(), Ok(()));
        f.disable_secondary(SecondaryProcBased::ENABLE_EPT);
    } => ControlRule::UnrestrictedGuestWithoutEpt);

    #[test]
    fn test_control_secondary_ignored_without_activate_secondary() {
        let mut f = baseline64();
        f.enable_secondary(SecondaryProcBased::ENABLE_PML);
        f.set(F::VIRTUAL_PROCESSOR_ID, 0);
        assert!(f.check().is_err());
        f.clear(PRI, u64::from(PrimaryProcBased::ACTIVATE_SECONDARY.bits()));
        assert_eq!(f.check(), Ok(()));
    }

    #[test]
    fn test_control_true_msr_lets_cr3_exiting_be_either() {
        let mut f = baseline64();
        assert_eq!(f.v.get(PRI) & (3 << 15), 0);
        f.or(PRI, 3 << 15);
        assert_eq!(f.check(), Ok(()));
    }

    // ---- 27.2.1.2 VM-exit controls ----
    violation!(test_control_exit_reserved_bit, baseline64, |f| {
        f.or(EXIT, u64::from(ExitControls::CLEAR_BNDCFGS.bits()));
    } => ControlRule::ExitReserved);
    violation!(test_control_exit_default1_cleared, baseline64, |f| {
        f.clear(EXIT, 1);
    } => ControlRule::ExitReserved);
    violation!(test_control_save_preemption_timer_without_timer, baseline64, |f| {
        f.caps.controls.pin |= PinBased::PREEMPTION_TIMER;
        f.caps.controls.exit |= ExitControls::SAVE_PREEMPTION_TIMER;
        f.or(PIN, u64::from(PinBased::PREEMPTION_TIMER.bits()));
        f.or(EXIT, u64::from(ExitControls::SAVE_PREEMPTION_TIMER.bits()));
        assert_eq!(f.check(), Ok(()));
        f.clear(PIN, u64::from(PinBased::PREEMPTION_TIMER.bits()));
    } => ControlRule::SavePreemptionTimerWithoutTimer);
    violation!(test_control_exit_msr_store_misaligned, baseline64, |f| {
        f.set(F::VM_EXIT_MSR_STORE_COUNT, 1);
        f.set(F::VM_EXIT_MSR_STORE_ADDR, 0x8010);
        assert_eq!(f.check(), Ok(()));
        f.set(F::VM_EXIT_MSR_STORE_ADDR, 0x8008);
    } => ControlRule::ExitMsrStoreAddress);
    violation!(test_control_exit_msr_store_end_beyond_width, baseline64, |f| {
        f.set(F::VM_EXIT_MSR_STORE_COUNT, 1);
        f.set(F::VM_EXIT_MSR_STORE_ADDR, (1 << 39) - 16);
        assert_eq!(f.check(), Ok(()));
        f.set(F::VM_EXIT_MSR_STORE_COUNT, 2);
    } => ControlRule::ExitMsrStoreAddress);
    violation!(test_control_exit_msr_load_misaligned, baseline64, |f| {
        f.set(F::VM_EXIT_MSR_LOAD_COUNT, 3);
        f.set(F::VM_EXIT_MSR_LOAD_ADDR, 0x8004);
    } => ControlRule::ExitMsrLoadAddress);

    #[test]
    fn test_control_msr_area_ignored_when_count_zero() {
        let mut f = baseline64();
        f.set(F::VM_EXIT_MSR_STORE_ADDR, u64::MAX);
        f.set(F::VM_EXIT_MSR_LOAD_ADDR, u64::MAX);
        f.set(F::VM_ENTRY_MSR_LOAD_ADDR, u64::MAX);
        assert_eq!(f.check(), Ok(()));
        f.set(F::VM_ENTRY_MSR_LOAD_COUNT, u64::from(u32::MAX));
        assert_eq!(
            f.check(),
            Err(EntryCheckFailure::Control(ControlRule::EntryMsrLoadAddress))
        );
    }

    // ---- 27.2.1.3 VM-entry controls ----
    violation!(test_control_entry_reserved_bit, baseline64, |f| {
        f.or(ENTRY, u64::from(EntryControls::ENTRY_TO_SMM.bits()));
    } => ControlRule::EntryReserved);
    violation!(test_control_entry_default1_cleared, baseline64, |f| {
        f.clear(ENTRY, 1);
    } => ControlRule::EntryReserved);
    violation!(test_control_event_type_reserved, baseline64, |f| {
        f.inject(V | (1 << 8) | 0x20);
    } => ControlRule::EventType);
    violation!(test_control_event_type_other_without_mtf, baseline64, |f| {
        // Type 7 (pending MTF VM exit) is valid only where the CPU offers
        // the monitor trap flag (SDM 27.2.1.3).
        f.inject(V | intr_info::TYPE_OTHER_EVENT);
        assert_eq!(f.check(), Ok(()));
        f.caps
            .controls
            .primary
            .remove(PrimaryProcBased::MONITOR_TRAP_FLAG);
    } => ControlRule::EventType);
    violation!(test_control_event_nmi_vector, baseline64, |f| {
        f.inject(V | intr_info::TYPE_NMI | 2);
        assert_eq!(f.check(), Ok(()));
        f.inject(V | intr_info::TYPE_NMI | 3);
    } => ControlRule::EventVector);
    violation!(test_control_event_exception_vector, baseline64, |f| {
        f.inject(V | intr_info::TYPE_HARD_EXCEPTION | 31);
        assert_eq!(f.check(), Ok(()));
        f.inject(V | intr_info::TYPE_HARD_EXCEPTION | 32);
    } => ControlRule::EventVector);
    violation!(test_control_event_error_code_missing, baseline64, |f| {
        f.inject(V | EC | intr_info::TYPE_HARD_EXCEPTION | 13);
        assert_eq!(f.check(), Ok(()));
        f.inject(V | intr_info::TYPE_HARD_EXCEPTION | 13);
    } => ControlRule::EventErrorCode);
    violation!(test_control_event_error_code_unexpected, baseline64, |f| {
        f.inject(V | EC | intr_info::TYPE_HARD_EXCEPTION | 6);
    } => ControlRule::EventErrorCode);
    violation!(test_control_event_error_code_in_real_mode, real_ug, |f| {
        f.inject(V | intr_info::TYPE_HARD_EXCEPTION | 13);
        assert_eq!(f.check(), Ok(()));
        f.inject(V | EC | intr_info::TYPE_HARD_EXCEPTION | 13);
    } => ControlRule::EventErrorCode);
    violation!(test_control_event_info_reserved, baseline64, |f| {
        f.inject(V | (1 << 12) | intr_info::TYPE_EXT_INTR | 0x20);
        f.or(F::GUEST_RFLAGS, RFLAGS_IF);
    } => ControlRule::EventInfoReserved);
    violation!(test_control_event_instruction_length_zero, baseline64, |f| {
        f.inject(V | intr_info::TYPE_SOFT_INTR | 0x80);
        f.set(F::VM_ENTRY_INSTRUCTION_LEN, 2);
        assert_eq!(f.check(), Ok(()));
        f.set(F::VM_ENTRY_INSTRUCTION_LEN, 0);
    } => ControlRule::EventInstructionLength);
    violation!(test_control_event_instruction_length_above_15, baseline64, |f| {
        f.inject(V | intr_info::TYPE_SOFT_EXCEPTION | 3);
        f.set(F::VM_ENTRY_INSTRUCTION_LEN, 16);
    } => ControlRule::EventInstructionLength);
    violation!(test_control_entry_msr_load_beyond_width, baseline64, |f| {
        f.set(F::VM_ENTRY_MSR_LOAD_COUNT, 1);
        f.set(F::VM_ENTRY_MSR_LOAD_ADDR, 1 << 39);
    } => ControlRule::EntryMsrLoadAddress);

    // ---- 27.2.2-27.2.4 host state ----
    violation!(test_host_cr0_fixed, baseline64, |f| {
        f.clear(F::HOST_CR0, cr0::NE);
    } => HostRule::Cr0Fixed);
    violation!(test_host_cr0_high_bits, baseline64, |f| {
        f.or(F::HOST_CR0, 1 << 32);
    } => HostRule::Cr0Fixed);
    violation!(test_host_cr4_fixed, baseline64, |f| {
        f.clear(F::HOST_CR4, cr4::VMXE);
    } => HostRule::Cr4Fixed);
    violation!(test_host_cr3_width, baseline64, |f| {
        f.or(F::HOST_CR3, 1 << 39);
    } => HostRule::Cr3Width);
    violation!(test_host_sysenter_not_canonical, baseline64, |f| {
        f.set(F::HOST_IA32_SYSENTER_EIP, 0xffff_8000_0000_0000);
        assert_eq!(f.check(), Ok(()));
        f.set(F::HOST_IA32_SYSENTER_ESP, NONCANON);
    } => HostRule::SysenterNotCanonical);
    violation!(test_host_pat_invalid, baseline64, |f| {
        f.set(F::HOST_IA32_PAT, 0x02);
    } => HostRule::Pat);
    violation!(test_host_efer_reserved, baseline64, |f| {
        f.or(F::HOST_IA32_EFER, 1 << 1);
    } => HostRule::EferReserved);
    violation!(test_host_efer_lma_vs_address_space, baseline64, |f| {
        f.clear(F::HOST_IA32_EFER, EFER_LMA);
    } => HostRule::EferLongMode);
    violation!(test_host_selector_rpl, baseline64, |f| {
        f.set(F::HOST_DS_SELECTOR, 0x13);
    } => HostRule::SelectorRplTi);
    violation!(test_host_selector_ti, baseline64, |f| {
        f.set(F::HOST_TR_SELECTOR, 0x1c);
    } => HostRule::SelectorRplTi);
    violation!(test_host_cs_null, baseline64, |f| {
        f.set(F::HOST_CS_SELECTOR, 0);
    } => HostRule::CsNull);
    violation!(test_host_tr_null, baseline64, |f| {
        f.set(F::HOST_SS_SELECTOR, 0); // allowed for a 64-bit host
        assert_eq!(f.check(), Ok(()));
        f.set(F::HOST_TR_SELECTOR, 0);
    } => HostRule::TrNull);
    violation!(test_host_ss_null_with_32_bit_host, host32, |f| {
        f.set(F::HOST_SS_SELECTOR, 0);
    } => HostRule::SsNull);
    violation!(test_host_base_not_canonical, baseline64, |f| {
        f.set(F::HOST_GDTR_BASE, NONCANON);
    } => HostRule::BaseNotCanonical);
    violation!(test_host_address_space_size_in_ia32e_mode, baseline64, |f| {
        let host64 = ExitControls::LOAD_EFER | ExitControls::HOST_ADDR_SPACE_SIZE;
        f.clear(EXIT, u64::from(host64.bits()));
    } => HostRule::AddressSpaceSize);
    violation!(test_host_address_space_size_outside_ia32e_mode, host32, |f| {
        f.or(EXIT, u64::from(ExitControls::HOST_ADDR_SPACE_SIZE.bits()));
        f.set(F::HOST_IA32_EFER, EFER_64);
    } => HostRule::AddressSpaceSize);
    violation!(test_host_ia32e_guest_needs_ia32e_host, host32, |f| {
        f.or(ENTRY, u64::from(EntryControls::IA32E_MODE_GUEST.bits()));
    } => HostRule::Ia32eGuestWithoutIa32eHost);
    violation!(test_host_pcide_with_32_bit_host, host32, |f| {
        f.or(F::HOST_CR4, cr4::PCIDE);
    } => HostRule::Pcide);
    violation!(test_host_rip_high_with_32_bit_host, host32, |f| {
        f.set(F::HOST_RIP, 1 << 32);
    } => HostRule::RipHigh);
    violation!(test_host_cr4_pae_with_64_bit_host, baseline64, |f| {
        f.clear(F::HOST_CR4, cr4::PAE);
    } => HostRule::Cr4Pae);
    violation!(test_host_rip_not_canonical, baseline64, |f| {
        f.set(F::HOST_RIP, NONCANON);
    } => HostRule::RipNotCanonical);

    // ---- 27.3.1.1 guest control registers, debug registers, MSRs ----
    violation!(test_guest_cr0_fixed_ne, baseline64, |f| {
        f.clear(F::GUEST_CR0, cr0::NE);
    } => GuestRule::Cr0Fixed);
    violation!(test_guest_cr0_pe_clear_needs_unrestricted_guest, real_ug, |f| {
        f.disable_secondary(SecondaryProcBased::UNRESTRICTED_GUEST);
    } => GuestRule::Cr0Fixed);
    violation!(test_guest_cr0_pg_without_pe, real_ug, |f| {
        f.or(F::GUEST_CR0, cr0::PG);
    } => GuestRule::Cr0PgWithoutPe);
    violation!(test_guest_cr4_fixed, baseline64, |f| {
        f.or(F::GUEST_CR4, 1 << 12);
    } => GuestRule::Cr4Fixed);
    violation!(test_guest_debugctl_reserved, baseline64, |f| {
        f.set(F::GUEST_IA32_DEBUGCTL, 0x3);
        assert_eq!(f.check(), Ok(()));
        f.set(F::GUEST_IA32_DEBUGCTL, 1 << 2);
    } => GuestRule::DebugctlReserved);
    violation!(test_guest_ia32e_without_paging, baseline64, |f| {
        f.enable_secondary(SecondaryProcBased::UNRESTRICTED_GUEST);
        f.clear(F::GUEST_CR0, cr0::PG);
    } => GuestRule::Ia32eWithoutPaging);
    violation!(test_guest_ia32e_without_pae, baseline64, |f| {
        f.clear(F::GUEST_CR4, cr4::PAE);
    } => GuestRule::Ia32eWithoutPae);
    violation!(test_guest_pcide_outside_ia32e, pae32, |f| {
        f.or(F::GUEST_CR4, cr4::PCIDE);
    } => GuestRule::PcideOutsideIa32e);
    violation!(test_guest_cr3_width, baseline64, |f| {
        f.or(F::GUEST_CR3, 1 << 39);
    } => GuestRule::Cr3Width);
    violation!(test_guest_dr7_high, baseline64, |f| {
        f.or(F::GUEST_DR7, 1 << 32);
    } => GuestRule::Dr7High);
    violation!(test_guest_sysenter_not_canonical, baseline64, |f| {
        f.set(F::GUEST_SYSENTER_EIP, NONCANON);
    } => GuestRule::SysenterNotCanonical);
    violation!(test_guest_pat_invalid, baseline64, |f| {
        f.set(F::GUEST_IA32_PAT, 0x0300);
    } => GuestRule::Pat);
    violation!(test_guest_efer_reserved, baseline64, |f| {
        f.or(F::GUEST_IA32_EFER, 1 << 12);
    } => GuestRule::EferReserved);
    violation!(test_guest_efer_lma_vs_ia32e, baseline64, |f| {
        f.clear(F::GUEST_IA32_EFER, EFER_LMA);
    } => GuestRule::EferLma);
    violation!(test_guest_efer_lme_vs_lma_with_paging, baseline64, |f| {
        f.clear(F::GUEST_IA32_EFER, EFER_LME);
    } => GuestRule::EferLme);

    #[test]
    fn test_guest_debug_and_msr_fields_ignored_when_not_loaded() {
        let mut f = baseline64();
        f.set(F::GUEST_IA32_DEBUGCTL, u64::MAX);
        f.set(F::GUEST_DR7, u64::MAX);
        f.set(F::GUEST_IA32_PAT, u64::MAX);
        f.set(F::GUEST_IA32_EFER, u64::MAX);
        f.clear(
            ENTRY,
            u64::from(
                (EntryControls::LOAD_DEBUG_CONTROLS
                    | EntryControls::LOAD_PAT
                    | EntryControls::LOAD_EFER)
                    .bits(),
            ),
        );
        assert_eq!(f.check(), Ok(()));
    }

    // ---- 27.3.1.2 segment registers ----
    violation!(test_guest_tr_selector_ti, baseline64, |f| {
        f.set(F::GUEST_TR_SELECTOR, 0x1c);
    } => GuestRule::TrSelectorTi);
    violation!(test_guest_ldtr_selector_ti, baseline64, |f| {
        f.seg(Seg::Ldtr, 0x20, 0x8000, 0xff, 0x82);
        assert_eq!(f.check(), Ok(()));
        f.set(F::GUEST_LDTR_SELECTOR, 0x24);
    } => GuestRule::LdtrSelectorTi);
    violation!(test_guest_ss_rpl_not_cs_rpl, baseline64, |f| {
        f.set(F::GUEST_SS_SELECTOR, 0x13);
    } => GuestRule::SsRplNotCsRpl);
    violation!(test_guest_v86_base, v86, |f| {
        f.set(F::GUEST_DS_BASE, 0x1234);
    } => GuestRule::V86Base(Seg::Ds));
    violation!(test_guest_fs_base_not_canonical, baseline64, |f| {
        f.set(F::GUEST_FS_BASE, NONCANON);
    } => GuestRule::BaseNotCanonical(Seg::Fs));
    violation!(test_guest_tr_base_not_canonical, baseline64, |f| {
        f.set(F::GUEST_TR_BASE, NONCANON);
    } => GuestRule::BaseNotCanonical(Seg::Tr));
    violation!(test_guest_ldtr_base_not_canonical, baseline64, |f| {
        f.set(F::GUEST_LDTR_BASE, NONCANON); // unusable: not checked
        assert_eq!(f.check(), Ok(()));
        f.seg(Seg::Ldtr, 0x20, NONCANON, 0xff, 0x82);
    } => GuestRule::BaseNotCanonical(Seg::Ldtr));
    violation!(test_guest_cs_base_high, baseline64, |f| {
        f.set(F::GUEST_CS_BASE, 1 << 32);
    } => GuestRule::BaseHigh(Seg::Cs));
    violation!(test_guest_ss_base_high, baseline64, |f| {
        f.set(F::GUEST_ES_AR_BYTES, 0x1_0000); // unusable ES: base not checked
        f.set(F::GUEST_ES_BASE, 1 << 32);
        assert_eq!(f.check(), Ok(()));
        f.set(F::GUEST_SS_BASE, 1 << 32);
    } => GuestRule::BaseHigh(Seg::Ss));
    violation!(test_guest_v86_limit, v86, |f| {
        f.set(F::GUEST_SS_LIMIT, 0xfffff);
    } => GuestRule::V86Limit(Seg::Ss));
    violation!(test_guest_v86_access_rights, v86, |f| {
        f.set(F::GUEST_GS_AR_BYTES, 0xf2);
    } => GuestRule::V86AccessRights(Seg::Gs));
    violation!(test_guest_cs_type_data_without_unrestricted_guest, baseline64, |f| {
        f.set(F::GUEST_CS_AR_BYTES, 0xa093);
    } => GuestRule::SegmentType(Seg::Cs));
    violation!(test_guest_cs_type_non_accessed, baseline64, |f| {
        f.set(F::GUEST_CS_AR_BYTES, 0xa09a);
    } => GuestRule::SegmentType(Seg::Cs));
    violation!(test_guest_ss_type, baseline64, |f| {
        f.set(F::GUEST_SS_AR_BYTES, 0xc09b);
    } => GuestRule::SegmentType(Seg::Ss));
    violation!(test_guest_ds_type_not_accessed, baseline64, |f| {
        f.set(F::GUEST_DS_AR_BYTES, 0xc092);
    } => GuestRule::SegmentType(Seg::Ds));
    violation!(test_guest_es_type_execute_only_code, baseline64, |f| {
        f.set(F::GUEST_ES_AR_BYTES, 0xc09b); // readable code is fine
        assert_eq!(f.check(), Ok(()));
        f.set(F::GUEST_ES_AR_BYTES, 0xc099);
    } => GuestRule::SegmentType(Seg::Es));
    violation!(test_guest_tr_type_16_bit_in_ia32e, baseline64, |f| {
        f.set(F::GUEST_TR_AR_BYTES, 0x83);
    } => GuestRule::SegmentType(Seg::Tr));
    violation!(test_guest_tr_type_outside_ia32e, pae32, |f| {
        f.set(F::GUEST_TR_AR_BYTES, 0x83); // 16-bit busy TSS is fine here
        assert_eq!(f.check(), Ok(()));
        f.set(F::GUEST_TR_AR_BYTES, 0x89);
    } => GuestRule::SegmentType(Seg::Tr));
    violation!(test_guest_ldtr_type, baseline64, |f| {
        f.seg(Seg::Ldtr, 0x20, 0x8000, 0xff, 0x83);
    } => GuestRule::SegmentType(Seg::Ldtr));
    violation!(test_guest_cs_descriptor_type, baseline64, |f| {
        f.set(F::GUEST_CS_AR_BYTES, 0xa08b);
    } => GuestRule::DescriptorType(Seg::Cs));
    violation!(test_guest_fs_descriptor_type, baseline64, |f| {
        f.set(F::GUEST_FS_AR_BYTES, 0xc083);
    } => GuestRule::DescriptorType(Seg::Fs));
    violation!(test_guest_tr_descriptor_type, baseline64, |f| {
        f.set(F::GUEST_TR_AR_BYTES, 0x9b);
    } => GuestRule::DescriptorType(Seg::Tr));
    violation!(test_guest_cs_dpl_nonconforming, baseline64, |f| {
        f.set(F::GUEST_CS_AR_BYTES, 0xa0fb);
    } => GuestRule::CsDpl);
    violation!(test_guest_cs_dpl_conforming, baseline64, |f| {
        f.set(F::GUEST_CS_AR_BYTES, 0xa09f); // conforming, DPL 0 <= SS.DPL 0
        assert_eq!(f.check(), Ok(()));
        f.set(F::GUEST_CS_AR_BYTES, 0xa0bf);
    } => GuestRule::CsDpl);
    violation!(test_guest_cs_dpl_type_3, real_ug, |f| {
        f.set(F::GUEST_CS_AR_BYTES, 0xb3);
    } => GuestRule::CsDpl);
    violation!(test_guest_ss_dpl_not_rpl, baseline64, |f| {
        f.set(F::GUEST_CS_AR_BYTES, 0xa09f);
        f.set(F::GUEST_SS_AR_BYTES, 0xc0f3);
    } => GuestRule::SsDplNotRpl);
    violation!(test_guest_ss_dpl_not_zero_in_real_mode, real_ug, |f| {
        f.set(F::GUEST_SS_AR_BYTES, 0xf3);
    } => GuestRule::SsDplNotZero);
    violation!(test_guest_ds_dpl_below_rpl, baseline64, |f| {
        f.set(F::GUEST_DS_SELECTOR, 0x13);
    } => GuestRule::DplBelowRpl(Seg::Ds));
    violation!(test_guest_cs_not_present, baseline64, |f| {
        f.set(F::GUEST_CS_AR_BYTES, 0xa01b);
    } => GuestRule::NotPresent(Seg::Cs));
    violation!(test_guest_ds_not_present, baseline64, |f| {
        f.set(F::GUEST_DS_AR_BYTES, 0x1_c013); // unusable: not checked
        assert_eq!(f.check(), Ok(()));
        f.set(F::GUEST_DS_AR_BYTES, 0xc013);
    } => GuestRule::NotPresent(Seg::Ds));
    violation!(test_guest_tr_not_present, baseline64, |f| {
        f.set(F::GUEST_TR_AR_BYTES, 0x0b);
    } => GuestRule::NotPresent(Seg::Tr));
    violation!(test_guest_ss_ar_reserved_low, baseline64, |f| {
        f.or(F::GUEST_SS_AR_BYTES, 1 << 8);
    } => GuestRule::AccessRightsReserved(Seg::Ss));
    violation!(test_guest_gs_ar_reserved_high, baseline64, |f| {
        f.or(F::GUEST_GS_AR_BYTES, 1 << 17);
    } => GuestRule::AccessRightsReserved(Seg::Gs));
    violation!(test_guest_cs_ar_reserved, baseline64, |f| {
        f.or(F::GUEST_CS_AR_BYTES, 1 << 20);
    } => GuestRule::AccessRightsReserved(Seg::Cs));
    violation!(test_guest_cs_long_mode_with_db, baseline64, |f| {
        f.set(F::GUEST_CS_AR_BYTES, 0xe09b);
    } => GuestRule::CsLongModeDb);
    violation!(test_guest_ds_granularity_big_limit, baseline64, |f| {
        f.set(F::GUEST_DS_AR_BYTES, 0x4093);
    } => GuestRule::Granularity(Seg::Ds));
    violation!(test_guest_cs_granularity_low_bits, baseline64, |f| {
        f.set(F::GUEST_CS_LIMIT, 0xffff_f000);
    } => GuestRule::Granularity(Seg::Cs));
    violation!(test_guest_tr_granularity, baseline64, |f| {
        f.set(F::GUEST_TR_AR_BYTES, 0x808b);
    } => GuestRule::Granularity(Seg::Tr));
    violation!(test_guest_tr_unusable, baseline64, |f| {
        f.set(F::GUEST_TR_AR_BYTES, 0x1_008b);
    } => GuestRule::TrUnusable);

    #[test]
    fn test_guest_real_mode_segments_under_protected_mode_need_unrestricted_guest() {
        // The case that makes KVM emulate: CR0.PE = 1 with a data-type CS
        // (0x93) and SS.RPL (3) != CS.RPL (0).
        let strict = pm_with_real_mode_segments(false);
        assert_eq!(
            strict.check(),
            Err(EntryCheckFailure::GuestState(GuestRule::SsRplNotCsRpl, 0))
        );
        let mut same_rpl = pm_with_real_mode_segments(false);
        same_rpl.set(F::GUEST_SS_SELECTOR, 0x2000);
        assert_eq!(
            same_rpl.check(),
            Err(EntryCheckFailure::GuestState(
                GuestRule::SegmentType(Seg::Cs),
                0
            ))
        );
        assert_eq!(pm_with_real_mode_segments(true).check(), Ok(()));
    }

    #[test]
    fn test_guest_unrestricted_guest_relaxes_dpl_rpl_rules() {
        let mut f = baseline64();
        f.set(F::GUEST_DS_SELECTOR, 0x13);
        assert!(f.check().is_err());
        f.enable_secondary(SecondaryProcBased::UNRESTRICTED_GUEST);
        assert_eq!(f.check(), Ok(()));
    }

    #[test]
    fn test_guest_unusable_data_segments_skip_checks() {
        let mut f = baseline64();
        for s in [Seg::Ds, Seg::Es, Seg::Fs, Seg::Gs] {
            f.seg(s, 0, 0, 0, 0x1_0000);
        }
        assert_eq!(f.check(), Ok(()));
    }

    // ---- 27.3.1.3 descriptor-table registers ----
    violation!(test_guest_gdtr_base_not_canonical, baseline64, |f| {
        f.set(F::GUEST_GDTR_BASE, NONCANON);
    } => GuestRule::DescTableBase(DescTable::Gdtr));
    violation!(test_guest_idtr_limit, baseline64, |f| {
        f.set(F::GUEST_IDTR_LIMIT, 0xffff);
        assert_eq!(f.check(), Ok(()));
        f.set(F::GUEST_IDTR_LIMIT, 0x1_0000);
    } => GuestRule::DescTableLimit(DescTable::Idtr));

    // ---- 27.3.1.4 RIP and RFLAGS ----
    violation!(test_guest_rip_high_outside_ia32e, pae32, |f| {
        f.set(F::GUEST_RIP, 1 << 32);
    } => GuestRule::RipHigh);
    violation!(test_guest_rip_high_in_compatibility_mode, baseline64, |f| {
        f.set(F::GUEST_RIP, 0xffff_ffff_8000_0000); // canonical, fine in 64-bit mode
        assert_eq!(f.check(), Ok(()));
        f.set(F::GUEST_CS_AR_BYTES, 0xc09b);
    } => GuestRule::RipHigh);
    violation!(test_guest_rip_not_canonical, baseline64, |f| {
        f.set(F::GUEST_RIP, NONCANON);
    } => GuestRule::RipNotCanonical);
    violation!(test_guest_rflags_reserved_bit_3, baseline64, |f| {
        f.or(F::GUEST_RFLAGS, 1 << 3);
    } => GuestRule::RflagsReserved);
    violation!(test_guest_rflags_reserved_bit_22, baseline64, |f| {
        f.or(F::GUEST_RFLAGS, 1 << 22);
    } => GuestRule::RflagsReserved);
    violation!(test_guest_rflags_bit_1_clear, baseline64, |f| {
        f.clear(F::GUEST_RFLAGS, 2);
    } => GuestRule::RflagsReserved);
    violation!(test_guest_rflags_vm_in_ia32e_guest, v86, |f| {
        f.or(ENTRY, u64::from(EntryControls::IA32E_MODE_GUEST.bits()));
        f.set(F::GUEST_IA32_EFER, EFER_64);
    } => GuestRule::RflagsVm);
    violation!(test_guest_rflags_vm_without_pe, real_ug, |f| {
        f.or(F::GUEST_RFLAGS, RFLAGS_VM);
        for s in [
            F::GUEST_CS_AR_BYTES,
            F::GUEST_SS_AR_BYTES,
            F::GUEST_DS_AR_BYTES,
            F::GUEST_ES_AR_BYTES,
            F::GUEST_FS_AR_BYTES,
            F::GUEST_GS_AR_BYTES,
        ] {
            f.set(s, 0xf3);
        }
    } => GuestRule::RflagsVm);
    violation!(test_guest_rflags_if_for_external_interrupt, baseline64, |f| {
        f.inject(V | intr_info::TYPE_EXT_INTR | 0x20);
        f.or(F::GUEST_RFLAGS, RFLAGS_IF);
        assert_eq!(f.check(), Ok(()));
        f.clear(F::GUEST_RFLAGS, RFLAGS_IF);
    } => GuestRule::RflagsIf);

    // ---- 27.3.1.5 non-register state ----
    violation!(test_guest_activity_state_unsupported, baseline64, |f| {
        f.set(F::GUEST_ACTIVITY_STATE, 1);
        assert_eq!(f.check(), Ok(()));
        f.set(F::GUEST_ACTIVITY_STATE, 2);
    } => GuestRule::ActivityState);
    violation!(test_guest_activity_hlt_not_advertised, baseline64, |f| {
        f.set(F::GUEST_ACTIVITY_STATE, 1);
        f.caps.activity_hlt = false;
    } => GuestRule::ActivityState);
    violation!(test_guest_activity_hlt_needs_ss_dpl_0, baseline64, |f| {
        f.seg(Seg::Cs, 0x0b, 0, 0xffff_ffff, 0xa0fb);
        f.seg(Seg::Ss, 0x13, 0, 0xffff_ffff, 0xc0f3);
        assert_eq!(f.check(), Ok(()));
        f.set(F::GUEST_ACTIVITY_STATE, 1);
    } => GuestRule::ActivityHltDpl);
    violation!(test_guest_activity_hlt_with_sti_blocking, baseline64, |f| {
        f.or(F::GUEST_RFLAGS, RFLAGS_IF);
        f.set(F::GUEST_INTERRUPTIBILITY_INFO, 1);
        assert_eq!(f.check(), Ok(()));
        f.set(F::GUEST_ACTIVITY_STATE, 1);
    } => GuestRule::ActivityBlocking);
    violation!(test_guest_activity_hlt_injection, baseline64, |f| {
        f.set(F::GUEST_ACTIVITY_STATE, 1);
        f.inject(V | intr_info::TYPE_HARD_EXCEPTION | 18);
        assert_eq!(f.check(), Ok(()));
        f.inject(V | EC | intr_info::TYPE_HARD_EXCEPTION | 13);
    } => GuestRule::ActivityInjection);
    violation!(test_guest_interruptibility_reserved, baseline64, |f| {
        f.set(F::GUEST_INTERRUPTIBILITY_INFO, 1 << 4);
    } => GuestRule::InterruptibilityReserved);
    violation!(test_guest_interruptibility_sti_and_mov_ss, baseline64, |f| {
        f.or(F::GUEST_RFLAGS, RFLAGS_IF);
        f.set(F::GUEST_INTERRUPTIBILITY_INFO, 2);
        assert_eq!(f.check(), Ok(()));
        f.set(F::GUEST_INTERRUPTIBILITY_INFO, 3);
    } => GuestRule::StiAndMovSs);
    violation!(test_guest_interruptibility_sti_without_if, baseline64, |f| {
        f.set(F::GUEST_INTERRUPTIBILITY_INFO, 1);
    } => GuestRule::StiWithoutIf);
    violation!(test_guest_inject_external_interrupt_under_mov_ss, baseline64, |f| {
        f.or(F::GUEST_RFLAGS, RFLAGS_IF);
        f.inject(V | intr_info::TYPE_EXT_INTR | 0x20);
        assert_eq!(f.check(), Ok(()));
        f.set(F::GUEST_INTERRUPTIBILITY_INFO, 2);
    } => GuestRule::InjectExtIntrBlocked);
    violation!(test_guest_inject_nmi_under_mov_ss, baseline64, |f| {
        f.inject(V | intr_info::TYPE_NMI | 2);
        f.set(F::GUEST_INTERRUPTIBILITY_INFO, 2);
    } => GuestRule::InjectNmiMovSs);
    violation!(test_guest_smi_blocking_outside_smm, baseline64, |f| {
        f.set(F::GUEST_INTERRUPTIBILITY_INFO, 1 << 2);
    } => GuestRule::SmiBlocking);
    violation!(test_guest_inject_nmi_with_virtual_nmi_blocking, baseline64, |f| {
        f.set(F::GUEST_INTERRUPTIBILITY_INFO, 1 << 3);
        assert_eq!(f.check(), Ok(()));
        f.inject(V | intr_info::TYPE_NMI | 2);
    } => GuestRule::InjectNmiVirtualNmiBlocked);
    violation!(test_guest_pending_dbg_reserved, baseline64, |f| {
        f.set(F::GUEST_PENDING_DBG_EXCEPTIONS, 0xf | (1 << 12));
        assert_eq!(f.check(), Ok(()));
        f.set(F::GUEST_PENDING_DBG_EXCEPTIONS, 1 << 4);
    } => GuestRule::PendingDbgReserved);
    violation!(test_guest_pending_dbg_bs_missing_with_tf, baseline64, |f| {
        f.or(F::GUEST_RFLAGS, RFLAGS_IF | RFLAGS_TF);
        f.set(F::GUEST_INTERRUPTIBILITY_INFO, 1);
        f.set(F::GUEST_PENDING_DBG_EXCEPTIONS, PENDING_DBG_BS);
        assert_eq!(f.check(), Ok(()));
        f.set(F::GUEST_PENDING_DBG_EXCEPTIONS, 0);
    } => GuestRule::PendingDbgBs);
    violation!(test_guest_pending_dbg_bs_with_btf, baseline64, |f| {
        f.or(F::GUEST_RFLAGS, RFLAGS_IF | RFLAGS_TF);
        f.set(F::GUEST_INTERRUPTIBILITY_INFO, 1);
        f.set(F::GUEST_PENDING_DBG_EXCEPTIONS, PENDING_DBG_BS);
        f.set(F::GUEST_IA32_DEBUGCTL, DEBUGCTL_BTF);
    } => GuestRule::PendingDbgBs);
    violation!(test_guest_vmcs_link_pointer_zero, baseline64, |f| {
        f.set(F::VMCS_LINK_POINTER, 0);
    } => GuestRule::VmcsLinkPointer);
    violation!(test_guest_vmcs_link_pointer_misaligned, baseline64, |f| {
        f.set(F::VMCS_LINK_POINTER, LINK_VMCS + 8);
    } => GuestRule::VmcsLinkPointer);
    violation!(test_guest_vmcs_link_pointer_outside_ram, baseline64, |f| {
        f.set(F::VMCS_LINK_POINTER, 0x10_0000);
    } => GuestRule::VmcsLinkPointer);
    violation!(test_guest_vmcs_link_pointer_is_current_vmcs, baseline64, |f| {
        f.mem.write_u32(CURRENT_VMCS, VMCS_REVISION_ID).unwrap();
        f.set(F::VMCS_LINK_POINTER, CURRENT_VMCS);
    } => GuestRule::VmcsLinkPointer);
    violation!(test_guest_vmcs_link_pointer_shadow_bit, baseline64, |f| {
        f.set(F::VMCS_LINK_POINTER, LINK_VMCS); // a VMCS with our revision id
        assert_eq!(f.check(), Ok(()));
        f.mem.write_u32(LINK_VMCS, VMCS_REVISION_ID | 1 << 31).unwrap();
    } => GuestRule::VmcsLinkPointer);

    // ---- 27.3.1.6 PDPTEs ----
    violation!(test_guest_pdpte_reserved_from_memory, pae32, |f| {
        f.mem.write_u64(PDPT + 16, 0xdead_0006).unwrap(); // not present: ignored
        assert_eq!(f.check(), Ok(()));
        f.mem.write_u64(PDPT + 16, 0x21003).unwrap();
    } => GuestRule::Pdpte);
    violation!(test_guest_pdpte_beyond_width, pae32, |f| {
        f.mem.write_u64(PDPT, (1 << 39) | 1).unwrap();
    } => GuestRule::Pdpte);
    violation!(test_guest_pdpte_unreadable, pae32, |f| {
        f.set(F::GUEST_CR3, 0xffff_f000);
    } => GuestRule::Pdpte);
    violation!(test_guest_pdpte_from_vmcs_with_ept, pae32, |f| {
        f.enable_secondary(SecondaryProcBased::ENABLE_EPT);
        f.set(F::GUEST_CR3, 0xffff_f000); // memory is not read with EPT
        f.set(F::GUEST_PDPTE1, 0x21001);
        assert_eq!(f.check(), Ok(()));
        f.set(F::GUEST_PDPTE1, 0x21101);
    } => GuestRule::Pdpte);

    #[test]
    fn test_guest_failure_qualifications() {
        let mut f = baseline64();
        f.set(F::VMCS_LINK_POINTER, 0);
        let e = f.check().unwrap_err();
        assert_eq!(
            e,
            EntryCheckFailure::GuestState(GuestRule::VmcsLinkPointer, 4)
        );
        assert_eq!(e.exit_qualification(), Some(4));
        assert_eq!(e.vm_instruction_error(), None);

        let mut f = pae32();
        f.mem.write_u64(PDPT, 0x21003).unwrap();
        assert_eq!(
            f.check(),
            Err(EntryCheckFailure::GuestState(GuestRule::Pdpte, 2))
        );

        let mut f = baseline64();
        f.set(F::GUEST_RIP, NONCANON);
        assert_eq!(
            f.check(),
            Err(EntryCheckFailure::GuestState(GuestRule::RipNotCanonical, 0))
        );
    }

    #[test]
    fn test_failure_maps_to_vm_instruction_error() {
        let c = EntryCheckFailure::Control(ControlRule::VpidZero);
        let h = EntryCheckFailure::HostState(HostRule::CsNull);
        assert_eq!(
            c.vm_instruction_error(),
            Some(VmInstructionError::EntryInvalidControlFields)
        );
        assert_eq!(
            h.vm_instruction_error(),
            Some(VmInstructionError::EntryInvalidHostStateFields)
        );
        assert_eq!(c.exit_qualification(), None);
    }

    #[test]
    fn test_checks_run_controls_then_host_then_guest() {
        let mut f = baseline64();
        f.set(F::GUEST_RIP, NONCANON);
        f.set(F::HOST_RIP, NONCANON);
        f.set(F::VIRTUAL_PROCESSOR_ID, 0);
        assert_eq!(
            f.check(),
            Err(EntryCheckFailure::Control(ControlRule::VpidZero))
        );
        f.set(F::VIRTUAL_PROCESSOR_ID, 1);
        assert_eq!(
            f.check(),
            Err(EntryCheckFailure::HostState(HostRule::RipNotCanonical))
        );
        f.set(F::HOST_RIP, 0x1000);
        assert!(matches!(f.check(), Err(EntryCheckFailure::GuestState(..))));
    }

    #[test]
    fn test_messages_name_the_sdm_rule() {
        let e = EntryCheckFailure::GuestState(GuestRule::SegmentType(Seg::Cs), 0);
        assert_eq!(
            e.to_string(),
            "VM-entry guest-state check failed (qualification 0): SDM 27.3.1.2: the CS segment type is not allowed"
        );
        assert!(ControlRule::EptpWalkLength
            .to_string()
            .starts_with("SDM 27.2.1.1"));
        assert!(HostRule::Cr4Pae.to_string().starts_with("SDM 27.2.4"));
    }

    #[test]
    fn test_check_vm_entry_assumes_l1_in_ia32e_mode() {
        let f = baseline64();
        assert_eq!(check_vm_entry(&f.v, &f.caps, &f.mem), Ok(()));
        let h = host32();
        assert_eq!(
            check_vm_entry(&h.v, &h.caps, &h.mem),
            Err(EntryCheckFailure::HostState(HostRule::AddressSpaceSize))
        );
    }

    #[test]
    fn test_garbage_vmcs_fails_without_panicking() {
        let caps = VmxCapabilities::l0_default();
        let mem = FlatMemory::new(0x1000);
        let mut v = Vmcs12::new();
        for (i, &field) in F::ALL.iter().enumerate() {
            v.set(field, u64::MAX.rotate_left(i as u32));
        }
        assert!(check_vm_entry(&v, &caps, &mem).is_err());
        assert!(check_vm_entry(&Vmcs12::new(), &caps, &mem).is_err());
    }

    proptest! {
        #[test]
        fn test_is_canonical_matches_reference(addr in any::<u64>(), high in any::<bool>()) {
            // Bias half the cases toward the canonical boundary.
            let a = if high { addr | 0xffff_8000_0000_0000 } else { addr };
            let top = a >> 47;
            let reference = top == 0 || top == 0x1_ffff;
            prop_assert_eq!(is_canonical(a), reference);
        }

        #[test]
        fn test_granularity_matches_reference(limit in any::<u32>(), g in any::<bool>()) {
            let ar = if g { 1u64 << 15 } else { 0 };
            let l = u64::from(limit);
            // G = 1: limit is (n << 12) | 0xfff; G = 0: limit fits 20 bits.
            let reference = if g { l & 0xfff == 0xfff } else { l <= 0xf_ffff };
            prop_assert_eq!(granularity_ok(l, ar), reference);
        }

        #[test]
        fn test_pat_valid_matches_reference(pat in any::<u64>()) {
            let reference = (0..8).all(|i| [0u64, 1, 4, 5, 6, 7].contains(&((pat >> (8 * i)) & 0xff)));
            prop_assert_eq!(pat_valid(pat), reference);
        }

        #[test]
        fn test_random_guest_rflags_reserved_bits_fail(bit in prop::sample::select(vec![3u32, 5, 15, 22, 31, 40, 63])) {
            let mut f = baseline64();
            f.or(F::GUEST_RFLAGS, 1 << bit);
            prop_assert_eq!(f.check(), Err(EntryCheckFailure::GuestState(GuestRule::RflagsReserved, 0)));
        }
    }
}
