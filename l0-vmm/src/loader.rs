//! Kernel loading: Multiboot v1 kernels and plain ELF64 kernels.
//!
//! A file with a Multiboot header in its first 8 KiB is loaded as
//! Multiboot (a.out-kludge address fields when flag 16 is set, otherwise
//! its ELF32/ELF64 program headers) and entered in 32-bit protected mode
//! as the Multiboot 0.6.96 specification says (section 3.2). Any other
//! ELF64 x86-64 file is entered in 64-bit mode with identity paging. The
//! exact entry states and the memory map are in `docs/platform.md`.
//!
//! Everything in the file is guest-controlled: every offset and size is
//! checked, and a malformed file is a [`LoadError`], never a panic.

use nested_exit::{DescriptorTable, Segment, VcpuState};

use crate::memory::GuestRam;

/// GDT: null, 64-bit code (0x08), data (0x10), 32-bit code (0x18), TSS (0x20).
pub const GDT_ADDR: u64 = 0x500;
/// A zeroed 104-byte TSS for TR.
pub const TSS_ADDR: u64 = 0x580;
/// Multiboot information structure.
pub const MB_INFO_ADDR: u64 = 0x6000;
/// Multiboot memory map (at most [`MB_MMAP_MAX`] entries).
pub const MB_MMAP_ADDR: u64 = 0x6100;
/// Room for memory-map entries (24 bytes each) before the module list.
pub const MB_MMAP_MAX: usize = 32;
/// Multiboot module list (16 bytes per module).
pub const MB_MODS_ADDR: u64 = 0x6400;
/// Most modules the boot area has room for.
pub const MB_MODS_MAX: usize = 16;
/// Module strings, NUL-terminated, one after the other, up to the boot
/// loader name.
pub const MB_MOD_STRINGS_ADDR: u64 = 0x6500;
/// Boot loader name string.
pub const BOOT_LOADER_NAME_ADDR: u64 = 0x6f00;
/// NUL-terminated command line (both formats).
pub const CMDLINE_ADDR: u64 = 0x7000;
/// Longest command line (without the NUL).
pub const CMDLINE_MAX: usize = 0xfff;
/// PML4 of the ELF64 identity map; PDPT at +0x1000, PDs at +0x2000.
pub const PML4_ADDR: u64 = 0x9000;
/// Initial stack top (RSP/ESP).
pub const STACK_TOP: u64 = 0x8_0000;
/// Boot structures and stack live in [BOOT_AREA_START, BOOT_AREA_END):
/// kernels must not load there.
pub const BOOT_AREA_START: u64 = 0x500;
/// End of the boot area.
pub const BOOT_AREA_END: u64 = STACK_TOP;

/// Selectors of the boot GDT.
pub const SEL_CODE64: u16 = 0x08;
/// Flat data selector.
pub const SEL_DATA: u16 = 0x10;
/// Flat 32-bit code selector.
pub const SEL_CODE32: u16 = 0x18;
/// TSS selector.
pub const SEL_TSS: u16 = 0x20;

/// Multiboot v1 header magic (spec 3.1.2).
pub const MULTIBOOT_HEADER_MAGIC: u32 = 0x1bad_b002;
/// Value of EAX at a Multiboot entry (spec 3.2).
pub const MULTIBOOT_BOOTLOADER_MAGIC: u32 = 0x2bad_b002;
/// The header must lie in the first 8 KiB, 4-byte aligned.
const MULTIBOOT_SEARCH: usize = 8192;
/// Flag 16: the address fields are valid (a.out kludge).
const MB_FLAG_AOUT_KLUDGE: u32 = 1 << 16;
/// Flags 0 (page-align modules) and 1 (memory info) are honoured; other
/// bits in 0-15 are requirements this loader cannot meet.
const MB_FLAGS_SUPPORTED_LOW: u32 = 0b11;

/// Multiboot info flags (spec 3.3).
const MBI_MEM: u32 = 1 << 0;
const MBI_CMDLINE: u32 = 1 << 2;
const MBI_MODS: u32 = 1 << 3;
const MBI_MMAP: u32 = 1 << 6;
const MBI_LOADER_NAME: u32 = 1 << 9;

const CR0_PE: u64 = 1 << 0;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Page-table entry bits.
const PTE_P: u64 = 1 << 0;
const PTE_RW: u64 = 1 << 1;
const PTE_PS: u64 = 1 << 7;

/// VMCS-format access rights (SDM 24.4.1) of the boot segments.
const AR_CODE64: u32 = 0xa09b;
const AR_CODE32: u32 = 0xc09b;
const AR_DATA: u32 = 0xc093;
const AR_TSS_BUSY: u32 = 0x008b;

const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
const EM_386: u16 = 3;
const EM_X86_64: u16 = 62;
const PT_LOAD: u32 = 1;

/// Why a kernel could not be loaded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoadError {
    /// Neither a Multiboot header nor an ELF64 x86-64 header.
    #[error("not a Multiboot v1 kernel (no header in the first 8 KiB) and not an ELF64 x86-64 file; build the kernel as one of those")]
    UnknownFormat,
    /// The ELF header or a program header lies outside the file or is inconsistent.
    #[error("malformed ELF file: {0}")]
    BadElf(String),
    /// ELF class/machine this loader does not take.
    #[error("unsupported ELF file: {0}")]
    UnsupportedElf(String),
    /// Multiboot header checksum wrong.
    #[error("Multiboot header at file offset {offset:#x} has a bad checksum (magic + flags + checksum must be 0)")]
    BadChecksum {
        /// File offset of the header.
        offset: usize,
    },
    /// Multiboot requirement flags this loader does not implement.
    #[error("Multiboot header requires features {0:#x} this loader does not provide (only page alignment and memory info are supported)")]
    UnsupportedMultibootFlags(u32),
    /// Inconsistent a.out-kludge address fields.
    #[error("Multiboot address fields are inconsistent: {0}")]
    BadAddresses(String),
    /// A segment ends outside guest RAM.
    #[error("kernel segment [{start:#x}, {end:#x}) does not fit in guest RAM ({ram:#x} bytes); increase --mem")]
    OutsideRam {
        /// Start of the segment.
        start: u64,
        /// End of the segment.
        end: u64,
        /// RAM size.
        ram: u64,
    },
    /// A segment overlaps the boot area.
    #[error("kernel segment [{start:#x}, {end:#x}) overlaps the boot area [{BOOT_AREA_START:#x}, {BOOT_AREA_END:#x}) (GDT, boot info, page tables, stack); link the kernel at 1 MiB or above")]
    OverlapsBootArea {
        /// Start of the segment.
        start: u64,
        /// End of the segment.
        end: u64,
    },
    /// The entry point is outside guest RAM (or above 4 GiB for a 32-bit entry).
    #[error("kernel entry point {0:#x} is outside guest RAM or not reachable in the entry mode")]
    BadEntry(u64),
    /// Nothing to load.
    #[error("the kernel has no loadable segments")]
    NoSegments,
    /// Command line too long.
    #[error("command line is {0} bytes; at most 4095 are supported")]
    CmdlineTooLong(usize),
    /// RAM size unusable for the boot layout.
    #[error("guest RAM of {0:#x} bytes is not supported: use 2 MiB to 4 GiB")]
    BadRamSize(u64),
    /// A module (initrd) does not fit in RAM after the kernel.
    #[error("module {index} ({len:#x} bytes at {start:#x}) does not fit in guest RAM ({ram:#x} bytes); increase --mem")]
    ModuleOutsideRam {
        /// Module number (0 = --initrd).
        index: usize,
        /// Where it would start.
        start: u64,
        /// Its size.
        len: u64,
        /// RAM size.
        ram: u64,
    },
    /// Modules only exist in the Multiboot protocol.
    #[error("modules (--initrd) need a Multiboot kernel; this is an ELF64 kernel entered in 64-bit mode")]
    ModulesNeedMultiboot,
    /// A module file (`--initrd`) could not be read.
    #[error("cannot read module file {path}: {reason}")]
    ReadModule {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// Too many modules or module strings too long for the boot area.
    #[error("{0} modules / module strings do not fit in the boot area (at most 16 modules, 2.5 KiB of strings)")]
    TooManyModules(usize),
}

/// A Multiboot module: QEMU's `-initrd FILE` is the first one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BootModule {
    /// The module's contents.
    pub bytes: Vec<u8>,
    /// Its string (QEMU: the file name and arguments as given).
    pub string: String,
}

impl BootModule {
    /// The module `--initrd "FILE [ARGS]"` names, as QEMU reads it: the
    /// file is the first word, the module string is all of `spec`.
    pub fn from_spec(spec: &str) -> Result<Self, LoadError> {
        let path = spec.split_ascii_whitespace().next().unwrap_or("");
        let bytes = std::fs::read(path).map_err(|e| LoadError::ReadModule {
            path: path.to_string(),
            reason: e.to_string(),
        })?;
        Ok(Self {
            bytes,
            string: spec.to_string(),
        })
    }
}

/// The two boot protocols.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    /// Multiboot v1, 32-bit protected-mode entry.
    Multiboot,
    /// ELF64, 64-bit mode entry.
    Elf64,
}

/// A loaded kernel and the register state to enter it with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadedKernel {
    /// Which protocol it was loaded with.
    pub format: KernelFormat,
    /// Entry point (guest-physical = virtual).
    pub entry: u64,
    /// Lowest and one-past-highest loaded address (bss included).
    pub image: (u64, u64),
    /// Where each module was placed: [start, end).
    pub modules: Vec<(u64, u64)>,
    /// Template of the entry state: apply with [`LoadedKernel::entry_state`].
    boot: BootRegs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct BootRegs {
    rip: u64,
    rsp: u64,
    rax: u64,
    rbx: u64,
    rdi: u64,
    rsi: u64,
    cr0: u64,
    cr3: u64,
    cr4: u64,
    efer: u64,
    code: Segment,
}

impl LoadedKernel {
    /// The vCPU state at the kernel entry, built on `base` (a state read
    /// from the fresh vCPU; MSRs and fields the boot protocol leaves
    /// undefined are kept from it).
    pub fn entry_state(&self, base: &VcpuState) -> VcpuState {
        let b = &self.boot;
        let data = Segment {
            selector: SEL_DATA,
            base: 0,
            limit: 0xffff_ffff,
            ar: AR_DATA,
        };
        let mut s = *base;
        s.gprs.regs = [0; 16];
        s.gprs.regs[0] = b.rax;
        s.gprs.regs[3] = b.rbx;
        s.gprs.regs[4] = b.rsp;
        s.gprs.regs[6] = b.rsi;
        s.gprs.regs[7] = b.rdi;
        s.rip = b.rip;
        s.rflags = 0x2;
        s.cr0 = b.cr0;
        s.cr2 = 0;
        s.cr3 = b.cr3;
        s.cr4 = b.cr4;
        s.cr8 = 0;
        s.msrs.efer = b.efer;
        s.cs = b.code;
        s.ds = data;
        s.es = data;
        s.fs = data;
        s.gs = data;
        s.ss = data;
        s.ldtr = Segment {
            selector: 0,
            base: 0,
            limit: 0xffff,
            ar: Segment::AR_UNUSABLE | 0x82,
        };
        s.tr = Segment {
            selector: SEL_TSS,
            base: TSS_ADDR,
            limit: 0x67,
            ar: AR_TSS_BUSY,
        };
        s.gdtr = DescriptorTable {
            base: GDT_ADDR,
            limit: 0x2f,
        };
        s.idtr = DescriptorTable { base: 0, limit: 0 };
        s.interruptibility = 0;
        s.pending_event = None;
        s
    }
}

/// Little-endian readers that fail instead of panicking.
fn bytes_at(b: &[u8], off: usize, len: usize) -> Result<&[u8], LoadError> {
    off.checked_add(len)
        .and_then(|end| b.get(off..end))
        .ok_or_else(|| {
            LoadError::BadElf(format!(
                "{len} bytes at offset {off:#x} lie outside the file"
            ))
        })
}

fn u16_at(b: &[u8], off: usize) -> Result<u16, LoadError> {
    let s = bytes_at(b, off, 2)?;
    Ok(u16::from_le_bytes([s[0], s[1]]))
}

fn u32_at(b: &[u8], off: usize) -> Result<u32, LoadError> {
    let s = bytes_at(b, off, 4)?;
    Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

fn u64_at(b: &[u8], off: usize) -> Result<u64, LoadError> {
    let s = bytes_at(b, off, 8)?;
    let mut a = [0u8; 8];
    a.copy_from_slice(s);
    Ok(u64::from_le_bytes(a))
}

/// A PT_LOAD program header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct LoadSegment {
    offset: u64,
    paddr: u64,
    filesz: u64,
    memsz: u64,
}

/// The parts of an ELF file the loader uses.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ElfInfo {
    is64: bool,
    machine: u16,
    entry: u64,
    segments: Vec<LoadSegment>,
}

fn parse_elf(b: &[u8]) -> Result<ElfInfo, LoadError> {
    if b.get(0..4) != Some(ELF_MAGIC) {
        return Err(LoadError::BadElf("no ELF magic".into()));
    }
    let class = *b
        .get(4)
        .ok_or_else(|| LoadError::BadElf("truncated".into()))?;
    let data = *b
        .get(5)
        .ok_or_else(|| LoadError::BadElf("truncated".into()))?;
    if data != 1 {
        return Err(LoadError::UnsupportedElf("big-endian".into()));
    }
    let is64 = match class {
        1 => false,
        2 => true,
        c => return Err(LoadError::UnsupportedElf(format!("ELF class {c}"))),
    };
    let machine = u16_at(b, 18)?;
    let (entry, phoff, phentsize, phnum) = if is64 {
        (
            u64_at(b, 24)?,
            u64_at(b, 32)?,
            u16_at(b, 54)?,
            u16_at(b, 56)?,
        )
    } else {
        (
            u64::from(u32_at(b, 24)?),
            u64::from(u32_at(b, 28)?),
            u16_at(b, 42)?,
            u16_at(b, 44)?,
        )
    };
    let min_ph = if is64 { 56 } else { 32 };
    if phnum > 0 && usize::from(phentsize) < min_ph {
        return Err(LoadError::BadElf(format!(
            "program header size {phentsize} is smaller than {min_ph}"
        )));
    }
    let phoff = usize::try_from(phoff).map_err(|_| LoadError::BadElf("phoff too large".into()))?;
    let mut segments = Vec::new();
    for i in 0..usize::from(phnum) {
        let off = phoff
            .checked_add(i * usize::from(phentsize))
            .ok_or_else(|| LoadError::BadElf("program header offset overflows".into()))?;
        let ty = u32_at(b, off)?;
        if ty != PT_LOAD {
            continue;
        }
        let seg = if is64 {
            LoadSegment {
                offset: u64_at(b, off + 8)?,
                paddr: u64_at(b, off + 24)?,
                filesz: u64_at(b, off + 32)?,
                memsz: u64_at(b, off + 40)?,
            }
        } else {
            LoadSegment {
                offset: u64::from(u32_at(b, off + 4)?),
                paddr: u64::from(u32_at(b, off + 12)?),
                filesz: u64::from(u32_at(b, off + 16)?),
                memsz: u64::from(u32_at(b, off + 20)?),
            }
        };
        if seg.filesz > seg.memsz {
            return Err(LoadError::BadElf(format!(
                "segment {i}: file size {:#x} exceeds memory size {:#x}",
                seg.filesz, seg.memsz
            )));
        }
        if seg
            .offset
            .checked_add(seg.filesz)
            .is_none_or(|e| e > b.len() as u64)
        {
            return Err(LoadError::BadElf(format!(
                "segment {i}: file bytes [{:#x}, +{:#x}) lie outside the file",
                seg.offset, seg.filesz
            )));
        }
        if seg.memsz > 0 {
            segments.push(seg);
        }
    }
    Ok(ElfInfo {
        is64,
        machine,
        entry,
        segments,
    })
}

/// Where a Multiboot header was found, and its fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct MultibootHeader {
    offset: usize,
    flags: u32,
    header_addr: u32,
    load_addr: u32,
    load_end_addr: u32,
    bss_end_addr: u32,
    entry_addr: u32,
}

fn find_multiboot(b: &[u8]) -> Result<Option<MultibootHeader>, LoadError> {
    let limit = b.len().min(MULTIBOOT_SEARCH);
    let mut off = 0;
    while off + 12 <= limit {
        if u32_at(b, off)? == MULTIBOOT_HEADER_MAGIC {
            let flags = u32_at(b, off + 4)?;
            let sum = u32_at(b, off + 8)?;
            if MULTIBOOT_HEADER_MAGIC.wrapping_add(flags).wrapping_add(sum) != 0 {
                return Err(LoadError::BadChecksum { offset: off });
            }
            let mut h = MultibootHeader {
                offset: off,
                flags,
                header_addr: 0,
                load_addr: 0,
                load_end_addr: 0,
                bss_end_addr: 0,
                entry_addr: 0,
            };
            if flags & MB_FLAG_AOUT_KLUDGE != 0 {
                let f = |i: usize| {
                    u32_at(b, off + 12 + 4 * i).map_err(|_| {
                        LoadError::BadAddresses(
                            "address fields run past the end of the file".into(),
                        )
                    })
                };
                h.header_addr = f(0)?;
                h.load_addr = f(1)?;
                h.load_end_addr = f(2)?;
                h.bss_end_addr = f(3)?;
                h.entry_addr = f(4)?;
            }
            return Ok(Some(h));
        }
        off += 4;
    }
    Ok(None)
}

fn check_target(ram: &GuestRam, start: u64, len: u64) -> Result<(), LoadError> {
    let end = start.checked_add(len).ok_or(LoadError::OutsideRam {
        start,
        end: u64::MAX,
        ram: ram.size(),
    })?;
    if end > ram.size() {
        return Err(LoadError::OutsideRam {
            start,
            end,
            ram: ram.size(),
        });
    }
    if start < BOOT_AREA_END && end > BOOT_AREA_START {
        return Err(LoadError::OverlapsBootArea { start, end });
    }
    Ok(())
}

fn copy_in(ram: &GuestRam, gpa: u64, bytes: &[u8]) -> Result<(), LoadError> {
    ram.write_bytes(gpa, bytes)
        .map_err(|_| LoadError::OutsideRam {
            start: gpa,
            end: gpa.saturating_add(bytes.len() as u64),
            ram: ram.size(),
        })
}

fn load_segments(
    ram: &GuestRam,
    file: &[u8],
    segs: &[LoadSegment],
) -> Result<(u64, u64), LoadError> {
    if segs.is_empty() {
        return Err(LoadError::NoSegments);
    }
    let mut lo = u64::MAX;
    let mut hi = 0;
    for s in segs {
        check_target(ram, s.paddr, s.memsz)?;
        lo = lo.min(s.paddr);
        hi = hi.max(s.paddr + s.memsz);
    }
    for s in segs {
        // Offsets were checked against the file in parse_elf.
        let start = s.offset as usize;
        let bytes = bytes_at(file, start, s.filesz as usize)?;
        copy_in(ram, s.paddr, bytes)?;
        let bss = s.memsz - s.filesz;
        ram.fill(s.paddr + s.filesz, bss, 0)
            .map_err(|_| LoadError::OutsideRam {
                start: s.paddr,
                end: s.paddr + s.memsz,
                ram: ram.size(),
            })?;
    }
    Ok((lo, hi))
}

fn check_entry(ram: &GuestRam, entry: u64, limit_4g: bool) -> Result<(), LoadError> {
    if entry >= ram.size() || (limit_4g && entry > u64::from(u32::MAX)) {
        return Err(LoadError::BadEntry(entry));
    }
    Ok(())
}

/// Writes the GDT and TSS shared by both entry modes.
fn write_gdt(ram: &GuestRam) -> Result<(), LoadError> {
    let tss_lo: u64 = 0x67
        | (TSS_ADDR & 0xff_ffff) << 16
        | 0x89 << 40 // present, type 9 (available 64/32-bit TSS)
        | (TSS_ADDR >> 24 & 0xff) << 56;
    let gdt: [u64; 6] = [
        0,
        0x00af_9b00_0000_ffff, // 0x08: 64-bit code, DPL 0
        0x00cf_9300_0000_ffff, // 0x10: flat data
        0x00cf_9b00_0000_ffff, // 0x18: flat 32-bit code
        tss_lo,                // 0x20: TSS (low half)
        TSS_ADDR >> 32,        // 0x28: TSS (high half)
    ];
    let mut bytes = Vec::with_capacity(gdt.len() * 8);
    for d in gdt {
        bytes.extend_from_slice(&d.to_le_bytes());
    }
    copy_in(ram, GDT_ADDR, &bytes)?;
    ram.fill(TSS_ADDR, 0x68, 0)
        .map_err(|_| LoadError::BadRamSize(ram.size()))
}

fn write_cmdline(ram: &GuestRam, cmdline: &str) -> Result<(), LoadError> {
    if cmdline.len() > CMDLINE_MAX {
        return Err(LoadError::CmdlineTooLong(cmdline.len()));
    }
    let mut b = cmdline.as_bytes().to_vec();
    b.push(0);
    copy_in(ram, CMDLINE_ADDR, &b)
}

/// Identity map of all RAM with 2 MiB pages (PML4 -> PDPT -> PDs).
fn write_identity_map(ram: &GuestRam) -> Result<(), LoadError> {
    let size = ram.size();
    let gib = 1u64 << 30;
    let n_pd = size.div_ceil(gib);
    if n_pd == 0 || n_pd > 4 {
        return Err(LoadError::BadRamSize(size));
    }
    let pdpt = PML4_ADDR + 0x1000;
    let pd0 = PML4_ADDR + 0x2000;
    let w = |gpa: u64, v: u64| copy_in(ram, gpa, &v.to_le_bytes());
    ram.fill(PML4_ADDR, 0x2000 + n_pd * 0x1000, 0)
        .map_err(|_| LoadError::BadRamSize(size))?;
    w(PML4_ADDR, pdpt | PTE_P | PTE_RW)?;
    for i in 0..n_pd {
        w(pdpt + 8 * i, (pd0 + 0x1000 * i) | PTE_P | PTE_RW)?;
    }
    let mut addr = 0;
    while addr < size {
        let pd = pd0 + 0x1000 * (addr / gib);
        let idx = (addr % gib) >> 21;
        w(pd + 8 * idx, addr | PTE_P | PTE_RW | PTE_PS)?;
        addr += 2 << 20;
    }
    Ok(())
}

/// The Multiboot memory map (spec 3.3) as (base, length, type) entries:
/// RAM below 640 KiB and above 1 MiB is available (type 1) except what
/// is in use at entry: page 0 and the boot area ([0, 0x80000): GDT, TSS,
/// boot information, command line, stack), the kernel image with its bss,
/// and the modules; those are left out (holes), so an allocator that
/// takes what the map offers never overwrites them. [0x9fc00, 0xa0000)
/// (EBDA) and [0xf0000, 0x100000) (BIOS) are reserved (type 2).
pub fn memory_map(ram_size: u64, in_use: &[(u64, u64)]) -> Vec<(u64, u64, u32)> {
    let page = crate::memory::PAGE_SIZE;
    let mut holes: Vec<(u64, u64)> = in_use
        .iter()
        .filter(|(s, e)| e > s)
        .map(|&(s, e)| (s & !(page - 1), e.div_ceil(page) * page))
        .collect();
    holes.push((0, BOOT_AREA_END));
    holes.sort_unstable();
    let mut out = Vec::new();
    for (lo, hi) in [(0, 0x9_fc00u64), (0x10_0000, ram_size)] {
        let mut cur = lo;
        for &(s, e) in &holes {
            if e <= cur || s >= hi {
                continue;
            }
            if s > cur {
                out.push((cur, s.min(hi) - cur, 1));
            }
            cur = cur.max(e);
        }
        if cur < hi {
            out.push((cur, hi - cur, 1));
        }
        if lo == 0 {
            out.push((0x9_fc00, 0x400, 2));
            out.push((0xf_0000, 0x1_0000, 2));
        }
    }
    out
}

/// Multiboot information: memory sizes, memory map, command line,
/// modules, boot loader name (spec 3.3).
fn write_multiboot_info(
    ram: &GuestRam,
    image: (u64, u64),
    modules: &[(u64, u64, &str)],
) -> Result<(), LoadError> {
    let size = ram.size();
    let mut in_use = vec![image];
    in_use.extend(modules.iter().map(|&(s, e, _)| (s, e)));
    let entries = memory_map(size, &in_use);
    if entries.len() > MB_MMAP_MAX {
        return Err(LoadError::TooManyModules(modules.len()));
    }
    let mut mmap = Vec::new();
    for (base, len, ty) in entries {
        mmap.extend_from_slice(&20u32.to_le_bytes());
        mmap.extend_from_slice(&base.to_le_bytes());
        mmap.extend_from_slice(&len.to_le_bytes());
        mmap.extend_from_slice(&ty.to_le_bytes());
    }
    copy_in(ram, MB_MMAP_ADDR, &mmap)?;
    let mut list = Vec::new();
    let mut strings = Vec::new();
    for &(start, end, string) in modules {
        let str_addr = MB_MOD_STRINGS_ADDR + strings.len() as u64;
        strings.extend_from_slice(string.as_bytes());
        strings.push(0);
        for v in [start as u32, end as u32, str_addr as u32, 0] {
            list.extend_from_slice(&v.to_le_bytes());
        }
    }
    if modules.len() > MB_MODS_MAX
        || MB_MOD_STRINGS_ADDR + strings.len() as u64 > BOOT_LOADER_NAME_ADDR
    {
        return Err(LoadError::TooManyModules(modules.len()));
    }
    copy_in(ram, MB_MODS_ADDR, &list)?;
    copy_in(ram, MB_MOD_STRINGS_ADDR, &strings)?;
    copy_in(ram, BOOT_LOADER_NAME_ADDR, b"l0-vmm\0")?;
    let mut info = [0u8; 120];
    let mut put = |off: usize, v: u32| info[off..off + 4].copy_from_slice(&v.to_le_bytes());
    put(
        0,
        MBI_MEM | MBI_CMDLINE | MBI_MODS | MBI_MMAP | MBI_LOADER_NAME,
    );
    put(4, 639);
    put(8, ((size.saturating_sub(0x10_0000)) / 1024) as u32);
    put(16, CMDLINE_ADDR as u32);
    put(20, modules.len() as u32);
    put(24, MB_MODS_ADDR as u32);
    put(44, mmap.len() as u32);
    put(48, MB_MMAP_ADDR as u32);
    put(64, BOOT_LOADER_NAME_ADDR as u32);
    copy_in(ram, MB_INFO_ADDR, &info)
}

/// Places the modules one after the other, page aligned, from the first
/// page after the kernel image (bss included), as QEMU does.
fn place_modules<'m>(
    ram: &GuestRam,
    image: (u64, u64),
    modules: &'m [BootModule],
) -> Result<Vec<(u64, u64, &'m str)>, LoadError> {
    let page = crate::memory::PAGE_SIZE;
    let mut next = image.1.max(0x10_0000).div_ceil(page) * page;
    let mut out = Vec::new();
    for (index, m) in modules.iter().enumerate() {
        let len = m.bytes.len() as u64;
        let end = next
            .checked_add(len)
            .filter(|&e| e <= ram.size() && e <= 1 << 32);
        let Some(end) = end else {
            return Err(LoadError::ModuleOutsideRam {
                index,
                start: next,
                len,
                ram: ram.size(),
            });
        };
        copy_in(ram, next, &m.bytes)?;
        out.push((next, end, m.string.as_str()));
        next = end.div_ceil(page) * page;
    }
    Ok(out)
}

fn load_multiboot(
    ram: &GuestRam,
    file: &[u8],
    h: &MultibootHeader,
) -> Result<(u64, (u64, u64)), LoadError> {
    let required = h.flags & 0xffff & !MB_FLAGS_SUPPORTED_LOW;
    if required != 0 {
        return Err(LoadError::UnsupportedMultibootFlags(required));
    }
    if h.flags & MB_FLAG_AOUT_KLUDGE == 0 {
        let elf = parse_elf(file)?;
        if !matches!(elf.machine, EM_386 | EM_X86_64) {
            return Err(LoadError::UnsupportedElf(format!(
                "machine {}",
                elf.machine
            )));
        }
        let image = load_segments(ram, file, &elf.segments)?;
        check_entry(ram, elf.entry, true)?;
        return Ok((elf.entry, image));
    }
    let bad = |m: &str| LoadError::BadAddresses(m.to_string());
    if h.load_addr > h.header_addr {
        return Err(bad("load_addr is above header_addr"));
    }
    // The file offset that load_addr corresponds to (spec 3.1.3).
    let delta = u64::from(h.header_addr - h.load_addr);
    let file_start = (h.offset as u64)
        .checked_sub(delta)
        .ok_or_else(|| bad("header_addr - load_addr is larger than the header's file offset"))?;
    let load_len = if h.load_end_addr == 0 {
        (file.len() as u64) - file_start
    } else {
        u64::from(h.load_end_addr)
            .checked_sub(u64::from(h.load_addr))
            .ok_or_else(|| bad("load_end_addr is below load_addr"))?
    };
    let file_end = file_start
        .checked_add(load_len)
        .filter(|&e| e <= file.len() as u64)
        .ok_or_else(|| bad("load_end_addr - load_addr runs past the end of the file"))?;
    let load_addr = u64::from(h.load_addr);
    let mem_end = if h.bss_end_addr == 0 {
        load_addr + load_len
    } else {
        let e = u64::from(h.bss_end_addr);
        if e < load_addr + load_len {
            return Err(bad("bss_end_addr is below load_end_addr"));
        }
        e
    };
    check_target(ram, load_addr, mem_end - load_addr)?;
    let bytes = bytes_at(file, file_start as usize, (file_end - file_start) as usize)?;
    copy_in(ram, load_addr, bytes)?;
    ram.fill(load_addr + load_len, mem_end - load_addr - load_len, 0)
        .map_err(|_| LoadError::OutsideRam {
            start: load_addr,
            end: mem_end,
            ram: ram.size(),
        })?;
    let entry = u64::from(h.entry_addr);
    if entry < load_addr || entry >= mem_end {
        return Err(LoadError::BadEntry(entry));
    }
    Ok((entry, (load_addr, mem_end)))
}

/// Loads `file` into `ram` with `cmdline` and returns how to enter it.
pub fn load_kernel(ram: &GuestRam, file: &[u8], cmdline: &str) -> Result<LoadedKernel, LoadError> {
    load_kernel_with_modules(ram, file, cmdline, &[])
}

/// [`load_kernel`] with Multiboot modules (the first is QEMU's
/// `-initrd`): placed page aligned after the kernel image and listed in
/// the Multiboot information (`mods_count`, `mods_addr`).
pub fn load_kernel_with_modules(
    ram: &GuestRam,
    file: &[u8],
    cmdline: &str,
    modules: &[BootModule],
) -> Result<LoadedKernel, LoadError> {
    if ram.size() < (2 << 20) || ram.size() > (4 << 30) {
        return Err(LoadError::BadRamSize(ram.size()));
    }
    if cmdline.len() > CMDLINE_MAX {
        return Err(LoadError::CmdlineTooLong(cmdline.len()));
    }
    if let Some(h) = find_multiboot(file)? {
        let (entry, image) = load_multiboot(ram, file, &h)?;
        write_gdt(ram)?;
        write_cmdline(ram, cmdline)?;
        let placed = place_modules(ram, image, modules)?;
        write_multiboot_info(ram, image, &placed)?;
        return Ok(LoadedKernel {
            format: KernelFormat::Multiboot,
            entry,
            image,
            modules: placed.iter().map(|&(s, e, _)| (s, e)).collect(),
            boot: BootRegs {
                rip: entry,
                rsp: STACK_TOP,
                rax: u64::from(MULTIBOOT_BOOTLOADER_MAGIC),
                rbx: MB_INFO_ADDR,
                rdi: 0,
                rsi: 0,
                cr0: CR0_PE | CR0_ET,
                cr3: 0,
                cr4: 0,
                efer: 0,
                code: Segment {
                    selector: SEL_CODE32,
                    base: 0,
                    limit: 0xffff_ffff,
                    ar: AR_CODE32,
                },
            },
        });
    }
    if file.get(0..4) != Some(ELF_MAGIC) {
        return Err(LoadError::UnknownFormat);
    }
    let elf = parse_elf(file)?;
    if !elf.is64 || elf.machine != EM_X86_64 {
        return Err(LoadError::UnknownFormat);
    }
    if !modules.is_empty() {
        return Err(LoadError::ModulesNeedMultiboot);
    }
    let image = load_segments(ram, file, &elf.segments)?;
    check_entry(ram, elf.entry, false)?;
    write_gdt(ram)?;
    write_cmdline(ram, cmdline)?;
    write_identity_map(ram)?;
    Ok(LoadedKernel {
        format: KernelFormat::Elf64,
        entry: elf.entry,
        image,
        modules: Vec::new(),
        boot: BootRegs {
            rip: elf.entry,
            rsp: STACK_TOP,
            rax: 0,
            rbx: 0,
            rdi: CMDLINE_ADDR,
            rsi: ram.size(),
            cr0: CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG,
            cr3: PML4_ADDR,
            cr4: CR4_PAE,
            efer: EFER_LME | EFER_LMA,
            code: Segment {
                selector: SEL_CODE64,
                base: 0,
                limit: 0xffff_ffff,
                ar: AR_CODE64,
            },
        },
    })
}

/// Test images, built byte by byte (also used by the KVM tests).
#[cfg(test)]
pub(crate) mod images {
    use super::*;

    /// An ELF64 x86-64 executable with one PT_LOAD of `code` at `addr`.
    pub fn elf64(addr: u64, code: &[u8], bss: u64) -> Vec<u8> {
        let mut f = vec![0u8; 0x1000];
        f[0..4].copy_from_slice(ELF_MAGIC);
        f[4] = 2;
        f[5] = 1;
        f[6] = 1;
        f[16..18].copy_from_slice(&2u16.to_le_bytes());
        f[18..20].copy_from_slice(&EM_X86_64.to_le_bytes());
        f[20..24].copy_from_slice(&1u32.to_le_bytes());
        f[24..32].copy_from_slice(&addr.to_le_bytes());
        f[32..40].copy_from_slice(&64u64.to_le_bytes());
        f[52..54].copy_from_slice(&64u16.to_le_bytes());
        f[54..56].copy_from_slice(&56u16.to_le_bytes());
        f[56..58].copy_from_slice(&1u16.to_le_bytes());
        let ph = 64;
        f[ph..ph + 4].copy_from_slice(&PT_LOAD.to_le_bytes());
        f[ph + 4..ph + 8].copy_from_slice(&5u32.to_le_bytes());
        f[ph + 8..ph + 16].copy_from_slice(&0x1000u64.to_le_bytes());
        f[ph + 16..ph + 24].copy_from_slice(&addr.to_le_bytes());
        f[ph + 24..ph + 32].copy_from_slice(&addr.to_le_bytes());
        f[ph + 32..ph + 40].copy_from_slice(&(code.len() as u64).to_le_bytes());
        f[ph + 40..ph + 48].copy_from_slice(&(code.len() as u64 + bss).to_le_bytes());
        f.extend_from_slice(code);
        f
    }

    /// A flat Multiboot image with the a.out kludge: header at file
    /// offset `hdr_off`, loaded at `load_addr`, entry at `load_addr +
    /// entry_off`; `code` follows the header.
    pub fn multiboot_kludge(load_addr: u32, code: &[u8], bss: u32) -> Vec<u8> {
        let hdr_off = 0x40usize;
        let flags = MB_FLAG_AOUT_KLUDGE | 0b11;
        let mut f = vec![0u8; hdr_off];
        let header_addr = load_addr + hdr_off as u32;
        let code_off = hdr_off + 32;
        let end = load_addr + (code_off + code.len()) as u32;
        for v in [
            MULTIBOOT_HEADER_MAGIC,
            flags,
            0u32.wrapping_sub(MULTIBOOT_HEADER_MAGIC)
                .wrapping_sub(flags),
            header_addr,
            load_addr,
            end,
            end + bss,
            load_addr + code_off as u32,
        ] {
            f.extend_from_slice(&v.to_le_bytes());
        }
        f.extend_from_slice(code);
        f
    }
}

#[cfg(test)]
mod tests {
    use super::images::*;
    use super::*;
    use proptest::prelude::*;
    use vmcs12::GuestPhysMemory;

    fn ram() -> GuestRam {
        GuestRam::new(16 << 20).unwrap()
    }

    #[test]
    fn test_elf64_is_loaded_with_bss_and_long_mode_state() {
        let r = ram();
        r.fill(0x20_0000, 0x100, 0xcc).unwrap();
        let code = [0x90, 0x90, 0xf4];
        let k = load_kernel(&r, &elf64(0x20_0000, &code, 0x10), "hello").unwrap();
        assert_eq!(k.format, KernelFormat::Elf64);
        assert_eq!(k.entry, 0x20_0000);
        assert_eq!(k.image, (0x20_0000, 0x20_0013));
        let mut b = [0u8; 4];
        r.read_bytes(0x20_0000, &mut b).unwrap();
        assert_eq!(b, [0x90, 0x90, 0xf4, 0]);
        r.read_bytes(0x20_0010, &mut b).unwrap();
        assert_eq!(b, [0, 0, 0, 0xcc], "bss zeroed up to memsz only");
        let s = k.entry_state(&VcpuState::default());
        assert_eq!(s.rip, 0x20_0000);
        assert!(s.in_64bit_mode());
        assert_eq!(s.cr3, PML4_ADDR);
        assert_eq!(s.gprs.regs[7], CMDLINE_ADDR);
        assert_eq!(s.gprs.regs[6], 16 << 20);
        assert_eq!(s.gprs.regs[4], STACK_TOP);
        let mut c = [0u8; 6];
        r.read_bytes(CMDLINE_ADDR, &mut c).unwrap();
        assert_eq!(&c, b"hello\0");
    }

    #[test]
    fn test_identity_map_uses_2mib_pages_over_ram() {
        let r = ram();
        load_kernel(&r, &elf64(0x20_0000, &[0xf4], 0), "").unwrap();
        let pml4 = r.read_u64(PML4_ADDR).unwrap();
        assert_eq!(pml4 & !0xfff, PML4_ADDR + 0x1000);
        let pdpt0 = r.read_u64(PML4_ADDR + 0x1000).unwrap();
        assert_eq!(pdpt0 & !0xfff, PML4_ADDR + 0x2000);
        assert_eq!(
            r.read_u64(PML4_ADDR + 0x1008).unwrap(),
            0,
            "16 MiB needs one PD"
        );
        let pd = PML4_ADDR + 0x2000;
        for i in 0..8u64 {
            assert_eq!(r.read_u64(pd + 8 * i).unwrap(), (i << 21) | 0x83);
        }
        assert_eq!(r.read_u64(pd + 64).unwrap(), 0, "no mapping beyond RAM");
    }

    #[test]
    fn test_multiboot_kludge_is_loaded_and_info_written() {
        let r = ram();
        let code = [0xb0, 0x41, 0xe6, 0xe9, 0xf4];
        let img = multiboot_kludge(0x10_0000, &code, 0x100);
        let k = load_kernel(&r, &img, "test=demo").unwrap();
        assert_eq!(k.format, KernelFormat::Multiboot);
        assert_eq!(k.entry, 0x10_0000 + 0x60);
        let mut b = [0u8; 5];
        r.read_bytes(k.entry, &mut b).unwrap();
        assert_eq!(b, code);
        assert_eq!(
            r.read_u32(0x10_0000).unwrap(),
            0,
            "file bytes before the header load too"
        );
        assert_eq!(r.read_u32(0x10_0040).unwrap(), MULTIBOOT_HEADER_MAGIC);
        let s = k.entry_state(&VcpuState::default());
        assert_eq!(s.gprs.regs[0], 0x2bad_b002);
        assert_eq!(s.gprs.regs[3], MB_INFO_ADDR);
        assert_eq!(s.cr0 & CR0_PG, 0);
        assert_eq!(s.cr0 & CR0_PE, 1);
        assert!(!s.in_64bit_mode());
        assert_eq!(s.cs.ar, AR_CODE32);
        let flags = r.read_u32(MB_INFO_ADDR).unwrap();
        assert_eq!(
            flags & (MBI_MEM | MBI_CMDLINE | MBI_MMAP),
            MBI_MEM | MBI_CMDLINE | MBI_MMAP
        );
        assert_eq!(r.read_u32(MB_INFO_ADDR + 4).unwrap(), 639);
        assert_eq!(r.read_u32(MB_INFO_ADDR + 8).unwrap(), 15 * 1024);
        let cmd = r.read_u32(MB_INFO_ADDR + 16).unwrap();
        let mut c = [0u8; 10];
        r.read_bytes(u64::from(cmd), &mut c).unwrap();
        assert_eq!(&c, b"test=demo\0");
        let mmap_len = r.read_u32(MB_INFO_ADDR + 44).unwrap();
        assert_eq!(mmap_len, 4 * 24);
        let first = u64::from(r.read_u32(MB_INFO_ADDR + 48).unwrap());
        assert_eq!(
            r.read_u64(first + 4).unwrap(),
            BOOT_AREA_END,
            "boot area left out"
        );
        let last = first + 3 * 24;
        // The kernel [1 MiB, 1 MiB + 0x165) is in use: RAM after its page.
        assert_eq!(r.read_u64(last + 4).unwrap(), 0x10_1000);
        assert_eq!(r.read_u64(last + 12).unwrap(), (16 << 20) - 0x10_1000);
        assert_eq!(r.read_u32(last + 20).unwrap(), 1);
        assert_eq!(r.read_u32(MB_INFO_ADDR + 20).unwrap(), 0, "no modules");
        assert!(k.modules.is_empty());
    }

    /// The memory map entries the Multiboot information points at.
    fn mmap_entries(r: &GuestRam) -> Vec<(u64, u64, u32)> {
        let len = u64::from(r.read_u32(MB_INFO_ADDR + 44).unwrap());
        let base = u64::from(r.read_u32(MB_INFO_ADDR + 48).unwrap());
        let mut out = Vec::new();
        let mut off = 0;
        while off < len {
            let e = base + off;
            let size = u64::from(r.read_u32(e).unwrap());
            out.push((
                r.read_u64(e + 4).unwrap(),
                r.read_u64(e + 12).unwrap(),
                r.read_u32(e + 20).unwrap(),
            ));
            off += size + 4;
        }
        out
    }

    fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
        a.0 < b.1 && b.0 < a.1
    }

    #[test]
    fn test_initrd_is_the_first_module_after_the_kernel() {
        let r = ram();
        let img = multiboot_kludge(0x10_0000, &[0xf4; 0x20], 0x3000);
        let mods = [
            BootModule {
                bytes: b"first line\nsecond\n".to_vec(),
                string: "initrd.txt arg=1".into(),
            },
            BootModule {
                bytes: vec![7; 0x1800],
                string: "second".into(),
            },
        ];
        let k = load_kernel_with_modules(&r, &img, "console=ttyS0", &mods).unwrap();
        let kernel_end = k.image.1;
        assert!(kernel_end > 0x10_3000, "bss counted: {kernel_end:#x}");
        let flags = r.read_u32(MB_INFO_ADDR).unwrap();
        assert_ne!(flags & MBI_MODS, 0);
        assert_eq!(r.read_u32(MB_INFO_ADDR + 20).unwrap(), 2);
        let list = u64::from(r.read_u32(MB_INFO_ADDR + 24).unwrap());
        let (start, end) = (
            u64::from(r.read_u32(list).unwrap()),
            u64::from(r.read_u32(list + 4).unwrap()),
        );
        assert_eq!(start % 0x1000, 0, "page aligned");
        assert!(start >= kernel_end, "after the kernel and its bss");
        assert_eq!(end - start, 18);
        assert_eq!(k.modules[0], (start, end));
        let mut b = vec![0u8; 18];
        r.read_bytes(start, &mut b).unwrap();
        assert_eq!(&b, b"first line\nsecond\n");
        let sp = u64::from(r.read_u32(list + 8).unwrap());
        let mut st = [0u8; 17];
        r.read_bytes(sp, &mut st).unwrap();
        assert_eq!(&st, b"initrd.txt arg=1\0");
        let second = (
            u64::from(r.read_u32(list + 16).unwrap()),
            u64::from(r.read_u32(list + 20).unwrap()),
        );
        assert_eq!(second.0, start + 0x1000);
        assert_eq!(second.1 - second.0, 0x1800);
        assert!(sp < BOOT_AREA_END && list < BOOT_AREA_END);
        // Nothing available in the map overlaps page 0, the kernel, the
        // modules or the boot information.
        for (base, len, ty) in mmap_entries(&r) {
            if ty != 1 {
                continue;
            }
            let e = (base, base + len);
            for used in [
                (0, 0x1000),
                k.image,
                k.modules[0],
                second,
                (MB_INFO_ADDR, 0x8000),
            ] {
                assert!(!overlaps(e, used), "{e:x?} overlaps {used:x?}");
            }
        }
    }

    #[test]
    fn test_module_from_spec_reads_the_first_word_as_file() {
        let dir = std::env::temp_dir().join(format!("l0-vmm-initrd-{}", std::process::id()));
        std::fs::write(&dir, b"data").unwrap();
        let spec = format!("{} a=1 b", dir.display());
        let m = BootModule::from_spec(&spec).unwrap();
        assert_eq!(m.bytes, b"data");
        assert_eq!(m.string, spec);
        let _ = std::fs::remove_file(&dir);
        assert!(matches!(
            BootModule::from_spec("/nonexistent/initrd x"),
            Err(LoadError::ReadModule { path, .. }) if path == "/nonexistent/initrd"
        ));
        assert!(matches!(
            BootModule::from_spec(""),
            Err(LoadError::ReadModule { .. })
        ));
    }

    #[test]
    fn test_modules_need_multiboot_and_must_fit() {
        let r = ram();
        let m = BootModule {
            bytes: vec![1],
            string: String::new(),
        };
        assert_eq!(
            load_kernel_with_modules(
                &r,
                &elf64(0x20_0000, &[0xf4], 0),
                "",
                std::slice::from_ref(&m)
            ),
            Err(LoadError::ModulesNeedMultiboot)
        );
        let big = BootModule {
            bytes: vec![0; 16 << 20],
            string: String::new(),
        };
        let img = multiboot_kludge(0x10_0000, &[0xf4], 0);
        assert!(matches!(
            load_kernel_with_modules(&r, &img, "", &[big]),
            Err(LoadError::ModuleOutsideRam { index: 0, .. })
        ));
        assert_eq!(
            load_kernel_with_modules(&r, &img, "", &vec![m; MB_MODS_MAX + 1]),
            Err(LoadError::TooManyModules(MB_MODS_MAX + 1))
        );
    }

    #[test]
    fn test_memory_map_around_a_kernel_at_2_mib() {
        let m = memory_map(16 << 20, &[(0x20_0000, 0x20_0800)]);
        assert_eq!(
            m,
            vec![
                (0x8_0000, 0x9_fc00 - 0x8_0000, 1),
                (0x9_fc00, 0x400, 2),
                (0xf_0000, 0x1_0000, 2),
                (0x10_0000, 0x10_0000, 1),
                (0x20_1000, (16 << 20) - 0x20_1000, 1),
            ]
        );
    }

    proptest! {
        #[test]
        fn test_memory_map_never_offers_what_is_in_use(
            ram_mib in 2u64..64,
            used in proptest::collection::vec((0u64..(64 << 20), 0u64..(4 << 20)), 0..4),
        ) {
            let size = ram_mib << 20;
            let used: Vec<(u64, u64)> = used.iter().map(|&(s, l)| (s, s + l)).collect();
            let m = memory_map(size, &used);
            // Reference: a byte is offered iff it is RAM below 0x9fc00 or
            // in [1 MiB, size), not in [0, 0x80000), and not in a used
            // range widened to pages. Checked at range edges and pages.
            let offered = |a: u64| m.iter().any(|&(b, l, t)| t == 1 && a >= b && a < b + l);
            let in_use = |a: u64| a < BOOT_AREA_END
                || used.iter().any(|&(s, e)| e > s && a >= (s & !0xfff) && a < e.div_ceil(0x1000) * 0x1000);
            let ram_ok = |a: u64| a < 0x9_fc00 || (0x10_0000..size).contains(&a);
            let mut probes: Vec<u64> = (0..size.min(0x10_0000 + 8 * 0x1000)).step_by(0x1000).collect();
            for &(s, e) in &used {
                probes.extend([s.saturating_sub(1), s, e.saturating_sub(1), e, e + 0xfff]);
            }
            probes.extend([size - 1, size]);
            for a in probes {
                prop_assert_eq!(offered(a), ram_ok(a) && !in_use(a), "address {:#x}", a);
            }
            // Entries are sorted and do not overlap.
            for w in m.windows(2) {
                prop_assert!(w[0].0 + w[0].1 <= w[1].0);
            }
        }
    }

    #[test]
    fn test_multiboot_elf_without_kludge_uses_program_headers() {
        let r = ram();
        let mut img = elf64(0x30_0000, &[0xf4], 0);
        // Put a Multiboot header (flags 0x3, no kludge) in the padding.
        let flags = 0b11u32;
        let hdr = [
            MULTIBOOT_HEADER_MAGIC,
            flags,
            0u32.wrapping_sub(MULTIBOOT_HEADER_MAGIC)
                .wrapping_sub(flags),
        ];
        for (i, v) in hdr.iter().enumerate() {
            img[0x200 + 4 * i..0x204 + 4 * i].copy_from_slice(&v.to_le_bytes());
        }
        let k = load_kernel(&r, &img, "").unwrap();
        assert_eq!(k.format, KernelFormat::Multiboot);
        assert_eq!(k.entry, 0x30_0000);
        let mut b = [0u8; 1];
        r.read_bytes(0x30_0000, &mut b).unwrap();
        assert_eq!(b, [0xf4]);
    }

    #[test]
    fn test_multiboot_bad_checksum_is_an_error() {
        let r = ram();
        let mut img = multiboot_kludge(0x10_0000, &[0xf4], 0);
        img[0x48] ^= 1;
        assert_eq!(
            load_kernel(&r, &img, ""),
            Err(LoadError::BadChecksum { offset: 0x40 })
        );
    }

    #[test]
    fn test_multiboot_video_flag_is_refused() {
        let r = ram();
        let flags = 0b111u32;
        let mut img = vec![0u8; 64];
        for (i, v) in [
            MULTIBOOT_HEADER_MAGIC,
            flags,
            0u32.wrapping_sub(MULTIBOOT_HEADER_MAGIC)
                .wrapping_sub(flags),
        ]
        .iter()
        .enumerate()
        {
            img[4 * i..4 * i + 4].copy_from_slice(&v.to_le_bytes());
        }
        assert_eq!(
            load_kernel(&r, &img, ""),
            Err(LoadError::UnsupportedMultibootFlags(0b100))
        );
    }

    #[test]
    fn test_multiboot_kludge_past_end_of_file_is_an_error() {
        let r = ram();
        let mut img = multiboot_kludge(0x10_0000, &[0xf4], 0);
        // load_end_addr far beyond the file.
        img[0x40 + 20..0x40 + 24].copy_from_slice(&0x20_0000u32.to_le_bytes());
        assert!(matches!(
            load_kernel(&r, &img, ""),
            Err(LoadError::BadAddresses(_))
        ));
    }

    #[test]
    fn test_multiboot_entry_outside_image_is_an_error() {
        let r = ram();
        let mut img = multiboot_kludge(0x10_0000, &[0xf4], 0);
        img[0x40 + 28..0x40 + 32].copy_from_slice(&0x90_0000u32.to_le_bytes());
        assert_eq!(
            load_kernel(&r, &img, ""),
            Err(LoadError::BadEntry(0x90_0000))
        );
    }

    #[test]
    fn test_kernel_in_boot_area_is_refused() {
        let r = ram();
        assert!(matches!(
            load_kernel(&r, &elf64(0x7000, &[0xf4], 0), ""),
            Err(LoadError::OverlapsBootArea { .. })
        ));
    }

    #[test]
    fn test_kernel_beyond_ram_is_refused() {
        let r = ram();
        assert!(matches!(
            load_kernel(&r, &elf64(0xff_ff00, &[0; 0x200], 0), ""),
            Err(LoadError::OutsideRam { .. })
        ));
    }

    #[test]
    fn test_malformed_files_are_typed_errors() {
        let r = ram();
        assert_eq!(load_kernel(&r, b"", ""), Err(LoadError::UnknownFormat));
        assert_eq!(
            load_kernel(&r, b"MZ\x90\x00", ""),
            Err(LoadError::UnknownFormat)
        );
        assert!(matches!(
            load_kernel(&r, b"\x7fELF\x02\x01", ""),
            Err(LoadError::BadElf(_))
        ));
        let mut img = elf64(0x20_0000, &[0xf4], 0);
        img[4] = 3;
        assert!(matches!(
            load_kernel(&r, &img, ""),
            Err(LoadError::UnsupportedElf(_))
        ));
        let mut img = elf64(0x20_0000, &[0xf4], 0);
        img.truncate(0x1000); // segment bytes missing
        assert!(matches!(
            load_kernel(&r, &img, ""),
            Err(LoadError::BadElf(_))
        ));
        let mut img = elf64(0x20_0000, &[0xf4], 0);
        img[32..40].copy_from_slice(&u64::MAX.to_le_bytes()); // phoff
        assert!(matches!(
            load_kernel(&r, &img, ""),
            Err(LoadError::BadElf(_))
        ));
        let long = "x".repeat(5000);
        assert_eq!(
            load_kernel(&r, &elf64(0x20_0000, &[0xf4], 0), &long),
            Err(LoadError::CmdlineTooLong(5000))
        );
    }

    proptest! {
        #[test]
        fn test_loader_never_panics_on_garbage(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let r = GuestRam::new(4 << 20).unwrap();
            let _ = load_kernel(&r, &bytes, "x");
        }

        #[test]
        fn test_loader_never_panics_on_mutated_images(idx in 0usize..0x1100, val: u8, mb: bool) {
            let r = GuestRam::new(4 << 20).unwrap();
            let mut img = if mb {
                multiboot_kludge(0x10_0000, &[0xf4; 16], 0x10)
            } else {
                elf64(0x20_0000, &[0xf4; 16], 0x10)
            };
            if let Some(b) = img.get_mut(idx) {
                *b = val;
            }
            let _ = load_kernel(&r, &img, "x");
        }
    }
}
