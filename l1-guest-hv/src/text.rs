//! Text output without `core::fmt`.
//!
//! `core` is precompiled with SSE2, and its formatting code uses SSE
//! instructions (`pinsrw` in decimal formatting, vectorised character
//! counting in `Formatter::pad`). KVM on this project's host cannot run
//! SSE ALU instructions in a guest (they exit as emulation failures). So
//! the kernels are built without SSE and print only through this module:
//! plain integer code, and nothing from `core::fmt` on the kernel side.
//! The host-side `Display` impls reuse [`Emit`] through [`FmtSink`].

use core::fmt;

/// Where text goes (the serial console, a test buffer, a `Formatter`).
pub trait Sink {
    /// Appends `s`.
    fn put(&mut self, s: &str);
}

/// Something that can print itself to a [`Sink`].
pub trait Emit {
    /// Writes `self` to `out`.
    fn emit(&self, out: &mut dyn Sink);
}

impl Emit for str {
    fn emit(&self, out: &mut dyn Sink) {
        out.put(self);
    }
}

impl<T: Emit + ?Sized> Emit for &T {
    fn emit(&self, out: &mut dyn Sink) {
        (**self).emit(out);
    }
}

/// An unsigned number in hexadecimal with a `0x` prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hex(pub u64);

/// An unsigned number in decimal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dec(pub u64);

/// Formats `v` in decimal into `buf`, returning the digits.
pub fn dec_str(mut v: u64, buf: &mut [u8; 20]) -> &str {
    let mut i = buf.len();
    loop {
        i -= 1;
        if let Some(slot) = buf.get_mut(i) {
            *slot = b'0' + (v % 10) as u8;
        }
        v /= 10;
        if v == 0 || i == 0 {
            break;
        }
    }
    core::str::from_utf8(buf.get(i..).unwrap_or(&[])).unwrap_or("?")
}

/// Formats `v` in hexadecimal (lower case, `0x` prefix) into `buf`.
pub fn hex_str(v: u64, buf: &mut [u8; 18]) -> &str {
    let digits = (64 - v.leading_zeros()).div_ceil(4).max(1) as usize;
    let start = buf.len() - digits - 2;
    for (k, slot) in buf.iter_mut().skip(start + 2).enumerate() {
        let nibble = (v >> (4 * (digits - 1 - k))) & 0xf;
        *slot = b"0123456789abcdef"[nibble as usize];
    }
    if let Some(p) = buf.get_mut(start..start + 2) {
        p.copy_from_slice(b"0x");
    }
    core::str::from_utf8(buf.get(start..).unwrap_or(&[])).unwrap_or("?")
}

impl Emit for Hex {
    fn emit(&self, out: &mut dyn Sink) {
        out.put(hex_str(self.0, &mut [0; 18]));
    }
}

impl Emit for Dec {
    fn emit(&self, out: &mut dyn Sink) {
        out.put(dec_str(self.0, &mut [0; 20]));
    }
}

macro_rules! emit_unsigned {
    ($($t:ty),*) => {$(
        impl Emit for $t {
            fn emit(&self, out: &mut dyn Sink) {
                Dec(u64::from(*self)).emit(out);
            }
        }
    )*};
}
emit_unsigned!(u8, u16, u32, u64);

impl Emit for usize {
    fn emit(&self, out: &mut dyn Sink) {
        Dec(*self as u64).emit(out);
    }
}

impl Emit for bool {
    fn emit(&self, out: &mut dyn Sink) {
        out.put(if *self { "true" } else { "false" });
    }
}

impl<A: Emit, B: Emit> Emit for (A, B) {
    fn emit(&self, out: &mut dyn Sink) {
        self.0.emit(out);
        self.1.emit(out);
    }
}

impl<A: Emit, B: Emit, C: Emit> Emit for (A, B, C) {
    fn emit(&self, out: &mut dyn Sink) {
        self.0.emit(out);
        self.1.emit(out);
        self.2.emit(out);
    }
}

/// Adapts a `Formatter` as a [`Sink`] (for host-side `Display` impls).
pub struct FmtSink<'a, 'b> {
    f: &'a mut fmt::Formatter<'b>,
    result: fmt::Result,
}

impl<'a, 'b> FmtSink<'a, 'b> {
    /// Emits `item` into `f`.
    pub fn write(f: &'a mut fmt::Formatter<'b>, item: &dyn Emit) -> fmt::Result {
        let mut s = FmtSink { f, result: Ok(()) };
        item.emit(&mut s);
        s.result
    }
}

impl Sink for FmtSink<'_, '_> {
    fn put(&mut self, s: &str) {
        if self.result.is_ok() {
            self.result = self.f.write_str(s);
        }
    }
}

/// A fixed-capacity text buffer (truncates when full).
#[derive(Debug, Clone)]
pub struct TextBuf<const N: usize> {
    buf: [u8; N],
    len: usize,
}

impl<const N: usize> Default for TextBuf<N> {
    fn default() -> Self {
        Self {
            buf: [0; N],
            len: 0,
        }
    }
}

impl<const N: usize> TextBuf<N> {
    /// The text so far.
    pub fn as_str(&self) -> &str {
        let bytes = self.buf.get(..self.len).unwrap_or(&[]);
        match core::str::from_utf8(bytes) {
            Ok(s) => s,
            // Truncation split a character: drop the partial tail.
            Err(e) => {
                core::str::from_utf8(bytes.get(..e.valid_up_to()).unwrap_or(&[])).unwrap_or("")
            }
        }
    }
}

impl<const N: usize> Sink for TextBuf<N> {
    fn put(&mut self, s: &str) {
        for &b in s.as_bytes() {
            if let Some(slot) = self.buf.get_mut(self.len) {
                *slot = b;
                self.len += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::format;

    fn render(item: &dyn Emit) -> TextBuf<128> {
        let mut b = TextBuf::default();
        item.emit(&mut b);
        b
    }

    #[test]
    fn test_hex_and_dec_edges() {
        assert_eq!(render(&Hex(0)).as_str(), "0x0");
        assert_eq!(render(&Hex(0x3f8_0000)).as_str(), "0x3f80000");
        assert_eq!(render(&Hex(u64::MAX)).as_str(), "0xffffffffffffffff");
        assert_eq!(render(&Dec(0)).as_str(), "0");
        assert_eq!(render(&Dec(u64::MAX)).as_str(), "18446744073709551615");
        assert_eq!(render(&(("a", 7u8), true)).as_str(), "a7true");
    }

    #[test]
    fn test_textbuf_truncates() {
        let mut b = TextBuf::<4>::default();
        b.put("abcdef");
        assert_eq!(b.as_str(), "abcd");
        let mut b = TextBuf::<3>::default();
        b.put("aé"); // 'é' is 2 bytes: both fit
        b.put("é"); // no room: dropped entirely
        assert_eq!(b.as_str(), "aé");
    }

    proptest! {
        #[test]
        fn prop_numbers_match_core_fmt(v: u64) {
            let (h, d) = (render(&Hex(v)), render(&Dec(v)));
            prop_assert_eq!(h.as_str(), format!("{v:#x}"));
            prop_assert_eq!(d.as_str(), format!("{v}"));
        }
    }
}
