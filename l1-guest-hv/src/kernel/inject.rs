//! `test=inject`: L1 injects events into L2 through
//! VM_ENTRY_INTR_INFO_FIELD (SDM 25.8.3, 27.6): a #GP with an error code,
//! a software interrupt INT 0x30 with VM_ENTRY_INSTRUCTION_LEN, and an
//! external interrupt 0x40 while L2 has RFLAGS.IF = 1. L2 asks for each
//! one with an OUT to port 0x80; its IDT handlers print what they see
//! (`#GP error=0x.. rip=0x..`, `INT vector=0x30 rip=0x..`,
//! `IRQ vector=0x40 rip=0x.. rflags=0x..`) and L1 checks those lines and
//! that the valid bit of VM_ENTRY_INTR_INFO_FIELD is clear after the next
//! VM exit (SDM 28.2.5... "cleared on every VM exit").

use core::arch::global_asm;

use l1_guest_hv::abi;
use l1_guest_hv::event::{is_pending, Event};
use l1_guest_hv::exit::{hex_field, reason, IoQualification, ShowOutcome, ShowResult};
use l1_guest_hv::segment::interrupt_gate;
use l1_guest_hv::text::Hex;
use vmcs12::{VmcsField, VmxOutcome};

use crate::boot::KERNEL_CS;
use crate::cpu::Global;
use crate::hv::{self, Action, Caps, GuestSpec};
use crate::io;
use crate::modes::{load_vmcs, report_run, Checks, Handler};
use crate::vmx::{self, GuestRegs};

/// L2 asks for the next event by writing its number to this port.
const REQUEST_PORT: u16 = 0x80;
/// The error code L1 injects with the #GP.
const GP_ERROR: u32 = 0xabc0;
const INT_VECTOR: u8 = 0x30;
const EXT_VECTOR: u8 = 0x40;
/// `int $0x30` is two bytes (CD 30).
const INT_LEN: u32 = 2;

static L2_IDT: Global<[[u64; 2]; 256]> = Global::new([[0; 2]; 256]);

extern "C" {
    fn l2_inject();
    fn l2_inject_after_gp();
    fn l2_inject_int_site();
    fn l2_inject_after_ext();
    fn l2i_gp_handler();
    fn l2i_int_handler();
    fn l2i_irq_handler();
}

fn addr(f: unsafe extern "C" fn()) -> u64 {
    f as *const () as u64
}

/// The event for request `n` from L2.
fn event_for(n: u64) -> Option<Event> {
    match n {
        1 => Some(Event::HardwareException {
            vector: 13,
            error_code: Some(GP_ERROR),
        }),
        2 => Some(Event::SoftwareInterrupt {
            vector: INT_VECTOR,
            instruction_len: INT_LEN,
        }),
        3 => Some(Event::ExternalInterrupt { vector: EXT_VECTOR }),
        _ => None,
    }
}

fn event_name(n: u64) -> &'static str {
    match n {
        1 => "inject-gp",
        2 => "inject-int",
        _ => "inject-ext",
    }
}

/// Writes the injection fields for `event`.
fn inject_event(event: &Event) -> VmxOutcome {
    let mut o = vmx::vmwrite(
        VmcsField::VM_ENTRY_INTR_INFO_FIELD,
        event.intr_info().into(),
    );
    if let (VmxOutcome::Succeed, Some(code)) = (o, event.error_code()) {
        o = vmx::vmwrite(VmcsField::VM_ENTRY_EXCEPTION_ERROR_CODE, code.into());
    }
    if let (VmxOutcome::Succeed, Some(len)) = (o, event.instruction_len()) {
        o = vmx::vmwrite(VmcsField::VM_ENTRY_INSTRUCTION_LEN, len.into());
    }
    o
}

pub fn inject(caps: &Caps, checks: &mut Checks) {
    // A PC platform (Bochs) may have the timer pending at the PIC: mask
    // both PICs so L2's STI window sees only the injected interrupt.
    io::outb(0x21, 0xff);
    io::outb(0xa1, 0xff);
    // L2's IDT: #GP, INT 0x30, external interrupt 0x40 (no IST: L2 stays
    // on its stack at CPL 0).
    // SAFETY: L2_IDT is a static L2 does not use yet.
    let idt = unsafe { &mut *L2_IDT.ptr() };
    *idt = [[0; 2]; 256];
    for (vector, handler) in [
        (13usize, addr(l2i_gp_handler)),
        (usize::from(INT_VECTOR), addr(l2i_int_handler)),
        (usize::from(EXT_VECTOR), addr(l2i_irq_handler)),
    ] {
        if let Some(gate) = idt.get_mut(vector) {
            *gate = interrupt_gate(handler, KERNEL_CS, 0);
        }
    }
    let spec = GuestSpec {
        entry: addr(l2_inject),
        io_ports: &[abi::SERIAL_PORT, REQUEST_PORT],
        msrs: &[],
        // Every exception exits except #GP: the injected #GP must not
        // depend on how a CPU treats the bitmap for injected events.
        exception_bitmap: !(1 << 13),
        secondary: 0,
        eptp: 0,
    };
    if !load_vmcs(caps, &spec, checks) {
        return;
    }
    let idt_ok = vmx::vmwrite(VmcsField::GUEST_IDTR_BASE, L2_IDT.addr()) == VmxOutcome::Succeed
        && vmx::vmwrite(VmcsField::GUEST_IDTR_LIMIT, 256 * 16 - 1) == VmxOutcome::Succeed;
    if !idt_ok {
        checks.check("inject-l2-idt", "VMsucceed", "VMWRITE failed", false);
        return;
    }
    let mut h = Handler::new();
    let mut pending: Option<u64> = None;
    let mut requests = 0u32;
    let result = hv::run_guest(false, |exit| {
        if let Some(n) = pending.take() {
            let info = vmx::vmread(VmcsField::VM_ENTRY_INTR_INFO_FIELD);
            let name = match n {
                1 => "inject-gp-valid-bit-cleared",
                2 => "inject-int-valid-bit-cleared",
                _ => "inject-ext-valid-bit-cleared",
            };
            checks.check(
                name,
                "bit 31 clear",
                ShowResult(info),
                info.is_ok_and(|v| !is_pending(v)),
            );
        }
        let line = &exit.line;
        if line.basic() == reason::IO
            && IoQualification::decode(line.qualification).is_some_and(|q| q.port == REQUEST_PORT)
        {
            requests += 1;
            let n = vmx::guest_reg(GuestRegs::RAX) & 0xff;
            let Some(event) = event_for(n) else {
                say!("L1: unknown injection request ", n);
                h.unexpected();
                return Action::Stop;
            };
            let o = inject_event(&event);
            say!(
                "L1: inject ",
                event_name(n),
                ": VM_ENTRY_INTR_INFO_FIELD ",
                Hex(event.intr_info().into()),
                " error code ",
                Hex(event.error_code().unwrap_or(0).into()),
                " instruction length ",
                event.instruction_len().unwrap_or(0),
                ": ",
                ShowOutcome(o)
            );
            if o != VmxOutcome::Succeed {
                h.unexpected();
                return Action::Stop;
            }
            pending = Some(n);
            return Action::Advance;
        }
        h.handle(exit)
    });
    if !report_run(&h, result, checks) {
        return;
    }
    checks.check("inject-requests", 3u32, requests, requests == 3);
    // What the handlers saw.
    let gp = h.log.find("#GP");
    checks.check(
        "inject-gp-error-code",
        Hex(GP_ERROR.into()),
        ShowField(gp.and_then(|l| hex_field(l, "error="))),
        gp.and_then(|l| hex_field(l, "error=")) == Some(GP_ERROR.into()),
    );
    let want = addr(l2_inject_after_gp);
    let got = gp.and_then(|l| hex_field(l, "rip="));
    checks.check(
        "inject-gp-rip",
        Hex(want),
        ShowField(got),
        got == Some(want),
    );
    let int = h.log.find("INT");
    let want = addr(l2_inject_int_site) + u64::from(INT_LEN);
    let got = int.and_then(|l| hex_field(l, "rip="));
    checks.check(
        "inject-int-return-rip",
        Hex(want),
        ShowField(got),
        got == Some(want),
    );
    let wrong = h.log.find("WRONG");
    checks.check(
        "inject-int-delivered-by-l1",
        "no WRONG line",
        wrong.unwrap_or("no WRONG line"),
        wrong.is_none(),
    );
    let irq = h.log.find("IRQ");
    let want = addr(l2_inject_after_ext);
    let got = irq.and_then(|l| hex_field(l, "rip="));
    checks.check(
        "inject-ext-rip",
        Hex(want),
        ShowField(got),
        got == Some(want),
    );
    let rflags = irq.and_then(|l| hex_field(l, "rflags="));
    checks.check(
        "inject-ext-rflags-if",
        "IF (0x200) set",
        ShowField(rflags),
        rflags.is_some_and(|v| v & 0x200 != 0),
    );
}

/// A value L1 parsed from an L2 line, or `missing`.
struct ShowField(Option<u64>);

impl l1_guest_hv::text::Emit for ShowField {
    fn emit(&self, out: &mut dyn l1_guest_hv::text::Sink) {
        match self.0 {
            Some(v) => Hex(v).emit(out),
            None => out.put("missing"),
        }
    }
}

// The L2 program and its interrupt handlers. Handlers save what they use
// and print through port 0x3f8.
global_asm!(
    r##"
    .section .text.l2inject, "ax"
    /* Prints the NUL-terminated string at RSI on 0x3f8 (DX = 0x3f8 after). */
    .globl l2i_puts
l2i_puts:
    movw $0x3f8, %dx
1:  lodsb
    testb %al, %al
    jz 2f
    outb %al, %dx
    jmp 1b
2:  ret

    /* Prints RAX as 0x + 16 hex digits; clobbers RAX, RCX, RDX, RSI. */
    .globl l2i_puthex
l2i_puthex:
    movq %rax, %rsi
    movw $0x3f8, %dx
    movb $'0', %al
    outb %al, %dx
    movb $'x', %al
    outb %al, %dx
    movl $16, %ecx
1:  rolq $4, %rsi
    movl %esi, %eax
    andl $15, %eax
    cmpl $10, %eax
    jb 2f
    addl $39, %eax
2:  addl $48, %eax
    outb %al, %dx
    decl %ecx
    jnz 1b
    ret

    .globl l2_inject
l2_inject:
    cli
    movb $1, %al
    outb %al, $0x80
    .globl l2_inject_after_gp
l2_inject_after_gp:
    movb $2, %al
    outb %al, $0x80
    .globl l2_inject_int_site
l2_inject_int_site:
    /* Two bytes L1 stands for with INT 0x30 (length 2): when the
       injection works, the handler returns past them. */
    jmp l2_inject_missed
    sti
    nop
    movb $3, %al
    outb %al, $0x80
    .globl l2_inject_after_ext
l2_inject_after_ext:
    cli
    leaq l2i_msg_done(%rip), %rsi
    call l2i_puts
3:  hlt
    jmp 3b
l2_inject_missed:
    leaq l2i_msg_missed(%rip), %rsi
    call l2i_puts
4:  hlt
    jmp 4b

    /* #GP: error code at 32(%rsp) after the four pushes, RIP at 40. */
    .globl l2i_gp_handler
l2i_gp_handler:
    pushq %rax
    pushq %rcx
    pushq %rdx
    pushq %rsi
    leaq l2i_msg_gp(%rip), %rsi
    call l2i_puts
    movq 32(%rsp), %rax
    call l2i_puthex
    leaq l2i_msg_rip(%rip), %rsi
    call l2i_puts
    movq 40(%rsp), %rax
    call l2i_puthex
    movb $10, %al
    outb %al, %dx
    popq %rsi
    popq %rdx
    popq %rcx
    popq %rax
    addq $8, %rsp
    iretq

    .globl l2i_int_handler
l2i_int_handler:
    pushq %rax
    pushq %rcx
    pushq %rdx
    pushq %rsi
    leaq l2i_msg_int(%rip), %rsi
    call l2i_puts
    movq 32(%rsp), %rax
    call l2i_puthex
    movb $10, %al
    outb %al, %dx
    popq %rsi
    popq %rdx
    popq %rcx
    popq %rax
    iretq

    .globl l2i_irq_handler
l2i_irq_handler:
    pushq %rax
    pushq %rcx
    pushq %rdx
    pushq %rsi
    leaq l2i_msg_irq(%rip), %rsi
    call l2i_puts
    movq 32(%rsp), %rax
    call l2i_puthex
    leaq l2i_msg_rflags(%rip), %rsi
    call l2i_puts
    movq 48(%rsp), %rax
    call l2i_puthex
    movb $10, %al
    outb %al, %dx
    popq %rsi
    popq %rdx
    popq %rcx
    popq %rax
    iretq

    .section .rodata.l2inject, "a"
l2i_msg_gp:
    .asciz "#GP error="
l2i_msg_rip:
    .asciz " rip="
l2i_msg_int:
    .asciz "INT vector=0x30 rip="
l2i_msg_irq:
    .asciz "IRQ vector=0x40 rip="
l2i_msg_rflags:
    .asciz " rflags="
l2i_msg_done:
    .asciz "L2 inject: all three handlers returned\n"
l2i_msg_missed:
    .asciz "WRONG: INT 0x30 was not injected, L2 ran the jump L1 stands for\n"
    .text
"##,
    options(att_syntax)
);
