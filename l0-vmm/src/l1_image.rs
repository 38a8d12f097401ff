//! The built-in L1 hypervisor kernel (`l1-guest-hv`, built by `build.rs`)
//! and the constants L0 shares with it.
//!
//! The kernel is a Multiboot v1 image (a.out-kludge header, loaded flat at
//! 1 MiB, entered in 32-bit protected mode); `docs/l1-guest.md` describes
//! what it does and prints. [`abi`] is the very source file the kernel
//! compiles (`l1-guest-hv/src/abi.rs`), so both sides agree on ports, exit
//! statuses and the #UD trap-frame layout.

/// The L1 kernel ELF (64-bit, one PT_LOAD at 1 MiB, Multiboot header).
pub const L1_GUEST_ELF: &[u8] = include_bytes!(env!("L1_GUEST_ELF"));

/// Default command line for `l0-vmm demo`.
pub const DEMO_CMDLINE: &str = "test=demo";

#[path = "../../l1-guest-hv/src/abi.rs"]
pub mod abi;

#[cfg(test)]
mod tests {
    use super::*;

    fn le32(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }

    /// The Multiboot header is in the first 8 KiB, 4-byte aligned, with a
    /// valid checksum and the a.out-kludge fields describing the file.
    #[test]
    fn test_l1_image_has_multiboot_header() {
        let elf = L1_GUEST_ELF;
        assert_eq!(&elf[..4], b"\x7fELF");
        let off = (0..8192.min(elf.len() - 32))
            .step_by(4)
            .find(|&o| le32(elf, o) == 0x1bad_b002)
            .expect("Multiboot magic in the first 8 KiB");
        let flags = le32(elf, off + 4);
        assert_eq!(
            le32(elf, off)
                .wrapping_add(flags)
                .wrapping_add(le32(elf, off + 8)),
            0
        );
        assert_ne!(flags & (1 << 16), 0, "a.out kludge flag");
        let (header_addr, load_addr, load_end, bss_end, entry) = (
            le32(elf, off + 12),
            le32(elf, off + 16),
            le32(elf, off + 20),
            le32(elf, off + 24),
            le32(elf, off + 28),
        );
        assert_eq!(u64::from(load_addr), abi::L1_LOAD_ADDR);
        // File offset of load_addr, as a Multiboot loader computes it.
        let load_off = off - (header_addr - load_addr) as usize;
        assert!(load_off + (load_end - load_addr) as usize <= elf.len());
        assert!(load_end <= bss_end);
        assert!((load_addr..load_end).contains(&entry));
    }

    /// The `.text` section of an ELF64 file: (address, bytes).
    fn text_section(elf: &[u8]) -> (u64, &[u8]) {
        let le16 = |o: usize| u16::from_le_bytes(elf[o..o + 2].try_into().unwrap()) as usize;
        let le64 = |o: usize| u64::from_le_bytes(elf[o..o + 8].try_into().unwrap());
        let (shoff, shentsize, shnum, shstrndx) =
            (le64(0x28) as usize, le16(0x3a), le16(0x3c), le16(0x3e));
        let sh = |i: usize| shoff + i * shentsize;
        let strtab = le64(sh(shstrndx) + 0x18) as usize;
        for i in 0..shnum {
            let name_off = strtab + le32(elf, sh(i)) as usize;
            if elf[name_off..].starts_with(b".text\0") {
                let (addr, off, size) = (
                    le64(sh(i) + 0x10),
                    le64(sh(i) + 0x18) as usize,
                    le64(sh(i) + 0x20) as usize,
                );
                return (addr, &elf[off..off + size]);
            }
        }
        panic!("no .text section in the L1 kernel");
    }

    /// Instructions in `code` that touch SSE state: an XMM/YMM/ZMM register
    /// operand, FXSAVE/FXRSTOR or an MXCSR access.
    fn sse_offenders(addr: u64, code: &[u8]) -> Vec<String> {
        use iced_x86::{Decoder, DecoderOptions, Mnemonic};
        let mut decoder = Decoder::with_ip(64, code, addr, DecoderOptions::NONE);
        let mut offenders = Vec::new();
        for insn in &mut decoder {
            let sse_reg = (0..insn.op_count()).any(|i| {
                let r = insn.op_register(i);
                r.is_xmm() || r.is_ymm() || r.is_zmm()
            });
            let sse_state = matches!(
                insn.mnemonic(),
                Mnemonic::Fxsave
                    | Mnemonic::Fxsave64
                    | Mnemonic::Fxrstor
                    | Mnemonic::Fxrstor64
                    | Mnemonic::Ldmxcsr
                    | Mnemonic::Stmxcsr
            );
            if sse_reg || sse_state {
                offenders.push(format!("{:#x}: {insn}", insn.ip()));
            }
        }
        offenders
    }

    #[test]
    fn test_sse_detector() {
        // xorps xmm0, xmm0; nop; fxsave64 [rax]
        assert_eq!(sse_offenders(0x1000, &[0x0f, 0x57, 0xc0]).len(), 1);
        assert_eq!(sse_offenders(0x1000, &[0x48, 0x0f, 0xae, 0x00]).len(), 1);
        assert!(sse_offenders(0x1000, &[0x90, 0x48, 0x31, 0xc0]).is_empty());
    }

    /// KVM on this host cannot run SSE ALU instructions in a guest, so the
    /// kernel is built without SSE and without `core::fmt` (see
    /// docs/l1-guest.md): any SSE instruction in its code is a regression.
    #[test]
    fn test_l1_image_has_no_sse_instructions() {
        let (addr, text) = text_section(L1_GUEST_ELF);
        assert!(text.len() > 1024, "suspiciously small .text");
        let offenders = sse_offenders(addr, text);
        assert!(offenders.is_empty(), "SSE in the L1 kernel: {offenders:?}");
    }

    #[test]
    fn test_abi_ports_are_distinct() {
        let ports = [
            abi::SERIAL_PORT,
            abi::DEBUG_EXIT_PORT,
            abi::DEBUG_CONSOLE_PORT,
            abi::VMX_TRAP_PORT,
        ];
        for (i, a) in ports.iter().enumerate() {
            for b in &ports[i + 1..] {
                assert_ne!(a, b);
            }
        }
        assert_eq!(abi::trap_frame::SIZE, 23 * 8);
    }
}
