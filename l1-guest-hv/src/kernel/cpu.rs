//! L1's CPU tables and fault handling: TSS with an IST stack, IDT for the
//! 32 exception vectors, an exception table (like Linux's `_ASM_EXTABLE`)
//! that turns a fault in a marked instruction into an error result, the #UD
//! trap to L0 (see `abi::VMX_TRAP_PORT`), and CR/MSR/descriptor-table helpers.

use core::arch::{asm, global_asm};
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicU64, Ordering};

use l1_guest_hv::abi;
use l1_guest_hv::segment::{interrupt_gate, tss_descriptor};
use l1_guest_hv::text::Hex;

use crate::boot::{KERNEL_CS, KERNEL_TSS};

/// A statically allocated object L1 shares with the CPU (or with L2, or
/// hands to VMX instructions by physical address).
#[repr(C, align(4096))]
pub struct Global<T>(UnsafeCell<T>);

// SAFETY: L1 runs on one CPU with interrupts off; exception handlers only
// touch `Global`s the interrupted code does not hold references into.
unsafe impl<T> Sync for Global<T> {}

impl<T> Global<T> {
    /// Wraps a value.
    pub const fn new(value: T) -> Self {
        Self(UnsafeCell::new(value))
    }

    /// Raw pointer to the value.
    pub fn ptr(&self) -> *mut T {
        self.0.get()
    }

    /// The value's address: L1 runs identity-mapped, so it is also the
    /// guest-physical address VMX instructions and the CPU expect.
    pub fn addr(&self) -> u64 {
        self.0.get() as u64
    }
}

/// A 4 KiB page (VMXON region, VMCS, bitmaps).
pub type Page = Global<[u8; 4096]>;

/// Fills a page with `byte`.
pub fn page_fill(page: &Page, byte: u8) {
    // SAFETY: the page is a static 4 KiB object; no reference into it is
    // live while L1 rewrites it (single CPU, no interrupts).
    unsafe { core::ptr::write_bytes(page.ptr() as *mut u8, byte, 4096) }
}

/// Writes a little-endian u32 at `offset` (ignored when out of the page).
pub fn page_write_u32(page: &Page, offset: usize, value: u32) {
    if offset + 4 > 4096 {
        return;
    }
    // SAFETY: bounds checked above; unaligned write of plain bytes.
    unsafe { core::ptr::write_unaligned((page.ptr() as *mut u8).add(offset) as *mut u32, value) }
}

/// Sets one bit (byte offset, bit number) in a page.
pub fn page_set_bit(page: &Page, byte: usize, bit: u8) {
    if byte >= 4096 {
        return;
    }
    // SAFETY: bounds checked above.
    unsafe { *(page.ptr() as *mut u8).add(byte) |= 1 << (bit & 7) }
}

const IST_STACK_SIZE: usize = 16384;
static IST_STACK: Global<[u8; IST_STACK_SIZE]> = Global::new([0; IST_STACK_SIZE]);
static TSS: Global<[u8; 104]> = Global::new([0; 104]);
static IDT: Global<[[u64; 2]; 256]> = Global::new([[0; 2]; 256]);

extern "C" {
    static mut boot_gdt: [u64; 5];
    static exc_stub_table: [u64; 32];
    static __extable_start: [u64; 2];
    static __extable_end: [u64; 2];
}

/// The register frame every exception stub builds; its layout is
/// `abi::trap_frame` (L0 reads and writes it on a #UD trap).
#[repr(C)]
#[derive(Debug)]
pub struct TrapFrame {
    /// Trap status (abi::TRAP_STATUS_*).
    pub status: u64,
    /// GPRs in encoding order (RSP slot excluded).
    pub rax: u64,
    /// RCX.
    pub rcx: u64,
    /// RDX.
    pub rdx: u64,
    /// RBX.
    pub rbx: u64,
    /// RBP.
    pub rbp: u64,
    /// RSI.
    pub rsi: u64,
    /// RDI.
    pub rdi: u64,
    /// R8-R15.
    pub r: [u64; 8],
    /// Vector.
    pub vector: u64,
    /// Error code.
    pub error_code: u64,
    /// RIP.
    pub rip: u64,
    /// CS.
    pub cs: u64,
    /// RFLAGS.
    pub rflags: u64,
    /// RSP.
    pub rsp: u64,
    /// SS.
    pub ss: u64,
}

const _: () = assert!(core::mem::size_of::<TrapFrame>() as u64 == abi::trap_frame::SIZE);
const _: () = assert!(core::mem::offset_of!(TrapFrame, rip) as u64 == abi::trap_frame::RIP);
const _: () = assert!(core::mem::offset_of!(TrapFrame, vector) as u64 == abi::trap_frame::VECTOR);
const _: () = assert!(core::mem::offset_of!(TrapFrame, rdi) as u64 == abi::trap_frame::RDI);

global_asm!(
    r#"
    .section .text.exc, "ax"
exc_stub_0:
    pushq $0
    pushq $0
    jmp exc_common
exc_stub_1:
    pushq $0
    pushq $1
    jmp exc_common
exc_stub_2:
    pushq $0
    pushq $2
    jmp exc_common
exc_stub_3:
    pushq $0
    pushq $3
    jmp exc_common
exc_stub_4:
    pushq $0
    pushq $4
    jmp exc_common
exc_stub_5:
    pushq $0
    pushq $5
    jmp exc_common
exc_stub_6:
    pushq $0
    pushq $6
    jmp exc_common
exc_stub_7:
    pushq $0
    pushq $7
    jmp exc_common
exc_stub_8:
    pushq $8
    jmp exc_common
exc_stub_9:
    pushq $0
    pushq $9
    jmp exc_common
exc_stub_10:
    pushq $10
    jmp exc_common
exc_stub_11:
    pushq $11
    jmp exc_common
exc_stub_12:
    pushq $12
    jmp exc_common
exc_stub_13:
    pushq $13
    jmp exc_common
exc_stub_14:
    pushq $14
    jmp exc_common
exc_stub_15:
    pushq $0
    pushq $15
    jmp exc_common
exc_stub_16:
    pushq $0
    pushq $16
    jmp exc_common
exc_stub_17:
    pushq $17
    jmp exc_common
exc_stub_18:
    pushq $0
    pushq $18
    jmp exc_common
exc_stub_19:
    pushq $0
    pushq $19
    jmp exc_common
exc_stub_20:
    pushq $0
    pushq $20
    jmp exc_common
exc_stub_21:
    pushq $21
    jmp exc_common
exc_stub_22:
    pushq $0
    pushq $22
    jmp exc_common
exc_stub_23:
    pushq $0
    pushq $23
    jmp exc_common
exc_stub_24:
    pushq $0
    pushq $24
    jmp exc_common
exc_stub_25:
    pushq $0
    pushq $25
    jmp exc_common
exc_stub_26:
    pushq $0
    pushq $26
    jmp exc_common
exc_stub_27:
    pushq $0
    pushq $27
    jmp exc_common
exc_stub_28:
    pushq $0
    pushq $28
    jmp exc_common
exc_stub_29:
    pushq $29
    jmp exc_common
exc_stub_30:
    pushq $30
    jmp exc_common
exc_stub_31:
    pushq $0
    pushq $31
    jmp exc_common
exc_common:
    pushq %r15
    pushq %r14
    pushq %r13
    pushq %r12
    pushq %r11
    pushq %r10
    pushq %r9
    pushq %r8
    pushq %rdi
    pushq %rsi
    pushq %rbp
    pushq %rbx
    pushq %rdx
    pushq %rcx
    pushq %rax
    pushq $0
    /* #UD: offer the instruction to L0 first (abi::VMX_TRAP_PORT). */
    cmpq $6, 128(%rsp)
    jne 5f
    movl %esp, %eax
    movw $0x0e0e, %dx
    outl %eax, %dx
    cmpq $1, (%rsp)
    je 6f
5:  movq %rsp, %rdi
    subq $8, %rsp
    call exception_dispatch
    addq $8, %rsp
6:  addq $8, %rsp
    popq %rax
    popq %rcx
    popq %rdx
    popq %rbx
    popq %rbp
    popq %rsi
    popq %rdi
    popq %r8
    popq %r9
    popq %r10
    popq %r11
    popq %r12
    popq %r13
    popq %r14
    popq %r15
    addq $16, %rsp
    iretq

    .section .rodata.exc, "a"
    .balign 8
    .globl exc_stub_table
exc_stub_table:
    .quad exc_stub_0
    .quad exc_stub_1
    .quad exc_stub_2
    .quad exc_stub_3
    .quad exc_stub_4
    .quad exc_stub_5
    .quad exc_stub_6
    .quad exc_stub_7
    .quad exc_stub_8
    .quad exc_stub_9
    .quad exc_stub_10
    .quad exc_stub_11
    .quad exc_stub_12
    .quad exc_stub_13
    .quad exc_stub_14
    .quad exc_stub_15
    .quad exc_stub_16
    .quad exc_stub_17
    .quad exc_stub_18
    .quad exc_stub_19
    .quad exc_stub_20
    .quad exc_stub_21
    .quad exc_stub_22
    .quad exc_stub_23
    .quad exc_stub_24
    .quad exc_stub_25
    .quad exc_stub_26
    .quad exc_stub_27
    .quad exc_stub_28
    .quad exc_stub_29
    .quad exc_stub_30
    .quad exc_stub_31
    .text
"#,
    options(att_syntax)
);

/// "No fault recorded".
const NO_FAULT: u64 = u64::MAX;
static FAULT_VECTOR: AtomicU64 = AtomicU64::new(NO_FAULT);
static FAULT_ERROR: AtomicU64 = AtomicU64::new(0);
static FAULT_CR2: AtomicU64 = AtomicU64::new(0);

/// A fault caught through the exception table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    /// Exception vector.
    pub vector: u8,
    /// Error code (0 if none).
    pub error_code: u64,
    /// CR2 for a #PF.
    pub cr2: u64,
}

/// Forgets any recorded fault (call before a guarded instruction).
pub fn clear_fault() {
    FAULT_VECTOR.store(NO_FAULT, Ordering::SeqCst);
}

/// The fault a guarded instruction raised since [`clear_fault`], if any.
pub fn take_fault() -> Option<Fault> {
    let v = FAULT_VECTOR.swap(NO_FAULT, Ordering::SeqCst);
    (v != NO_FAULT).then(|| Fault {
        vector: v as u8,
        error_code: FAULT_ERROR.load(Ordering::SeqCst),
        cr2: FAULT_CR2.load(Ordering::SeqCst),
    })
}

/// The resume address for a fault at `rip`, from the exception table.
fn extable_lookup(rip: u64) -> Option<u64> {
    // The linker script brackets the table with these symbols; every
    // entry is two u64 written by `.quad fault, resume`.
    let start = core::ptr::addr_of!(__extable_start);
    let end = core::ptr::addr_of!(__extable_end);
    let count = (end as usize - start as usize) / 16;
    // SAFETY: `count` entries lie between the two symbols.
    let table = unsafe { core::slice::from_raw_parts(start, count) };
    table.iter().find(|e| e[0] == rip).map(|e| e[1])
}

fn vector_name(vector: u64) -> &'static str {
    match vector {
        0 => "#DE",
        1 => "#DB",
        2 => "NMI",
        3 => "#BP",
        4 => "#OF",
        5 => "#BR",
        6 => "#UD",
        7 => "#NM",
        8 => "#DF",
        10 => "#TS",
        11 => "#NP",
        12 => "#SS",
        13 => "#GP",
        14 => "#PF",
        16 => "#MF",
        17 => "#AC",
        18 => "#MC",
        19 => "#XM",
        _ => "#??",
    }
}

#[no_mangle]
extern "C" fn exception_dispatch(frame: &mut TrapFrame) {
    let cr2 = read_cr2();
    if let Some(resume) = extable_lookup(frame.rip) {
        FAULT_ERROR.store(frame.error_code, Ordering::SeqCst);
        FAULT_CR2.store(cr2, Ordering::SeqCst);
        FAULT_VECTOR.store(frame.vector, Ordering::SeqCst);
        frame.rip = resume;
        return;
    }
    say!(
        "L1: unexpected exception vector=",
        frame.vector,
        " (",
        vector_name(frame.vector),
        ") error=",
        Hex(frame.error_code),
        " rip=",
        Hex(frame.rip),
        " rsp=",
        Hex(frame.rsp),
        " cr2=",
        Hex(cr2)
    );
    say!("Bail out! L1 crashed");
    crate::io::exit(abi::EXIT_STATUS_CRASH);
}

/// Installs the TSS (IST1 = a dedicated stack, so exceptions never run on
/// the interrupted stack's red zone) and the IDT for vectors 0-31.
pub fn init() {
    let ist_top = IST_STACK.addr() + IST_STACK_SIZE as u64;
    let tss = TSS.ptr() as *mut u8;
    // SAFETY: TSS is a static 104-byte object; offsets 4 (RSP0), 36 (IST1)
    // and 102 (I/O map base) are inside it (SDM 8.7, Figure 8-11).
    unsafe {
        core::ptr::write_unaligned(tss.add(4) as *mut u64, ist_top);
        core::ptr::write_unaligned(tss.add(36) as *mut u64, ist_top);
        core::ptr::write_unaligned(tss.add(102) as *mut u16, 104);
    }
    let [low, high] = tss_descriptor(TSS.addr(), 103);
    // SAFETY: boot_gdt is the 5-entry GDT from boot.rs; entries 3 and 4
    // are the TSS descriptor slots and nothing references them yet.
    unsafe {
        let gdt = core::ptr::addr_of_mut!(boot_gdt) as *mut u64;
        gdt.add(3).write_volatile(low);
        gdt.add(4).write_volatile(high);
        asm!("ltr {0:x}", in(reg) KERNEL_TSS, options(nostack, preserves_flags));
    }
    for vector in 0..32 {
        // SAFETY: exc_stub_table has 32 entries written by the assembler.
        let handler = unsafe {
            (core::ptr::addr_of!(exc_stub_table) as *const u64)
                .add(vector)
                .read()
        };
        // SAFETY: IDT is a static 256-entry table; vector < 32.
        unsafe { (*IDT.ptr())[vector] = interrupt_gate(handler, KERNEL_CS, 1) };
    }
    let idtr = DescriptorTable {
        limit: (256 * 16 - 1) as u16,
        base: IDT.addr(),
    };
    // SAFETY: the IDT is static and fully initialised for the vectors that
    // can occur (interrupts stay disabled).
    unsafe { asm!("lidt [{0}]", in(reg) &idtr, options(readonly, nostack, preserves_flags)) };
}

/// A GDTR/IDTR image.
#[repr(C, packed)]
#[derive(Debug, Clone, Copy, Default)]
pub struct DescriptorTable {
    /// Limit.
    pub limit: u16,
    /// Base.
    pub base: u64,
}

/// SGDT.
pub fn sgdt() -> DescriptorTable {
    let mut t = DescriptorTable::default();
    // SAFETY: SGDT stores 10 bytes into `t`.
    unsafe { asm!("sgdt [{0}]", in(reg) &mut t, options(nostack, preserves_flags)) };
    t
}

/// SIDT.
pub fn sidt() -> DescriptorTable {
    let mut t = DescriptorTable::default();
    // SAFETY: SIDT stores 10 bytes into `t`.
    unsafe { asm!("sidt [{0}]", in(reg) &mut t, options(nostack, preserves_flags)) };
    t
}

/// The GDT descriptor at `selector` (0 if outside the boot GDT).
pub fn gdt_entry(selector: u16) -> u64 {
    let index = usize::from(selector >> 3);
    if index >= 5 {
        return 0;
    }
    // SAFETY: index < 5 entries of the static GDT.
    unsafe {
        (core::ptr::addr_of!(boot_gdt) as *const u64)
            .add(index)
            .read_volatile()
    }
}

macro_rules! read_cr {
    ($name:ident, $cr:literal) => {
        /// Reads the control register.
        pub fn $name() -> u64 {
            let v: u64;
            // SAFETY: reading a control register has no side effects at CPL 0.
            unsafe { asm!(concat!("mov {0}, ", $cr), out(reg) v, options(nomem, nostack, preserves_flags)) };
            v
        }
    };
}
read_cr!(read_cr0, "cr0");
read_cr!(read_cr2, "cr2");
read_cr!(read_cr3, "cr3");
read_cr!(read_cr4, "cr4");

/// Writes CR4; a #GP (reserved bit, or VMXE refused by the platform) is
/// returned instead of crashing.
pub fn try_write_cr4(value: u64) -> Result<(), Fault> {
    clear_fault();
    // SAFETY: changing CR4 bits this kernel asks for (VMXE) does not
    // affect memory safety; a fault resumes at label 3 via the extable.
    unsafe {
        asm!(
            "2:",
            "mov cr4, {0}",
            "3:",
            ".pushsection .l1_extable, \"a\"",
            ".quad 2b, 3b",
            ".popsection",
            in(reg) value,
            options(nostack)
        )
    };
    take_fault().map_or(Ok(()), Err)
}

/// RDMSR; a #GP is returned instead of crashing.
pub fn try_rdmsr(msr: u32) -> Result<u64, Fault> {
    let (lo, hi): (u32, u32);
    clear_fault();
    // SAFETY: RDMSR has no memory effects; a #GP resumes at label 3.
    unsafe {
        asm!(
            "xor eax, eax",
            "xor edx, edx",
            "2:",
            "rdmsr",
            "3:",
            ".pushsection .l1_extable, \"a\"",
            ".quad 2b, 3b",
            ".popsection",
            in("ecx") msr,
            out("eax") lo,
            out("edx") hi,
            options(nomem, nostack)
        )
    };
    match take_fault() {
        Some(f) => Err(f),
        None => Ok((u64::from(hi) << 32) | u64::from(lo)),
    }
}

/// WRMSR; a #GP is returned instead of crashing.
pub fn try_wrmsr(msr: u32, value: u64) -> Result<(), Fault> {
    clear_fault();
    // SAFETY: the MSRs L1 writes (IA32_FEATURE_CONTROL) do not affect
    // memory safety; a #GP resumes at label 3.
    unsafe {
        asm!(
            "2:",
            "wrmsr",
            "3:",
            ".pushsection .l1_extable, \"a\"",
            ".quad 2b, 3b",
            ".popsection",
            in("ecx") msr,
            in("eax") value as u32,
            in("edx") (value >> 32) as u32,
            options(nostack)
        )
    };
    take_fault().map_or(Ok(()), Err)
}

/// RDTSC.
pub fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: RDTSC only reads the time-stamp counter.
    unsafe {
        asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags))
    };
    (u64::from(hi) << 32) | u64::from(lo)
}
