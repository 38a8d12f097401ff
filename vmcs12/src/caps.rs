//! Capability MSRs: what this L0 advertises to L1 (SDM Vol. 3, Appendix A).
//!
//! [`VmxCapabilities`] is the single description of the virtual VMX
//! implementation: [`VmxCapabilities::read_msr`] produces every IA32_VMX_*
//! value from it and [`VmxCapabilities::allowed`] is what the VM-entry
//! checks (`crate::entry`) test the five control fields against, so the
//! MSRs L1 reads and the checks L0 applies cannot disagree.

use serde::{Deserialize, Serialize};

use crate::controls::{
    EntryControls, ExitControls, PinBased, PrimaryProcBased, SecondaryProcBased,
};
use crate::field::VmcsField;

/// VMCS revision identifier this model reports in IA32_VMX_BASIC[30:0].
pub const VMCS_REVISION_ID: u32 = 0x0000_1312;

/// MSR indices (SDM Vol. 4, Table 2-2; Vol. 3 Appendix A).
pub use crate::msr;

/// Default1 classes (SDM A.2): control bits reserved as 1. Without the
/// TRUE MSRs every one of them must be 1.
pub mod default1 {
    /// Pin-based: bits 1, 2, 4 (A.3.1).
    pub const PIN: u32 = 0x0000_0016;
    /// Primary processor-based: bits 1, 4-6, 8, 13-16, 26 (A.3.2).
    pub const PRIMARY: u32 = 0x0401_e172;
    /// Primary VM-exit: bits 0-8, 10, 11, 13, 14, 16, 17 (A.4.1).
    pub const EXIT: u32 = 0x0003_6dff;
    /// VM-entry: bits 0-8, 12 (A.5).
    pub const ENTRY: u32 = 0x0000_11ff;
    /// Default1 primary controls the TRUE MSR lets be 0: CR3-load and
    /// CR3-store exiting (bits 15, 16).
    pub const PRIMARY_TRUE_MAY_CLEAR: u32 = (1 << 15) | (1 << 16);
    /// Default1 exit control the TRUE MSR lets be 0: save debug controls.
    pub const EXIT_TRUE_MAY_CLEAR: u32 = 1 << 2;
    /// Default1 entry control the TRUE MSR lets be 0: load debug controls.
    pub const ENTRY_TRUE_MAY_CLEAR: u32 = 1 << 2;
}

/// CR0 bits: PE (0), NE (5), PG (31).
pub mod cr0 {
    /// Protection enable.
    pub const PE: u64 = 1 << 0;
    /// Numeric error.
    pub const NE: u64 = 1 << 5;
    /// Paging.
    pub const PG: u64 = 1 << 31;
}

/// CR4 bits used by the fixed-bit MSRs and the entry checks.
pub mod cr4 {
    /// Physical-address extension.
    pub const PAE: u64 = 1 << 5;
    /// VMX enable.
    pub const VMXE: u64 = 1 << 13;
    /// PCID enable.
    pub const PCIDE: u64 = 1 << 17;
    /// CR4 bits this virtual CPU implements: VME, PVI, TSD, DE, PSE, PAE,
    /// MCE, PGE, PCE, OSFXSR, OSXMMEXCPT (bits 0-10), VMXE, FSGSBASE,
    /// PCIDE, OSXSAVE, SMEP, SMAP. No LA57 (4-level paging only).
    pub const SUPPORTED: u64 = 0x7ff | VMXE | (1 << 16) | PCIDE | (1 << 18) | (1 << 20) | (1 << 21);
}

/// IA32_VMX_EPT_VPID_CAP bits (SDM A.10).
pub mod ept_vpid {
    /// Bit 6: page-walk length of 4.
    pub const WALK_LENGTH_4: u64 = 1 << 6;
    /// Bit 7: page-walk length of 5 (not offered by this L0).
    pub const WALK_LENGTH_5: u64 = 1 << 7;
    /// Bit 8: EPT paging-structure memory type UC.
    pub const MEMTYPE_UC: u64 = 1 << 8;
    /// Bit 14: EPT paging-structure memory type WB.
    pub const MEMTYPE_WB: u64 = 1 << 14;
    /// Bit 16: 2-MByte EPT pages.
    pub const PAGE_2M: u64 = 1 << 16;
    /// Bit 17: 1-GByte EPT pages.
    pub const PAGE_1G: u64 = 1 << 17;
    /// Bit 20: INVEPT supported.
    pub const INVEPT: u64 = 1 << 20;
    /// Bit 21: accessed and dirty flags for EPT.
    pub const AD_FLAGS: u64 = 1 << 21;
    /// Bit 23: EPTP bit 7, supervisor shadow-stack control (not offered).
    pub const SUPERVISOR_SHADOW_STACK: u64 = 1 << 23;
    /// Bit 25: single-context INVEPT.
    pub const INVEPT_SINGLE_CONTEXT: u64 = 1 << 25;
    /// Bit 26: all-context INVEPT.
    pub const INVEPT_ALL_CONTEXT: u64 = 1 << 26;
    /// Bit 32: INVVPID supported.
    pub const INVVPID: u64 = 1 << 32;
    /// Bit 40: individual-address INVVPID.
    pub const INVVPID_INDIVIDUAL_ADDR: u64 = 1 << 40;
    /// Bit 41: single-context INVVPID.
    pub const INVVPID_SINGLE_CONTEXT: u64 = 1 << 41;
    /// Bit 42: all-context INVVPID.
    pub const INVVPID_ALL_CONTEXT: u64 = 1 << 42;
    /// Bit 43: single-context-retaining-globals INVVPID.
    pub const INVVPID_SINGLE_CONTEXT_RETAIN_GLOBALS: u64 = 1 << 43;
    /// What this L0 offers: 4-level walk, WB, 2M and 1G pages, INVEPT
    /// single and all context, INVVPID of all four types.
    pub const L0_DEFAULT: u64 = WALK_LENGTH_4
        | MEMTYPE_WB
        | PAGE_2M
        | PAGE_1G
        | INVEPT
        | INVEPT_SINGLE_CONTEXT
        | INVEPT_ALL_CONTEXT
        | INVVPID
        | INVVPID_INDIVIDUAL_ADDR
        | INVVPID_SINGLE_CONTEXT
        | INVVPID_ALL_CONTEXT
        | INVVPID_SINGLE_CONTEXT_RETAIN_GLOBALS;
}

/// The five VMX control fields whose settings a capability MSR pair
/// describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ControlMsr {
    /// PIN_BASED_VM_EXEC_CONTROL vs IA32_VMX_TRUE_PINBASED_CTLS.
    PinBased,
    /// CPU_BASED_VM_EXEC_CONTROL vs IA32_VMX_TRUE_PROCBASED_CTLS.
    PrimaryProcBased,
    /// SECONDARY_VM_EXEC_CONTROL vs IA32_VMX_PROCBASED_CTLS2.
    SecondaryProcBased,
    /// VM_EXIT_CONTROLS vs IA32_VMX_TRUE_EXIT_CTLS.
    Exit,
    /// VM_ENTRY_CONTROLS vs IA32_VMX_TRUE_ENTRY_CTLS.
    Entry,
}

impl ControlMsr {
    /// The MSR VM entry checks this control field against: the TRUE MSR
    /// where one exists, because IA32_VMX_BASIC[55] is advertised (SDM A.2).
    pub fn msr_index(self) -> u32 {
        match self {
            ControlMsr::PinBased => msr::IA32_VMX_TRUE_PINBASED_CTLS,
            ControlMsr::PrimaryProcBased => msr::IA32_VMX_TRUE_PROCBASED_CTLS,
            ControlMsr::SecondaryProcBased => msr::IA32_VMX_PROCBASED_CTLS2,
            ControlMsr::Exit => msr::IA32_VMX_TRUE_EXIT_CTLS,
            ControlMsr::Entry => msr::IA32_VMX_TRUE_ENTRY_CTLS,
        }
    }
}

/// The optional controls this L0 can let L1 set (the allowed-1 settings
/// beyond the default1 classes).
///
/// [`AdvertisedControls::l0_default`] is what L0 emulates today:
/// - pin-based: external-interrupt exiting, NMI exiting, virtual NMIs;
/// - primary: interrupt-window, TSC offsetting, HLT, INVLPG, MWAIT, RDPMC,
///   RDTSC, CR3-load/store, CR8-load/store, NMI-window, MOV-DR,
///   unconditional I/O, I/O bitmaps, MSR bitmaps, MONITOR, PAUSE exiting,
///   activate secondary controls;
/// - secondary: EPT, descriptor-table exiting, RDTSCP, VPID, WBINVD
///   exiting, unrestricted guest, RDRAND and RDSEED exiting;
/// - exit: save debug controls, host address-space size, acknowledge
///   interrupt on exit, save/load IA32_PAT, save/load IA32_EFER;
/// - entry: load debug controls, IA-32e mode guest, load IA32_PAT, load
///   IA32_EFER.
///
/// To offer another feature (say the VMX-preemption timer) add its bit
/// here once L0 emulates it; MSRs and entry checks follow automatically.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(from = "RawControls", into = "RawControls")]
pub struct AdvertisedControls {
    /// Pin-based controls L1 may set.
    pub pin: PinBased,
    /// Primary processor-based controls L1 may set.
    pub primary: PrimaryProcBased,
    /// Secondary processor-based controls L1 may set.
    pub secondary: SecondaryProcBased,
    /// VM-exit controls L1 may set.
    pub exit: ExitControls,
    /// VM-entry controls L1 may set.
    pub entry: EntryControls,
}

/// Serialized form of [`AdvertisedControls`] (the bitflags types carry no
/// serde implementation).
#[derive(Serialize, Deserialize)]
struct RawControls {
    pin: u32,
    primary: u32,
    secondary: u32,
    exit: u32,
    entry: u32,
}

impl From<RawControls> for AdvertisedControls {
    fn from(r: RawControls) -> Self {
        Self {
            pin: PinBased::from_bits_retain(r.pin),
            primary: PrimaryProcBased::from_bits_retain(r.primary),
            secondary: SecondaryProcBased::from_bits_retain(r.secondary),
            exit: ExitControls::from_bits_retain(r.exit),
            entry: EntryControls::from_bits_retain(r.entry),
        }
    }
}

impl From<AdvertisedControls> for RawControls {
    fn from(c: AdvertisedControls) -> Self {
        Self {
            pin: c.pin.bits(),
            primary: c.primary.bits(),
            secondary: c.secondary.bits(),
            exit: c.exit.bits(),
            entry: c.entry.bits(),
        }
    }
}

impl Default for AdvertisedControls {
    fn default() -> Self {
        Self::l0_default()
    }
}

impl AdvertisedControls {
    /// The set this L0 emulates (see the type's documentation).
    pub fn l0_default() -> Self {
        use PrimaryProcBased as P;
        use SecondaryProcBased as S;
        Self {
            pin: PinBased::EXT_INTR_EXITING
                | PinBased::NMI_EXITING
                | PinBased::VIRTUAL_NMIS
                | PinBased::PREEMPTION_TIMER,
            primary: P::INTR_WINDOW_EXITING
                | P::USE_TSC_OFFSETTING
                | P::HLT_EXITING
                | P::INVLPG_EXITING
                | P::MWAIT_EXITING
                | P::RDPMC_EXITING
                | P::RDTSC_EXITING
                | P::CR3_LOAD_EXITING
                | P::CR3_STORE_EXITING
                | P::CR8_LOAD_EXITING
                | P::CR8_STORE_EXITING
                | P::NMI_WINDOW_EXITING
                | P::MOV_DR_EXITING
                | P::MONITOR_TRAP_FLAG
                | P::UNCOND_IO_EXITING
                | P::USE_IO_BITMAPS
                | P::USE_MSR_BITMAPS
                | P::MONITOR_EXITING
                | P::PAUSE_EXITING
                | P::ACTIVATE_SECONDARY,
            secondary: S::ENABLE_EPT
                | S::DESC_TABLE_EXITING
                | S::ENABLE_RDTSCP
                | S::ENABLE_VPID
                | S::WBINVD_EXITING
                | S::UNRESTRICTED_GUEST
                | S::RDRAND_EXITING
                | S::RDSEED_EXITING,
            exit: ExitControls::SAVE_DEBUG_CONTROLS
                | ExitControls::HOST_ADDR_SPACE_SIZE
                | ExitControls::ACK_INTR_ON_EXIT
                | ExitControls::SAVE_PREEMPTION_TIMER
                | ExitControls::SAVE_PAT
                | ExitControls::LOAD_PAT
                | ExitControls::SAVE_EFER
                | ExitControls::LOAD_EFER,
            entry: EntryControls::LOAD_DEBUG_CONTROLS
                | EntryControls::IA32E_MODE_GUEST
                | EntryControls::LOAD_PAT
                | EntryControls::LOAD_EFER,
        }
    }
}

/// The VMX capabilities the L0 offers to L1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmxCapabilities {
    /// Physical-address width (MAXPHYADDR) of the virtual CPU.
    pub phys_addr_width: u8,
    /// IA32_VMX_MISC bit 29: VMWRITE may write any field, including the
    /// VM-exit information fields.
    pub vmwrite_any_field: bool,
    /// Optional controls L1 may set.
    pub controls: AdvertisedControls,
    /// IA32_VMX_EPT_VPID_CAP value (bits from [`ept_vpid`]).
    pub ept_vpid_cap: u64,
    /// IA32_VMX_MISC[4:0]: the preemption timer counts down by 1 every
    /// time TSC bit X changes, X = this value.
    pub preemption_timer_rate: u8,
    /// IA32_VMX_MISC[24:16]: number of CR3-target values (at most 256).
    pub cr3_target_count: u16,
    /// IA32_VMX_MISC[6]: the HLT activity state is supported.
    pub activity_hlt: bool,
    /// IA32_VMX_CR4_FIXED1: the CR4 bits that may be 1.
    pub cr4_fixed1: u64,
}

impl Default for VmxCapabilities {
    fn default() -> Self {
        Self::l0_default()
    }
}

/// IA32_FEATURE_CONTROL bit 0: lock.
pub const FEATURE_CONTROL_LOCKED: u64 = 1 << 0;
/// IA32_FEATURE_CONTROL bit 2: VMXON outside SMX operation enabled.
pub const FEATURE_CONTROL_VMXON_OUTSIDE_SMX: u64 = 1 << 2;

/// IA32_VMX_MISC bit 5: VM exits store EFER.LMA in "IA-32e mode guest".
pub const MISC_STORE_EFER_LMA: u64 = 1 << 5;
/// IA32_VMX_MISC bit 6: HLT activity state supported.
pub const MISC_ACTIVITY_HLT: u64 = 1 << 6;
/// IA32_VMX_MISC bit 29: VMWRITE to any field.
pub const MISC_VMWRITE_ANY_FIELD: u64 = 1 << 29;

/// IA32_VMX_BASIC bit 54: INS/OUTS instruction information reported.
pub const BASIC_INS_OUTS_INFO: u64 = 1 << 54;
/// IA32_VMX_BASIC bit 55: the TRUE control MSRs exist.
pub const BASIC_TRUE_CTLS: u64 = 1 << 55;
/// Memory type write-back (used in IA32_VMX_BASIC[53:50] and EPTP[2:0]).
pub const MEMTYPE_WB: u64 = 6;
/// Memory type uncacheable.
pub const MEMTYPE_UC: u64 = 0;

/// Builds an allowed-0 / allowed-1 MSR value (SDM A.3: low 32 bits are
/// the must-be-1 settings, high 32 bits the may-be-1 settings).
fn ctl_msr(must_be_one: u32, may_be_one: u32) -> u64 {
    u64::from(must_be_one) | (u64::from(may_be_one | must_be_one) << 32)
}

impl VmxCapabilities {
    /// What this L0 offers (see [`AdvertisedControls`]); also `Default`.
    pub fn l0_default() -> Self {
        Self {
            phys_addr_width: 39,
            vmwrite_any_field: false,
            controls: AdvertisedControls::l0_default(),
            ept_vpid_cap: ept_vpid::L0_DEFAULT,
            preemption_timer_rate: 5,
            cr3_target_count: 4,
            activity_hlt: true,
            cr4_fixed1: cr4::SUPPORTED,
        }
    }

    /// VMCS revision identifier.
    pub fn vmcs_revision_id(&self) -> u32 {
        VMCS_REVISION_ID
    }

    /// Whether `pa` fits the physical-address width.
    pub fn pa_in_width(&self, pa: u64) -> bool {
        pa.checked_shr(u32::from(self.phys_addr_width)).unwrap_or(0) == 0
    }

    /// IA32_VMX_CR0_FIXED0: CR0 bits that must be 1 in VMX operation
    /// (PE, NE, PG).
    pub fn cr0_fixed0(&self) -> u64 {
        cr0::PE | cr0::NE | cr0::PG
    }

    /// IA32_VMX_CR0_FIXED1: CR0 bits that may be 1 (bits 63:32 reserved).
    pub fn cr0_fixed1(&self) -> u64 {
        0xffff_ffff
    }

    /// IA32_VMX_CR4_FIXED0: CR4 bits that must be 1 (VMXE).
    pub fn cr4_fixed0(&self) -> u64 {
        cr4::VMXE
    }

    /// IA32_VMX_CR4_FIXED1: CR4 bits that may be 1.
    pub fn cr4_fixed1(&self) -> u64 {
        self.cr4_fixed1 | cr4::VMXE
    }

    /// Whether `value` honours CR0_FIXED0/1 (VMXON, host CR0). Guest CR0
    /// under "unrestricted guest" relaxes PE and PG (see `crate::entry`).
    pub fn cr0_valid(&self, value: u64) -> bool {
        fixed_ok(value, self.cr0_fixed0(), self.cr0_fixed1())
    }

    /// Whether `value` honours CR4_FIXED0/1.
    pub fn cr4_valid(&self, value: u64) -> bool {
        fixed_ok(value, self.cr4_fixed0(), self.cr4_fixed1())
    }

    /// The (must-be-1, may-be-1) settings of a control field, as reported
    /// by the MSR VM entry checks it against ([`ControlMsr::msr_index`]).
    pub fn control_settings(&self, control: ControlMsr) -> (u32, u32) {
        let c = &self.controls;
        match control {
            ControlMsr::PinBased => (default1::PIN, default1::PIN | c.pin.bits()),
            ControlMsr::PrimaryProcBased => (
                default1::PRIMARY & !default1::PRIMARY_TRUE_MAY_CLEAR,
                default1::PRIMARY | c.primary.bits(),
            ),
            ControlMsr::SecondaryProcBased => (0, c.secondary.bits()),
            ControlMsr::Exit => (
                default1::EXIT & !default1::EXIT_TRUE_MAY_CLEAR,
                default1::EXIT | c.exit.bits(),
            ),
            ControlMsr::Entry => (
                default1::ENTRY & !default1::ENTRY_TRUE_MAY_CLEAR,
                default1::ENTRY | c.entry.bits(),
            ),
        }
    }

    /// Whether `value` is a valid setting of a control field: every
    /// allowed-0 bit is 1 and no bit outside allowed-1 is 1 (SDM A.3.1).
    pub fn allowed(&self, control: ControlMsr, value: u32) -> bool {
        let (must, may) = self.control_settings(control);
        value & must == must && value & !may == 0
    }

    /// The default1-inclusive value the non-TRUE MSR reports.
    fn legacy_ctl(&self, control: ControlMsr, default1: u32) -> u64 {
        let (must, may) = self.control_settings(control);
        ctl_msr(must | default1, may)
    }

    /// Highest field index in the catalogue, as IA32_VMX_VMCS_ENUM[9:1]
    /// reports it (SDM A.9).
    pub fn highest_vmcs_index(&self) -> u16 {
        VmcsField::ALL
            .iter()
            .map(|f| f.layout().index)
            .max()
            .unwrap_or(0)
    }

    /// Whether the EPT paging-structure memory type `ty` (EPTP[2:0]) is
    /// supported.
    pub fn ept_memory_type_supported(&self, ty: u64) -> bool {
        match ty {
            MEMTYPE_UC => self.ept_vpid_cap & ept_vpid::MEMTYPE_UC != 0,
            MEMTYPE_WB => self.ept_vpid_cap & ept_vpid::MEMTYPE_WB != 0,
            _ => false,
        }
    }

    /// The value of a VMX-related MSR; `None` for MSRs this model does
    /// not describe (the caller injects #GP or forwards the access).
    pub fn read_msr(&self, index: u32) -> Option<u64> {
        Some(match index {
            msr::IA32_FEATURE_CONTROL => FEATURE_CONTROL_LOCKED | FEATURE_CONTROL_VMXON_OUTSIDE_SMX,
            // A.1: revision id, region size 4096 in bits 44:32, bit 48
            // clear (no 32-bit address limit), WB in bits 53:50.
            msr::IA32_VMX_BASIC => {
                u64::from(VMCS_REVISION_ID & 0x7fff_ffff)
                    | (4096 << 32)
                    | (MEMTYPE_WB << 50)
                    | BASIC_INS_OUTS_INFO
                    | BASIC_TRUE_CTLS
            }
            msr::IA32_VMX_PINBASED_CTLS => self.legacy_ctl(ControlMsr::PinBased, default1::PIN),
            msr::IA32_VMX_PROCBASED_CTLS => {
                self.legacy_ctl(ControlMsr::PrimaryProcBased, default1::PRIMARY)
            }
            msr::IA32_VMX_EXIT_CTLS => self.legacy_ctl(ControlMsr::Exit, default1::EXIT),
            msr::IA32_VMX_ENTRY_CTLS => self.legacy_ctl(ControlMsr::Entry, default1::ENTRY),
            // A.6: timer rate, EFER.LMA store, activity states, CR3-target
            // count in 24:16, MSR-list size 512 * (0 + 1) in 27:25.
            msr::IA32_VMX_MISC => {
                u64::from(self.preemption_timer_rate & 0x1f)
                    | MISC_STORE_EFER_LMA
                    | if self.activity_hlt {
                        MISC_ACTIVITY_HLT
                    } else {
                        0
                    }
                    | (u64::from(self.cr3_target_count & 0x1ff) << 16)
                    | if self.vmwrite_any_field {
                        MISC_VMWRITE_ANY_FIELD
                    } else {
                        0
                    }
            }
            msr::IA32_VMX_CR0_FIXED0 => self.cr0_fixed0(),
            msr::IA32_VMX_CR0_FIXED1 => self.cr0_fixed1(),
            msr::IA32_VMX_CR4_FIXED0 => self.cr4_fixed0(),
            msr::IA32_VMX_CR4_FIXED1 => self.cr4_fixed1(),
            msr::IA32_VMX_VMCS_ENUM => u64::from(self.highest_vmcs_index()) << 1,
            msr::IA32_VMX_PROCBASED_CTLS2 => {
                let (must, may) = self.control_settings(ControlMsr::SecondaryProcBased);
                ctl_msr(must, may)
            }
            msr::IA32_VMX_EPT_VPID_CAP => self.ept_vpid_cap,
            msr::IA32_VMX_TRUE_PINBASED_CTLS
            | msr::IA32_VMX_TRUE_PROCBASED_CTLS
            | msr::IA32_VMX_TRUE_EXIT_CTLS
            | msr::IA32_VMX_TRUE_ENTRY_CTLS => {
                let control = match index {
                    msr::IA32_VMX_TRUE_PINBASED_CTLS => ControlMsr::PinBased,
                    msr::IA32_VMX_TRUE_PROCBASED_CTLS => ControlMsr::PrimaryProcBased,
                    msr::IA32_VMX_TRUE_EXIT_CTLS => ControlMsr::Exit,
                    _ => ControlMsr::Entry,
                };
                let (must, may) = self.control_settings(control);
                ctl_msr(must, may)
            }
            msr::IA32_VMX_VMFUNC => 0,
            _ => return None,
        })
    }
}

/// Fixed-bit rule of SDM A.7/A.8: bits set in `fixed0` must be 1, bits
/// clear in `fixed1` must be 0.
pub fn fixed_ok(value: u64, fixed0: u64, fixed1: u64) -> bool {
    value & fixed0 == fixed0 && value & !fixed1 == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn caps() -> VmxCapabilities {
        VmxCapabilities::l0_default()
    }

    fn lo(v: u64) -> u32 {
        v as u32
    }

    fn hi(v: u64) -> u32 {
        (v >> 32) as u32
    }

    #[test]
    fn test_read_msr_answers_every_vmx_msr_and_nothing_else() {
        let c = caps();
        for index in msr::ALL {
            assert!(c.read_msr(index).is_some(), "{index:#x}");
        }
        assert_eq!(c.read_msr(0x492), None);
        assert_eq!(c.read_msr(0x47f), None);
        assert_eq!(c.read_msr(0x10), None);
    }

    #[test]
    fn test_feature_control_is_locked_with_vmxon_outside_smx() {
        assert_eq!(caps().read_msr(msr::IA32_FEATURE_CONTROL), Some(0x5));
    }

    #[test]
    fn test_vmx_basic_layout() {
        let v = caps().read_msr(msr::IA32_VMX_BASIC).unwrap();
        assert_eq!(v & 0x7fff_ffff, u64::from(VMCS_REVISION_ID));
        assert_eq!(v >> 31 & 1, 0);
        assert_eq!((v >> 32) & 0x1fff, 4096);
        assert_eq!((v >> 48) & 1, 0, "no 32-bit address limit");
        assert_eq!((v >> 49) & 1, 0, "no dual-monitor treatment");
        assert_eq!((v >> 50) & 0xf, 6, "write-back");
        assert_eq!((v >> 54) & 1, 1);
        assert_eq!((v >> 55) & 1, 1);
    }

    #[test]
    fn test_pinbased_msrs() {
        let c = caps();
        let legacy = c.read_msr(msr::IA32_VMX_PINBASED_CTLS).unwrap();
        let tru = c.read_msr(msr::IA32_VMX_TRUE_PINBASED_CTLS).unwrap();
        assert_eq!(lo(legacy), 0x16);
        assert_eq!(lo(tru), 0x16);
        assert_eq!(hi(legacy), 0x16 | 0x1 | 0x8 | 0x20 | 0x40);
        assert_eq!(hi(tru), hi(legacy));
    }

    #[test]
    fn test_procbased_msrs_true_lets_cr3_exiting_be_zero() {
        let c = caps();
        let legacy = c.read_msr(msr::IA32_VMX_PROCBASED_CTLS).unwrap();
        let tru = c.read_msr(msr::IA32_VMX_TRUE_PROCBASED_CTLS).unwrap();
        assert_eq!(lo(legacy), 0x0401_e172);
        assert_eq!(lo(tru), 0x0400_6172);
        assert_eq!(hi(legacy), hi(tru));
        let expected_hi = 0x0401_e172u32
            | 0x0000_0004 // interrupt window
            | 0x0000_0008 // TSC offsetting
            | 0x0000_0080 // HLT
            | 0x0000_0200 // INVLPG
            | 0x0000_0400 // MWAIT
            | 0x0000_0800 // RDPMC
            | 0x0000_1000 // RDTSC
            | 0x0018_0000 // CR8 load/store
            | 0x0040_0000 // NMI window
            | 0x0080_0000 // MOV-DR
            | 0x0100_0000 // unconditional I/O
            | 0x0200_0000 // I/O bitmaps
            | 0x0800_0000 // monitor trap flag
            | 0x1000_0000 // MSR bitmaps
            | 0x2000_0000 // MONITOR
            | 0x4000_0000 // PAUSE
            | 0x8000_0000; // secondary
        assert_eq!(hi(tru), expected_hi);
        assert_eq!(hi(tru) & (1 << 21), 0, "no TPR shadow");
    }

    #[test]
    fn test_procbased2_msr() {
        let v = caps().read_msr(msr::IA32_VMX_PROCBASED_CTLS2).unwrap();
        assert_eq!(lo(v), 0);
        assert_eq!(
            hi(v),
            0x2 | 0x4 | 0x8 | 0x20 | 0x40 | 0x80 | 0x800 | 0x1_0000
        );
    }

    #[test]
    fn test_exit_msrs_true_lets_save_debug_be_zero() {
        let c = caps();
        let legacy = c.read_msr(msr::IA32_VMX_EXIT_CTLS).unwrap();
        let tru = c.read_msr(msr::IA32_VMX_TRUE_EXIT_CTLS).unwrap();
        assert_eq!(lo(legacy), 0x0003_6dff);
        assert_eq!(lo(tru), 0x0003_6dfb);
        assert_eq!(
            hi(tru),
            0x0003_6dff | 0x200 | 0x8000 | 0x4_0000 | 0x8_0000 | 0x10_0000 | 0x20_0000 | 0x40_0000
        );
        assert_eq!(hi(tru) & (1 << 23), 0, "no clearing of IA32_BNDCFGS");
    }

    #[test]
    fn test_entry_msrs_true_lets_load_debug_be_zero() {
        let c = caps();
        let legacy = c.read_msr(msr::IA32_VMX_ENTRY_CTLS).unwrap();
        let tru = c.read_msr(msr::IA32_VMX_TRUE_ENTRY_CTLS).unwrap();
        assert_eq!(lo(legacy), 0x11ff);
        assert_eq!(lo(tru), 0x11fb);
        assert_eq!(hi(tru), 0x11ff | 0x200 | 0x4000 | 0x8000);
        assert_eq!(hi(tru) & (1 << 10), 0, "no entry to SMM");
    }

    #[test]
    fn test_misc_msr() {
        let v = caps().read_msr(msr::IA32_VMX_MISC).unwrap();
        assert_eq!(v & 0x1f, 5);
        assert_eq!(v >> 5 & 1, 1, "EFER.LMA store");
        assert_eq!(v >> 6 & 7, 1, "HLT only");
        assert_eq!(v >> 16 & 0x1ff, 4);
        assert_eq!(v >> 25 & 7, 0, "512 MSRs");
        assert_eq!(v >> 29 & 1, 0, "no VMWRITE to exit-info fields");
        let mut c = caps();
        c.vmwrite_any_field = true;
        assert_eq!(c.read_msr(msr::IA32_VMX_MISC).unwrap() >> 29 & 1, 1);
    }

    #[test]
    fn test_cr_fixed_msrs() {
        let c = caps();
        assert_eq!(c.read_msr(msr::IA32_VMX_CR0_FIXED0), Some(0x8000_0021));
        assert_eq!(c.read_msr(msr::IA32_VMX_CR0_FIXED1), Some(0xffff_ffff));
        assert_eq!(c.read_msr(msr::IA32_VMX_CR4_FIXED0), Some(0x2000));
        let f1 = c.read_msr(msr::IA32_VMX_CR4_FIXED1).unwrap();
        assert_eq!(f1 & 0x2000, 0x2000);
        assert_eq!(f1 & (1 << 12), 0, "no LA57");
        assert!(c.cr0_valid(0x8000_0031));
        assert!(!c.cr0_valid(0x8000_0011), "NE clear");
        assert!(!c.cr0_valid(0x1_8000_0021), "bit 32 set");
        assert!(c.cr4_valid(0x2020));
        assert!(!c.cr4_valid(0x20), "VMXE clear");
        assert!(!c.cr4_valid(0x2000 | 1 << 12), "LA57");
    }

    #[test]
    fn test_vmcs_enum_is_highest_catalogue_index() {
        let v = caps().read_msr(msr::IA32_VMX_VMCS_ENUM).unwrap();
        let max = VmcsField::ALL
            .iter()
            .map(|f| (f.encoding() >> 1) & 0x1ff)
            .max()
            .unwrap();
        assert_eq!(v, u64::from(max) << 1);
        assert_eq!(v & !0x3fe, 0);
    }

    #[test]
    fn test_ept_vpid_cap_msr() {
        let v = caps().read_msr(msr::IA32_VMX_EPT_VPID_CAP).unwrap();
        for bit in [6, 14, 16, 17, 20, 25, 26, 32, 40, 41, 42, 43] {
            assert_eq!(v >> bit & 1, 1, "bit {bit}");
        }
        for bit in [0, 7, 8, 21, 22] {
            assert_eq!(v >> bit & 1, 0, "bit {bit}");
        }
        assert!(caps().ept_memory_type_supported(6));
        assert!(!caps().ept_memory_type_supported(0));
        assert!(!caps().ept_memory_type_supported(1));
    }

    #[test]
    fn test_vmfunc_msr_is_zero() {
        assert_eq!(caps().read_msr(msr::IA32_VMX_VMFUNC), Some(0));
    }

    #[test]
    fn test_allowed_agrees_with_advertised_set() {
        let c = caps();
        let a = c.controls;
        let (pin0, _) = c.control_settings(ControlMsr::PinBased);
        assert!(c.allowed(ControlMsr::PinBased, pin0 | a.pin.bits()));
        assert!(!c.allowed(ControlMsr::PinBased, pin0 | PinBased::POSTED_INTR.bits()));
        assert!(
            !c.allowed(ControlMsr::PinBased, a.pin.bits()),
            "default1 cleared"
        );
        let (p0, _) = c.control_settings(ControlMsr::PrimaryProcBased);
        assert!(c.allowed(ControlMsr::PrimaryProcBased, p0 | a.primary.bits()));
        assert!(!c.allowed(
            ControlMsr::PrimaryProcBased,
            p0 | PrimaryProcBased::USE_TPR_SHADOW.bits()
        ));
        assert!(c.allowed(ControlMsr::SecondaryProcBased, a.secondary.bits()));
        assert!(!c.allowed(
            ControlMsr::SecondaryProcBased,
            SecondaryProcBased::ENABLE_PML.bits()
        ));
        let (x0, _) = c.control_settings(ControlMsr::Exit);
        assert!(c.allowed(ControlMsr::Exit, x0 | a.exit.bits()));
        assert!(!c.allowed(ControlMsr::Exit, x0 | ExitControls::CLEAR_BNDCFGS.bits()));
        let (e0, _) = c.control_settings(ControlMsr::Entry);
        assert!(c.allowed(ControlMsr::Entry, e0 | a.entry.bits()));
        assert!(!c.allowed(ControlMsr::Entry, e0 | EntryControls::ENTRY_TO_SMM.bits()));
    }

    #[test]
    fn test_enabling_a_feature_changes_the_msrs() {
        let mut c = caps();
        c.controls.pin.remove(PinBased::PREEMPTION_TIMER);
        assert!(!c.allowed(
            ControlMsr::PinBased,
            0x16 | PinBased::PREEMPTION_TIMER.bits()
        ));
        c.controls.pin |= PinBased::PREEMPTION_TIMER;
        assert!(c.allowed(
            ControlMsr::PinBased,
            0x16 | PinBased::PREEMPTION_TIMER.bits()
        ));
        let v = c.read_msr(msr::IA32_VMX_TRUE_PINBASED_CTLS).unwrap();
        assert_eq!(hi(v) & (1 << 6), 1 << 6);
    }

    #[test]
    fn test_pa_in_width() {
        let c = caps();
        assert!(c.pa_in_width((1 << 39) - 1));
        assert!(!c.pa_in_width(1 << 39));
        let mut wide = caps();
        wide.phys_addr_width = 64;
        assert!(wide.pa_in_width(u64::MAX));
    }

    #[test]
    fn test_capabilities_serde_round_trip() {
        let c = caps();
        let bytes = bincode::serde::encode_to_vec(&c, bincode::config::standard()).unwrap();
        let (back, _): (VmxCapabilities, usize) =
            bincode::serde::decode_from_slice(&bytes, bincode::config::standard()).unwrap();
        assert_eq!(back, c);
    }

    proptest! {
        /// `allowed` against the SDM A.3 reference: allowed-0 from the low
        /// half of the MSR, allowed-1 from the high half.
        #[test]
        fn test_allowed_matches_msr_halves(value in any::<u32>(), which in 0usize..5) {
            let c = caps();
            let control = [
                ControlMsr::PinBased,
                ControlMsr::PrimaryProcBased,
                ControlMsr::SecondaryProcBased,
                ControlMsr::Exit,
                ControlMsr::Entry,
            ][which];
            let m = c.read_msr(control.msr_index()).unwrap();
            let reference = (0..32).all(|bit| {
                let v = value >> bit & 1;
                let must = (m >> bit) & 1;
                let may = (m >> (32 + bit)) & 1;
                (must == 0 || v == 1) && (may == 1 || v == 0)
            });
            prop_assert_eq!(c.allowed(control, value), reference);
        }
    }

    /// Every legacy MSR differs from its TRUE twin only in allowed-0 bits
    /// of the default1 class (SDM A.2).
    #[test]
    fn test_true_msrs_only_relax_default1() {
        let c = caps();
        for (legacy, tru, d1) in [
            (
                msr::IA32_VMX_PINBASED_CTLS,
                msr::IA32_VMX_TRUE_PINBASED_CTLS,
                default1::PIN,
            ),
            (
                msr::IA32_VMX_PROCBASED_CTLS,
                msr::IA32_VMX_TRUE_PROCBASED_CTLS,
                default1::PRIMARY,
            ),
            (
                msr::IA32_VMX_EXIT_CTLS,
                msr::IA32_VMX_TRUE_EXIT_CTLS,
                default1::EXIT,
            ),
            (
                msr::IA32_VMX_ENTRY_CTLS,
                msr::IA32_VMX_TRUE_ENTRY_CTLS,
                default1::ENTRY,
            ),
        ] {
            let l = c.read_msr(legacy).unwrap();
            let t = c.read_msr(tru).unwrap();
            assert_eq!(hi(l), hi(t));
            assert_eq!(lo(l), d1);
            assert_eq!(lo(t) & !d1, 0);
        }
    }
}
