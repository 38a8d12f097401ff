//! A small line-oriented Intel-syntax assembler for scenario L2 programs.
//!
//! iced-x86's `CodeAssembler` builds code from Rust calls, not from text,
//! so this front end parses the text (labels, operands, expressions, data
//! directives) and lets iced-x86's encoder do the encoding: for each line
//! it tries every legacy-encoded `Code` of the mnemonic that is valid in
//! the current mode and whose operand kinds fit, keeps those the encoder
//! accepts, and takes the shortest. Label addresses are found by repeating
//! the layout until no instruction changes size. Syntax: `docs/scenarios.md`.

use std::collections::{BTreeMap, HashMap};
use std::sync::OnceLock;

use iced_x86::{
    Code, Encoder, EncodingKind, Instruction, MemoryOperand, OpCodeOperandKind, Register,
    RepPrefixKind,
};
use thiserror::Error;

/// An assembly error, with the 1-based line in the program text.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("line {line}: {message}")]
pub struct AsmError {
    /// 1-based line number inside the program text.
    pub line: usize,
    /// What is wrong.
    pub message: String,
}

/// The assembled program.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assembled {
    /// Machine code, to be loaded at `base`.
    pub bytes: Vec<u8>,
    /// Every label and its absolute address.
    pub labels: BTreeMap<String, u64>,
    /// Start address and length of each instruction (for lookups by RIP).
    pub instructions: Vec<(u64, usize)>,
}

/// An expression: a sum of terms (numbers, labels, `$`).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Expr(Vec<(i64, Atom)>);

#[derive(Debug, Clone, PartialEq, Eq)]
enum Atom {
    Num(i64),
    Label(String),
    Here,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Mem {
    size: Option<usize>,
    seg: Register,
    base: Register,
    index: Register,
    scale: u32,
    disp: Expr,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Operand {
    Reg(Register),
    Mem(Mem),
    Imm(Expr),
    Far(u16, Expr),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Stmt {
    Insn {
        mnemonic: String,
        rep: Option<RepPrefixKind>,
        ops: Vec<Operand>,
    },
    Data(usize, Vec<DataItem>),
    Align(u64),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum DataItem {
    Bytes(Vec<u8>),
    Value(Expr),
}

struct Line {
    no: usize,
    bitness: u32,
    label: Option<String>,
    stmt: Option<Stmt>,
}

fn err(line: usize, message: impl Into<String>) -> AsmError {
    AsmError {
        line,
        message: message.into(),
    }
}

fn registers() -> &'static HashMap<String, Register> {
    static MAP: OnceLock<HashMap<String, Register>> = OnceLock::new();
    MAP.get_or_init(|| {
        Register::values()
            .filter(|r| *r != Register::None)
            .map(|r| (format!("{r:?}").to_ascii_lowercase(), r))
            .collect()
    })
}

fn mnemonic_codes() -> &'static HashMap<String, Vec<Code>> {
    static MAP: OnceLock<HashMap<String, Vec<Code>>> = OnceLock::new();
    MAP.get_or_init(|| {
        let mut map: HashMap<String, Vec<Code>> = HashMap::new();
        for code in Code::values() {
            let op = code.op_code();
            if op.encoding() != EncodingKind::Legacy || !op.is_instruction() {
                continue;
            }
            map.entry(format!("{:?}", code.mnemonic()).to_ascii_lowercase())
                .or_default()
                .push(code);
        }
        map
    })
}

/// Usual aliases that iced-x86 spells differently.
fn canonical(m: &str) -> &str {
    match m {
        "jz" => "je",
        "jnz" => "jne",
        "jc" | "jnae" => "jb",
        "jnc" | "jnb" => "jae",
        "jna" => "jbe",
        "jnbe" => "ja",
        "jnge" => "jl",
        "jnl" => "jge",
        "jng" => "jle",
        "jnle" => "jg",
        "jpe" => "jp",
        "jpo" => "jnp",
        "sal" => "shl",
        "setz" => "sete",
        "setnz" => "setne",
        "cmovz" => "cmove",
        "cmovnz" => "cmovne",
        other => other,
    }
}

fn parse_number(s: &str) -> Option<i64> {
    let s = s.replace('_', "");
    if let Some(h) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        u64::from_str_radix(h, 16).ok().map(|v| v as i64)
    } else if let Some(b) = s.strip_prefix("0b") {
        u64::from_str_radix(b, 2).ok().map(|v| v as i64)
    } else if let Some(h) = s.strip_suffix('h').or_else(|| s.strip_suffix('H')) {
        if h.starts_with(|c: char| c.is_ascii_digit()) {
            u64::from_str_radix(h, 16).ok().map(|v| v as i64)
        } else {
            None
        }
    } else {
        s.parse::<u64>().ok().map(|v| v as i64)
    }
}

fn is_ident(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == '.')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
}

fn parse_expr(s: &str, line: usize) -> Result<Expr, AsmError> {
    let s = s.trim();
    if s.is_empty() {
        return Err(err(line, "missing value"));
    }
    let mut terms = Vec::new();
    let mut sign = 1i64;
    let mut cur = String::new();
    let flush = |cur: &mut String, sign: i64, terms: &mut Vec<(i64, Atom)>| {
        let t = cur.trim().to_string();
        cur.clear();
        if t.is_empty() {
            return Err(err(line, format!("bad expression `{s}`")));
        }
        let atom = if t == "$" {
            Atom::Here
        } else if t.len() == 3 && t.starts_with('\'') && t.ends_with('\'') {
            Atom::Num(i64::from(t.as_bytes()[1]))
        } else if let Some(n) = parse_number(&t) {
            Atom::Num(n)
        } else if is_ident(&t) {
            Atom::Label(t)
        } else {
            return Err(err(line, format!("`{t}` is not a number or a label")));
        };
        terms.push((sign, atom));
        Ok(())
    };
    let mut in_char = false;
    for c in s.chars() {
        if c == '\'' {
            in_char = !in_char;
        }
        if !in_char && (c == '+' || c == '-') {
            if cur.trim().is_empty() && terms.is_empty() {
                sign = if c == '-' { -sign } else { sign };
                continue;
            }
            flush(&mut cur, sign, &mut terms)?;
            sign = if c == '-' { -1 } else { 1 };
        } else {
            cur.push(c);
        }
    }
    flush(&mut cur, sign, &mut terms)?;
    Ok(Expr(terms))
}

fn eval(
    e: &Expr,
    labels: &HashMap<String, u64>,
    here: u64,
    line: usize,
    strict: bool,
) -> Result<i64, AsmError> {
    let mut v = 0i64;
    for (sign, atom) in &e.0 {
        let a = match atom {
            Atom::Num(n) => *n,
            Atom::Here => here as i64,
            Atom::Label(l) => match labels.get(l) {
                Some(a) => *a as i64,
                None if strict => return Err(err(line, format!("unknown label `{l}`"))),
                None => here as i64,
            },
        };
        v = v.wrapping_add(sign.wrapping_mul(a));
    }
    Ok(v)
}

fn size_keyword(w: &str) -> Option<usize> {
    match w {
        "byte" => Some(1),
        "word" => Some(2),
        "dword" => Some(4),
        "qword" => Some(8),
        "fword" => Some(6),
        "tword" => Some(10),
        _ => None,
    }
}

fn parse_mem(size: Option<usize>, s: &str, line: usize) -> Result<Mem, AsmError> {
    let inner = s
        .strip_prefix('[')
        .and_then(|r| r.strip_suffix(']'))
        .ok_or_else(|| err(line, format!("bad memory operand `{s}`")))?;
    let regs = registers();
    let mut mem = Mem {
        size,
        seg: Register::None,
        base: Register::None,
        index: Register::None,
        scale: 1,
        disp: Expr(Vec::new()),
    };
    let mut body = inner.trim().to_ascii_lowercase();
    if let Some((seg, rest)) = body.split_once(':') {
        mem.seg = *regs
            .get(seg.trim())
            .filter(|r| r.is_segment_register())
            .ok_or_else(|| err(line, format!("`{seg}` is not a segment register")))?;
        body = rest.to_string();
    }
    // Split into signed terms at top level.
    let mut disp_terms = Vec::new();
    let mut sign = 1i64;
    let mut cur = String::new();
    let mut terms = Vec::new();
    for c in body.chars().chain(std::iter::once('+')) {
        if c == '+' || c == '-' {
            if !cur.trim().is_empty() {
                terms.push((sign, cur.trim().to_string()));
            }
            cur.clear();
            sign = if c == '-' { -1 } else { 1 };
        } else {
            cur.push(c);
        }
    }
    for (sign, t) in terms {
        if let Some((a, b)) = t.split_once('*') {
            let (r, n) = if regs.contains_key(a.trim()) {
                (a.trim(), b.trim())
            } else {
                (b.trim(), a.trim())
            };
            let reg = *regs
                .get(r)
                .ok_or_else(|| err(line, format!("`{t}`: scale needs an index register")))?;
            let scale = parse_number(n)
                .filter(|s| [1, 2, 4, 8].contains(s))
                .ok_or_else(|| err(line, format!("scale `{n}` is not 1, 2, 4 or 8")))?;
            if mem.index != Register::None || sign < 0 {
                return Err(err(line, format!("bad index in `{s}`")));
            }
            mem.index = reg;
            mem.scale = scale as u32;
        } else if let Some(reg) = regs.get(t.as_str()) {
            if sign < 0 {
                return Err(err(
                    line,
                    format!("a register cannot be subtracted in `{s}`"),
                ));
            }
            if mem.base == Register::None {
                mem.base = *reg;
            } else if mem.index == Register::None {
                mem.index = *reg;
            } else {
                return Err(err(line, format!("too many registers in `{s}`")));
            }
        } else {
            let e = parse_expr(&t, line)?;
            disp_terms.extend(e.0.into_iter().map(|(s2, a)| (s2 * sign, a)));
        }
    }
    mem.disp = Expr(disp_terms);
    Ok(mem)
}

fn split_operands(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut depth = 0;
    let mut quote = None;
    let mut cur = String::new();
    for c in s.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), _) => {}
            (None, '"' | '\'') => quote = Some(c),
            (None, '[') => depth += 1,
            (None, ']') => depth -= 1,
            (None, ',') if depth == 0 => {
                out.push(cur.trim().to_string());
                cur.clear();
                continue;
            }
            _ => {}
        }
        cur.push(c);
    }
    if !cur.trim().is_empty() {
        out.push(cur.trim().to_string());
    }
    out
}

fn parse_operand(s: &str, line: usize) -> Result<Operand, AsmError> {
    let lower = s.to_ascii_lowercase();
    if let Some(r) = registers().get(lower.as_str()) {
        return Ok(Operand::Reg(*r));
    }
    let mut rest = lower.as_str();
    let mut size = None;
    if let Some((w, r)) = rest.split_once(char::is_whitespace) {
        if let Some(sz) = size_keyword(w) {
            size = Some(sz);
            rest = r.trim_start();
            rest = rest.strip_prefix("ptr").map_or(rest, str::trim_start);
        }
    }
    if rest.contains('[') {
        // A segment override written before the bracket: `fs:[rax]`.
        let (seg, m) = match rest.split_once('[') {
            Some((seg, m)) if seg.trim().ends_with(':') => {
                (Some(seg.trim().trim_end_matches(':')), m)
            }
            _ => (None, rest.strip_prefix('[').unwrap_or(rest)),
        };
        let text = match seg {
            Some(seg) => format!("[{seg}:{m}"),
            None => format!("[{m}"),
        };
        return Ok(Operand::Mem(parse_mem(size, text.trim(), line)?));
    }
    if size.is_some() {
        return Err(err(
            line,
            format!("`{s}`: a size keyword needs a memory operand"),
        ));
    }
    if let Some((sel, off)) = s.split_once(':') {
        let sel = parse_number(sel.trim())
            .and_then(|v| u16::try_from(v).ok())
            .ok_or_else(|| {
                err(
                    line,
                    format!("far pointer `{s}`: selector must be a 16-bit number"),
                )
            })?;
        return Ok(Operand::Far(sel, parse_expr(off, line)?));
    }
    Ok(Operand::Imm(parse_expr(s, line)?))
}

fn parse_string(s: &str, line: usize) -> Result<Vec<u8>, AsmError> {
    let q = s.chars().next().unwrap_or('"');
    let inner = s
        .strip_prefix(q)
        .and_then(|r| r.strip_suffix(q))
        .ok_or_else(|| err(line, format!("unterminated string {s}")))?;
    let mut out = Vec::new();
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            match chars.next() {
                Some('n') => out.push(b'\n'),
                Some('r') => out.push(b'\r'),
                Some('t') => out.push(b'\t'),
                Some('0') => out.push(0),
                Some('\\') => out.push(b'\\'),
                Some('"') => out.push(b'"'),
                Some('\'') => out.push(b'\''),
                other => {
                    return Err(err(
                        line,
                        format!("unknown escape \\{}", other.unwrap_or(' ')),
                    ))
                }
            }
        } else {
            let mut buf = [0u8; 4];
            out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
        }
    }
    Ok(out)
}

fn strip_comment(s: &str) -> &str {
    let mut quote = None;
    for (i, c) in s.char_indices() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), _) => {}
            (None, '"') => quote = Some('"'),
            (None, ';' | '#') => return &s[..i],
            _ => {}
        }
    }
    s
}

fn parse_lines(src: &str, bitness: u32) -> Result<Vec<Line>, AsmError> {
    let mut bitness = bitness;
    let mut out = Vec::new();
    for (i, raw) in src.lines().enumerate() {
        let no = i + 1;
        let mut text = strip_comment(raw).trim();
        let mut label = None;
        if let Some((l, rest)) = text.split_once(':') {
            if is_ident(l.trim())
                && !l.trim().contains(char::is_whitespace)
                && !registers().contains_key(l.trim())
            {
                label = Some(l.trim().to_string());
                text = rest.trim();
            }
        }
        let lower = text.to_ascii_lowercase();
        let bits = lower.trim_start_matches('[').trim_end_matches(']');
        if let Some(b) = bits.strip_prefix("bits ") {
            bitness = match b.trim() {
                "16" => 16,
                "32" => 32,
                "64" => 64,
                other => return Err(err(no, format!("`bits {other}`: use 16, 32 or 64"))),
            };
            text = "";
        }
        let stmt = if text.is_empty() {
            None
        } else {
            Some(parse_stmt(text, no)?)
        };
        out.push(Line {
            no,
            bitness,
            label,
            stmt,
        });
    }
    Ok(out)
}

fn parse_stmt(text: &str, no: usize) -> Result<Stmt, AsmError> {
    let (head, rest) = text
        .split_once(char::is_whitespace)
        .map_or((text, ""), |(h, r)| (h, r.trim()));
    let head = head.to_ascii_lowercase();
    let data = match head.as_str() {
        "db" => Some(1),
        "dw" => Some(2),
        "dd" => Some(4),
        "dq" => Some(8),
        _ => None,
    };
    if let Some(size) = data {
        let mut items = Vec::new();
        for item in split_operands(rest) {
            if item.starts_with('"') || (item.starts_with('\'') && item.len() != 3) {
                if size != 1 {
                    return Err(err(no, "strings are only allowed with db"));
                }
                items.push(DataItem::Bytes(parse_string(&item, no)?));
            } else {
                items.push(DataItem::Value(parse_expr(&item, no)?));
            }
        }
        if items.is_empty() {
            return Err(err(no, format!("`{head}` needs at least one value")));
        }
        return Ok(Stmt::Data(size, items));
    }
    if head == "align" {
        let n = parse_number(rest)
            .filter(|n| *n > 0 && (*n as u64).is_power_of_two())
            .ok_or_else(|| err(no, "align needs a power of two"))?;
        return Ok(Stmt::Align(n as u64));
    }
    let (rep, mnemonic, rest) = match head.as_str() {
        "rep" | "repe" | "repz" | "repne" | "repnz" => {
            let kind = if head.starts_with("repn") {
                RepPrefixKind::Repne
            } else {
                RepPrefixKind::Repe
            };
            let (m, r) = rest
                .split_once(char::is_whitespace)
                .map_or((rest, ""), |(h, r)| (h, r.trim()));
            (Some(kind), m.to_ascii_lowercase(), r)
        }
        _ => (None, head, rest),
    };
    let ops = split_operands(rest)
        .iter()
        .map(|o| parse_operand(o, no))
        .collect::<Result<Vec<_>, _>>()?;
    let mnemonic = canonical(&mnemonic).to_string();
    if !mnemonic_codes().contains_key(&mnemonic) && string_insn(&mnemonic, 64, None).is_none() {
        return Err(err(no, format!("unknown mnemonic `{mnemonic}`")));
    }
    Ok(Stmt::Insn { mnemonic, rep, ops })
}

/// String instructions with implicit operands (`outsb`, `rep insb`, ...).
fn string_insn(
    m: &str,
    bitness: u32,
    rep: Option<RepPrefixKind>,
) -> Option<Result<Instruction, iced_x86::IcedError>> {
    let r = rep.unwrap_or(RepPrefixKind::None);
    let seg = Register::None;
    let a = bitness;
    Some(match m {
        "outsb" => Instruction::with_outsb(a, seg, r),
        "outsw" => Instruction::with_outsw(a, seg, r),
        "outsd" => Instruction::with_outsd(a, seg, r),
        "insb" => Instruction::with_insb(a, r),
        "insw" => Instruction::with_insw(a, r),
        "insd" => Instruction::with_insd(a, r),
        "movsb" => Instruction::with_movsb(a, seg, r),
        "movsw" => Instruction::with_movsw(a, seg, r),
        "movsd" => Instruction::with_movsd(a, seg, r),
        "movsq" => Instruction::with_movsq(a, seg, r),
        "stosb" => Instruction::with_stosb(a, r),
        "stosw" => Instruction::with_stosw(a, r),
        "stosd" => Instruction::with_stosd(a, r),
        "stosq" => Instruction::with_stosq(a, r),
        "lodsb" => Instruction::with_lodsb(a, seg, r),
        "lodsw" => Instruction::with_lodsw(a, seg, r),
        "lodsd" => Instruction::with_lodsd(a, seg, r),
        "lodsq" => Instruction::with_lodsq(a, seg, r),
        _ => return None,
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    Reg,
    Mem,
    Imm,
    Branch,
    Far,
}

fn class_of(k: OpCodeOperandKind) -> Option<Class> {
    use OpCodeOperandKind as K;
    Some(match k {
        K::r8_or_mem | K::r16_or_mem | K::r32_or_mem | K::r64_or_mem => return None,
        K::mem => Class::Mem,
        K::r8_reg
        | K::r8_opcode
        | K::r16_reg
        | K::r16_reg_mem
        | K::r16_rm
        | K::r16_opcode
        | K::r32_reg
        | K::r32_reg_mem
        | K::r32_rm
        | K::r32_opcode
        | K::r64_reg
        | K::r64_reg_mem
        | K::r64_rm
        | K::r64_opcode
        | K::seg_reg
        | K::cr_reg
        | K::dr_reg
        | K::es
        | K::cs
        | K::ss
        | K::ds
        | K::fs
        | K::gs
        | K::al
        | K::cl
        | K::ax
        | K::dx
        | K::eax
        | K::rax => Class::Reg,
        K::imm8
        | K::imm8sex16
        | K::imm8sex32
        | K::imm8sex64
        | K::imm16
        | K::imm32
        | K::imm32sex64
        | K::imm64 => Class::Imm,
        K::br16_1 | K::br32_1 | K::br64_1 | K::br16_2 | K::br32_4 | K::br64_4 => Class::Branch,
        K::farbr2_2 | K::farbr4_2 => Class::Far,
        _ => return None,
    })
}

fn fits(k: OpCodeOperandKind, op: &Operand) -> bool {
    use OpCodeOperandKind as K;
    let rm = matches!(
        k,
        K::r8_or_mem | K::r16_or_mem | K::r32_or_mem | K::r64_or_mem
    );
    match op {
        Operand::Reg(_) => rm || class_of(k) == Some(Class::Reg),
        Operand::Mem(_) => rm || class_of(k) == Some(Class::Mem),
        Operand::Imm(_) => matches!(class_of(k), Some(Class::Imm | Class::Branch)),
        Operand::Far(..) => class_of(k) == Some(Class::Far),
    }
}

fn branch_fits(k: OpCodeOperandKind, bitness: u32) -> bool {
    use OpCodeOperandKind as K;
    match k {
        K::br16_1 | K::br16_2 => bitness == 16,
        K::br32_1 | K::br32_4 => bitness == 32,
        K::br64_1 | K::br64_4 => bitness == 64,
        _ => true,
    }
}

/// A resolved operand.
#[derive(Debug, Clone, Copy)]
enum Val {
    Reg(Register),
    Mem(MemoryOperand, Option<usize>),
    Imm(i64),
    Far(u16, u32),
}

fn memory_operand(m: &Mem, disp: i64, bitness: u32) -> MemoryOperand {
    let displ_size = if m.base == Register::RIP || m.base == Register::EIP {
        if bitness == 64 {
            8
        } else {
            4
        }
    } else if m.base == Register::None && m.index == Register::None {
        // An absolute address in the code's own address size (a smaller
        // displ_size would make iced-x86 add a 67h prefix).
        bitness / 8
    } else if disp != 0 {
        1
    } else {
        0
    };
    MemoryOperand::new(m.base, m.index, m.scale, disp, displ_size, false, m.seg)
}

fn build(code: Code, ops: &[Val]) -> Result<Instruction, String> {
    build_iced(code, ops)?.map_err(|e| e.to_string())
}

fn build_iced(code: Code, ops: &[Val]) -> Result<Result<Instruction, iced_x86::IcedError>, String> {
    Ok(match ops {
        [] => Ok(Instruction::with(code)),
        [Val::Reg(r)] => Instruction::with1(code, *r),
        [Val::Mem(m, _)] => Instruction::with1(code, *m),
        [Val::Imm(v)] => {
            let op = code.op_code();
            if class_of(op.op_kind(0)) == Some(Class::Branch) {
                Instruction::with_branch(code, *v as u64)
            } else {
                match i32::try_from(*v) {
                    Ok(i) => Instruction::with1(code, i),
                    Err(_) => Instruction::with1(code, *v as u32),
                }
            }
        }
        [Val::Far(sel, off)] => Instruction::with_far_branch(code, *sel, *off),
        [Val::Reg(a), Val::Reg(b)] => Instruction::with2(code, *a, *b),
        [Val::Reg(a), Val::Imm(v)] => Instruction::with2(code, *a, *v),
        [Val::Reg(a), Val::Mem(m, _)] => Instruction::with2(code, *a, *m),
        [Val::Mem(m, _), Val::Reg(b)] => Instruction::with2(code, *m, *b),
        [Val::Mem(m, _), Val::Imm(v)] => match i32::try_from(*v) {
            Ok(i) => Instruction::with2(code, *m, i),
            Err(_) => Instruction::with2(code, *m, *v as u32),
        },
        [Val::Imm(v), Val::Reg(b)] => Instruction::with2(code, *v as i32, *b),
        [Val::Imm(a), Val::Imm(b)] => Instruction::with2(code, *a as i32, *b as i32),
        [Val::Reg(a), Val::Reg(b), Val::Imm(v)] => Instruction::with3(code, *a, *b, *v as i32),
        _ => return Err("this operand combination is not supported".into()),
    })
}

/// Where a line is being encoded.
#[derive(Debug, Clone, Copy)]
struct At {
    ip: u64,
    bitness: u32,
    line: usize,
    /// Unknown labels are errors (after the first pass).
    strict: bool,
}

/// Encodes one instruction line at `at.ip`: the shortest accepted form.
fn encode_insn(
    mnemonic: &str,
    rep: Option<RepPrefixKind>,
    ops: &[Operand],
    at: At,
    labels: &HashMap<String, u64>,
) -> Result<Vec<u8>, AsmError> {
    let At {
        ip,
        bitness,
        line,
        strict,
    } = at;
    if let Some(made) = string_insn(mnemonic, bitness, rep) {
        if !ops.is_empty() {
            return Err(err(line, format!("`{mnemonic}` takes no operands")));
        }
        let insn = made.map_err(|e| err(line, format!("`{mnemonic}`: {e}")))?;
        let mut enc = Encoder::new(bitness);
        enc.encode(&insn, ip)
            .map_err(|e| err(line, format!("`{mnemonic}`: {e}")))?;
        return Ok(enc.take_buffer());
    }
    if rep.is_some() {
        return Err(err(
            line,
            format!("`rep` only goes with string instructions, not `{mnemonic}`"),
        ));
    }
    let mut vals = Vec::new();
    for op in ops {
        vals.push(match op {
            Operand::Reg(r) => Val::Reg(*r),
            Operand::Mem(m) => {
                let d = eval(&m.disp, labels, ip, line, strict)?;
                Val::Mem(memory_operand(m, d, bitness), m.size)
            }
            Operand::Imm(e) => Val::Imm(eval(e, labels, ip, line, strict)?),
            Operand::Far(sel, e) => Val::Far(*sel, eval(e, labels, ip, line, strict)? as u32),
        });
    }
    let codes = mnemonic_codes()
        .get(mnemonic)
        .ok_or_else(|| err(line, format!("unknown mnemonic `{mnemonic}`")))?;
    let mut best: Option<(Vec<u8>, usize)> = None;
    let mut sizes = Vec::new();
    let mut last_error = None;
    for &code in codes {
        let op = code.op_code();
        let mode_ok = match bitness {
            16 => op.mode16(),
            32 => op.mode32(),
            _ => op.mode64(),
        };
        if !mode_ok || op.op_count() as usize != ops.len() {
            continue;
        }
        if !ops
            .iter()
            .enumerate()
            .all(|(i, o)| fits(op.op_kind(i as u32), o))
        {
            continue;
        }
        // A near branch keeps the code's own operand size: a 16-bit branch
        // in 32/64-bit code would truncate the target (and 66h is ignored
        // for near branches in 64-bit mode).
        if (0..op.op_count()).any(|i| !branch_fits(op.op_kind(i), bitness)) {
            continue;
        }
        let insn = match build(code, &vals) {
            Ok(i) => i,
            Err(e) => {
                last_error = Some(e);
                continue;
            }
        };
        let explicit = vals.iter().find_map(|v| match v {
            Val::Mem(_, s) => Some(*s),
            _ => None,
        });
        let mem_size = insn.memory_size().size();
        if let Some(Some(want)) = explicit {
            if mem_size != want {
                continue;
            }
        }
        let mut enc = Encoder::new(bitness);
        match enc.encode(&insn, ip) {
            Ok(_) => {
                let bytes = enc.take_buffer();
                if explicit == Some(None)
                    && !vals.iter().any(|v| matches!(v, Val::Reg(_)))
                    && mem_size != 0
                {
                    sizes.push(mem_size);
                }
                if best.as_ref().is_none_or(|(b, _)| bytes.len() < b.len()) {
                    best = Some((bytes, mem_size));
                }
            }
            Err(e) => last_error = Some(e.to_string()),
        }
    }
    sizes.sort_unstable();
    sizes.dedup();
    if sizes.len() > 1 {
        return Err(err(
            line,
            format!("`{mnemonic}`: the memory operand needs a size (byte/word/dword/qword)"),
        ));
    }
    best.map(|(b, _)| b).ok_or_else(|| {
        err(
            line,
            format!(
                "`{mnemonic}` with these operands cannot be encoded in {bitness}-bit code{}",
                last_error.map(|e| format!(" ({e})")).unwrap_or_default()
            ),
        )
    })
}

fn data_bytes(
    size: usize,
    items: &[DataItem],
    ip: u64,
    labels: &HashMap<String, u64>,
    line: usize,
    strict: bool,
) -> Result<Vec<u8>, AsmError> {
    let mut out = Vec::new();
    for item in items {
        match item {
            DataItem::Bytes(b) => out.extend_from_slice(b),
            DataItem::Value(e) => {
                let v = eval(e, labels, ip, line, strict)?;
                let ok = size == 8 || (v >= -(1i64 << (8 * size - 1)) && v < (1i64 << (8 * size)));
                if !ok {
                    return Err(err(line, format!("{v:#x} does not fit in {size} bytes")));
                }
                out.extend_from_slice(&v.to_le_bytes()[..size]);
            }
        }
    }
    Ok(out)
}

/// Assembles `src` for loading at `base`, starting in `bitness`-bit code
/// (16, 32 or 64; `bits N` lines switch).
pub fn assemble(src: &str, base: u64, bitness: u32) -> Result<Assembled, AsmError> {
    let lines = parse_lines(src, bitness)?;
    let mut labels: HashMap<String, u64> = HashMap::new();
    for l in &lines {
        if let Some(name) = &l.label {
            if labels.insert(name.clone(), 0).is_some() {
                return Err(err(l.no, format!("label `{name}` is defined twice")));
            }
        }
    }
    labels.clear();
    let mut previous: Option<Vec<usize>> = None;
    for pass in 0..16 {
        let strict = pass > 0;
        let mut ip = base;
        let mut sizes = Vec::new();
        let mut bytes = Vec::new();
        let mut instructions = Vec::new();
        let mut new_labels = HashMap::new();
        for l in &lines {
            if let Some(name) = &l.label {
                new_labels.insert(name.clone(), ip);
            }
            let chunk = match &l.stmt {
                None => Vec::new(),
                Some(Stmt::Align(n)) => vec![0; (ip.next_multiple_of(*n) - ip) as usize],
                Some(Stmt::Data(size, items)) => {
                    data_bytes(*size, items, ip, &labels, l.no, strict)?
                }
                Some(Stmt::Insn { mnemonic, rep, ops }) => {
                    let at = At {
                        ip,
                        bitness: l.bitness,
                        line: l.no,
                        strict,
                    };
                    let b = encode_insn(mnemonic, *rep, ops, at, &labels)?;
                    instructions.push((ip, b.len()));
                    b
                }
            };
            sizes.push(chunk.len());
            ip += chunk.len() as u64;
            bytes.extend_from_slice(&chunk);
        }
        let stable = previous.as_ref() == Some(&sizes) && labels == new_labels;
        labels = new_labels;
        if stable {
            return Ok(Assembled {
                bytes,
                labels: labels.into_iter().collect(),
                instructions,
            });
        }
        previous = Some(sizes);
    }
    Err(err(
        1,
        "label addresses do not settle (instruction sizes keep changing)",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::{Decoder, DecoderOptions, Formatter, IntelFormatter};

    fn disasm(bytes: &[u8], base: u64, bitness: u32) -> Vec<String> {
        let mut d = Decoder::with_ip(bitness, bytes, base, DecoderOptions::NONE);
        let mut f = IntelFormatter::new();
        let mut out = Vec::new();
        for insn in d.iter() {
            let mut s = String::new();
            f.format(&insn, &mut s);
            out.push(s);
        }
        out
    }

    #[test]
    fn test_assemble_64bit_and_decode_back() {
        let src = "start:\n  mov dx, 0x3f8 ; port\n  mov al, 'A'\n  out dx, al\n  out 0x80, al\n  in al, dx\n  mov ecx, 0x1b\n  rdmsr\n  wrmsr\n  cpuid\n  lea rsi, [rip + msg]\n  rep outsb\n  inc rax\n  dec rbx\n  add rax, 1000\n  sub rcx, 1\n  cmp rax, rbx\n  xor eax, eax\n  push rax\n  pop rbx\n  call fn\n  jne start\n  jmp done\nfn:\n  ret\ndone:\n  hlt\nmsg: db \"hi\\n\", 0\n";
        let a = assemble(src, 0x50_0000, 64).unwrap();
        let text = disasm(&a.bytes[..a.bytes.len() - 4], 0x50_0000, 64);
        assert_eq!(text[0], "mov dx,3F8h");
        assert_eq!(text[1], "mov al,41h");
        assert_eq!(text[2], "out dx,al");
        assert_eq!(text[3], "out 80h,al");
        assert_eq!(text[4], "in al,dx");
        assert!(text.iter().any(|t| t == "rep outsb dx,[rsi]"), "{text:?}");
        assert!(text.iter().any(|t| t.starts_with("lea rsi,[")), "{text:?}");
        assert_eq!(text.iter().filter(|t| *t == "hlt").count(), 1);
        assert_eq!(&a.bytes[a.bytes.len() - 4..], b"hi\n\0");
        let msg = a.labels["msg"];
        assert_eq!(msg, 0x50_0000 + a.bytes.len() as u64 - 4);
        let jne = text.iter().find(|t| t.starts_with("jne")).unwrap();
        assert_eq!(jne, "jne short 0000000000500000h");
        assert_eq!(a.instructions.len(), 24);
    }

    #[test]
    fn test_assemble_16_and_32bit_code() {
        let a = assemble(
            "mov ax, cs\nmov ds, ax\nmov si, msg\nlgdt [gdtr]\nmov eax, cr0\nor eax, 1\nmov cr0, eax\njmp 0x08:pm\nbits 32\npm: mov eax, 0x10\nhlt\ngdtr: dw 0x17\ndd 0\nmsg: db 'x'\n",
            0x8000,
            16,
        )
        .unwrap();
        let pm = a.labels["pm"];
        let text16 = disasm(&a.bytes[..(pm - 0x8000) as usize], 0x8000, 16);
        assert_eq!(text16[0], "mov ax,cs");
        assert_eq!(text16[1], "mov ds,ax");
        assert!(text16[2].starts_with("mov si,"), "{text16:?}");
        assert!(text16[3].starts_with("lgdt ["), "{text16:?}");
        // jmp ptr16:16 = EA offset16 selector16.
        let far = (pm - 0x8000) as usize - 5;
        assert_eq!(
            a.bytes[far..far + 5],
            [0xea, pm as u8, (pm >> 8) as u8, 0x08, 0x00]
        );
        let text32 = disasm(&a.bytes[(pm - 0x8000) as usize..], pm, 32);
        assert_eq!(text32[0], "mov eax,10h");
        assert_eq!(text32[1], "hlt");
    }

    #[test]
    fn test_long_jump_becomes_near() {
        let mut src = String::from("jmp far_away\n");
        for _ in 0..200 {
            src.push_str("nop\n");
        }
        src.push_str("far_away: hlt\n");
        let a = assemble(&src, 0x1000, 64).unwrap();
        assert_eq!(a.bytes[0], 0xe9);
        assert_eq!(a.labels["far_away"], 0x1000 + 5 + 200);
    }

    #[test]
    fn test_errors_name_the_line() {
        let e = assemble("nop\n  frob eax\n", 0, 64).unwrap_err();
        assert_eq!(e.line, 2);
        assert!(e.message.contains("frob"), "{e}");
        let e = assemble("nop\njmp nowhere\n", 0, 64).unwrap_err();
        assert_eq!(e.line, 2);
        assert!(e.message.contains("nowhere"), "{e}");
        let e = assemble("inc [rax]\n", 0, 64).unwrap_err();
        assert!(e.message.contains("size"), "{e}");
        let e = assemble("a: nop\na: nop\n", 0, 64).unwrap_err();
        assert_eq!(e.line, 2);
        let e = assemble("mov rax, rbx\n", 0, 32).unwrap_err();
        assert!(e.message.contains("32-bit"), "{e}");
        let e = assemble("rep nop\n", 0, 64).unwrap_err();
        assert!(e.message.contains("rep"), "{e}");
        assert!(assemble("db 300\n", 0, 64).is_err());
    }

    #[test]
    fn test_memory_operands_and_sizes() {
        let a = assemble(
            "mov byte [rbx+8], 5\nmov qword ptr [rax+rcx*8-16], rdx\nmov eax, [0x1000]\nint 0x30\nud2\n",
            0,
            64,
        )
        .unwrap();
        let text = disasm(&a.bytes, 0, 64);
        assert!(
            !a.bytes.contains(&0x67),
            "no address-size prefix: {:02x?}",
            a.bytes
        );
        assert_eq!(
            text,
            vec![
                "mov byte ptr [rbx+8],5",
                "mov [rax+rcx*8-10h],rdx",
                "mov eax,[1000h]",
                "int 30h",
                "ud2"
            ]
        );
    }
}
