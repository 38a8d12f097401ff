//! The platform's port-I/O devices.
//!
//! | port | device |
//! | --- | --- |
//! | 0x3f8-0x3ff | 16550 UART subset: THR writes are printed, LSR reads 0x60 |
//! | 0xe9 | debug console: bytes are printed |
//! | 0xf4 | isa-debug-exit: a write of V ends the run with exit code (V << 1) \| 1 |
//!
//! Output is assembled into lines and written, prefixed by the level that
//! printed it (`[L0] `, `[L1] `, `[L2] `), to an [`OutputSink`]: stdout
//! for the CLI, a capture buffer for tests. Other ports read as all ones
//! and ignore writes (counted, reported once).

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::{Arc, Mutex};

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

/// All devices plus the console.
#[derive(Debug)]
pub struct Devices {
    /// COM1.
    pub serial: Serial16550,
    /// Output.
    pub console: Console,
    /// Accesses to ports no device claims, by port.
    pub unhandled: BTreeMap<u16, u64>,
}

impl Devices {
    /// Devices printing to `sink`.
    pub fn new(sink: Box<dyn OutputSink>) -> Self {
        Self {
            serial: Serial16550::default(),
            console: Console::new(sink),
            unhandled: BTreeMap::new(),
        }
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
            _ => self.note_unhandled(port),
        }
        IoOutcome::Handled
    }

    /// An IN of `size` bytes by `level`: the value read.
    pub fn io_in(&mut self, _level: Level, port: u16, size: u8) -> u32 {
        match port {
            p if (COM1_BASE..COM1_BASE + 8).contains(&p) => {
                u32::from(self.serial.read(p - COM1_BASE))
            }
            // Bochs/QEMU convention: port 0xe9 reads back 0xe9.
            DEBUG_CONSOLE_PORT => 0xe9,
            _ => {
                self.note_unhandled(port);
                size_mask(size)
            }
        }
    }

    fn note_unhandled(&mut self, port: u16) {
        let n = self.unhandled.entry(port).or_insert(0);
        *n += 1;
        if *n == 1 {
            tracing::debug!("I/O to unclaimed port {port:#x} (reads as all ones)");
        }
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
    fn test_unclaimed_ports_read_all_ones_and_are_counted() {
        let (mut d, cap) = devices();
        assert_eq!(d.io_in(Level::L1, 0x61, 1), 0xff);
        assert_eq!(d.io_in(Level::L1, 0x61, 2), 0xffff);
        assert_eq!(d.io_out(Level::L1, 0x80, 1, 0), IoOutcome::Handled);
        assert_eq!(d.unhandled.get(&0x61), Some(&2));
        assert_eq!(d.unhandled.get(&0x80), Some(&1));
        assert!(cap.lines().is_empty());
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
