//! Exception-bitmap exits from L2 (exit reason 0) through breakpoints on
//! L2's exception handlers (issue #9). OWNER: helper "intercept".
//!
//! KVM delivers every exception of L2 to L2's own IDT and never tells
//! userspace. An execute breakpoint on the handler of a vector fires after
//! the delivery, with the frame the CPU pushed on the handler's stack
//! (`../shared/kvm-host-facts.md`). At each VM entry L0 reads the gate of
//! every vector vmcs12's EXCEPTION_BITMAP asks for (for #PF only when the
//! page-fault error-code mask and match can make one exit, SDM 25.2)
//! through L2's paging (and L1's EPT) and requests a breakpoint on it in
//! `self.debug.req.handlers`. On a hit L0 unwinds the frame, so that L2's
//! state is the one before the delivery, classifies the event (hardware
//! exception, INT3/INTO, ICEBP, or an INT n that only looks like one) and
//! reflects exit 0 through `nested_exit::decide`; an exception L1 does not
//! want runs L2's handler (one step with the breakpoints off).
//!
//! The #PF breakpoint also serves EPT holes in L2's page walks (KVM answers
//! them with a #PF inside L2): that check comes first on a vector-14 hit.
//! See `docs/exceptions.md` for the limits.

use nested_exit::decide::EptExitDecision;
use nested_exit::ept::ViolationContext;
use nested_exit::exit::{
    DebugQualification, ExceptionQualification, InterruptionInfo, InterruptionType,
};
use nested_exit::record::stale_mapping_exit;
use nested_exit::state::PendingEvent;
use nested_exit::walk::AccessKind;
use nested_exit::{Exit, VcpuState};
use vmcs12::{GuestPhysMemory, Vmcs12, VmcsField};

use super::debug::{L2Debug, L2DebugRequests};
use super::{
    failing_table_read, l2_err, mode_mask, read_code, ExecMode, FlushPending, Handler, L2Host,
    L2Mapping, L2PhysView, L2Step, Nested, NestedError, Observed,
};
use crate::hv::VmExit;
use crate::idt::{read_gate, unwind_frame, FrameKind};

/// The #PF vector.
const PF: u8 = 14;
/// RFLAGS.TF.
const RFLAGS_TF: u64 = 1 << 8;
/// CR0.PG.
const CR0_PG: u64 = 1 << 31;

/// Counters of the exception intercepts (rows for the run summary:
/// [`Nested::intercept_rows`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct InterceptStats {
    /// Exceptions reflected to L1 as exit 0.
    pub reflected: u64,
    /// Exceptions seen at a handler that L1 does not want (PF mask/match,
    /// a vector only the EPT-hole check watches): L2's handler ran.
    pub passed: u64,
    /// Events L1 injected at VM entry, seen reaching L2's handler.
    pub injected_delivered: u64,
    /// Vectors L1 wants that got no debug register at a VM entry (all four
    /// taken, or a vCPU without debug hardware): their exits are missed
    /// until the next entry frees one.
    pub unarmed: u64,
    /// Wanted vectors whose gate could not be read (not present, beyond
    /// the IDT limit, a task gate, unmapped).
    pub unreadable_gates: u64,
    /// Hits that found L2's IDT changed since the entry.
    pub idt_changes: u64,
    /// Hits on a handler several wanted vectors share, decided by a guess.
    pub ambiguous: u64,
    /// Hits that were no exception the bitmap sees (INT n, a jump to the
    /// handler, a frame that does not parse).
    pub not_exceptions: u64,
    /// A fault while L2 took an event L1 injected: IDT-vectoring info.
    pub during_delivery: u64,
    /// INT n of L2 that KVM stopped on, delivered to L2 by L0.
    pub software_interrupts: u64,
}

/// Which of L2's exception handlers carry a breakpoint, and why.
#[derive(Debug, Clone, Default)]
pub(super) struct Intercepts {
    /// Vectors L1 may want an exit for at this entry.
    wanted: Vec<u8>,
    /// The #PF breakpoint watches EPT holes in L2's page walks.
    ept_pf: bool,
    /// The event L1 injected at this entry, until its delivery is seen.
    injected: Option<PendingEvent>,
    /// The last unarmed/unreadable vector sets warned about (the warning
    /// is repeated only when they change; every entry is counted).
    warned: Option<(Vec<u8>, Vec<u8>)>,
    /// The missing vectors of this entry were counted.
    counted: bool,
    /// IDT-vectoring information for the exit being reflected (a fault
    /// while delivering the injected event): `(info, error code)`.
    idt_vectoring: Option<(u32, u32)>,
    /// The VMCS pointer, L2's IDTR and the handlers of the last refresh
    /// (an IDT change between two exits is seen at the second).
    last: Option<LastRefresh>,
    /// Counters.
    stats: InterceptStats,
}

/// What the last gate read found: the VMCS pointer, L2's IDTR and the
/// `(vector, handler)` requests.
type LastRefresh = (u64, nested_exit::state::DescriptorTable, Vec<(u8, u64)>);

/// Whether the CPU pushes an error code for a hardware exception of this
/// vector in protected or IA-32e mode (SDM Vol. 3 Table 6-1): #DF, #TS,
/// #NP, #SS, #GP, #PF, #AC, #CP.
pub(super) fn pushes_error_code(vector: u8) -> bool {
    matches!(vector, 8 | 10..=14 | 17 | 21)
}

/// SDM 25.2: a #PF with error code `pfec` causes a VM exit iff
/// `(pfec & mask) == match` equals exception-bitmap bit 14.
pub(super) fn pf_exits(bit14: bool, mask: u32, mtch: u32, pfec: u32) -> bool {
    (pfec & mask == mtch) == bit14
}

/// Whether any #PF error code can make [`pf_exits`] true.
pub(super) fn pf_may_exit(bit14: bool, mask: u32, mtch: u32) -> bool {
    if bit14 {
        // Some pfec has pfec & mask == match iff match has no bit outside mask.
        mtch & !mask == 0
    } else {
        // pfec & mask != match for some pfec, unless mask = 0 and match = 0.
        mask != 0 || mtch != 0
    }
}

/// The vectors vmcs12 may want exception-bitmap exits for, ascending.
/// Bit 2 is not one (NMIs exit by "NMI exiting", SDM 25.2); #PF is
/// filtered by [`pf_may_exit`].
pub(super) fn wanted_vectors(v: &Vmcs12) -> Vec<u8> {
    let bitmap = v.get32(VmcsField::EXCEPTION_BITMAP);
    let mask = v.get32(VmcsField::PAGE_FAULT_ERROR_CODE_MASK);
    let mtch = v.get32(VmcsField::PAGE_FAULT_ERROR_CODE_MATCH);
    (0u8..32)
        .filter(|&n| match n {
            2 => false,
            PF => pf_may_exit(bitmap & (1 << PF) != 0, mask, mtch),
            _ => bitmap & (1 << n) != 0,
        })
        .collect()
}

/// What kind of event reached the handler of `vector`, from the bytes
/// before the pushed RIP (`before[1]` is the last one) and whether a
/// single step was pending: `Some((type, instruction length))` for an
/// event the exception bitmap sees, `None` for a software interrupt (INT
/// n, not an exception-bitmap exit, SDM 25.2) or a #BP/#OF no INT3/INTO
/// raised.
pub(super) fn classify(
    vector: u8,
    before: Option<[u8; 2]>,
    single_step: bool,
) -> Option<(InterruptionType, u32)> {
    if before == Some([0xcd, vector]) {
        return None;
    }
    let last = before.map(|b| b[1]);
    match vector {
        3 => (last == Some(0xcc)).then_some((InterruptionType::SoftwareException, 1)),
        4 => (last == Some(0xce)).then_some((InterruptionType::SoftwareException, 1)),
        1 if last == Some(0xf1) && !single_step => {
            Some((InterruptionType::PrivilegedSoftwareException, 1))
        }
        _ => Some((InterruptionType::HardwareException, 0)),
    }
}

/// Bits 10:8 of the interruption-information format for `ty`.
fn exit_type_bits(ty: InterruptionType) -> u32 {
    match ty {
        InterruptionType::ExternalInterrupt => 0,
        InterruptionType::Nmi => 2,
        InterruptionType::HardwareException => 3,
        InterruptionType::SoftwareInterrupt => 4,
        InterruptionType::PrivilegedSoftwareException => 5,
        InterruptionType::SoftwareException => 6,
        InterruptionType::OtherEvent => 7,
    }
}

/// The exit qualification of exit 0 (SDM 28.2.1): CR2 for #PF, the DR6
/// bits B0-B3, BD, BS for a hardware #DB, nothing else.
fn exception_qualification(
    vector: u8,
    kind: InterruptionType,
    cr2: u64,
    dr6: u64,
) -> ExceptionQualification {
    match (vector, kind) {
        (PF, _) => ExceptionQualification::PageFault { cr2 },
        (1, InterruptionType::HardwareException) => {
            let bits = DebugQualification::B0
                | DebugQualification::B1
                | DebugQualification::B2
                | DebugQualification::B3
                | DebugQualification::BD
                | DebugQualification::BS;
            ExceptionQualification::Debug(DebugQualification::from_bits_truncate(dr6) & bits)
        }
        _ => ExceptionQualification::None,
    }
}

/// The last two bytes before `state`'s RIP, through its paging.
fn bytes_before(state: &VcpuState, mem: &mut dyn GuestPhysMemory) -> Option<[u8; 2]> {
    let mask = mode_mask(ExecMode::of(state));
    let at = state.rip.wrapping_sub(2) & mask;
    let b = read_code(state, mem, at, 2)?;
    Some([*b.first()?, *b.get(1)?])
}

/// An exception L0 recognised at a handler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Recognised {
    /// The exit: interruption information, qualification, length.
    pub exit: Exit,
    /// L2's state at the exit.
    pub l2: VcpuState,
}

/// Recognises the delivery of `vector` at the handler (`state`, through
/// a gate of `kind`): the frame unwound, the type classified, RIP moved
/// back over INT3/INTO/ICEBP. `Err(why)`: no exception the bitmap sees.
pub(super) fn recognise(
    state: &VcpuState,
    mem: &mut dyn GuestPhysMemory,
    vector: u8,
    kind: FrameKind,
) -> Result<Recognised, &'static str> {
    let ec_frame = pushes_error_code(vector) && kind != FrameKind::Real;
    let unwound = match ec_frame {
        true => unwind_frame(state, mem, kind, true),
        false => None,
    };
    let (u, kind_len) = match unwound {
        Some(u) => (u, Some((InterruptionType::HardwareException, 0))),
        None => {
            // No error code: an exception without one, or an INT n to a
            // vector whose exceptions push one.
            let u = unwind_frame(state, mem, kind, false).ok_or("the frame does not parse")?;
            let before = bytes_before(&u.pre, mem);
            if ec_frame && before != Some([0xcd, vector]) {
                return Err("the frame does not parse");
            }
            let single_step = u.pre.rflags & RFLAGS_TF != 0 && state.dr6 & (1 << 14) != 0;
            (u, classify(vector, before, single_step))
        }
    };
    let (ty, len) = kind_len.ok_or("INT n or a jump to the handler, not an exception")?;
    let mut pre = u.pre;
    if len != 0 {
        pre.rip = pre.rip.wrapping_sub(u64::from(len)) & mode_mask(ExecMode::of(&pre));
    }
    let info = InterruptionInfo {
        vector,
        kind: ty,
        error_code: match ty {
            InterruptionType::HardwareException => u.error_code,
            _ => None,
        },
        nmi_unblocking_iret: false,
    };
    Ok(Recognised {
        exit: Exit::ExceptionOrNmi {
            info,
            qualification: exception_qualification(vector, ty, state.cr2, state.dr6),
            len,
        },
        l2: pre,
    })
}

impl<V: FlushPending> Nested<V> {
    /// At VM entry (and when L2's IDT may have changed): the handler
    /// breakpoints to request in `self.debug.req.handlers`.
    pub(super) fn intercept_on_entry(
        &mut self,
        l2: &VcpuState,
        mem: &mut dyn GuestPhysMemory,
    ) -> Result<(), NestedError> {
        let vmcs12 = self.cpu.current_vmcs().ok_or(NestedError::NoCurrentVmcs)?;
        let wanted = wanted_vectors(vmcs12);
        let ept = self.l2_ept()?;
        let ept_pf =
            ept.is_some() && l2.msrs.efer & VcpuState::EFER_LMA != 0 && l2.cr0 & CR0_PG != 0;
        self.intercepts.wanted = wanted;
        self.intercepts.ept_pf = ept_pf;
        self.intercepts.idt_vectoring = None;
        self.intercepts.counted = false;
        // SDM 26.6: an injected event is delivered without consulting the
        // exception bitmap; its arrival at a watched handler must not exit.
        self.intercepts.injected = l2.pending_event.filter(|e| e.info & (1 << 31) != 0);
        self.refresh_handlers(l2, mem)
    }

    /// Reads the gates of every watched vector in `l2` and sets the
    /// requests: #PF first, then the wanted vectors ascending, then the
    /// vector of an injected event (to see its delivery). Warns once per
    /// entry about wanted vectors without a register or readable gate.
    fn refresh_handlers(
        &mut self,
        l2: &VcpuState,
        mem: &mut dyn GuestPhysMemory,
    ) -> Result<(), NestedError> {
        let mut view = L2PhysView {
            mem,
            ept: self.l2_ept()?,
        };
        let it = &mut self.intercepts;
        let mut order: Vec<u8> = Vec::new();
        if it.ept_pf || it.wanted.contains(&PF) {
            order.push(PF);
        }
        order.extend(it.wanted.iter().copied().filter(|&v| v != PF));
        let injected = it.injected.map(|e| e.info as u8);
        if let Some(v) = injected.filter(|v| !order.contains(v)) {
            order.push(v);
        }
        let mut handlers = Vec::new();
        let mut unreadable = Vec::new();
        for v in order {
            match read_gate(l2, &mut view, v) {
                Ok(g) => handlers.push((v, g.linear)),
                Err(e) if it.wanted.contains(&v) => unreadable.push((v, e)),
                Err(_) => {}
            }
        }
        // Which addresses get a register (handlers come first in combine).
        let (dbg, _) = L2Debug::combine(&L2DebugRequests {
            handlers: handlers.clone(),
            ..L2DebugRequests::default()
        });
        let supported = !self.debug.unsupported;
        let armed = |a: u64| supported && dbg.breakpoints.contains(&Some(a));
        let unarmed: Vec<u8> = handlers
            .iter()
            .filter(|&&(v, a)| it.wanted.contains(&v) && !armed(a))
            .map(|&(v, _)| v)
            .collect();
        if injected.is_some_and(|v| !handlers.iter().any(|&(w, a)| w == v && armed(a))) {
            // Its delivery cannot be seen: a later hit must not be taken
            // for a fault during it.
            it.injected = None;
        }
        let signature = (
            unarmed.clone(),
            unreadable.iter().map(|&(v, _)| v).collect::<Vec<u8>>(),
        );
        if !it.counted {
            // Once per entry.
            it.counted = true;
            it.stats.unarmed += unarmed.len() as u64;
            it.stats.unreadable_gates += unreadable.len() as u64;
        }
        let missing = !unarmed.is_empty() || !unreadable.is_empty();
        if missing && it.warned.as_ref() != Some(&signature) {
            it.warned = Some(signature);
            let unreadable: Vec<String> = unreadable
                .iter()
                .map(|(v, e)| format!("{v} ({e})"))
                .collect();
            tracing::warn!(
                ?unarmed,
                ?unreadable,
                "L1's exception bitmap asks for exits L0 cannot see in this L2 run: the vectors have no debug register (4 in all, shared with precise mode) or no readable IDT gate; their exceptions go to L2's own handlers"
            );
        }
        tracing::debug!(?handlers, "L2 exception-handler breakpoints requested");
        // L2 may change its IDT (LIDT, a gate write) without a VM exit: the
        // breakpoints stay on the old handlers until the next exit, and
        // exceptions in between reach L2's new handlers unseen. Say so.
        let pointer = self.cpu.current_vmcs_pointer();
        if let Some((p, idtr, old)) = &self.intercepts.last {
            let moved: Vec<u8> = old
                .iter()
                .filter(|&&(v, a)| {
                    self.intercepts.wanted.contains(&v)
                        && handlers.iter().any(|&(w, b)| w == v && b != a)
                })
                .map(|&(v, _)| v)
                .collect();
            if *p == pointer && (!moved.is_empty() || *idtr != l2.idtr) {
                self.intercepts.stats.idt_changes += 1;
                tracing::warn!(
                    ?moved,
                    old_idt = idtr.base,
                    new_idt = l2.idtr.base,
                    "L2 changed its IDT since the last exit: any exception it took between the change and this exit went to its new handler without an exit to L1 (the breakpoints follow the new IDT from now on)"
                );
            }
        }
        self.intercepts.last = Some((pointer, l2.idtr, handlers.clone()));
        self.debug.req.handlers = handlers;
        Ok(())
    }

    /// The breakpoint on the handler of `vector` fired at `pc`.
    pub(super) fn intercept_on_handler_hit(
        &mut self,
        vector: u8,
        pc: u64,
        mem: &mut dyn GuestPhysMemory,
        host: &mut dyn L2Host,
    ) -> Result<Option<L2Step>, NestedError> {
        let st = self.l2.get_state().map_err(l2_err)?;
        self.l2_cached = Some(st);
        let l0_stepping = self.debug.applied.is_some_and(|d| d.single_step);
        let ept = self.l2_ept()?;
        // The vectors whose handler is at pc: requested at entry and still
        // there, or (L2 changed its IDT since) found by reading it again.
        let mut candidates = self.handlers_at(&st, mem, pc)?;
        if candidates.is_empty() {
            tracing::debug!(
                vector,
                pc,
                "L2's IDT changed since the VM entry: gates read again"
            );
            self.refresh_handlers(&st, mem)?;
            candidates = self.handlers_at(&st, mem, pc)?;
        }
        if let Some(ev) = self.intercepts.injected.take() {
            let v = ev.info as u8;
            if candidates.contains(&v) {
                // The event L1 injected reached L2's handler (SDM 26.6.1).
                self.intercepts.stats.injected_delivered += 1;
                let _ = self.refresh_handlers(&st, mem);
                return self.intercept_step_over(None, mem, host).map(Some);
            }
            // Another exception first: it happened while delivering the
            // injected event (SDM 27.2.4).
            self.intercepts.stats.during_delivery += 1;
            self.intercepts.idt_vectoring = Some((ev.info & !(1 << 12), ev.error_code));
            tracing::warn!(
                injected = ev.info,
                pc,
                "an exception while L2 took the event L1 injected: IDT-vectoring information recorded"
            );
        }
        let Some(kind) = candidates
            .first()
            .and_then(|&v| {
                let mut view = L2PhysView {
                    mem: &mut *mem,
                    ept,
                };
                read_gate(&st, &mut view, v).ok()
            })
            .map(|g| g.kind)
        else {
            self.intercepts.stats.not_exceptions += 1;
            return self.intercept_step_over(None, mem, host).map(Some);
        };
        let vector = self.pick_vector(&st, mem, &candidates, kind)?;
        // #PF: first KVM's stand-in for an EPT violation in L2's page walk.
        let recognised = {
            let mut view = L2PhysView {
                mem: &mut *mem,
                ept,
            };
            recognise(&st, &mut view, vector, kind)
        };
        let rec = match recognised {
            Ok(mut r) if l0_stepping => {
                // KVM single-steps with the real RFLAGS.TF: a frame pushed
                // during L0's step carries it, L2's RFLAGS did not.
                r.l2.rflags &= !RFLAGS_TF;
                r
            }
            Ok(r) => r,
            Err(why) => {
                self.intercepts.stats.not_exceptions += 1;
                tracing::debug!(
                    vector,
                    pc,
                    why,
                    "handler breakpoint without an exception: L2 goes on"
                );
                return self.intercept_step_over(Some(vector), mem, host).map(Some);
            }
        };
        if vector == PF && self.intercepts.ept_pf {
            if let Some(step) = self.pf_ept_hole(&st, &rec.l2, mem)? {
                return Ok(Some(step));
            }
        }
        if !self.intercepts.wanted.contains(&vector) || !self.pf_selected(&rec.exit)? {
            // No VM exit on a CPU either: L2's handler runs.
            return self.intercept_step_over(Some(vector), mem, host).map(Some);
        }
        let observed = Observed {
            exit: rec.exit,
            l2: rec.l2,
            kvm_pending: false,
        };
        if !self.decide_observed(&observed, mem)? {
            // decide and the bitmap disagree (L0 policy): L2's handler runs.
            self.intercepts.idt_vectoring = None;
            return self.intercept_step_over(Some(vector), mem, host).map(Some);
        }
        self.intercepts.stats.reflected += 1;
        self.l2_cached = None;
        Ok(Some(L2Step::Reflect(Box::new(observed))))
    }

    /// False for a #PF whose error code vmcs12's mask and match do not
    /// select (SDM 25.2); true for every other exit.
    fn pf_selected(&self, exit: &Exit) -> Result<bool, NestedError> {
        let Exit::ExceptionOrNmi { info, .. } = exit else {
            return Ok(true);
        };
        if info.vector != PF {
            return Ok(true);
        }
        let v = self.cpu.current_vmcs().ok_or(NestedError::NoCurrentVmcs)?;
        Ok(pf_exits(
            v.get32(VmcsField::EXCEPTION_BITMAP) & (1 << PF) != 0,
            v.get32(VmcsField::PAGE_FAULT_ERROR_CODE_MASK),
            v.get32(VmcsField::PAGE_FAULT_ERROR_CODE_MATCH),
            info.error_code.unwrap_or(0),
        ))
    }

    /// The requested vectors whose gate in `st` still points at `pc`.
    fn handlers_at(
        &mut self,
        st: &VcpuState,
        mem: &mut dyn GuestPhysMemory,
        pc: u64,
    ) -> Result<Vec<u8>, NestedError> {
        let mut view = L2PhysView {
            mem,
            ept: self.l2_ept()?,
        };
        let mut at: Vec<u8> = self
            .debug
            .req
            .handlers
            .iter()
            .filter(|&&(_, a)| a == pc)
            .map(|&(v, _)| v)
            .collect();
        at.retain(|&v| read_gate(st, &mut view, v).is_ok_and(|g| g.linear == pc));
        Ok(at)
    }

    /// One vector of several sharing a handler: the instruction at the
    /// pushed RIP says #UD (UD2), #BP (INT3 before it), #OF (INTO before
    /// it); otherwise the first, counted and traced as a guess.
    fn pick_vector(
        &mut self,
        st: &VcpuState,
        mem: &mut dyn GuestPhysMemory,
        candidates: &[u8],
        kind: FrameKind,
    ) -> Result<u8, NestedError> {
        let first = candidates.first().copied().unwrap_or(0);
        if candidates.len() < 2 {
            return Ok(first);
        }
        let mut view = L2PhysView {
            mem,
            ept: self.l2_ept()?,
        };
        let pre = unwind_frame(st, &mut view, kind, false).map(|u| u.pre);
        let at = pre.and_then(|p| read_code(&p, &mut view, p.rip, 2));
        let before = pre.and_then(|p| bytes_before(&p, &mut view));
        let guess = if at.as_deref() == Some(&[0x0f, 0x0b]) && candidates.contains(&6) {
            Some(6)
        } else if before.map(|b| b[1]) == Some(0xcc) && candidates.contains(&3) {
            Some(3)
        } else if before.map(|b| b[1]) == Some(0xce) && candidates.contains(&4) {
            Some(4)
        } else {
            None
        };
        Ok(guess.unwrap_or_else(|| {
            self.intercepts.stats.ambiguous += 1;
            tracing::warn!(
                ?candidates,
                pc = st.rip,
                "several watched vectors share this L2 handler: taken as vector {first}"
            );
            first
        }))
    }

    /// Lets L2's handler run: one step with the breakpoints off (re-armed
    /// at the next run). An exit during that step is handled as usual.
    fn intercept_step_over(
        &mut self,
        vector: Option<u8>,
        mem: &mut dyn GuestPhysMemory,
        host: &mut dyn L2Host,
    ) -> Result<L2Step, NestedError> {
        if vector == Some(PF) {
            self.stats.l2_page_faults_passed += 1;
        }
        if vector.is_some() {
            self.intercepts.stats.passed += 1;
        }
        // No exit: nothing to report as IDT-vectoring information.
        self.intercepts.idt_vectoring = None;
        self.l2_cached = None;
        match self.step_l2_once()? {
            VmExit::Debug { .. } => Ok(L2Step::Resume),
            other => self.handle_l2_exit(other, mem, host),
        }
    }

    /// A #PF at L2's handler while vmcs12 enables EPT: if L2's paging walk
    /// for CR2 reads a paging-structure entry in an L2-physical page L1's
    /// EPT does not map for reading, the #PF is KVM's stand-in for an EPT
    /// violation on a paging-structure access: exit 48 (a read, the
    /// guest-linear address CR2, bit 8 clear, SDM 28.2.1) or 49 is
    /// reflected at `pre`; if L1 maps it now, L0 rebuilds its slots and L2
    /// retries. `None`: no EPT hole, the #PF is L2's.
    fn pf_ept_hole(
        &mut self,
        st: &VcpuState,
        pre: &VcpuState,
        mem: &mut dyn GuestPhysMemory,
    ) -> Result<Option<L2Step>, NestedError> {
        let Some(ept) = self.l2_ept()? else {
            return Ok(None);
        };
        let failed = {
            let view = L2PhysView {
                mem: &mut *mem,
                ept: Some(ept),
            };
            let slots = self.l2_mem.as_ref().ok_or(NestedError::NoL2Vm)?;
            failing_table_read(pre, st.cr2, &view, slots)
        };
        let Some(table_gpa) = failed else {
            return Ok(None);
        };
        let max_gpa = self.max_l2_gpa();
        let context = ViolationContext {
            guest_linear_address_valid: true,
            linear_translation: false,
            nmi_unblocking: false,
        };
        match self.decide_ept(pre, mem, table_gpa, AccessKind::Read, st.cr2, context)? {
            EptExitDecision::NoL1Ept(_) => Ok(None),
            EptExitDecision::L0StaleMapping { decision, .. } => {
                *self.stats.exits.entry((48, Handler::L0)).or_default() += 1;
                self.note_decision(
                    &stale_mapping_exit(AccessKind::Read, table_gpa),
                    pre.rip,
                    &decision,
                );
                self.last_decision = Some(("EPT violation", decision));
                let slots = self.l2_mem.as_mut().ok_or(NestedError::NoL2Vm)?;
                let mapping = L2Mapping::Ept {
                    eptp: ept.eptp.encode(),
                };
                // An L2 page table: mapped from now on even without X.
                slots.force_page(table_gpa);
                slots.rebuild_on_demand(mapping, &ept, &*mem, max_gpa)?;
                if slots.window_at(table_gpa).is_none() {
                    return Err(NestedError::Unsupported(format!(
                        "L2's page walk for {:#x} reads L2-physical {table_gpa:#x}, which L1's EPT maps outside RAM: KVM cannot walk page tables there",
                        st.cr2
                    )));
                }
                self.l2.set_state(pre).map_err(l2_err)?;
                self.l2_cached = None;
                Ok(Some(L2Step::Resume))
            }
            EptExitDecision::Reflect { exit, decision } => {
                *self
                    .stats
                    .exits
                    .entry((exit.basic_reason(), Handler::L1))
                    .or_default() += 1;
                self.stats.paging_structure_violations += 1;
                tracing::debug!(table_gpa, cr2 = st.cr2, why = %decision.explanation, "L2 page walk hit an EPT hole");
                self.note_decision(&exit, pre.rip, &decision);
                self.last_decision = Some((exit.name(), decision));
                self.l2_cached = None;
                Ok(Some(L2Step::Reflect(Box::new(Observed {
                    exit,
                    l2: *pre,
                    kvm_pending: false,
                }))))
            }
        }
    }

    /// `KVM_EXIT_INTERNAL_ERROR` (emulation failure) of the L2 vCPU: on
    /// this host KVM stops on L2's INT3 (0xCC) and INT n (0xCD) with RIP at
    /// them instead of delivering the event (measured, also without guest
    /// debugging). INT n is delivered to L2 (type 4, RIP + 2 pushed). INTO
    /// (0xCE, outside 64-bit mode) and ICEBP (0xF1) are treated the same
    /// way. L0 raises the exception itself: exit 0 (type 6 for INT3/INTO,
    /// 5 for ICEBP, length 1, RIP at the instruction) when L1's bitmap asks
    /// for the vector, else the event is delivered to L2's IDT (RIP past
    /// the instruction, as the CPU pushes it). `None`: another
    /// instruction, for the usual handling.
    pub(super) fn intercept_on_emulation_failure(
        &mut self,
        insn_bytes: &[u8],
        mem: &mut dyn GuestPhysMemory,
    ) -> Result<Option<L2Step>, NestedError> {
        if insn_bytes
            .first()
            .is_some_and(|b| !matches!(b, 0xcc | 0xcd | 0xce | 0xf1))
        {
            // Another instruction: no vCPU state needed here.
            return Ok(None);
        }
        let mut st = self.l2.get_state().map_err(l2_err)?;
        let first = match insn_bytes.first() {
            Some(&b) => Some(b),
            None => {
                let mut view = L2PhysView {
                    mem: &mut *mem,
                    ept: self.l2_ept()?,
                };
                read_code(&st, &mut view, st.rip, 1).and_then(|b| b.first().copied())
            }
        };
        const RFLAGS_OF: u64 = 1 << 11;
        if first == Some(0xcd) {
            // INT n: a software interrupt, never an exception-bitmap exit
            // (SDM 25.2): delivered to L2 with RIP + 2 pushed.
            let n = match insn_bytes.get(1) {
                Some(&n) => Some(n),
                None => {
                    let mut view = L2PhysView {
                        mem: &mut *mem,
                        ept: self.l2_ept()?,
                    };
                    read_code(&st, &mut view, st.rip, 2).and_then(|b| b.get(1).copied())
                }
            };
            let Some(n) = n else {
                return Ok(None);
            };
            self.intercepts.stats.software_interrupts += 1;
            let ev = PendingEvent {
                info: u32::from(n) | (4 << 8) | (1 << 31),
                error_code: 0,
                instruction_len: 2,
            };
            self.intercept_expect_delivery(ev);
            st.pending_event = Some(ev);
            let st = super::deliverable_event(st);
            self.l2.set_state(&st).map_err(l2_err)?;
            self.l2_cached = None;
            return Ok(Some(L2Step::Resume));
        }
        let (vector, ty) = match first {
            Some(0xcc) => (3, InterruptionType::SoftwareException),
            Some(0xf1) => (1, InterruptionType::PrivilegedSoftwareException),
            Some(0xce) if !st.in_64bit_mode() => {
                if st.rflags & RFLAGS_OF == 0 {
                    // INTO with OF clear does nothing.
                    st.rip = st.rip.wrapping_add(1) & mode_mask(ExecMode::of(&st));
                    self.l2.set_state(&st).map_err(l2_err)?;
                    self.l2_cached = Some(st);
                    return Ok(Some(L2Step::Resume));
                }
                (4, InterruptionType::SoftwareException)
            }
            _ => return Ok(None),
        };
        // The VM-entry checks of this L2 may have refreshed the bitmap.
        if let Some(v) = self.cpu.current_vmcs() {
            self.intercepts.wanted = wanted_vectors(v);
        }
        let exit = Exit::ExceptionOrNmi {
            info: InterruptionInfo {
                vector,
                kind: ty,
                error_code: None,
                nmi_unblocking_iret: false,
            },
            qualification: ExceptionQualification::None,
            len: 1,
        };
        if self.intercepts.wanted.contains(&vector) {
            let observed = Observed {
                exit,
                l2: st,
                kvm_pending: false,
            };
            if self.decide_observed(&observed, mem)? {
                self.intercepts.stats.reflected += 1;
                self.l2_cached = None;
                return Ok(Some(L2Step::Reflect(Box::new(observed))));
            }
        }
        // Deliver it to L2 as the CPU would: RIP + 1 is pushed.
        self.intercepts.stats.passed += 1;
        let ev = PendingEvent {
            info: u32::from(vector) | (exit_type_bits(ty) << 8) | (1 << 31),
            error_code: 0,
            instruction_len: 1,
        };
        self.intercept_expect_delivery(ev);
        st.pending_event = Some(ev);
        let st = super::deliverable_event(st);
        self.l2.set_state(&st).map_err(l2_err)?;
        self.l2_cached = None;
        Ok(Some(L2Step::Resume))
    }

    /// Another part of L0 delivers `ev` into L2 now (through
    /// `pending_event`): its arrival at a watched handler is a delivery,
    /// not an exception L1 asked for (an external interrupt on vector 8 in
    /// real mode, a #BP L0 raises for INT3). Call it from events.rs when
    /// injecting into L2.
    pub(super) fn intercept_expect_delivery(&mut self, ev: PendingEvent) {
        let v = ev.info as u8;
        if ev.info & (1 << 31) != 0 && self.debug.req.handlers.iter().any(|&(w, _)| w == v) {
            self.intercepts.injected = Some(ev);
        }
    }

    /// Counters of the exception intercepts, `(name, count)` for the run
    /// summary (every row, also zero ones).
    pub fn intercept_rows(&self) -> Vec<(&'static str, u64)> {
        let s = &self.intercepts.stats;
        vec![
            ("exceptions reflected (exit 0)", s.reflected),
            ("exceptions passed to L2's handler", s.passed),
            ("injected events seen delivered", s.injected_delivered),
            ("wanted vectors without a debug register", s.unarmed),
            ("wanted vectors with an unreadable gate", s.unreadable_gates),
            ("IDT changes found at a hit", s.idt_changes),
            ("hits on a shared handler (guessed)", s.ambiguous),
            ("handler hits without an exception", s.not_exceptions),
            (
                "faults while delivering an injected event",
                s.during_delivery,
            ),
        ]
    }

    /// IDT-vectoring information and error code of the exit being
    /// reflected, taken once (the reflect path hands it to prepare_vmcs12).
    pub(super) fn intercept_on_reflect(&mut self) -> Option<(u32, u32)> {
        let (info, ec) = self.intercepts.idt_vectoring.take()?;
        let has_ec = info & (1 << 11) != 0;
        Some((info, if has_ec { ec } else { 0 }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hv::{GuestDebug, IoctlCounters, Vcpu};
    use crate::idt::fixtures::{gate64, push64, state32, state64, CODE, GDT, H6, IDT, STACK};
    use crate::idt::load_segment;
    use crate::nested::HostAction;
    use nested_exit::Segment;
    use proptest::prelude::*;
    use std::collections::VecDeque;
    use vmcs12::vmx::{CpuMode, InsnContext};
    use vmcs12::{FlatMemory, VmxCapabilities, VmxCpu, VMCS_REVISION_ID};

    const VMXON_REGION: u64 = 0x10000;
    const VMCS_REGION: u64 = 0x11000;
    const H13: u64 = 0x5100;
    const H14: u64 = 0x5200;

    /// `idt::fixtures::memory` plus a VMXON and a VMCS region.
    fn memory() -> FlatMemory {
        let mut m = crate::idt::fixtures::memory();
        m.write_u32(VMXON_REGION, VMCS_REVISION_ID).unwrap();
        m.write_u32(VMCS_REGION, VMCS_REVISION_ID).unwrap();
        m
    }

    #[test]
    fn test_pf_exits_follows_mask_and_match_truth_table() {
        // Exhaustive over 4-bit masks, matches and error codes.
        for bit14 in [false, true] {
            for mask in 0..16u32 {
                for mtch in 0..16u32 {
                    let mut any = false;
                    for pfec in 0..16u32 {
                        let equal = pfec & mask == mtch;
                        let want = if bit14 { equal } else { !equal };
                        assert_eq!(pf_exits(bit14, mask, mtch, pfec), want);
                        any |= want;
                    }
                    assert_eq!(
                        pf_may_exit(bit14, mask, mtch),
                        any,
                        "{bit14} {mask:x} {mtch:x}"
                    );
                }
            }
        }
    }

    proptest! {
        #[test]
        fn test_pf_exits_matches_the_reference(bit14: bool, mask: u32, mtch: u32, pfec: u32) {
            let reference = if bit14 { pfec & mask == mtch } else { pfec & mask != mtch };
            prop_assert_eq!(pf_exits(bit14, mask, mtch, pfec), reference);
            if pf_exits(bit14, mask, mtch, pfec) {
                prop_assert!(pf_may_exit(bit14, mask, mtch));
            }
        }

        #[test]
        fn test_unwind_never_panics_on_any_frame(words in proptest::collection::vec(any::<u64>(), 10),
                                                 kind in 0..4u8, ec: bool) {
            let mut m = memory();
            push64(&mut m, 0x8_ff00, &words);
            let mut s = if kind == 0 { state64() } else { state32() };
            if kind == 3 {
                s.cr0 = 0x10;
            }
            s.gprs.set(4, 0x8_ff00);
            let k = [FrameKind::Long, FrameKind::Protected32, FrameKind::Protected16, FrameKind::Real][kind as usize];
            let _ = unwind_frame(&s, &mut m, k, ec);
            let _ = recognise(&s, &mut m, 13, k);
        }

        /// Every register L2 controls and every byte of its IDT, GDT and
        /// stack: reading a gate, unwinding a frame and recognising an
        /// exception return an answer, never a panic (overflow included).
        #[test]
        fn test_gate_and_frame_never_panic_on_any_registers(
            words in proptest::collection::vec(any::<u64>(), 32),
            regs in any::<[u64; 8]>(),
            limits in any::<[u16; 3]>(),
            ars in any::<[u32; 2]>(),
            mode in 0..4u8,
            vector: u8,
            ec: bool,
            near: bool,
        ) {
            let mut m = memory();
            // Random gates and descriptors where L2's tables are, and a
            // random frame at the stack pointer when it is in RAM.
            push64(&mut m, IDT, &words[..16]);
            push64(&mut m, GDT + 0x30, &words[16..24]);
            let sp = if near { 0x8_ff00 | (regs[0] & 0xff) } else { regs[0] };
            if near {
                push64(&mut m, 0x8_ff00, &words[24..]);
            }
            let mut s = if mode == 0 { state64() } else { state32() };
            if mode == 3 {
                s.cr0 = 0x10;
            }
            s.gprs.set(4, sp);
            s.rip = regs[1];
            s.idtr.base = if near { IDT } else { regs[2] };
            s.idtr.limit = limits[0];
            s.gdtr.limit = limits[1];
            s.ldtr = Segment { selector: 0x38, base: regs[3], limit: u32::from(limits[2]), ar: ars[0] };
            s.cs.base = regs[4];
            s.cs.selector = regs[5] as u16;
            s.ss.base = regs[6];
            s.ss.ar = ars[1];
            s.rflags = regs[7];
            s.dr6 = regs[7].rotate_left(7);
            let k = [FrameKind::Long, FrameKind::Protected32, FrameKind::Protected16, FrameKind::Real][mode as usize];
            let _ = read_gate(&s, &mut m, vector);
            let _ = load_segment(&s, &mut m, regs[5] as u16);
            let _ = unwind_frame(&s, &mut m, k, ec);
            let _ = recognise(&s, &mut m, vector % 32, k);
            let _ = bytes_before(&s, &mut m);
        }
    }

    #[test]
    fn test_wanted_vectors_skip_nmi_and_filter_page_faults() {
        let mut v = Vmcs12::new();
        v.set(VmcsField::EXCEPTION_BITMAP, (1 << 2) | (1 << 6) | (1 << 14));
        assert_eq!(wanted_vectors(&v), vec![6, 14]);
        // Bit 14 set, match outside the mask: no #PF can exit.
        v.set(VmcsField::PAGE_FAULT_ERROR_CODE_MATCH, 4);
        assert_eq!(wanted_vectors(&v), vec![6]);
        // Bit 14 clear, mask and match 0: never; match != 0: always.
        v.set(VmcsField::EXCEPTION_BITMAP, 0);
        v.set(VmcsField::PAGE_FAULT_ERROR_CODE_MATCH, 0);
        assert!(wanted_vectors(&v).is_empty());
        v.set(VmcsField::PAGE_FAULT_ERROR_CODE_MATCH, 1);
        assert_eq!(wanted_vectors(&v), vec![14]);
    }

    #[test]
    fn test_classify_types_and_lengths() {
        use InterruptionType as T;
        assert_eq!(
            classify(3, Some([0x90, 0xcc]), false),
            Some((T::SoftwareException, 1))
        );
        assert_eq!(classify(3, Some([0xcd, 0x03]), false), None);
        assert_eq!(classify(3, Some([0x90, 0x90]), false), None);
        assert_eq!(
            classify(4, Some([0x90, 0xce]), false),
            Some((T::SoftwareException, 1))
        );
        assert_eq!(
            classify(1, Some([0x90, 0xf1]), false),
            Some((T::PrivilegedSoftwareException, 1))
        );
        assert_eq!(
            classify(1, Some([0x90, 0xf1]), true),
            Some((T::HardwareException, 0))
        );
        assert_eq!(
            classify(6, Some([0x0f, 0x0b]), false),
            Some((T::HardwareException, 0))
        );
        assert_eq!(classify(6, Some([0xcd, 0x06]), false), None);
        assert_eq!(classify(13, None, false), Some((T::HardwareException, 0)));
    }

    #[test]
    fn test_recognise_int3_moves_rip_back_and_int_n_is_no_exception() {
        let mut m = memory();
        let mut s = state64();
        m.write(CODE, &[0xcc, 0xcd, 0x0d, 0x90]).unwrap();
        push64(&mut m, 0x8_ffd8, &[CODE + 1, 0x08, 0x202, STACK, 0x10]);
        s.gprs.set(4, 0x8_ffd8);
        let r = recognise(&s, &mut m, 3, FrameKind::Long).unwrap();
        let Exit::ExceptionOrNmi { info, len, .. } = r.exit else {
            panic!("{:?}", r.exit);
        };
        assert_eq!(info.encode().0, 0x8000_0603);
        assert_eq!((len, r.l2.rip), (1, CODE));
        // INT 0x0d: vector 13's handler, no error code on the stack.
        push64(&mut m, 0x8_ffd8, &[CODE + 3, 0x08, 0x202, STACK, 0x10]);
        assert!(recognise(&s, &mut m, 13, FrameKind::Long).is_err());
        // A real #GP has its error code.
        push64(&mut m, 0x8_ffd0, &[0, CODE + 3, 0x08, 0x202, STACK, 0x10]);
        s.gprs.set(4, 0x8_ffd0);
        let r = recognise(&s, &mut m, 13, FrameKind::Long).unwrap();
        assert_eq!(r.exit.to_info().intr_info, 0x8000_0b0d);
        assert_eq!(r.l2.rip, CODE + 3);
        // #PF: CR2 in the qualification.
        s.cr2 = 0xdead_0000;
        push64(&mut m, 0x8_ffd0, &[2, CODE + 3, 0x08, 0x202, STACK, 0x10]);
        let r = recognise(&s, &mut m, 14, FrameKind::Long).unwrap();
        let info = r.exit.to_info();
        assert_eq!((info.intr_info, info.intr_error_code), (0x8000_0b0e, 2));
        assert_eq!(info.qualification, 0xdead_0000);
        assert_eq!(r.l2.cr2, 0xdead_0000);
    }

    // --- Nested with a scripted L2 vCPU ---

    #[derive(Debug, thiserror::Error)]
    #[error("fake vCPU: {0}")]
    struct FakeError(&'static str);

    type Effect = Box<dyn FnMut(&mut VcpuState)>;

    struct Fake {
        state: VcpuState,
        script: VecDeque<(VmExit, Effect)>,
        debug: Vec<GuestDebug>,
        runs: usize,
    }

    impl Vcpu for Fake {
        type Error = FakeError;
        fn run(&mut self) -> Result<VmExit, FakeError> {
            self.runs += 1;
            let (exit, mut effect) = self.script.pop_front().ok_or(FakeError("script ended"))?;
            effect(&mut self.state);
            Ok(exit)
        }
        fn get_state(&mut self) -> Result<VcpuState, FakeError> {
            Ok(self.state)
        }
        fn set_state(&mut self, state: &VcpuState) -> Result<(), FakeError> {
            self.state = *state;
            Ok(())
        }
        fn complete_io_in(&mut self, _data: u32) {}
        fn complete_mmio_read(&mut self, _data: &[u8]) {}
        fn complete_rdmsr(&mut self, _value: Option<u64>) {}
        fn complete_wrmsr(&mut self, _ok: bool) {}
        fn inject_exception(&mut self, _v: u8, _e: Option<u32>) -> Result<(), FakeError> {
            Ok(())
        }
        fn counters(&self) -> IoctlCounters {
            IoctlCounters::default()
        }
    }

    impl FlushPending for Fake {
        fn flush_pending(&mut self) -> Result<(), FakeError> {
            Ok(())
        }
        fn set_guest_debug(&mut self, dbg: &GuestDebug) -> Result<bool, FakeError> {
            self.debug.push(*dbg);
            Ok(true)
        }
    }

    struct NoHost;

    impl L2Host for NoHost {
        fn l2_io_out(&mut self, _port: u16, _size: u8, _data: u32) -> HostAction {
            HostAction::Continue
        }
        fn l2_io_in(&mut self, _port: u16, _size: u8) -> u32 {
            0
        }
        fn l2_rdmsr(&mut self, _index: u32) -> Option<u64> {
            None
        }
        fn l2_wrmsr(&mut self, _index: u32, _value: u64) -> bool {
            false
        }
    }

    struct Rig {
        nested: Nested<Fake>,
        mem: FlatMemory,
    }

    impl Rig {
        /// VMX root operation with a current vmcs12 whose exception
        /// bitmap is `bitmap`; L2's IDT has handlers for 6, 13 and 14.
        fn new(bitmap: u32) -> Self {
            let mut mem = memory();
            let mut cpu = VmxCpu::new(VmxCapabilities::default());
            let ctx = InsnContext {
                cpl: 0,
                mode: CpuMode::Long64,
                cr0: 0x8005_0033,
                cr4: 0x2020,
                vmxe: true,
                blocked_by_mov_ss: false,
            };
            assert_eq!(
                cpu.vmxon(&ctx, &mem, VMXON_REGION),
                vmcs12::VmxOutcome::Succeed
            );
            assert_eq!(
                cpu.vmptrld(&ctx, &mut mem, VMCS_REGION),
                vmcs12::VmxOutcome::Succeed
            );
            let v = cpu.current_vmcs_mut().unwrap();
            v.set(VmcsField::EXCEPTION_BITMAP, u64::from(bitmap));
            gate64(&mut mem, 6, H6, 0xe, true);
            gate64(&mut mem, 13, H13, 0xe, true);
            gate64(&mut mem, 14, H14, 0xe, true);
            let fake = Fake {
                state: state64(),
                script: VecDeque::new(),
                debug: Vec::new(),
                runs: 0,
            };
            Rig {
                nested: Nested::new(cpu, fake),
                mem,
            }
        }

        fn vmcs(&mut self) -> &mut Vmcs12 {
            self.nested.cpu.current_vmcs_mut().unwrap()
        }

        fn enter(&mut self, l2: VcpuState) {
            self.nested.l2.state = l2;
            self.nested.intercept_on_entry(&l2, &mut self.mem).unwrap();
            self.nested.apply_l2_debug().unwrap();
        }

        /// The CPU delivered `vector` with `frame` (8-byte slots) to the
        /// handler at `pc`: the breakpoint fires.
        fn hit(&mut self, pc: u64, frame: &[u64]) -> L2Step {
            let sp = STACK - 0x40;
            push64(&mut self.mem, sp, frame);
            self.nested.l2.state.rip = pc;
            self.nested.l2.state.gprs.set(4, sp);
            self.nested
                .on_l2_debug(pc, 1, &mut self.mem, &mut NoHost)
                .unwrap()
        }

        /// The single step over the handler's breakpoint.
        fn expect_step(&mut self) {
            self.nested.l2.script.push_back((
                VmExit::Debug {
                    pc: 0,
                    dr6: 1 << 14,
                },
                Box::new(|_s: &mut VcpuState| {}),
            ));
        }
    }

    fn reflected(step: L2Step) -> Observed {
        match step {
            L2Step::Reflect(o) => *o,
            L2Step::Resume => panic!("resumed, not reflected"),
            L2Step::Stop(c) => panic!("stopped {c}"),
            L2Step::Interrupted => panic!("interrupted"),
        }
    }

    #[test]
    fn test_ud_reflects_exit_0_at_the_faulting_rip() {
        let mut rig = Rig::new((1 << 6) | (1 << 13));
        rig.enter(state64());
        assert_eq!(rig.nested.debug.req.handlers, vec![(6, H6), (13, H13)]);
        let bps = rig.nested.l2.debug.last().unwrap().breakpoints;
        assert_eq!(bps, [Some(H6), Some(H13), None, None]);
        let o = reflected(rig.hit(H6, &[CODE, 0x08, 0x202, STACK, 0x10]));
        let info = o.exit.to_info();
        assert_eq!(
            (info.reason, info.intr_info, info.instruction_len),
            (0, 0x8000_0306, 0)
        );
        assert_eq!(
            (o.l2.rip, o.l2.gprs.get(4), o.l2.rflags),
            (CODE, STACK, 0x202)
        );
        assert_eq!(rig.nested.stats().exits.get(&(0, Handler::L1)), Some(&1));
        assert_eq!(rig.nested.intercept_rows()[0].1, 1);
        assert!(rig.nested.last_decision().unwrap().1.reflects());
        // No step: the L2 vCPU did not run.
        assert_eq!(rig.nested.l2.runs, 0);
    }

    #[test]
    fn test_page_fault_mask_and_match_filter_the_exit() {
        // Only write faults (error code bit 1) exit.
        let mut rig = Rig::new(1 << 14);
        rig.vmcs().set(VmcsField::PAGE_FAULT_ERROR_CODE_MASK, 2);
        rig.vmcs().set(VmcsField::PAGE_FAULT_ERROR_CODE_MATCH, 2);
        rig.enter(state64());
        rig.nested.l2.state.cr2 = 0x7000_0000;
        rig.expect_step();
        let read = rig.hit(H14, &[0, CODE, 0x08, 0x202, STACK, 0x10]);
        assert!(matches!(read, L2Step::Resume));
        assert_eq!(rig.nested.l2.runs, 1, "stepped into L2's handler");
        assert_eq!(rig.nested.stats().l2_page_faults_passed, 1);
        assert_eq!(rig.nested.stats().exits.get(&(0, Handler::L0)), None);
        rig.nested.apply_l2_debug().unwrap();
        let o = reflected(rig.hit(H14, &[2, CODE, 0x08, 0x202, STACK, 0x10]));
        let info = o.exit.to_info();
        assert_eq!((info.intr_info, info.intr_error_code), (0x8000_0b0e, 2));
        assert_eq!(info.qualification, 0x7000_0000);
        assert_eq!(o.l2.cr2, 0x7000_0000);
    }

    #[test]
    fn test_injected_event_reaches_l2_handler_then_exits_again() {
        let mut rig = Rig::new(1 << 6);
        let mut l2 = state64();
        l2.pending_event = Some(PendingEvent {
            info: 6 | (3 << 8) | (1 << 31),
            error_code: 0,
            instruction_len: 0,
        });
        rig.enter(l2);
        rig.expect_step();
        let step = rig.hit(H6, &[CODE, 0x08, 0x202, STACK, 0x10]);
        assert!(matches!(step, L2Step::Resume));
        assert_eq!(rig.nested.intercept_rows()[2].1, 1);
        assert_eq!(rig.nested.stats().exits.get(&(0, Handler::L1)), None);
        // The handler returns, the UD2 runs again: a new exit.
        rig.nested.apply_l2_debug().unwrap();
        let o = reflected(rig.hit(H6, &[CODE, 0x08, 0x202, STACK, 0x10]));
        assert_eq!(o.exit.to_info().intr_info, 0x8000_0306);
    }

    #[test]
    fn test_fault_while_delivering_an_injected_event_sets_idt_vectoring() {
        let mut rig = Rig::new((1 << 6) | (1 << 14));
        let mut l2 = state64();
        l2.pending_event = Some(PendingEvent {
            info: 13 | (3 << 8) | (1 << 11) | (1 << 31),
            error_code: 0x18,
            instruction_len: 0,
        });
        rig.enter(l2);
        // 13 is not wanted but watched for the injected event.
        assert!(rig.nested.debug.req.handlers.contains(&(13, H13)));
        rig.nested.l2.state.cr2 = 0x8_f000;
        let o = reflected(rig.hit(H14, &[3, CODE, 0x08, 0x202, STACK, 0x10]));
        assert_eq!(o.exit.to_info().intr_info, 0x8000_0b0e);
        // Handed to prepare_vmcs12 with the exit information.
        assert_eq!(rig.nested.intercept_on_reflect(), Some((0x8000_0b0d, 0x18)));
        assert_eq!(rig.nested.intercept_on_reflect(), None, "taken once");
        assert_eq!(rig.nested.intercept_rows()[8].1, 1);
    }

    #[test]
    fn test_steps_in_a_row_program_the_debug_hardware_once() {
        let mut rig = Rig::new(1 << 6);
        rig.enter(state64());
        let armed = *rig.nested.l2.debug.last().unwrap();
        assert!(armed.breakpoints.contains(&Some(H6)));
        let before = rig.nested.l2.debug.len();
        rig.expect_step();
        rig.expect_step();
        rig.nested.step_l2_once().unwrap();
        rig.nested.step_l2_once().unwrap();
        // One KVM_SET_GUEST_DEBUG for both steps, none of them armed.
        assert_eq!(rig.nested.l2.debug.len(), before + 1);
        let step = *rig.nested.l2.debug.last().unwrap();
        assert!(step.single_step && step.breakpoints.iter().all(Option::is_none));
        // The next run re-arms the handlers once.
        rig.nested.apply_l2_debug().unwrap();
        rig.nested.apply_l2_debug().unwrap();
        assert_eq!(rig.nested.l2.debug.len(), before + 2);
        assert_eq!(*rig.nested.l2.debug.last().unwrap(), armed);
    }

    #[test]
    fn test_more_vectors_than_registers_are_counted() {
        let mut rig = Rig::new((1 << 0) | (1 << 1) | (1 << 3) | (1 << 6) | (1 << 13));
        for (v, h) in [(0u8, 0x5300u64), (1, 0x5400), (3, 0x5500)] {
            gate64(&mut rig.mem, v, h, 0xe, true);
        }
        rig.enter(state64());
        let armed = rig.nested.l2.debug.last().unwrap().breakpoints;
        assert!(armed.iter().all(Option::is_some));
        assert!(!armed.contains(&Some(H13)));
        assert_eq!(rig.nested.intercept_rows()[3].1, 1);
        // Once per entry.
        let l2 = rig.nested.l2.state;
        rig.nested.refresh_handlers(&l2, &mut rig.mem).unwrap();
        assert_eq!(rig.nested.intercept_rows()[3].1, 1);
    }

    #[test]
    fn test_idt_change_is_found_at_the_next_hit() {
        let mut rig = Rig::new(1 << 6);
        rig.enter(state64());
        // L2 points gate 6 elsewhere; a breakpoint on the old handler is
        // no #UD any more.
        gate64(&mut rig.mem, 6, 0x5800, 0xe, true);
        rig.expect_step();
        let step = rig.hit(H6, &[CODE, 0x08, 0x202, STACK, 0x10]);
        assert!(matches!(step, L2Step::Resume));
        assert_eq!(rig.nested.debug.req.handlers, vec![(6, 0x5800)]);
        let rows = rig.nested.intercept_rows();
        assert_eq!((rows[5].1, rows[7].1), (1, 1));
        rig.nested.apply_l2_debug().unwrap();
        let o = reflected(rig.hit(0x5800, &[CODE, 0x08, 0x202, STACK, 0x10]));
        assert_eq!(o.exit.to_info().intr_info, 0x8000_0306);
    }

    #[test]
    fn test_shared_handler_is_told_apart_by_the_instruction() {
        let mut rig = Rig::new((1 << 3) | (1 << 6));
        gate64(&mut rig.mem, 3, H6, 0xe, true);
        rig.mem.write(CODE, &[0xcc, 0x90, 0x0f, 0x0b]).unwrap();
        rig.enter(state64());
        let o = reflected(rig.hit(H6, &[CODE + 1, 0x08, 0x202, STACK, 0x10]));
        let info = o.exit.to_info();
        assert_eq!((info.intr_info, info.instruction_len), (0x8000_0603, 1));
        assert_eq!(o.l2.rip, CODE);
        rig.nested.apply_l2_debug().unwrap();
        let o = reflected(rig.hit(H6, &[CODE + 2, 0x08, 0x202, STACK, 0x10]));
        assert_eq!(o.exit.to_info().intr_info, 0x8000_0306);
        assert_eq!(rig.nested.intercept_rows()[6].1, 0);
    }

    #[test]
    fn test_int3_kvm_stops_on_exits_when_wanted_else_reaches_l2() {
        let mut rig = Rig::new(1 << 3);
        rig.enter(state64());
        let step = rig
            .nested
            .intercept_on_emulation_failure(&[0xcc], &mut rig.mem)
            .unwrap()
            .unwrap();
        let o = reflected(step);
        let info = o.exit.to_info();
        assert_eq!((info.intr_info, info.instruction_len), (0x8000_0603, 1));
        assert_eq!(o.l2.rip, CODE);
        // Not wanted: delivered to L2 with the return RIP after the INT3.
        let mut rig = Rig::new(1 << 6);
        rig.enter(state64());
        let step = rig
            .nested
            .intercept_on_emulation_failure(&[], &mut rig.mem)
            .unwrap();
        assert!(step.is_none(), "bytes at RIP are not INT3: usual handling");
        rig.mem.write(CODE, &[0xcc]).unwrap();
        let step = rig
            .nested
            .intercept_on_emulation_failure(&[], &mut rig.mem)
            .unwrap();
        assert!(matches!(step, Some(L2Step::Resume)));
        let s = rig.nested.l2.state;
        assert_eq!(s.rip, CODE + 1);
        assert_eq!(s.pending_event.unwrap().info, 0x8000_0603);
    }

    #[test]
    fn test_int_n_kvm_stops_on_is_a_software_interrupt_for_l2() {
        let mut rig = Rig::new(1 << 13);
        rig.enter(state64());
        let step = rig
            .nested
            .intercept_on_emulation_failure(&[0xcd, 0x0d], &mut rig.mem)
            .unwrap();
        assert!(matches!(step, Some(L2Step::Resume)));
        let s = rig.nested.l2.state;
        assert_eq!(
            (s.rip, s.pending_event.unwrap().info),
            (CODE + 2, 0x8000_040d)
        );
        assert_eq!(rig.nested.stats().exits.get(&(0, Handler::L1)), None);
        // Its arrival at the watched vector-13 handler is stepped over.
        rig.nested.apply_l2_debug().unwrap();
        rig.expect_step();
        let step = rig.hit(H13, &[CODE + 2, 0x08, 0x202, STACK, 0x10]);
        assert!(matches!(step, L2Step::Resume));
        assert_eq!(rig.nested.intercept_rows()[2].1, 1);
        // Any other instruction is not intercept's.
        let step = rig
            .nested
            .intercept_on_emulation_failure(&[0x0f, 0x01, 0xc1], &mut rig.mem)
            .unwrap();
        assert!(step.is_none());
    }
}
