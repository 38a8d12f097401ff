//! VMX control bits, as bitflags next to the fields they fill
//! (SDM Vol. 3, 25.6 "VM-Execution Control Fields", 25.7, 25.8).

use bitflags::bitflags;

bitflags! {
    /// PIN_BASED_VM_EXEC_CONTROL (SDM 25.6.1, Table 25-5).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct PinBased: u32 {
        /// External-interrupt exiting.
        const EXT_INTR_EXITING = 1 << 0;
        /// NMI exiting.
        const NMI_EXITING = 1 << 3;
        /// Virtual NMIs.
        const VIRTUAL_NMIS = 1 << 5;
        /// Activate VMX-preemption timer.
        const PREEMPTION_TIMER = 1 << 6;
        /// Process posted interrupts.
        const POSTED_INTR = 1 << 7;
    }
}

bitflags! {
    /// CPU_BASED_VM_EXEC_CONTROL (SDM 25.6.2, Table 25-6).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct PrimaryProcBased: u32 {
        /// Interrupt-window exiting.
        const INTR_WINDOW_EXITING = 1 << 2;
        /// Use TSC offsetting.
        const USE_TSC_OFFSETTING = 1 << 3;
        /// HLT exiting.
        const HLT_EXITING = 1 << 7;
        /// INVLPG exiting.
        const INVLPG_EXITING = 1 << 9;
        /// MWAIT exiting.
        const MWAIT_EXITING = 1 << 10;
        /// RDPMC exiting.
        const RDPMC_EXITING = 1 << 11;
        /// RDTSC exiting.
        const RDTSC_EXITING = 1 << 12;
        /// CR3-load exiting.
        const CR3_LOAD_EXITING = 1 << 15;
        /// CR3-store exiting.
        const CR3_STORE_EXITING = 1 << 16;
        /// Activate tertiary controls.
        const ACTIVATE_TERTIARY = 1 << 17;
        /// CR8-load exiting.
        const CR8_LOAD_EXITING = 1 << 19;
        /// CR8-store exiting.
        const CR8_STORE_EXITING = 1 << 20;
        /// Use TPR shadow.
        const USE_TPR_SHADOW = 1 << 21;
        /// NMI-window exiting.
        const NMI_WINDOW_EXITING = 1 << 22;
        /// MOV-DR exiting.
        const MOV_DR_EXITING = 1 << 23;
        /// Unconditional I/O exiting.
        const UNCOND_IO_EXITING = 1 << 24;
        /// Use I/O bitmaps.
        const USE_IO_BITMAPS = 1 << 25;
        /// Monitor trap flag.
        const MONITOR_TRAP_FLAG = 1 << 27;
        /// Use MSR bitmaps.
        const USE_MSR_BITMAPS = 1 << 28;
        /// MONITOR exiting.
        const MONITOR_EXITING = 1 << 29;
        /// PAUSE exiting.
        const PAUSE_EXITING = 1 << 30;
        /// Activate secondary controls.
        const ACTIVATE_SECONDARY = 1 << 31;
    }
}

bitflags! {
    /// SECONDARY_VM_EXEC_CONTROL (SDM 25.6.2, Table 25-7).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct SecondaryProcBased: u32 {
        /// Virtualize APIC accesses.
        const VIRTUALIZE_APIC_ACCESSES = 1 << 0;
        /// Enable EPT.
        const ENABLE_EPT = 1 << 1;
        /// Descriptor-table exiting.
        const DESC_TABLE_EXITING = 1 << 2;
        /// Enable RDTSCP.
        const ENABLE_RDTSCP = 1 << 3;
        /// Virtualize x2APIC mode.
        const VIRTUALIZE_X2APIC = 1 << 4;
        /// Enable VPID.
        const ENABLE_VPID = 1 << 5;
        /// WBINVD exiting.
        const WBINVD_EXITING = 1 << 6;
        /// Unrestricted guest.
        const UNRESTRICTED_GUEST = 1 << 7;
        /// APIC-register virtualization.
        const APIC_REGISTER_VIRT = 1 << 8;
        /// Virtual-interrupt delivery.
        const VIRTUAL_INTR_DELIVERY = 1 << 9;
        /// PAUSE-loop exiting.
        const PAUSE_LOOP_EXITING = 1 << 10;
        /// RDRAND exiting.
        const RDRAND_EXITING = 1 << 11;
        /// Enable INVPCID.
        const ENABLE_INVPCID = 1 << 12;
        /// Enable VM functions.
        const ENABLE_VMFUNC = 1 << 13;
        /// VMCS shadowing.
        const VMCS_SHADOWING = 1 << 14;
        /// Enable ENCLS exiting.
        const ENCLS_EXITING = 1 << 15;
        /// RDSEED exiting.
        const RDSEED_EXITING = 1 << 16;
        /// Enable PML.
        const ENABLE_PML = 1 << 17;
        /// EPT-violation #VE.
        const EPT_VIOLATION_VE = 1 << 18;
        /// Conceal VMX from PT.
        const CONCEAL_VMX_FROM_PT = 1 << 19;
        /// Enable XSAVES/XRSTORS.
        const ENABLE_XSAVES = 1 << 20;
        /// Mode-based execute control for EPT.
        const MODE_BASED_EPT_EXEC = 1 << 22;
        /// Use TSC scaling.
        const USE_TSC_SCALING = 1 << 25;
        /// Enable user wait and pause.
        const ENABLE_USER_WAIT_PAUSE = 1 << 26;
    }
}

bitflags! {
    /// VM_EXIT_CONTROLS (SDM 25.7.1, Table 25-13).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct ExitControls: u32 {
        /// Save debug controls.
        const SAVE_DEBUG_CONTROLS = 1 << 2;
        /// Host address-space size.
        const HOST_ADDR_SPACE_SIZE = 1 << 9;
        /// Load IA32_PERF_GLOBAL_CTRL.
        const LOAD_PERF_GLOBAL_CTRL = 1 << 12;
        /// Acknowledge interrupt on exit.
        const ACK_INTR_ON_EXIT = 1 << 15;
        /// Save IA32_PAT.
        const SAVE_PAT = 1 << 18;
        /// Load IA32_PAT.
        const LOAD_PAT = 1 << 19;
        /// Save IA32_EFER.
        const SAVE_EFER = 1 << 20;
        /// Load IA32_EFER.
        const LOAD_EFER = 1 << 21;
        /// Save VMX-preemption timer value.
        const SAVE_PREEMPTION_TIMER = 1 << 22;
        /// Clear IA32_BNDCFGS.
        const CLEAR_BNDCFGS = 1 << 23;
        /// Conceal VMX from PT.
        const CONCEAL_VMX_FROM_PT = 1 << 24;
    }
}

bitflags! {
    /// VM_ENTRY_CONTROLS (SDM 25.8.1, Table 25-15).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct EntryControls: u32 {
        /// Load debug controls.
        const LOAD_DEBUG_CONTROLS = 1 << 2;
        /// IA-32e mode guest.
        const IA32E_MODE_GUEST = 1 << 9;
        /// Entry to SMM.
        const ENTRY_TO_SMM = 1 << 10;
        /// Deactivate dual-monitor treatment.
        const DEACTIVATE_DUAL_MONITOR = 1 << 11;
        /// Load IA32_PERF_GLOBAL_CTRL.
        const LOAD_PERF_GLOBAL_CTRL = 1 << 13;
        /// Load IA32_PAT.
        const LOAD_PAT = 1 << 14;
        /// Load IA32_EFER.
        const LOAD_EFER = 1 << 15;
        /// Load IA32_BNDCFGS.
        const LOAD_BNDCFGS = 1 << 16;
        /// Conceal VMX from PT.
        const CONCEAL_VMX_FROM_PT = 1 << 17;
    }
}

/// Interruption-information format shared by VM_ENTRY_INTR_INFO_FIELD,
/// VM_EXIT_INTR_INFO and IDT_VECTORING_INFO_FIELD (SDM 24.8.3, 24.9.2).
pub mod intr_info {
    /// Bits 7:0: vector.
    pub const VECTOR_MASK: u32 = 0xff;
    /// Bits 10:8: interruption type.
    pub const TYPE_MASK: u32 = 0x700;
    /// Type 0: external interrupt.
    pub const TYPE_EXT_INTR: u32 = 0 << 8;
    /// Type 2: NMI.
    pub const TYPE_NMI: u32 = 2 << 8;
    /// Type 3: hardware exception.
    pub const TYPE_HARD_EXCEPTION: u32 = 3 << 8;
    /// Type 4: software interrupt (INT n).
    pub const TYPE_SOFT_INTR: u32 = 4 << 8;
    /// Type 5: privileged software exception (INT1).
    pub const TYPE_PRIV_SW_EXCEPTION: u32 = 5 << 8;
    /// Type 6: software exception (INT3, INTO).
    pub const TYPE_SOFT_EXCEPTION: u32 = 6 << 8;
    /// Type 7: other event (MTF on entry).
    pub const TYPE_OTHER_EVENT: u32 = 7 << 8;
    /// Bit 11: deliver / has error code.
    pub const DELIVER_ERROR_CODE: u32 = 1 << 11;
    /// Bit 12 (exit info): NMI unblocking due to IRET.
    pub const NMI_UNBLOCKING_IRET: u32 = 1 << 12;
    /// Bit 31: valid.
    pub const VALID: u32 = 1 << 31;
}
