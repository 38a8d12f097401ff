//! `test=ept`: L2 runs on an identity EPT with holes (two unmapped pages,
//! a read-only page, a non-executable page, an unmapped page of L2's own
//! page tables) and one misconfigured entry. L1 checks every EPT exit
//! (reason, qualification, guest-physical and guest-linear address,
//! GUEST_RIP), fixes the entry, invalidates with INVEPT and lets L2 retry.

use core::arch::global_asm;

use l1_guest_hv::abi;
use l1_guest_hv::ept::{
    self, EptTables, EptViolation, CAP_INVEPT_ALL, CAP_INVEPT_SINGLE, EXEC, INVEPT_ALL_CONTEXT,
    INVEPT_SINGLE_CONTEXT, PAGE_SIZE, READ, RWX, WRITE,
};
use l1_guest_hv::exit::{reason, ShowOutcome, ShowResult};
use l1_guest_hv::segment::interrupt_gate;
use l1_guest_hv::text::Hex;
use vmcs12::controls::SecondaryProcBased;
use vmcs12::{VmcsField, VmxOutcome};

use crate::boot::KERNEL_CS;
use crate::cpu::{self, Global};
use crate::hv::{self, Action, Caps, Exit, GuestSpec};
use crate::modes::{load_vmcs, report_run, Checks, Handler};
use crate::vmx;

/// Page tables in L1's EPT: 4 x 2 MiB = the first 8 MiB, 4 KiB pages.
const EPT_PTS: usize = 4;
static EPT: Global<EptTables<EPT_PTS>> = Global::new(EptTables::new());

/// The pages L2 touches through holes: A (read hole), B (write hole),
/// RO (read-only), NX (no execute), F (target of the walk), MC (misconfig).
static TEST_PAGES: Global<[[u8; 4096]; 6]> = Global::new([[0; 4096]; 6]);
const PAGE_A: usize = 0;
const PAGE_B: usize = 1;
const PAGE_RO: usize = 2;
const PAGE_NX: usize = 3;
const PAGE_F: usize = 4;
const PAGE_MC: usize = 5;

/// L2's own paging structures: PML4 (entry 0 = L1's identity map), and a
/// PDPT, PD and PT for the linear address [`WALK_GLA`].
static L2_PAGING: Global<[[u64; 512]; 4]> = Global::new([[0; 512]; 4]);
/// A linear address L2's PT (index 5) maps to page F (+0x18).
const WALK_GLA: u64 = 0x80_0000_5018;

/// L2's IDT: every exception vector reports itself as WRONG and halts.
/// On a VMX CPU the exception bitmap (all ones) makes exceptions exit to
/// L1 first, so these handlers only run where a platform delivers an
/// exception into L2 instead of an EPT exit (our L0 without nested EPT).
static L2_IDT: Global<[[u64; 2]; 32]> = Global::new([[0; 2]; 32]);

fn install_l2_idt() -> bool {
    // SAFETY: L2_IDT is a static L2 does not use yet.
    let idt = unsafe { &mut *L2_IDT.ptr() };
    for (vector, gate) in idt.iter_mut().enumerate() {
        let handler = if vector == 14 {
            l2e_pf_handler as *const () as u64
        } else {
            l2e_exc_handler as *const () as u64
        };
        *gate = interrupt_gate(handler, KERNEL_CS, 0);
    }
    vmx::vmwrite(VmcsField::GUEST_IDTR_BASE, L2_IDT.addr()) == VmxOutcome::Succeed
        && vmx::vmwrite(VmcsField::GUEST_IDTR_LIMIT, 32 * 16 - 1) == VmxOutcome::Succeed
}

/// Markers L1 leaves in the pages for L2 to read.
const MARK_A: u64 = 0x4c31_5f41_5f72_6561; // "aer_A_1L"
const MARK_RO: u64 = 0x4c31_5f52_4f5f_726f;
const MARK_F: u64 = 0x4c31_5f46_5f77_616b;
const MARK_MC: u64 = 0x4c31_5f4d_435f_6d63;
/// What L2 writes into page B and into the read-only page (see the asm).
const L2_WRITE_B: u64 = 0x4c32_5772_6974_6542;
const L2_WRITE_RO: u64 = 0x4c32_5772_6974_6552;
/// The code L1 puts into page NX: `mov $0x4e58, %eax; ret`.
const NX_CODE: [u8; 6] = [0xb8, 0x58, 0x4e, 0x00, 0x00, 0xc3];
const NX_RESULT: u64 = 0x4e58;

extern "C" {
    static mut __bss_end: u8;
}

fn page_addr(i: usize) -> u64 {
    TEST_PAGES.addr() + i as u64 * PAGE_SIZE
}

fn write_u64(addr: u64, value: u64) {
    // SAFETY: callers pass addresses inside TEST_PAGES (identity-mapped
    // static pages) while L2 does not run.
    unsafe { (addr as *mut u64).write_volatile(value) }
}

fn read_u64(addr: u64) -> u64 {
    // SAFETY: as for `write_u64`.
    unsafe { (addr as *const u64).read_volatile() }
}

/// Runs `f` on L1's EPT (L2 is not running; single CPU).
pub(crate) fn with_ept<R>(f: impl FnOnce(&mut EptTables<EPT_PTS>) -> R) -> R {
    // SAFETY: only L1 code between VM exits touches the tables, and no
    // other reference to them is live.
    f(unsafe { &mut *EPT.ptr() })
}

/// Builds the identity EPT (every page RWX) over the first 8 MiB and
/// returns the EPTP; `None` (with a failed check) when this CPU cannot.
pub fn build_identity_ept(caps: &Caps, checks: &mut Checks) -> Option<u64> {
    let ept_ok = caps
        .ctls2
        .is_some_and(|c| c >> 32 & u64::from(SecondaryProcBased::ENABLE_EPT.bits()) != 0);
    let cap = caps.ept_vpid.unwrap_or(0);
    let eptp = ept::eptp(EPT.addr(), cap);
    let image_end = core::ptr::addr_of!(__bss_end) as u64;
    let covered = EptTables::<EPT_PTS>::covered();
    checks.check(
        "ept-available",
        "EPT, 4-level walk, L1 below the EPT end",
        (
            ("secondary EPT ", ept_ok),
            (" EPTP ", Hex(*eptp.as_ref().unwrap_or(&0))),
            (" image end ", Hex(image_end)),
        ),
        ept_ok && eptp.is_ok() && image_end <= covered,
    );
    let eptp = eptp.ok()?;
    if !ept_ok || image_end > covered {
        return None;
    }
    if let Err(e) = with_ept(|t| t.build_identity(EPT.addr(), RWX)) {
        say!("L1: EPT: ", e);
        return None;
    }
    say!(
        "L1: EPT identity map 0x0-",
        Hex(covered),
        " (4 KiB pages), EPTP ",
        Hex(eptp)
    );
    Some(eptp)
}

/// INVEPT of `kind` (falls back to the other type when the CPU offers
/// only one), checked as `NAME-invept`.
fn invept_checked(checks: &mut Checks, name: &str, cap: u64, eptp: u64, kind: u64) {
    let kind = match kind {
        INVEPT_SINGLE_CONTEXT if cap & CAP_INVEPT_SINGLE == 0 => INVEPT_ALL_CONTEXT,
        INVEPT_ALL_CONTEXT if cap & CAP_INVEPT_ALL == 0 => INVEPT_SINGLE_CONTEXT,
        k => k,
    };
    let o = vmx::invept(kind, [eptp, 0]);
    say!(
        "L1: invept ",
        if kind == INVEPT_SINGLE_CONTEXT {
            "single-context"
        } else {
            "all-context"
        },
        ": ",
        ShowOutcome(o)
    );
    checks.outcome(&Name(name, "-invept").as_buf(), VmxOutcome::Succeed, o);
}

/// `"{a}{b}"` without `core::fmt`.
struct Name<'a>(&'a str, &'a str);

impl Name<'_> {
    fn as_buf(&self) -> NameBuf {
        let mut b = NameBuf::default();
        l1_guest_hv::text::Sink::put(&mut b.0, self.0);
        l1_guest_hv::text::Sink::put(&mut b.0, self.1);
        b
    }
}

#[derive(Default)]
struct NameBuf(l1_guest_hv::text::TextBuf<64>);

impl core::ops::Deref for NameBuf {
    type Target = str;
    fn deref(&self) -> &str {
        self.0.as_str()
    }
}

/// One EPT exit L1 expects, in order.
struct Step {
    name: &'static str,
    reason: u16,
    /// Expected qualification (violations only).
    qual: Option<u64>,
    gpa: u64,
    /// Expected GUEST_LINEAR_ADDRESS (violations only).
    gla: Option<u64>,
    rip: u64,
    /// Page to fix and its new permissions.
    fix: (u64, u64),
    invept: u64,
}

extern "C" {
    fn l2_ept();
    fn l2_ept_read_a();
    fn l2_ept_write_b();
    fn l2_ept_write_ro();
    fn l2_ept_read_walk();
    fn l2_ept_read_mc();
    fn l2e_pf_handler();
    fn l2e_exc_handler();
    static mut l2_ept_args: [u64; 8];
    static l2_ept_results: [u64; 8];
}

fn set_arg(i: usize, value: u64) {
    // SAFETY: l2_ept_args is 64 bytes of .bss read by L2 only while it runs.
    unsafe {
        if let Some(slot) = (*core::ptr::addr_of_mut!(l2_ept_args)).get_mut(i) {
            *slot = value;
        }
    }
}

fn result(i: usize) -> u64 {
    // SAFETY: L2 is not running; 64 bytes of .bss.
    unsafe {
        (*core::ptr::addr_of!(l2_ept_results))
            .get(i)
            .copied()
            .unwrap_or(0)
    }
}

/// L2's paging for [`WALK_GLA`]: PML4[0] = L1's PML4[0], PML4[1] -> PDPT
/// -> PD -> PT, PT[5] -> page F. Accessed/dirty bits are preset so the
/// walk only reads.
fn build_l2_paging() -> u64 {
    let base = L2_PAGING.addr();
    let (pml4, pdpt, pd, pt) = (base, base + 0x1000, base + 0x2000, base + 0x3000);
    const P_RW_A: u64 = 0x23;
    // SAFETY: L1's CR3 is its identity-mapped boot PML4.
    let l1_pml4_0 = unsafe { ((cpu::read_cr3() & ept::ADDR_MASK) as *const u64).read_volatile() };
    // SAFETY: L2_PAGING is a static of four page tables, L2 is not running.
    let t = unsafe { &mut *L2_PAGING.ptr() };
    *t = [[0; 512]; 4];
    let [t4, t3, t2, t1] = t;
    t4[0] = l1_pml4_0;
    t4[1] = pdpt | P_RW_A;
    t3[0] = pd | P_RW_A;
    t2[0] = pt | P_RW_A;
    t1[5] = page_addr(PAGE_F) | P_RW_A | 0x40;
    pml4
}

pub fn ept(caps: &Caps, checks: &mut Checks) {
    let Some(eptp) = build_identity_ept(caps, checks) else {
        return;
    };
    let cap = caps.ept_vpid.unwrap_or(0);
    let exec_only = cap & ept::CAP_EXEC_ONLY != 0;
    // Page contents, then the holes.
    // SAFETY: TEST_PAGES is a static L2 does not use yet.
    unsafe { *TEST_PAGES.ptr() = [[0; 4096]; 6] };
    let a = page_addr(PAGE_A) + 0x10;
    let b = page_addr(PAGE_B) + 0x20;
    let ro = page_addr(PAGE_RO) + 0x30;
    let nx = page_addr(PAGE_NX);
    let f = page_addr(PAGE_F) + 0x18;
    let mc = page_addr(PAGE_MC) + 0x40;
    write_u64(a, MARK_A);
    write_u64(ro, MARK_RO);
    write_u64(f, MARK_F);
    write_u64(mc, MARK_MC);
    for (i, byte) in NX_CODE.iter().enumerate() {
        // SAFETY: inside page NX.
        unsafe { ((nx + i as u64) as *mut u8).write_volatile(*byte) };
    }
    let l2_cr3 = build_l2_paging();
    let l2_pt = l2_cr3 + 0x3000;
    let misconfig = ept::leaf_entry(mc, WRITE);
    let setup = with_ept(|t| {
        t.set_perms(a, 0)?;
        t.set_perms(b, 0)?;
        t.set_perms(ro, READ)?;
        t.set_perms(nx, READ | WRITE)?;
        t.set_perms(l2_pt, 0)?;
        t.set_raw(mc, misconfig)?;
        Ok::<_, ept::EptError>(t.translate(EPT.addr(), mc, exec_only))
    });
    match setup {
        Ok(tr) => checks.check(
            "ept-misconfig-entry-built",
            "Misconfigured",
            Hex(misconfig),
            tr == ept::Translation::Misconfigured,
        ),
        Err(e) => {
            say!("L1: EPT: ", e);
            checks.check("ept-holes", "set", "error", false);
            return;
        }
    }
    say!(
        "L1: EPT holes: A ",
        Hex(a),
        " B ",
        Hex(b),
        " L2 PT ",
        Hex(l2_pt),
        "; read-only ",
        Hex(ro),
        "; no-exec ",
        Hex(nx),
        "; W-only (misconfigured) ",
        Hex(mc)
    );
    for (i, v) in [a, b, ro, nx, WALK_GLA, mc].into_iter().enumerate() {
        set_arg(i, v);
    }
    let rip = |f: unsafe extern "C" fn()| f as *const () as u64;
    let steps = [
        Step {
            name: "ept-read-hole",
            reason: reason::EPT_VIOLATION,
            qual: Some(EptViolation::data_access(READ, 0).encode()),
            gpa: a,
            gla: Some(a),
            rip: rip(l2_ept_read_a),
            fix: (a, RWX),
            invept: INVEPT_SINGLE_CONTEXT,
        },
        Step {
            name: "ept-write-hole",
            reason: reason::EPT_VIOLATION,
            qual: Some(EptViolation::data_access(WRITE, 0).encode()),
            gpa: b,
            gla: Some(b),
            rip: rip(l2_ept_write_b),
            fix: (b, RWX),
            invept: INVEPT_ALL_CONTEXT,
        },
        Step {
            name: "ept-write-read-only",
            reason: reason::EPT_VIOLATION,
            qual: Some(EptViolation::data_access(WRITE, READ).encode()),
            gpa: ro + 8,
            gla: Some(ro + 8),
            rip: rip(l2_ept_write_ro),
            fix: (ro, RWX),
            invept: INVEPT_SINGLE_CONTEXT,
        },
        Step {
            name: "ept-misconfig",
            reason: reason::EPT_MISCONFIG,
            qual: None,
            gpa: mc,
            gla: None,
            rip: rip(l2_ept_read_mc),
            fix: (mc, RWX),
            invept: INVEPT_ALL_CONTEXT,
        },
        Step {
            name: "ept-fetch-no-exec",
            reason: reason::EPT_VIOLATION,
            qual: Some(EptViolation::data_access(EXEC, READ | WRITE).encode()),
            gpa: nx,
            gla: Some(nx),
            rip: nx,
            fix: (nx, RWX),
            invept: INVEPT_ALL_CONTEXT,
        },
        Step {
            name: "ept-paging-structure-hole",
            reason: reason::EPT_VIOLATION,
            // A read of L2's PT entry: GLA valid, not the translation.
            qual: Some(
                EptViolation {
                    read: true,
                    gla_valid: true,
                    ..Default::default()
                }
                .encode(),
            ),
            gpa: l2_pt + 5 * 8,
            gla: Some(WALK_GLA),
            rip: rip(l2_ept_read_walk),
            fix: (l2_pt, RWX),
            invept: INVEPT_SINGLE_CONTEXT,
        },
    ];
    let spec = GuestSpec {
        entry: rip(l2_ept),
        io_ports: &[abi::SERIAL_PORT],
        msrs: &[],
        exception_bitmap: u32::MAX,
        secondary: SecondaryProcBased::ENABLE_EPT.bits(),
        eptp,
    };
    if !load_vmcs(caps, &spec, checks) {
        return;
    }
    let set_cr3 = vmx::vmwrite(VmcsField::GUEST_CR3, l2_cr3);
    let got_eptp = vmx::vmread(VmcsField::EPT_POINTER);
    checks.check(
        "ept-pointer",
        Hex(eptp),
        ShowResult(got_eptp),
        got_eptp == Ok(eptp) && set_cr3 == VmxOutcome::Succeed,
    );
    let idt_ok = install_l2_idt();
    checks.check(
        "ept-l2-idt",
        "VMsucceed",
        if idt_ok {
            "VMsucceed"
        } else {
            "VMWRITE failed"
        },
        idt_ok,
    );
    let mut h = Handler::new();
    let mut seen = [false; 6];
    let mut exits = 0usize;
    let run = hv::run_guest(false, |exit| {
        let basic = exit.line.basic();
        if basic != reason::EPT_VIOLATION && basic != reason::EPT_MISCONFIG {
            return h.handle(exit);
        }
        exits += 1;
        // Match the exit to its case by page, so a case the platform
        // misses does not shift the others.
        let gpa = vmx::vmread(VmcsField::GUEST_PHYSICAL_ADDRESS).unwrap_or(u64::MAX);
        let page = gpa & !(PAGE_SIZE - 1);
        let found = steps
            .iter()
            .zip(seen.iter_mut())
            .find(|(st, done)| !**done && st.gpa & !(PAGE_SIZE - 1) == page);
        let Some((step, done)) = found else {
            say!("L1: EPT exit for an unexpected page, GPA ", Hex(gpa));
            h.unexpected();
            return Action::Stop;
        };
        *done = true;
        check_step(checks, step, exit);
        let (page, perms) = step.fix;
        if let Err(e) = with_ept(|t| t.set_perms(page, perms)) {
            say!("L1: EPT: ", e);
            return Action::Stop;
        }
        say!("L1: EPT: mapped ", Hex(page & !(PAGE_SIZE - 1)), " RWX");
        invept_checked(checks, step.name, cap, eptp, step.invept);
        // Resume at the same instruction: L2 retries the access.
        Action::Jump(exit.line.rip)
    });
    if !report_run(&h, run, checks) {
        return;
    }
    for (step, done) in steps.iter().zip(seen) {
        if !done {
            checks.check(
                &Name(step.name, "-exit").as_buf(),
                ("exit ", step.reason),
                "none",
                false,
            );
        }
    }
    checks.check("ept-exits", steps.len(), exits, exits == steps.len());
    let b_now = read_u64(b);
    let ro_now = read_u64(ro + 8);
    for (name, want, got) in [
        ("ept-l2-read-after-fill", MARK_A, result(0)),
        ("ept-l2-write-landed", L2_WRITE_B, b_now),
        ("ept-l2-read-of-read-only", MARK_RO, result(1)),
        ("ept-l2-write-after-upgrade", L2_WRITE_RO, ro_now),
        ("ept-l2-exec-after-upgrade", NX_RESULT, result(2)),
        ("ept-l2-read-through-walk", MARK_F, result(3)),
        ("ept-l2-read-after-misconfig-fix", MARK_MC, result(4)),
    ] {
        checks.check(name, Hex(want), Hex(got), want == got);
    }
}

/// The checks of one EPT exit against the step L1 expects.
fn check_step(checks: &mut Checks, step: &Step, exit: &Exit) {
    let line = &exit.line;
    let n = |suffix: &str| Name(step.name, suffix).as_buf();
    checks.check(
        &n("-reason"),
        step.reason,
        line.basic(),
        line.basic() == step.reason && !line.entry_failure(),
    );
    if let Some(q) = step.qual {
        // Bits 11:9 and 63:13 are not part of what this L1 asks for.
        let got = line.qualification & 0x11ff;
        checks.check(
            &n("-qual"),
            (Hex(q), (" ", EptViolation::decode(q))),
            (Hex(got), (" ", EptViolation::decode(got))),
            got == q,
        );
    }
    let gpa = vmx::vmread(VmcsField::GUEST_PHYSICAL_ADDRESS);
    checks.check(
        &n("-gpa"),
        Hex(step.gpa),
        ShowResult(gpa),
        gpa == Ok(step.gpa),
    );
    if let Some(want) = step.gla {
        let gla = vmx::vmread(VmcsField::GUEST_LINEAR_ADDRESS);
        checks.check(&n("-gla"), Hex(want), ShowResult(gla), gla == Ok(want));
    }
    checks.check(
        &n("-rip"),
        Hex(step.rip),
        Hex(line.rip),
        line.rip == step.rip,
    );
}

// The L2 program: one access per EPT case, results in l2_ept_results.
global_asm!(
    r#"
    .section .text.l2ept, "ax"
l2e_puts:
1:  lodsb
    testb %al, %al
    jz 2f
    outb %al, %dx
    jmp 1b
2:  ret

    .globl l2_ept
l2_ept:
    movq l2_ept_args+0(%rip), %rbx
    .globl l2_ept_read_a
l2_ept_read_a:
    movq (%rbx), %rax
    movq %rax, l2_ept_results+0(%rip)
    movq l2_ept_args+8(%rip), %rbx
    movabsq $0x4c32577269746542, %rax
    .globl l2_ept_write_b
l2_ept_write_b:
    movq %rax, (%rbx)
    movq l2_ept_args+16(%rip), %rbx
    movq (%rbx), %rax
    movq %rax, l2_ept_results+8(%rip)
    movabsq $0x4c32577269746552, %rax
    .globl l2_ept_write_ro
l2_ept_write_ro:
    movq %rax, 8(%rbx)
    movq l2_ept_args+40(%rip), %rbx
    .globl l2_ept_read_mc
l2_ept_read_mc:
    movq (%rbx), %rax
    movq %rax, l2_ept_results+32(%rip)
    movq l2_ept_args+24(%rip), %rax
    call *%rax
    movq %rax, l2_ept_results+16(%rip)
    movq l2_ept_args+32(%rip), %rbx
    .globl l2_ept_read_walk
l2_ept_read_walk:
    movq (%rbx), %rax
    movq %rax, l2_ept_results+24(%rip)
    leaq l2_ept_msg(%rip), %rsi
    movw $0x3f8, %dx
    call l2e_puts
3:  hlt
    jmp 3b

    .globl l2e_pf_handler
l2e_pf_handler:
    leaq l2_ept_msg_pf(%rip), %rsi
    call l2i_puts
    movq %cr2, %rax
    call l2i_puthex
    movb $10, %al
    outb %al, %dx
4:  hlt
    jmp 4b

    .globl l2e_exc_handler
l2e_exc_handler:
    leaq l2_ept_msg_exc(%rip), %rsi
    call l2i_puts
5:  hlt
    jmp 5b

    .section .rodata.l2ept, "a"
l2_ept_msg_pf:
    .asciz "WRONG: #PF delivered in L2 instead of an EPT exit, cr2="
l2_ept_msg_exc:
    .asciz "WRONG: exception delivered in L2\n"
l2_ept_msg:
    .asciz "L2 ept: every access completed\n"

    .section .bss.l2ept, "aw", @nobits
    .balign 8
    .globl l2_ept_args
l2_ept_args:
    .skip 64
    .globl l2_ept_results
l2_ept_results:
    .skip 64
    .text
"#,
    options(att_syntax)
);
