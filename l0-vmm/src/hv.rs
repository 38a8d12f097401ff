//! The backend-neutral vCPU interface the nesting logic is written against.
//!
//! `kvm.rs` implements it on /dev/kvm; tests implement it with a scripted
//! fake, so the L1/L2 run loops can be tested without KVM. Register state
//! moves as `nested_exit::VcpuState`; the KVM implementation keeps it in
//! `kvm_run` sync regs so a get/set costs no extra ioctl where possible.

use nested_exit::VcpuState;

/// Why a vCPU left `run()`: a small owned copy of what KVM reported.
/// Exits that need an answer (IN, MMIO read, RDMSR) are completed with the
/// `complete_*` methods before the next `run()`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmExit {
    /// `KVM_EXIT_IO`, direction in: RIP still points at the instruction;
    /// answer with [`Vcpu::complete_io_in`].
    IoIn {
        /// Port.
        port: u16,
        /// Access size in bytes (1, 2 or 4).
        size: u8,
    },
    /// `KVM_EXIT_IO`, direction out: RIP already points after the instruction.
    IoOut {
        /// Port.
        port: u16,
        /// Access size in bytes (1, 2 or 4).
        size: u8,
        /// The value written (low `size` bytes).
        data: u32,
    },
    /// `KVM_EXIT_MMIO` read (RIP at the instruction): answer with
    /// [`Vcpu::complete_mmio_read`].
    MmioRead {
        /// Guest-physical address.
        gpa: u64,
        /// Length in bytes.
        len: u8,
    },
    /// `KVM_EXIT_MMIO` write (RIP after the instruction: KVM emulated it).
    MmioWrite {
        /// Guest-physical address.
        gpa: u64,
        /// Bytes written.
        data: Vec<u8>,
    },
    /// `KVM_EXIT_HLT`.
    Hlt,
    /// `KVM_EXIT_SHUTDOWN`: triple fault.
    Shutdown,
    /// `KVM_EXIT_INTERNAL_ERROR` with suberror `KVM_INTERNAL_ERROR_EMULATION`:
    /// RIP at the instruction KVM could not emulate (VMX instructions on this
    /// host, or a fetch from unmapped guest-physical memory).
    EmulationFailure {
        /// Instruction bytes KVM reported (may be empty).
        insn_bytes: Vec<u8>,
    },
    /// Another `KVM_EXIT_INTERNAL_ERROR`.
    InternalError {
        /// Suberror.
        suberror: u32,
    },
    /// `KVM_EXIT_X86_RDMSR` (MSR filter): answer with [`Vcpu::complete_rdmsr`].
    RdMsr {
        /// MSR index (ECX).
        index: u32,
    },
    /// `KVM_EXIT_X86_WRMSR` (MSR filter): answer with [`Vcpu::complete_wrmsr`].
    WrMsr {
        /// MSR index (ECX).
        index: u32,
        /// Value (EDX:EAX).
        data: u64,
    },
    /// `KVM_EXIT_DEBUG` (hardware breakpoint or single step).
    Debug {
        /// Guest RIP of the debug event.
        pc: u64,
        /// DR6.
        dr6: u64,
    },
    /// `KVM_EXIT_IRQ_WINDOW_OPEN`.
    IrqWindowOpen,
    /// `KVM_RUN` returned EINTR (signal / `immediate_exit`).
    Interrupted,
    /// L0's own kick ([`GuestDebug`]-independent run deadline set with
    /// `FlushPending::set_kick_after`) ended `KVM_RUN`: the guest is
    /// consistent and may simply be run again (VMCALL watchdog, VMX-preemption
    /// timer, polling L1's interrupts while L2 runs).
    Kicked,
    /// `KVM_EXIT_FAIL_ENTRY`: KVM refused to enter the guest.
    FailEntry {
        /// Hardware entry-failure reason KVM reported.
        reason: u64,
    },
    /// Any other exit, by KVM exit number.
    Unsupported(u32),
}

/// What L0 asks of a vCPU's debug hardware (`KVM_SET_GUEST_DEBUG`): the
/// one place that says which DR0-DR3 breakpoints and whether single-step
/// are on. The nesting code combines every user's request into one of these
/// before each `KVM_RUN` (`Nested::apply_l2_debug`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GuestDebug {
    /// Instruction breakpoints at linear addresses (DR0-DR3).
    pub breakpoints: [Option<u64>; 4],
    /// Trap after one instruction (`KVM_GUESTDBG_SINGLESTEP`).
    pub single_step: bool,
}

impl GuestDebug {
    /// Nothing armed.
    pub const OFF: GuestDebug = GuestDebug {
        breakpoints: [None; 4],
        single_step: false,
    };

    /// Whether anything is armed.
    pub fn is_off(&self) -> bool {
        *self == Self::OFF
    }

    /// DR7 for the armed breakpoints: L0-enabled (Ln), R/W = 00 (instruction
    /// execution), LEN = 00; bit 10 reads as 1 (SDM 18.2.4).
    pub fn dr7(&self) -> u64 {
        let mut dr7 = 0x400;
        for (i, bp) in self.breakpoints.iter().enumerate() {
            if bp.is_some() {
                dr7 |= 1 << (2 * i);
            }
        }
        dr7
    }
}

/// vCPU ioctl counters (the cost model of this host: ~8 us each).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct IoctlCounters {
    /// `KVM_RUN` calls.
    pub kvm_run: u64,
    /// Every other vCPU ioctl (GET/SET_REGS, SREGS, EVENTS, MSRS, ...).
    pub other: u64,
}

/// A vCPU the nesting logic can drive.
pub trait Vcpu {
    /// The backend's error type.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Runs the vCPU until the next exit.
    fn run(&mut self) -> Result<VmExit, Self::Error>;
    /// Reads the architectural state (GPRs, RIP, RFLAGS, CRs, segments,
    /// descriptor tables, EFER and the other VMX MSRs, DR7, events).
    fn get_state(&mut self) -> Result<VcpuState, Self::Error>;
    /// Writes the architectural state; applied before the next `run()`.
    fn set_state(&mut self, state: &VcpuState) -> Result<(), Self::Error>;
    /// Completes an [`VmExit::IoIn`] with the value read.
    fn complete_io_in(&mut self, data: u32);
    /// Completes an [`VmExit::MmioRead`] with the bytes read.
    fn complete_mmio_read(&mut self, data: &[u8]);
    /// Completes a [`VmExit::RdMsr`]: `Some(value)` or `None` to raise #GP.
    fn complete_rdmsr(&mut self, value: Option<u64>);
    /// Completes a [`VmExit::WrMsr`]: `true` accepts it, `false` raises #GP.
    fn complete_wrmsr(&mut self, ok: bool);
    /// Injects an exception (vector, optional error code) before the next run.
    fn inject_exception(&mut self, vector: u8, error_code: Option<u32>) -> Result<(), Self::Error>;
    /// Ioctl counters so far.
    fn counters(&self) -> IoctlCounters;

    /// Programs the debug hardware (`KVM_SET_GUEST_DEBUG`: DR0-DR3 execute
    /// breakpoints, single-step) for L0's own use; `Ok(false)`: this vCPU
    /// has none (L0 then does without). Named apart from
    /// `FlushPending::set_guest_debug` (the L2 vCPU's) so calls on a vCPU
    /// implementing both stay unambiguous.
    fn program_guest_debug(&mut self, _dbg: &GuestDebug) -> Result<bool, Self::Error> {
        Ok(false)
    }
}
