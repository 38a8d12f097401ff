//! A plain vCPU-state record, with no KVM types.
//!
//! `l0-vmm` converts KVM's `kvm_regs`/`kvm_sregs`/events to and from this;
//! prepare_vmcs12, load_vmcs12_host_state and prepare_vmcs02 read and write
//! it. Segment access rights use the VMCS encoding (SDM 24.4.1, Table 24-2):
//! type in bits 3:0, S in 4, DPL in 6:5, P in 7, AVL in 12, L in 13, D/B in
//! 14, G in 15, and "unusable" in bit 16.

use serde::{Deserialize, Serialize};

/// One segment register with its hidden part.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Segment {
    /// Visible selector.
    pub selector: u16,
    /// Base address.
    pub base: u64,
    /// Limit (byte granular, already expanded when G = 1).
    pub limit: u32,
    /// Access rights in VMCS format (bit 16 = unusable).
    pub ar: u32,
}

impl Segment {
    /// VMCS access-rights bit 16: the segment is unusable.
    pub const AR_UNUSABLE: u32 = 1 << 16;

    /// Whether the unusable bit is set.
    pub fn unusable(&self) -> bool {
        self.ar & Self::AR_UNUSABLE != 0
    }
}

/// GDTR or IDTR.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DescriptorTable {
    /// Base address.
    pub base: u64,
    /// Limit.
    pub limit: u16,
}

/// General-purpose registers, in the VMX instruction-information register
/// numbering order (RAX=0 ... R15=15).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gprs {
    /// RAX, RCX, RDX, RBX, RSP, RBP, RSI, RDI, R8-R15.
    pub regs: [u64; 16],
}

impl Gprs {
    /// Register number of RSP.
    pub const RSP: usize = 4;

    /// Reads a register by number (the number comes from a 4-bit field).
    pub fn get(&self, n: u8) -> u64 {
        self.regs[usize::from(n & 0xf)]
    }

    /// Writes a register by number.
    pub fn set(&mut self, n: u8, v: u64) {
        self.regs[usize::from(n & 0xf)] = v;
    }
}

/// An event waiting to be delivered to the vCPU (injection on VM entry,
/// or a pending exception/interrupt taken from KVM).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingEvent {
    /// Interruption information in VMCS format (SDM 24.8.3): vector 7:0,
    /// type 10:8, deliver-error-code 11, valid 31.
    pub info: u32,
    /// Error code, meaningful when bit 11 of `info` is set.
    pub error_code: u32,
    /// Instruction length for software interrupts/exceptions.
    pub instruction_len: u32,
}

/// The MSRs that VMX saves and loads on transitions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmxMsrs {
    /// IA32_EFER.
    pub efer: u64,
    /// IA32_PAT.
    pub pat: u64,
    /// IA32_DEBUGCTL.
    pub debugctl: u64,
    /// IA32_SYSENTER_CS.
    pub sysenter_cs: u32,
    /// IA32_SYSENTER_ESP.
    pub sysenter_esp: u64,
    /// IA32_SYSENTER_EIP.
    pub sysenter_eip: u64,
    /// IA32_PERF_GLOBAL_CTRL.
    pub perf_global_ctrl: u64,
    /// IA32_BNDCFGS.
    pub bndcfgs: u64,
    /// IA32_KERNEL_GS_BASE (the SWAPGS value; IA32_FS_BASE and
    /// IA32_GS_BASE live in `fs.base` and `gs.base`).
    pub kernel_gs_base: u64,
    /// The four PAE page-directory-pointer-table registers PDPTE0-3 (SDM
    /// 4.4.1), meaningful only while the vCPU uses PAE paging. Not MSRs:
    /// they sit here because VMX saves and loads them with the MSRs
    /// (GUEST_PDPTEn, SDM 27.3.2.4 and 28.3.4) and because every user
    /// builds this record with `..` (adding a field to `VcpuState` would
    /// break the exhaustive literal in l0-vmm's KVM conversion).
    pub pdptes: [u64; 4],
}

/// Architectural MSR indices that VMX transitions touch (SDM Vol. 4).
pub mod msr_index {
    /// IA32_BIOS_UPDT_TRIG (microcode update trigger).
    pub const IA32_BIOS_UPDT_TRIG: u32 = 0x79;
    /// IA32_BIOS_SIGN_ID (microcode revision).
    pub const IA32_BIOS_SIGN_ID: u32 = 0x8b;
    /// IA32_SMM_MONITOR_CTL.
    pub const IA32_SMM_MONITOR_CTL: u32 = 0x9b;
    /// IA32_SMBASE (readable only in SMM).
    pub const IA32_SMBASE: u32 = 0x9e;
    /// IA32_SYSENTER_CS.
    pub const IA32_SYSENTER_CS: u32 = 0x174;
    /// IA32_SYSENTER_ESP.
    pub const IA32_SYSENTER_ESP: u32 = 0x175;
    /// IA32_SYSENTER_EIP.
    pub const IA32_SYSENTER_EIP: u32 = 0x176;
    /// IA32_DEBUGCTL.
    pub const IA32_DEBUGCTL: u32 = 0x1d9;
    /// IA32_PAT.
    pub const IA32_PAT: u32 = 0x277;
    /// IA32_PERF_GLOBAL_CTRL.
    pub const IA32_PERF_GLOBAL_CTRL: u32 = 0x38f;
    /// First x2APIC MSR (0x800-0x8ff).
    pub const X2APIC_FIRST: u32 = 0x800;
    /// Last x2APIC MSR.
    pub const X2APIC_LAST: u32 = 0x8ff;
    /// IA32_BNDCFGS.
    pub const IA32_BNDCFGS: u32 = 0xd90;
    /// IA32_EFER.
    pub const IA32_EFER: u32 = 0xc000_0080;
    /// IA32_FS_BASE.
    pub const IA32_FS_BASE: u32 = 0xc000_0100;
    /// IA32_GS_BASE.
    pub const IA32_GS_BASE: u32 = 0xc000_0101;
    /// IA32_KERNEL_GS_BASE.
    pub const IA32_KERNEL_GS_BASE: u32 = 0xc000_0102;
}

/// Everything of a vCPU that VMX transitions read or write.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuState {
    /// General-purpose registers.
    pub gprs: Gprs,
    /// Instruction pointer.
    pub rip: u64,
    /// RFLAGS.
    pub rflags: u64,
    /// CR0 as the hardware holds it.
    pub cr0: u64,
    /// CR2.
    pub cr2: u64,
    /// CR3.
    pub cr3: u64,
    /// CR4 as the hardware holds it.
    pub cr4: u64,
    /// CR8 (TPR).
    pub cr8: u64,
    /// DR0-DR3.
    pub dr0_3: [u64; 4],
    /// DR6.
    pub dr6: u64,
    /// DR7.
    pub dr7: u64,
    /// ES.
    pub es: Segment,
    /// CS.
    pub cs: Segment,
    /// SS.
    pub ss: Segment,
    /// DS.
    pub ds: Segment,
    /// FS.
    pub fs: Segment,
    /// GS.
    pub gs: Segment,
    /// LDTR.
    pub ldtr: Segment,
    /// TR.
    pub tr: Segment,
    /// GDTR.
    pub gdtr: DescriptorTable,
    /// IDTR.
    pub idtr: DescriptorTable,
    /// MSRs VMX saves/loads.
    pub msrs: VmxMsrs,
    /// Interruptibility state in VMCS format (SDM 24.4.2): STI blocking bit
    /// 0, MOV-SS blocking bit 1, SMI 2, NMI 3.
    pub interruptibility: u32,
    /// Activity state (0 active, 1 HLT, 2 shutdown, 3 wait-for-SIPI).
    pub activity: u32,
    /// Pending debug exceptions (SDM 24.4.2).
    pub pending_dbg_exceptions: u64,
    /// An event to deliver on the next run, if any.
    pub pending_event: Option<PendingEvent>,
}

impl VcpuState {
    /// RFLAGS.VM.
    pub const RFLAGS_VM: u64 = 1 << 17;
    /// EFER.LMA.
    pub const EFER_LMA: u64 = 1 << 10;
    /// EFER.LME.
    pub const EFER_LME: u64 = 1 << 8;

    /// Whether the vCPU executes in 64-bit mode (IA-32e active, CS.L = 1).
    pub fn in_64bit_mode(&self) -> bool {
        self.msrs.efer & Self::EFER_LMA != 0 && self.cs.ar & (1 << 13) != 0
    }

    /// The value of an MSR this record models (the [`VmxMsrs`] set plus
    /// IA32_FS_BASE/IA32_GS_BASE, which are the FS/GS bases), or `None`
    /// for any other index.
    pub fn msr(&self, index: u32) -> Option<u64> {
        use msr_index::*;
        let m = &self.msrs;
        Some(match index {
            IA32_EFER => m.efer,
            IA32_PAT => m.pat,
            IA32_DEBUGCTL => m.debugctl,
            IA32_SYSENTER_CS => u64::from(m.sysenter_cs),
            IA32_SYSENTER_ESP => m.sysenter_esp,
            IA32_SYSENTER_EIP => m.sysenter_eip,
            IA32_PERF_GLOBAL_CTRL => m.perf_global_ctrl,
            IA32_BNDCFGS => m.bndcfgs,
            IA32_KERNEL_GS_BASE => m.kernel_gs_base,
            IA32_FS_BASE => self.fs.base,
            IA32_GS_BASE => self.gs.base,
            _ => return None,
        })
    }

    /// Writes an MSR this record models; returns `false` (and changes
    /// nothing) for any other index, which the caller must apply itself.
    pub fn set_msr(&mut self, index: u32, value: u64) -> bool {
        use msr_index::*;
        let m = &mut self.msrs;
        match index {
            IA32_EFER => m.efer = value,
            IA32_PAT => m.pat = value,
            IA32_DEBUGCTL => m.debugctl = value,
            // The SYSENTER_CS MSR holds 32 significant bits.
            IA32_SYSENTER_CS => m.sysenter_cs = value as u32,
            IA32_SYSENTER_ESP => m.sysenter_esp = value,
            IA32_SYSENTER_EIP => m.sysenter_eip = value,
            IA32_PERF_GLOBAL_CTRL => m.perf_global_ctrl = value,
            IA32_BNDCFGS => m.bndcfgs = value,
            IA32_KERNEL_GS_BASE => m.kernel_gs_base = value,
            IA32_FS_BASE => self.fs.base = value,
            IA32_GS_BASE => self.gs.base = value,
            _ => return false,
        }
        true
    }

    /// Current privilege level (CS.DPL; 0 in real mode, 3 in v8086 mode).
    pub fn cpl(&self) -> u8 {
        if self.cr0 & 1 == 0 {
            0
        } else if self.rflags & Self::RFLAGS_VM != 0 {
            3
        } else {
            ((self.cs.ar >> 5) & 3) as u8
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_msr_round_trips_every_modelled_index() {
        use msr_index::*;
        let all = [
            IA32_EFER,
            IA32_PAT,
            IA32_DEBUGCTL,
            IA32_SYSENTER_CS,
            IA32_SYSENTER_ESP,
            IA32_SYSENTER_EIP,
            IA32_PERF_GLOBAL_CTRL,
            IA32_BNDCFGS,
            IA32_KERNEL_GS_BASE,
            IA32_FS_BASE,
            IA32_GS_BASE,
        ];
        let mut s = VcpuState::default();
        for (i, &idx) in all.iter().enumerate() {
            assert!(s.set_msr(idx, 0x1000 + i as u64));
        }
        for (i, &idx) in all.iter().enumerate() {
            assert_eq!(s.msr(idx), Some(0x1000 + i as u64), "{idx:#x}");
        }
        assert_eq!(s.fs.base, 0x1000 + 9);
    }

    #[test]
    fn test_msr_rejects_unmodelled_index() {
        let mut s = VcpuState::default();
        let before = s;
        assert!(!s.set_msr(msr_index::IA32_SMBASE, 5));
        assert_eq!(s.msr(msr_index::IA32_SMBASE), None);
        assert_eq!(s, before);
    }
}
