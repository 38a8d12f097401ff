//! The platform's port-I/O devices.
//!
//! | port | device |
//! | --- | --- |
//! | 0x3f8-0x3ff | 16550 UART subset: THR writes are printed, LSR reads 0x60 |
//! | 0xe9 | debug console: bytes are printed |
//! | 0xf4 | isa-debug-exit: an 8-, 16- or 32-bit write of V ends the run with exit code (V << 1) \| 1 |
//! | 0x510, 0x511 | QEMU fw_cfg, traditional interface ([`fw_cfg`]) |
//!
//! Output is assembled into lines and written, prefixed by the level that
//! printed it (`[L0] `, `[L1] `, `[L2] `), to an [`OutputSink`]: stdout
//! for the CLI, a capture buffer for tests. Other ports read as all ones
//! and ignore writes; so do guest-physical addresses outside RAM that no
//! in-kernel device claims (MMIO). Each such port, address and each MSR
//! L0 answers with #GP because nobody implements it is counted and logged
//! once (`tracing` info), never an error: [`Devices::unhandled_report`]
//! lists them at the end of a run (`l0-vmm run --report-unhandled`).

#[path = "fw_cfg.rs"]
pub mod fw_cfg;

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::{Arc, Mutex};

pub use fw_cfg::FwCfg;

/// Base port of the UART (COM1).
pub const COM1_BASE: u16 = 0x3f8;
/// The debug console port.
pub const DEBUG_CONSOLE_PORT: u16 = 0xe9;
/// The isa-debug-exit port.
pub const DEBUG_EXIT_PORT: u16 = 0xf4;

/// UART register offsets (16550 data sheet; DLAB = LCR bit 7).
const UART_THR: u16 = 0;
const UART_IER: u16 = 1;
const UART_IIR_FCR: u16 = 2;
const UART_LCR: u16 = 3;
const UART_MCR: u16 = 4;
const UART_LSR: u16 = 5;
const UART_MSR: u16 = 6;
const UART_SCR: u16 = 7;
const LCR_DLAB: u8 = 0x80;
/// LSR: THR empty (bit 5) and transmitter empty (bit 6).
pub const LSR_IDLE: u8 = 0x60;
/// MSR: carrier detect, data set ready, clear to send.
const MSR_READY: u8 = 0xb0;
/// IIR: no interrupt pending.
const IIR_NONE: u8 = 0x01;
/// Longest line kept before it is flushed without a newline.
const MAX_LINE: usize = 4096;

/// Who printed a line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    /// The L0 VMM itself.
    L0,
    /// The L1 hypervisor.
    L1,
    /// L1's guest.
    L2,
}

impl Level {
    /// The line prefix, e.g. `[L1] `.
    pub fn prefix(self) -> &'static str {
        match self {
            Level::L0 => "[L0] ",
            Level::L1 => "[L1] ",
            Level::L2 => "[L2] ",
        }
    }
}

/// Where output lines go.
pub trait OutputSink: Send {
    /// Writes one complete line (prefix included, no newline).
    fn write_line(&mut self, line: &str);
}

/// Writes lines to stdout.
#[derive(Debug, Default, Clone, Copy)]
pub struct StdoutSink;

impl OutputSink for StdoutSink {
    fn write_line(&mut self, line: &str) {
        let mut out = std::io::stdout().lock();
        // A closed stdout is not the guest's fault; drop the line.
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }
}

/// Collects lines in memory (tests read them back through a clone).
#[derive(Debug, Default, Clone)]
pub struct CaptureSink {
    lines: Arc<Mutex<Vec<String>>>,
}

impl CaptureSink {
    /// An empty capture.
    pub fn new() -> Self {
        Self::default()
    }

    /// The lines so far.
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().map(|l| l.clone()).unwrap_or_default()
    }
}

impl OutputSink for CaptureSink {
    fn write_line(&mut self, line: &str) {
        if let Ok(mut l) = self.lines.lock() {
            l.push(line.to_string());
        }
    }
}

/// The channel a byte came through (each has its own line buffer, so a
/// UART line and a 0xe9 line never interleave).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Channel {
    Uart,
    E9,
}

/// Line assembly and prefixing in front of a sink.
pub struct Console {
    sink: Box<dyn OutputSink>,
    partial: BTreeMap<(Level, Channel), Vec<u8>>,
}

impl std::fmt::Debug for Console {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Console")
            .field("partial", &self.partial)
            .finish_non_exhaustive()
    }
}

impl Console {
    /// A console writing to `sink`.
    pub fn new(sink: Box<dyn OutputSink>) -> Self {
        Self {
            sink,
            partial: BTreeMap::new(),
        }
    }

    fn put_byte(&mut self, level: Level, ch: Channel, b: u8) {
        let buf = self.partial.entry((level, ch)).or_default();
        match b {
            b'\n' => {
                let line = std::mem::take(buf);
                self.emit(level, &line);
            }
            b'\r' => {}
            _ => {
                buf.push(b);
                if buf.len() >= MAX_LINE {
                    let line = std::mem::take(buf);
                    self.emit(level, &line);
                }
            }
        }
    }

    fn emit(&mut self, level: Level, bytes: &[u8]) {
        let text = String::from_utf8_lossy(bytes);
        self.sink.write_line(&format!("{}{}", level.prefix(), text));
    }

    /// Prints an L0 message (one or more lines).
    pub fn l0_line(&mut self, msg: &str) {
        for l in msg.lines() {
            self.emit(Level::L0, l.as_bytes());
        }
    }

    /// Flushes unterminated lines (end of run).
    pub fn flush(&mut self) {
        let keys: Vec<_> = self.partial.keys().copied().collect();
        for k in keys {
            if let Some(buf) = self.partial.get_mut(&k) {
                if !buf.is_empty() {
                    let line = std::mem::take(buf);
                    self.emit(k.0, &line);
                }
            }
        }
    }
}

/// The 16550 subset: enough for a polling driver.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Serial16550 {
    ier: u8,
    lcr: u8,
    mcr: u8,
    scr: u8,
    dll: u8,
    dlm: u8,
    fcr: u8,
}

impl Serial16550 {
    /// Register write at `offset` (0-7). Returns the byte to print for a
    /// THR write.
    pub fn write(&mut self, offset: u16, v: u8) -> Option<u8> {
        let dlab = self.lcr & LCR_DLAB != 0;
        match offset {
            UART_THR if dlab => self.dll = v,
            UART_THR => return Some(v),
            UART_IER if dlab => self.dlm = v,
            UART_IER => self.ier = v & 0x0f,
            UART_IIR_FCR => self.fcr = v,
            UART_LCR => self.lcr = v,
            UART_MCR => self.mcr = v & 0x1f,
            UART_SCR => self.scr = v,
            // LSR and MSR are read-only: writes are ignored.
            _ => {}
        }
        None
    }

    /// The baud-rate divisor (DLM:DLL) last programmed with DLAB set.
    pub fn divisor(&self) -> u16 {
        u16::from_le_bytes([self.dll, self.dlm])
    }

    /// Register read at `offset` (0-7).
    pub fn read(&self, offset: u16) -> u8 {
        let dlab = self.lcr & LCR_DLAB != 0;
        match offset {
            UART_THR if dlab => self.dll,
            // RBR: no input is ever available.
            UART_THR => 0,
            UART_IER if dlab => self.dlm,
            UART_IER => self.ier,
            UART_IIR_FCR => {
                if self.fcr & 1 != 0 {
                    IIR_NONE | 0xc0
                } else {
                    IIR_NONE
                }
            }
            UART_LCR => self.lcr,
            UART_MCR => self.mcr,
            UART_LSR => LSR_IDLE,
            UART_MSR => MSR_READY,
            UART_SCR => self.scr,
            _ => 0xff,
        }
    }
}

/// What an OUT did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoOutcome {
    /// Handled; continue.
    Handled,
    /// The debug-exit port was written: end the run with this exit code.
    Exit(i32),
}

/// An MSR access nobody implements (L0 raised #GP).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum MsrAccess {
    /// RDMSR.
    Read,
    /// WRMSR.
    Write,
}

/// All devices plus the console.
#[derive(Debug)]
pub struct Devices {
    /// COM1.
    pub serial: Serial16550,
    /// fw_cfg (ports 0x510/0x511).
    pub fw_cfg: FwCfg,
    /// Output.
    pub console: Console,
    /// Accesses to ports no device claims, by port.
    pub unhandled: BTreeMap<u16, u64>,
    /// Accesses to guest-physical addresses nothing backs (MMIO exits),
    /// by address.
    pub unhandled_mmio: BTreeMap<u64, u64>,
    /// RDMSR/WRMSR of MSRs nobody implements, by index and kind.
    pub unhandled_msrs: BTreeMap<(u32, MsrAccess), u64>,
}

impl Devices {
    /// Devices printing to `sink`; fw_cfg reports 0 bytes of RAM until
    /// [`Devices::set_ram_size`] (or use [`Devices::for_machine`]).
    pub fn new(sink: Box<dyn OutputSink>) -> Self {
        Self::for_machine(sink, 0, 1)
    }

    /// Devices for a machine with `ram_size` bytes of RAM and `cpus` CPUs
    /// (what fw_cfg reports).
    pub fn for_machine(sink: Box<dyn OutputSink>, ram_size: u64, cpus: u16) -> Self {
        Self {
            serial: Serial16550::default(),
            fw_cfg: FwCfg::new(ram_size, cpus),
            console: Console::new(sink),
            unhandled: BTreeMap::new(),
            unhandled_mmio: BTreeMap::new(),
            unhandled_msrs: BTreeMap::new(),
        }
    }

    /// Sets the RAM size fw_cfg reports (key 0x03).
    pub fn set_ram_size(&mut self, ram_size: u64) {
        self.fw_cfg.set_ram_size(ram_size);
    }

    /// An OUT of `size` bytes (`data` in the low bytes) by `level`.
    pub fn io_out(&mut self, level: Level, port: u16, size: u8, data: u32) -> IoOutcome {
        let byte = data as u8;
        match port {
            DEBUG_EXIT_PORT => {
                let v = data & size_mask(size);
                // (V << 1) | 1, as QEMU's isa-debug-exit; wraps like a
                // process exit status would.
                return IoOutcome::Exit(((v << 1) | 1) as i32);
            }
            DEBUG_CONSOLE_PORT => self.console.put_byte(level, Channel::E9, byte),
            p if (COM1_BASE..COM1_BASE + 8).contains(&p) => {
                if let Some(b) = self.serial.write(p - COM1_BASE, byte) {
                    self.console.put_byte(level, Channel::Uart, b);
                }
            }
            p if FwCfg::claims(p) => self.fw_cfg.io_out(p, size, data),
            _ => self.note_unhandled(level, port),
        }
        IoOutcome::Handled
    }

    /// An IN of `size` bytes by `level`: the value read.
    pub fn io_in(&mut self, level: Level, port: u16, size: u8) -> u32 {
        match port {
            p if (COM1_BASE..COM1_BASE + 8).contains(&p) => {
                u32::from(self.serial.read(p - COM1_BASE))
            }
            // Bochs/QEMU convention: port 0xe9 reads back 0xe9.
            DEBUG_CONSOLE_PORT => 0xe9,
            p if FwCfg::claims(p) => self.fw_cfg.io_in(p, size),
            _ => {
                self.note_unhandled(level, port);
                size_mask(size)
            }
        }
    }

    /// A read of `len` bytes at guest-physical `gpa` that nothing backs:
    /// all ones (noted as unhandled).
    pub fn mmio_read(&mut self, level: Level, gpa: u64, len: u8) -> Vec<u8> {
        self.note_unhandled_mmio(level, gpa, "read");
        vec![0xff; usize::from(len).min(8)]
    }

    /// A write at guest-physical `gpa` that nothing backs: dropped (noted
    /// as unhandled).
    pub fn mmio_write(&mut self, level: Level, gpa: u64, _data: &[u8]) {
        self.note_unhandled_mmio(level, gpa, "write");
    }

    /// An RDMSR/WRMSR of an MSR nobody implements (L0 raises #GP).
    pub fn note_unhandled_msr(&mut self, level: Level, index: u32, access: MsrAccess) {
        let n = self.unhandled_msrs.entry((index, access)).or_insert(0);
        *n += 1;
        if *n == 1 {
            tracing::info!(
                "{level:?} {access:?} of MSR {index:#x}: not implemented, #GP (listed with --report-unhandled)"
            );
        }
    }

    fn note_unhandled(&mut self, level: Level, port: u16) {
        let n = self.unhandled.entry(port).or_insert(0);
        *n += 1;
        if *n == 1 {
            tracing::info!(
                "{level:?} I/O to unclaimed port {port:#x}: reads as all ones, writes ignored"
            );
        }
    }

    fn note_unhandled_mmio(&mut self, level: Level, gpa: u64, what: &str) {
        let n = self.unhandled_mmio.entry(gpa).or_insert(0);
        *n += 1;
        if *n == 1 {
            tracing::info!(
                "{level:?} MMIO {what} at {gpa:#x}: nothing there, reads as all ones, writes ignored"
            );
        }
    }

    /// Every port, MMIO address and MSR the guests touched that L0 does
    /// not emulate, one line each, sorted: `unhandled port 0x61: 3
    /// accesses`, `unhandled mmio 0xfec00000: 1 access`, `unhandled msr
    /// 0x1234 read: 2 accesses`. Empty if there were none.
    pub fn unhandled_report(&self) -> Vec<String> {
        let n = |c: u64| format!("{c} access{}", if c == 1 { "" } else { "es" });
        let mut out: Vec<String> = self
            .unhandled
            .iter()
            .map(|(p, c)| format!("unhandled port {p:#x}: {}", n(*c)))
            .collect();
        out.extend(
            self.unhandled_mmio
                .iter()
                .map(|(a, c)| format!("unhandled mmio {a:#x}: {}", n(*c))),
        );
        out.extend(self.unhandled_msrs.iter().map(|((i, k), c)| {
            let k = match k {
                MsrAccess::Read => "read",
                MsrAccess::Write => "write",
            };
            format!("unhandled msr {i:#x} {k}: {}", n(*c))
        }));
        out
    }
}

fn size_mask(size: u8) -> u32 {
    match size {
        1 => 0xff,
        2 => 0xffff,
        _ => 0xffff_ffff,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn devices() -> (Devices, CaptureSink) {
        let cap = CaptureSink::new();
        (Devices::new(Box::new(cap.clone())), cap)
    }

    fn out_str(d: &mut Devices, level: Level, port: u16, s: &str) {
        for b in s.bytes() {
            assert_eq!(d.io_out(level, port, 1, u32::from(b)), IoOutcome::Handled);
        }
    }

    #[test]
    fn test_uart_lines_are_prefixed_by_level() {
        let (mut d, cap) = devices();
        out_str(&mut d, Level::L1, COM1_BASE, "hello\r\n");
        out_str(&mut d, Level::L2, COM1_BASE, "from L2\n");
        assert_eq!(cap.lines(), vec!["[L1] hello", "[L2] from L2"]);
    }

    #[test]
    fn test_partial_line_is_not_printed_until_newline_or_flush() {
        let (mut d, cap) = devices();
        out_str(&mut d, Level::L1, COM1_BASE, "abc");
        assert!(cap.lines().is_empty());
        d.console.flush();
        assert_eq!(cap.lines(), vec!["[L1] abc"]);
    }

    #[test]
    fn test_e9_and_uart_do_not_interleave() {
        let (mut d, cap) = devices();
        out_str(&mut d, Level::L2, COM1_BASE, "ua");
        out_str(&mut d, Level::L2, DEBUG_CONSOLE_PORT, "e9 line\n");
        out_str(&mut d, Level::L2, COM1_BASE, "rt\n");
        assert_eq!(cap.lines(), vec!["[L2] e9 line", "[L2] uart"]);
    }

    #[test]
    fn test_lsr_reads_thr_empty() {
        let (mut d, _) = devices();
        assert_eq!(d.io_in(Level::L1, COM1_BASE + 5, 1), 0x60);
        assert_eq!(d.io_in(Level::L1, COM1_BASE + 2, 1), 0x01);
    }

    #[test]
    fn test_dlab_redirects_thr_to_divisor_latch() {
        let (mut d, cap) = devices();
        d.io_out(Level::L1, COM1_BASE + 3, 1, 0x80);
        d.io_out(Level::L1, COM1_BASE, 1, 0x03);
        d.io_out(Level::L1, COM1_BASE + 1, 1, 0x00);
        assert_eq!(d.io_in(Level::L1, COM1_BASE, 1), 3);
        d.io_out(Level::L1, COM1_BASE + 3, 1, 0x03);
        out_str(&mut d, Level::L1, COM1_BASE, "x\n");
        assert_eq!(cap.lines(), vec!["[L1] x"], "divisor writes must not print");
        assert_eq!(d.io_in(Level::L1, COM1_BASE + 3, 1), 3);
    }

    #[test]
    fn test_debug_exit_code_is_shifted_with_low_bit() {
        let (mut d, _) = devices();
        assert_eq!(d.io_out(Level::L1, 0xf4, 4, 0), IoOutcome::Exit(1));
        assert_eq!(d.io_out(Level::L1, 0xf4, 4, 0x10), IoOutcome::Exit(0x21));
        assert_eq!(d.io_out(Level::L1, 0xf4, 1, 0x1ff), IoOutcome::Exit(0x1ff));
    }

    #[test]
    fn test_debug_exit_takes_8_16_and_32_bit_writes() {
        let (mut d, _) = devices();
        // Only the written width counts: upper register bits are not data.
        assert_eq!(d.io_out(Level::L1, 0xf4, 1, 0xab05), IoOutcome::Exit(0xb));
        assert_eq!(
            d.io_out(Level::L1, 0xf4, 2, 0xdead_0102),
            IoOutcome::Exit(0x205)
        );
        assert_eq!(
            d.io_out(Level::L1, 0xf4, 4, 0x1234),
            IoOutcome::Exit(0x2469)
        );
        // A neighbouring port is not the debug exit.
        assert_eq!(d.io_out(Level::L1, 0xf5, 1, 1), IoOutcome::Handled);
        assert_eq!(d.unhandled.get(&0xf5), Some(&1));
    }

    #[test]
    fn test_uart_baud_rate_programming_prints_nothing() {
        let (mut d, cap) = devices();
        // The sequence of l1-guest-hv's serial_init (115200 8N1, FIFO on).
        for (off, v) in [
            (1, 0x00),
            (3, 0x80),
            (0, 0x01),
            (1, 0x00),
            (3, 0x03),
            (2, 0xc7),
            (4, 0x03),
        ] {
            d.io_out(Level::L1, COM1_BASE + off, 1, v);
        }
        d.console.flush();
        assert!(cap.lines().is_empty(), "DLL/DLM writes are not THR writes");
        assert_eq!(d.serial.divisor(), 1);
        assert_eq!(d.serial.ier, 0);
        // With DLAB clear again, offset 0 is THR.
        out_str(&mut d, Level::L1, COM1_BASE, "ok\n");
        assert_eq!(cap.lines(), vec!["[L1] ok"]);
    }

    #[test]
    fn test_uart_dlab_set_swallows_text() {
        let (mut d, cap) = devices();
        d.io_out(Level::L1, COM1_BASE + 3, 1, 0x83);
        out_str(&mut d, Level::L1, COM1_BASE, "hidden\n");
        d.console.flush();
        assert!(cap.lines().is_empty());
        assert_eq!(d.serial.divisor(), u16::from(b'\n'));
    }

    #[test]
    fn test_unclaimed_ports_read_all_ones_and_are_counted() {
        let (mut d, cap) = devices();
        assert_eq!(d.io_in(Level::L1, 0x61, 1), 0xff);
        assert_eq!(d.io_in(Level::L1, 0x61, 2), 0xffff);
        assert_eq!(d.io_in(Level::L1, 0x61, 4), 0xffff_ffff);
        assert_eq!(d.io_out(Level::L1, 0x80, 1, 0), IoOutcome::Handled);
        assert_eq!(d.unhandled.get(&0x61), Some(&3));
        assert_eq!(d.unhandled.get(&0x80), Some(&1));
        assert!(cap.lines().is_empty());
    }

    #[test]
    fn test_fw_cfg_is_on_ports_0x510_and_0x511() {
        let cap = CaptureSink::new();
        let mut d = Devices::for_machine(Box::new(cap), 64 << 20, 1);
        d.io_out(Level::L1, 0x510, 2, 0);
        let sig: Vec<u8> = (0..4).map(|_| d.io_in(Level::L1, 0x511, 1) as u8).collect();
        assert_eq!(sig, b"QEMU");
        d.io_out(Level::L1, 0x510, 2, 3);
        let ram: Vec<u8> = (0..8).map(|_| d.io_in(Level::L1, 0x511, 1) as u8).collect();
        assert_eq!(ram, (64u64 << 20).to_le_bytes());
        d.set_ram_size(32 << 20);
        d.io_out(Level::L1, 0x510, 2, 3);
        assert_eq!(d.io_in(Level::L1, 0x511, 4), 32 << 20);
        assert!(d.unhandled.is_empty(), "fw_cfg ports are claimed");
        // The DMA address port is not emulated.
        assert_eq!(d.io_in(Level::L1, 0x514, 4), 0xffff_ffff);
        assert_eq!(d.unhandled.get(&0x514), Some(&1));
    }

    #[test]
    fn test_unhandled_report_lists_ports_mmio_and_msrs() {
        let (mut d, cap) = devices();
        assert!(d.unhandled_report().is_empty());
        d.io_in(Level::L1, 0x61, 1);
        d.io_out(Level::L2, 0x61, 1, 0);
        d.io_out(Level::L1, 0x21, 1, 0xff);
        d.io_in(Level::L1, 0x3f8, 1);
        assert_eq!(d.mmio_read(Level::L1, 0xfec0_0000, 4), vec![0xff; 4]);
        d.mmio_write(Level::L1, 0xfec0_0010, &[1, 2, 3, 4]);
        d.note_unhandled_msr(Level::L1, 0x1234, MsrAccess::Read);
        d.note_unhandled_msr(Level::L1, 0x1234, MsrAccess::Read);
        d.note_unhandled_msr(Level::L1, 0x1234, MsrAccess::Write);
        assert_eq!(
            d.unhandled_report(),
            vec![
                "unhandled port 0x21: 1 access",
                "unhandled port 0x61: 2 accesses",
                "unhandled mmio 0xfec00000: 1 access",
                "unhandled mmio 0xfec00010: 1 access",
                "unhandled msr 0x1234 read: 2 accesses",
                "unhandled msr 0x1234 write: 1 access",
            ]
        );
        assert!(cap.lines().is_empty(), "noting is not printing");
    }

    proptest::proptest! {
        #[test]
        fn test_uart_lines_match_reference(text in "[ -~\n]{0,200}") {
            let (mut d, cap) = devices();
            out_str(&mut d, Level::L1, COM1_BASE, &text);
            d.console.flush();
            // Reference: split on newlines; a trailing partial line is
            // flushed; the empty tail after a final newline is not a line.
            let mut want: Vec<String> = text.split('\n').map(|l| format!("[L1] {l}")).collect();
            if text.is_empty() || text.ends_with('\n') {
                want.pop();
            }
            proptest::prop_assert_eq!(cap.lines(), want);
        }
    }

    #[test]
    fn test_l0_lines_are_prefixed() {
        let (mut d, cap) = devices();
        d.console.l0_line("a\nb");
        assert_eq!(cap.lines(), vec!["[L0] a", "[L0] b"]);
    }
}
