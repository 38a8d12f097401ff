//! Reading an IDT gate and unwinding the frame an exception delivery
//! pushed, for any vCPU L0 watches through handler breakpoints: L2's
//! exception-bitmap intercepts (`nested/intercept.rs`) and L1's own #GP/#UD
//! (`l1_intercept.rs`). Pure: a [`VcpuState`] and guest memory in, the gate
//! or the state before the delivery out (SDM Vol. 3 6.10-6.14).

use nested_exit::{Segment, VcpuState};
use vmcs12::GuestPhysMemory;

use crate::vmx_emul::{access_linear, Access};

/// CR0.PE.
const CR0_PE: u64 = 1;

/// How the CPU delivers through a gate: the frame layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    /// IA-32e mode: 16-byte gates, 8-byte slots, SS:RSP always pushed.
    Long,
    /// Protected mode, 32-bit interrupt/trap gate: 4-byte slots.
    Protected32,
    /// Protected mode, 16-bit gate: 2-byte slots.
    Protected16,
    /// Real mode: the IVT, IP/CS/FLAGS as 2-byte slots, no error code.
    Real,
}

/// One IDT gate (or IVT entry) of L2.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gate {
    /// Linear address of the handler (the breakpoint address).
    pub linear: u64,
    /// The frame a delivery through it pushes.
    pub kind: FrameKind,
}

/// Why a gate gives no handler address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum GateError {
    /// The vector lies beyond IDTR.limit.
    #[error("beyond the IDT limit")]
    BeyondLimit,
    /// The gate or its code-segment descriptor cannot be read.
    #[error("not readable through L2's paging")]
    Unreadable,
    /// P = 0.
    #[error("not present")]
    NotPresent,
    /// A task gate (delivery is a task switch: no handler address).
    #[error("a task gate")]
    TaskGate,
    /// A type no interrupt or trap gate has.
    #[error("not an interrupt or trap gate")]
    BadType,
}

/// L2's state before a delivery, recovered from the frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unwound {
    /// The state before the delivery (RIP as pushed).
    pub pre: VcpuState,
    /// The error code, when the frame has one.
    pub error_code: Option<u32>,
}

/// The frame layout of a delivery in `state`'s mode.
pub fn mode_frame(state: &VcpuState) -> FrameKind {
    if state.msrs.efer & VcpuState::EFER_LMA != 0 {
        FrameKind::Long
    } else if state.cr0 & CR0_PE != 0 {
        FrameKind::Protected32
    } else {
        FrameKind::Real
    }
}

fn read_linear(state: &VcpuState, mem: &mut dyn GuestPhysMemory, la: u64, buf: &mut [u8]) -> bool {
    matches!(access_linear(state, mem, la, buf, Access::Read), Ok(Ok(())))
}

/// Reads L2's gate for `vector` (IA-32e: 16-byte gates; protected mode:
/// 8-byte gates, the handler's CS base from its descriptor; real mode: the
/// IVT's CS:IP).
pub fn read_gate(
    state: &VcpuState,
    mem: &mut dyn GuestPhysMemory,
    vector: u8,
) -> Result<Gate, GateError> {
    let kind = mode_frame(state);
    let v = u64::from(vector);
    let size: u64 = match kind {
        FrameKind::Long => 16,
        FrameKind::Real => 4,
        _ => 8,
    };
    if v * size + size - 1 > u64::from(state.idtr.limit) {
        return Err(GateError::BeyondLimit);
    }
    let mut gate = [0u8; 16];
    let buf = gate.get_mut(..size as usize).ok_or(GateError::Unreadable)?;
    let base = match kind {
        FrameKind::Long => state.idtr.base,
        _ => state.idtr.base & 0xffff_ffff,
    };
    if !read_linear(state, mem, base.wrapping_add(v * size), buf) {
        return Err(GateError::Unreadable);
    }
    let lo = u64::from_le_bytes(gate[..8].try_into().map_err(|_| GateError::Unreadable)?);
    if kind == FrameKind::Real {
        let ip = lo & 0xffff;
        let cs = (lo >> 16) & 0xffff;
        return Ok(Gate {
            linear: (cs << 4) + ip,
            kind,
        });
    }
    if lo & (1 << 47) == 0 {
        return Err(GateError::NotPresent);
    }
    let ty = (lo >> 40) & 0xf;
    let offset = (lo & 0xffff) | ((lo >> 32) & 0xffff_0000);
    match (kind, ty) {
        (FrameKind::Long, 0xe | 0xf) => {
            let hi = u64::from_le_bytes(gate[8..].try_into().map_err(|_| GateError::Unreadable)?);
            Ok(Gate {
                linear: offset | (hi << 32),
                kind,
            })
        }
        (FrameKind::Long, _) => Err(GateError::BadType),
        (_, 5) => Err(GateError::TaskGate),
        (_, 6 | 7 | 0xe | 0xf) => {
            let selector = (lo >> 16) as u16;
            let cs = load_segment(state, mem, selector).ok_or(GateError::Unreadable)?;
            let offset = if ty & 8 == 0 { offset & 0xffff } else { offset };
            Ok(Gate {
                linear: cs.base.wrapping_add(offset) & 0xffff_ffff,
                kind: if ty & 8 == 0 {
                    FrameKind::Protected16
                } else {
                    FrameKind::Protected32
                },
            })
        }
        _ => Err(GateError::BadType),
    }
}

/// Loads a code or data segment from L2's GDT or LDT in VMX
/// access-rights format (the accessed bit set, as a load sets it); a null
/// selector is an unusable segment. `None`: beyond the table limit,
/// unreadable or not present.
pub fn load_segment(
    state: &VcpuState,
    mem: &mut dyn GuestPhysMemory,
    selector: u16,
) -> Option<Segment> {
    if selector & !3 == 0 {
        return Some(Segment {
            selector,
            ar: Segment::AR_UNUSABLE | (u32::from(selector & 3) << 5),
            ..Segment::default()
        });
    }
    let (base, limit) = if selector & 4 != 0 {
        if state.ldtr.unusable() {
            return None;
        }
        (state.ldtr.base, u64::from(state.ldtr.limit))
    } else {
        (state.gdtr.base, u64::from(state.gdtr.limit))
    };
    let index = u64::from(selector & !7);
    if index + 7 > limit {
        return None;
    }
    let mut d = [0u8; 8];
    if !read_linear(state, mem, base.wrapping_add(index), &mut d) {
        return None;
    }
    let d = u64::from_le_bytes(d);
    if d & (1 << 47) == 0 {
        return None;
    }
    let mut ar = (((d >> 40) & 0xff) | (((d >> 52) & 0xf) << 12)) as u32;
    if ar & 0x10 != 0 {
        ar |= 1;
    }
    let raw_limit = ((d & 0xffff) | ((d >> 32) & 0xf_0000)) as u32;
    let limit = if ar & (1 << 15) != 0 {
        (raw_limit << 12) | 0xfff
    } else {
        raw_limit
    };
    Some(Segment {
        selector,
        base: ((d >> 16) & 0xff_ffff) | ((d >> 32) & 0xff00_0000),
        limit,
        ar,
    })
}

/// Whether an RFLAGS image can be real: bit 1 set; bits 3, 5, 15 and
/// 22-63 clear (SDM Vol. 1 3.4.3).
fn plausible_rflags(f: u64) -> bool {
    f & 2 != 0 && f & (0x8028 | !0x3f_ffff) == 0
}

/// A real-mode or virtual-8086 segment for `selector` (base = selector *
/// 16), with the other attributes of `like`.
fn real_segment(selector: u16, like: Segment) -> Segment {
    Segment {
        selector,
        base: u64::from(selector) << 4,
        ..like
    }
}

/// L2's state before the delivery whose frame sits at the handler's stack
/// pointer in `state` (RIP, CS, RFLAGS, RSP, SS and, with `with_error_code`,
/// the error code first). IA-32e frames always hold SS:RSP; 32- and 16-bit
/// frames only across a privilege change (and ES, DS, FS, GS after them
/// from virtual-8086 mode); real-mode frames are IP, CS, FLAGS. A CS or SS
/// other than the handler's is loaded from L2's descriptor tables. `None`:
/// the frame cannot be read or does not look like one.
pub fn unwind_frame(
    state: &VcpuState,
    mem: &mut dyn GuestPhysMemory,
    kind: FrameKind,
    with_error_code: bool,
) -> Option<Unwound> {
    let slot: u64 = match kind {
        FrameKind::Long => 8,
        FrameKind::Protected32 => 4,
        FrameKind::Protected16 | FrameKind::Real => 2,
    };
    let with_error_code = with_error_code && kind != FrameKind::Real;
    let sp = state.gprs.get(4);
    let sp_mask: u64 = match kind {
        FrameKind::Long => u64::MAX,
        FrameKind::Real => 0xffff,
        _ if state.ss.ar & (1 << 14) != 0 => 0xffff_ffff,
        _ => 0xffff,
    };
    let sp_base = match kind {
        FrameKind::Long => 0,
        _ => state.ss.base,
    };
    let read = |mem: &mut dyn GuestPhysMemory, index: u64| -> Option<u64> {
        let off = (sp.wrapping_add(index * slot)) & sp_mask;
        let mut b = [0u8; 8];
        let part = b.get_mut(..slot as usize)?;
        let la = sp_base.wrapping_add(off);
        let la = if kind == FrameKind::Long {
            la
        } else {
            la & 0xffff_ffff
        };
        read_linear(state, mem, la, part).then(|| u64::from_le_bytes(b))
    };
    let first = u64::from(with_error_code);
    let error_code = match with_error_code {
        true => Some(read(mem, 0)?),
        false => None,
    };
    let rip = read(mem, first)?;
    let cs = read(mem, first + 1)? as u16;
    let flags = read(mem, first + 2)?;
    let mut pre = *state;
    pre.rip = rip;
    match kind {
        FrameKind::Real => {
            if flags & 2 == 0 {
                return None;
            }
            pre.rflags = (state.rflags & !0xffff) | flags;
            pre.cs = real_segment(cs, state.cs);
            pre.gprs
                .set(4, (sp & !0xffff) | (sp.wrapping_add(6) & 0xffff));
        }
        FrameKind::Long => {
            if !plausible_rflags(flags) || cs & !3 == 0 {
                return None;
            }
            if error_code.is_some_and(|e| e >> 32 != 0) {
                return None;
            }
            let rsp = read(mem, first + 3)?;
            let ss = read(mem, first + 4)? as u16;
            pre.rflags = flags;
            pre.cs = segment_or_current(state, mem, cs, state.cs)?;
            pre.ss = segment_or_current(state, mem, ss, state.ss)?;
            pre.gprs.set(4, rsp);
        }
        FrameKind::Protected32 | FrameKind::Protected16 => {
            let flags = match kind {
                FrameKind::Protected16 => (state.rflags & !0xffff) | flags,
                _ => flags,
            };
            if !plausible_rflags(flags) {
                return None;
            }
            let vm86 = flags & VcpuState::RFLAGS_VM != 0;
            pre.rflags = flags;
            if vm86 {
                pre.cs = real_segment(cs, vm86_segment());
            } else {
                if cs & !3 == 0 {
                    return None;
                }
                pre.cs = segment_or_current(state, mem, cs, state.cs)?;
            }
            let outer = vm86 || (cs & 3) != (state.cs.selector & 3);
            if outer {
                let esp = read(mem, first + 3)?;
                let ss = read(mem, first + 4)? as u16;
                pre.gprs.set(4, esp);
                if vm86 {
                    pre.ss = real_segment(ss, vm86_segment());
                    let mut segs = [0u16; 4];
                    for (i, s) in segs.iter_mut().enumerate() {
                        *s = read(mem, first + 5 + i as u64)? as u16;
                    }
                    pre.es = real_segment(segs[0], vm86_segment());
                    pre.ds = real_segment(segs[1], vm86_segment());
                    pre.fs = real_segment(segs[2], vm86_segment());
                    pre.gs = real_segment(segs[3], vm86_segment());
                } else {
                    pre.ss = segment_or_current(state, mem, ss, state.ss)?;
                }
            } else {
                let n = first + 3;
                pre.gprs
                    .set(4, (sp & !sp_mask) | (sp.wrapping_add(n * slot) & sp_mask));
            }
        }
    }
    Some(Unwound {
        pre,
        error_code: error_code.map(|e| e as u32),
    })
}

/// Virtual-8086 segment attributes (SDM 26.3.1.2: AR 0xf3, limit 0xffff).
fn vm86_segment() -> Segment {
    Segment {
        selector: 0,
        base: 0,
        limit: 0xffff,
        ar: 0xf3,
    }
}

/// The handler's own segment when the frame names the same selector, else
/// the descriptor from L2's tables.
fn segment_or_current(
    state: &VcpuState,
    mem: &mut dyn GuestPhysMemory,
    selector: u16,
    current: Segment,
) -> Option<Segment> {
    if selector == current.selector {
        Some(current)
    } else {
        load_segment(state, mem, selector)
    }
}

/// Guest memory and L2 states for the gate and frame tests (shared with
/// `nested::intercept`'s tests).
#[cfg(test)]
pub(crate) mod fixtures {
    use super::*;
    use nested_exit::state::DescriptorTable;
    use vmcs12::FlatMemory;

    pub const PML4: u64 = 0x1000;
    pub const GDT: u64 = 0x6000;
    pub const IDT: u64 = 0x6800;
    pub const CODE: u64 = 0x10_0000;
    pub const H6: u64 = 0x5000;
    pub const STACK: u64 = 0x9_0000;

    /// 4 MiB identity-mapped with 2 MiB pages; a GDT with 64-bit kernel
    /// code 0x08, data 0x10, 32-bit code 0x18 (base 0x1000), user data
    /// 0x23 and 64-bit user code 0x2b.
    pub fn memory() -> FlatMemory {
        let mut m = FlatMemory::new(0x40_0000);
        m.write_u64(PML4, 0x2000 | 3).unwrap();
        m.write_u64(0x2000, 0x3000 | 3).unwrap();
        m.write_u64(0x3000, 0x83).unwrap();
        m.write_u64(0x3008, 0x20_0000 | 0x83).unwrap();
        let gdt: [u64; 6] = [
            0,
            0x00af_9b00_0000_ffff,
            0x00cf_9300_0000_ffff,
            0x00cf_9b00_1000_ffff,
            0x00cf_f300_0000_ffff,
            0x00af_fb00_0000_ffff,
        ];
        for (i, d) in gdt.iter().enumerate() {
            m.write_u64(GDT + 8 * i as u64, *d).unwrap();
        }
        m
    }

    pub fn seg(selector: u16, ar: u32) -> Segment {
        Segment {
            selector,
            base: 0,
            limit: 0xffff_ffff,
            ar,
        }
    }

    /// A 64-bit ring-0 L2 at CODE with the GDT and IDT above.
    pub fn state64() -> VcpuState {
        let mut s = VcpuState {
            rip: CODE,
            rflags: 2,
            cr0: 0x8000_0031,
            cr3: PML4,
            cr4: 1 << 5,
            cs: seg(0x08, 0xa09b),
            ss: seg(0x10, 0xc093),
            ds: seg(0x10, 0xc093),
            es: seg(0x10, 0xc093),
            fs: seg(0x10, 0xc093),
            gs: seg(0x10, 0xc093),
            ldtr: Segment {
                ar: Segment::AR_UNUSABLE,
                ..Segment::default()
            },
            gdtr: DescriptorTable {
                base: GDT,
                limit: 0x2f,
            },
            idtr: DescriptorTable {
                base: IDT,
                limit: 0xfff,
            },
            ..VcpuState::default()
        };
        s.msrs.efer = 0xd00 | VcpuState::EFER_LMA;
        s.gprs.set(4, STACK);
        s
    }

    /// A flat 32-bit protected-mode L2 without paging.
    pub fn state32() -> VcpuState {
        let mut s = state64();
        s.cr0 = 0x11;
        s.cr4 = 0;
        s.msrs.efer = 0;
        s.cs = seg(0x18, 0xc09b);
        s.cs.base = 0x1000;
        s.ss = seg(0x10, 0xc093);
        s.idtr.limit = 0x7ff;
        s
    }

    pub fn gate64(m: &mut FlatMemory, vector: u8, handler: u64, ty: u64, present: bool) {
        let p = if present { 0x80 } else { 0 };
        let lo = (handler & 0xffff)
            | (0x08 << 16)
            | ((p | ty) << 40)
            | (((handler >> 16) & 0xffff) << 48);
        m.write_u64(IDT + 16 * u64::from(vector), lo).unwrap();
        m.write_u64(IDT + 16 * u64::from(vector) + 8, handler >> 32)
            .unwrap();
    }

    pub fn gate32(m: &mut FlatMemory, vector: u8, selector: u64, handler: u64, ty: u64) {
        let lo = (handler & 0xffff)
            | (selector << 16)
            | ((0x80 | ty) << 40)
            | (((handler >> 16) & 0xffff) << 48);
        m.write_u64(IDT + 8 * u64::from(vector), lo).unwrap();
    }

    /// Writes 8-byte slots at `at`.
    pub fn push64(m: &mut FlatMemory, at: u64, slots: &[u64]) {
        for (i, v) in slots.iter().enumerate() {
            m.write_u64(at + 8 * i as u64, *v).unwrap();
        }
    }

    pub fn push32(m: &mut FlatMemory, at: u64, slots: &[u32]) {
        for (i, v) in slots.iter().enumerate() {
            m.write_u32(at + 4 * i as u64, *v).unwrap();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::*;
    use super::*;
    use nested_exit::state::DescriptorTable;

    #[test]
    fn test_gates_of_each_mode() {
        let mut m = memory();
        let s = state64();
        gate64(&mut m, 6, 0xffff_8000_0012_3456, 0xe, true);
        gate64(&mut m, 7, H6, 0xe, false);
        gate64(&mut m, 8, H6, 0xc, true);
        let g = read_gate(&s, &mut m, 6).unwrap();
        assert_eq!((g.linear, g.kind), (0xffff_8000_0012_3456, FrameKind::Long));
        assert_eq!(read_gate(&s, &mut m, 7), Err(GateError::NotPresent));
        assert_eq!(read_gate(&s, &mut m, 8), Err(GateError::BadType));
        let mut short = s;
        short.idtr.limit = 16 * 6 + 14;
        assert_eq!(read_gate(&short, &mut m, 6), Err(GateError::BeyondLimit));
        short.idtr.limit = 16 * 6 + 15;
        assert!(read_gate(&short, &mut m, 6).is_ok());
        // 32-bit: 8-byte gates, the handler's CS base (0x1000) added.
        let mut m = memory();
        let s = state32();
        gate32(&mut m, 13, 0x18, 0x2345, 0xf);
        gate32(&mut m, 6, 0x08, 0x100, 0x6);
        gate32(&mut m, 8, 0x20, 0, 0x5);
        gate32(&mut m, 9, 0x40, 0x100, 0xe);
        let g = read_gate(&s, &mut m, 13).unwrap();
        assert_eq!((g.linear, g.kind), (0x3345, FrameKind::Protected32));
        assert_eq!(
            read_gate(&s, &mut m, 6).unwrap().kind,
            FrameKind::Protected16
        );
        assert_eq!(read_gate(&s, &mut m, 8), Err(GateError::TaskGate));
        // Selector 0x40 lies beyond the GDT limit.
        assert_eq!(read_gate(&s, &mut m, 9), Err(GateError::Unreadable));
        // Real mode: the IVT's CS:IP.
        let mut r = state32();
        r.cr0 = 0x10;
        r.idtr = DescriptorTable {
            base: 0,
            limit: 0x3ff,
        };
        m.write_u32(6 * 4, 0x0700_0123).unwrap();
        let g = read_gate(&r, &mut m, 6).unwrap();
        assert_eq!((g.linear, g.kind), (0x7123, FrameKind::Real));
    }

    #[test]
    fn test_unwind_64bit_frame_same_privilege_and_from_user() {
        let mut m = memory();
        let mut s = state64();
        // #GP(0x18) at ring 0: error code, RIP, CS, RFLAGS, RSP, SS.
        push64(
            &mut m,
            0x8_ffc0,
            &[0x18, CODE + 3, 0x08, 0x10246, STACK, 0x10],
        );
        s.gprs.set(4, 0x8_ffc0);
        s.rflags = 2;
        let u = unwind_frame(&s, &mut m, FrameKind::Long, true).unwrap();
        assert_eq!(u.error_code, Some(0x18));
        assert_eq!(
            (u.pre.rip, u.pre.rflags, u.pre.gprs.get(4)),
            (CODE + 3, 0x10246, STACK)
        );
        assert_eq!(u.pre.cs, s.cs);
        // From ring 3: CS 0x2b and SS 0x23 come from the GDT.
        push64(&mut m, 0x8_ffc8, &[0x40_1000, 0x2b, 0x202, 0x7_0000, 0x23]);
        s.gprs.set(4, 0x8_ffc8);
        let u = unwind_frame(&s, &mut m, FrameKind::Long, false).unwrap();
        assert_eq!(u.error_code, None);
        assert_eq!((u.pre.cs.selector, u.pre.cs.ar), (0x2b, 0xa0fb));
        assert_eq!((u.pre.ss.selector, u.pre.ss.ar), (0x23, 0xc0f3));
        assert_eq!(u.pre.ss.limit, 0xffff_ffff);
        // A frame with RFLAGS bit 1 clear is no frame.
        push64(&mut m, 0x8_ffc8, &[0x40_1000, 0x2b, 0x200, 0x7_0000, 0x23]);
        assert!(unwind_frame(&s, &mut m, FrameKind::Long, false).is_none());
        // A selector beyond the GDT limit cannot be restored.
        push64(&mut m, 0x8_ffc8, &[0x40_1000, 0x33, 0x202, 0x7_0000, 0x23]);
        assert!(unwind_frame(&s, &mut m, FrameKind::Long, false).is_none());
    }

    #[test]
    fn test_unwind_32bit_frame_with_and_without_privilege_change() {
        let mut m = memory();
        let mut s = state32();
        // Same privilege: error code, EIP, CS, EFLAGS; no SS:ESP.
        push32(&mut m, 0x8_fff0, &[0x10, 0x200, 0x18, 0x202]);
        s.gprs.set(4, 0x8_fff0);
        let u = unwind_frame(&s, &mut m, FrameKind::Protected32, true).unwrap();
        assert_eq!(u.error_code, Some(0x10));
        assert_eq!((u.pre.rip, u.pre.rflags), (0x200, 0x202));
        assert_eq!(u.pre.gprs.get(4), 0x9_0000);
        // From ring 3 (CS 0x23 is data, but any RPL-3 selector shows the
        // change): SS:ESP follow.
        push32(&mut m, 0x8_ffec, &[0x300, 0x23, 0x202, 0x7_0000, 0x23]);
        s.gprs.set(4, 0x8_ffec);
        let u = unwind_frame(&s, &mut m, FrameKind::Protected32, false).unwrap();
        assert_eq!((u.pre.gprs.get(4), u.pre.ss.selector), (0x7_0000, 0x23));
        assert_eq!(u.pre.cs.ar & 0x60, 0x60);
        // Virtual-8086 mode: SS:ESP and ES, DS, FS, GS, real-mode bases.
        push32(
            &mut m,
            0x8_ffd0,
            &[
                0x10, 0x2000, 0x2_0202, 0xfff0, 0x3000, 0x10, 0x11, 0x12, 0x13,
            ],
        );
        s.gprs.set(4, 0x8_ffd0);
        let u = unwind_frame(&s, &mut m, FrameKind::Protected32, false).unwrap();
        assert_eq!(u.pre.cs.base, 0x2_0000);
        assert_eq!(u.pre.ss.base, 0x3_0000);
        assert_eq!(u.pre.gs.base, 0x130);
        assert_ne!(u.pre.rflags & VcpuState::RFLAGS_VM, 0);
    }

    #[test]
    fn test_unwind_real_mode_frame() {
        let mut m = memory();
        let mut s = state32();
        s.cr0 = 0x10;
        s.ss = Segment {
            selector: 0x700,
            base: 0x7000,
            limit: 0xffff,
            ar: 0x93,
        };
        s.gprs.set(4, 0xfffa);
        s.rflags = 0x2;
        // IP, CS, FLAGS at SS:SP.
        m.write(0x7000 + 0xfffa, &[0x34, 0x12, 0x00, 0x08, 0x02, 0x02])
            .unwrap();
        let u = unwind_frame(&s, &mut m, FrameKind::Real, true).unwrap();
        assert_eq!(u.error_code, None);
        assert_eq!(
            (u.pre.rip, u.pre.cs.selector, u.pre.cs.base),
            (0x1234, 0x800, 0x8000)
        );
        assert_eq!((u.pre.rflags, u.pre.gprs.get(4)), (0x202, 0x0));
    }

    #[test]
    fn test_32bit_idtr_base_ignores_bits_above_31() {
        // Outside IA-32e mode IDTR.base is 32 bits (SDM 6.10).
        let mut m = memory();
        let mut s = state32();
        gate32(&mut m, 13, 0x18, 0x2345, 0xf);
        s.idtr.base = 0xffff_ffff_0000_0000 | IDT;
        assert_eq!(read_gate(&s, &mut m, 13).map(|g| g.linear), Ok(0x3345));
        // In IA-32e mode all 64 bits count: this base is not canonical.
        let mut l = state64();
        gate64(&mut m, 13, H6, 0xe, true);
        l.idtr.base = 0xffff_0000_0000_0000 | IDT;
        assert_eq!(read_gate(&l, &mut m, 13), Err(GateError::Unreadable));
    }

    #[test]
    fn test_load_segment_checks_present_and_ldt() {
        let mut m = memory();
        let mut s = state32();
        assert_eq!(load_segment(&s, &mut m, 0x18).map(|d| d.base), Some(0x1000));
        // Null selector: an unusable segment.
        assert!(load_segment(&s, &mut m, 0).is_some_and(|d| d.unusable()));
        // P = 0.
        m.write_u64(GDT + 0x10, 0x00cf_1300_0000_ffff).unwrap();
        assert_eq!(load_segment(&s, &mut m, 0x10), None);
        // An LDT selector needs a usable LDTR.
        m.write_u64(0x7008, 0x00cf_9300_2000_ffff).unwrap();
        assert_eq!(load_segment(&s, &mut m, 0x0c), None);
        s.ldtr = Segment {
            selector: 0x28,
            base: 0x7000,
            limit: 0xf,
            ar: 0x82,
        };
        assert_eq!(load_segment(&s, &mut m, 0x0c).map(|d| d.base), Some(0x2000));
        // ... and an index within its limit.
        s.ldtr.limit = 0xe;
        assert_eq!(load_segment(&s, &mut m, 0x0c), None);
    }

    #[test]
    fn test_unwind_32bit_frame_on_16_bit_stack_wraps_sp() {
        // SS.B = 0: the pushes use SP, wrapping at 64 KiB, and the upper
        // half of ESP is kept (SDM 6.12.1).
        let mut m = memory();
        let mut s = state32();
        s.ss.ar = 0x93;
        s.ss.base = 0x7_0000;
        s.gprs.set(4, 0xabcd_fff8);
        // error code, EIP at the top of the segment; CS, EFLAGS after the wrap.
        m.write_u32(0x7_fff8, 0x10).unwrap();
        m.write_u32(0x7_fffc, 0x200).unwrap();
        m.write_u32(0x7_0000, 0x18).unwrap();
        m.write_u32(0x7_0004, 0x202).unwrap();
        let u = unwind_frame(&s, &mut m, FrameKind::Protected32, true).unwrap();
        assert_eq!(
            (u.error_code, u.pre.rip, u.pre.rflags),
            (Some(0x10), 0x200, 0x202)
        );
        assert_eq!(u.pre.gprs.get(4), 0xabcd_0008);
        // With SS.B = 1 the same ESP points far beyond RAM.
        s.ss.ar = 0xc093;
        assert!(unwind_frame(&s, &mut m, FrameKind::Protected32, true).is_none());
    }
}
