//! ELF64 test kernel, entered in 64-bit mode by `l0-vmm run` (entry state
//! in `docs/platform.md`: identity paging, flat GDT, RDI = command line,
//! RSI = RAM size, RSP = a stack). Prints one line and exits through the
//! debug-exit port with the status given as `exit=N` on the command line
//! (default 0).
//!
//! Built by `tests/build.rs` with plain `rustc`; reuses the L1 kernel's
//! console and C runtime through `#[path]`.
#![no_std]
#![no_main]
#![no_builtins]

#[path = "../../l1-guest-hv/src/text.rs"]
#[allow(dead_code)]
mod text;
#[macro_use]
#[path = "../../l1-guest-hv/src/kernel/io.rs"]
mod io;
#[path = "../../l1-guest-hv/src/cmdline.rs"]
#[allow(dead_code)]
mod cmdline;
#[path = "../../l1-guest-hv/src/multiboot.rs"]
#[allow(dead_code)]
mod multiboot;
#[path = "../../l1-guest-hv/src/kernel/rt.rs"]
mod rt;

core::arch::global_asm!(
    r#"
    .section .text.boot, "ax"
    .globl _start
_start:
    cli
    cld
    /* SSE for compiled code: CR4.OSFXSR | OSXMMEXCPT, CR0.MP, !CR0.EM. */
    movq %cr4, %rax
    orq $0x600, %rax
    movq %rax, %cr4
    movq %cr0, %rax
    andq $~4, %rax
    orq $2, %rax
    movq %rax, %cr0
    /* Zero .bss, keeping RDI/RSI. */
    movq %rdi, %r12
    movq %rsi, %r13
    leaq __bss_start(%rip), %rdi
    leaq __bss_end(%rip), %rcx
    subq %rdi, %rcx
    xorl %eax, %eax
    rep stosb
    movq %r12, %rdi
    movq %r13, %rsi
    leaq elf64_stack_top(%rip), %rsp
    call elf64_main
1:  cli
    hlt
    jmp 1b

    .section .bss.stack, "aw", @nobits
    .balign 16
    .skip 32768
elf64_stack_top:
    .text
"#,
    options(att_syntax)
);

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    say!(
        "elf64 test kernel: panic: ",
        info.message().as_str().unwrap_or("(formatted message)")
    );
    io::exit(3)
}

/// Called by `_start` with the loader's RDI (command line) and RSI (RAM size).
#[no_mangle]
pub extern "C" fn elf64_main(cmdline_addr: u64, ram_size: u64) -> ! {
    io::serial_init();
    let bytes: &[u8] = if cmdline_addr == 0 || cmdline_addr >= ram_size {
        &[]
    } else {
        // SAFETY: the loader identity-maps guest RAM and wrote a
        // NUL-terminated command line (at most 4 KiB) at this address.
        unsafe {
            core::slice::from_raw_parts(
                cmdline_addr as *const u8,
                4096.min((ram_size - cmdline_addr) as usize),
            )
        }
    };
    let cmdline = multiboot::cmdline_str(bytes);
    let status = cmdline::value_of(cmdline, "exit")
        .and_then(|v| v.parse::<u32>().ok())
        .unwrap_or(0);
    say!(
        "elf64 test kernel: hello from 64-bit mode, cmdline=\"",
        cmdline,
        "\" ram=",
        ram_size >> 20,
        " MiB exit=",
        status
    );
    io::exit(status)
}
