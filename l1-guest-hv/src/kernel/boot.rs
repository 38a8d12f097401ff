//! Multiboot v1 header and the 32-bit to 64-bit trampoline.
//!
//! Self-contained (also used by `tests/kernels/multiboot.rs` through
//! `#[path]`): it needs the linker-script symbols `__load_start`,
//! `__load_end`, `__bss_start`, `__bss_end` and calls
//! `extern "C" fn kernel_main(magic: u32, info: u32) -> !`.
//!
//! Entry state (Multiboot 0.6.96, 3.2): 32-bit protected mode, flat
//! segments, paging off, EAX = 0x2BADB002, EBX = physical address of the
//! Multiboot information. The trampoline zeroes .bss, builds identity page
//! tables (2 MiB pages over the first 4 GiB), enables PAE, EFER.LME,
//! paging with CR0.WP|NE|MP (NE is fixed to 1 in VMX operation, SDM A.7),
//! CR4.OSFXSR|OSXMMEXCPT for SSE, loads a GDT with a 64-bit code segment and
//! far-jumps to 64-bit code, which sets a stack and calls `kernel_main`.

/// GDT selector of the 64-bit code segment.
pub const KERNEL_CS: u16 = 0x08;
/// GDT selector of the flat data segment.
pub const KERNEL_DS: u16 = 0x10;
/// GDT selector of the TSS (filled in at run time by the L1 kernel).
pub const KERNEL_TSS: u16 = 0x18;

core::arch::global_asm!(
    r#"
    .section .multiboot, "a"
    .balign 4
multiboot_header:
    .long 0x1BADB002
    .long 0x00010003
    .long -(0x1BADB002 + 0x00010003)
    .long multiboot_header
    .long __load_start
    .long __load_end
    .long __bss_end
    .long _start32

    .section .text.boot, "ax"
    .code32
    .globl _start32
_start32:
    cli
    cld
    movl %eax, %esi
    movl %ebx, %ebp
    /* Zero .bss (page tables, stacks and statics live there). */
    movl $__bss_start, %edi
    movl $__bss_end, %ecx
    subl %edi, %ecx
    xorl %eax, %eax
    rep stosb
    movl %esi, boot_mb_magic
    movl %ebp, boot_mb_info
    /* 2048 PD entries of 2 MiB: P | RW | PS. */
    movl $boot_pd, %edi
    movl $0x83, %eax
    movl $2048, %ecx
1:  movl %eax, (%edi)
    movl $0, 4(%edi)
    addl $0x200000, %eax
    addl $8, %edi
    loop 1b
    /* PDPT[0..4] -> the four page directories. */
    movl $boot_pdpt, %edi
    movl $boot_pd + 3, %eax
    movl $4, %ecx
2:  movl %eax, (%edi)
    movl $0, 4(%edi)
    addl $0x1000, %eax
    addl $8, %edi
    loop 2b
    /* PML4[0] -> PDPT. */
    movl $boot_pdpt + 3, %eax
    movl %eax, boot_pml4
    movl $boot_pml4, %eax
    movl %eax, %cr3
    /* CR4: PAE | OSFXSR | OSXMMEXCPT. */
    movl $0x620, %eax
    movl %eax, %cr4
    /* EFER.LME. */
    movl $0xC0000080, %ecx
    rdmsr
    orl $0x100, %eax
    wrmsr
    /* CR0: PG | WP | NE | ET | MP | PE. */
    movl $0x80010033, %eax
    movl %eax, %cr0
    lgdt boot_gdt_ptr
    ljmp $0x08, $boot_long_mode

    .code64
boot_long_mode:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movw %ax, %fs
    movw %ax, %gs
    leaq boot_stack_top(%rip), %rsp
    xorl %ebp, %ebp
    movl boot_mb_magic(%rip), %edi
    movl boot_mb_info(%rip), %esi
    call kernel_main
3:  cli
    hlt
    jmp 3b

    .section .data.boot, "aw"
    .balign 16
    .globl boot_gdt
boot_gdt:
    .quad 0
    .quad 0x00af9a000000ffff
    .quad 0x00cf92000000ffff
    .quad 0
    .quad 0
boot_gdt_end:
    .balign 16
    .globl boot_gdt_ptr
boot_gdt_ptr:
    .word boot_gdt_end - boot_gdt - 1
    .quad boot_gdt
boot_mb_magic:
    .long 0
boot_mb_info:
    .long 0

    .section .bss.boot, "aw", @nobits
    .balign 4096
    .globl boot_pml4
boot_pml4:
    .skip 4096
boot_pdpt:
    .skip 4096
boot_pd:
    .skip 4096 * 4
    .balign 16
boot_stack:
    .skip 65536
    .globl boot_stack_top
boot_stack_top:
    .code64
    .text
"#,
    options(att_syntax)
);
