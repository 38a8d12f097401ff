//! The nesting state and the L2 path.
//!
//! [`Nested`] owns what L0 keeps for L1's VMX: the instruction model
//! (`vmcs12::VmxCpu`, whose current vmcs12 is the truth for L1's view), the
//! virtual CR4.VMXE, the L2 vCPU (a vCPU of the second KVM VM, which is only
//! a cache of vmcs12's guest state) and the statistics.
//!
//! One reflected exit, as in Linux nested.c (see `docs/architecture.md`):
//!
//! 1. `Vcpu::run` on the L2 vCPU returns a KVM exit;
//! 2. [`Nested::observe`] turns it into a `nested_exit::Exit` (with the L2
//!    state at the instruction that caused it);
//! 3. `nested_exit::decide` says who handles it;
//! 4. `nested_exit::prepare_vmcs12` records it in vmcs12;
//! 5. `nested_exit::load_vmcs12_host_state` gives L1 its host state;
//! 6. `Vcpu::set_state` on L1's vCPU: L1 resumes at HOST_RIP.

use std::collections::BTreeMap;

use iced_x86::{Code, Decoder, DecoderOptions, Instruction};
use nested_exit::exit::{
    AddressSize, EptViolationQualification, InstructionExit, InstructionInfo, IoDirection,
    IoOperand, IoQualification, IoSize, SegmentReg,
};
use nested_exit::{
    decide, load_vmcs12_host_state, prepare_vmcs02, prepare_vmcs12, Decision, Exit, L0Policy,
    VcpuState,
};
use vmcs12::region::OFFSET_ABORT_INDICATOR;
use vmcs12::{GuestPhysMemory, Vmcs12, VmcsField, VmxCpu, VmxOutcome};

use crate::hv::{Vcpu, VmExit};
use crate::vmx_emul::{
    self, access_linear, decode_vmx, emulate_vmx, fault_vector, fetch_insn_bytes, Access, AddrBase,
    DecodeError, DecodedVmx, EmulError, ExecMode, RegOrMem, SegReg, VmxInstruction, VmxStep,
    CR4_VMXE,
};

/// Boxed error of a vCPU backend.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why the nesting path stopped (not an architectural outcome: those are
/// delivered to L1).
#[derive(Debug, thiserror::Error)]
pub enum NestedError {
    /// L1's vCPU failed.
    #[error("L1 vCPU operation failed: {0}")]
    L1Vcpu(#[source] BoxError),
    /// The L2 vCPU failed.
    #[error("L2 vCPU operation failed: {0}")]
    L2Vcpu(#[source] BoxError),
    /// The instruction trap failed (guest memory, paging).
    #[error(transparent)]
    Emul(#[from] EmulError),
    /// A VM exit could not complete: VMX abort (SDM 28.7). L1 is shut down.
    #[error("{0}; L1 is shut down (the abort indicator is in the vmcs12 region)")]
    VmxAbort(#[from] nested_exit::VmxAbort),
    /// There is no current vmcs12 where one is needed.
    #[error("L2 ran without a current vmcs12: this is an L0 bug, report it with the log")]
    NoCurrentVmcs,
    /// The start of an OUT/IN/HLT could not be found at L2's RIP.
    #[error("cannot locate the {what} instruction L2 executed before RIP {rip:#x}: {detail}")]
    InstructionNotFound {
        /// Which instruction.
        what: &'static str,
        /// L2's RIP as KVM reported it.
        rip: u64,
        /// What was found instead.
        detail: String,
    },
    /// L2 did something L0 cannot complete on this host.
    #[error("L2 exit not supported on this host: {0}")]
    Unsupported(String),
}

/// What L0 does with an access of L2 that L1 does not intercept: the L1
/// platform's devices and MSRs (implemented by `l0-vmm`'s devices).
pub trait L2Host {
    /// An OUT by L2 that reaches L1's platform (port 0xe9 prints `[L2] `).
    fn l2_io_out(&mut self, port: u16, size: u8, data: u32) -> HostAction;
    /// An IN by L2 that reaches L1's platform: the value read.
    fn l2_io_in(&mut self, port: u16, size: u8) -> u32;
    /// RDMSR by L2 that L1 does not intercept: the value, or `None` (#GP).
    fn l2_rdmsr(&mut self, index: u32) -> Option<u64>;
    /// WRMSR by L2 that L1 does not intercept: `false` raises #GP.
    fn l2_wrmsr(&mut self, index: u32, value: u64) -> bool;
}

/// What the platform wants after an L2 access.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostAction {
    /// Continue.
    Continue,
    /// End the whole run with this exit code (debug-exit port).
    Stop(i32),
}

/// A vCPU whose pending KVM completion (IN, MMIO read, RDMSR, WRMSR) can be
/// applied without running the guest. L0 needs this when it reflects such
/// an exit: the L2 vCPU must not finish the access later, over the state
/// L1 writes into vmcs12.
pub trait FlushPending: Vcpu {
    /// Applies any pending completion now (KVM: `KVM_RUN` with
    /// `immediate_exit`, which completes it and returns EINTR).
    fn flush_pending(&mut self) -> Result<(), Self::Error>;
}

impl FlushPending for crate::kvm::KvmVcpu {
    fn flush_pending(&mut self) -> Result<(), Self::Error> {
        self.set_immediate_exit(true);
        let r = self.run();
        self.set_immediate_exit(false);
        r.map(|_| ())
    }
}

/// How L1 continues after a trapped VMX instruction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmxExitOutcome {
    /// L1's state is set: run L1 again.
    Continue,
    /// The bytes are not a VMX instruction: the caller injects #UD or
    /// reports the emulation failure.
    NotVmx(DecodeError),
    /// L2 wrote the debug-exit port: end the run with this code.
    Stop(i32),
    /// A signal interrupted L2's `KVM_RUN`; call [`Nested::continue_l2`]
    /// to go on (or end the run on a timeout).
    L2Interrupted,
}

/// Who handled an L2 exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Handler {
    /// L0 handled it; L2 resumed.
    L0,
    /// Reflected to L1.
    L1,
}

/// Nesting counters for the run summary.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NestedStats {
    /// L2 exits by basic reason and handler.
    pub exits: BTreeMap<(u16, Handler), u64>,
    /// Trapped VMX instructions by kind (index = [`VmxInstruction::index`]).
    pub vmx_instructions: [u64; 13],
    /// VMX instructions that faulted (#UD/#GP/#SS/#PF injected into L1).
    pub vmx_faults: u64,
    /// VM entries into L2.
    pub l2_entries: u64,
    /// VM entries that skipped `set_state` because the L2 vCPU already held
    /// the state vmcs12 asks for.
    pub l2_state_loads_skipped: u64,
    /// VM-entry failures reflected without running L2.
    pub entry_failures: u64,
    /// OUT exits whose start had several valid decodings (the shortest was
    /// used; GUEST_RIP + length is the same for all).
    pub ambiguous_out_starts: u64,
    /// VM-exit MSR-load entries L0 could not apply (MSRs `VcpuState` does
    /// not model).
    pub unapplied_msr_loads: u64,
}

impl NestedStats {
    /// Rows `(reason, name, handled by L0, reflected to L1)` in reason order.
    pub fn exit_rows(&self) -> Vec<(u16, &'static str, u64, u64)> {
        let mut rows: BTreeMap<u16, (u64, u64)> = BTreeMap::new();
        for (&(reason, handler), &n) in &self.exits {
            let e = rows.entry(reason).or_default();
            match handler {
                Handler::L0 => e.0 += n,
                Handler::L1 => e.1 += n,
            }
        }
        rows.into_iter()
            .map(|(r, (l0, l1))| {
                let name = nested_exit::exit::reason_name(r).unwrap_or("unknown");
                (r, name, l0, l1)
            })
            .collect()
    }

    /// `(mnemonic, count)` for every VMX instruction trapped at least once.
    pub fn vmx_rows(&self) -> Vec<(&'static str, u64)> {
        VmxInstruction::ALL
            .iter()
            .map(|k| (k.name(), self.vmx_instructions[k.index()]))
            .filter(|&(_, n)| n > 0)
            .collect()
    }
}

/// An L2 exit as L0 observed it, in VMX terms.
#[derive(Debug, Clone)]
pub struct Observed {
    /// The exit in the SDM's model.
    pub exit: Exit,
    /// L2's state with RIP at the instruction that caused the exit.
    pub l2: VcpuState,
    /// KVM still owes the vCPU the completion of this access (IN, MMIO,
    /// RDMSR, WRMSR, or an OUT reported with RIP at it): it is flushed
    /// before the exit is reflected. An OUT reported with RIP after it (this
    /// host) is complete already and costs no extra `KVM_RUN`.
    pub kvm_pending: bool,
}

/// What the L2 loop does with one exit.
enum L2Step {
    Resume,
    Reflect(Box<Observed>),
    Stop(i32),
    Interrupted,
}

/// The nesting state of one L1 vCPU.
pub struct Nested<V: FlushPending> {
    cpu: VmxCpu,
    /// Virtual CR4.VMXE (KVM refuses the real bit on this host).
    vmxe: bool,
    l2: V,
    /// What the L2 vCPU holds (after the last set_state or exit), if known.
    l2_cached: Option<VcpuState>,
    /// L1's state at the last VMLAUNCH/VMRESUME (the base for host state).
    l1_at_entry: VcpuState,
    policy: L0Policy,
    stats: NestedStats,
    last_decision: Option<(&'static str, Decision)>,
}

impl<V: FlushPending> std::fmt::Debug for Nested<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nested")
            .field("vmxe", &self.vmxe)
            .field("vmx_operation", &self.cpu.vmx_operation())
            .field("current_vmcs_pointer", &self.cpu.current_vmcs_pointer())
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

fn l1_err<E: std::error::Error + Send + Sync + 'static>(e: E) -> NestedError {
    NestedError::L1Vcpu(Box::new(e))
}

fn l2_err<E: std::error::Error + Send + Sync + 'static>(e: E) -> NestedError {
    NestedError::L2Vcpu(Box::new(e))
}

impl<V: FlushPending> Nested<V> {
    /// Nesting for one L1 vCPU with the VMX model `cpu` and the L2 vCPU `l2`
    /// (a vCPU of the L2 KVM VM, whose every RDMSR/WRMSR exits to L0).
    pub fn new(cpu: VmxCpu, l2: V) -> Self {
        Self {
            cpu,
            vmxe: false,
            l2,
            l2_cached: None,
            l1_at_entry: VcpuState::default(),
            policy: L0Policy::default(),
            stats: NestedStats::default(),
            last_decision: None,
        }
    }

    /// The VMX model.
    pub fn cpu(&self) -> &VmxCpu {
        &self.cpu
    }

    /// The current vmcs12 (for the error dump), if any.
    pub fn current_vmcs12(&self) -> Option<&Vmcs12> {
        self.cpu.current_vmcs()
    }

    /// The virtual CR4.VMXE.
    pub fn vmxe(&self) -> bool {
        self.vmxe
    }

    /// CR4 as L1 sees it: the hardware value with the virtual VMXE.
    pub fn l1_visible_cr4(&self, hw_cr4: u64) -> u64 {
        if self.vmxe {
            hw_cr4 | CR4_VMXE
        } else {
            hw_cr4
        }
    }

    /// Counters.
    pub fn stats(&self) -> &NestedStats {
        &self.stats
    }

    /// The last decision taken on an L2 exit (exit name, decision).
    pub fn last_decision(&self) -> Option<&(&'static str, Decision)> {
        self.last_decision.as_ref()
    }

    /// Handles L1's trapped VMX instruction (`insn_bytes` from the KVM
    /// emulation failure, or empty to fetch them at L1's RIP). Runs L2 when
    /// the instruction is a successful VMLAUNCH/VMRESUME, until an exit is
    /// reflected. On return L1's vCPU holds the state to continue with.
    pub fn handle_vmx_exit<L1: Vcpu>(
        &mut self,
        l1: &mut L1,
        insn_bytes: &[u8],
        mem: &mut dyn GuestPhysMemory,
        host: &mut dyn L2Host,
    ) -> Result<VmxExitOutcome, NestedError> {
        let mut state = l1.get_state().map_err(l1_err)?;
        let fetched;
        let bytes = if insn_bytes.is_empty() {
            match fetch_insn_bytes(&state, mem)? {
                Ok(b) => {
                    fetched = b;
                    &fetched[..]
                }
                Err(fault) => {
                    self.inject_l1(l1, &mut state, fault)?;
                    return Ok(VmxExitOutcome::Continue);
                }
            }
        } else {
            insn_bytes
        };
        let mode = ExecMode::of(&state);
        let kind = match decode_vmx(bytes, mode, state.rip) {
            Ok(d) => d.kind,
            Err(e) => return Ok(VmxExitOutcome::NotVmx(e)),
        };
        // Virtual CR4.VMXE: L1 cannot set the real bit here (KVM #GPs it),
        // so a VMXON is taken as "VMXE was set" (docs/architecture.md).
        if kind == VmxInstruction::Vmxon {
            self.vmxe = true;
        }
        self.stats.vmx_instructions[kind.index()] += 1;
        let step = emulate_vmx(&mut state, bytes, self.vmxe, &mut self.cpu, mem)?;
        tracing::debug!(?step, rip = state.rip, "L1 VMX instruction");
        match step {
            VmxStep::Completed { kind, outcome } => {
                if kind == VmxInstruction::Vmxoff && outcome == VmxOutcome::Succeed {
                    self.vmxe = false;
                }
                l1.set_state(&state).map_err(l1_err)?;
                Ok(VmxExitOutcome::Continue)
            }
            VmxStep::Fault { fault, .. } => {
                self.inject_l1(l1, &mut state, fault)?;
                Ok(VmxExitOutcome::Continue)
            }
            VmxStep::EntryFailure {
                basic_reason,
                qualification,
                ..
            } => {
                self.l1_at_entry = state;
                let exit = entry_failure_exit(basic_reason, qualification)?;
                self.stats.entry_failures += 1;
                let observed = Observed {
                    exit,
                    l2: state,
                    kvm_pending: false,
                };
                self.reflect(l1, observed, mem)?;
                Ok(VmxExitOutcome::Continue)
            }
            VmxStep::EnterL2 { .. } => {
                self.l1_at_entry = state;
                self.enter_l2(l1, mem, host)
            }
        }
    }

    fn inject_l1<L1: Vcpu>(
        &mut self,
        l1: &mut L1,
        state: &mut VcpuState,
        fault: vmcs12::VmxFault,
    ) -> Result<(), NestedError> {
        self.stats.vmx_faults += 1;
        let (vector, error_code, cr2) = fault_vector(fault);
        if let Some(cr2) = cr2 {
            state.cr2 = cr2;
            l1.set_state(state).map_err(l1_err)?;
        }
        l1.inject_exception(vector, error_code).map_err(l1_err)
    }

    /// VM entry: vmcs12 -> L2 vCPU (prepare_vmcs02), then run L2.
    fn enter_l2<L1: Vcpu>(
        &mut self,
        l1: &mut L1,
        mem: &mut dyn GuestPhysMemory,
        host: &mut dyn L2Host,
    ) -> Result<VmxExitOutcome, NestedError> {
        let l1_state = self.l1_at_entry;
        let vmcs12 = self.cpu.current_vmcs().ok_or(NestedError::NoCurrentVmcs)?;
        let vmcs02 = match prepare_vmcs02(vmcs12, &l1_state, &*mem, &l1_state, self.cpu.caps()) {
            Ok(v) => v,
            Err(failure) => {
                // SDM 27.8: a failure while loading guest state (PDPTEs,
                // MSR-load area) is a VM exit with bit 31 set.
                let info = failure.exit_info();
                let exit = entry_failure_exit(info.basic_reason(), info.qualification)?;
                self.stats.entry_failures += 1;
                let observed = Observed {
                    exit,
                    l2: l1_state,
                    kvm_pending: false,
                };
                self.reflect(l1, observed, mem)?;
                return Ok(VmxExitOutcome::Continue);
            }
        };
        let mut l2 = vmcs02.l2;
        // Virtual VMXE: GUEST_CR4 carries VMXE (CR4_FIXED0); KVM refuses it.
        l2.cr4 &= !CR4_VMXE;
        self.stats.l2_entries += 1;
        if self.l2_cached.as_ref() == Some(&l2) {
            self.stats.l2_state_loads_skipped += 1;
        } else {
            self.l2.set_state(&l2).map_err(l2_err)?;
            self.l2_cached = Some(l2);
        }
        self.continue_l2(l1, mem, host)
    }

    /// Runs L2 until an exit is reflected to L1 (L1's state is then set),
    /// the platform asks to stop, or a signal interrupts it.
    pub fn continue_l2<L1: Vcpu>(
        &mut self,
        l1: &mut L1,
        mem: &mut dyn GuestPhysMemory,
        host: &mut dyn L2Host,
    ) -> Result<VmxExitOutcome, NestedError> {
        loop {
            let exit = self.l2.run().map_err(l2_err)?;
            match self.handle_l2_exit(exit, mem, host)? {
                L2Step::Resume => {}
                L2Step::Stop(code) => return Ok(VmxExitOutcome::Stop(code)),
                L2Step::Interrupted => return Ok(VmxExitOutcome::L2Interrupted),
                L2Step::Reflect(observed) => {
                    self.reflect(l1, *observed, mem)?;
                    return Ok(VmxExitOutcome::Continue);
                }
            }
        }
    }

    /// One L2 exit: observe it, decide, and handle it in L0 or hand it back
    /// for reflection.
    fn handle_l2_exit(
        &mut self,
        exit: VmExit,
        mem: &mut dyn GuestPhysMemory,
        host: &mut dyn L2Host,
    ) -> Result<L2Step, NestedError> {
        if exit == VmExit::Interrupted {
            return Ok(L2Step::Interrupted);
        }
        let observed = self.observe(&exit, mem)?;
        let vmcs12 = self.cpu.current_vmcs().ok_or(NestedError::NoCurrentVmcs)?;
        let decision = decide(&observed.exit, vmcs12, &*mem, &self.policy);
        let reason = observed.exit.basic_reason();
        let handler = if decision.reflects() {
            Handler::L1
        } else {
            Handler::L0
        };
        *self.stats.exits.entry((reason, handler)).or_default() += 1;
        tracing::debug!(
            exit = observed.exit.name(),
            rip = observed.l2.rip,
            ?handler,
            why = %decision.explanation,
            "L2 exit"
        );
        let reflects = decision.reflects();
        self.last_decision = Some((observed.exit.name(), decision));
        if reflects {
            // The L2 vCPU must not complete the access later, over what L1
            // writes into vmcs12: finish it now with a neutral answer.
            match exit {
                VmExit::IoIn { .. } => self.l2.complete_io_in(0),
                VmExit::MmioRead { len, .. } => {
                    self.l2.complete_mmio_read(&vec![0xff; usize::from(len)])
                }
                VmExit::RdMsr { .. } => self.l2.complete_rdmsr(Some(0)),
                VmExit::WrMsr { .. } => self.l2.complete_wrmsr(true),
                _ => {}
            }
            if observed.kvm_pending {
                self.l2.flush_pending().map_err(l2_err)?;
            }
            // The vCPU no longer holds a state L0 knows exactly.
            self.l2_cached = None;
            return Ok(L2Step::Reflect(Box::new(observed)));
        }
        self.handle_in_l0(exit, &observed, host)
    }

    /// L0 completes an exit L1 did not ask for.
    fn handle_in_l0(
        &mut self,
        exit: VmExit,
        observed: &Observed,
        host: &mut dyn L2Host,
    ) -> Result<L2Step, NestedError> {
        self.l2_cached = None;
        match exit {
            VmExit::IoOut { port, size, data } => {
                // KVM already completed the OUT (RIP is past it).
                match host.l2_io_out(port, size, data) {
                    HostAction::Continue => Ok(L2Step::Resume),
                    HostAction::Stop(code) => Ok(L2Step::Stop(code)),
                }
            }
            VmExit::IoIn { port, size } => {
                let v = host.l2_io_in(port, size);
                self.l2.complete_io_in(v);
                Ok(L2Step::Resume)
            }
            VmExit::RdMsr { index } => {
                let v = host.l2_rdmsr(index);
                self.l2.complete_rdmsr(v);
                Ok(L2Step::Resume)
            }
            VmExit::WrMsr { index, data } => {
                let ok = host.l2_wrmsr(index, data);
                self.l2.complete_wrmsr(ok);
                Ok(L2Step::Resume)
            }
            // No EPT in vmcs12: L2's physical space is L1's; there is no
            // device behind this address, so reads return all ones and
            // writes are dropped (as on a bus with nothing there).
            VmExit::MmioRead { len, .. } => {
                self.l2.complete_mmio_read(&vec![0xff; usize::from(len)]);
                Ok(L2Step::Resume)
            }
            VmExit::MmioWrite { .. } => Ok(L2Step::Resume),
            other => Err(NestedError::Unsupported(format!(
                "{} ({other:?}) is L0's to handle by the decision \"{}\", but L0 cannot complete it for L2 here",
                observed.exit.name(),
                self.last_decision
                    .as_ref()
                    .map_or("", |(_, d)| d.explanation.as_str())
            ))),
        }
    }

    /// Turns a KVM exit of the L2 vCPU into the VMX exit a CPU would have
    /// produced, with L2's state at the instruction that caused it.
    pub fn observe(
        &mut self,
        exit: &VmExit,
        mem: &mut dyn GuestPhysMemory,
    ) -> Result<Observed, NestedError> {
        let mut l2 = self.l2.get_state().map_err(l2_err)?;
        let reported_rip = l2.rip;
        let exit_kvm = exit;
        let exit = match *exit {
            VmExit::IoOut { port, size, .. } => {
                // KVM reports OUT with RIP after the instruction.
                let (io, start, ambiguous) = find_out_start(&l2, port, size, mem)?;
                if ambiguous {
                    self.stats.ambiguous_out_starts += 1;
                    tracing::warn!(
                        port,
                        rip = l2.rip,
                        "several OUT encodings end at L2's RIP; reporting the shortest"
                    );
                }
                l2.rip = start.start;
                Exit::Io {
                    io,
                    len: u32::from(start.len),
                }
            }
            VmExit::IoIn { port, size } => {
                let (io, len) = decode_in_at_rip(&l2, port, size, mem)?;
                Exit::Io {
                    io,
                    len: u32::from(len),
                }
            }
            VmExit::Hlt => {
                l2.rip = find_hlt_start(&l2, mem)?;
                l2.activity = 0;
                Exit::Hlt { len: 1 }
            }
            VmExit::RdMsr { index } => Exit::Rdmsr { msr: index, len: 2 },
            VmExit::WrMsr { index, .. } => Exit::Wrmsr { msr: index, len: 2 },
            VmExit::MmioRead { gpa, .. } => Exit::EptViolation {
                qualification: EptViolationQualification::READ,
                gpa,
                gla: None,
            },
            VmExit::MmioWrite { gpa, .. } => Exit::EptViolation {
                qualification: EptViolationQualification::WRITE,
                gpa,
                gla: None,
            },
            VmExit::Shutdown => Exit::TripleFault,
            VmExit::FailEntry { reason } => {
                tracing::warn!(
                    reason,
                    "KVM refused to enter L2: reported as invalid guest state"
                );
                Exit::InvalidGuestState { qualification: 0 }
            }
            VmExit::EmulationFailure { ref insn_bytes } => l2_emulation_exit(&l2, insn_bytes, mem)?,
            ref other => {
                return Err(NestedError::Unsupported(format!(
                    "KVM exit {other:?} of the L2 vCPU has no VMX counterpart in this L0"
                )))
            }
        };
        let kvm_pending = match *exit_kvm {
            VmExit::IoOut { .. } => l2.rip == reported_rip,
            VmExit::IoIn { .. }
            | VmExit::MmioRead { .. }
            | VmExit::MmioWrite { .. }
            | VmExit::RdMsr { .. }
            | VmExit::WrMsr { .. } => true,
            _ => false,
        };
        Ok(Observed {
            exit,
            l2,
            kvm_pending,
        })
    }

    /// Reflects an exit to L1: prepare_vmcs12, load_vmcs12_host_state,
    /// then L1's vCPU gets the state and resumes at HOST_RIP.
    fn reflect<L1: Vcpu>(
        &mut self,
        l1: &mut L1,
        observed: Observed,
        mem: &mut dyn GuestPhysMemory,
    ) -> Result<(), NestedError> {
        let info = observed.exit.to_info();
        let entry_failure = observed.exit.is_entry_failure();
        let caps = self.cpu.caps().clone();
        let pointer = self.cpu.current_vmcs_pointer();
        let vmcs12 = self
            .cpu
            .current_vmcs_mut()
            .ok_or(NestedError::NoCurrentVmcs)?;
        // Virtual VMXE: L2 ran without it; vmcs12 keeps L1's value.
        let mut l2 = observed.l2;
        l2.cr4 |= vmcs12.get(VmcsField::GUEST_CR4) & CR4_VMXE;
        let abort = |e: nested_exit::VmxAbort, mem: &mut dyn GuestPhysMemory| {
            // SDM 28.7: the indicator goes to bytes 4-7 of the VMCS region.
            let _ = mem.write_u32(pointer.wrapping_add(OFFSET_ABORT_INDICATOR), e.indicator());
            NestedError::VmxAbort(e)
        };
        if let Err(e) = prepare_vmcs12(vmcs12, &l2, &info, 0, &l2, mem) {
            return Err(abort(e, mem));
        }
        // The CPU's state at the exit is L2's (GPRs, CR2, DR0-3, DR6 and the
        // MSRs the exit does not load stay as L2 left them); after an entry
        // failure it is still L1's.
        let mut state = if entry_failure { self.l1_at_entry } else { l2 };
        let msrs = state;
        let loads = match load_vmcs12_host_state(vmcs12, &mut state, &*mem, &msrs, &caps) {
            Ok(l) => l,
            Err(e) => return Err(abort(e, mem)),
        };
        let unapplied = loads.iter().filter(|m| msrs.msr(m.index).is_none()).count();
        self.stats.unapplied_msr_loads += unapplied as u64;
        state.cr4 &= !CR4_VMXE;
        l1.set_state(&state).map_err(l1_err)
    }
}

/// An entry-failure exit (bit 31): 33 invalid guest state, 34 MSR loading,
/// 41 machine check.
fn entry_failure_exit(basic_reason: u16, qualification: u64) -> Result<Exit, NestedError> {
    match basic_reason {
        33 => Ok(Exit::InvalidGuestState { qualification }),
        34 => Ok(Exit::MsrLoading {
            entry: qualification,
        }),
        41 => Ok(Exit::MachineCheckDuringEntry),
        r => Err(NestedError::Unsupported(format!(
            "VM-entry failure with basic reason {r} is not defined by the SDM"
        ))),
    }
}

/// A decoded I/O instruction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoStart {
    /// Linear RIP of its first byte (as RIP, without the CS base).
    pub start: u64,
    /// Length.
    pub len: u8,
}

fn mode_mask(mode: ExecMode) -> u64 {
    match mode.bitness() {
        64 => u64::MAX,
        32 => 0xffff_ffff,
        _ => 0xffff,
    }
}

fn cs_linear(state: &VcpuState, rip: u64) -> u64 {
    if ExecMode::of(state) == ExecMode::Long64 {
        rip
    } else {
        state.cs.base.wrapping_add(rip) & 0xffff_ffff
    }
}

/// Reads `n` code bytes at `rip` through the vCPU's paging; `None` if they
/// do not translate or lie outside RAM.
fn read_code(
    state: &VcpuState,
    mem: &mut dyn GuestPhysMemory,
    rip: u64,
    n: usize,
) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; n];
    match access_linear(state, mem, cs_linear(state, rip), &mut buf, Access::Fetch) {
        Ok(Ok(())) => Some(buf),
        _ => None,
    }
}

fn decode_one(bytes: &[u8], mode: ExecMode, rip: u64) -> Option<Instruction> {
    let mut d = Decoder::try_with_ip(mode.bitness(), bytes, rip, DecoderOptions::NONE).ok()?;
    let insn = d.decode();
    (!insn.is_invalid()).then_some(insn)
}

/// The I/O qualification of `insn` if it is an IN/OUT (`out`) of `size`
/// bytes to `port` given the vCPU's DX (SDM Table 28-5).
fn io_qualification(
    insn: &Instruction,
    state: &VcpuState,
    out: bool,
    port: u16,
    size: u8,
) -> Option<IoQualification> {
    use Code::*;
    let (is_out, bytes, imm, string) = match insn.code() {
        Out_imm8_AL => (true, 1, true, false),
        Out_imm8_AX => (true, 2, true, false),
        Out_imm8_EAX => (true, 4, true, false),
        Out_DX_AL => (true, 1, false, false),
        Out_DX_AX => (true, 2, false, false),
        Out_DX_EAX => (true, 4, false, false),
        Outsb_DX_m8 => (true, 1, false, true),
        Outsw_DX_m16 => (true, 2, false, true),
        Outsd_DX_m32 => (true, 4, false, true),
        In_AL_imm8 => (false, 1, true, false),
        In_AX_imm8 => (false, 2, true, false),
        In_EAX_imm8 => (false, 4, true, false),
        In_AL_DX => (false, 1, false, false),
        In_AX_DX => (false, 2, false, false),
        In_EAX_DX => (false, 4, false, false),
        Insb_m8_DX => (false, 1, false, true),
        Insw_m16_DX => (false, 2, false, true),
        Insd_m32_DX => (false, 4, false, true),
        _ => return None,
    };
    let insn_port = if imm {
        u16::from(insn.immediate8())
    } else {
        state.gprs.get(2) as u16
    };
    if is_out != out || bytes != size || insn_port != port {
        return None;
    }
    Some(IoQualification {
        size: match size {
            1 => IoSize::One,
            2 => IoSize::Two,
            _ => IoSize::Four,
        },
        direction: if out {
            IoDirection::Out
        } else {
            IoDirection::In
        },
        string,
        rep: string && insn.has_rep_prefix(),
        operand: if imm {
            IoOperand::Immediate
        } else {
            IoOperand::Dx
        },
        port,
    })
}

/// Finds the OUT that ends at L2's RIP (this KVM reports RIP after it;
/// an OUT starting at RIP, as stock KVM reports it, is the fallback): every
/// start 1 to 15 bytes back whose decoding is an OUT of `size` bytes to
/// `port` exactly `k` bytes long. Several matches differ only in prefixes
/// (e.g. an immediate byte 0x48 before `EE` decodes as REX): the shortest
/// is taken and the ambiguity reported (GUEST_RIP + length is the same).
pub fn find_out_start(
    state: &VcpuState,
    port: u16,
    size: u8,
    mem: &mut dyn GuestPhysMemory,
) -> Result<(IoQualification, IoStart, bool), NestedError> {
    let mode = ExecMode::of(state);
    let mask = mode_mask(mode);
    let mut found: Option<(IoQualification, IoStart)> = None;
    let mut ambiguous = false;
    for k in 1u8..=15 {
        let start = state.rip.wrapping_sub(u64::from(k)) & mask;
        let Some(bytes) = read_code(state, mem, start, usize::from(k)) else {
            continue;
        };
        let Some(insn) = decode_one(&bytes, mode, start) else {
            continue;
        };
        if insn.len() != usize::from(k) {
            continue;
        }
        if let Some(io) = io_qualification(&insn, state, true, port, size) {
            if found.is_some() {
                ambiguous = true;
            } else {
                found = Some((io, IoStart { start, len: k }));
            }
        }
    }
    if let Some((io, start)) = found {
        return Ok((io, start, ambiguous));
    }
    // Stock KVM (kvm_intel) exits with RIP still at the OUT and skips it on
    // the next KVM_RUN: accept an OUT that starts at RIP as well.
    if let Some(bytes) = read_code(state, mem, state.rip, 15).or_else(|| {
        let room = 0x1000 - (cs_linear(state, state.rip) & 0xfff) as usize;
        read_code(state, mem, state.rip, room.min(15))
    }) {
        if let Some(insn) = decode_one(&bytes, mode, state.rip) {
            if let Some(io) = io_qualification(&insn, state, true, port, size) {
                let len = insn.len() as u8;
                return Ok((
                    io,
                    IoStart {
                        start: state.rip,
                        len,
                    },
                    false,
                ));
            }
        }
    }
    Err(NestedError::InstructionNotFound {
        what: "OUT",
        rip: state.rip,
        detail: format!(
            "no OUT of {size} byte(s) to port {port:#x} ends there or starts there (L2 code changed, or not readable)"
        ),
    })
}

/// Decodes the IN at L2's RIP (KVM reports IN with RIP at it) and checks it
/// against the port and size KVM reported.
fn decode_in_at_rip(
    state: &VcpuState,
    port: u16,
    size: u8,
    mem: &mut dyn GuestPhysMemory,
) -> Result<(IoQualification, u8), NestedError> {
    let mode = ExecMode::of(state);
    let not_found = |detail: String| NestedError::InstructionNotFound {
        what: "IN",
        rip: state.rip,
        detail,
    };
    let bytes = read_code(state, mem, state.rip, 15)
        .or_else(|| {
            // The instruction may end right before an unreadable page.
            let room = 0x1000 - (cs_linear(state, state.rip) & 0xfff) as usize;
            read_code(state, mem, state.rip, room.min(15))
        })
        .ok_or_else(|| not_found("the code is not readable".into()))?;
    let insn = decode_one(&bytes, mode, state.rip)
        .ok_or_else(|| not_found(format!("bytes {bytes:02x?} do not decode")))?;
    let io = io_qualification(&insn, state, false, port, size).ok_or_else(|| {
        not_found(format!(
            "`{insn}` is not an IN of {size} byte(s) from port {port:#x}"
        ))
    })?;
    Ok((io, insn.len() as u8))
}

/// KVM reports HLT with RIP after it (it skips the instruction before it
/// exits); accept RIP - 1 when that byte is HLT (0xF4), else RIP itself.
fn find_hlt_start(state: &VcpuState, mem: &mut dyn GuestPhysMemory) -> Result<u64, NestedError> {
    let mask = mode_mask(ExecMode::of(state));
    let before = state.rip.wrapping_sub(1) & mask;
    for rip in [before, state.rip] {
        if read_code(state, mem, rip, 1).as_deref() == Some(&[0xf4]) {
            return Ok(rip);
        }
    }
    Err(NestedError::InstructionNotFound {
        what: "HLT",
        rip: state.rip,
        detail: "neither RIP - 1 nor RIP holds 0xF4".into(),
    })
}

/// The VM-exit instruction information of a VMX instruction executed by L2
/// (SDM 28.2.5, Tables 28-13 and 28-14).
fn instruction_exit(d: &DecodedVmx, state: &VcpuState) -> InstructionExit {
    let mut info = InstructionInfo {
        scaling: 0,
        reg1: 0,
        address_size: AddressSize::Bits64,
        register_operand: false,
        operand_size_32: false,
        segment: SegmentReg::Ds,
        index: None,
        base: None,
        reg2: d.reg.unwrap_or(0),
    };
    let mut displacement = 0;
    match d.rm {
        Some(RegOrMem::Reg(r)) => {
            info.register_operand = true;
            info.reg1 = r;
        }
        Some(RegOrMem::Mem(m)) => {
            info.scaling = m.scale.trailing_zeros() as u8;
            info.address_size = match m.address_size {
                16 => AddressSize::Bits16,
                32 => AddressSize::Bits32,
                _ => AddressSize::Bits64,
            };
            info.segment = match m.segment {
                SegReg::Es => SegmentReg::Es,
                SegReg::Cs => SegmentReg::Cs,
                SegReg::Ss => SegmentReg::Ss,
                SegReg::Ds => SegmentReg::Ds,
                SegReg::Fs => SegmentReg::Fs,
                SegReg::Gs => SegmentReg::Gs,
            };
            info.index = m.index;
            displacement = match m.base {
                AddrBase::Gpr(b) => {
                    info.base = Some(b);
                    m.displacement
                }
                AddrBase::None => m.displacement,
                // RIP-relative: the qualification is the displacement from
                // the next instruction.
                AddrBase::Rip => m
                    .displacement
                    .wrapping_sub(state.rip.wrapping_add(u64::from(d.len))),
            };
        }
        None => {}
    }
    InstructionExit {
        info,
        displacement,
        len: u32::from(d.len),
    }
}

/// An emulation failure of the L2 vCPU: a VMX instruction (reflected as its
/// exit reason, SDM 26.1.2: unconditional) or a fetch from memory with
/// nothing behind it (an EPT-violation-like exit).
fn l2_emulation_exit(
    state: &VcpuState,
    insn_bytes: &[u8],
    mem: &mut dyn GuestPhysMemory,
) -> Result<Exit, NestedError> {
    let mode = ExecMode::of(state);
    let bytes = if insn_bytes.is_empty() {
        match vmx_emul::fetch_insn_bytes(state, mem) {
            Ok(Ok(b)) => b,
            _ => Vec::new(),
        }
    } else {
        insn_bytes.to_vec()
    };
    if bytes.is_empty() {
        // KVM could not fetch at RIP: a fetch from unbacked memory.
        let linear = cs_linear(state, state.rip);
        let paging = nested_exit::walk::PagingState::from_vcpu(state);
        let gpa = nested_exit::walk::translate(
            &paging,
            linear,
            nested_exit::walk::Access::fetch(),
            &*mem,
        )
        .map(|t| t.gpa)
        .unwrap_or(linear);
        return Ok(Exit::EptViolation {
            qualification: EptViolationQualification::FETCH
                | EptViolationQualification::GLA_VALID
                | EptViolationQualification::TRANSLATED_ACCESS,
            gpa,
            gla: Some(linear),
        });
    }
    let d = decode_vmx(&bytes, mode, state.rip).map_err(|e| {
        NestedError::Unsupported(format!("L2 emulation failure at RIP {:#x}: {e}", state.rip))
    })?;
    let len = u32::from(d.len);
    let field = d.reg.map_or(0, |r| state.gprs.get(r))
        & if d.operand_size == 64 {
            u64::MAX
        } else {
            0xffff_ffff
        };
    let ie = instruction_exit(&d, state);
    Ok(match d.kind {
        VmxInstruction::Vmxon => Exit::Vmxon(ie),
        VmxInstruction::Vmclear => Exit::Vmclear(ie),
        VmxInstruction::Vmptrld => Exit::Vmptrld(ie),
        VmxInstruction::Vmptrst => Exit::Vmptrst(ie),
        VmxInstruction::Vmread => Exit::Vmread { instr: ie, field },
        VmxInstruction::Vmwrite => Exit::Vmwrite { instr: ie, field },
        VmxInstruction::Invept => Exit::Invept(ie),
        VmxInstruction::Invvpid => Exit::Invvpid(ie),
        VmxInstruction::Vmlaunch => Exit::Vmlaunch { len },
        VmxInstruction::Vmresume => Exit::Vmresume { len },
        VmxInstruction::Vmxoff => Exit::Vmxoff { len },
        VmxInstruction::Vmcall => Exit::Vmcall { len },
        VmxInstruction::Vmfunc => Exit::Vmfunc { len },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;
    use vmcs12::caps::msr;
    use vmcs12::controls::{EntryControls, ExitControls, PinBased, PrimaryProcBased};
    use vmcs12::{FlatMemory, VmxCapabilities, VMCS_REVISION_ID};

    type F = VmcsField;

    #[derive(Debug, thiserror::Error)]
    #[error("fake vCPU: {0}")]
    struct FakeError(String);

    type Effect = Box<dyn FnMut(&mut VcpuState)>;

    /// A scripted vCPU: each `run()` applies the next effect to the state
    /// and returns the next exit; everything else is recorded.
    struct Fake {
        state: VcpuState,
        script: VecDeque<(VmExit, Effect)>,
        sets: Vec<VcpuState>,
        runs: usize,
        injected: Vec<(u8, Option<u32>)>,
        completions: Vec<String>,
        flushes: usize,
    }

    impl Fake {
        fn new(state: VcpuState) -> Self {
            Self {
                state,
                script: VecDeque::new(),
                sets: Vec::new(),
                runs: 0,
                injected: Vec::new(),
                completions: Vec::new(),
                flushes: 0,
            }
        }

        fn then(&mut self, exit: VmExit, effect: impl FnMut(&mut VcpuState) + 'static) {
            self.script.push_back((exit, Box::new(effect)));
        }
    }

    impl Vcpu for Fake {
        type Error = FakeError;
        fn run(&mut self) -> Result<VmExit, FakeError> {
            self.runs += 1;
            let (exit, mut effect) = self
                .script
                .pop_front()
                .ok_or_else(|| FakeError("script ended".into()))?;
            effect(&mut self.state);
            Ok(exit)
        }
        fn get_state(&mut self) -> Result<VcpuState, FakeError> {
            Ok(self.state)
        }
        fn set_state(&mut self, state: &VcpuState) -> Result<(), FakeError> {
            self.state = *state;
            self.sets.push(*state);
            Ok(())
        }
        fn complete_io_in(&mut self, data: u32) {
            self.completions.push(format!("in {data:#x}"));
        }
        fn complete_mmio_read(&mut self, data: &[u8]) {
            self.completions.push(format!("mmio {data:02x?}"));
        }
        fn complete_rdmsr(&mut self, value: Option<u64>) {
            self.completions.push(format!("rdmsr {value:x?}"));
        }
        fn complete_wrmsr(&mut self, ok: bool) {
            self.completions.push(format!("wrmsr {ok}"));
        }
        fn inject_exception(
            &mut self,
            vector: u8,
            error_code: Option<u32>,
        ) -> Result<(), FakeError> {
            self.injected.push((vector, error_code));
            Ok(())
        }
        fn counters(&self) -> crate::hv::IoctlCounters {
            crate::hv::IoctlCounters::default()
        }
    }

    impl FlushPending for Fake {
        fn flush_pending(&mut self) -> Result<(), FakeError> {
            self.flushes += 1;
            Ok(())
        }
    }

    #[derive(Default)]
    struct Host {
        out: Vec<(u16, u32)>,
        rdmsr: Vec<u32>,
    }

    impl L2Host for Host {
        fn l2_io_out(&mut self, port: u16, _size: u8, data: u32) -> HostAction {
            self.out.push((port, data));
            if port == 0xf4 {
                HostAction::Stop(((data << 1) | 1) as i32)
            } else {
                HostAction::Continue
            }
        }
        fn l2_io_in(&mut self, _port: u16, _size: u8) -> u32 {
            0x60
        }
        fn l2_rdmsr(&mut self, index: u32) -> Option<u64> {
            self.rdmsr.push(index);
            Some(0x1234)
        }
        fn l2_wrmsr(&mut self, _index: u32, _value: u64) -> bool {
            true
        }
    }

    const PML4: u64 = 0x1000;
    const VMXON_REGION: u64 = 0x10000;
    const VMCS_REGION: u64 = 0x11000;
    const PTRS: u64 = 0x12000;
    const IO_A: u64 = 0x8000;
    const IO_B: u64 = 0x9000;
    const MSR_BITMAP: u64 = 0xa000;
    const HOST_RIP: u64 = 0x3_0000;
    const HOST_RSP: u64 = 0x8_0000;
    const L2_RIP: u64 = 0x10_0000;
    const EFER_64: u64 = 0xd00;
    const CR4_PAE: u64 = 1 << 5;

    /// 4 MiB of RAM identity-mapped with 2 MiB pages.
    fn memory() -> FlatMemory {
        let mut mem = FlatMemory::new(0x40_0000);
        mem.write_u64(PML4, 0x2000 | 3).unwrap();
        mem.write_u64(0x2000, 0x3000 | 3).unwrap();
        mem.write_u64(0x3000, 0x83).unwrap();
        mem.write_u64(0x3008, 0x20_0000 | 0x83).unwrap();
        mem.write_u32(VMXON_REGION, VMCS_REVISION_ID).unwrap();
        mem.write_u32(VMCS_REGION, VMCS_REVISION_ID).unwrap();
        mem.write_u64(PTRS, VMXON_REGION).unwrap();
        mem.write_u64(PTRS + 8, VMCS_REGION).unwrap();
        mem
    }

    /// L1 in 64-bit mode with paging through `memory()`'s tables.
    fn l1_state() -> VcpuState {
        let code = nested_exit::Segment {
            selector: 0x08,
            base: 0,
            limit: 0xffff_ffff,
            ar: 0xa09b,
        };
        let data = nested_exit::Segment {
            selector: 0x10,
            base: 0,
            limit: 0xffff_ffff,
            ar: 0xc093,
        };
        let mut s = VcpuState {
            rip: 0x2_0000,
            rflags: 0x2,
            cr0: 0x8005_0033,
            cr3: PML4,
            cr4: CR4_PAE | 0x600,
            cs: code,
            ss: data,
            ds: data,
            es: data,
            fs: data,
            gs: data,
            tr: nested_exit::Segment {
                selector: 0x18,
                base: 0x7000,
                limit: 0x67,
                ar: 0x8b,
            },
            ldtr: nested_exit::Segment {
                ar: nested_exit::Segment::AR_UNUSABLE,
                ..Default::default()
            },
            ..Default::default()
        };
        s.gdtr.base = 0x6000;
        s.gdtr.limit = 0x1f;
        s.idtr.base = 0x6800;
        s.idtr.limit = 0xfff;
        s.msrs.efer = EFER_64;
        s.msrs.pat = 0x0007_0406_0007_0406;
        s
    }

    fn adjust(caps: &VmxCapabilities, index: u32, want: u32) -> u64 {
        let m = caps.read_msr(index).unwrap_or(0xffff_ffff_0000_0000);
        u64::from((want | m as u32) & (m >> 32) as u32)
    }

    /// A complete vmcs12 written the way L1 writes it: 64-bit host and
    /// guest sharing `memory()`'s page tables, HLT exiting, I/O bitmap bit
    /// for port 0x3f8, MSR bitmap read bit for MSR 0x1b.
    fn write_vmcs(v: &mut Vmcs12, mem: &mut dyn GuestPhysMemory, caps: &VmxCapabilities) {
        mem.write(IO_A + (0x3f8 / 8), &[1 << (0x3f8 % 8)]).unwrap();
        mem.write(MSR_BITMAP + 0x1b / 8, &[1 << (0x1b % 8)])
            .unwrap();
        let pin = PinBased::EXT_INTR_EXITING | PinBased::NMI_EXITING;
        v.set(
            F::PIN_BASED_VM_EXEC_CONTROL,
            adjust(caps, msr::IA32_VMX_TRUE_PINBASED_CTLS, pin.bits()),
        );
        let p = PrimaryProcBased::HLT_EXITING
            | PrimaryProcBased::USE_IO_BITMAPS
            | PrimaryProcBased::USE_MSR_BITMAPS;
        v.set(
            F::CPU_BASED_VM_EXEC_CONTROL,
            adjust(caps, msr::IA32_VMX_TRUE_PROCBASED_CTLS, p.bits()),
        );
        let x =
            ExitControls::HOST_ADDR_SPACE_SIZE | ExitControls::SAVE_EFER | ExitControls::LOAD_EFER;
        v.set(
            F::VM_EXIT_CONTROLS,
            adjust(caps, msr::IA32_VMX_TRUE_EXIT_CTLS, x.bits()),
        );
        let e = EntryControls::IA32E_MODE_GUEST | EntryControls::LOAD_EFER;
        v.set(
            F::VM_ENTRY_CONTROLS,
            adjust(caps, msr::IA32_VMX_TRUE_ENTRY_CTLS, e.bits()),
        );
        v.set(F::IO_BITMAP_A, IO_A);
        v.set(F::IO_BITMAP_B, IO_B);
        v.set(F::MSR_BITMAP, MSR_BITMAP);
        v.set(F::HOST_CR0, 0x8005_0033);
        v.set(F::HOST_CR3, PML4);
        v.set(F::HOST_CR4, CR4_VMXE | CR4_PAE | 0x600);
        v.set(F::HOST_CS_SELECTOR, 0x08);
        for f in [
            F::HOST_SS_SELECTOR,
            F::HOST_DS_SELECTOR,
            F::HOST_ES_SELECTOR,
            F::HOST_FS_SELECTOR,
            F::HOST_GS_SELECTOR,
        ] {
            v.set(f, 0x10);
        }
        v.set(F::HOST_TR_SELECTOR, 0x18);
        v.set(F::HOST_TR_BASE, 0x7000);
        v.set(F::HOST_GDTR_BASE, 0x6000);
        v.set(F::HOST_IDTR_BASE, 0x6800);
        v.set(F::HOST_RIP, HOST_RIP);
        v.set(F::HOST_RSP, HOST_RSP);
        v.set(F::HOST_IA32_EFER, EFER_64);
        v.set(F::GUEST_CR0, 0x8000_0031);
        v.set(F::GUEST_CR3, PML4);
        v.set(F::GUEST_CR4, CR4_VMXE | CR4_PAE);
        v.set(F::GUEST_DR7, 0x400);
        v.set(F::GUEST_RFLAGS, 0x2);
        v.set(F::GUEST_RIP, L2_RIP);
        v.set(F::GUEST_RSP, 0x9_0000);
        let seg = |v: &mut Vmcs12, sel: F, base: F, lim: F, ar: F, vals: (u64, u64, u64, u64)| {
            v.set(sel, vals.0);
            v.set(base, vals.1);
            v.set(lim, vals.2);
            v.set(ar, vals.3);
        };
        seg(
            v,
            F::GUEST_CS_SELECTOR,
            F::GUEST_CS_BASE,
            F::GUEST_CS_LIMIT,
            F::GUEST_CS_AR_BYTES,
            (0x08, 0, 0xffff_ffff, 0xa09b),
        );
        for (s, b, l, a) in [
            (
                F::GUEST_SS_SELECTOR,
                F::GUEST_SS_BASE,
                F::GUEST_SS_LIMIT,
                F::GUEST_SS_AR_BYTES,
            ),
            (
                F::GUEST_DS_SELECTOR,
                F::GUEST_DS_BASE,
                F::GUEST_DS_LIMIT,
                F::GUEST_DS_AR_BYTES,
            ),
            (
                F::GUEST_ES_SELECTOR,
                F::GUEST_ES_BASE,
                F::GUEST_ES_LIMIT,
                F::GUEST_ES_AR_BYTES,
            ),
            (
                F::GUEST_FS_SELECTOR,
                F::GUEST_FS_BASE,
                F::GUEST_FS_LIMIT,
                F::GUEST_FS_AR_BYTES,
            ),
            (
                F::GUEST_GS_SELECTOR,
                F::GUEST_GS_BASE,
                F::GUEST_GS_LIMIT,
                F::GUEST_GS_AR_BYTES,
            ),
        ] {
            seg(v, s, b, l, a, (0x10, 0, 0xffff_ffff, 0xc093));
        }
        seg(
            v,
            F::GUEST_LDTR_SELECTOR,
            F::GUEST_LDTR_BASE,
            F::GUEST_LDTR_LIMIT,
            F::GUEST_LDTR_AR_BYTES,
            (0, 0, 0, 0x1_0000),
        );
        seg(
            v,
            F::GUEST_TR_SELECTOR,
            F::GUEST_TR_BASE,
            F::GUEST_TR_LIMIT,
            F::GUEST_TR_AR_BYTES,
            (0x18, 0x7000, 0x67, 0x8b),
        );
        v.set(F::GUEST_GDTR_BASE, 0x6000);
        v.set(F::GUEST_GDTR_LIMIT, 0x1f);
        v.set(F::GUEST_IDTR_BASE, 0x6800);
        v.set(F::GUEST_IDTR_LIMIT, 0xfff);
        v.set(F::GUEST_IA32_EFER, EFER_64);
        v.set(F::VMCS_LINK_POINTER, u64::MAX);
    }

    struct Rig {
        nested: Nested<Fake>,
        l1: Fake,
        mem: FlatMemory,
        host: Host,
    }

    impl Rig {
        /// VMXON, VMCLEAR, VMPTRLD through the trap, then a complete
        /// vmcs12 written the way L1 writes it: 64-bit host and guest,
        /// HLT exiting, I/O bitmap bit for 0x3f8, MSR bitmap read bit for 0x1b.
        fn new() -> Self {
            let caps = VmxCapabilities::default();
            let mut rig = Rig {
                nested: Nested::new(VmxCpu::new(caps.clone()), Fake::new(VcpuState::default())),
                l1: Fake::new(l1_state()),
                mem: memory(),
                host: Host::default(),
            };
            rig.l1.state.gprs.set(0, PTRS);
            assert_eq!(
                rig.exec(&[0xf3, 0x0f, 0xc7, 0x30]),
                VmxExitOutcome::Continue
            );
            rig.l1.state.gprs.set(0, PTRS + 8);
            rig.exec(&[0x66, 0x0f, 0xc7, 0x30]);
            rig.exec(&[0x0f, 0xc7, 0x30]);
            assert_eq!(rig.l1.state.rflags & 0x8d5, 0, "VMX setup failed");
            write_vmcs(
                rig.nested.cpu.current_vmcs_mut().unwrap(),
                &mut rig.mem,
                &caps,
            );
            rig
        }

        fn vmcs(&mut self) -> &mut Vmcs12 {
            self.nested.cpu.current_vmcs_mut().unwrap()
        }

        fn exec(&mut self, bytes: &[u8]) -> VmxExitOutcome {
            self.nested
                .handle_vmx_exit(&mut self.l1, bytes, &mut self.mem, &mut self.host)
                .unwrap()
        }

        fn vmlaunch(&mut self) -> VmxExitOutcome {
            self.exec(&[0x0f, 0x01, 0xc2])
        }

        /// Places L2 code at L2_RIP.
        fn l2_code(&mut self, bytes: &[u8]) {
            self.mem.write(L2_RIP, bytes).unwrap();
        }
    }

    /// The L2 executed `len` bytes and then `exit` happened with RIP at
    /// `rip` and DX/AL as given.
    fn step(rip: u64, rdx: u64, rax: u64) -> impl FnMut(&mut VcpuState) {
        move |s: &mut VcpuState| {
            s.rip = rip;
            s.gprs.set(2, rdx);
            s.gprs.set(0, rax);
        }
    }

    #[test]
    fn test_reflected_out_reaches_l1_at_host_rip() {
        let mut rig = Rig::new();
        // mov al, 'h'; mov dx, 0x3f8; out dx, al; hlt
        rig.l2_code(&[0xb0, 0x68, 0x66, 0xba, 0xf8, 0x03, 0xee, 0xf4]);
        rig.nested.l2.then(
            VmExit::IoOut {
                port: 0x3f8,
                size: 1,
                data: 0x68,
            },
            step(L2_RIP + 7, 0x3f8, 0x68),
        );
        assert_eq!(rig.vmlaunch(), VmxExitOutcome::Continue);
        // L2 got vmcs12's guest state, without the virtual VMXE.
        let l2_in = rig.nested.l2.sets[0];
        assert_eq!(l2_in.rip, L2_RIP);
        assert_eq!(l2_in.cr4 & CR4_VMXE, 0);
        // RIP was after the OUT: KVM owes nothing, no flush.
        assert_eq!(rig.nested.l2.flushes, 0);
        // L1 resumes at HOST_RIP/HOST_RSP with L2's GPRs and no VMXE.
        let l1 = *rig.l1.sets.last().unwrap();
        assert_eq!((l1.rip, l1.gprs.get(4)), (HOST_RIP, HOST_RSP));
        assert_eq!(l1.gprs.get(2), 0x3f8);
        assert_eq!(l1.rflags, 0x2);
        assert_eq!(l1.cr4 & CR4_VMXE, 0);
        // vmcs12 holds the exit as a CPU writes it.
        let v = rig.vmcs();
        assert_eq!(v.get(F::VM_EXIT_REASON), 30);
        assert_eq!(v.get(F::EXIT_QUALIFICATION), 0x3f8_0000);
        assert_eq!(v.get(F::GUEST_RIP), L2_RIP + 6);
        assert_eq!(v.get(F::VM_EXIT_INSTRUCTION_LEN), 1);
        assert_eq!(v.get(F::GUEST_CR4) & CR4_VMXE, CR4_VMXE);
        assert_eq!(rig.nested.stats().exits.get(&(30, Handler::L1)), Some(&1));
        assert_eq!(rig.nested.stats().l2_entries, 1);
        assert!(rig.nested.last_decision().unwrap().1.reflects());
    }

    #[test]
    fn test_port_e9_is_handled_in_l0_and_l2_resumes() {
        let mut rig = Rig::new();
        // out 0xe9, al; hlt
        rig.l2_code(&[0xe6, 0xe9, 0xf4]);
        rig.nested.l2.then(
            VmExit::IoOut {
                port: 0xe9,
                size: 1,
                data: 0x41,
            },
            step(L2_RIP + 2, 0, 0x41),
        );
        rig.nested.l2.then(VmExit::Hlt, step(L2_RIP + 3, 0, 0x41));
        assert_eq!(rig.vmlaunch(), VmxExitOutcome::Continue);
        assert_eq!(rig.host.out, vec![(0xe9, 0x41)]);
        assert_eq!(rig.nested.l2.runs, 2);
        let s = rig.nested.stats();
        assert_eq!(s.exits.get(&(30, Handler::L0)), Some(&1));
        assert_eq!(s.exits.get(&(12, Handler::L1)), Some(&1));
        assert_eq!(
            s.exit_rows(),
            vec![(12, "HLT", 0, 1), (30, "I/O instruction", 1, 0)]
        );
        let v = rig.vmcs();
        assert_eq!(v.get(F::VM_EXIT_REASON), 12);
        assert_eq!(v.get(F::GUEST_RIP), L2_RIP + 2, "RIP at the HLT");
        assert_eq!(v.get(F::VM_EXIT_INSTRUCTION_LEN), 1);
    }

    #[test]
    fn test_debug_exit_port_from_l2_stops_the_run() {
        let mut rig = Rig::new();
        rig.l2_code(&[0xe6, 0xf4]);
        rig.nested.l2.then(
            VmExit::IoOut {
                port: 0xf4,
                size: 1,
                data: 3,
            },
            step(L2_RIP + 2, 0, 3),
        );
        assert_eq!(rig.vmlaunch(), VmxExitOutcome::Stop(7));
    }

    #[test]
    fn test_rdmsr_follows_l1_msr_bitmap() {
        let mut rig = Rig::new();
        // rdmsr (0x277: not in L1's bitmap); rdmsr (0x1b: in it)
        rig.l2_code(&[0x0f, 0x32, 0x0f, 0x32]);
        rig.nested
            .l2
            .then(VmExit::RdMsr { index: 0x277 }, step(L2_RIP, 0, 0));
        rig.nested
            .l2
            .then(VmExit::RdMsr { index: 0x1b }, step(L2_RIP + 2, 0, 0));
        assert_eq!(rig.vmlaunch(), VmxExitOutcome::Continue);
        assert_eq!(rig.host.rdmsr, vec![0x277]);
        assert_eq!(
            rig.nested.l2.completions,
            vec!["rdmsr Some(1234)", "rdmsr Some(0)"]
        );
        assert_eq!(rig.nested.l2.flushes, 1);
        let v = rig.vmcs();
        assert_eq!(v.get(F::VM_EXIT_REASON), 31);
        assert_eq!(v.get(F::GUEST_RIP), L2_RIP + 2);
        assert_eq!(v.get(F::VM_EXIT_INSTRUCTION_LEN), 2);
    }

    #[test]
    fn test_vmresume_reenters_l2_from_vmcs12() {
        let mut rig = Rig::new();
        rig.l2_code(&[0xf4, 0xf4]);
        rig.nested.l2.then(VmExit::Hlt, step(L2_RIP + 1, 0, 0));
        rig.vmlaunch();
        // L1 advances GUEST_RIP and resumes; L2 halts again.
        let rip = rig.vmcs().get(F::GUEST_RIP);
        rig.vmcs().set(F::GUEST_RIP, rip + 1);
        rig.nested.l2.then(VmExit::Hlt, step(L2_RIP + 2, 0, 0));
        assert_eq!(rig.exec(&[0x0f, 0x01, 0xc3]), VmxExitOutcome::Continue);
        assert_eq!(rig.nested.l2.sets.last().unwrap().rip, L2_RIP + 1);
        assert_eq!(rig.vmcs().get(F::GUEST_RIP), L2_RIP + 1);
        assert_eq!(rig.nested.stats().l2_entries, 2);
        assert_eq!(
            rig.nested.stats().vmx_rows(),
            vec![
                ("vmxon", 1),
                ("vmclear", 1),
                ("vmptrld", 1),
                ("vmlaunch", 1),
                ("vmresume", 1)
            ]
        );
    }

    #[test]
    fn test_entry_failure_reflects_without_running_l2() {
        let mut rig = Rig::new();
        // SDM 27.3.1.5: a link pointer other than all ones must point at a
        // valid VMCS; a misaligned one fails with qualification 4.
        rig.vmcs().set(F::VMCS_LINK_POINTER, 0x123);
        assert_eq!(rig.vmlaunch(), VmxExitOutcome::Continue);
        assert_eq!(rig.nested.l2.runs, 0);
        let l1 = *rig.l1.sets.last().unwrap();
        assert_eq!(l1.rip, HOST_RIP);
        let v = rig.vmcs();
        assert_eq!(v.get(F::VM_EXIT_REASON), 0x8000_0021);
        assert_eq!(v.get(F::EXIT_QUALIFICATION), 4);
        assert_eq!(rig.nested.stats().entry_failures, 1);
    }

    #[test]
    fn test_vmfail_valid_7_completes_in_l1() {
        let mut rig = Rig::new();
        // CR3-target count 5 > 4 (SDM 27.2.1.1): VMfailValid(7).
        rig.vmcs().set(F::CR3_TARGET_COUNT, 5);
        let rip = rig.l1.state.rip;
        assert_eq!(rig.vmlaunch(), VmxExitOutcome::Continue);
        assert_eq!(rig.nested.l2.runs, 0);
        assert_eq!(rig.l1.state.rip, rip + 3);
        assert_eq!(rig.l1.state.rflags & 0x8d5, vmcs12::outcome::RFLAGS_ZF);
        assert_eq!(rig.vmcs().get(F::VM_INSTRUCTION_ERROR), 7);
    }

    #[test]
    fn test_vmx_fault_is_injected_into_l1_with_cr2() {
        let mut rig = Rig::new();
        // vmptrld [rax] with RAX beyond the mapped 4 MiB: #PF, CR2 = RAX.
        rig.l1.state.gprs.set(0, 0x80_0000);
        let rip = rig.l1.state.rip;
        rig.exec(&[0x0f, 0xc7, 0x30]);
        assert_eq!(rig.l1.injected, vec![(14, Some(0))]);
        assert_eq!(rig.l1.state.cr2, 0x80_0000);
        assert_eq!(rig.l1.state.rip, rip);
        assert_eq!(rig.nested.stats().vmx_faults, 1);
    }

    #[test]
    fn test_non_vmx_bytes_are_returned_to_the_caller() {
        let mut rig = Rig::new();
        let out = rig.exec(&[0x0f, 0x0b]);
        assert!(
            matches!(out, VmxExitOutcome::NotVmx(DecodeError::NotVmx { .. })),
            "{out:?}"
        );
    }

    #[test]
    fn test_vmx_instruction_in_l2_is_reflected_with_instruction_info() {
        let mut rig = Rig::new();
        // vmread rax, rbx in L2.
        rig.l2_code(&[0x0f, 0x78, 0xd8]);
        rig.nested.l2.then(
            VmExit::EmulationFailure {
                insn_bytes: vec![0x0f, 0x78, 0xd8],
            },
            |s: &mut VcpuState| {
                s.rip = L2_RIP;
                s.gprs.set(3, 0x4400);
            },
        );
        rig.vmlaunch();
        let v = rig.vmcs();
        assert_eq!(v.get(F::VM_EXIT_REASON), 23);
        assert_eq!(v.get(F::VM_EXIT_INSTRUCTION_LEN), 3);
        let info = InstructionInfo::decode(v.get32(F::VMX_INSTRUCTION_INFO)).unwrap();
        assert!(info.register_operand);
        assert_eq!((info.reg1, info.reg2), (0, 3));
    }

    #[test]
    fn test_triple_fault_in_l2_is_reflected() {
        let mut rig = Rig::new();
        rig.nested
            .l2
            .then(VmExit::Shutdown, |_s: &mut VcpuState| {});
        rig.vmlaunch();
        assert_eq!(rig.vmcs().get(F::VM_EXIT_REASON), 2);
    }

    #[test]
    fn test_find_out_start_prefers_shortest_and_reports_ambiguity() {
        let mut mem = memory();
        let mut s = l1_state();
        // mov al, 0x48; out dx, al: "48 ee" also decodes (REX.W out dx, al).
        mem.write(0x5000, &[0xb0, 0x48, 0xee]).unwrap();
        s.rip = 0x5003;
        s.gprs.set(2, 0x3f8);
        let (io, start, ambiguous) = find_out_start(&s, 0x3f8, 1, &mut mem).unwrap();
        assert_eq!(
            start,
            IoStart {
                start: 0x5002,
                len: 1
            }
        );
        assert!(ambiguous);
        assert_eq!(io.operand, IoOperand::Dx);
        // out 0x80, eax (e7 80): immediate port, 4 bytes, not ambiguous.
        mem.write(0x5100, &[0x90, 0xe7, 0x80]).unwrap();
        s.rip = 0x5103;
        let (io, start, ambiguous) = find_out_start(&s, 0x80, 4, &mut mem).unwrap();
        assert_eq!((start.start, start.len, ambiguous), (0x5101, 2, false));
        assert_eq!(io.encode(), 0x80_0043);
        // The wrong port or size is not silently accepted.
        assert!(find_out_start(&s, 0x81, 4, &mut mem).is_err());
        assert!(find_out_start(&s, 0x80, 1, &mut mem).is_err());
        // RIP at the OUT itself (stock KVM) is found too.
        mem.write(0x5300, &[0x90, 0x90, 0xe6, 0xe9]).unwrap();
        s.rip = 0x5302;
        let (_, start, _) = find_out_start(&s, 0xe9, 1, &mut mem).unwrap();
        assert_eq!((start.start, start.len), (0x5302, 2));
        // 66 ef: out dx, ax.
        mem.write(0x5200, &[0x66, 0xef]).unwrap();
        s.rip = 0x5202;
        let (io, start, _) = find_out_start(&s, 0x3f8, 2, &mut mem).unwrap();
        assert_eq!((start.start, io.size), (0x5200, IoSize::Two));
    }

    #[test]
    fn test_in_is_decoded_at_rip() {
        let mut mem = memory();
        let mut s = l1_state();
        mem.write(0x5000, &[0xec]).unwrap(); // in al, dx
        s.rip = 0x5000;
        s.gprs.set(2, 0x3fd);
        let (io, len) = decode_in_at_rip(&s, 0x3fd, 1, &mut mem).unwrap();
        assert_eq!((io.direction, len), (IoDirection::In, 1));
        assert!(decode_in_at_rip(&s, 0x3f8, 1, &mut mem).is_err());
    }

    #[test]
    fn test_hlt_start_must_hold_f4() {
        let mut mem = memory();
        let mut s = l1_state();
        mem.write(0x5000, &[0xf4, 0x90]).unwrap();
        s.rip = 0x5001;
        assert_eq!(find_hlt_start(&s, &mut mem).unwrap(), 0x5000);
        s.rip = 0x5002;
        assert!(find_hlt_start(&s, &mut mem).is_err());
    }

    /// The whole path on /dev/kvm: L1 (hand-assembled, 64-bit) runs VMXON,
    /// VMCLEAR, VMPTRLD and VMLAUNCH, each trapped and emulated; L2 writes
    /// port 0xe9 (L0 prints it) and then port 0x3f8 (L1 intercepts it): the
    /// exit is reflected and L1 resumes at HOST_RIP with L2's RAX.
    #[test]
    fn test_kvm_l2_exit_reflected_to_l1() {
        use crate::kvm::KvmVm;
        use crate::memory::{GuestRam, RamView};
        use std::sync::Arc;
        if !crate::test_support::kvm_or_skip() {
            return;
        }
        let ram = Arc::new(GuestRam::new(16 << 20).unwrap());
        ram.write_bytes(0, &memory().bytes).unwrap();
        // GDT: null, 64-bit code, data, 64-bit TSS descriptor (base 0x7000).
        let gdt: [u64; 5] = [
            0,
            0x00af_9b00_0000_ffff,
            0x00cf_9300_0000_ffff,
            0x0000_8b00_7000_0067,
            0,
        ];
        for (i, d) in gdt.iter().enumerate() {
            ram.write_bytes(0x6000 + 8 * i as u64, &d.to_le_bytes())
                .unwrap();
        }
        // L1 at 0x20000: vmxon [rax]; vmclear [rbx]; vmptrld [rbx];
        // out 0x80, al; vmlaunch; out 0x82, al; hlt.
        let l1_code = [
            0xf3, 0x0f, 0xc7, 0x30, 0x66, 0x0f, 0xc7, 0x33, 0x0f, 0xc7, 0x33, 0xe6, 0x80, 0x0f,
            0x01, 0xc2, 0xe6, 0x82, 0xf4,
        ];
        ram.write_bytes(0x2_0000, &l1_code).unwrap();
        // HOST_RIP: out 0x81, al; hlt.
        ram.write_bytes(HOST_RIP, &[0xe6, 0x81, 0xf4]).unwrap();
        // L2: mov al, 'A'; out 0xe9, al; mov dx, 0x3f8; out dx, al; hlt.
        let l2_code = [0xb0, 0x41, 0xe6, 0xe9, 0x66, 0xba, 0xf8, 0x03, 0xee, 0xf4];
        ram.write_bytes(L2_RIP, &l2_code).unwrap();

        let caps = VmxCapabilities::default();
        let l1_vm = KvmVm::new_l1(ram.clone(), &caps).unwrap();
        let mut l1 = l1_vm.create_vcpu(0).unwrap();
        let l2_vm = KvmVm::new_l2(ram.clone()).unwrap();
        l2_vm.filter_all_msrs().unwrap();
        let mut nested = Nested::new(VmxCpu::new(caps.clone()), l2_vm.create_vcpu(0).unwrap());
        let base = l1.get_state().unwrap();
        let mut st = l1_state();
        st.msrs = nested_exit::VmxMsrs {
            efer: EFER_64,
            ..base.msrs
        };
        st.gdtr.limit = 0x27;
        st.gprs.set(0, PTRS);
        st.gprs.set(3, PTRS + 8);
        st.gprs.set(4, 0x7_f000);
        l1.set_state(&st).unwrap();
        let mut host = Host::default();
        for _ in 0..50 {
            let exit = l1.run().unwrap();
            match exit {
                VmExit::EmulationFailure { insn_bytes } => {
                    let out = nested
                        .handle_vmx_exit(&mut l1, &insn_bytes, &mut RamView(&ram), &mut host)
                        .unwrap();
                    assert_eq!(out, VmxExitOutcome::Continue);
                }
                VmExit::IoOut { port: 0x80, .. } => {
                    let v = nested.cpu.current_vmcs_mut().unwrap();
                    write_vmcs(v, &mut RamView(&ram), &caps);
                }
                VmExit::IoOut {
                    port: 0x81, data, ..
                } => {
                    assert_eq!(data & 0xff, 0x41, "L1 sees L2's RAX at the exit");
                    assert_eq!(host.out, vec![(0xe9, 0x41)]);
                    let v = nested.current_vmcs12().unwrap();
                    assert_eq!(v.get(F::VM_EXIT_REASON), 30);
                    assert_eq!(v.get(F::EXIT_QUALIFICATION), 0x3f8_0000);
                    assert_eq!(v.get(F::GUEST_RIP), L2_RIP + 8);
                    assert_eq!(v.get(F::VM_EXIT_INSTRUCTION_LEN), 1);
                    let s = nested.stats();
                    assert_eq!(s.exit_rows(), vec![(30, "I/O instruction", 1, 1)]);
                    assert_eq!(s.l2_entries, 1);
                    return;
                }
                other => {
                    let st = l1.get_state().unwrap();
                    panic!("unexpected L1 exit {other:?} at RIP {:#x}", st.rip);
                }
            }
        }
        panic!("L1 did not come back from L2");
    }
}
