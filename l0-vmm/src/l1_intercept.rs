//! L1's own #GP and #UD, seen through debug-register breakpoints on L1's
//! exception handlers (docs/l1-intercepts.md).
//!
//! KVM on this host never reports a guest exception to userspace, but an
//! execute breakpoint (`KVM_GUESTDBG_USE_HW_BP`) on the first instruction
//! of a guest's handler fires after the CPU delivered the exception, with
//! its frame on the handler's stack (`/work/shared/kvm-host-facts.md`). L0
//! uses two of the four DR slots of L1's vCPU:
//!
//! - #GP (13): KVM refuses `mov cr4` with CR4.VMXE set. L0 unwinds the
//!   frame, decodes the faulting instruction and, for a `mov cr4, reg`
//!   that sets VMXE, applies the SDM's rules ([`mov_to_cr4`]): the write
//!   completes with the other bits written for real and VMXE kept virtual
//!   (`Nested::set_vmxe`), or the #GP stands and L1's handler runs.
//! - #UD (6): on a host whose KVM raises #UD for VMX instructions (made to
//!   happen here with `--vmx-trap ud`), L0 unwinds the frame and emulates
//!   the VMX instruction at the faulting RIP, so an L1 without the trap port
//!   (`l1_image::abi::VMX_TRAP_PORT`) works unmodified. An L1 whose #UD
//!   handler uses the trap port keeps that path ([`handler_uses_trap_port`]).
//!
//! Every other hit is handed to L1's handler untouched: L0 steps one
//! instruction with the breakpoints off and re-arms them (RFLAGS.RF does
//! not work through `KVM_SET_REGS` on this host).
//!
//! This file holds the pure parts (the CR4 rules, the decoders, L0's
//! same-privilege rule for unwinding; IDT gates and frames are read by the
//! code L2's intercepts share, `crate::idt`) and the breakpoint bookkeeping
//! ([`L1Intercepts`]);
//! `l1_run.rs` wires the hits into the L1 run loop.

use iced_x86::{Code, Decoder, DecoderOptions, FlowControl, Mnemonic, OpKind, Register};
use nested_exit::VcpuState;
use vmcs12::GuestPhysMemory;

use crate::hv::GuestDebug;
use crate::idt::{mode_frame, read_gate, unwind_frame, FrameKind, Unwound};
use crate::vmx_emul::{fetch_insn_bytes, ExecMode};

/// #UD.
pub const UD_VECTOR: u8 = 6;
/// #GP.
pub const GP_VECTOR: u8 = 13;
/// CR4.VMXE (SDM 2.5).
pub const CR4_VMXE: u64 = 1 << 13;
/// CR4.PAE.
const CR4_PAE: u64 = 1 << 5;
/// CR4.LA57.
const CR4_LA57: u64 = 1 << 12;
/// CR4.PCIDE.
const CR4_PCIDE: u64 = 1 << 17;
/// DR6.BS: the debug exit is a single step.
pub const DR6_BS: u64 = 1 << 14;
/// The DR slot L0 uses for L1's #GP handler.
const GP_SLOT: usize = 0;
/// The DR slot L0 uses for L1's #UD handler.
const UD_SLOT: usize = 1;
/// Instructions of L1's #UD handler L0 looks at for the trap port.
const TRAP_PORT_SCAN: usize = 64;

/// Why an exception frame could not be unwound.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnwindError {
    /// The frame does not read, or does not look like one.
    #[error("the exception frame at L1's handler stack pointer does not read or does not look like one (L1's stack is not mapped where RSP points, or the handler was entered without a delivery): L1's handler gets this one")]
    Unreadable,
    /// The exception changed CS or SS (a privilege change, virtual-8086
    /// mode or a 64-bit IST stack switch to another SS): L0 only unwinds
    /// same-privilege frames.
    #[error("the exception frame has CS {frame_cs:#x}/SS {frame_ss:#x}, the handler runs with {cs:#x}/{ss:#x}: L0 unwinds only exceptions taken at the handler's privilege level, so L1's handler gets this one")]
    PrivilegeChange {
        /// CS in the frame.
        frame_cs: u16,
        /// SS in the frame (or the handler's SS for a 32-bit frame without one).
        frame_ss: u16,
        /// The handler's CS.
        cs: u16,
        /// The handler's SS.
        ss: u16,
    },
}

/// L1's state before the exception, from the unwound `frame`. Only
/// same-privilege frames are taken: CS and SS (whole segments) must be the
/// handler's and the frame must not come from virtual-8086 mode, so that
/// only RIP, RFLAGS and RSP differ from the handler's state.
pub fn unwind(handler: &VcpuState, frame: &Unwound) -> Result<VcpuState, UnwindError> {
    let pre = &frame.pre;
    if pre.cs != handler.cs || pre.ss != handler.ss || pre.rflags & VcpuState::RFLAGS_VM != 0 {
        return Err(UnwindError::PrivilegeChange {
            frame_cs: pre.cs.selector,
            frame_ss: pre.ss.selector,
            cs: handler.cs.selector,
            ss: handler.ss.selector,
        });
    }
    Ok(*pre)
}

/// What L1's `mov cr4` is allowed to do (SDM 2.5, 4.5, 23.8, 31.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cr4Context {
    /// CR4 as L1 sees it before the write (hardware value with the virtual VMXE).
    pub old: u64,
    /// In VMX operation (after VMXON).
    pub vmx_operation: bool,
    /// IA-32e mode is active (EFER.LMA).
    pub long_mode: bool,
    /// CR3 (PCIDE may be set only with CR3[11:0] = 0).
    pub cr3: u64,
    /// The current privilege level.
    pub cpl: u8,
    /// IA32_VMX_CR4_FIXED0.
    pub fixed0: u64,
    /// IA32_VMX_CR4_FIXED1 (also the CR4 bits this CPU implements).
    pub fixed1: u64,
}

/// The outcome of a `mov cr4` L0 looked at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cr4Verdict {
    /// The write completes: `hw` goes into KVM's CR4 (without VMXE), `vmxe`
    /// is the new virtual CR4.VMXE.
    Complete {
        /// The hardware CR4.
        hw: u64,
        /// The virtual VMXE.
        vmxe: bool,
    },
    /// The write raises #GP(0): L1's handler gets the fault.
    GeneralProtection,
}

/// The SDM's rules for MOV to CR4 with `new`: #GP(0) at CPL > 0 (SDM
/// 2.8), for bits the CPU does not implement (IA32_VMX_CR4_FIXED1 here),
/// for clearing PAE or changing LA57 in IA-32e mode, for setting PCIDE
/// outside IA-32e mode or with CR3[11:0] != 0 (SDM 4.10.1), and in VMX
/// operation for bits that violate IA32_VMX_CR4_FIXED0/1, VMXE among them
/// (SDM 23.8: clearing VMXE in VMX operation is #GP).
pub fn mov_to_cr4(ctx: &Cr4Context, new: u64) -> Cr4Verdict {
    let gp = Cr4Verdict::GeneralProtection;
    if ctx.cpl != 0 || new & !ctx.fixed1 != 0 {
        return gp;
    }
    if ctx.long_mode && (new & CR4_PAE == 0 || (new ^ ctx.old) & CR4_LA57 != 0) {
        return gp;
    }
    if new & CR4_PCIDE != 0 && ctx.old & CR4_PCIDE == 0 && (!ctx.long_mode || ctx.cr3 & 0xfff != 0)
    {
        return gp;
    }
    if ctx.vmx_operation && !vmcs12::caps::fixed_ok(new, ctx.fixed0, ctx.fixed1) {
        return gp;
    }
    Cr4Verdict::Complete {
        hw: new & !CR4_VMXE,
        vmxe: new & CR4_VMXE != 0,
    }
}

/// A decoded `mov cr4, reg`: the value written and the instruction length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MovToCr4 {
    /// The source register's value (32 bits outside 64-bit mode).
    pub value: u64,
    /// Instruction length.
    pub len: u64,
}

/// Decodes `bytes` at `state`'s RIP: `Some` for a MOV to CR4 from a GPR.
pub fn decode_mov_to_cr4(state: &VcpuState, bytes: &[u8]) -> Option<MovToCr4> {
    let bitness = ExecMode::of(state).bitness();
    let mut d = Decoder::with_ip(bitness, bytes, state.rip, DecoderOptions::NONE);
    let insn = d.decode();
    if insn.is_invalid() || !matches!(insn.code(), Code::Mov_cr_r32 | Code::Mov_cr_r64) {
        return None;
    }
    if insn.op0_register() != Register::CR4 || insn.op1_kind() != OpKind::Register {
        return None;
    }
    let src = insn.op1_register();
    let full = src.full_register();
    let index = (full as usize).checked_sub(Register::RAX as usize)?;
    let value = *state.gprs.regs.get(index).filter(|_| index < 16)?;
    let value = if src.size() == 4 {
        value & 0xffff_ffff
    } else {
        value
    };
    Some(MovToCr4 {
        value,
        len: insn.len() as u64,
    })
}

/// The linear address of L1's handler for `vector` (the shared
/// [`read_gate`]); `None` without a usable gate and in real mode, where L0
/// arms no breakpoint (VMX instructions #UD there anyway, SDM 31.3).
fn handler_at(state: &VcpuState, mem: &mut dyn GuestPhysMemory, vector: u8) -> Option<u64> {
    read_gate(state, mem, vector)
        .ok()
        .filter(|g| g.kind != FrameKind::Real)
        .map(|g| g.linear)
}

/// The frame layout at L1's handler breakpoint: the mode's, and in
/// protected mode the kind of the #GP or #UD gate whose handler is at
/// CS:RIP (a 16-bit gate pushes 2-byte slots, SDM 6.12.1).
fn frame_kind_at(handler: &VcpuState, mem: &mut dyn GuestPhysMemory) -> FrameKind {
    let kind = mode_frame(handler);
    if kind != FrameKind::Protected32 {
        return kind;
    }
    let pc = handler.cs.base.wrapping_add(handler.rip) & 0xffff_ffff;
    [GP_VECTOR, UD_VECTOR]
        .into_iter()
        .filter_map(|v| read_gate(handler, mem, v).ok())
        .find(|g| g.linear == pc)
        .map_or(kind, |g| g.kind)
}

/// The frame of the exception whose handler breakpoint fired, unwound by
/// the shared [`unwind_frame`]: L1's state before the delivery and the
/// error code. [`unwind`] then applies L0's same-privilege rule.
pub fn read_frame(
    handler: &VcpuState,
    mem: &mut dyn GuestPhysMemory,
    has_error_code: bool,
) -> Result<Unwound, UnwindError> {
    let kind = frame_kind_at(handler, mem);
    unwind_frame(handler, mem, kind, has_error_code).ok_or(UnwindError::Unreadable)
}

/// Whether L1's #UD handler at `handler` offers the instruction to L0's
/// trap port itself: its first instructions (following unconditional
/// jumps, at most 64) load 0x0e0e into DX (`mov dx, 0xe0e` / `mov edx,
/// 0xe0e`), as the built-in L1's does before `out dx, eax`.
pub fn handler_uses_trap_port(
    state: &VcpuState,
    mem: &mut dyn GuestPhysMemory,
    handler: u64,
    port: u16,
) -> bool {
    let bitness = ExecMode::of(state).bitness();
    let mut s = *state;
    // `handler` is linear; RIP is CS-relative.
    s.rip = match ExecMode::of(state) {
        ExecMode::Long64 => handler,
        _ => handler.wrapping_sub(state.cs.base) & 0xffff_ffff,
    };
    let mut seen = 0;
    while seen < TRAP_PORT_SCAN {
        let Ok(Ok(bytes)) = fetch_insn_bytes(&s, mem) else {
            return false;
        };
        let mut d = Decoder::with_ip(bitness, &bytes, s.rip, DecoderOptions::NONE);
        let insn = d.decode();
        if insn.is_invalid() {
            return false;
        }
        seen += 1;
        if insn.mnemonic() == Mnemonic::Mov
            && matches!(
                insn.op0_register(),
                Register::DX | Register::EDX | Register::RDX
            )
            && matches!(
                insn.op1_kind(),
                OpKind::Immediate16 | OpKind::Immediate32 | OpKind::Immediate32to64
            )
            && insn.immediate(1) == u64::from(port)
        {
            return true;
        }
        match insn.flow_control() {
            FlowControl::UnconditionalBranch
                if insn.op0_kind() == OpKind::NearBranch64
                    || insn.op0_kind() == OpKind::NearBranch32
                    || insn.op0_kind() == OpKind::NearBranch16 =>
            {
                s.rip = insn.near_branch_target();
            }
            FlowControl::Next | FlowControl::ConditionalBranch => s.rip = insn.next_ip(),
            _ => return false,
        }
    }
    false
}

/// Which handler a debug exit hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hit {
    /// L1's #GP handler.
    GeneralProtection,
    /// L1's #UD handler.
    InvalidOpcode,
    /// The single step over a handler's first instruction finished.
    StepDone,
    /// Not L0's (L1 stepping or breakpoints of its own are not supported
    /// while L0 uses the debug registers).
    Other,
}

/// The breakpoint bookkeeping of L1's vCPU.
#[derive(Debug, Clone, Default)]
pub struct L1Intercepts {
    /// Catch VMX #UDs at L1's #UD handler (`--vmx-trap ud`).
    ud_path: bool,
    /// L1's #UD handler uses the trap port (or L1 wrote it): no #UD breakpoint.
    trap_port_user: bool,
    /// IDTR and the two handlers as last read.
    idt: Option<(u64, u16, Option<u64>, Option<u64>)>,
    /// What is programmed into L1's vCPU.
    applied: GuestDebug,
    /// L1's vCPU has no debug hardware (a fake): stop trying.
    unsupported: bool,
    /// Single-stepping over a handler's first instruction.
    stepping: bool,
}

impl L1Intercepts {
    /// Bookkeeping for a run; `ud_path`: catch VMX #UDs at L1's #UD handler.
    pub fn new(ud_path: bool) -> Self {
        Self {
            ud_path,
            ..Default::default()
        }
    }

    /// L1 wrote the trap port: it handles its #UDs with L0's help, the #UD
    /// breakpoint goes (at the next [`Self::refresh`]).
    pub fn note_trap_port(&mut self) {
        self.trap_port_user = true;
    }

    /// Whether the #GP handler is armed.
    pub fn gp_armed(&self) -> bool {
        self.applied.breakpoints[GP_SLOT].is_some()
    }

    /// Whether L0 follows L1's IDT at this exit (not mid-step, and L1's
    /// vCPU has debug hardware): [`Self::refresh`] can change something.
    pub fn follows_idt(&self) -> bool {
        !self.stepping && !self.unsupported
    }

    /// What the debug registers should hold for L1 in `state` (re-reads
    /// the gates; cheap: no ioctl, a few guest-memory reads).
    pub fn wanted(
        &mut self,
        state: &VcpuState,
        mem: &mut dyn GuestPhysMemory,
        port: u16,
    ) -> GuestDebug {
        let gp = handler_at(state, mem, GP_VECTOR);
        let ud = handler_at(state, mem, UD_VECTOR);
        let key = (state.idtr.base, state.idtr.limit, gp, ud);
        if self.idt != Some(key) {
            self.idt = Some(key);
            if let Some(h) = ud {
                if self.ud_path && handler_uses_trap_port(state, mem, h, port) {
                    self.trap_port_user = true;
                }
            }
            tracing::debug!(idtr = state.idtr.base, ?gp, ?ud, "L1 IDT handlers");
        }
        let mut dbg = GuestDebug::OFF;
        dbg.breakpoints[GP_SLOT] = gp;
        if self.ud_path && !self.trap_port_user {
            dbg.breakpoints[UD_SLOT] = ud;
        }
        dbg
    }

    /// The debug state to program now, if it differs from what is applied
    /// (`None`: nothing to do). Call [`Self::applied`] after programming.
    pub fn refresh(
        &mut self,
        state: &VcpuState,
        mem: &mut dyn GuestPhysMemory,
        port: u16,
    ) -> Option<GuestDebug> {
        if !self.follows_idt() {
            return None;
        }
        let want = self.wanted(state, mem, port);
        (want != self.applied).then_some(want)
    }

    /// Records what was programmed (`ok == false`: the vCPU has no debug
    /// hardware; L0 stops trying).
    pub fn applied(&mut self, dbg: GuestDebug, ok: bool) {
        if ok {
            self.applied = dbg;
        } else {
            self.unsupported = true;
            self.applied = GuestDebug::OFF;
        }
    }

    /// Classifies a debug exit of L1's vCPU.
    pub fn classify(&mut self, pc: u64, dr6: u64) -> Hit {
        if self.stepping && dr6 & DR6_BS != 0 {
            self.stepping = false;
            return Hit::StepDone;
        }
        let bp = |slot: usize| self.applied.breakpoints[slot] == Some(pc) && dr6 & (1 << slot) != 0;
        if bp(GP_SLOT) {
            Hit::GeneralProtection
        } else if bp(UD_SLOT) {
            Hit::InvalidOpcode
        } else {
            Hit::Other
        }
    }

    /// The debug state for stepping over the handler's first instruction
    /// (breakpoints off, single-step on); call [`Self::applied`] with it.
    pub fn step_over(&mut self) -> GuestDebug {
        self.stepping = true;
        GuestDebug {
            breakpoints: [None; 4],
            single_step: true,
        }
    }

    /// After the step: the breakpoints to re-arm.
    pub fn rearm(&self) -> GuestDebug {
        let mut dbg = GuestDebug::OFF;
        if let Some((_, _, gp, ud)) = self.idt {
            dbg.breakpoints[GP_SLOT] = gp;
            if self.ud_path && !self.trap_port_user {
                dbg.breakpoints[UD_SLOT] = ud;
            }
        }
        dbg
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{GuestRam, RamView};
    use nested_exit::Segment;

    fn le64(words: &[u64]) -> Vec<u8> {
        words.iter().flat_map(|w| w.to_le_bytes()).collect()
    }

    fn le32(words: &[u32]) -> Vec<u8> {
        words.iter().flat_map(|w| w.to_le_bytes()).collect()
    }

    /// Flat 32-bit protected mode without paging at CPL 0 (CS 0x08, SS
    /// 0x10), with a GDT at 0x6000: code 0x08, data 0x10, user code 0x1b,
    /// user data 0x23.
    fn flat32(ram: &GuestRam) -> VcpuState {
        let gdt = [
            0x00cf_9b00_0000_ffff,
            0x00cf_9300_0000_ffff,
            0x00cf_fb00_0000_ffff,
            0x00cf_f300_0000_ffff,
        ];
        ram.write_bytes(0x6008, &le64(&gdt)).unwrap();
        let mut s = flat64();
        s.cr0 = 0x11;
        s.msrs.efer = 0;
        s.cs.ar = 0xc09b;
        s.gdtr.base = 0x6000;
        s.gdtr.limit = 0x27;
        s
    }

    #[test]
    fn test_read_frame_64_with_error_code() {
        let ram = GuestRam::new(4 << 20).unwrap();
        let mut h = paged(&ram);
        let frame = le64(&[0, 0x20_0010, 0x08, 0x46, 0x7_fff0, 0x10]);
        ram.write_bytes(0x7_ffc8, &frame).unwrap();
        h.gprs.regs[4] = 0x7_ffc8;
        let mut m = RamView(&ram);
        let f = read_frame(&h, &mut m, true).unwrap();
        assert_eq!(f.error_code, Some(0));
        let p = f.pre;
        assert_eq!(
            (
                p.rip,
                p.cs.selector,
                p.rflags,
                p.gprs.regs[4],
                p.ss.selector
            ),
            (0x20_0010, 0x08, 0x46, 0x7_fff0, 0x10)
        );
        // Without the error code the slots shift; a short read fails.
        h.gprs.regs[4] = 0x7_ffd0;
        let f = read_frame(&h, &mut m, false).unwrap();
        assert_eq!(
            (f.pre.rip, f.pre.gprs.regs[4], f.error_code),
            (0x20_0010, 0x7_fff0, None)
        );
        // The SS slot of this frame lies beyond RAM.
        ram.write_bytes(0x40_0000 - 40, &frame[..40]).unwrap();
        h.gprs.regs[4] = 0x40_0000 - 40;
        assert_eq!(read_frame(&h, &mut m, true), Err(UnwindError::Unreadable));
    }

    #[test]
    fn test_read_frame_32_without_privilege_change_has_no_stack() {
        let ram = GuestRam::new(4 << 20).unwrap();
        let mut h = flat32(&ram);
        let mut m = RamView(&ram);
        // error code, EIP, CS (RPL 0), EFLAGS; then the interrupted stack.
        let frame = le32(&[0, 0x10_2000, 0x08, 0x202, 0xdead, 0xbeef]);
        ram.write_bytes(0x9_0000, &frame).unwrap();
        h.gprs.regs[4] = 0x9_0000;
        let f = read_frame(&h, &mut m, true).unwrap();
        assert_eq!(f.pre.rip, 0x10_2000);
        assert_eq!(f.pre.gprs.regs[4], 0x9_0010, "ESP above the 4-slot frame");
        assert_eq!(f.pre.ss, h.ss);
        assert!(unwind(&h, &f).is_ok());
        // CS with RPL 3 under a CPL-0 handler: SS:ESP were pushed; L0
        // leaves such a frame to L1's handler.
        let frame = le32(&[0x10_2000, 0x1b, 0x202, 0x5000, 0x23]);
        ram.write_bytes(0x9_0000, &frame).unwrap();
        let f = read_frame(&h, &mut m, false).unwrap();
        assert_eq!((f.pre.gprs.regs[4], f.pre.ss.selector), (0x5000, 0x23));
        assert!(matches!(
            unwind(&h, &f),
            Err(UnwindError::PrivilegeChange {
                frame_cs: 0x1b,
                frame_ss: 0x23,
                ..
            })
        ));
    }

    #[test]
    fn test_read_frame_takes_a_16_bit_gate_from_the_idt() {
        let ram = GuestRam::new(4 << 20).unwrap();
        let mut h = flat32(&ram);
        let mut m = RamView(&ram);
        // #UD: a 16-bit trap gate (type 7) to 0x08:0x3000.
        h.idtr.base = 0x7000;
        h.idtr.limit = 0xff;
        let gate = 0x3000 | (0x08 << 16) | (0x87 << 40);
        ram.write_bytes(0x7000 + 6 * 8, &le64(&[gate])).unwrap();
        h.rip = 0x3000;
        h.gprs.regs[4] = 0x9_0000;
        // IP, CS, FLAGS as 2-byte slots.
        ram.write_bytes(0x9_0000, &[0x34, 0x12, 0x08, 0x00, 0x02, 0x02])
            .unwrap();
        let f = read_frame(&h, &mut m, false).unwrap();
        assert_eq!((f.pre.rip, f.pre.gprs.regs[4]), (0x1234, 0x9_0006));
        // Away from that handler the mode's 32-bit layout applies.
        h.rip = 0x3001;
        assert_ne!(read_frame(&h, &mut m, false).map(|f| f.pre.rip), Ok(0x1234));
    }

    fn flat64() -> VcpuState {
        let mut s = VcpuState {
            cr0: 0x8000_0011,
            cr4: 0x20,
            cs: Segment {
                selector: 0x08,
                base: 0,
                limit: 0xffff_ffff,
                ar: 0xa09b,
            },
            ss: Segment {
                selector: 0x10,
                base: 0,
                limit: 0xffff_ffff,
                ar: 0xc093,
            },
            ..Default::default()
        };
        s.msrs.efer = 0x500;
        s
    }

    #[test]
    fn test_unwind_restores_rip_rflags_rsp() {
        let ram = GuestRam::new(4 << 20).unwrap();
        let mut h = paged(&ram);
        h.rip = 0x30_0000;
        h.rflags = 0x2;
        h.gprs.regs[4] = 0x7_ffc8;
        h.gprs.regs[0] = 7;
        let frame = le64(&[0, 0x20_0010, 0x08, 0x246, 0x7_fff0, 0x10]);
        ram.write_bytes(0x7_ffc8, &frame).unwrap();
        let f = read_frame(&h, &mut RamView(&ram), true).unwrap();
        let s = unwind(&h, &f).unwrap();
        assert_eq!(
            (s.rip, s.rflags, s.gprs.regs[4]),
            (0x20_0010, 0x246, 0x7_fff0)
        );
        assert_eq!(s.gprs.regs[0], 7, "other registers stay");
        let mut user = f;
        user.pre.cs.selector = 0x33;
        assert!(matches!(
            unwind(&h, &user),
            Err(UnwindError::PrivilegeChange { frame_cs: 0x33, .. })
        ));
    }

    fn ctx() -> Cr4Context {
        Cr4Context {
            old: 0x620,
            vmx_operation: false,
            long_mode: true,
            cr3: 0x1000,
            cpl: 0,
            fixed0: CR4_VMXE,
            fixed1: vmcs12::caps::cr4::SUPPORTED,
        }
    }

    #[test]
    fn test_cr4_setting_vmxe_completes_with_virtual_vmxe() {
        assert_eq!(
            mov_to_cr4(&ctx(), 0x620 | CR4_VMXE | 0x80),
            Cr4Verdict::Complete {
                hw: 0x6a0,
                vmxe: true
            }
        );
        // In VMX operation keeping VMXE set is fine too.
        let c = Cr4Context {
            vmx_operation: true,
            old: 0x620 | CR4_VMXE,
            ..ctx()
        };
        assert!(matches!(
            mov_to_cr4(&c, 0x620 | CR4_VMXE),
            Cr4Verdict::Complete { vmxe: true, .. }
        ));
    }

    #[test]
    fn test_cr4_faulting_writes_stay_gp() {
        let gp = Cr4Verdict::GeneralProtection;
        let c = ctx();
        // CPL 3.
        assert_eq!(mov_to_cr4(&Cr4Context { cpl: 3, ..c }, 0x2620), gp);
        // A bit outside IA32_VMX_CR4_FIXED1 (LA57 here).
        assert_eq!(mov_to_cr4(&c, 0x2620 | CR4_LA57), gp);
        // Clearing PAE in IA-32e mode.
        assert_eq!(mov_to_cr4(&c, 0x2600), gp);
        // PCIDE with CR3[11:0] != 0.
        let pcid = Cr4Context { cr3: 0x1001, ..c };
        assert_eq!(mov_to_cr4(&pcid, 0x2620 | CR4_PCIDE), gp);
        assert!(matches!(
            mov_to_cr4(&c, 0x2620 | CR4_PCIDE),
            Cr4Verdict::Complete { .. }
        ));
        // Clearing VMXE in VMX operation (SDM 23.8, IA32_VMX_CR4_FIXED0).
        let vmx = Cr4Context {
            vmx_operation: true,
            old: 0x2620,
            ..c
        };
        assert_eq!(mov_to_cr4(&vmx, 0x620), gp);
        // ... which outside VMX operation simply clears it.
        assert_eq!(
            mov_to_cr4(&Cr4Context { old: 0x2620, ..c }, 0x620),
            Cr4Verdict::Complete {
                hw: 0x620,
                vmxe: false
            }
        );
    }

    #[test]
    fn test_decode_mov_to_cr4() {
        let mut s = flat64();
        s.gprs.regs[0] = 0x2620;
        s.gprs.regs[9] = 0xffff_ffff_0000_2620;
        // mov cr4, rax
        assert_eq!(
            decode_mov_to_cr4(&s, &[0x0f, 0x22, 0xe0]),
            Some(MovToCr4 {
                value: 0x2620,
                len: 3
            })
        );
        // mov cr4, r9
        assert_eq!(
            decode_mov_to_cr4(&s, &[0x41, 0x0f, 0x22, 0xe1]).map(|m| (m.value, m.len)),
            Some((0xffff_ffff_0000_2620, 4))
        );
        // mov cr0, rax and mov rax, cr4 are not writes to CR4.
        assert_eq!(decode_mov_to_cr4(&s, &[0x0f, 0x22, 0xc0]), None);
        assert_eq!(decode_mov_to_cr4(&s, &[0x0f, 0x20, 0xe0]), None);
        // 32-bit mode: mov cr4, eax takes EAX.
        let mut p = s;
        p.msrs.efer = 0;
        p.cs.ar = 0xc09b;
        p.gprs.regs[0] = 0x1_0000_2620;
        assert_eq!(
            decode_mov_to_cr4(&p, &[0x0f, 0x22, 0xe0]).map(|m| m.value),
            Some(0x2620)
        );
    }

    /// 64-bit state with identity paging (2 MiB pages) in `ram`.
    fn paged(ram: &GuestRam) -> VcpuState {
        let mut m = RamView(ram);
        m.write_u64(0x1000, 0x2003).unwrap();
        m.write_u64(0x2000, 0x3003).unwrap();
        for i in 0..8u64 {
            m.write_u64(0x3000 + i * 8, (i << 21) | 0x83).unwrap();
        }
        let mut s = flat64();
        s.cr3 = 0x1000;
        s.msrs.efer = 0x500;
        s
    }

    #[test]
    fn test_handler_at_reads_64_bit_gates_and_skips_real_mode() {
        let ram = GuestRam::new(4 << 20).unwrap();
        let mut s = paged(&ram);
        s.idtr.base = 0x10_0000;
        s.idtr.limit = 32 * 16 - 1;
        let mut m = RamView(&ram);
        // #GP: present 64-bit interrupt gate to 0x1_2345_6789 (beyond RAM: only the value matters).
        let target: u64 = 0x1_2345_6789;
        let lo =
            (target & 0xffff) | (0x08 << 16) | (0x8e00 << 32) | ((target >> 16 & 0xffff) << 48);
        m.write_u64(0x10_0000 + 13 * 16, lo).unwrap();
        m.write_u64(0x10_0000 + 13 * 16 + 8, target >> 32).unwrap();
        assert_eq!(handler_at(&s, &mut m, 13), Some(target));
        // #UD: not present.
        m.write_u64(0x10_0000 + 6 * 16, lo & !(1 << 47)).unwrap();
        assert_eq!(handler_at(&s, &mut m, 6), None);
        assert_eq!(
            read_gate(&s, &mut m, 6),
            Err(crate::idt::GateError::NotPresent)
        );
        // Real mode: the IVT has an entry, but L0 arms nothing there.
        let mut r = s;
        (r.cr0, r.msrs.efer) = (0x10, 0);
        assert!(read_gate(&r, &mut m, 13).is_ok());
        assert_eq!(handler_at(&r, &mut m, 13), None);
        // Vector beyond the limit.
        s.idtr.limit = 13 * 16 - 1;
        assert_eq!(handler_at(&s, &mut m, 13), None);
    }

    #[test]
    fn test_trap_port_scan_finds_mov_dx_and_follows_jmp() {
        use vmcs12::GuestPhysMemory;
        let ram = GuestRam::new(4 << 20).unwrap();
        let s = paged(&ram);
        let mut m = RamView(&ram);
        // 0x20_0000: push 6; jmp 0x20_0010 ... 0x20_0010: push rax; mov dx, 0xe0e; out dx, eax
        m.write(0x20_0000, &[0x6a, 0x06, 0xeb, 0x0c]).unwrap();
        m.write(0x20_0010, &[0x50, 0x66, 0xba, 0x0e, 0x0e, 0xef])
            .unwrap();
        assert!(handler_uses_trap_port(&s, &mut m, 0x20_0000, 0x0e0e));
        // A handler that prints through 0x3f8 and halts.
        m.write(0x20_1000, &[0x66, 0xba, 0xf8, 0x03, 0xee, 0xf4])
            .unwrap();
        assert!(!handler_uses_trap_port(&s, &mut m, 0x20_1000, 0x0e0e));
    }

    #[test]
    fn test_classify_and_step_over_rearm() {
        let mut i = L1Intercepts::new(true);
        let ram = GuestRam::new(4 << 20).unwrap();
        let mut s = paged(&ram);
        s.idtr.base = 0x10_0000;
        s.idtr.limit = 32 * 16 - 1;
        let mut m = RamView(&ram);
        let gate =
            |t: u64| (t & 0xffff) | (0x08 << 16) | (0x8e00 << 32) | ((t >> 16 & 0xffff) << 48);
        m.write_u64(0x10_0000 + 13 * 16, gate(0x20_1000)).unwrap();
        m.write_u64(0x10_0000 + 6 * 16, gate(0x20_2000)).unwrap();
        let want = i.refresh(&s, &mut m, 0x0e0e).unwrap();
        assert_eq!(want.breakpoints[..2], [Some(0x20_1000), Some(0x20_2000)]);
        i.applied(want, true);
        assert_eq!(i.refresh(&s, &mut m, 0x0e0e), None, "unchanged: no ioctl");
        assert_eq!(i.classify(0x20_1000, 1), Hit::GeneralProtection);
        assert_eq!(i.classify(0x20_2000, 2), Hit::InvalidOpcode);
        assert_eq!(i.classify(0x20_3000, 0), Hit::Other);
        let step = i.step_over();
        i.applied(step, true);
        assert!(step.single_step && step.breakpoints.iter().all(Option::is_none));
        assert_eq!(i.refresh(&s, &mut m, 0x0e0e), None, "no refresh mid-step");
        assert_eq!(i.classify(0x20_1003, DR6_BS), Hit::StepDone);
        assert_eq!(i.rearm(), want);
        // A trap-port user gets no #UD breakpoint.
        i.applied(want, true);
        i.note_trap_port();
        assert_eq!(i.refresh(&s, &mut m, 0x0e0e).unwrap().breakpoints[1], None);
    }

    proptest::proptest! {
        /// Everything L0 reads of L1 here is L1's: any IDTR, GDTR, RSP,
        /// mode and memory contents give `None`/an error, never a panic.
        #[test]
        fn test_gates_frames_and_decoders_never_panic_on_any_l1(
            page in proptest::collection::vec(proptest::prelude::any::<u8>(), 4096),
            idtr in (proptest::prelude::any::<u64>(), proptest::prelude::any::<u16>()),
            gdtr in (proptest::prelude::any::<u64>(), proptest::prelude::any::<u16>()),
            rsp in proptest::prelude::any::<u64>(),
            bases in (proptest::prelude::any::<u64>(), proptest::prelude::any::<u64>()),
            sels in (proptest::prelude::any::<u16>(), proptest::prelude::any::<u16>()),
            mode in 0u8..4,
        ) {
            let ram = GuestRam::new(2 << 20).unwrap();
            for at in [0u64, 0x1000, 0x2000, 0x7_0000, 0x8_0000] {
                ram.write_bytes(at, &page).unwrap();
            }
            let mut s = flat64();
            match mode {
                0 => {}
                1 => s.cr0 &= !(1 << 31),
                2 => {
                    s.cr0 &= !(1 << 31);
                    s.msrs.efer = 0;
                }
                _ => s.cr0 = 0,
            }
            (s.idtr.base, s.idtr.limit) = idtr;
            (s.gdtr.base, s.gdtr.limit) = gdtr;
            (s.cs.base, s.ss.base) = bases;
            (s.cs.selector, s.ss.selector) = sels;
            s.gprs.regs[4] = rsp;
            s.rip = rsp.rotate_left(17);
            let mut m = RamView(&ram);
            for v in [GP_VECTOR, UD_VECTOR, 0xff] {
                if let Some(h) = handler_at(&s, &mut m, v) {
                    let _ = handler_uses_trap_port(&s, &mut m, h, 0xe0e);
                }
            }
            for ec in [false, true] {
                if let Ok(f) = read_frame(&s, &mut m, ec) {
                    let _ = unwind(&s, &f);
                }
            }
            let _ = decode_mov_to_cr4(&s, &page[..15]);
        }
    }
}
