//! Port I/O, the 16550 console at 0x3f8 and the isa-debug-exit port.
//!
//! Self-contained (also used by the test kernels through `#[path]`, where
//! it must be declared as `#[macro_use] mod io;`, next to a `text` module:
//! `l1-guest-hv/src/text.rs`).

use core::arch::asm;
use core::sync::atomic::{AtomicU32, Ordering};

/// COM1 base port.
pub const COM1: u16 = 0x3f8;
/// isa-debug-exit port.
pub const DEBUG_EXIT: u16 = 0xf4;

/// Writes a byte to an I/O port.
#[inline(always)]
pub fn outb(port: u16, value: u8) {
    // SAFETY: port output has no memory effects on this kernel; the ports
    // written are the UART, the debug console and the debug-exit device.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags))
    }
}

/// Writes a dword to an I/O port.
#[inline(always)]
pub fn outl(port: u16, value: u32) {
    // SAFETY: as for `outb`.
    unsafe {
        asm!("out dx, eax", in("dx") port, in("eax") value, options(nomem, nostack, preserves_flags))
    }
}

/// Reads a byte from an I/O port.
#[inline(always)]
pub fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: reading the UART registers has no memory effects.
    unsafe {
        asm!("in al, dx", out("al") value, in("dx") port, options(nomem, nostack, preserves_flags))
    }
    value
}

/// Programs the UART: 115200 8N1, FIFO on, interrupts off (for real
/// 16550s such as Bochs'; our L0 tolerates the writes).
pub fn serial_init() {
    outb(COM1 + 1, 0x00); // IER: no interrupts
    outb(COM1 + 3, 0x80); // LCR: DLAB
    outb(COM1, 0x01); // DLL: divisor 1 = 115200
    outb(COM1 + 1, 0x00); // DLM
    outb(COM1 + 3, 0x03); // LCR: 8N1
    outb(COM1 + 2, 0xc7); // FCR: FIFO on, cleared
    outb(COM1 + 4, 0x03); // MCR: DTR | RTS
}

/// Bytes that may still be written without polling LSR: the FIFO holds
/// 16 once LSR says the transmitter is empty (16550A, FCR bit 0 set).
/// Polling once per 16 bytes keeps L0's exit count down (every LSR read
/// is an exit to L0).
static FIFO_CREDIT: AtomicU32 = AtomicU32::new(0);

/// Writes one byte, waiting (bounded) for room in the transmit FIFO.
pub fn serial_write_byte(byte: u8) {
    if FIFO_CREDIT.load(Ordering::Relaxed) == 0 {
        // LSR bit 5: THR (and FIFO) empty. Bounded so a missing UART
        // cannot hang us.
        for _ in 0..100_000 {
            if inb(COM1 + 5) & 0x20 != 0 {
                break;
            }
            core::hint::spin_loop();
        }
        FIFO_CREDIT.store(16, Ordering::Relaxed);
    }
    FIFO_CREDIT.fetch_sub(1, Ordering::Relaxed);
    outb(COM1, byte);
}

/// The serial console as a text sink (no `core::fmt`: see `text.rs`).
pub struct Serial;

impl crate::text::Sink for Serial {
    fn put(&mut self, s: &str) {
        for b in s.bytes() {
            serial_write_byte(b);
        }
    }
}

/// Prints the items (anything implementing `text::Emit`) and a newline.
macro_rules! say {
    ($($item:expr),* $(,)?) => {{
        let mut out = $crate::io::Serial;
        $( $crate::text::Emit::emit(&$item, &mut out); )*
        $crate::text::Sink::put(&mut out, "\n");
    }};
}

/// Ends the run: writes `status` to the debug-exit port (L0 and QEMU stop
/// here), then, for platforms without one (Bochs), halts forever.
pub fn exit(status: u32) -> ! {
    outl(DEBUG_EXIT, status);
    loop {
        // SAFETY: halting with interrupts off only stops this CPU.
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) }
    }
}
