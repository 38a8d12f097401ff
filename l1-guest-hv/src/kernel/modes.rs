//! The test modes selected with `test=NAME` (see `docs/l1-guest.md`).

use l1_guest_hv::abi;
use l1_guest_hv::caps::{
    self, forbidden_bit, invept_supported, invvpid_supported, vmwrite_any_field,
};
use l1_guest_hv::cmdline::TestMode;
use l1_guest_hv::exit::{
    reason, IoQualification, LineBuffer, ShowOutcome, ShowResult, EXIT_REASON_ENTRY_FAILURE,
};
use l1_guest_hv::text::{Emit, Hex, Sink, TextBuf};
use vmcs12::{VmInstructionError as E, VmcsField, VmxFault, VmxOutcome};

use crate::cpu;
use crate::hv::{
    self, entry, init_region, Action, Caps, Exit, GuestSpec, VMCS_A, VMCS_B, VMXON_REGION,
};
use crate::vmx::{self, GuestRegs};

/// The value L1 answers for the intercepted IA32_APIC_BASE read, so a test
/// can tell L1's answer from the platform's ("L1MS" + 0x1b).
pub const MSR_MARKER: u64 = 0x4c31_4d53_0000_001b;
/// CPUID leaf the cpuid mode's L2 asks for, and L1's answer (EAX..EDX).
pub const CPUID_LEAF: u32 = 0x4c31_0000;
/// L1's answer to [`CPUID_LEAF`]: "L1 emulated CPUID".
pub const CPUID_ANSWER: [u32; 4] = [0x6d65_314c, 0x7461_6c75, 0x4320_6465, 0x4449_5550];

/// Counts `check` lines.
#[derive(Debug, Default)]
pub struct Checks {
    passed: u32,
    failed: u32,
}

impl Checks {
    /// Prints `check NAME: expected E got G ok|FAIL` and counts it.
    pub fn check(&mut self, name: &str, expected: impl Emit, got: impl Emit, ok: bool) {
        say!(
            "check ",
            name,
            ": expected ",
            expected,
            " got ",
            got,
            " ",
            if ok { "ok" } else { "FAIL" }
        );
        if ok {
            self.passed += 1;
        } else {
            self.failed += 1;
        }
    }

    /// Checks a VMX outcome.
    pub fn outcome(&mut self, name: &str, expected: VmxOutcome, got: VmxOutcome) {
        self.check(
            name,
            ShowOutcome(expected),
            ShowOutcome(got),
            expected == got,
        );
    }

    /// Prints the summary line and returns the exit status.
    pub fn finish(&self, test: &str) -> u32 {
        say!(
            "result test=",
            test,
            ": ",
            self.passed,
            " passed, ",
            self.failed,
            " failed"
        );
        if self.failed == 0 && self.passed > 0 {
            abi::EXIT_STATUS_PASS
        } else {
            abi::EXIT_STATUS_FAIL
        }
    }
}

/// The last console lines L2 printed (for modes that check what L2 saw).
pub struct LineLog {
    lines: [TextBuf<100>; 16],
    len: usize,
}

impl LineLog {
    fn new() -> Self {
        Self {
            lines: core::array::from_fn(|_| TextBuf::default()),
            len: 0,
        }
    }

    fn push(&mut self, line: &str) {
        if let Some(slot) = self.lines.get_mut(self.len) {
            slot.put(line);
            self.len += 1;
        }
    }

    /// The lines in order.
    pub fn iter(&self) -> impl Iterator<Item = &str> {
        self.lines.iter().take(self.len).map(|l| l.as_str())
    }

    /// The first line starting with `prefix`.
    pub fn find(&self, prefix: &str) -> Option<&str> {
        self.iter().find(|l| l.starts_with(prefix))
    }

    /// Position of the first line starting with `prefix`.
    pub fn position(&self, prefix: &str) -> Option<usize> {
        self.iter().position(|l| l.starts_with(prefix))
    }
}

/// State of the generic exit handler.
pub struct Handler {
    console: LineBuffer,
    apic_base: u64,
    io_exits: u32,
    unexpected: u32,
    /// rip-change: where to send L2 on its first I/O exit.
    redirect: Option<u64>,
    /// exception: where to resume L2 after an exception exit.
    after_exception: Option<u64>,
    exception_vector: Option<u32>,
    halted: bool,
    /// L2 console lines seen, and whether one started with "WRONG".
    lines: u32,
    wrong_line: bool,
    /// The first 16 L2 console lines.
    pub log: LineLog,
}

impl Handler {
    /// A handler with no redirections.
    pub fn new() -> Self {
        Self {
            console: LineBuffer::new(),
            apic_base: MSR_MARKER,
            io_exits: 0,
            unexpected: 0,
            redirect: None,
            after_exception: None,
            exception_vector: None,
            halted: false,
            lines: 0,
            wrong_line: false,
            log: LineLog::new(),
        }
    }

    /// Whether L2 ended with HLT.
    pub fn halted(&self) -> bool {
        self.halted
    }

    /// Counts an exit the mode did not expect.
    pub fn unexpected(&mut self) {
        self.unexpected += 1;
    }

    /// The generic handling of one exit.
    pub fn handle(&mut self, exit: &Exit) -> Action {
        let line = &exit.line;
        match line.basic() {
            reason::IO => {
                self.io_exits += 1;
                let Some(q) = IoQualification::decode(line.qualification) else {
                    say!("L1: bad I/O qualification ", Hex(line.qualification));
                    self.unexpected += 1;
                    return Action::Stop;
                };
                if let Some(target) = self.redirect.take() {
                    say!("L1: GUEST_RIP ", Hex(line.rip), " -> ", Hex(target));
                    return Action::Jump(target);
                }
                if q.is_in {
                    // Reads of an intercepted port: all ones, like a bus
                    // with nothing on it.
                    let rax = vmx::guest_reg(GuestRegs::RAX);
                    let mask = (1u64 << (8 * u32::from(q.size))) - 1;
                    vmx::set_guest_reg(GuestRegs::RAX, rax | mask);
                } else if q.port == abi::SERIAL_PORT {
                    let byte = vmx::guest_reg(GuestRegs::RAX) as u8;
                    if let Some(text) = self.console.push(byte) {
                        say!("L2> ", text);
                        self.log.push(text);
                        self.lines += 1;
                        self.wrong_line |= text.starts_with("WRONG");
                    }
                }
                Action::Advance
            }
            reason::RDMSR => {
                let msr = vmx::guest_reg(GuestRegs::RCX) as u32;
                let value = if msr == caps::IA32_APIC_BASE {
                    self.apic_base
                } else {
                    0
                };
                say!("L1: rdmsr ", Hex(u64::from(msr)), " -> ", Hex(value));
                vmx::set_guest_reg(GuestRegs::RAX, value & 0xffff_ffff);
                vmx::set_guest_reg(GuestRegs::RDX, value >> 32);
                Action::Advance
            }
            reason::WRMSR => {
                let msr = vmx::guest_reg(GuestRegs::RCX) as u32;
                let value = (vmx::guest_reg(GuestRegs::RDX) << 32)
                    | (vmx::guest_reg(GuestRegs::RAX) & 0xffff_ffff);
                say!("L1: wrmsr ", Hex(u64::from(msr)), " <- ", Hex(value));
                if msr == caps::IA32_APIC_BASE {
                    self.apic_base = value;
                }
                Action::Advance
            }
            reason::CPUID => {
                let leaf = vmx::guest_reg(GuestRegs::RAX) as u32;
                let answer = if leaf == CPUID_LEAF {
                    CPUID_ANSWER
                } else {
                    let r = core::arch::x86_64::__cpuid_count(
                        leaf,
                        vmx::guest_reg(GuestRegs::RCX) as u32,
                    );
                    [r.eax, r.ebx, r.ecx, r.edx]
                };
                say!(
                    "L1: cpuid ",
                    Hex(u64::from(leaf)),
                    " -> ",
                    Hex(u64::from(answer[0])),
                    " ",
                    Hex(u64::from(answer[1])),
                    " ",
                    Hex(u64::from(answer[2])),
                    " ",
                    Hex(u64::from(answer[3]))
                );
                for (reg, v) in [
                    GuestRegs::RAX,
                    GuestRegs::RBX,
                    GuestRegs::RCX,
                    GuestRegs::RDX,
                ]
                .into_iter()
                .zip(answer)
                {
                    vmx::set_guest_reg(reg, v.into());
                }
                Action::Advance
            }
            reason::HLT => {
                if !self.console.is_empty() {
                    let text = self.console.take();
                    say!("L2> ", text);
                    self.log.push(text);
                }
                self.halted = true;
                Action::Stop
            }
            reason::EXCEPTION_NMI => {
                let vector = exit.intr_info & 0xff;
                say!(
                    "L1: L2 exception vector=",
                    vector,
                    " type=",
                    (exit.intr_info >> 8) & 7,
                    " valid=",
                    exit.intr_info >> 31
                );
                self.exception_vector = Some(vector);
                match self.after_exception.take() {
                    Some(rip) => Action::Jump(rip),
                    None => {
                        self.unexpected += 1;
                        Action::Stop
                    }
                }
            }
            reason::EPT_VIOLATION | reason::EPT_MISCONFIG => {
                let gpa = vmx::vmread(VmcsField::GUEST_PHYSICAL_ADDRESS).unwrap_or(u64::MAX);
                say!("L1: EPT exit gpa=", Hex(gpa), " (this L1 sets up no EPT)");
                self.unexpected += 1;
                Action::Stop
            }
            other => {
                say!("L1: unexpected exit reason ", other);
                self.unexpected += 1;
                Action::Stop
            }
        }
    }
}

/// Runs the selected mode and returns the exit status.
pub fn run(mode: TestMode) -> u32 {
    let mut checks = Checks::default();
    let Some(caps) = hv::vmx_bringup() else {
        say!("Bail out! VMX bring-up failed");
        return abi::EXIT_STATUS_FAIL;
    };
    match mode {
        TestMode::Demo => demo(&caps, &mut checks),
        TestMode::RipChange => rip_change(&caps, &mut checks),
        TestMode::Cpuid => cpuid(&caps, &mut checks),
        TestMode::Exception => exception(&caps, &mut checks),
        TestMode::Bench => bench(&caps, &mut checks),
        TestMode::VmxErrors => vmx_errors(&caps, &mut checks),
        TestMode::Ept => crate::ept_mode::ept(&caps, &mut checks),
        TestMode::Realmode => crate::realmode::realmode(&caps, &mut checks),
        TestMode::RealmodeNoUg => crate::realmode::realmode_no_ug(&caps, &mut checks),
        TestMode::Inject => crate::inject::inject(&caps, &mut checks),
        TestMode::Scenario => crate::scenario_mode::scenario(&caps, &mut checks),
    }
    checks.finish(mode.name())
}

/// VMCLEAR + VMPTRLD of VMCS A and a full VMCS for `spec`.
pub fn load_vmcs(caps: &Caps, spec: &GuestSpec<'_>, checks: &mut Checks) -> bool {
    init_region(&VMCS_A, caps.basic.revision_id);
    for (name, o) in [
        ("vmclear", vmx::vmclear(VMCS_A.addr())),
        ("vmptrld", vmx::vmptrld(VMCS_A.addr())),
    ] {
        say!(name, " ", Hex(VMCS_A.addr()), ": ", ShowOutcome(o));
        if o != VmxOutcome::Succeed {
            say!("VMX error: ", name, " ", ShowOutcome(o));
            checks.check("vmcs-setup", "VMsucceed", ShowOutcome(o), false);
            return false;
        }
    }
    match hv::setup_vmcs(caps, spec) {
        Ok(()) => {
            say!("vmcs: complete, GUEST_RIP=", Hex(spec.entry));
            true
        }
        Err(e) => {
            say!(
                "VMX error: vmwrite ",
                e.field.name(),
                " ",
                ShowOutcome(e.outcome)
            );
            checks.check("vmcs-setup", "VMsucceed", ShowOutcome(e.outcome), false);
            false
        }
    }
}

pub fn run_and_check(handler: &mut Handler, quiet: bool, checks: &mut Checks) -> bool {
    let result = hv::run_guest(quiet, |e| handler.handle(e));
    report_run(handler, result, checks)
}

/// The `l2-halted` and `no-unexpected-exits` checks after a run (or
/// `l2-ran` when VM entry failed); true if L2 ran.
pub fn report_run(
    handler: &Handler,
    result: Result<u32, hv::RunError>,
    checks: &mut Checks,
) -> bool {
    report_run_named(handler, result, checks, "")
}

/// [`report_run`] with `prefix` before each check name (for modes that
/// run L2 more than once).
pub fn report_run_named(
    handler: &Handler,
    result: Result<u32, hv::RunError>,
    checks: &mut Checks,
    prefix: &str,
) -> bool {
    let name = |n: &str| {
        let mut b = TextBuf::<64>::default();
        b.put(prefix);
        b.put(n);
        b
    };
    match result {
        Ok(n) => {
            say!("L1: ", n, " exits handled");
            checks.check(
                name("l2-halted").as_str(),
                "HLT exit",
                if handler.halted { "HLT exit" } else { "no HLT" },
                handler.halted,
            );
            checks.check(
                name("no-unexpected-exits").as_str(),
                0u32,
                handler.unexpected,
                handler.unexpected == 0,
            );
            true
        }
        Err(_) => {
            checks.check(name("l2-ran").as_str(), "VM exits", "VM-entry error", false);
            false
        }
    }
}

fn demo(caps: &Caps, checks: &mut Checks) {
    let spec = GuestSpec {
        entry: entry(hv::l2_demo),
        io_ports: &[abi::SERIAL_PORT],
        msrs: &[caps::IA32_APIC_BASE],
        exception_bitmap: u32::MAX,
        secondary: 0,
        eptp: 0,
    };
    if !load_vmcs(caps, &spec, checks) {
        return;
    }
    let mut h = Handler::new();
    if !run_and_check(&mut h, false, checks) {
        return;
    }
    let (r1, r2, r3) = (hv::l2_result(0), hv::l2_result(1), hv::l2_result(2));
    checks.check(
        "rdmsr-intercepted",
        Hex(MSR_MARKER),
        Hex(r1),
        r1 == MSR_MARKER,
    );
    checks.check(
        "wrmsr-intercepted",
        Hex(MSR_MARKER + 1),
        Hex(r2),
        r2 == MSR_MARKER + 1,
    );
    checks.check(
        "rdmsr-not-intercepted",
        "platform value",
        Hex(r3),
        r3 != MSR_MARKER && r3 != 0,
    );
    checks.check("l2-console-exits", ">= 14", h.io_exits, h.io_exits >= 14);
}

fn rip_change(caps: &Caps, checks: &mut Checks) {
    let spec = GuestSpec {
        entry: entry(hv::l2_rip_change),
        io_ports: &[abi::SERIAL_PORT],
        msrs: &[],
        exception_bitmap: u32::MAX,
        secondary: 0,
        eptp: 0,
    };
    if !load_vmcs(caps, &spec, checks) {
        return;
    }
    let mut h = Handler::new();
    let target = entry(hv::l2_rip_target);
    h.redirect = Some(target);
    let ok = run_and_check(&mut h, false, checks);
    if ok {
        checks.check(
            "rip-change-followed",
            "1 line from the new RIP",
            (h.lines, " line(s), wrong path ", h.wrong_line),
            h.lines == 1 && !h.wrong_line,
        );
    }
}

fn cpuid(caps: &Caps, checks: &mut Checks) {
    let spec = GuestSpec {
        entry: entry(hv::l2_cpuid),
        io_ports: &[],
        msrs: &[],
        exception_bitmap: u32::MAX,
        secondary: 0,
        eptp: 0,
    };
    if !load_vmcs(caps, &spec, checks) {
        return;
    }
    let mut h = Handler::new();
    if !run_and_check(&mut h, false, checks) {
        return;
    }
    let got = [
        hv::l2_result(0),
        hv::l2_result(1),
        hv::l2_result(2),
        hv::l2_result(3),
    ];
    let ok = got.iter().zip(CPUID_ANSWER).all(|(g, a)| *g as u32 == a);
    checks.check(
        "cpuid-emulated-by-l1",
        Hex(u64::from(CPUID_ANSWER[0])),
        Hex(u64::from(got[0] as u32)),
        ok,
    );
}

fn exception(caps: &Caps, checks: &mut Checks) {
    let spec = GuestSpec {
        entry: entry(hv::l2_exception),
        io_ports: &[abi::SERIAL_PORT],
        msrs: &[],
        exception_bitmap: 1 << 6,
        secondary: 0,
        eptp: 0,
    };
    if !load_vmcs(caps, &spec, checks) {
        return;
    }
    let mut h = Handler::new();
    h.after_exception = Some(entry(hv::l2_after_ud2));
    if !run_and_check(&mut h, false, checks) {
        return;
    }
    checks.check(
        "exception-exit-ud",
        "vector 6",
        (
            "vector ",
            u32::from(h.exception_vector.map_or(255, |v| v as u8)),
        ),
        h.exception_vector == Some(6),
    );
}

fn bench(caps: &Caps, checks: &mut Checks) {
    let spec = GuestSpec {
        entry: entry(hv::l2_bench),
        io_ports: &[0x80],
        msrs: &[],
        exception_bitmap: u32::MAX,
        secondary: 0,
        eptp: 0,
    };
    if !load_vmcs(caps, &spec, checks) {
        return;
    }
    let mut h = Handler::new();
    let start = cpu::rdtsc();
    let ok = run_and_check(&mut h, true, checks);
    let cycles = cpu::rdtsc().wrapping_sub(start);
    say!(
        "bench: ",
        h.io_exits,
        " I/O exits, ",
        cycles / u64::from(h.io_exits.max(1)),
        " TSC cycles per exit"
    );
    if ok {
        checks.check("bench-io-exits", 1000u32, h.io_exits, h.io_exits == 1000);
    }
}

/// VMLAUNCH/VMRESUME and, if it exited, the VM_EXIT_REASON.
fn exit_reason_after(launch: bool) -> Result<u64, VmxOutcome> {
    vmx::enter(launch).and_then(|()| vmx::vmread(VmcsField::VM_EXIT_REASON))
}

fn fail_valid(e: E) -> VmxOutcome {
    VmxOutcome::FailValid(e)
}

/// Every VMX instruction outcome L1 can provoke, in an order that keeps
/// the preconditions right (VMfailValid needs a current VMCS, SDM 31.2).
fn vmx_errors(caps: &Caps, c: &mut Checks) {
    use VmxOutcome::{FailInvalid, Succeed};
    let rev = caps.basic.revision_id;
    let vmxon_pa = VMXON_REGION.addr();
    let a = VMCS_A.addr();
    let b = VMCS_B.addr();
    init_region(&VMCS_A, rev);
    init_region(&VMCS_B, rev.wrapping_add(1) & 0x7fff_ffff);

    // No current VMCS yet: failures are VMfailInvalid.
    let cur = vmx::vmptrst();
    c.check(
        "vmptrst-none",
        "0xffffffffffffffff",
        ShowResult(cur),
        cur == Ok(u64::MAX),
    );
    c.outcome(
        "vmread-no-current-vmcs",
        FailInvalid,
        vmx::vmread(VmcsField::GUEST_RIP).err().unwrap_or(Succeed),
    );
    c.outcome(
        "vmwrite-no-current-vmcs",
        FailInvalid,
        vmx::vmwrite(VmcsField::GUEST_RIP, 0),
    );
    c.outcome(
        "vmlaunch-no-current-vmcs",
        FailInvalid,
        vmx::enter(true).err().unwrap_or(Succeed),
    );
    c.outcome(
        "vmxon-in-root-no-current",
        FailInvalid,
        vmx::vmxon(vmxon_pa),
    );
    c.outcome(
        "vmclear-unaligned-no-current",
        FailInvalid,
        vmx::vmclear(a | 0x10),
    );
    // VMCALL in root operation: VMfail(1) (SDM 31.3), no current VMCS.
    c.outcome("vmcall-no-current-vmcs", FailInvalid, vmx::vmcall());

    // With a current VMCS: VMfailValid(n).
    c.outcome("vmclear", Succeed, vmx::vmclear(a));
    c.outcome("vmptrld", Succeed, vmx::vmptrld(a));
    let cur = vmx::vmptrst();
    c.check("vmptrst", Hex(a), ShowResult(cur), cur == Ok(a));
    c.outcome(
        "vmcall-in-root",
        fail_valid(E::VmcallInVmxRoot),
        vmx::vmcall(),
    );
    c.outcome(
        "vmxon-twice",
        fail_valid(E::VmxonInVmxRoot),
        vmx::vmxon(vmxon_pa),
    );
    c.outcome(
        "vmclear-vmxon-pointer",
        fail_valid(E::VmclearVmxonPointer),
        vmx::vmclear(vmxon_pa),
    );
    c.outcome(
        "vmptrld-vmxon-pointer",
        fail_valid(E::VmptrldVmxonPointer),
        vmx::vmptrld(vmxon_pa),
    );
    c.outcome(
        "vmclear-unaligned",
        fail_valid(E::VmclearInvalidAddress),
        vmx::vmclear(a | 0x10),
    );
    c.outcome(
        "vmptrld-unaligned",
        fail_valid(E::VmptrldInvalidAddress),
        vmx::vmptrld(a | 0x800),
    );
    c.outcome(
        "vmclear-beyond-maxphyaddr",
        fail_valid(E::VmclearInvalidAddress),
        vmx::vmclear(1 << 63),
    );
    c.outcome(
        "vmptrld-beyond-maxphyaddr",
        fail_valid(E::VmptrldInvalidAddress),
        vmx::vmptrld(1 << 63),
    );
    c.outcome(
        "vmptrld-bad-revision",
        fail_valid(E::VmptrldIncorrectRevisionId),
        vmx::vmptrld(b),
    );
    let err = vmx::vmread(VmcsField::VM_INSTRUCTION_ERROR);
    c.check(
        "vm-instruction-error-field",
        "0xb",
        ShowResult(err),
        err == Ok(11),
    );
    let cur = vmx::vmptrst();
    c.check(
        "current-vmcs-kept-after-failure",
        Hex(a),
        ShowResult(cur),
        cur == Ok(a),
    );
    c.outcome(
        "vmread-unsupported-field",
        fail_valid(E::UnsupportedVmcsComponent),
        vmx::vmread_encoding(0x1234).err().unwrap_or(Succeed),
    );
    c.outcome(
        "vmwrite-unsupported-field",
        fail_valid(E::UnsupportedVmcsComponent),
        vmx::vmwrite_encoding(0x1234, 0),
    );
    let ro = if vmwrite_any_field(caps.misc) {
        Succeed
    } else {
        fail_valid(E::VmwriteReadOnlyComponent)
    };
    c.outcome(
        "vmwrite-read-only",
        ro,
        vmx::vmwrite(VmcsField::VM_EXIT_REASON, 0),
    );
    c.outcome(
        "vmwrite-guest-rip",
        Succeed,
        vmx::vmwrite(VmcsField::GUEST_RIP, 0x1234_5678),
    );
    let rip = vmx::vmread(VmcsField::GUEST_RIP);
    c.check(
        "vmread-guest-rip",
        "0x12345678",
        ShowResult(rip),
        rip == Ok(0x1234_5678),
    );
    c.outcome(
        "vmresume-clear-vmcs",
        fail_valid(E::VmresumeNonLaunchedVmcs),
        vmx::enter(false).err().unwrap_or(Succeed),
    );

    // INVEPT / INVVPID with a type the CPU does not support (SDM 31.3).
    match caps.ept_vpid {
        Some(cap) if invept_supported(cap) => c.outcome(
            "invept-bad-type",
            fail_valid(E::InvalidInveptInvvpidOperand),
            vmx::invept(0, [0, 0]),
        ),
        _ => c.outcome(
            "invept-unsupported",
            VmxOutcome::Fault(VmxFault::InvalidOpcode),
            vmx::invept(0, [0, 0]),
        ),
    }
    match caps.ept_vpid {
        Some(cap) if invvpid_supported(cap) => c.outcome(
            "invvpid-bad-type",
            fail_valid(E::InvalidInveptInvvpidOperand),
            vmx::invvpid(4, [0, 0]),
        ),
        _ => c.outcome(
            "invvpid-unsupported",
            VmxOutcome::Fault(VmxFault::InvalidOpcode),
            vmx::invvpid(4, [0, 0]),
        ),
    }

    // A complete VMCS, then break one thing at a time.
    let spec = GuestSpec {
        entry: entry(hv::l2_halt),
        io_ports: &[],
        msrs: &[],
        exception_bitmap: 0,
        secondary: 0,
        eptp: 0,
    };
    if !load_vmcs(caps, &spec, c) {
        return;
    }
    let pin = vmx::vmread(VmcsField::PIN_BASED_VM_EXEC_CONTROL).unwrap_or(0);
    if let Some(bit) = forbidden_bit(caps.ctls[0]) {
        let _ = vmx::vmwrite(VmcsField::PIN_BASED_VM_EXEC_CONTROL, pin | (1 << bit));
        c.outcome(
            "vmlaunch-bad-control",
            fail_valid(E::EntryInvalidControlFields),
            vmx::enter(true).err().unwrap_or(Succeed),
        );
        let _ = vmx::vmwrite(VmcsField::PIN_BASED_VM_EXEC_CONTROL, pin);
    }
    let _ = vmx::vmwrite(VmcsField::HOST_CS_SELECTOR, 0x0b);
    c.outcome(
        "vmlaunch-bad-host-state",
        fail_valid(E::EntryInvalidHostStateFields),
        vmx::enter(true).err().unwrap_or(Succeed),
    );
    let _ = vmx::vmwrite(
        VmcsField::HOST_CS_SELECTOR,
        u64::from(crate::boot::KERNEL_CS),
    );

    // Guest-state failure: RFLAGS bit 1 must be 1 (SDM 27.3.1.4): a VM
    // exit with reason 33 and bit 31 set, the VMCS stays clear.
    let _ = vmx::vmwrite(VmcsField::GUEST_RFLAGS, 0);
    let got = exit_reason_after(true);
    let want = u64::from(EXIT_REASON_ENTRY_FAILURE | u32::from(reason::INVALID_GUEST_STATE));
    c.check(
        "vmlaunch-bad-guest-state",
        Hex(want),
        ShowResult(got),
        got == Ok(want),
    );
    let _ = vmx::vmwrite(VmcsField::GUEST_RFLAGS, 2);

    // A good launch, then the launch-state errors.
    let got = exit_reason_after(true);
    c.check(
        "vmlaunch-ok",
        "0xc",
        ShowResult(got),
        got == Ok(u64::from(reason::HLT)),
    );
    c.outcome(
        "vmlaunch-launched-vmcs",
        fail_valid(E::VmlaunchNonClearVmcs),
        vmx::enter(true).err().unwrap_or(Succeed),
    );
    let len = vmx::vmread(VmcsField::VM_EXIT_INSTRUCTION_LEN).unwrap_or(1);
    let rip = vmx::vmread(VmcsField::GUEST_RIP).unwrap_or(0);
    let _ = vmx::vmwrite(VmcsField::GUEST_RIP, rip + len);
    let got = exit_reason_after(false);
    c.check(
        "vmresume-launched",
        "0xc",
        ShowResult(got),
        got == Ok(u64::from(reason::HLT)),
    );

    // VMCLEAR of the current VMCS makes it not current.
    c.outcome("vmclear-current", Succeed, vmx::vmclear(a));
    c.outcome(
        "vmread-after-vmclear",
        FailInvalid,
        vmx::vmread(VmcsField::GUEST_RIP).err().unwrap_or(Succeed),
    );
    c.outcome("vmptrld-again", Succeed, vmx::vmptrld(a));
    c.outcome(
        "vmresume-after-vmclear",
        fail_valid(E::VmresumeNonLaunchedVmcs),
        vmx::enter(false).err().unwrap_or(Succeed),
    );

    // Leave VMX operation: VMX instructions other than VMXON now #UD.
    c.outcome("vmxoff", Succeed, vmx::vmxoff());
    c.outcome(
        "vmread-outside-vmx",
        VmxOutcome::Fault(VmxFault::InvalidOpcode),
        vmx::vmread(VmcsField::GUEST_RIP).err().unwrap_or(Succeed),
    );
    c.outcome(
        "vmcall-outside-vmx",
        VmxOutcome::Fault(VmxFault::InvalidOpcode),
        vmx::vmcall(),
    );
    c.outcome("vmxon-again", Succeed, vmx::vmxon(vmxon_pa));
    c.outcome("vmxoff-again", Succeed, vmx::vmxoff());
}
