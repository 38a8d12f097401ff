//! Constants L0 and the L1 kernel share. `l0-vmm/src/l1_image.rs` includes
//! this very file with `#[path]`, so both sides compile the same numbers:
//! keep it free of `use` items and crate references.

/// Where the Multiboot loader puts the L1 image (1 MiB).
pub const L1_LOAD_ADDR: u64 = 0x10_0000;

/// Serial console (16550 COM1) data port: L1 and L2 print here.
pub const SERIAL_PORT: u16 = 0x3f8;

/// isa-debug-exit port: a 32-bit write of V ends the run; L0 exits with
/// process status `(V << 1) | 1` (the QEMU convention).
pub const DEBUG_EXIT_PORT: u16 = 0xf4;

/// Debug console port (Bochs "port e9 hack"): L2 writes here without L1
/// intercepting it, so L0 handles those exits itself.
pub const DEBUG_CONSOLE_PORT: u16 = 0xe9;

/// Exit status L1 writes to [`DEBUG_EXIT_PORT`] when its test passed.
pub const EXIT_STATUS_PASS: u32 = 0;
/// Exit status when at least one check failed.
pub const EXIT_STATUS_FAIL: u32 = 1;
/// Exit status after an unexpected exception or a Rust panic in L1.
pub const EXIT_STATUS_CRASH: u32 = 3;

/// Trap port of L1's #UD handler, for hosts where a VMX instruction in L1
/// raises #UD inside the guest instead of exiting to L0 (stock kvm_intel
/// with nested VMX off). The handler saves the interrupted state as a
/// [`trap_frame`] on its own stack and writes the frame's address
/// (identity-mapped, below 4 GiB) with `out dx, eax` to this port. L0 then
/// emulates the instruction at the frame's RIP with the frame's registers,
/// writes the results back into the frame (GPRs, RIP, RFLAGS) and sets
/// [`trap_frame::STATUS`] to [`TRAP_STATUS_EMULATED`]; the handler restores
/// the frame and returns with IRETQ. A VMLAUNCH/VMRESUME that enters L2
/// simply never comes back to the handler. If L0 leaves the status at
/// [`TRAP_STATUS_NOT_HANDLED`] (not a VMX instruction, the instruction
/// architecturally raises #UD, or no L0 listens, as under Bochs) L1 treats
/// the #UD as genuine.
pub const VMX_TRAP_PORT: u16 = 0x0e0e;

/// [`trap_frame::STATUS`] value written by L1 before the trap.
pub const TRAP_STATUS_NOT_HANDLED: u64 = 0;
/// [`trap_frame::STATUS`] value L0 writes after emulating the instruction.
pub const TRAP_STATUS_EMULATED: u64 = 1;

/// Byte offsets of the fields of the #UD trap frame (all u64, little
/// endian), from the address written to [`VMX_TRAP_PORT`].
pub mod trap_frame {
    /// Status word (see `TRAP_STATUS_*`).
    pub const STATUS: u64 = 0;
    /// RAX.
    pub const RAX: u64 = 8;
    /// RCX.
    pub const RCX: u64 = 16;
    /// RDX.
    pub const RDX: u64 = 24;
    /// RBX.
    pub const RBX: u64 = 32;
    /// RBP.
    pub const RBP: u64 = 40;
    /// RSI.
    pub const RSI: u64 = 48;
    /// RDI.
    pub const RDI: u64 = 56;
    /// R8.
    pub const R8: u64 = 64;
    /// R9.
    pub const R9: u64 = 72;
    /// R10.
    pub const R10: u64 = 80;
    /// R11.
    pub const R11: u64 = 88;
    /// R12.
    pub const R12: u64 = 96;
    /// R13.
    pub const R13: u64 = 104;
    /// R14.
    pub const R14: u64 = 112;
    /// R15.
    pub const R15: u64 = 120;
    /// Exception vector (6 for #UD).
    pub const VECTOR: u64 = 128;
    /// Error code (0 for vectors without one).
    pub const ERROR_CODE: u64 = 136;
    /// RIP of the faulting instruction (the CPU's exception frame starts here).
    pub const RIP: u64 = 144;
    /// CS.
    pub const CS: u64 = 152;
    /// RFLAGS.
    pub const RFLAGS: u64 = 160;
    /// RSP at the faulting instruction.
    pub const RSP: u64 = 168;
    /// SS.
    pub const SS: u64 = 176;
    /// Size of the frame in bytes.
    pub const SIZE: u64 = 184;
}
