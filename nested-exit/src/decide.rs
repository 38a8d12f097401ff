//! Who handles an L2 exit: L0 itself, or L1 (the exit is reflected).
//!
//! [`decide`] answers the question Linux's `nested_vmx_l1_wants_exit`
//! answers, from the vmcs12 controls and L1's bitmaps in guest memory,
//! following SDM Vol. 3 26.1 "Instructions That Cause VM Exits
//! Unconditionally", 26.2 "Instructions That Cause VM Exits Conditionally"
//! and 25.6 "VM-Execution Control Fields". Every decision carries an
//! explanation naming the control or bitmap bit that decided it.
//!
//! `HandleInL0` never means "ignore": the explanation says what L0 does
//! (complete the instruction for L2, inject #UD, deliver the event, ...).

use std::collections::BTreeSet;

use vmcs12::controls::{PinBased, PrimaryProcBased, SecondaryProcBased};
use vmcs12::{GuestPhysMemory, Vmcs12, VmcsField};

use crate::ept::{Ept, EptConfig, EptPerms, EptWalk, ViolationContext};
use crate::exit::{ControlReg, CrAccess, CrAccessType, Exit, InterruptionType, IoQualification};
use crate::walk::{AccessKind, PageSize};

/// Who handles an exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Disposition {
    /// L0 handles the exit and resumes L2.
    HandleInL0,
    /// The exit is reflected: prepare_vmcs12, then L1 runs at HOST_RIP.
    ReflectToL1,
}

/// A disposition and the reason for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Who handles the exit.
    pub disposition: Disposition,
    /// The deciding control or bitmap bit, in words.
    pub explanation: String,
}

impl Decision {
    fn reflect(explanation: impl Into<String>) -> Self {
        Self {
            disposition: Disposition::ReflectToL1,
            explanation: explanation.into(),
        }
    }

    fn l0(explanation: impl Into<String>) -> Self {
        Self {
            disposition: Disposition::HandleInL0,
            explanation: explanation.into(),
        }
    }

    /// Whether the exit goes to L1.
    pub fn reflects(&self) -> bool {
        self.disposition == Disposition::ReflectToL1
    }
}

/// What L0 keeps for itself when L1 does not ask for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct L0Policy {
    /// I/O ports L0 serves for L2 when L1 does not intercept them
    /// (default: 0xe9, the L2 debug console). L1's interception always wins.
    pub l0_ports: BTreeSet<u16>,
    /// Guest-physical page numbers (gpa >> 12) that L1's EPT maps with the
    /// needed permissions but whose L0 (shadow EPT / KVM memslot) mapping
    /// is stale: an EPT violation or misconfiguration there is L0's to fix.
    pub stale_gpa_pages: BTreeSet<u64>,
}

impl Default for L0Policy {
    fn default() -> Self {
        Self {
            l0_ports: BTreeSet::from([0xe9]),
            stale_gpa_pages: BTreeSet::new(),
        }
    }
}

impl L0Policy {
    /// Marks the page holding `gpa` as backed in L1's EPT but stale in L0.
    pub fn mark_stale(&mut self, gpa: u64) {
        self.stale_gpa_pages.insert(gpa >> 12);
    }

    /// Whether the page holding `gpa` is marked stale.
    pub fn is_stale(&self, gpa: u64) -> bool {
        self.stale_gpa_pages.contains(&(gpa >> 12))
    }
}

/// Secondary control bits not in `SecondaryProcBased` (SDM Table 25-7).
const SEC_SPP: u32 = 1 << 23;
const SEC_ENABLE_PCONFIG: u32 = 1 << 27;
const SEC_ENCLV_EXITING: u32 = 1 << 28;
const SEC_BUS_LOCK_DETECTION: u32 = 1 << 30;
const SEC_INSTRUCTION_TIMEOUT: u32 = 1 << 31;
/// Tertiary control bits (SDM Table 25-8).
const TERT_LOADIWKEY_EXITING: u64 = 1 << 0;
const TERT_ENABLE_MSR_LIST: u64 = 1 << 6;

const CR0_PE: u64 = 1 << 0;
const CR0_TS: u64 = 1 << 3;

/// The execution controls of vmcs12, with the SDM's "as if 0" rules
/// applied: secondary controls count only when "activate secondary
/// controls" is 1, tertiary only with "activate tertiary controls"
/// (SDM 25.6.2).
#[derive(Debug, Clone, Copy)]
struct Controls {
    pin: PinBased,
    proc: PrimaryProcBased,
    sec_raw: u32,
    tert: u64,
}

impl Controls {
    fn of(v: &Vmcs12) -> Self {
        let proc =
            PrimaryProcBased::from_bits_retain(v.get32(VmcsField::CPU_BASED_VM_EXEC_CONTROL));
        let sec_raw = if proc.contains(PrimaryProcBased::ACTIVATE_SECONDARY) {
            v.get32(VmcsField::SECONDARY_VM_EXEC_CONTROL)
        } else {
            0
        };
        let tert = if proc.contains(PrimaryProcBased::ACTIVATE_TERTIARY) {
            v.get(VmcsField::TERTIARY_VM_EXEC_CONTROL)
        } else {
            0
        };
        Self {
            pin: PinBased::from_bits_retain(v.get32(VmcsField::PIN_BASED_VM_EXEC_CONTROL)),
            proc,
            sec_raw,
            tert,
        }
    }

    fn p(&self, f: PrimaryProcBased) -> bool {
        self.proc.contains(f)
    }

    fn s(&self, f: SecondaryProcBased) -> bool {
        self.sec_raw & f.bits() != 0
    }
}

/// Reflects if `on`, else L0 does `l0_does`.
fn by_control(on: bool, control: &str, what: &str, l0_does: &str) -> Decision {
    if on {
        Decision::reflect(format!("{what} exits because L1 set \"{control}\""))
    } else {
        Decision::l0(format!(
            "\"{control}\" is 0 in vmcs12, so {what} is not L1's: {l0_does}"
        ))
    }
}

fn unconditional(what: &str) -> Decision {
    Decision::reflect(format!(
        "{what} exits unconditionally in VMX non-root operation (SDM 26.1.2): always L1's"
    ))
}

/// Decides whether L0 handles `exit` or reflects it to L1.
///
/// `mem` is L1's guest-physical memory (for the I/O, MSR and VMREAD/VMWRITE
/// bitmaps); a bitmap byte outside it reflects the exit. Never panics.
pub fn decide(
    exit: &Exit,
    vmcs12: &Vmcs12,
    mem: &dyn GuestPhysMemory,
    policy: &L0Policy,
) -> Decision {
    let c = Controls::of(vmcs12);
    type P = PrimaryProcBased;
    type S = SecondaryProcBased;
    match exit {
        Exit::ExceptionOrNmi { info, .. } => decide_exception(info.kind, info.vector, info.error_code, vmcs12, &c),
        Exit::ExternalInterrupt { .. } => by_control(
            c.pin.contains(PinBased::EXT_INTR_EXITING),
            "external-interrupt exiting",
            "an external interrupt",
            "L0 delivers it to L2 through its own interrupt path",
        ),
        Exit::TripleFault => Decision::reflect(
            "a triple fault in L2 always exits to L1 (SDM 26.2): L1 decides the L2's fate",
        ),
        Exit::InitSignal => Decision::reflect(
            "INIT signals cause VM exits unconditionally in VMX non-root operation (SDM 26.2): L1's",
        ),
        Exit::StartupIpi { .. } => Decision::reflect(
            "a SIPI to an L2 in wait-for-SIPI state always exits (SDM 26.2): L1's",
        ),
        Exit::IoSmi { .. } | Exit::OtherSmi { .. } => Decision::l0(
            "SMIs are L0's: dual-monitor treatment is not offered to L1, L0 handles the SMI and resumes L2",
        ),
        Exit::InterruptWindow => by_control(
            c.p(P::INTR_WINDOW_EXITING),
            "interrupt-window exiting",
            "an interrupt-window exit",
            "L0 asked for the window itself and injects its pending interrupt into L2",
        ),
        Exit::NmiWindow => by_control(
            c.p(P::NMI_WINDOW_EXITING),
            "NMI-window exiting",
            "an NMI-window exit",
            "L0 asked for the window itself and injects its pending NMI into L2",
        ),
        Exit::TaskSwitch { .. } => unconditional("a task switch"),
        Exit::Cpuid { .. } => unconditional("CPUID"),
        Exit::Getsec { .. } => unconditional("GETSEC"),
        Exit::Invd { .. } => unconditional("INVD"),
        Exit::Xsetbv { .. } => unconditional("XSETBV"),
        Exit::Vmcall { .. } => unconditional("VMCALL"),
        Exit::Vmclear(_) => unconditional("VMCLEAR"),
        Exit::Vmlaunch { .. } => unconditional("VMLAUNCH"),
        Exit::Vmptrld(_) => unconditional("VMPTRLD"),
        Exit::Vmptrst(_) => unconditional("VMPTRST"),
        Exit::Vmresume { .. } => unconditional("VMRESUME"),
        Exit::Vmxoff { .. } => unconditional("VMXOFF"),
        Exit::Vmxon(_) => unconditional("VMXON"),
        Exit::Invept(_) => unconditional("INVEPT"),
        Exit::Invvpid(_) => unconditional("INVVPID"),
        Exit::Vmread { field, .. } => decide_vmcs_access(false, vmcs12, mem, &c, *field),
        Exit::Vmwrite { field, .. } => decide_vmcs_access(true, vmcs12, mem, &c, *field),
        Exit::Vmfunc { .. } => Decision::reflect(
            "a VMFUNC exit means the VM function failed or is not enabled (SDM 26.5.6): L1's",
        ),
        Exit::Rsm { .. } => unconditional("RSM (only possible in SMM under dual-monitor treatment)"),
        Exit::Seamcall { .. } => unconditional("SEAMCALL"),
        Exit::Tdcall { .. } => unconditional("TDCALL"),
        Exit::Hlt { .. } => by_control(
            c.p(P::HLT_EXITING),
            "HLT exiting",
            "HLT",
            "L0 halts L2 until its next interrupt",
        ),
        Exit::Invlpg { .. } => by_control(
            c.p(P::INVLPG_EXITING),
            "INVLPG exiting",
            "INVLPG",
            "L0 invalidates the translation for L2 and resumes it",
        ),
        Exit::Invpcid(_) => {
            if !c.s(S::ENABLE_INVPCID) {
                Decision::l0("\"enable INVPCID\" is 0 in vmcs12, so INVPCID is #UD in L2: L0 injects #UD")
            } else {
                // SDM 26.2: INVPCID exits iff "INVLPG exiting" and "enable INVPCID".
                by_control(
                    c.p(P::INVLPG_EXITING),
                    "INVLPG exiting",
                    "INVPCID (with \"enable INVPCID\" set)",
                    "L0 performs the invalidation for L2",
                )
            }
        }
        Exit::Rdpmc { .. } => by_control(
            c.p(P::RDPMC_EXITING),
            "RDPMC exiting",
            "RDPMC",
            "L0 completes RDPMC for L2",
        ),
        Exit::Rdtsc { .. } => by_control(
            c.p(P::RDTSC_EXITING),
            "RDTSC exiting",
            "RDTSC",
            "L0 returns the TSC with L1's TSC offset applied",
        ),
        Exit::Rdtscp { .. } => {
            if !c.s(S::ENABLE_RDTSCP) {
                Decision::l0("\"enable RDTSCP\" is 0 in vmcs12, so RDTSCP is #UD in L2: L0 injects #UD")
            } else {
                by_control(
                    c.p(P::RDTSC_EXITING),
                    "RDTSC exiting",
                    "RDTSCP (with \"enable RDTSCP\" set)",
                    "L0 returns the TSC with L1's TSC offset applied, and TSC_AUX",
                )
            }
        }
        Exit::Mwait { .. } => by_control(
            c.p(P::MWAIT_EXITING),
            "MWAIT exiting",
            "MWAIT",
            "L0 completes MWAIT as a NOP for L2",
        ),
        Exit::Monitor { .. } => by_control(
            c.p(P::MONITOR_EXITING),
            "MONITOR exiting",
            "MONITOR",
            "L0 completes MONITOR as a NOP for L2",
        ),
        Exit::Pause { .. } => {
            if c.p(P::PAUSE_EXITING) {
                Decision::reflect("PAUSE exits because L1 set \"PAUSE exiting\"")
            } else if c.s(S::PAUSE_LOOP_EXITING) {
                Decision::reflect(
                    "L1 set \"PAUSE-loop exiting\": a PAUSE loop in L2 is L1's to see",
                )
            } else {
                Decision::l0(
                    "\"PAUSE exiting\" and \"PAUSE-loop exiting\" are 0 in vmcs12: the pause loop is L0's own, L0 yields and resumes L2",
                )
            }
        }
        Exit::Wbinvd { .. } => by_control(
            c.s(S::WBINVD_EXITING),
            "WBINVD exiting",
            "WBINVD",
            "L0 completes WBINVD for L2",
        ),
        Exit::Rdrand { .. } => by_control(
            c.s(S::RDRAND_EXITING),
            "RDRAND exiting",
            "RDRAND",
            "L0 completes RDRAND for L2",
        ),
        Exit::Rdseed { .. } => by_control(
            c.s(S::RDSEED_EXITING),
            "RDSEED exiting",
            "RDSEED",
            "L0 completes RDSEED for L2",
        ),
        Exit::CrAccess { access, written, .. } => decide_cr(access, *written, vmcs12, &c),
        Exit::MovDr { .. } => by_control(
            c.p(P::MOV_DR_EXITING),
            "MOV-DR exiting",
            "MOV DR",
            "L0 completes the debug-register access for L2",
        ),
        Exit::Io { io, .. } => decide_io(io, vmcs12, mem, policy, &c),
        Exit::Rdmsr { msr, .. } => decide_msr(*msr, false, vmcs12, mem, &c),
        Exit::Wrmsr { msr, .. } => decide_msr(*msr, true, vmcs12, mem, &c),
        Exit::InvalidGuestState { .. } => {
            Decision::reflect("VM-entry failure (invalid guest state, reason 33): always reported to L1")
        }
        Exit::MsrLoading { .. } => {
            Decision::reflect("VM-entry failure (MSR loading, reason 34): always reported to L1")
        }
        Exit::MachineCheckDuringEntry => Decision::reflect(
            "VM-entry failure (machine-check event, reason 41): always reported to L1",
        ),
        Exit::MonitorTrapFlag => by_control(
            c.p(P::MONITOR_TRAP_FLAG),
            "monitor trap flag",
            "an MTF exit",
            "L0 was single-stepping L2 for itself and resumes it",
        ),
        Exit::PreemptionTimer => by_control(
            c.pin.contains(PinBased::PREEMPTION_TIMER),
            "activate VMX-preemption timer",
            "a preemption-timer exit",
            "the timer was L0's own, L0 resumes L2",
        ),
        Exit::TprBelowThreshold => by_control(
            c.p(P::USE_TPR_SHADOW),
            "use TPR shadow",
            "a TPR-below-threshold exit",
            "L0's own TPR threshold fired, L0 delivers the pending interrupt",
        ),
        Exit::ApicAccess { .. } => by_control(
            c.s(S::VIRTUALIZE_APIC_ACCESSES),
            "virtualize APIC accesses",
            "an APIC access",
            "L0 emulates the local-APIC access for L2",
        ),
        Exit::ApicWrite { .. } => by_control(
            c.s(S::APIC_REGISTER_VIRT) || c.s(S::VIRTUAL_INTR_DELIVERY),
            "APIC-register virtualization or virtual-interrupt delivery",
            "an APIC write",
            "L0 emulates the APIC write for L2",
        ),
        Exit::VirtualizedEoi { vector } => {
            if !c.s(S::VIRTUAL_INTR_DELIVERY) {
                return Decision::l0(
                    "\"virtual-interrupt delivery\" is 0 in vmcs12: the EOI exit is L0's, L0 completes the EOI",
                );
            }
            let field = match vector / 64 {
                0 => VmcsField::EOI_EXIT_BITMAP0,
                1 => VmcsField::EOI_EXIT_BITMAP1,
                2 => VmcsField::EOI_EXIT_BITMAP2,
                _ => VmcsField::EOI_EXIT_BITMAP3,
            };
            let set = vmcs12.get(field) & (1u64 << (vector % 64)) != 0;
            if set {
                Decision::reflect(format!("EOI-exit bitmap bit for vector {vector:#x} is set"))
            } else {
                Decision::l0(format!(
                    "EOI-exit bitmap bit for vector {vector:#x} is clear: L0 completes the EOI"
                ))
            }
        }
        Exit::GdtrIdtrAccess(_) | Exit::LdtrTrAccess(_) => by_control(
            c.s(S::DESC_TABLE_EXITING),
            "descriptor-table exiting",
            "a descriptor-table instruction",
            "L0 completes the instruction for L2",
        ),
        Exit::EptViolation { gpa, .. } => decide_ept(*gpa, "an EPT violation", policy, &c),
        Exit::EptMisconfig { gpa } => decide_ept(*gpa, "an EPT misconfiguration", policy, &c),
        Exit::PmlFull { .. } => by_control(
            c.s(S::ENABLE_PML),
            "enable PML",
            "a PML-full exit",
            "the log is L0's own, L0 drains it",
        ),
        Exit::Xsaves { xss, .. } => decide_xsaves("XSAVES", *xss, vmcs12, &c),
        Exit::Xrstors { xss, .. } => decide_xsaves("XRSTORS", *xss, vmcs12, &c),
        Exit::Encls { leaf, .. } => decide_leaf_bitmap(
            "ENCLS",
            c.s(S::ENCLS_EXITING),
            "enable ENCLS exiting",
            VmcsField::ENCLS_EXITING_BITMAP,
            vmcs12,
            *leaf,
        ),
        Exit::Enclv { leaf, .. } => decide_leaf_bitmap(
            "ENCLV",
            c.sec_raw & SEC_ENCLV_EXITING != 0,
            "enable ENCLV exiting",
            VmcsField::ENCLV_EXITING_BITMAP,
            vmcs12,
            *leaf,
        ),
        Exit::Pconfig { leaf, .. } => decide_leaf_bitmap(
            "PCONFIG",
            c.sec_raw & SEC_ENABLE_PCONFIG != 0,
            "enable PCONFIG",
            VmcsField::PCONFIG_EXITING_BITMAP,
            vmcs12,
            *leaf,
        ),
        Exit::SppEvent { .. } => by_control(
            c.sec_raw & SEC_SPP != 0,
            "sub-page write permissions for EPT",
            "an SPP-related event",
            "SPP is not used by L0 for itself; L0 treats it as its own EPT fault and retries L2",
        ),
        Exit::Umwait { .. } | Exit::Tpause { .. } => {
            let what = if matches!(exit, Exit::Umwait { .. }) { "UMWAIT" } else { "TPAUSE" };
            if !c.s(S::ENABLE_USER_WAIT_PAUSE) {
                Decision::l0(format!(
                    "\"enable user wait and pause\" is 0 in vmcs12, so {what} is #UD in L2: L0 injects #UD"
                ))
            } else {
                // SDM 26.2: exits iff "RDTSC exiting" and "enable user wait and pause".
                by_control(
                    c.p(P::RDTSC_EXITING),
                    "RDTSC exiting",
                    what,
                    "L0 completes the wait at once for L2",
                )
            }
        }
        Exit::Loadiwkey { .. } => by_control(
            c.tert & TERT_LOADIWKEY_EXITING != 0,
            "LOADIWKEY exiting",
            "LOADIWKEY",
            "L0 completes LOADIWKEY for L2",
        ),
        Exit::EnqcmdPasidFailure { .. } | Exit::EnqcmdsPasidFailure { .. } => Decision::reflect(
            "PASID translation exits only come from L1's PASID-translation setup (L0 uses none): L1's",
        ),
        Exit::BusLock => by_control(
            c.sec_raw & SEC_BUS_LOCK_DETECTION != 0,
            "VMM bus-lock detection",
            "a bus-lock exit",
            "L0 counts the bus lock and resumes L2",
        ),
        Exit::InstructionTimeout { .. } => by_control(
            c.sec_raw & SEC_INSTRUCTION_TIMEOUT != 0,
            "instruction timeout",
            "an instruction-timeout exit",
            "the notify window was L0's own, L0 resumes L2",
        ),
        Exit::Rdmsrlist { .. } | Exit::Wrmsrlist { .. } => {
            let what = if matches!(exit, Exit::Rdmsrlist { .. }) { "RDMSRLIST" } else { "WRMSRLIST" };
            if c.tert & TERT_ENABLE_MSR_LIST == 0 {
                Decision::l0(format!(
                    "\"enable MSR-list instructions\" is 0 in vmcs12, so {what} is #UD in L2: L0 injects #UD"
                ))
            } else {
                Decision::reflect(format!(
                    "L1 set \"enable MSR-list instructions\"; L0 does not walk the MSR list against L1's MSR bitmap, so {what} goes to L1 (conservative)"
                ))
            }
        }
    }
}

fn decide_exception(
    kind: InterruptionType,
    vector: u8,
    error_code: Option<u32>,
    v: &Vmcs12,
    c: &Controls,
) -> Decision {
    match kind {
        InterruptionType::Nmi => by_control(
            c.pin.contains(PinBased::NMI_EXITING),
            "NMI exiting",
            "an NMI",
            "L0 delivers the NMI to L2",
        ),
        InterruptionType::HardwareException
        | InterruptionType::SoftwareException
        | InterruptionType::PrivilegedSoftwareException => {
            if vector >= 32 {
                return Decision::l0(format!(
                    "exception vector {vector} is outside the 32-bit exception bitmap: L0 delivers it to L2"
                ));
            }
            let bitmap = v.get32(VmcsField::EXCEPTION_BITMAP);
            let bit = bitmap & (1 << vector) != 0;
            if vector == 14 {
                // SDM 25.2: with bit 14 set, #PF exits iff (PFEC & MASK) == MATCH;
                // with it clear, iff they differ.
                let pfec = error_code.unwrap_or(0);
                let mask = v.get32(VmcsField::PAGE_FAULT_ERROR_CODE_MASK);
                let mtch = v.get32(VmcsField::PAGE_FAULT_ERROR_CODE_MATCH);
                let matches = pfec & mask == mtch;
                let why = format!(
                    "exception bitmap bit 14 is {}, and page-fault error code {pfec:#x} & mask {mask:#x} {} match {mtch:#x}",
                    if bit { "set" } else { "clear" },
                    if matches { "==" } else { "!=" },
                );
                if bit == matches {
                    Decision::reflect(format!("#PF exits to L1: {why}"))
                } else {
                    Decision::l0(format!("#PF is not L1's: {why}; L0 injects #PF into L2"))
                }
            } else if bit {
                Decision::reflect(format!("exception bitmap bit {vector} is set"))
            } else {
                Decision::l0(format!(
                    "exception bitmap bit {vector} is clear: L0 injects the exception into L2"
                ))
            }
        }
        InterruptionType::ExternalInterrupt
        | InterruptionType::SoftwareInterrupt
        | InterruptionType::OtherEvent => Decision::l0(format!(
            "interruption type {kind:?} is not an exception or NMI exit L1 can ask for: L0 delivers vector {vector} to L2"
        )),
    }
}

fn decide_vmcs_access(
    write: bool,
    v: &Vmcs12,
    mem: &dyn GuestPhysMemory,
    c: &Controls,
    field: u64,
) -> Decision {
    let what = if write { "VMWRITE" } else { "VMREAD" };
    if !c.s(SecondaryProcBased::VMCS_SHADOWING) {
        return unconditional(what);
    }
    // SDM 26.1.3: with VMCS shadowing, exits if bits 63:15 of the field
    // encoding are not 0 or the bitmap bit for bits 14:0 is set.
    if field >> 15 != 0 {
        return Decision::reflect(format!(
            "{what} of encoding {field:#x} sets bits 63:15, which always exits with VMCS shadowing"
        ));
    }
    let (bitmap_field, name) = if write {
        (VmcsField::VMWRITE_BITMAP, "VMWRITE bitmap")
    } else {
        (VmcsField::VMREAD_BITMAP, "VMREAD bitmap")
    };
    match read_bit(mem, v.get(bitmap_field), field) {
        Err(at) => Decision::reflect(format!(
            "the {name} byte for field {field:#x} at {at:#x} is outside guest RAM: reflecting"
        )),
        Ok(true) => Decision::reflect(format!("{name} bit for field {field:#x} is set")),
        Ok(false) => Decision::l0(format!(
            "{name} bit for field {field:#x} is clear: L0 completes {what} on the shadow VMCS (VMCS link pointer)"
        )),
    }
}

/// Reads bit `bit` of the bitmap at `base`; `Err(gpa)` if the byte is outside RAM.
fn read_bit(mem: &dyn GuestPhysMemory, base: u64, bit: u64) -> Result<bool, u64> {
    // An address past the top of the 64-bit space is outside RAM too.
    let gpa = base.checked_add(bit / 8).ok_or(base)?;
    let mut b = [0u8; 1];
    mem.read(gpa, &mut b).map_err(|_| gpa)?;
    Ok(b[0] & (1 << (bit % 8)) != 0)
}

fn decide_cr(access: &CrAccess, written: Option<u64>, v: &Vmcs12, c: &Controls) -> Decision {
    type P = PrimaryProcBased;
    let (mask_f, shadow_f, name) = match access.cr {
        ControlReg::Cr4 => (
            VmcsField::CR4_GUEST_HOST_MASK,
            VmcsField::CR4_READ_SHADOW,
            "CR4",
        ),
        _ => (
            VmcsField::CR0_GUEST_HOST_MASK,
            VmcsField::CR0_READ_SHADOW,
            "CR0",
        ),
    };
    let mask = v.get(mask_f);
    let shadow = v.get(shadow_f);
    match (access.access, access.cr) {
        (CrAccessType::Clts, _) => {
            // SDM 26.1.3: CLTS exits iff CR0 mask bit 3 and read-shadow bit 3 are both 1.
            if mask & CR0_TS != 0 && shadow & CR0_TS != 0 {
                Decision::reflect("CLTS: L1 owns CR0.TS (guest/host mask bit 3) and the read shadow has TS = 1")
            } else {
                Decision::l0(format!(
                    "CLTS: CR0 mask TS = {}, read shadow TS = {}: no exit to L1; L0 clears TS for L2",
                    (mask & CR0_TS != 0) as u8,
                    (shadow & CR0_TS != 0) as u8
                ))
            }
        }
        (CrAccessType::Lmsw, _) => {
            // SDM 26.1.3: LMSW exits if mask.PE = 1, shadow.PE = 0 and source.PE = 1
            // (LMSW cannot clear PE), or for any of bits 3:1 the mask bit is 1 and
            // the source differs from the shadow.
            let src = u64::from(access.lmsw_source) & 0xf;
            let pe = mask & CR0_PE != 0 && shadow & CR0_PE == 0 && src & CR0_PE != 0;
            let low = (src ^ shadow) & mask & 0xe;
            if pe {
                Decision::reflect("LMSW sets CR0.PE, which L1 owns (mask bit 0) and its read shadow has clear")
            } else if low != 0 {
                Decision::reflect(format!(
                    "LMSW source {src:#x} changes CR0 bit(s) {low:#x} owned by L1 (mask {mask:#x}, shadow {shadow:#x})"
                ))
            } else {
                Decision::l0(format!(
                    "LMSW source {src:#x} changes no CR0 bit L1 owns (mask {mask:#x}, shadow {shadow:#x}): L0 completes it"
                ))
            }
        }
        (CrAccessType::MovToCr, ControlReg::Cr0 | ControlReg::Cr4) => {
            let new = written.unwrap_or(0);
            let diff = (new ^ shadow) & mask;
            if diff != 0 {
                Decision::reflect(format!(
                    "MOV to {name} of {new:#x} changes bit(s) {diff:#x} set in the {name} guest/host mask {mask:#x} (read shadow {shadow:#x})"
                ))
            } else {
                Decision::l0(format!(
                    "MOV to {name} of {new:#x} matches the read shadow in every bit of the guest/host mask {mask:#x}: L0 completes it"
                ))
            }
        }
        (CrAccessType::MovFromCr, ControlReg::Cr0 | ControlReg::Cr4) => Decision::l0(format!(
            "MOV from {name} never exits (SDM 26.1.3): L0 returns the value composed from the guest {name} and L1's read shadow"
        )),
        (CrAccessType::MovToCr, ControlReg::Cr3) => {
            if !c.p(P::CR3_LOAD_EXITING) {
                return Decision::l0("\"CR3-load exiting\" is 0 in vmcs12: L0 loads CR3 for L2");
            }
            let new = written.unwrap_or(0);
            // Counts above 4 fail VM entry; only 4 target fields exist.
            let count = v.get32(VmcsField::CR3_TARGET_COUNT).min(4) as usize;
            let targets = [
                VmcsField::CR3_TARGET_VALUE0,
                VmcsField::CR3_TARGET_VALUE1,
                VmcsField::CR3_TARGET_VALUE2,
                VmcsField::CR3_TARGET_VALUE3,
            ];
            match targets.iter().take(count).position(|&f| v.get(f) == new) {
                Some(n) => Decision::l0(format!(
                    "MOV to CR3 of {new:#x} matches CR3-target value {n} (count {count}): no exit to L1, L0 loads CR3"
                )),
                None => Decision::reflect(format!(
                    "L1 set \"CR3-load exiting\" and {new:#x} matches none of the first {count} CR3-target values"
                )),
            }
        }
        (CrAccessType::MovFromCr, ControlReg::Cr3) => by_control(
            c.p(P::CR3_STORE_EXITING),
            "CR3-store exiting",
            "MOV from CR3",
            "L0 returns L2's CR3",
        ),
        (CrAccessType::MovToCr, ControlReg::Cr8) => by_control(
            c.p(P::CR8_LOAD_EXITING),
            "CR8-load exiting",
            "MOV to CR8",
            if c.p(P::USE_TPR_SHADOW) {
                "L0 writes the TPR in L1's virtual-APIC page (use TPR shadow)"
            } else {
                "L0 sets L2's TPR"
            },
        ),
        (CrAccessType::MovFromCr, ControlReg::Cr8) => by_control(
            c.p(P::CR8_STORE_EXITING),
            "CR8-store exiting",
            "MOV from CR8",
            if c.p(P::USE_TPR_SHADOW) {
                "L0 reads the TPR from L1's virtual-APIC page (use TPR shadow)"
            } else {
                "L0 returns L2's TPR"
            },
        ),
    }
}

/// Ports an access touches, and whether it wraps past 0xffff.
fn io_ports(io: &IoQualification) -> (impl Iterator<Item = u16>, bool) {
    let start = u32::from(io.port);
    let end = start + u32::from(io.size.bytes());
    let wraps = end > 0x1_0000;
    ((start..end).map(|p| p as u16), wraps)
}

fn decide_io(
    io: &IoQualification,
    v: &Vmcs12,
    mem: &dyn GuestPhysMemory,
    policy: &L0Policy,
    c: &Controls,
) -> Decision {
    type P = PrimaryProcBased;
    let port = io.port;
    let n = io.size.bytes();
    if c.p(P::USE_IO_BITMAPS) {
        // SDM 26.1.3: with "use I/O bitmaps", "unconditional I/O exiting"
        // is ignored; an access wrapping past 0xffff always exits; else it
        // exits if the bit of any port it touches is set (string and REP
        // forms alike: each iteration is the same access).
        let (ports, wraps) = io_ports(io);
        if wraps {
            return Decision::reflect(format!(
                "the {n}-byte access at port {port:#x} wraps past port 0xffff, which always exits with I/O bitmaps"
            ));
        }
        for p in ports {
            let (base, name) = if p < 0x8000 {
                (v.get(VmcsField::IO_BITMAP_A), "A")
            } else {
                (v.get(VmcsField::IO_BITMAP_B), "B")
            };
            match read_bit(mem, base, u64::from(p & 0x7fff)) {
                Err(at) => {
                    return Decision::reflect(format!(
                        "I/O bitmap {name} byte for port {p:#x} at {at:#x} is outside guest RAM: reflecting"
                    ))
                }
                Ok(true) => {
                    return Decision::reflect(format!("I/O bitmap {name} bit for port {p:#x} is set"))
                }
                Ok(false) => {}
            }
        }
        return decide_io_l0(
            io,
            policy,
            "the I/O bitmap bits of every port touched are clear",
        );
    }
    if c.p(P::UNCOND_IO_EXITING) {
        return Decision::reflect(format!(
            "L1 set \"unconditional I/O exiting\" (no I/O bitmaps): port {port:#x} exits"
        ));
    }
    decide_io_l0(
        io,
        policy,
        "\"use I/O bitmaps\" and \"unconditional I/O exiting\" are both 0 in vmcs12",
    )
}

fn decide_io_l0(io: &IoQualification, policy: &L0Policy, why: &str) -> Decision {
    let port = io.port;
    if policy.l0_ports.contains(&port) {
        Decision::l0(format!(
            "{why}; L0 keeps port {port:#x} for itself and serves it"
        ))
    } else {
        Decision::l0(format!(
            "{why}; L0 completes the access to port {port:#x} itself (no L0 device there: reads return all ones, writes are dropped)"
        ))
    }
}

/// Offset in the MSR-bitmap page of the byte for `msr`, or `None` when the
/// MSR is outside both bitmap ranges (SDM 25.6.9).
pub fn msr_bitmap_bit(msr: u32, write: bool) -> Option<u64> {
    let quarter: u64 = match (msr, write) {
        (0..=0x1fff, false) => 0x000,
        (0xc000_0000..=0xc000_1fff, false) => 0x400,
        (0..=0x1fff, true) => 0x800,
        (0xc000_0000..=0xc000_1fff, true) => 0xc00,
        _ => return None,
    };
    Some(quarter * 8 + u64::from(msr & 0x1fff))
}

fn decide_msr(
    msr: u32,
    write: bool,
    v: &Vmcs12,
    mem: &dyn GuestPhysMemory,
    c: &Controls,
) -> Decision {
    let what = if write { "WRMSR" } else { "RDMSR" };
    if !c.p(PrimaryProcBased::USE_MSR_BITMAPS) {
        return Decision::reflect(format!(
            "\"use MSR bitmaps\" is 0 in vmcs12: every {what} exits (MSR {msr:#x})"
        ));
    }
    let Some(bit) = msr_bitmap_bit(msr, write) else {
        return Decision::reflect(format!(
            "MSR {msr:#x} is outside the bitmap ranges (0-0x1fff, 0xc0000000-0xc0001fff): {what} always exits"
        ));
    };
    let quarter = match bit / 0x2000 {
        0 => "read-low",
        1 => "read-high",
        2 => "write-low",
        _ => "write-high",
    };
    match read_bit(mem, v.get(VmcsField::MSR_BITMAP), bit) {
        Err(at) => Decision::reflect(format!(
            "MSR bitmap ({quarter}) byte for MSR {msr:#x} at {at:#x} is outside guest RAM: reflecting"
        )),
        Ok(true) => Decision::reflect(format!("MSR bitmap {quarter} bit for MSR {msr:#x} is set")),
        Ok(false) => Decision::l0(format!(
            "MSR bitmap {quarter} bit for MSR {msr:#x} is clear: L0 emulates {what} for L2"
        )),
    }
}

fn decide_ept(gpa: u64, what: &str, policy: &L0Policy, c: &Controls) -> Decision {
    if !c.s(SecondaryProcBased::ENABLE_EPT) {
        return Decision::l0(format!(
            "\"enable EPT\" is 0 in vmcs12: {what} at {gpa:#x} is L0's own (L2's physical space is L1's), L0 maps the page or emulates MMIO"
        ));
    }
    if policy.is_stale(gpa) {
        return Decision::l0(format!(
            "{what} at {gpa:#x}: L1's EPT maps the page, L0's own mapping is stale; L0 rebuilds it and resumes L2"
        ));
    }
    Decision::reflect(format!(
        "L1 uses EPT and L0's policy does not list {gpa:#x} as backed in L1's EPT: {what} is L1's"
    ))
}

/// What L1's EPT says about an EPT fault L0 saw while running L2: the one
/// place L0 asks "is this EPT violation L1's or mine?".
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EptExitDecision {
    /// "enable EPT" is 0 in vmcs12: L2's physical space is L1's, so the
    /// fault is L0's own (L0 maps the page or emulates MMIO).
    NoL1Ept(Decision),
    /// L1's EPT refuses the access: reflect `exit` (reason 48 with the
    /// qualification from the walk, or 49) to L1.
    Reflect {
        /// The exit to reflect, built from L1's EPT walk.
        exit: Exit,
        /// Why.
        decision: Decision,
    },
    /// L1's EPT allows the access, so L0's own mapping of the page is
    /// stale: L0 maps `gpa`'s page to L1-physical `hpa` and resumes L2.
    L0StaleMapping {
        /// L1-physical address `gpa` translates to.
        hpa: u64,
        /// Size of L1's EPT page.
        size: PageSize,
        /// Rights L1's EPT grants (AND over all levels).
        perms: EptPerms,
        /// Why.
        decision: Decision,
    },
}

impl EptExitDecision {
    /// The disposition and explanation, whatever the variant.
    pub fn decision(&self) -> &Decision {
        match self {
            EptExitDecision::NoL1Ept(d)
            | EptExitDecision::Reflect { decision: d, .. }
            | EptExitDecision::L0StaleMapping { decision: d, .. } => d,
        }
    }
}

/// Decides an EPT violation L0 observed at `gpa` (an L2-physical address)
/// for an `access` by walking L1's EPT (vmcs12 EPT_POINTER) through `mem`
/// (L1's memory) with [`Ept::walk`] (SDM 29.3.3): a misconfiguration
/// reflects exit 49, a refused access reflects exit 48 with the walk's
/// qualification (and `gla` when `context.guest_linear_address_valid`), an
/// allowed access means L0's mapping is stale. An EPTP the walker cannot
/// use (VM entry should have refused it) reflects as a misconfiguration.
/// Never panics, whatever L1's tables hold.
pub fn decide_ept_violation(
    vmcs12: &Vmcs12,
    mem: &dyn GuestPhysMemory,
    gpa: u64,
    access: AccessKind,
    gla: u64,
    context: ViolationContext,
    config: EptConfig,
) -> EptExitDecision {
    let c = Controls::of(vmcs12);
    if !c.s(SecondaryProcBased::ENABLE_EPT) {
        return EptExitDecision::NoL1Ept(Decision::l0(format!(
            "\"enable EPT\" is 0 in vmcs12: the EPT violation at {gpa:#x} is L0's own (L2's physical space is L1's), L0 maps the page or emulates MMIO"
        )));
    }
    let raw = vmcs12.get(VmcsField::EPT_POINTER);
    let ept = match Ept::new(raw, config) {
        Ok(ept) => ept,
        Err(e) => {
            return EptExitDecision::Reflect {
                exit: Exit::EptMisconfig { gpa },
                decision: Decision::reflect(format!(
                    "L1's EPT_POINTER {raw:#x} cannot be walked ({e}): an EPT misconfiguration at {gpa:#x} is L1's"
                )),
            }
        }
    };
    match ept.walk(mem, gpa, access, context) {
        EptWalk::Mapped {
            hpa, size, perms, ..
        } => EptExitDecision::L0StaleMapping {
            hpa,
            size,
            perms,
            decision: Decision::l0(format!(
                "L1's EPT maps {gpa:#x} to {hpa:#x} with {perms:?}, allowing the {access:?} access: L0's own mapping is stale, L0 rebuilds it and resumes L2"
            )),
        },
        EptWalk::Violation(v) => {
            let qualification = v.exit_qualification();
            EptExitDecision::Reflect {
                exit: Exit::EptViolation {
                    qualification,
                    gpa,
                    gla: context.guest_linear_address_valid.then_some(gla),
                },
                decision: Decision::reflect(format!(
                    "L1's EPT refuses the {access:?} access to {gpa:#x} (rights {:?}): an EPT violation (qualification {:#x}) is L1's",
                    v.perms,
                    v.qualification()
                )),
            }
        }
        EptWalk::Misconfig(m) => EptExitDecision::Reflect {
            exit: Exit::EptMisconfig { gpa },
            decision: Decision::reflect(format!(
                "L1's EPT entry {:#x} at level {} is misconfigured ({:?}): an EPT misconfiguration at {gpa:#x} is L1's",
                m.entry, m.level, m.reason
            )),
        },
    }
}

fn decide_xsaves(what: &str, xss: u64, v: &Vmcs12, c: &Controls) -> Decision {
    if !c.s(SecondaryProcBased::ENABLE_XSAVES) {
        return Decision::l0(format!(
            "\"enable XSAVES/XRSTORS\" is 0 in vmcs12, so {what} is #UD in L2: L0 injects #UD"
        ));
    }
    // SDM 26.2: exits iff a bit set in IA32_XSS is also set in the XSS-exiting bitmap.
    let bitmap = v.get(VmcsField::XSS_EXIT_BITMAP);
    let both = xss & bitmap;
    if both != 0 {
        Decision::reflect(format!(
            "XSS-exiting bitmap {bitmap:#x} and IA32_XSS {xss:#x} share bit(s) {both:#x}"
        ))
    } else {
        Decision::l0(format!(
            "no IA32_XSS bit ({xss:#x}) is set in the XSS-exiting bitmap {bitmap:#x}: L0 completes {what}"
        ))
    }
}

fn decide_leaf_bitmap(
    what: &str,
    enabled: bool,
    control: &str,
    bitmap_field: VmcsField,
    v: &Vmcs12,
    leaf: u32,
) -> Decision {
    if !enabled {
        return Decision::l0(format!(
            "\"{control}\" is 0 in vmcs12: {what} is not L1's, L0 injects #UD into L2"
        ));
    }
    // SDM 26.2: the leaf in EAX selects the bitmap bit; leaves >= 63 use bit 63.
    let leaf = leaf.min(63);
    let bitmap = v.get(bitmap_field);
    if bitmap & (1u64 << leaf) != 0 {
        Decision::reflect(format!("{} bit {leaf} is set", bitmap_field.name()))
    } else {
        Decision::l0(format!(
            "{} bit {leaf} is clear: L0 injects #UD (it does not run {what} for L2)",
            bitmap_field.name()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exit::{
        CrAccess, DrAccess, DrDirection, ExitContext, InstructionExit, InstructionInfo,
        InterruptionInfo, IoDirection, IoOperand, IoSize, LmswOperand,
    };
    use crate::ExitInfo;
    use proptest::prelude::*;
    use std::collections::HashSet;
    use vmcs12::FlatMemory;

    type P = PrimaryProcBased;
    type S = SecondaryProcBased;

    const IO_A: u64 = 0x1000;
    const IO_B: u64 = 0x2000;
    const MSRS: u64 = 0x3000;
    const VMREAD_BM: u64 = 0x4000;
    const VMWRITE_BM: u64 = 0x5000;

    fn env() -> (Vmcs12, FlatMemory) {
        let mut v = Vmcs12::new();
        v.set(VmcsField::IO_BITMAP_A, IO_A);
        v.set(VmcsField::IO_BITMAP_B, IO_B);
        v.set(VmcsField::MSR_BITMAP, MSRS);
        v.set(VmcsField::VMREAD_BITMAP, VMREAD_BM);
        v.set(VmcsField::VMWRITE_BITMAP, VMWRITE_BM);
        (v, FlatMemory::new(0x8000))
    }

    fn set_proc(v: &mut Vmcs12, p: P) {
        let old = v.get(VmcsField::CPU_BASED_VM_EXEC_CONTROL);
        v.set(
            VmcsField::CPU_BASED_VM_EXEC_CONTROL,
            old | u64::from(p.bits()),
        );
    }

    fn set_sec_raw(v: &mut Vmcs12, bits: u32) {
        set_proc(v, P::ACTIVATE_SECONDARY);
        let old = v.get(VmcsField::SECONDARY_VM_EXEC_CONTROL);
        v.set(VmcsField::SECONDARY_VM_EXEC_CONTROL, old | u64::from(bits));
    }

    fn set_sec(v: &mut Vmcs12, s: S) {
        set_sec_raw(v, s.bits());
    }

    fn set_pin(v: &mut Vmcs12, p: PinBased) {
        v.set(VmcsField::PIN_BASED_VM_EXEC_CONTROL, u64::from(p.bits()));
    }

    fn set_bit(mem: &mut FlatMemory, base: u64, bit: u64) {
        let gpa = base + bit / 8;
        let mut b = [0u8; 1];
        mem.read(gpa, &mut b).unwrap();
        b[0] |= 1 << (bit % 8);
        mem.write(gpa, &b).unwrap();
    }

    fn set_io_bit(mem: &mut FlatMemory, port: u16) {
        let base = if port < 0x8000 { IO_A } else { IO_B };
        set_bit(mem, base, u64::from(port & 0x7fff));
    }

    fn set_msr_bit(mem: &mut FlatMemory, msr: u32, write: bool) {
        set_bit(mem, MSRS, msr_bitmap_bit(msr, write).unwrap());
    }

    fn run(exit: &Exit, v: &Vmcs12, mem: &FlatMemory) -> Decision {
        decide(exit, v, mem, &L0Policy::default())
    }

    fn io(port: u16, size: IoSize) -> Exit {
        Exit::Io {
            io: IoQualification {
                size,
                direction: IoDirection::Out,
                string: false,
                rep: false,
                operand: IoOperand::Dx,
                port,
            },
            len: 1,
        }
    }

    fn cr(cr: ControlReg, access: CrAccessType, written: Option<u64>, lmsw: u16) -> Exit {
        Exit::CrAccess {
            access: CrAccess {
                cr,
                access,
                lmsw_operand: LmswOperand::Register,
                gpr: 0,
                lmsw_source: lmsw,
            },
            written,
            len: 3,
        }
    }

    fn exception(kind: InterruptionType, vector: u8, ec: Option<u32>) -> Exit {
        Exit::ExceptionOrNmi {
            info: InterruptionInfo {
                vector,
                kind,
                error_code: ec,
                nmi_unblocking_iret: false,
            },
            qualification: crate::exit::ExceptionQualification::None,
            len: 0,
        }
    }

    fn instr() -> InstructionExit {
        InstructionExit {
            info: InstructionInfo::decode(0).unwrap(),
            displacement: 0,
            len: 3,
        }
    }

    fn assert_reflects(d: &Decision, needle: &str) {
        assert_eq!(d.disposition, Disposition::ReflectToL1, "{}", d.explanation);
        assert!(
            d.explanation.contains(needle),
            "{:?} lacks {needle:?}",
            d.explanation
        );
    }

    fn assert_l0(d: &Decision, needle: &str) {
        assert_eq!(d.disposition, Disposition::HandleInL0, "{}", d.explanation);
        assert!(
            d.explanation.contains(needle),
            "{:?} lacks {needle:?}",
            d.explanation
        );
    }

    // ---- I/O -------------------------------------------------------------

    #[test]
    fn test_io_unconditional_exiting_reflects() {
        let (mut v, mem) = env();
        set_proc(&mut v, P::UNCOND_IO_EXITING);
        assert_reflects(
            &run(&io(0x3f8, IoSize::One), &v, &mem),
            "unconditional I/O exiting",
        );
    }

    #[test]
    fn test_io_without_interception_is_l0_and_keeps_debug_port() {
        let (v, mem) = env();
        assert_l0(&run(&io(0xe9, IoSize::One), &v, &mem), "keeps port 0xe9");
        assert_l0(
            &run(&io(0x3f8, IoSize::One), &v, &mem),
            "reads return all ones",
        );
    }

    #[test]
    fn test_io_bitmap_a_bit_set_reflects_clear_is_l0() {
        let (mut v, mut mem) = env();
        set_proc(&mut v, P::USE_IO_BITMAPS | P::UNCOND_IO_EXITING);
        // Bitmaps take precedence over unconditional I/O exiting (SDM 26.1.3).
        assert_l0(
            &run(&io(0x3f8, IoSize::One), &v, &mem),
            "bits of every port touched are clear",
        );
        set_io_bit(&mut mem, 0x3f8);
        assert_reflects(
            &run(&io(0x3f8, IoSize::One), &v, &mem),
            "I/O bitmap A bit for port 0x3f8 is set",
        );
    }

    #[test]
    fn test_io_l1_interception_of_debug_port_wins() {
        let (mut v, mut mem) = env();
        set_proc(&mut v, P::USE_IO_BITMAPS);
        set_io_bit(&mut mem, 0xe9);
        assert_reflects(&run(&io(0xe9, IoSize::One), &v, &mem), "port 0xe9 is set");
    }

    #[test]
    fn test_io_access_spanning_into_bitmap_b_reflects() {
        let (mut v, mut mem) = env();
        set_proc(&mut v, P::USE_IO_BITMAPS);
        assert_l0(&run(&io(0x7fff, IoSize::Two), &v, &mem), "clear");
        set_io_bit(&mut mem, 0x8000);
        assert_reflects(
            &run(&io(0x7fff, IoSize::Two), &v, &mem),
            "I/O bitmap B bit for port 0x8000 is set",
        );
        assert_l0(&run(&io(0x7fff, IoSize::One), &v, &mem), "clear");
    }

    #[test]
    fn test_io_wrapping_past_ffff_reflects() {
        let (mut v, mem) = env();
        set_proc(&mut v, P::USE_IO_BITMAPS);
        assert_reflects(
            &run(&io(0xfffe, IoSize::Four), &v, &mem),
            "wraps past port 0xffff",
        );
        assert_l0(&run(&io(0xfffc, IoSize::Four), &v, &mem), "clear");
    }

    #[test]
    fn test_io_string_rep_forms_use_the_same_bits() {
        let (mut v, mut mem) = env();
        set_proc(&mut v, P::USE_IO_BITMAPS);
        let rep_outsb = Exit::Io {
            io: IoQualification {
                size: IoSize::One,
                direction: IoDirection::In,
                string: true,
                rep: true,
                operand: IoOperand::Dx,
                port: 0x1f0,
            },
            len: 2,
        };
        assert_l0(&run(&rep_outsb, &v, &mem), "clear");
        set_io_bit(&mut mem, 0x1f0);
        assert_reflects(&run(&rep_outsb, &v, &mem), "port 0x1f0 is set");
    }

    #[test]
    fn test_io_bitmap_outside_ram_reflects() {
        let (mut v, mem) = env();
        set_proc(&mut v, P::USE_IO_BITMAPS);
        v.set(VmcsField::IO_BITMAP_B, u64::MAX);
        // A base whose byte offset would wrap to low memory is not read there.
        assert_reflects(
            &run(&io(0x8008, IoSize::One), &v, &mem),
            "outside guest RAM",
        );
        v.set(VmcsField::IO_BITMAP_B, 0xffff_ffff_ffff_f000);
        assert_reflects(
            &run(&io(0x9000, IoSize::One), &v, &mem),
            "outside guest RAM",
        );
        assert_l0(&run(&io(0x100, IoSize::One), &v, &mem), "clear");
    }

    proptest! {
        #[test]
        fn test_io_bitmap_matches_reference(
            set in proptest::collection::vec(any::<u16>(), 0..8),
            near in proptest::collection::vec(0u16..8, 0..4),
            port: u16, size_sel in 0u8..3, use_bitmaps: bool, uncond: bool,
        ) {
            let size = [IoSize::One, IoSize::Two, IoSize::Four][usize::from(size_sel)];
            let (mut v, mut mem) = env();
            if use_bitmaps { set_proc(&mut v, P::USE_IO_BITMAPS); }
            if uncond { set_proc(&mut v, P::UNCOND_IO_EXITING); }
            let mut bits: HashSet<u16> = set.into_iter().collect();
            bits.extend(near.into_iter().map(|d| port.wrapping_add(d)));
            for &p in &bits { set_io_bit(&mut mem, p); }
            // Reference: SDM 26.1.3, written independently of the code.
            let n = u32::from(size.bytes());
            let expected = if use_bitmaps {
                u32::from(port) + n > 0x10000
                    || (0..n).any(|i| bits.contains(&((u32::from(port) + i) as u16)))
            } else {
                uncond
            };
            let d = run(&io(port, size), &v, &mem);
            prop_assert_eq!(d.reflects(), expected, "{}", d.explanation);
        }
    }

    // ---- MSR -------------------------------------------------------------

    fn rdmsr(msr: u32) -> Exit {
        Exit::Rdmsr { msr, len: 2 }
    }

    fn wrmsr(msr: u32) -> Exit {
        Exit::Wrmsr { msr, len: 2 }
    }

    #[test]
    fn test_msr_without_bitmaps_always_reflects() {
        let (v, mem) = env();
        assert_reflects(&run(&rdmsr(0x10), &v, &mem), "\"use MSR bitmaps\" is 0");
        assert_reflects(&run(&wrmsr(0x10), &v, &mem), "every WRMSR exits");
    }

    #[test]
    fn test_msr_outside_ranges_reflects() {
        let (mut v, mem) = env();
        set_proc(&mut v, P::USE_MSR_BITMAPS);
        assert_reflects(
            &run(&rdmsr(0x4000_0000), &v, &mem),
            "MSR 0x40000000 is outside the bitmap ranges",
        );
        assert_reflects(&run(&wrmsr(0x2000), &v, &mem), "outside the bitmap ranges");
        assert_l0(&run(&rdmsr(0x1fff), &v, &mem), "clear");
    }

    #[test]
    fn test_msr_bitmap_quarters() {
        let (mut v, mut mem) = env();
        set_proc(&mut v, P::USE_MSR_BITMAPS);
        assert_l0(
            &run(&rdmsr(0x10), &v, &mem),
            "read-low bit for MSR 0x10 is clear",
        );
        set_msr_bit(&mut mem, 0x10, false);
        assert_reflects(
            &run(&rdmsr(0x10), &v, &mem),
            "read-low bit for MSR 0x10 is set",
        );
        assert_l0(&run(&wrmsr(0x10), &v, &mem), "write-low");
        set_msr_bit(&mut mem, 0xc000_0080, true);
        assert_reflects(
            &run(&wrmsr(0xc000_0080), &v, &mem),
            "write-high bit for MSR 0xc0000080 is set",
        );
        assert_l0(&run(&rdmsr(0xc000_0080), &v, &mem), "read-high");
        assert_eq!(msr_bitmap_bit(0x10, false), Some(0x10));
        assert_eq!(msr_bitmap_bit(0xc000_0080, false), Some(0x400 * 8 + 0x80));
        assert_eq!(msr_bitmap_bit(0x10, true), Some(0x800 * 8 + 0x10));
        assert_eq!(msr_bitmap_bit(0xc000_1fff, true), Some(0xc00 * 8 + 0x1fff));
        assert_eq!(msr_bitmap_bit(0xc000_2000, true), None);
    }

    #[test]
    fn test_msr_bitmap_outside_ram_reflects() {
        let (mut v, mem) = env();
        set_proc(&mut v, P::USE_MSR_BITMAPS);
        v.set(VmcsField::MSR_BITMAP, 0x10_0000);
        assert_reflects(&run(&rdmsr(0x10), &v, &mem), "outside guest RAM");
    }

    fn msr_strategy() -> impl Strategy<Value = u32> {
        prop_oneof![0u32..0x2000, 0xc000_0000u32..0xc000_2000, any::<u32>()]
    }

    proptest! {
        #[test]
        fn test_msr_bitmap_matches_reference(
            set in proptest::collection::vec((msr_strategy(), any::<bool>()), 0..8),
            msr in msr_strategy(), write: bool, use_bitmaps: bool,
        ) {
            let (mut v, mut mem) = env();
            if use_bitmaps { set_proc(&mut v, P::USE_MSR_BITMAPS); }
            let mut bits = HashSet::new();
            for &(m, w) in &set {
                // Reference layout (SDM 25.6.9), written out separately.
                let off = match m {
                    0..=0x1fff => Some(if w { 0x800 } else { 0 }),
                    0xc000_0000..=0xc000_1fff => Some(if w { 0xc00 } else { 0x400 }),
                    _ => None,
                };
                if let Some(off) = off {
                    let byte = MSRS + off + u64::from(m & 0x1fff) / 8;
                    let mut b = [0u8; 1];
                    mem.read(byte, &mut b).unwrap();
                    b[0] |= 1 << (m & 7);
                    mem.write(byte, &b).unwrap();
                    bits.insert((m, w));
                }
            }
            let in_range = msr <= 0x1fff || (0xc000_0000..=0xc000_1fff).contains(&msr);
            let expected = !use_bitmaps || !in_range || bits.contains(&(msr, write));
            let exit = if write { wrmsr(msr) } else { rdmsr(msr) };
            let d = run(&exit, &v, &mem);
            prop_assert_eq!(d.reflects(), expected, "{}", d.explanation);
        }
    }

    // ---- simple control-bit rules -----------------------------------------

    #[test]
    fn test_control_bit_rules_table() {
        type Setter = fn(&mut Vmcs12);
        let table: Vec<(Exit, Setter, &str)> = vec![
            (
                Exit::Hlt { len: 1 },
                |v| set_proc(v, P::HLT_EXITING),
                "HLT exiting",
            ),
            (
                Exit::Invlpg {
                    linear_address: 0x1000,
                    len: 3,
                },
                |v| set_proc(v, P::INVLPG_EXITING),
                "INVLPG exiting",
            ),
            (
                Exit::Rdpmc { len: 2 },
                |v| set_proc(v, P::RDPMC_EXITING),
                "RDPMC exiting",
            ),
            (
                Exit::Rdtsc { len: 2 },
                |v| set_proc(v, P::RDTSC_EXITING),
                "RDTSC exiting",
            ),
            (
                Exit::Mwait { len: 3 },
                |v| set_proc(v, P::MWAIT_EXITING),
                "MWAIT exiting",
            ),
            (
                Exit::Monitor { len: 3 },
                |v| set_proc(v, P::MONITOR_EXITING),
                "MONITOR exiting",
            ),
            (
                Exit::MovDr {
                    access: DrAccess {
                        dr: 7,
                        direction: DrDirection::ToDr,
                        gpr: 0,
                    },
                    len: 3,
                },
                |v| set_proc(v, P::MOV_DR_EXITING),
                "MOV-DR exiting",
            ),
            (
                Exit::InterruptWindow,
                |v| set_proc(v, P::INTR_WINDOW_EXITING),
                "interrupt-window exiting",
            ),
            (
                Exit::NmiWindow,
                |v| set_proc(v, P::NMI_WINDOW_EXITING),
                "NMI-window exiting",
            ),
            (
                Exit::MonitorTrapFlag,
                |v| set_proc(v, P::MONITOR_TRAP_FLAG),
                "monitor trap flag",
            ),
            (
                Exit::TprBelowThreshold,
                |v| set_proc(v, P::USE_TPR_SHADOW),
                "use TPR shadow",
            ),
            (
                Exit::ExternalInterrupt { vector: Some(0x20) },
                |v| set_pin(v, PinBased::EXT_INTR_EXITING),
                "external-interrupt exiting",
            ),
            (
                Exit::PreemptionTimer,
                |v| set_pin(v, PinBased::PREEMPTION_TIMER),
                "preemption timer",
            ),
            (
                Exit::Wbinvd { len: 2 },
                |v| set_sec(v, S::WBINVD_EXITING),
                "WBINVD exiting",
            ),
            (
                Exit::Rdrand { info: 0, len: 3 },
                |v| set_sec(v, S::RDRAND_EXITING),
                "RDRAND exiting",
            ),
            (
                Exit::Rdseed { info: 0, len: 3 },
                |v| set_sec(v, S::RDSEED_EXITING),
                "RDSEED exiting",
            ),
            (
                Exit::GdtrIdtrAccess(crate::exit::DescriptorTableExit {
                    instruction: crate::exit::DescriptorTableInstruction::Sgdt,
                    info: InstructionInfo::decode(0).unwrap(),
                    displacement: 0,
                    len: 3,
                }),
                |v| set_sec(v, S::DESC_TABLE_EXITING),
                "descriptor-table exiting",
            ),
            (
                Exit::ApicAccess {
                    qualification: crate::exit::ApicAccessQualification::decode(0x80).unwrap(),
                },
                |v| set_sec(v, S::VIRTUALIZE_APIC_ACCESSES),
                "virtualize APIC accesses",
            ),
            (
                Exit::ApicWrite { offset: 0x80 },
                |v| set_sec(v, S::APIC_REGISTER_VIRT),
                "APIC-register virtualization",
            ),
            (
                Exit::PmlFull { qualification: 0 },
                |v| set_sec(v, S::ENABLE_PML),
                "enable PML",
            ),
            (
                Exit::BusLock,
                |v| set_sec_raw(v, SEC_BUS_LOCK_DETECTION),
                "bus-lock detection",
            ),
            (
                Exit::InstructionTimeout { qualification: 0 },
                |v| set_sec_raw(v, SEC_INSTRUCTION_TIMEOUT),
                "instruction timeout",
            ),
            (
                Exit::SppEvent { qualification: 0 },
                |v| set_sec_raw(v, SEC_SPP),
                "sub-page write permissions",
            ),
            (
                Exit::Loadiwkey { info: 0, len: 3 },
                |v| {
                    set_proc(v, P::ACTIVATE_TERTIARY);
                    v.set(VmcsField::TERTIARY_VM_EXEC_CONTROL, TERT_LOADIWKEY_EXITING);
                },
                "LOADIWKEY exiting",
            ),
            (
                exception(InterruptionType::Nmi, 2, None),
                |v| set_pin(v, PinBased::NMI_EXITING),
                "NMI exiting",
            ),
        ];
        for (exit, set, control) in table {
            let (mut v, mem) = env();
            let off = run(&exit, &v, &mem);
            assert_l0(&off, control);
            set(&mut v);
            let on = run(&exit, &v, &mem);
            assert_reflects(&on, control);
        }
    }

    #[test]
    fn test_secondary_controls_ignored_without_activate_secondary() {
        let (mut v, mem) = env();
        v.set(
            VmcsField::SECONDARY_VM_EXEC_CONTROL,
            u64::from(S::WBINVD_EXITING.bits()),
        );
        assert_l0(&run(&Exit::Wbinvd { len: 2 }, &v, &mem), "WBINVD exiting");
        set_proc(&mut v, P::ACTIVATE_SECONDARY);
        assert_reflects(&run(&Exit::Wbinvd { len: 2 }, &v, &mem), "WBINVD exiting");
    }

    #[test]
    fn test_unconditional_exits_always_reflect() {
        let (v, mem) = env();
        let i = instr();
        let exits = [
            Exit::Cpuid { len: 2 },
            Exit::Getsec { len: 2 },
            Exit::Invd { len: 2 },
            Exit::Xsetbv { len: 3 },
            Exit::Vmcall { len: 3 },
            Exit::Vmclear(i),
            Exit::Vmlaunch { len: 3 },
            Exit::Vmptrld(i),
            Exit::Vmptrst(i),
            Exit::Vmread {
                instr: i,
                field: 0x6800,
            },
            Exit::Vmresume { len: 3 },
            Exit::Vmwrite {
                instr: i,
                field: 0x6800,
            },
            Exit::Vmxoff { len: 3 },
            Exit::Vmxon(i),
            Exit::Invept(i),
            Exit::Invvpid(i),
            Exit::Vmfunc { len: 3 },
            Exit::Rsm { len: 2 },
            Exit::Seamcall { len: 4 },
            Exit::Tdcall { len: 4 },
            Exit::TaskSwitch {
                qualification: crate::exit::TaskSwitchQualification::decode(0x28),
                len: 0,
            },
            Exit::TripleFault,
            Exit::InitSignal,
            Exit::StartupIpi { vector: 0x10 },
            Exit::InvalidGuestState { qualification: 0 },
            Exit::MsrLoading { entry: 1 },
            Exit::MachineCheckDuringEntry,
        ];
        for e in exits {
            let d = run(&e, &v, &mem);
            assert!(d.reflects(), "{}: {}", e.name(), d.explanation);
        }
        assert_reflects(
            &run(&Exit::Cpuid { len: 2 }, &v, &mem),
            "CPUID exits unconditionally",
        );
    }

    #[test]
    fn test_smi_is_l0() {
        let (v, mem) = env();
        assert_l0(
            &run(&Exit::OtherSmi { qualification: 0 }, &v, &mem),
            "SMIs are L0's",
        );
    }

    #[test]
    fn test_rdtscp_needs_enable_rdtscp() {
        let (mut v, mem) = env();
        let e = Exit::Rdtscp { len: 3 };
        set_proc(&mut v, P::RDTSC_EXITING);
        assert_l0(&run(&e, &v, &mem), "injects #UD");
        set_sec(&mut v, S::ENABLE_RDTSCP);
        assert_reflects(&run(&e, &v, &mem), "RDTSC exiting");
        let (mut v, mem) = env();
        set_sec(&mut v, S::ENABLE_RDTSCP);
        assert_l0(&run(&e, &v, &mem), "TSC offset");
    }

    #[test]
    fn test_invpcid_needs_enable_invpcid_and_invlpg_exiting() {
        let (mut v, mem) = env();
        let e = Exit::Invpcid(instr());
        set_proc(&mut v, P::INVLPG_EXITING);
        assert_l0(&run(&e, &v, &mem), "#UD");
        set_sec(&mut v, S::ENABLE_INVPCID);
        assert_reflects(&run(&e, &v, &mem), "INVLPG exiting");
    }

    #[test]
    fn test_pause_reflects_for_pause_or_pause_loop_exiting() {
        let e = Exit::Pause { len: 1 };
        let (v, mem) = env();
        assert_l0(&run(&e, &v, &mem), "yields");
        let (mut v, mem) = env();
        set_proc(&mut v, P::PAUSE_EXITING);
        assert_reflects(&run(&e, &v, &mem), "\"PAUSE exiting\"");
        let (mut v, mem) = env();
        set_sec(&mut v, S::PAUSE_LOOP_EXITING);
        assert_reflects(&run(&e, &v, &mem), "PAUSE-loop exiting");
    }

    #[test]
    fn test_umwait_needs_user_wait_pause_and_rdtsc_exiting() {
        let e = Exit::Tpause { info: 0, len: 4 };
        let (mut v, mem) = env();
        set_proc(&mut v, P::RDTSC_EXITING);
        assert_l0(&run(&e, &v, &mem), "#UD");
        set_sec(&mut v, S::ENABLE_USER_WAIT_PAUSE);
        assert_reflects(&run(&e, &v, &mem), "RDTSC exiting");
    }

    #[test]
    fn test_msr_list_instructions_need_tertiary_enable() {
        let e = Exit::Rdmsrlist { len: 4 };
        let (mut v, mem) = env();
        v.set(VmcsField::TERTIARY_VM_EXEC_CONTROL, TERT_ENABLE_MSR_LIST);
        assert_l0(&run(&e, &v, &mem), "#UD");
        set_proc(&mut v, P::ACTIVATE_TERTIARY);
        assert_reflects(&run(&e, &v, &mem), "enable MSR-list instructions");
    }

    // ---- exceptions ------------------------------------------------------

    #[test]
    fn test_exception_bitmap_bit_decides() {
        let (mut v, mem) = env();
        let ud = exception(InterruptionType::HardwareException, 6, None);
        assert_l0(&run(&ud, &v, &mem), "exception bitmap bit 6 is clear");
        v.set(VmcsField::EXCEPTION_BITMAP, 1 << 6);
        assert_reflects(&run(&ud, &v, &mem), "exception bitmap bit 6 is set");
        let bp = exception(InterruptionType::SoftwareException, 3, None);
        assert_l0(&run(&bp, &v, &mem), "bit 3 is clear");
    }

    #[test]
    fn test_page_fault_error_code_mask_and_match() {
        let pf = |ec| exception(InterruptionType::HardwareException, 14, Some(ec));
        let (mut v, mem) = env();
        // bit 14 clear, mask = match = 0: never equal-mismatch -> L0.
        assert_l0(&run(&pf(2), &v, &mem), "bit 14 is clear");
        // bit 14 clear, mask 2 match 2: a read fault (ec 0) mismatches -> exits.
        v.set(VmcsField::PAGE_FAULT_ERROR_CODE_MASK, 2);
        v.set(VmcsField::PAGE_FAULT_ERROR_CODE_MATCH, 2);
        assert_reflects(&run(&pf(0), &v, &mem), "!= match");
        assert_l0(&run(&pf(2), &v, &mem), "== match");
        // bit 14 set: exits only when it matches.
        v.set(VmcsField::EXCEPTION_BITMAP, 1 << 14);
        assert_reflects(&run(&pf(3), &v, &mem), "bit 14 is set");
        assert_l0(&run(&pf(1), &v, &mem), "bit 14 is set");
    }

    proptest! {
        #[test]
        fn test_page_fault_rule_matches_reference(bit14: bool, mask: u32, mtch: u32, ec: u32) {
            let (mut v, mem) = env();
            v.set(VmcsField::EXCEPTION_BITMAP, if bit14 { 1 << 14 } else { 0 });
            v.set(VmcsField::PAGE_FAULT_ERROR_CODE_MASK, u64::from(mask));
            v.set(VmcsField::PAGE_FAULT_ERROR_CODE_MATCH, u64::from(mtch));
            let expected = if bit14 { ec & mask == mtch } else { ec & mask != mtch };
            let d = run(&exception(InterruptionType::HardwareException, 14, Some(ec)), &v, &mem);
            prop_assert_eq!(d.reflects(), expected, "{}", d.explanation);
        }
    }

    // ---- control registers -----------------------------------------------

    #[test]
    fn test_mov_to_cr0_and_cr4_compare_owned_bits_with_shadow() {
        let (mut v, mem) = env();
        v.set(VmcsField::CR0_GUEST_HOST_MASK, 0x1);
        v.set(VmcsField::CR0_READ_SHADOW, 0x1);
        assert_l0(
            &run(
                &cr(ControlReg::Cr0, CrAccessType::MovToCr, Some(0x11), 0),
                &v,
                &mem,
            ),
            "matches the read shadow",
        );
        assert_reflects(
            &run(
                &cr(ControlReg::Cr0, CrAccessType::MovToCr, Some(0x10), 0),
                &v,
                &mem,
            ),
            "changes bit(s) 0x1",
        );
        v.set(VmcsField::CR4_GUEST_HOST_MASK, 0x2000);
        assert_reflects(
            &run(
                &cr(ControlReg::Cr4, CrAccessType::MovToCr, Some(0x2000), 0),
                &v,
                &mem,
            ),
            "CR4 guest/host mask 0x2000",
        );
        assert_l0(
            &run(
                &cr(ControlReg::Cr4, CrAccessType::MovToCr, Some(0x20), 0),
                &v,
                &mem,
            ),
            "CR4",
        );
    }

    #[test]
    fn test_mov_from_cr0_never_exits() {
        let (mut v, mem) = env();
        v.set(VmcsField::CR0_GUEST_HOST_MASK, u64::MAX);
        assert_l0(
            &run(
                &cr(ControlReg::Cr0, CrAccessType::MovFromCr, None, 0),
                &v,
                &mem,
            ),
            "never exits",
        );
    }

    #[test]
    fn test_clts_exits_when_ts_owned_and_shadow_ts_set() {
        let (mut v, mem) = env();
        let clts = cr(ControlReg::Cr0, CrAccessType::Clts, None, 0);
        v.set(VmcsField::CR0_GUEST_HOST_MASK, CR0_TS);
        assert_l0(&run(&clts, &v, &mem), "read shadow TS = 0");
        v.set(VmcsField::CR0_READ_SHADOW, CR0_TS);
        assert_reflects(&run(&clts, &v, &mem), "owns CR0.TS");
    }

    #[test]
    fn test_lmsw_rules() {
        let (mut v, mem) = env();
        let lmsw = |src| cr(ControlReg::Cr0, CrAccessType::Lmsw, None, src);
        v.set(VmcsField::CR0_GUEST_HOST_MASK, 0xf);
        v.set(VmcsField::CR0_READ_SHADOW, 0x0);
        assert_reflects(&run(&lmsw(0x1), &v, &mem), "sets CR0.PE");
        assert_reflects(&run(&lmsw(0x8), &v, &mem), "changes CR0 bit(s) 0x8");
        assert_l0(&run(&lmsw(0x0), &v, &mem), "changes no CR0 bit");
        // LMSW cannot clear PE: shadow PE = 1, source PE = 0 does not exit.
        v.set(VmcsField::CR0_READ_SHADOW, 0x1);
        assert_l0(&run(&lmsw(0x0), &v, &mem), "changes no CR0 bit");
        // Bits above 3 of the source are not LMSW's.
        assert_l0(&run(&lmsw(0xfff1), &v, &mem), "changes no CR0 bit");
    }

    #[test]
    fn test_cr3_load_exiting_and_targets() {
        let (mut v, mem) = env();
        let mov = |val| cr(ControlReg::Cr3, CrAccessType::MovToCr, Some(val), 0);
        assert_l0(&run(&mov(0x5000), &v, &mem), "CR3-load exiting");
        set_proc(&mut v, P::CR3_LOAD_EXITING);
        assert_reflects(&run(&mov(0x5000), &v, &mem), "matches none of the first 0");
        v.set(VmcsField::CR3_TARGET_VALUE1, 0x5000);
        v.set(VmcsField::CR3_TARGET_COUNT, 1);
        assert_reflects(&run(&mov(0x5000), &v, &mem), "first 1");
        v.set(VmcsField::CR3_TARGET_COUNT, 2);
        assert_l0(&run(&mov(0x5000), &v, &mem), "CR3-target value 1");
    }

    #[test]
    fn test_cr3_store_and_cr8_load_store() {
        let (mut v, mem) = env();
        let st3 = cr(ControlReg::Cr3, CrAccessType::MovFromCr, None, 0);
        let ld8 = cr(ControlReg::Cr8, CrAccessType::MovToCr, Some(2), 0);
        let st8 = cr(ControlReg::Cr8, CrAccessType::MovFromCr, None, 0);
        assert_l0(&run(&st3, &v, &mem), "CR3-store exiting");
        assert_l0(&run(&ld8, &v, &mem), "CR8-load exiting");
        assert_l0(&run(&st8, &v, &mem), "CR8-store exiting");
        set_proc(&mut v, P::USE_TPR_SHADOW);
        assert_l0(&run(&ld8, &v, &mem), "virtual-APIC page");
        set_proc(
            &mut v,
            P::CR3_STORE_EXITING | P::CR8_LOAD_EXITING | P::CR8_STORE_EXITING,
        );
        assert_reflects(&run(&st3, &v, &mem), "CR3-store exiting");
        assert_reflects(&run(&ld8, &v, &mem), "CR8-load exiting");
        assert_reflects(&run(&st8, &v, &mem), "CR8-store exiting");
    }

    // ---- EPT ---------------------------------------------------------------

    #[test]
    fn test_ept_violation_without_l1_ept_is_l0() {
        let (v, mem) = env();
        let e = Exit::EptViolation {
            qualification: crate::exit::EptViolationQualification::WRITE,
            gpa: 0x9000,
            gla: None,
        };
        assert_l0(&run(&e, &v, &mem), "\"enable EPT\" is 0");
    }

    #[test]
    fn test_ept_violation_stale_l0_mapping_is_l0_else_l1() {
        let (mut v, mem) = env();
        set_sec(&mut v, S::ENABLE_EPT);
        let e = Exit::EptViolation {
            qualification: crate::exit::EptViolationQualification::READ,
            gpa: 0x9123,
            gla: None,
        };
        assert_reflects(&run(&e, &v, &mem), "L1 uses EPT");
        let mut policy = L0Policy::default();
        policy.mark_stale(0x9000);
        assert_l0(&decide(&e, &v, &mem, &policy), "stale");
        let m = Exit::EptMisconfig { gpa: 0xa000 };
        assert_reflects(&decide(&m, &v, &mem, &policy), "EPT misconfiguration");
        policy.mark_stale(0xa000);
        assert_l0(&decide(&m, &v, &mem, &policy), "stale");
    }

    // ---- VMCS shadowing, XSAVES, leaf bitmaps, EOI -------------------------

    #[test]
    fn test_vmread_with_shadowing_uses_vmread_bitmap() {
        let (mut v, mut mem) = env();
        set_sec(&mut v, S::VMCS_SHADOWING);
        let rd = |field| Exit::Vmread {
            instr: instr(),
            field,
        };
        assert_l0(
            &run(&rd(0x6800), &v, &mem),
            "VMREAD bitmap bit for field 0x6800 is clear",
        );
        set_bit(&mut mem, VMREAD_BM, 0x6800);
        assert_reflects(
            &run(&rd(0x6800), &v, &mem),
            "VMREAD bitmap bit for field 0x6800 is set",
        );
        assert_reflects(&run(&rd(0x1_0000), &v, &mem), "bits 63:15");
        let wr = Exit::Vmwrite {
            instr: instr(),
            field: 0x6800,
        };
        assert_l0(&run(&wr, &v, &mem), "VMWRITE bitmap");
        v.set(VmcsField::VMWRITE_BITMAP, 0xffff_0000);
        assert_reflects(&run(&wr, &v, &mem), "outside guest RAM");
    }

    #[test]
    fn test_xsaves_uses_xss_exiting_bitmap() {
        let (mut v, mem) = env();
        let e = Exit::Xsaves { xss: 0x100, len: 4 };
        assert_l0(&run(&e, &v, &mem), "#UD");
        set_sec(&mut v, S::ENABLE_XSAVES);
        assert_l0(&run(&e, &v, &mem), "L0 completes XSAVES");
        v.set(VmcsField::XSS_EXIT_BITMAP, 0x100);
        assert_reflects(&run(&e, &v, &mem), "share bit(s) 0x100");
    }

    #[test]
    fn test_encls_leaf_bitmap() {
        let (mut v, mem) = env();
        let e = |leaf| Exit::Encls { leaf, len: 3 };
        assert_l0(&run(&e(1), &v, &mem), "#UD");
        set_sec(&mut v, S::ENCLS_EXITING);
        v.set(VmcsField::ENCLS_EXITING_BITMAP, (1 << 1) | (1 << 63));
        assert_reflects(&run(&e(1), &v, &mem), "ENCLS_EXITING_BITMAP bit 1 is set");
        assert_l0(&run(&e(2), &v, &mem), "bit 2 is clear");
        assert_reflects(&run(&e(1000), &v, &mem), "bit 63 is set");
    }

    #[test]
    fn test_virtualized_eoi_uses_eoi_exit_bitmap() {
        let (mut v, mem) = env();
        let e = Exit::VirtualizedEoi { vector: 0x41 };
        set_sec(&mut v, S::VIRTUAL_INTR_DELIVERY);
        assert_l0(&run(&e, &v, &mem), "vector 0x41 is clear");
        v.set(VmcsField::EOI_EXIT_BITMAP1, 1 << 1);
        assert_reflects(&run(&e, &v, &mem), "vector 0x41 is set");
    }

    // ---- robustness ----------------------------------------------------------

    #[test]
    fn test_every_reason_is_decided_without_ram() {
        let mut v = Vmcs12::new();
        v.set(VmcsField::CPU_BASED_VM_EXEC_CONTROL, u64::MAX);
        v.set(VmcsField::SECONDARY_VM_EXEC_CONTROL, u64::MAX);
        v.set(VmcsField::IO_BITMAP_A, u64::MAX);
        v.set(VmcsField::MSR_BITMAP, u64::MAX);
        let mem = FlatMemory::new(0);
        let ctx = ExitContext {
            msr_index: 0x10,
            vmcs_field: 0x6800,
            ..ExitContext::default()
        };
        for &r in crate::exit::DEFINED_REASONS {
            let mut raw = ExitInfo {
                reason: u32::from(r),
                ..ExitInfo::default()
            };
            if matches!(r, 33 | 34 | 41) {
                raw.reason |= ExitInfo::REASON_ENTRY_FAILURE;
            }
            if r == 0 {
                raw.intr_info = (1 << 31) | (3 << 8) | 13;
            }
            let exit = Exit::from_info(&raw, &ctx).unwrap();
            let d = decide(&exit, &v, &mem, &L0Policy::default());
            assert!(!d.explanation.is_empty(), "reason {r}");
        }
    }

    // ----- EPT violations through L1's EPT walk --------------------------

    /// L1's EPT at 0x10000: PML4 -> PDPT 0x11000 -> PD 0x12000 -> PT
    /// 0x13000. gpa 0x9000 maps read-only (WB) to 0x5000, gpa 0xb000 has a
    /// write-without-read (misconfigured) PTE, everything else is absent.
    fn l1_ept() -> (Vmcs12, FlatMemory) {
        let mut v = Vmcs12::new();
        set_sec(&mut v, S::ENABLE_EPT);
        v.set(VmcsField::EPT_POINTER, 0x10000 | (3 << 3) | 6);
        let mut m = FlatMemory::new(0x20000);
        m.write_u64(0x10000, 0x11000 | 7).unwrap();
        m.write_u64(0x11000, 0x12000 | 7).unwrap();
        m.write_u64(0x12000, 0x13000 | 7).unwrap();
        m.write_u64(0x13000 + 8 * 9, 0x5000 | (6 << 3) | 1).unwrap();
        m.write_u64(0x13000 + 8 * 0xb, 0x6000 | (6 << 3) | 2)
            .unwrap();
        (v, m)
    }

    fn ept_decision(v: &Vmcs12, m: &FlatMemory, gpa: u64, access: AccessKind) -> EptExitDecision {
        let cx = ViolationContext {
            guest_linear_address_valid: true,
            linear_translation: true,
            nmi_unblocking: false,
        };
        decide_ept_violation(v, m, gpa, access, 0x7777, cx, EptConfig::default())
    }

    #[test]
    fn test_ept_violation_allowed_by_l1_ept_is_l0_stale_mapping() {
        let (v, m) = l1_ept();
        let d = ept_decision(&v, &m, 0x9123, AccessKind::Read);
        assert_l0(d.decision(), "stale");
        assert_eq!(
            d,
            EptExitDecision::L0StaleMapping {
                hpa: 0x5123,
                size: PageSize::Size4K,
                perms: EptPerms::READ,
                decision: d.decision().clone(),
            }
        );
    }

    #[test]
    fn test_ept_violation_refused_by_l1_ept_reflects_walk_qualification() {
        let (v, m) = l1_ept();
        // Write to the read-only page: qualification write (bit 1), entry
        // rights R (bit 3), GLA valid (7), linear translation (8).
        let d = ept_decision(&v, &m, 0x9008, AccessKind::Write);
        assert_reflects(d.decision(), "refuses");
        let EptExitDecision::Reflect { exit, .. } = d else {
            panic!("{d:?}")
        };
        assert_eq!(
            exit,
            Exit::EptViolation {
                qualification: crate::exit::EptViolationQualification::decode(
                    0b10 | 0b1000 | 1 << 7 | 1 << 8
                ),
                gpa: 0x9008,
                gla: Some(0x7777),
            }
        );
        assert_eq!(exit.to_info().qualification, 0x18a);
        // Not present: no rights at all.
        let d = ept_decision(&v, &m, 0xa000, AccessKind::Read);
        let EptExitDecision::Reflect { exit, .. } = d else {
            panic!("{d:?}")
        };
        assert_eq!(exit.to_info().qualification, 0x181);
    }

    #[test]
    fn test_ept_misconfig_in_l1_ept_reflects_exit_49() {
        let (v, m) = l1_ept();
        let d = ept_decision(&v, &m, 0xb000, AccessKind::Read);
        assert_reflects(d.decision(), "misconfigured");
        assert!(matches!(
            d,
            EptExitDecision::Reflect {
                exit: Exit::EptMisconfig { gpa: 0xb000 },
                ..
            }
        ));
        // An EPTP the walker refuses (walk length 5) is L1's misconfiguration.
        let mut bad = v.clone();
        bad.set(VmcsField::EPT_POINTER, 0x10000 | (4 << 3) | 6);
        let d = ept_decision(&bad, &m, 0x9000, AccessKind::Read);
        assert!(matches!(
            d,
            EptExitDecision::Reflect {
                exit: Exit::EptMisconfig { .. },
                ..
            }
        ));
    }

    #[test]
    fn test_ept_violation_without_l1_ept_is_l0_no_walk() {
        let (_, m) = l1_ept();
        let d = ept_decision(&Vmcs12::new(), &m, 0x9000, AccessKind::Write);
        assert!(matches!(d, EptExitDecision::NoL1Ept(_)));
        assert_l0(d.decision(), "\"enable EPT\" is 0");
    }

    proptest! {
        /// Hostile L1 EPTs (random table contents, random EPTP and gpa)
        /// never panic; a reflected exit is always reason 48 or 49 at the
        /// gpa asked about, and "stale" only when the walk allows the access.
        #[test]
        fn test_ept_violation_decision_never_panics_on_hostile_tables(
            eptp in any::<u64>(),
            gpa in prop_oneof![any::<u64>(), 0u64..0x40_0000],
            words in proptest::collection::vec((0u64..0x4000, any::<u64>()), 0..64),
            access in prop_oneof![Just(AccessKind::Read), Just(AccessKind::Write), Just(AccessKind::Fetch)],
        ) {
            let mut v = Vmcs12::new();
            set_sec(&mut v, S::ENABLE_EPT);
            v.set(VmcsField::EPT_POINTER, eptp);
            let mut m = FlatMemory::new(0x20000);
            for (slot, w) in words {
                m.write_u64(slot * 8, w).unwrap();
            }
            match ept_decision(&v, &m, gpa, access) {
                EptExitDecision::Reflect { exit, decision } => {
                    prop_assert!(decision.reflects());
                    let info = exit.to_info();
                    prop_assert!(matches!(info.reason, 48 | 49));
                    prop_assert_eq!(info.guest_physical_address, gpa);
                }
                EptExitDecision::L0StaleMapping { perms, decision, .. } => {
                    prop_assert!(!decision.reflects());
                    let need = match access {
                        AccessKind::Read => EptPerms::READ,
                        AccessKind::Write => EptPerms::WRITE,
                        AccessKind::Fetch => EptPerms::EXECUTE,
                    };
                    prop_assert!(perms.contains(need));
                }
                EptExitDecision::NoL1Ept(_) => prop_assert!(false, "EPT is enabled"),
            }
        }
    }
}
