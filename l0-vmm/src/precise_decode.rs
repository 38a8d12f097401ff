//! Precise mode's pure half (issue #9): which L2 instructions exit under
//! vmcs12's controls although KVM hides them from userspace, and where L0
//! must stop L2 to see them coming.
//!
//! [`plan`] decodes ahead of L2's RIP with iced-x86, following direct
//! branches (both arms of a conditional one), and collects the *frontier*:
//! every reachable instruction that may exit to L1 (SDM 26.1.2/26.1.3 under
//! vmcs12's controls), that reads CR0/CR4 while L1 owns bits of them
//! (the read shadow must be returned), that transfers control where L0
//! cannot follow statically (RET, indirect JMP/CALL, INT, IRET, far
//! transfers, SYSCALL, exceptions) or that cannot be decoded. Instructions
//! KVM exits on by itself (IN/OUT/INS/OUTS, HLT, RDMSR/WRMSR, VMX
//! instructions other than VMCALL) end a path without a stop: L0 gets
//! control there anyway and plans again. One frontier instruction gets the
//! breakpoint; with several, L0 stops at the first instruction on the
//! straight path from RIP that is on the frontier or is a branch (basic
//! block stepping) and single-steps the branch. `docs/precise-mode.md`.
//!
//! [`at_rip`] turns the instruction at RIP into the SDM's exit (exit
//! qualification, instruction length, VM-exit instruction information)
//! or into the MOV-from-CR0/CR4 / SMSW result L0 completes itself.

use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet};

use iced_x86::{
    Code, CodeSize, FlowControl, Instruction, InstructionInfoFactory, OpKind, Register,
};
use nested_exit::exit::{
    AddressSize, ControlReg, CrAccess, CrAccessType, DescriptorTableExit,
    DescriptorTableInstruction, DrAccess, DrDirection, InstructionInfo, LmswOperand, SegmentReg,
};
use nested_exit::{decide, Exit, L0Policy, VcpuState};
use vmcs12::controls::{PrimaryProcBased, SecondaryProcBased};
use vmcs12::{GuestPhysMemory, Vmcs12, VmcsField};

use crate::nested::{cs_linear, decode_one, mode_mask};
use crate::vmx_emul::{access_linear, Access, ExecMode};

/// Whether L0 runs L2 in precise mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PreciseMode {
    /// Decode ahead of L2 and stop it before every instruction whose exit
    /// KVM hides (the default: CPUID and VMCALL exit unconditionally, so
    /// every L1 asks for something).
    #[default]
    On,
    /// L2 runs at KVM speed; exits KVM hides never reach L1 (a trace line
    /// at the first VM entry names them).
    Off,
}

impl std::str::FromStr for PreciseMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "on" => Ok(Self::On),
            "off" => Ok(Self::Off),
            other => Err(format!("precise mode `{other}`: use `on` or `off`")),
        }
    }
}

thread_local! {
    static THREAD_DEFAULT: Cell<Option<PreciseMode>> = const { Cell::new(None) };
}

/// The environment variable that sets the default (`on` or `off`) for
/// every run without code (`L0_PRECISE=off l0-vmm demo`).
pub const PRECISE_ENV: &str = "L0_PRECISE";

/// The mode every `Nested` created on this thread from now on starts with
/// (`l0-vmm bench`, tests that boot a whole L1 through `run_kernel`).
/// `Nested::set_precise` changes one instance.
pub fn set_thread_default(mode: PreciseMode) {
    THREAD_DEFAULT.with(|d| d.set(Some(mode)));
}

/// The mode new `Nested` instances on this thread start with: the thread
/// default, else `L0_PRECISE` (`on`/`off`; anything else is ignored with a
/// warning), else on.
pub fn thread_default() -> PreciseMode {
    if let Some(m) = THREAD_DEFAULT.with(Cell::get) {
        return m;
    }
    match std::env::var(PRECISE_ENV) {
        Ok(v) => v.parse().unwrap_or_else(|e: String| {
            tracing::warn!("{PRECISE_ENV}: {e}; precise mode stays on");
            PreciseMode::On
        }),
        Err(_) => PreciseMode::On,
    }
}

const CR4_TSD: u64 = 1 << 2;
const CR4_DE: u64 = 1 << 3;
const CR4_PCE: u64 = 1 << 8;
const CR4_UMIP: u64 = 1 << 11;
const CR4_SMXE: u64 = 1 << 14;
const CR4_OSXSAVE: u64 = 1 << 18;

/// A general-purpose register destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dest {
    /// 0 = RAX ... 15 = R15.
    pub gpr: u8,
    /// Operand size in bytes (2, 4 or 8).
    pub size: u8,
}

impl Dest {
    /// Writes `value` as the instruction would: a 16-bit destination keeps
    /// bits 63:16, a 32-bit one is zero-extended (SDM 3.4.1.1).
    pub fn write(self, state: &mut VcpuState, value: u64) {
        let old = state.gprs.get(self.gpr);
        let v = match self.size {
            2 => (old & !0xffff) | (value & 0xffff),
            4 => value & 0xffff_ffff,
            _ => value,
        };
        state.gprs.set(self.gpr, v);
    }
}

/// What the instruction at L2's RIP needs from L0.
#[derive(Debug, Clone, PartialEq)]
pub enum AtRip {
    /// This VM exit, if `decide` gives it to L1 (else the instruction runs
    /// under KVM: step it).
    Exit(Exit),
    /// A read of CR0/CR4 (MOV from CR, SMSW to a register) whose result
    /// differs from what KVM would return: L0 writes `value` to `dest` and
    /// advances RIP by `len`.
    EmulateRead {
        /// Destination register.
        dest: Dest,
        /// The VMX view: guest bits outside the guest/host mask, read
        /// shadow inside it (SDM 26.3).
        value: u64,
        /// Instruction length.
        len: u64,
    },
    /// #UD (RDTSCP with "enable RDTSCP" 0, SDM 26.3).
    InvalidOpcode,
    /// Nothing for L0: let KVM run this one instruction (single step): a
    /// control transfer, code L0 cannot read or decode, or an instruction
    /// that does not exit with these registers.
    Step,
}

/// Why the breakpoint sits where it sits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopKind {
    /// An instruction that may exit to L1 (or read the CR0/CR4 shadow).
    Exit,
    /// A control transfer L0 single-steps.
    Transfer,
    /// Code L0 cannot read or decode.
    Undecodable,
    /// The decode budget ran out there.
    Budget,
}

/// Where L2 may run to.
#[derive(Debug, Clone, PartialEq)]
pub enum Plan {
    /// The instruction at RIP needs L0 now.
    AtRip(AtRip),
    /// Run with an instruction breakpoint at `linear` (RIP value `rip`).
    Stop {
        /// RIP of the stop.
        rip: u64,
        /// Its linear address (CS base added outside 64-bit mode).
        linear: u64,
        /// Why.
        kind: StopKind,
    },
    /// Nothing reachable from RIP needs L0 before KVM exits by itself (a
    /// closed loop without exits, or every path ends at IN/OUT/HLT/...).
    Free,
}

/// Precise mode's counters (run summary, `l0-vmm bench`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PreciseStats {
    /// Plans made (one per L2 run in precise mode).
    pub plans: u64,
    /// Instructions decoded for them.
    pub decoded: u64,
    /// Runs with a breakpoint at a stop.
    pub stops_armed: u64,
    /// Runs without any stop (nothing ahead needs L0).
    pub free_runs: u64,
    /// Breakpoints at a stop that fired.
    pub stop_hits: u64,
    /// Single steps (control transfers, exits L0 keeps, undecodable code).
    pub steps: u64,
    /// Exits synthesized at RIP and reflected to L1.
    pub reflected: u64,
    /// Exits synthesized at RIP that L1 did not ask for (stepped).
    pub kept_by_l0: u64,
    /// MOV from CR0/CR4 and SMSW completed with the read shadow.
    pub emulated_reads: u64,
    /// #UD injected (RDTSCP with "enable RDTSCP" 0).
    pub injected_ud: u64,
}

/// What one instruction means for the planner.
#[derive(Debug, Clone, PartialEq)]
enum Site {
    /// Runs without L0; execution continues at the next instruction.
    Plain,
    /// KVM exits to L0 on it by itself: the path ends, no stop needed.
    KvmExits,
    /// A direct branch: execution continues at these RIPs.
    Direct(Vec<u64>),
    /// A conditional direct branch (both arms in `Direct` terms).
    Conditional(Vec<u64>),
    /// Needs a stop.
    Stop(StopKind),
}

/// Reads L2 code through L2's paging (and L1's EPT, in `mem`), one page at
/// a time.
struct CodeReader<'a> {
    state: &'a VcpuState,
    mem: &'a mut dyn GuestPhysMemory,
    pages: BTreeMap<u64, Option<Box<[u8; 4096]>>>,
}

impl<'a> CodeReader<'a> {
    fn new(state: &'a VcpuState, mem: &'a mut dyn GuestPhysMemory) -> Self {
        Self {
            state,
            mem,
            pages: BTreeMap::new(),
        }
    }

    fn page(&mut self, page: u64) -> Option<&[u8; 4096]> {
        let (state, mem) = (self.state, &mut *self.mem);
        self.pages
            .entry(page)
            .or_insert_with(|| {
                let mut buf = Box::new([0u8; 4096]);
                match access_linear(state, mem, page, &mut buf[..], Access::Fetch) {
                    Ok(Ok(())) => Some(buf),
                    _ => None,
                }
            })
            .as_deref()
    }

    /// Up to 15 bytes at linear `la` (fewer before an unreadable page).
    fn bytes(&mut self, la: u64) -> Vec<u8> {
        let mut out = Vec::with_capacity(15);
        let mut a = la;
        while out.len() < 15 {
            let page = a & !0xfff;
            let off = (a & 0xfff) as usize;
            let Some(p) = self.page(page) else { break };
            let take = (4096 - off).min(15 - out.len());
            out.extend_from_slice(&p[off..off + take]);
            a = a.wrapping_add(take as u64);
        }
        out
    }
}

/// Decodes the instruction at `rip`; `None`: unreadable or invalid.
fn decode_at(code: &mut CodeReader<'_>, rip: u64) -> Option<Instruction> {
    let bytes = code.bytes(cs_linear(code.state, rip));
    decode_one(&bytes, ExecMode::of(code.state), rip)
}

/// Decodes the instruction at L2's RIP (tests, tracing).
pub fn decode_rip(state: &VcpuState, mem: &mut dyn GuestPhysMemory) -> Option<Instruction> {
    let mut code = CodeReader::new(state, mem);
    decode_at(&mut code, state.rip)
}

/// Current privilege level: 0 in real mode, 3 in virtual-8086 mode, SS.DPL
/// otherwise (SDM 5.5; VMX keeps it there, SDM 27.3.1.5).
fn cpl(state: &VcpuState) -> u8 {
    match ExecMode::of(state) {
        ExecMode::Real => 0,
        ExecMode::Virtual8086 => 3,
        _ => ((state.ss.ar >> 5) & 3) as u8,
    }
}

/// The execution controls of vmcs12 ("as if 0" rules of SDM 25.6.2).
struct Ctl {
    p: PrimaryProcBased,
    s: SecondaryProcBased,
}

impl Ctl {
    fn of(v: &Vmcs12) -> Self {
        let p = PrimaryProcBased::from_bits_retain(v.get32(VmcsField::CPU_BASED_VM_EXEC_CONTROL));
        let s = if p.contains(PrimaryProcBased::ACTIVATE_SECONDARY) {
            SecondaryProcBased::from_bits_retain(v.get32(VmcsField::SECONDARY_VM_EXEC_CONTROL))
        } else {
            SecondaryProcBased::empty()
        };
        Self { p, s }
    }
}

fn gpr_number(r: Register) -> Option<u8> {
    let full = r.full_register();
    (Register::RAX..=Register::R15)
        .contains(&full)
        .then(|| full.number() as u8)
}

/// An iced register's value (segment registers: their base, 0 for
/// ES/CS/SS/DS in 64-bit mode).
fn reg_value(state: &VcpuState, insn: &Instruction, reg: Register) -> Option<u64> {
    let long = ExecMode::of(state) == ExecMode::Long64;
    let seg = |s: &nested_exit::Segment, flat: bool| Some(if flat { 0 } else { s.base });
    match reg {
        Register::ES => seg(&state.es, long),
        Register::CS => seg(&state.cs, long),
        Register::SS => seg(&state.ss, long),
        Register::DS => seg(&state.ds, long),
        Register::FS => seg(&state.fs, false),
        Register::GS => seg(&state.gs, false),
        Register::RIP | Register::EIP => Some(insn.next_ip()),
        r => {
            let n = gpr_number(r)?;
            let v = state.gprs.get(n);
            Some(match r.size() {
                1 => v & 0xff,
                2 => v & 0xffff,
                4 => v & 0xffff_ffff,
                _ => v,
            })
        }
    }
}

/// The linear address of the memory operand `op` of `insn`.
fn operand_linear(state: &VcpuState, insn: &Instruction, op: u32) -> Option<u64> {
    let la = insn.virtual_address(op, 0, |reg, _, _| reg_value(state, insn, reg))?;
    Some(if ExecMode::of(state) == ExecMode::Long64 {
        la
    } else {
        la & 0xffff_ffff
    })
}

/// Operand information of a memory operand (SDM 28.2.5, Tables 28-10/11)
/// and the exit qualification (the displacement field, sign-extended).
fn memory_info(insn: &Instruction) -> (InstructionInfo, u64) {
    let mut factory = InstructionInfoFactory::new();
    let address_size = match factory
        .info(insn)
        .used_memory()
        .first()
        .map(|m| m.address_size())
    {
        Some(CodeSize::Code16) => AddressSize::Bits16,
        Some(CodeSize::Code32) => AddressSize::Bits32,
        _ => AddressSize::Bits64,
    };
    let segment = match insn.memory_segment() {
        Register::ES => SegmentReg::Es,
        Register::CS => SegmentReg::Cs,
        Register::SS => SegmentReg::Ss,
        Register::FS => SegmentReg::Fs,
        Register::GS => SegmentReg::Gs,
        _ => SegmentReg::Ds,
    };
    let rip_relative = insn.is_ip_rel_memory_operand();
    let raw = if rip_relative {
        insn.memory_displacement64().wrapping_sub(insn.next_ip())
    } else {
        insn.memory_displacement64()
    };
    let displacement = match insn.memory_displ_size() {
        1 => raw as u8 as i8 as i64 as u64,
        2 => raw as u16 as i16 as i64 as u64,
        4 => raw as u32 as i32 as i64 as u64,
        _ => raw,
    };
    let info = InstructionInfo {
        scaling: insn.memory_index_scale().trailing_zeros() as u8,
        reg1: 0,
        address_size,
        register_operand: false,
        operand_size_32: false,
        segment,
        index: gpr_number(insn.memory_index()),
        base: if rip_relative {
            None
        } else {
            gpr_number(insn.memory_base())
        },
        reg2: 0,
    };
    (info, displacement)
}

fn descriptor_exit(insn: &Instruction, which: DescriptorTableInstruction, len: u32) -> Exit {
    use DescriptorTableInstruction as D;
    let (mut info, displacement) = if insn.op0_kind() == OpKind::Memory {
        memory_info(insn)
    } else {
        let info = InstructionInfo {
            scaling: 0,
            reg1: gpr_number(insn.op0_register()).unwrap_or(0),
            address_size: AddressSize::Bits64,
            register_operand: true,
            operand_size_32: false,
            segment: SegmentReg::Ds,
            index: None,
            base: None,
            reg2: 0,
        };
        (info, 0)
    };
    // Table 28-10 bit 11: operand size of SGDT/SIDT/LGDT/LIDT (0: 16-bit,
    // 1: 32-bit; undefined from 64-bit mode).
    info.operand_size_32 = matches!(
        insn.code(),
        Code::Sgdt_m1632 | Code::Sidt_m1632 | Code::Lgdt_m1632 | Code::Lidt_m1632
    );
    let exit = DescriptorTableExit {
        instruction: which,
        info,
        displacement,
        len,
    };
    match which {
        D::Sgdt | D::Sidt | D::Lgdt | D::Lidt => Exit::GdtrIdtrAccess(exit),
        D::Sldt | D::Str | D::Lldt | D::Ltr => Exit::LdtrTrAccess(exit),
    }
}

/// An instruction that precise mode may have to stop at.
#[derive(Debug, Clone, PartialEq)]
enum Candidate {
    /// A VM exit; `reg_dependent`: whether it exits depends on register
    /// values (MOV to CR0/CR3/CR4, LMSW): decided exactly only at RIP.
    Exit { exit: Exit, reg_dependent: bool },
    /// MOV from CR0/CR4 or SMSW while L1 owns bits of the register.
    CrRead { cr4: bool, dest: Option<Dest> },
    /// RDTSCP without "enable RDTSCP": #UD.
    Ud,
}

/// The exit `insn` would cause with `state`'s registers, before checking
/// whether vmcs12 asks for it; `None`: not an instruction precise mode
/// handles, or one that faults first (SDM 26.1.1: #UD and privilege-based
/// faults have priority over VM exits).
fn candidate(
    insn: &Instruction,
    state: &VcpuState,
    mem: &mut dyn GuestPhysMemory,
) -> Option<Candidate> {
    use Code::*;
    use DescriptorTableInstruction as D;
    let len = insn.len() as u32;
    let cpl0 = cpl(state) == 0;
    let mode = ExecMode::of(state);
    let protected = !matches!(mode, ExecMode::Real | ExecMode::Virtual8086);
    let exit = |exit: Exit| {
        Some(Candidate::Exit {
            exit,
            reg_dependent: false,
        })
    };
    let mask = if mode == ExecMode::Long64 {
        u64::MAX
    } else {
        0xffff_ffff
    };
    match insn.code() {
        Cpuid => exit(Exit::Cpuid { len }),
        Vmcall => exit(Exit::Vmcall { len }),
        Getsecd | Getsecq if state.cr4 & CR4_SMXE != 0 => exit(Exit::Getsec { len }),
        Invd if cpl0 => exit(Exit::Invd { len }),
        Xsetbv if cpl0 && state.cr4 & CR4_OSXSAVE != 0 => exit(Exit::Xsetbv { len }),
        Wbinvd | Wbnoinvd if cpl0 => exit(Exit::Wbinvd { len }),
        Invlpg_m if cpl0 => exit(Exit::Invlpg {
            linear_address: operand_linear(state, insn, 0)?,
            len,
        }),
        Rdtsc if cpl0 || state.cr4 & CR4_TSD == 0 => exit(Exit::Rdtsc { len }),
        Rdtscp if cpl0 || state.cr4 & CR4_TSD == 0 => exit(Exit::Rdtscp { len }),
        Rdpmc if cpl0 || state.cr4 & CR4_PCE != 0 => exit(Exit::Rdpmc { len }),
        Monitorw | Monitord | Monitorq if cpl0 => exit(Exit::Monitor { len }),
        Mwait if cpl0 => exit(Exit::Mwait { len }),
        Pause => exit(Exit::Pause { len }),
        Rdrand_r16 | Rdrand_r32 | Rdrand_r64 | Rdseed_r16 | Rdseed_r32 | Rdseed_r64 => {
            // Table 28-15: destination register 6:3, operand size 12:11.
            let reg = u32::from(gpr_number(insn.op0_register())?);
            let size = match insn.op0_register().size() {
                2 => 0,
                4 => 1,
                _ => 2,
            };
            let info = (reg << 3) | (size << 11);
            exit(
                if matches!(insn.code(), Rdrand_r16 | Rdrand_r32 | Rdrand_r64) {
                    Exit::Rdrand { info, len }
                } else {
                    Exit::Rdseed { info, len }
                },
            )
        }
        Mov_cr_r32 | Mov_cr_r64 | Mov_r32_cr | Mov_r64_cr if cpl0 => {
            let to_cr = matches!(insn.code(), Mov_cr_r32 | Mov_cr_r64);
            let (crr, gr) = if to_cr {
                (insn.op0_register(), insn.op1_register())
            } else {
                (insn.op1_register(), insn.op0_register())
            };
            let cr = match crr {
                Register::CR0 => ControlReg::Cr0,
                Register::CR3 => ControlReg::Cr3,
                Register::CR4 => ControlReg::Cr4,
                Register::CR8 if mode == ExecMode::Long64 => ControlReg::Cr8,
                _ => return None,
            };
            let gpr = gpr_number(gr)?;
            if !to_cr && matches!(cr, ControlReg::Cr0 | ControlReg::Cr4) {
                return Some(Candidate::CrRead {
                    cr4: cr == ControlReg::Cr4,
                    dest: Some(Dest {
                        gpr,
                        size: gr.size() as u8,
                    }),
                });
            }
            let access = CrAccess {
                cr,
                access: if to_cr {
                    CrAccessType::MovToCr
                } else {
                    CrAccessType::MovFromCr
                },
                lmsw_operand: LmswOperand::Register,
                gpr,
                lmsw_source: 0,
            };
            Some(Candidate::Exit {
                exit: Exit::CrAccess {
                    access,
                    written: to_cr.then(|| state.gprs.get(gpr) & mask),
                    len,
                },
                reg_dependent: to_cr && cr != ControlReg::Cr8,
            })
        }
        Clts if cpl0 => exit(Exit::CrAccess {
            access: CrAccess {
                cr: ControlReg::Cr0,
                access: CrAccessType::Clts,
                lmsw_operand: LmswOperand::Register,
                gpr: 0,
                lmsw_source: 0,
            },
            written: None,
            len,
        }),
        Lmsw_rm16 | Lmsw_r32m16 | Lmsw_r64m16 if cpl0 => {
            let (operand, source) = if insn.op0_kind() == OpKind::Memory {
                let la = operand_linear(state, insn, 0)?;
                let mut b = [0u8; 2];
                access_linear(state, mem, la, &mut b, Access::Read)
                    .ok()?
                    .ok()?;
                (LmswOperand::Memory, u16::from_le_bytes(b))
            } else {
                let r = insn.op0_register();
                (LmswOperand::Register, state.gprs.get(gpr_number(r)?) as u16)
            };
            Some(Candidate::Exit {
                exit: Exit::CrAccess {
                    access: CrAccess {
                        cr: ControlReg::Cr0,
                        access: CrAccessType::Lmsw,
                        lmsw_operand: operand,
                        gpr: 0,
                        lmsw_source: source,
                    },
                    written: None,
                    len,
                },
                reg_dependent: true,
            })
        }
        Smsw_rm16 | Smsw_r32m16 | Smsw_r64m16
            if cpl0 || state.cr4 & CR4_UMIP == 0 || !protected =>
        {
            let dest = (insn.op0_kind() == OpKind::Register).then(|| Dest {
                gpr: gpr_number(insn.op0_register()).unwrap_or(0),
                size: insn.op0_register().size() as u8,
            });
            Some(Candidate::CrRead { cr4: false, dest })
        }
        Mov_dr_r32 | Mov_dr_r64 | Mov_r32_dr | Mov_r64_dr if cpl0 => {
            let to_dr = matches!(insn.code(), Mov_dr_r32 | Mov_dr_r64);
            let (drr, gr) = if to_dr {
                (insn.op0_register(), insn.op1_register())
            } else {
                (insn.op1_register(), insn.op0_register())
            };
            let dr = drr.number() as u8;
            // SDM 18.2.2: DR4/DR5 with CR4.DE = 1 are #UD, before the exit.
            if dr > 7 || (matches!(dr, 4 | 5) && state.cr4 & CR4_DE != 0) {
                return None;
            }
            exit(Exit::MovDr {
                access: DrAccess {
                    dr,
                    direction: if to_dr {
                        DrDirection::ToDr
                    } else {
                        DrDirection::FromDr
                    },
                    gpr: gpr_number(gr)?,
                },
                len,
            })
        }
        Sgdt_m1632_16 | Sgdt_m1632 | Sgdt_m1664 if cpl0 || state.cr4 & CR4_UMIP == 0 => {
            exit(descriptor_exit(insn, D::Sgdt, len))
        }
        Sidt_m1632_16 | Sidt_m1632 | Sidt_m1664 if cpl0 || state.cr4 & CR4_UMIP == 0 => {
            exit(descriptor_exit(insn, D::Sidt, len))
        }
        Lgdt_m1632_16 | Lgdt_m1632 | Lgdt_m1664 if cpl0 => {
            exit(descriptor_exit(insn, D::Lgdt, len))
        }
        Lidt_m1632_16 | Lidt_m1632 | Lidt_m1664 if cpl0 => {
            exit(descriptor_exit(insn, D::Lidt, len))
        }
        // LLDT/LTR/SLDT/STR are #UD outside protected mode (SDM Vol. 2).
        Sldt_rm16 | Sldt_r32m16 | Sldt_r64m16
            if protected && (cpl0 || state.cr4 & CR4_UMIP == 0) =>
        {
            exit(descriptor_exit(insn, D::Sldt, len))
        }
        Str_rm16 | Str_r32m16 | Str_r64m16 if protected && (cpl0 || state.cr4 & CR4_UMIP == 0) => {
            exit(descriptor_exit(insn, D::Str, len))
        }
        Lldt_rm16 | Lldt_r32m16 | Lldt_r64m16 if protected && cpl0 => {
            exit(descriptor_exit(insn, D::Lldt, len))
        }
        Ltr_rm16 | Ltr_r32m16 | Ltr_r64m16 if protected && cpl0 => {
            exit(descriptor_exit(insn, D::Ltr, len))
        }
        _ => None,
    }
}

/// The guest/host mask and read shadow of CR0 (`cr4` false) or CR4.
fn mask_shadow(v: &Vmcs12, cr4: bool) -> (u64, u64) {
    if cr4 {
        (
            v.get(VmcsField::CR4_GUEST_HOST_MASK),
            v.get(VmcsField::CR4_READ_SHADOW),
        )
    } else {
        (
            v.get(VmcsField::CR0_GUEST_HOST_MASK),
            v.get(VmcsField::CR0_READ_SHADOW),
        )
    }
}

/// What L2 reads from CR0/CR4 under VMX (SDM 26.3): guest bits where the
/// mask is 0, read-shadow bits where it is 1. CR4.VMXE, which L0 keeps
/// virtual, comes from vmcs12's GUEST_CR4.
pub fn vmx_cr_view(state: &VcpuState, v: &Vmcs12, cr4: bool) -> u64 {
    let (mask, shadow) = mask_shadow(v, cr4);
    // CR4.VMXE outside the mask reads as KVM holds it (0): KVM refuses the
    // bit in L2 as in L1, so an L2 that writes back what it read (`mov rax,
    // cr4; or rax, x; mov cr4, rax`) must not get it (docs/precise-mode.md).
    let real = if cr4 { state.cr4 } else { state.cr0 };
    (real & !mask) | (shadow & mask)
}

/// Whether `c` needs a stop under vmcs12's controls (with `state`'s
/// registers for the register-independent cases).
fn needs_stop(c: &Candidate, v: &Vmcs12, policy: &L0Policy, mem: &dyn GuestPhysMemory) -> bool {
    let ctl = Ctl::of(v);
    match c {
        Candidate::Ud => true,
        Candidate::CrRead { cr4, .. } => {
            let (mask, _) = mask_shadow(v, *cr4);
            mask != 0
        }
        Candidate::Exit {
            exit,
            reg_dependent: true,
        } => match exit {
            Exit::CrAccess { access, .. } => match (access.cr, access.access) {
                (ControlReg::Cr3, _) => ctl.p.contains(PrimaryProcBased::CR3_LOAD_EXITING),
                (ControlReg::Cr4, _) => mask_shadow(v, true).0 != 0,
                (_, CrAccessType::Lmsw) => mask_shadow(v, false).0 & 0xf != 0,
                _ => mask_shadow(v, false).0 != 0,
            },
            _ => true,
        },
        // PAUSE-loop exiting needs a loop longer than PLE_Window: only
        // "PAUSE exiting" makes a single PAUSE exit.
        Candidate::Exit {
            exit: Exit::Pause { .. },
            ..
        } => ctl.p.contains(PrimaryProcBased::PAUSE_EXITING),
        Candidate::Exit { exit, .. } => decide(exit, v, mem, policy).reflects(),
    }
}

/// The candidate at `insn` if it needs a stop.
fn stop_candidate(
    insn: &Instruction,
    state: &VcpuState,
    v: &Vmcs12,
    policy: &L0Policy,
    mem: &mut dyn GuestPhysMemory,
) -> Option<Candidate> {
    let mut c = candidate(insn, state, mem)?;
    if insn.code() == Code::Rdtscp && !Ctl::of(v).s.contains(SecondaryProcBased::ENABLE_RDTSCP) {
        c = Candidate::Ud;
    }
    needs_stop(&c, v, policy, &*mem).then_some(c)
}

/// KVM exits to userspace on these by itself (this host: all port I/O,
/// HLT, every MSR access of L2, VMX instructions other than VMCALL).
fn kvm_exits(insn: &Instruction) -> bool {
    use Code::*;
    let c = insn.code();
    matches!(
        c,
        Hlt | Rdmsr
            | Wrmsr
            | In_AL_imm8
            | In_AX_imm8
            | In_EAX_imm8
            | In_AL_DX
            | In_AX_DX
            | In_EAX_DX
            | Out_imm8_AL
            | Out_imm8_AX
            | Out_imm8_EAX
            | Out_DX_AL
            | Out_DX_AX
            | Out_DX_EAX
            | Insb_m8_DX
            | Insw_m16_DX
            | Insd_m32_DX
            | Outsb_DX_m8
            | Outsw_DX_m16
            | Outsd_DX_m32
            | Vmlaunch
            | Vmresume
            | Vmxoff
            | Vmxon_m64
            | Vmclear_m64
            | Vmptrld_m64
            | Vmptrst_m64
            | Vmread_rm32_r32
            | Vmread_rm64_r64
            | Vmwrite_r32_rm32
            | Vmwrite_r64_rm64
            | Invept_r32_m128
            | Invept_r64_m128
            | Invvpid_r32_m128
            | Invvpid_r64_m128
            | Vmfunc
    )
}

fn near_target(insn: &Instruction) -> Option<u64> {
    matches!(
        insn.op0_kind(),
        OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64
    )
    .then(|| insn.near_branch_target())
}

fn site(
    insn: &Instruction,
    state: &VcpuState,
    v: &Vmcs12,
    policy: &L0Policy,
    mem: &mut dyn GuestPhysMemory,
) -> Site {
    if stop_candidate(insn, state, v, policy, mem).is_some() {
        return Site::Stop(StopKind::Exit);
    }
    if kvm_exits(insn) {
        return Site::KvmExits;
    }
    match insn.flow_control() {
        FlowControl::Next => Site::Plain,
        FlowControl::UnconditionalBranch | FlowControl::Call => match near_target(insn) {
            Some(t) => Site::Direct(vec![t]),
            None => Site::Stop(StopKind::Transfer),
        },
        FlowControl::ConditionalBranch => match near_target(insn) {
            Some(t) => Site::Conditional(vec![t, insn.next_ip()]),
            None => Site::Stop(StopKind::Transfer),
        },
        _ => Site::Stop(StopKind::Transfer),
    }
}

/// What the instruction at RIP needs, given that it is a stop site.
fn at_rip_of(
    insn: Option<&Instruction>,
    state: &VcpuState,
    v: &Vmcs12,
    policy: &L0Policy,
    mem: &mut dyn GuestPhysMemory,
) -> AtRip {
    let Some(insn) = insn else {
        return AtRip::Step;
    };
    match stop_candidate(insn, state, v, policy, mem) {
        Some(Candidate::Exit { exit, .. }) => AtRip::Exit(exit),
        Some(Candidate::Ud) => AtRip::InvalidOpcode,
        Some(Candidate::CrRead { cr4, dest }) => {
            let value = vmx_cr_view(state, v, cr4);
            let kvm = if cr4 { state.cr4 } else { state.cr0 };
            match dest {
                Some(dest) if value != kvm => AtRip::EmulateRead {
                    dest,
                    value,
                    len: insn.len() as u64,
                },
                // SMSW to memory: KVM stores the guest's value (a limit,
                // docs/precise-mode.md).
                _ => AtRip::Step,
            }
        }
        None => AtRip::Step,
    }
}

/// What the instruction at L2's RIP needs from L0 right now, if it is an
/// instruction precise mode stops at (`None`: it is not; plan ahead).
pub fn at_rip(
    state: &VcpuState,
    code: &mut dyn GuestPhysMemory,
    v: &Vmcs12,
    policy: &L0Policy,
) -> Option<AtRip> {
    match plan(state, code, v, policy, 1).0 {
        Plan::AtRip(a) => Some(a),
        _ => None,
    }
}

/// Plans L2's next run from its RIP (see the module docs); `budget` bounds
/// the instructions decoded. Returns the plan and the number decoded.
pub fn plan(
    state: &VcpuState,
    code: &mut dyn GuestPhysMemory,
    v: &Vmcs12,
    policy: &L0Policy,
    budget: usize,
) -> (Plan, usize) {
    let mode = ExecMode::of(state);
    let mask = mode_mask(mode);
    let mut reader = CodeReader::new(state, code);
    let first = decode_at(&mut reader, state.rip);
    let first_site = match &first {
        Some(i) => site(i, state, v, policy, &mut *reader.mem),
        None => Site::Stop(StopKind::Undecodable),
    };
    if let Site::Stop(_) = first_site {
        let a = at_rip_of(first.as_ref(), state, v, policy, &mut *reader.mem);
        return (Plan::AtRip(a), 1);
    }
    // Explore the direct-branch graph from RIP.
    let mut sites: BTreeMap<u64, Site> = BTreeMap::new();
    sites.insert(state.rip, first_site);
    let mut frontier: BTreeMap<u64, StopKind> = BTreeMap::new();
    let mut work: Vec<u64> = Vec::new();
    let mut seen: BTreeSet<u64> = BTreeSet::from([state.rip]);
    let succ = |s: &Site, next: u64| -> Vec<u64> {
        match s {
            Site::Plain => vec![next],
            Site::Direct(t) | Site::Conditional(t) => t.clone(),
            _ => Vec::new(),
        }
    };
    let first_next = first.as_ref().map_or(0, |i| i.next_ip() & mask);
    for n in succ(&sites[&state.rip], first_next) {
        if seen.insert(n & mask) {
            work.push(n & mask);
        }
    }
    let mut decoded = 1usize;
    let mut next_of: BTreeMap<u64, u64> = BTreeMap::from([(state.rip, first_next)]);
    while let Some(rip) = work.pop() {
        if decoded >= budget {
            frontier.insert(rip, StopKind::Budget);
            continue;
        }
        decoded += 1;
        let insn = decode_at(&mut reader, rip);
        let s = match &insn {
            Some(i) => site(i, state, v, policy, &mut *reader.mem),
            None => Site::Stop(StopKind::Undecodable),
        };
        let next = insn.as_ref().map_or(0, |i| i.next_ip() & mask);
        next_of.insert(rip, next);
        if let Site::Stop(k) = s {
            frontier.insert(rip, k);
        }
        for n in succ(&s, next) {
            if seen.insert(n & mask) {
                work.push(n & mask);
            }
        }
        sites.insert(rip, s);
    }
    let stop = |rip: u64, kind: StopKind| Plan::Stop {
        rip,
        linear: cs_linear(state, rip),
        kind,
    };
    match frontier.len() {
        0 => return (Plan::Free, decoded),
        1 => {
            let (&rip, &kind) = frontier
                .iter()
                .next()
                .unwrap_or((&state.rip, &StopKind::Budget));
            return (stop(rip, kind), decoded);
        }
        _ => {}
    }
    // Several stops: basic-block stepping on the straight path from RIP
    // (unconditional direct jumps followed).
    let mut rip = state.rip;
    let mut walked = BTreeSet::new();
    while walked.insert(rip) {
        if let Some(&k) = frontier.get(&rip) {
            return (stop(rip, k), decoded);
        }
        match sites.get(&rip) {
            Some(Site::Plain) => rip = next_of.get(&rip).copied().unwrap_or(rip),
            Some(Site::Direct(t)) if t.len() == 1 => rip = t[0] & mask,
            Some(Site::KvmExits) => return (Plan::Free, decoded),
            Some(Site::Conditional(_) | Site::Direct(_)) => {
                if rip == state.rip {
                    return (Plan::AtRip(AtRip::Step), decoded);
                }
                return (stop(rip, StopKind::Transfer), decoded);
            }
            // Not decoded (budget): stop there.
            _ => return (stop(rip, StopKind::Budget), decoded),
        }
    }
    // A closed straight loop: the frontier is elsewhere, unreachable.
    (Plan::Free, decoded)
}

/// The vmcs12 controls that ask for exits KVM hides, in words (the trace
/// line of precise mode off).
pub fn hidden_exits(v: &Vmcs12) -> Vec<&'static str> {
    let ctl = Ctl::of(v);
    type P = PrimaryProcBased;
    type S = SecondaryProcBased;
    let mut out = vec!["CPUID", "GETSEC", "INVD", "XSETBV"];
    let checks: [(bool, &'static str); 16] = [
        (ctl.p.contains(P::INVLPG_EXITING), "INVLPG"),
        (ctl.p.contains(P::RDTSC_EXITING), "RDTSC/RDTSCP"),
        (ctl.p.contains(P::RDPMC_EXITING), "RDPMC"),
        (ctl.p.contains(P::MWAIT_EXITING), "MWAIT"),
        (ctl.p.contains(P::MONITOR_EXITING), "MONITOR"),
        (ctl.p.contains(P::PAUSE_EXITING), "PAUSE"),
        (ctl.p.contains(P::MOV_DR_EXITING), "MOV DR"),
        (ctl.p.contains(P::CR3_LOAD_EXITING), "MOV to CR3"),
        (ctl.p.contains(P::CR3_STORE_EXITING), "MOV from CR3"),
        (ctl.p.contains(P::CR8_LOAD_EXITING), "MOV to CR8"),
        (ctl.p.contains(P::CR8_STORE_EXITING), "MOV from CR8"),
        (ctl.s.contains(S::WBINVD_EXITING), "WBINVD"),
        (ctl.s.contains(S::RDRAND_EXITING), "RDRAND"),
        (ctl.s.contains(S::RDSEED_EXITING), "RDSEED"),
        (
            ctl.s.contains(S::DESC_TABLE_EXITING),
            "LGDT/LIDT/LLDT/LTR/SGDT/SIDT/SLDT/STR",
        ),
        (
            v.get(VmcsField::CR0_GUEST_HOST_MASK) != 0
                || v.get(VmcsField::CR4_GUEST_HOST_MASK) != 0,
            "MOV to CR0/CR4, CLTS, LMSW (and the read shadows of MOV from CR0/CR4, SMSW)",
        ),
    ];
    out.extend(checks.iter().filter(|c| c.0).map(|c| c.1));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmx_emul::CR4_VMXE;
    use nested_exit::Segment;
    use proptest::prelude::*;
    use vmcs12::FlatMemory;

    type F = VmcsField;
    const CODE: u64 = 0x10_0000;

    /// 4 MiB identity-mapped with 2 MiB pages (64-bit paging).
    fn memory(code: &[u8]) -> FlatMemory {
        let mut mem = FlatMemory::new(0x40_0000);
        mem.write_u64(0x1000, 0x2000 | 3).unwrap();
        mem.write_u64(0x2000, 0x3000 | 3).unwrap();
        mem.write_u64(0x3000, 0x83).unwrap();
        mem.write_u64(0x3008, 0x20_0000 | 0x83).unwrap();
        mem.write(CODE, code).unwrap();
        mem
    }

    fn state() -> VcpuState {
        let code = Segment {
            selector: 0x08,
            base: 0,
            limit: 0xffff_ffff,
            ar: 0xa09b,
        };
        let data = Segment {
            selector: 0x10,
            base: 0,
            limit: 0xffff_ffff,
            ar: 0xc093,
        };
        let mut s = VcpuState {
            rip: CODE,
            rflags: 2,
            cr0: 0x8005_0031,
            cr3: 0x1000,
            cr4: 0x20,
            cs: code,
            ss: data,
            ds: data,
            es: data,
            fs: data,
            gs: data,
            ..Default::default()
        };
        s.msrs.efer = 0xd00;
        s
    }

    fn vmcs(primary: PrimaryProcBased, secondary: SecondaryProcBased) -> Vmcs12 {
        let mut v = Vmcs12::new();
        v.set(F::CPU_BASED_VM_EXEC_CONTROL, u64::from(primary.bits()));
        v.set(F::SECONDARY_VM_EXEC_CONTROL, u64::from(secondary.bits()));
        v
    }

    fn none() -> Vmcs12 {
        vmcs(PrimaryProcBased::HLT_EXITING, SecondaryProcBased::empty())
    }

    fn plan_of(code: &[u8], s: &VcpuState, v: &Vmcs12) -> Plan {
        let mut mem = memory(code);
        plan(s, &mut mem, v, &L0Policy::default(), 256).0
    }

    fn exit_at_rip(code: &[u8], s: &VcpuState, v: &Vmcs12) -> Exit {
        match plan_of(code, s, v) {
            Plan::AtRip(AtRip::Exit(e)) => e,
            other => panic!("no exit at RIP: {other:?}"),
        }
    }

    #[test]
    fn test_cpuid_at_rip_is_exit_10_with_length_2() {
        let e = exit_at_rip(&[0x0f, 0xa2], &state(), &none());
        assert_eq!(e, Exit::Cpuid { len: 2 });
        assert_eq!(e.to_info().instruction_len, 2);
        // A NOP at RIP is not an exit: L0 plans ahead instead.
        assert!(!matches!(
            plan_of(&[0x90, 0xf4], &state(), &none()),
            Plan::AtRip(_)
        ));
    }

    #[test]
    fn test_plan_stops_at_the_first_exiting_instruction_ahead() {
        // add eax, ebx; xor ecx, ecx; cpuid; hlt
        let p = plan_of(
            &[0x01, 0xd8, 0x31, 0xc9, 0x0f, 0xa2, 0xf4],
            &state(),
            &none(),
        );
        assert_eq!(
            p,
            Plan::Stop {
                rip: CODE + 4,
                linear: CODE + 4,
                kind: StopKind::Exit
            }
        );
    }

    #[test]
    fn test_loop_without_exits_runs_free_at_kvm_speed() {
        // l: add eax, ebx; dec ecx; jnz l; hlt
        let p = plan_of(
            &[0x01, 0xd8, 0xff, 0xc9, 0x75, 0xfa, 0xf4],
            &state(),
            &none(),
        );
        assert_eq!(p, Plan::Free);
        // The same loop with a CPUID inside: one stop, at the CPUID.
        // l: add eax, ebx; cpuid; dec ecx; jnz l; hlt
        let p = plan_of(
            &[0x01, 0xd8, 0x0f, 0xa2, 0xff, 0xc9, 0x75, 0xf8, 0xf4],
            &state(),
            &none(),
        );
        assert!(matches!(p, Plan::Stop { rip, kind: StopKind::Exit, .. } if rip == CODE + 2));
    }

    #[test]
    fn test_ret_is_a_stop_and_is_stepped_at_rip() {
        let p = plan_of(&[0x01, 0xd8, 0xc3], &state(), &none());
        assert!(matches!(p, Plan::Stop { rip, kind: StopKind::Transfer, .. } if rip == CODE + 2));
        let mut s = state();
        s.rip = CODE + 2;
        assert_eq!(
            plan_of(&[0x01, 0xd8, 0xc3], &s, &none()),
            Plan::AtRip(AtRip::Step)
        );
    }

    #[test]
    fn test_two_stops_ahead_fall_back_to_the_branch() {
        // add; jz a; cpuid; hlt; a: ret  -> frontier {cpuid, ret}: stop at jz.
        let code = [0x01, 0xd8, 0x74, 0x03, 0x0f, 0xa2, 0xf4, 0xc3];
        let p = plan_of(&code, &state(), &none());
        assert!(matches!(p, Plan::Stop { rip, kind: StopKind::Transfer, .. } if rip == CODE + 2));
        // At the branch itself: one single step.
        let mut s = state();
        s.rip = CODE + 2;
        assert_eq!(plan_of(&code, &s, &none()), Plan::AtRip(AtRip::Step));
    }

    #[test]
    fn test_rdtsc_stops_only_with_rdtsc_exiting() {
        let code = [0x0f, 0x31, 0xf4];
        assert_eq!(plan_of(&code, &state(), &none()), Plan::Free);
        let v = vmcs(PrimaryProcBased::RDTSC_EXITING, SecondaryProcBased::empty());
        assert_eq!(exit_at_rip(&code, &state(), &v), Exit::Rdtsc { len: 2 });
        // CR4.TSD at CPL 3: #GP has priority over the exit (SDM 26.1.1).
        let mut s = state();
        s.cr4 |= CR4_TSD;
        s.ss.ar |= 3 << 5;
        assert_eq!(plan_of(&code, &s, &v), Plan::Free);
    }

    #[test]
    fn test_rdtscp_without_enable_rdtscp_is_ud() {
        let code = [0x0f, 0x01, 0xf9];
        assert_eq!(
            plan_of(&code, &state(), &none()),
            Plan::AtRip(AtRip::InvalidOpcode)
        );
        let v = vmcs(
            PrimaryProcBased::ACTIVATE_SECONDARY | PrimaryProcBased::RDTSC_EXITING,
            SecondaryProcBased::ENABLE_RDTSCP,
        );
        assert_eq!(exit_at_rip(&code, &state(), &v), Exit::Rdtscp { len: 3 });
    }

    #[test]
    fn test_mov_to_cr0_carries_qualification_and_value() {
        let code = [0x0f, 0x22, 0xc3]; // mov cr0, rbx
        let mut v = none();
        let mut s = state();
        s.gprs.set(3, 0x8005_0039);
        // No bit owned by L1: never a stop.
        assert!(!matches!(plan_of(&code, &s, &v), Plan::AtRip(_)));
        v.set(F::CR0_GUEST_HOST_MASK, 0x8);
        let e = exit_at_rip(&code, &s, &v);
        let Exit::CrAccess {
            access,
            written,
            len,
        } = e
        else {
            panic!("{e:?}")
        };
        assert_eq!(access.encode(), 0x300);
        assert_eq!((written, len), (Some(0x8005_0039), 3));
        // The decision is exact at RIP: TS = shadow (0) -> L0's.
        s.gprs.set(3, 0x8005_0031);
        let e = exit_at_rip(&code, &s, &v);
        assert!(!decide(&e, &v, &FlatMemory::new(0), &L0Policy::default()).reflects());
        // At CPL 3 MOV to CR0 is #GP first.
        s.ss.ar |= 3 << 5;
        assert!(!matches!(plan_of(&code, &s, &v), Plan::AtRip(_)));
    }

    #[test]
    fn test_clts_and_lmsw_qualifications() {
        let mut v = none();
        v.set(F::CR0_GUEST_HOST_MASK, 0xf);
        v.set(F::CR0_READ_SHADOW, 0x8);
        let e = exit_at_rip(&[0x0f, 0x06], &state(), &v);
        assert_eq!(e.to_info().qualification, 0x20);
        // lmsw bx (0F 01 /6, modrm f3) with BX = 0x1: source in bits 31:16.
        let mut s = state();
        s.gprs.set(3, 0x1);
        let e = exit_at_rip(&[0x0f, 0x01, 0xf3], &s, &v);
        assert_eq!(e.to_info().qualification, 0x3 << 4 | 0x1 << 16);
    }

    #[test]
    fn test_mov_from_cr0_returns_the_read_shadow() {
        let code = [0x0f, 0x20, 0xc1]; // mov rcx, cr0
        let mut v = none();
        v.set(F::CR0_GUEST_HOST_MASK, 0x8);
        v.set(F::CR0_READ_SHADOW, 0x8);
        let s = state();
        match plan_of(&code, &s, &v) {
            Plan::AtRip(AtRip::EmulateRead { dest, value, len }) => {
                assert_eq!(dest, Dest { gpr: 1, size: 8 });
                assert_eq!(value, s.cr0 | 0x8);
                assert_eq!(len, 3);
            }
            other => panic!("{other:?}"),
        }
        // Shadow equal to the real bit: KVM's answer is right, step it.
        v.set(F::CR0_READ_SHADOW, 0);
        assert_eq!(plan_of(&code, &s, &v), Plan::AtRip(AtRip::Step));
    }

    #[test]
    fn test_mov_from_cr4_does_not_show_unowned_vmxe() {
        let code = [0x0f, 0x20, 0xe0]; // mov rax, cr4
        let mut v = none();
        v.set(F::GUEST_CR4, 0x20 | CR4_VMXE);
        // Not owned: KVM's value (no VMXE), so writing it back is safe; the
        // read is no stop at all.
        assert!(!matches!(plan_of(&code, &state(), &v), Plan::AtRip(_)));
        // L1 owns VMXE with the shadow set: the shadow is shown.
        v.set(F::CR4_GUEST_HOST_MASK, CR4_VMXE);
        v.set(F::CR4_READ_SHADOW, CR4_VMXE);
        match plan_of(&code, &state(), &v) {
            Plan::AtRip(AtRip::EmulateRead { value, .. }) => {
                assert_eq!(value & CR4_VMXE, CR4_VMXE)
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn test_dest_write_widths() {
        let mut s = state();
        s.gprs.set(0, 0xffff_ffff_ffff_ffff);
        Dest { gpr: 0, size: 2 }.write(&mut s, 0x1234);
        assert_eq!(s.gprs.get(0), 0xffff_ffff_ffff_1234);
        Dest { gpr: 0, size: 4 }.write(&mut s, 0x1_8000_0031);
        assert_eq!(s.gprs.get(0), 0x8000_0031);
    }

    #[test]
    fn test_invlpg_qualification_is_the_linear_address() {
        let v = vmcs(
            PrimaryProcBased::INVLPG_EXITING,
            SecondaryProcBased::empty(),
        );
        let mut s = state();
        s.gprs.set(3, 0x60_0000);
        let e = exit_at_rip(&[0x0f, 0x01, 0x7b, 0x10], &s, &v);
        assert_eq!(
            e,
            Exit::Invlpg {
                linear_address: 0x60_0010,
                len: 4
            }
        );
        assert_eq!(
            plan_of(&[0x0f, 0x01, 0x7b, 0x10, 0xf4], &s, &none()),
            Plan::Free
        );
    }

    #[test]
    fn test_descriptor_table_instruction_information() {
        let v = vmcs(
            PrimaryProcBased::ACTIVATE_SECONDARY,
            SecondaryProcBased::DESC_TABLE_EXITING,
        );
        // sgdt [rbx+8]
        let e = exit_at_rip(&[0x0f, 0x01, 0x43, 0x08], &state(), &v);
        let info = e.to_info();
        assert_eq!(info.basic_reason(), 46);
        assert_eq!(info.qualification, 8);
        let ii = InstructionInfo::decode(info.instruction_info).unwrap();
        assert_eq!(ii.base, Some(3));
        assert_eq!(ii.index, None);
        assert_eq!(ii.address_size, AddressSize::Bits64);
        assert_eq!(ii.segment, SegmentReg::Ds);
        assert!(!ii.register_operand);
        assert_eq!((info.instruction_info >> 28) & 3, 0, "identity SGDT");
        // lidt [rax+rcx*4-0x10] (0F 01 /3, SIB)
        let e = exit_at_rip(&[0x0f, 0x01, 0x5c, 0x88, 0xf0], &state(), &v);
        let info = e.to_info();
        let ii = InstructionInfo::decode(info.instruction_info).unwrap();
        assert_eq!((ii.base, ii.index, ii.scaling), (Some(0), Some(1), 2));
        assert_eq!(info.qualification, (-0x10i64) as u64);
        assert_eq!((info.instruction_info >> 28) & 3, 3, "identity LIDT");
        // lldt ax: reason 47, register operand.
        let e = exit_at_rip(&[0x0f, 0x00, 0xd0], &state(), &v);
        let info = e.to_info();
        assert_eq!(info.basic_reason(), 47);
        let ii = InstructionInfo::decode(info.instruction_info).unwrap();
        assert!(ii.register_operand);
        assert_eq!(ii.reg1, 0);
        assert_eq!((info.instruction_info >> 28) & 3, 2, "identity LLDT");
        // Without the control: no stop.
        assert_eq!(
            plan_of(&[0x0f, 0x00, 0xd0, 0xf4], &state(), &none()),
            Plan::Free
        );
    }

    #[test]
    fn test_mov_dr_qualification() {
        let v = vmcs(
            PrimaryProcBased::MOV_DR_EXITING,
            SecondaryProcBased::empty(),
        );
        let e = exit_at_rip(&[0x0f, 0x21, 0xf8], &state(), &v); // mov rax, dr7
        assert_eq!(e.to_info().qualification, 0x17);
        let e = exit_at_rip(&[0x0f, 0x23, 0xc3], &state(), &v); // mov dr0, rbx
        assert_eq!(e.to_info().qualification, 0x300);
        assert_eq!(
            plan_of(&[0x0f, 0x21, 0xf8, 0xf4], &state(), &none()),
            Plan::Free
        );
    }

    #[test]
    fn test_rdrand_instruction_information() {
        let v = vmcs(
            PrimaryProcBased::ACTIVATE_SECONDARY,
            SecondaryProcBased::RDRAND_EXITING,
        );
        // rdrand ebx (0F C7 /6, modrm f3)
        let e = exit_at_rip(&[0x0f, 0xc7, 0xf3], &state(), &v);
        assert_eq!(
            e,
            Exit::Rdrand {
                info: (3 << 3) | (1 << 11),
                len: 3
            }
        );
    }

    #[test]
    fn test_instructions_kvm_exits_on_end_a_path_without_a_stop() {
        // vmread rax, rbx; cpuid: L0 regains control at the VMREAD.
        assert_eq!(
            plan_of(&[0x0f, 0x78, 0xd8, 0x0f, 0xa2], &state(), &none()),
            Plan::Free
        );
        assert_eq!(
            plan_of(&[0xe6, 0x80, 0x0f, 0xa2], &state(), &none()),
            Plan::Free
        );
        // A NOP instead: the CPUID is ahead.
        assert!(matches!(
            plan_of(&[0x90, 0x90, 0x0f, 0xa2], &state(), &none()),
            Plan::Stop {
                kind: StopKind::Exit,
                ..
            }
        ));
        // VMCALL does not reach L0 by itself: a stop.
        assert!(matches!(
            plan_of(&[0x90, 0x0f, 0x01, 0xc1], &state(), &none()),
            Plan::Stop {
                kind: StopKind::Exit,
                ..
            }
        ));
    }

    #[test]
    fn test_code_written_after_a_plan_is_seen_by_the_next_plan() {
        let mut mem = memory(&[0x90, 0x90, 0x90, 0xf4]);
        let s = state();
        let v = none();
        let policy = L0Policy::default();
        assert_eq!(plan(&s, &mut mem, &v, &policy, 256).0, Plan::Free);
        mem.write(CODE + 1, &[0x0f, 0xa2]).unwrap();
        assert!(matches!(
            plan(&s, &mut mem, &v, &policy, 256).0,
            Plan::Stop { rip, .. } if rip == CODE + 1
        ));
    }

    #[test]
    fn test_unreadable_code_is_a_stop() {
        // jmp to 0x30_0000 + ... outside the 4 MiB of RAM: rel32 jump.
        let target: i32 = 0x50_0000 - (CODE as i32 + 5);
        let mut code = vec![0xe9];
        code.extend_from_slice(&target.to_le_bytes());
        assert!(matches!(
            plan_of(&code, &state(), &none()),
            Plan::Stop {
                rip: 0x50_0000,
                kind: StopKind::Undecodable,
                ..
            }
        ));
        let mut s = state();
        s.rip = 0x50_0000;
        assert_eq!(plan_of(&code, &s, &none()), Plan::AtRip(AtRip::Step));
    }

    #[test]
    fn test_budget_bounds_the_exploration() {
        let code = vec![0x90; 600];
        let mut mem = memory(&code);
        let (p, n) = plan(&state(), &mut mem, &none(), &L0Policy::default(), 16);
        assert_eq!(n, 16);
        assert!(matches!(p, Plan::Stop { kind: StopKind::Budget, rip, .. } if rip == CODE + 16));
    }

    #[test]
    fn test_protected_mode_stop_is_a_linear_address() {
        let mut s = state();
        s.msrs.efer = 0;
        s.cr0 = 0x11;
        s.cs.ar = 0xc09b;
        s.cs.base = 0x1000;
        s.rip = CODE - 0x1000;
        let p = plan_of(&[0x90, 0x0f, 0xa2], &s, &none());
        assert!(
            matches!(p, Plan::Stop { rip, linear, .. } if rip == CODE - 0xfff && linear == CODE + 1)
        );
    }

    #[test]
    fn test_unconditional_exits_and_their_fault_checks() {
        assert_eq!(
            exit_at_rip(&[0x0f, 0x01, 0xc1], &state(), &none()),
            Exit::Vmcall { len: 3 }
        );
        // XSETBV: #UD with CR4.OSXSAVE = 0 comes first (SDM 26.1.1).
        assert_eq!(
            plan_of(&[0x0f, 0x01, 0xd1, 0xf4], &state(), &none()),
            Plan::Free
        );
        let mut s = state();
        s.cr4 |= CR4_OSXSAVE;
        assert_eq!(
            exit_at_rip(&[0x0f, 0x01, 0xd1], &s, &none()),
            Exit::Xsetbv { len: 3 }
        );
        // GETSEC only with CR4.SMXE.
        assert_eq!(plan_of(&[0x0f, 0x37, 0xf4], &state(), &none()), Plan::Free);
        s.cr4 |= CR4_SMXE;
        assert_eq!(
            exit_at_rip(&[0x0f, 0x37], &s, &none()),
            Exit::Getsec { len: 2 }
        );
        // INVD at CPL 3: #GP first.
        s.ss.ar |= 3 << 5;
        assert_eq!(plan_of(&[0x0f, 0x08, 0xf4], &s, &none()), Plan::Free);
    }

    #[test]
    fn test_mov_to_cr3_is_decided_with_the_target_list_at_rip() {
        let code = [0x0f, 0x22, 0xd8]; // mov cr3, rax
        assert_eq!(
            plan_of(&[0x0f, 0x22, 0xd8, 0xf4], &state(), &none()),
            Plan::Free
        );
        let mut v = vmcs(
            PrimaryProcBased::CR3_LOAD_EXITING,
            SecondaryProcBased::empty(),
        );
        v.set(F::CR3_TARGET_COUNT, 1);
        v.set(F::CR3_TARGET_VALUE0, 0x5000);
        let mut s = state();
        s.gprs.set(0, 0x5000);
        let policy = L0Policy::default();
        let e = exit_at_rip(&code, &s, &v);
        assert_eq!(e.to_info().qualification, 0x3);
        assert!(!decide(&e, &v, &FlatMemory::new(0), &policy).reflects());
        s.gprs.set(0, 0x6000);
        let e = exit_at_rip(&code, &s, &v);
        assert!(decide(&e, &v, &FlatMemory::new(0), &policy).reflects());
    }

    #[test]
    fn test_hidden_exits_name_the_controls() {
        let v = vmcs(
            PrimaryProcBased::RDTSC_EXITING,
            SecondaryProcBased::DESC_TABLE_EXITING,
        );
        let h = hidden_exits(&v);
        assert!(h.contains(&"CPUID") && h.contains(&"RDTSC/RDTSCP"));
        // Secondary controls count only with "activate secondary controls".
        assert!(!h.iter().any(|s| s.starts_with("LGDT")));
    }

    #[test]
    fn test_precise_mode_parses() {
        assert_eq!("off".parse::<PreciseMode>(), Ok(PreciseMode::Off));
        assert!("maybe".parse::<PreciseMode>().is_err());
        set_thread_default(PreciseMode::Off);
        assert_eq!(thread_default(), PreciseMode::Off);
        set_thread_default(PreciseMode::On);
    }

    proptest! {
        #[test]
        fn test_plan_never_panics_on_any_code(
            code in proptest::collection::vec(any::<u8>(), 1..64),
            rbx in any::<u64>(),
            mask in any::<u64>(),
        ) {
            let mut s = state();
            s.gprs.set(3, rbx);
            let mut v = vmcs(PrimaryProcBased::from_bits_retain(u32::MAX), SecondaryProcBased::from_bits_retain(u32::MAX));
            v.set(F::CR0_GUEST_HOST_MASK, mask);
            let mut mem = memory(&code);
            let (p, n) = plan(&s, &mut mem, &v, &L0Policy::default(), 64);
            prop_assert!(n <= 64);
            if let Plan::Stop { rip, .. } = p {
                prop_assert_ne!(rip, s.rip);
            }
        }

        /// Any mode, RIP (also at a page end or the 64 KiB wrap), CS base,
        /// register file, CR4, CPL and vmcs12 controls: a plan, no panic.
        #[test]
        fn test_plan_never_panics_in_any_mode(
            code in proptest::collection::vec(any::<u8>(), 1..48),
            gprs in any::<[u64; 16]>(),
            words in any::<[u64; 4]>(),
            off in any::<u16>(),
            mode in 0..3u8,
            far: bool,
            ctls in any::<[u32; 2]>(),
        ) {
            let mut s = state();
            for (i, g) in gprs.iter().enumerate() {
                s.gprs.set(i as u8, *g);
            }
            let off = u64::from(off);
            let mut mem = memory(&code);
            mem.write(CODE + (off & 0xfff), &code).unwrap();
            s.rip = CODE + (off & 0xfff);
            if mode > 0 {
                s.cr0 = if mode == 1 { 0x11 } else { 0x10 };
                s.msrs.efer = 0;
                s.cs.ar = if mode == 1 { 0xc09b } else { 0x9b };
                if mode == 2 {
                    s.cs.base = CODE;
                    s.rip = 0xfff0 | (off & 0xf);
                    mem.write(CODE + s.rip, &code).unwrap();
                }
            }
            if far {
                s.rip = words[0];
                s.cs.base = words[1];
            }
            s.cr4 = words[2];
            s.ss.ar = (s.ss.ar & !0x60) | ((words[3] as u32) & 0x60);
            let mut v = vmcs(
                PrimaryProcBased::from_bits_retain(ctls[0]),
                SecondaryProcBased::from_bits_retain(ctls[1]),
            );
            v.set(F::CR0_GUEST_HOST_MASK, words[3]);
            v.set(F::CR4_GUEST_HOST_MASK, words[3].rotate_left(13));
            let (_, n) = plan(&s, &mut mem, &v, &L0Policy::default(), 32);
            prop_assert!(n <= 32);
            let _ = at_rip(&s, &mut mem, &v, &L0Policy::default());
        }
    }
}
