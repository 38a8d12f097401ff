//! Unit tests of `nested/events.rs` with the scripted vCPU of `mod.rs`'s tests
//! (a child of that test module, so it shares its fixture). OWNER: helper
//! "events".

use super::*;
use crate::nested::events::{L1Lapic, DEFAULT_TSC_KHZ};
use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;
use vmcs12::caps::AdvertisedControls;

const BS: u64 = 1 << 14;
const IF: u64 = 1 << 9;

/// Capabilities with the features events.rs emulates.
fn caps() -> VmxCapabilities {
    let mut caps = VmxCapabilities::default();
    let c: &mut AdvertisedControls = &mut caps.controls;
    c.pin |= PinBased::PREEMPTION_TIMER;
    c.primary |= PrimaryProcBased::MONITOR_TRAP_FLAG;
    c.exit |= ExitControls::SAVE_PREEMPTION_TIMER;
    caps
}

/// `Rig::new` with [`caps`].
fn rig() -> Rig {
    let caps = caps();
    let mut rig = Rig {
        nested: Nested::new(VmxCpu::new(caps.clone()), Fake::new(VcpuState::default())),
        l1: Fake::new(l1_state()),
        mem: memory(),
        host: Host::default(),
    };
    rig.l1.state.gprs.set(0, PTRS);
    assert_eq!(
        rig.exec(&[0xf3, 0x0f, 0xc7, 0x30]),
        VmxExitOutcome::Continue
    );
    rig.l1.state.gprs.set(0, PTRS + 8);
    rig.exec(&[0x66, 0x0f, 0xc7, 0x30]);
    rig.exec(&[0x0f, 0xc7, 0x30]);
    write_vmcs(
        rig.nested.cpu.current_vmcs_mut().unwrap(),
        &mut rig.mem,
        &caps,
    );
    // nop x 8; hlt
    rig.l2_code(&[0x90, 0x90, 0x90, 0x90, 0x90, 0x90, 0x90, 0x90, 0xf4]);
    rig
}

fn or_controls(rig: &mut Rig, field: VmcsField, bits: u32) {
    let v = rig.vmcs();
    let old = v.get(field);
    v.set(field, old | u64::from(bits));
}

fn clear_controls(rig: &mut Rig, field: VmcsField, bits: u32) {
    let v = rig.vmcs();
    let old = v.get(field);
    v.set(field, old & !u64::from(bits));
}

/// One single step of L2: RIP += 1 (and `f`).
fn stepped(rig: &mut Rig, f: impl FnMut(&mut VcpuState) + 'static) {
    let mut f = f;
    rig.nested
        .l2
        .then(VmExit::Debug { pc: 0, dr6: BS }, move |s| {
            s.rip += 1;
            f(s);
        });
}

fn assert_l1_got(rig: &mut Rig, reason: u64) {
    let l1 = *rig.l1.sets.last().unwrap();
    assert_eq!(l1.rip, HOST_RIP, "L1 resumes at HOST_RIP");
    assert_eq!(rig.vmcs().get(F::VM_EXIT_REASON), reason);
}

#[test]
fn test_mtf_exits_after_each_instruction() {
    let mut rig = rig();
    or_controls(
        &mut rig,
        F::CPU_BASED_VM_EXEC_CONTROL,
        PrimaryProcBased::MONITOR_TRAP_FLAG.bits(),
    );
    for n in 1..=3 {
        stepped(&mut rig, |_| {});
        let out = if n == 1 {
            rig.vmlaunch()
        } else {
            rig.exec(&[0x0f, 0x01, 0xc3])
        };
        assert_eq!(out, VmxExitOutcome::Continue);
        assert_l1_got(&mut rig, 37);
        assert_eq!(rig.vmcs().get(F::GUEST_RIP), L2_RIP + n);
        assert_eq!(rig.vmcs().get(F::GUEST_PENDING_DBG_EXCEPTIONS), 0);
    }
    assert_eq!(rig.nested.event_stats().steps, 3);
    assert!(rig.nested.l2.completions.iter().any(|c| c == "step"));
}

#[test]
fn test_mtf_records_l2_single_step_as_pending_debug_exception() {
    let mut rig = rig();
    or_controls(
        &mut rig,
        F::CPU_BASED_VM_EXEC_CONTROL,
        PrimaryProcBased::MONITOR_TRAP_FLAG.bits(),
    );
    rig.vmcs().set(F::GUEST_RFLAGS, 0x2 | (1 << 8));
    stepped(&mut rig, |_| {});
    rig.vmlaunch();
    assert_l1_got(&mut rig, 37);
    assert_eq!(rig.vmcs().get(F::GUEST_PENDING_DBG_EXCEPTIONS), BS);
}

#[test]
fn test_without_mtf_a_single_step_is_not_claimed() {
    let mut rig = rig();
    // No MTF: nobody single-steps, a stray step exit just resumes L2.
    stepped(&mut rig, |_| {});
    rig.nested.l2.then(
        VmExit::IoOut {
            port: 0x3f8,
            size: 1,
            data: 0,
        },
        step(L2_RIP + 2, 0x3f8, 0),
    );
    rig.l2_code(&[0x90, 0xee, 0x90]);
    rig.vmlaunch();
    assert_l1_got(&mut rig, 30);
    assert_eq!(rig.nested.event_stats().steps, 0);
}

#[test]
fn test_preemption_timer_zero_exits_before_l2_runs() {
    let mut rig = rig();
    or_controls(
        &mut rig,
        F::PIN_BASED_VM_EXEC_CONTROL,
        PinBased::PREEMPTION_TIMER.bits(),
    );
    rig.vmcs().set(F::VMX_PREEMPTION_TIMER_VALUE, 0);
    assert_eq!(rig.vmlaunch(), VmxExitOutcome::Continue);
    assert_l1_got(&mut rig, 52);
    assert_eq!(rig.vmcs().get(F::GUEST_RIP), L2_RIP);
    assert_eq!(rig.nested.l2.runs, 0, "no L2 instruction ran");
}

#[test]
fn test_preemption_timer_fires_at_its_deadline_and_saves_zero() {
    let mut rig = rig();
    or_controls(
        &mut rig,
        F::PIN_BASED_VM_EXEC_CONTROL,
        PinBased::PREEMPTION_TIMER.bits(),
    );
    or_controls(
        &mut rig,
        F::VM_EXIT_CONTROLS,
        ExitControls::SAVE_PREEMPTION_TIMER.bits(),
    );
    // 2 ms at the fake's 1 GHz and rate 5.
    let ticks = (2_000_000u64 * u64::from(DEFAULT_TSC_KHZ) / 1_000_000) >> 5;
    rig.vmcs().set(F::VMX_PREEMPTION_TIMER_VALUE, ticks);
    rig.nested.l2.then(VmExit::Kicked, |s| {
        std::thread::sleep(Duration::from_millis(3));
        s.rip = L2_RIP + 4;
    });
    rig.vmlaunch();
    let kick = rig.nested.l2.kick.expect("L0 asked for a kick");
    assert!(kick <= Duration::from_millis(2), "kick after {kick:?}");
    assert_l1_got(&mut rig, 52);
    assert_eq!(rig.vmcs().get(F::GUEST_RIP), L2_RIP + 4);
    assert_eq!(rig.vmcs().get(F::VMX_PREEMPTION_TIMER_VALUE), 0);
}

#[test]
fn test_preemption_timer_saves_what_is_left_at_another_exit() {
    let mut rig = rig();
    or_controls(
        &mut rig,
        F::PIN_BASED_VM_EXEC_CONTROL,
        PinBased::PREEMPTION_TIMER.bits(),
    );
    or_controls(
        &mut rig,
        F::VM_EXIT_CONTROLS,
        ExitControls::SAVE_PREEMPTION_TIMER.bits(),
    );
    let start = 1_000_000_000u64;
    rig.vmcs().set(F::VMX_PREEMPTION_TIMER_VALUE, start);
    rig.nested.l2.then(
        VmExit::IoOut {
            port: 0x3f8,
            size: 1,
            data: 0,
        },
        |s| {
            std::thread::sleep(Duration::from_millis(1));
            step(L2_RIP + 1, 0x3f8, 0)(s);
        },
    );
    rig.l2_code(&[0xee, 0x90]);
    rig.vmlaunch();
    assert_l1_got(&mut rig, 30);
    let left = rig.vmcs().get(F::VMX_PREEMPTION_TIMER_VALUE);
    // 1 ms = 31250 ticks at 1 GHz, rate 5.
    assert!(
        left < start - 31_000 && left > start - 3_125_000,
        "left {left}"
    );
    // Without the save control the field keeps L1's value.
    clear_controls(
        &mut rig,
        F::VM_EXIT_CONTROLS,
        ExitControls::SAVE_PREEMPTION_TIMER.bits(),
    );
    rig.vmcs().set(F::VMX_PREEMPTION_TIMER_VALUE, start);
    rig.vmcs().set(F::GUEST_RIP, L2_RIP);
    rig.nested.l2.then(
        VmExit::IoOut {
            port: 0x3f8,
            size: 1,
            data: 0,
        },
        step(L2_RIP + 1, 0x3f8, 0),
    );
    rig.exec(&[0x0f, 0x01, 0xc3]);
    assert_l1_got(&mut rig, 30);
    assert_eq!(rig.vmcs().get(F::VMX_PREEMPTION_TIMER_VALUE), start);
}

#[test]
fn test_interrupt_window_open_at_entry_exits_before_l2_runs() {
    let mut rig = rig();
    or_controls(
        &mut rig,
        F::CPU_BASED_VM_EXEC_CONTROL,
        PrimaryProcBased::INTR_WINDOW_EXITING.bits(),
    );
    rig.vmcs().set(F::GUEST_RFLAGS, 0x2 | IF);
    rig.vmlaunch();
    assert_l1_got(&mut rig, 7);
    assert_eq!(rig.vmcs().get(F::GUEST_RIP), L2_RIP);
    assert_eq!(rig.nested.l2.runs, 0);
}

#[test]
fn test_interrupt_window_opens_after_the_instruction_following_sti() {
    let mut rig = rig();
    or_controls(
        &mut rig,
        F::CPU_BASED_VM_EXEC_CONTROL,
        PrimaryProcBased::INTR_WINDOW_EXITING.bits(),
    );
    // IF = 0: closed. Step 1 is STI (IF = 1, STI blocking): still closed.
    stepped(&mut rig, |_| {});
    stepped(&mut rig, |s| {
        s.rflags |= IF;
        s.interruptibility = 1;
    });
    stepped(&mut rig, |s| s.interruptibility = 0);
    rig.vmlaunch();
    assert_l1_got(&mut rig, 7);
    assert_eq!(rig.vmcs().get(F::GUEST_RIP), L2_RIP + 3);
    assert_eq!(rig.nested.event_stats().steps, 3);
}

#[test]
fn test_interrupt_window_stays_closed_with_mov_ss_blocking() {
    let mut rig = rig();
    or_controls(
        &mut rig,
        F::CPU_BASED_VM_EXEC_CONTROL,
        PrimaryProcBased::INTR_WINDOW_EXITING.bits(),
    );
    rig.vmcs().set(F::GUEST_RFLAGS, 0x2 | IF);
    rig.vmcs().set(F::GUEST_INTERRUPTIBILITY_INFO, 2);
    stepped(&mut rig, |s| s.interruptibility = 0);
    rig.vmlaunch();
    assert_l1_got(&mut rig, 7);
    assert_eq!(rig.vmcs().get(F::GUEST_RIP), L2_RIP + 1);
    assert_eq!(rig.nested.l2.runs, 1);
}

#[test]
fn test_nmi_window_needs_no_virtual_nmi_blocking() {
    let mut rig = rig();
    or_controls(
        &mut rig,
        F::PIN_BASED_VM_EXEC_CONTROL,
        (PinBased::NMI_EXITING | PinBased::VIRTUAL_NMIS).bits(),
    );
    or_controls(
        &mut rig,
        F::CPU_BASED_VM_EXEC_CONTROL,
        PrimaryProcBased::NMI_WINDOW_EXITING.bits(),
    );
    rig.vmcs().set(F::GUEST_INTERRUPTIBILITY_INFO, 8);
    // An IRET unblocks virtual NMIs.
    stepped(&mut rig, |s| s.interruptibility = 8);
    stepped(&mut rig, |s| s.interruptibility = 0);
    rig.vmlaunch();
    assert_l1_got(&mut rig, 8);
    assert_eq!(rig.vmcs().get(F::GUEST_RIP), L2_RIP + 2);
}

#[test]
fn test_stepped_hlt_is_exit_12_when_l1_intercepts_hlt() {
    for hlt_exiting in [true, false] {
        let mut rig = rig();
        or_controls(
            &mut rig,
            F::CPU_BASED_VM_EXEC_CONTROL,
            PrimaryProcBased::INTR_WINDOW_EXITING.bits(),
        );
        if !hlt_exiting {
            clear_controls(
                &mut rig,
                F::CPU_BASED_VM_EXEC_CONTROL,
                PrimaryProcBased::HLT_EXITING.bits(),
            );
            or_controls(
                &mut rig,
                F::PIN_BASED_VM_EXEC_CONTROL,
                PinBased::PREEMPTION_TIMER.bits(),
            );
            rig.vmcs().set(F::VMX_PREEMPTION_TIMER_VALUE, 1000);
        }
        rig.l2_code(&[0xf4]);
        // KVM's single-step runs over the HLT without halting.
        stepped(&mut rig, |_| {});
        let mut out = rig.vmlaunch();
        while out == VmxExitOutcome::L2Interrupted {
            out = rig
                .nested
                .continue_l2(&mut rig.l1, &mut rig.mem, &mut rig.host)
                .unwrap();
        }
        if hlt_exiting {
            assert_l1_got(&mut rig, 12);
            assert_eq!(rig.vmcs().get(F::GUEST_RIP), L2_RIP, "at the HLT");
        } else {
            // L2 halts; the timer (32 us) ends it with activity HLT.
            assert_l1_got(&mut rig, 52);
            assert_eq!(rig.vmcs().get(F::GUEST_RIP), L2_RIP + 1);
            assert_eq!(rig.vmcs().get(F::GUEST_ACTIVITY_STATE), 1);
        }
    }
}

/// A local APIC page in memory, shared with the test.
#[derive(Clone)]
struct FakeLapic(Rc<RefCell<[u8; 1024]>>);

impl L1Lapic for FakeLapic {
    fn get(&mut self) -> Result<[u8; 1024], BoxError> {
        Ok(*self.0.borrow())
    }
    fn set(&mut self, regs: &[u8; 1024]) -> Result<(), BoxError> {
        *self.0.borrow_mut() = *regs;
        Ok(())
    }
}

fn lapic_reg(l: &[u8; 1024], off: usize) -> u32 {
    u32::from_le_bytes(l[off..off + 4].try_into().unwrap())
}

/// L1's APIC enabled, its one-shot timer (vector 0x40) expired.
fn expired_timer() -> FakeLapic {
    let mut l = [0u8; 1024];
    l[0xf0..0xf4].copy_from_slice(&0x1ffu32.to_le_bytes());
    l[0x320..0x324].copy_from_slice(&0x40u32.to_le_bytes());
    l[0x380..0x384].copy_from_slice(&1000u32.to_le_bytes());
    FakeLapic(Rc::new(RefCell::new(l)))
}

#[test]
fn test_l1_timer_with_external_interrupt_exiting_and_ack() {
    let mut rig = rig();
    or_controls(
        &mut rig,
        F::VM_EXIT_CONTROLS,
        ExitControls::ACK_INTR_ON_EXIT.bits(),
    );
    let lapic = expired_timer();
    rig.nested.attach_l1_lapic(Box::new(lapic.clone()));
    rig.vmlaunch();
    assert_l1_got(&mut rig, 1);
    assert_eq!(rig.vmcs().get(F::VM_EXIT_INTR_INFO), 0x8000_0040);
    let l = *lapic.0.borrow();
    assert_eq!(lapic_reg(&l, 0x100 + 0x20), 1, "ISR bit 0x40");
    assert_eq!(lapic_reg(&l, 0x200 + 0x20), 0, "IRR bit 0x40 clear");
    assert_eq!(rig.nested.l2.runs, 0);
}

#[test]
fn test_l1_timer_with_external_interrupt_exiting_without_ack_stays_pending() {
    let mut rig = rig();
    let lapic = expired_timer();
    rig.nested.attach_l1_lapic(Box::new(lapic.clone()));
    rig.vmlaunch();
    assert_l1_got(&mut rig, 1);
    assert_eq!(rig.vmcs().get(F::VM_EXIT_INTR_INFO), 0);
    let l = *lapic.0.borrow();
    assert_eq!(lapic_reg(&l, 0x100 + 0x20), 0, "not in service");
    assert_eq!(lapic_reg(&l, 0x200 + 0x20), 1, "IRR bit 0x40 pending");
}

#[test]
fn test_l1_timer_without_external_interrupt_exiting_goes_to_l2_idt() {
    let mut rig = rig();
    clear_controls(
        &mut rig,
        F::PIN_BASED_VM_EXEC_CONTROL,
        PinBased::EXT_INTR_EXITING.bits(),
    );
    rig.vmcs().set(F::GUEST_RFLAGS, 0x2 | IF);
    let lapic = expired_timer();
    rig.nested.attach_l1_lapic(Box::new(lapic.clone()));
    rig.nested.l2.then(
        VmExit::IoOut {
            port: 0x3f8,
            size: 1,
            data: 0,
        },
        step(L2_RIP + 1, 0x3f8, 0),
    );
    rig.l2_code(&[0xee]);
    rig.vmlaunch();
    assert_l1_got(&mut rig, 30);
    let delivered = rig
        .nested
        .l2
        .sets
        .iter()
        .find_map(|s| s.pending_event)
        .expect("L2 got the interrupt");
    assert_eq!(delivered.info, 0x8000_0040);
    let l = *lapic.0.borrow();
    assert_eq!(lapic_reg(&l, 0x100 + 0x20), 1, "acknowledged in L1's APIC");
    assert_eq!(rig.nested.event_stats().delivered_in_l2, 1);
}

#[test]
fn test_l1_interrupt_waits_for_l2_window_without_exiting() {
    let mut rig = rig();
    clear_controls(
        &mut rig,
        F::PIN_BASED_VM_EXEC_CONTROL,
        PinBased::EXT_INTR_EXITING.bits(),
    );
    // IF = 0: the interrupt waits; after one step IF = 1 and it goes in.
    let lapic = expired_timer();
    rig.nested.attach_l1_lapic(Box::new(lapic.clone()));
    rig.l2_code(&[0x90, 0xee]);
    stepped(&mut rig, |s| s.rflags |= IF);
    rig.nested.l2.then(
        VmExit::IoOut {
            port: 0x3f8,
            size: 1,
            data: 0,
        },
        step(L2_RIP + 2, 0x3f8, 0),
    );
    rig.vmlaunch();
    assert_l1_got(&mut rig, 30);
    let first_event = rig
        .nested
        .l2
        .sets
        .iter()
        .position(|s| s.pending_event.is_some());
    assert!(first_event.is_some_and(|i| i > 0), "not at entry: IF was 0");
    assert_eq!(rig.nested.event_stats().delivered_in_l2, 1);
}

#[test]
fn test_l2_hlt_waits_for_the_preemption_timer_and_saves_hlt_state() {
    let mut rig = rig();
    clear_controls(
        &mut rig,
        F::CPU_BASED_VM_EXEC_CONTROL,
        PrimaryProcBased::HLT_EXITING.bits(),
    );
    or_controls(
        &mut rig,
        F::PIN_BASED_VM_EXEC_CONTROL,
        PinBased::PREEMPTION_TIMER.bits(),
    );
    // 3 ms.
    rig.vmcs()
        .set(F::VMX_PREEMPTION_TIMER_VALUE, 3_000_000 >> 5);
    rig.l2_code(&[0xf4]);
    rig.nested.l2.then(VmExit::Hlt, |s| s.rip = L2_RIP + 1);
    let t = std::time::Instant::now();
    let mut out = rig.vmlaunch();
    while out == VmxExitOutcome::L2Interrupted {
        out = rig
            .nested
            .continue_l2(&mut rig.l1, &mut rig.mem, &mut rig.host)
            .unwrap();
    }
    assert!(t.elapsed() >= Duration::from_millis(3));
    assert_eq!(rig.nested.l2.runs, 1, "L0 did not run the halted L2");
    assert_l1_got(&mut rig, 52);
    assert_eq!(rig.vmcs().get(F::GUEST_ACTIVITY_STATE), 1);
    assert_eq!(rig.vmcs().get(F::GUEST_RIP), L2_RIP + 1);
    assert!(rig.nested.event_stats().halt_waits >= 1);
}

#[test]
fn test_hlt_activity_state_at_entry_is_honoured() {
    let mut rig = rig();
    rig.vmcs().set(F::GUEST_ACTIVITY_STATE, 1);
    rig.vmcs().set(F::GUEST_RFLAGS, 0x2 | IF);
    clear_controls(
        &mut rig,
        F::PIN_BASED_VM_EXEC_CONTROL,
        PinBased::EXT_INTR_EXITING.bits(),
    );
    let lapic = expired_timer();
    rig.nested.attach_l1_lapic(Box::new(lapic));
    // The L1 interrupt wakes L2 through its IDT; then L2 runs.
    rig.l2_code(&[0xee]);
    rig.nested.l2.then(
        VmExit::IoOut {
            port: 0x3f8,
            size: 1,
            data: 0,
        },
        step(L2_RIP + 1, 0x3f8, 0),
    );
    rig.vmlaunch();
    assert_l1_got(&mut rig, 30);
    let woke = rig.nested.l2.sets.last().unwrap();
    assert_eq!(woke.activity, 0);
    assert_eq!(woke.pending_event.map(|e| e.info), Some(0x8000_0040));
}

#[test]
fn test_l2_eoi_write_ends_the_interrupt_in_l1_apic() {
    for (gpa, ends) in [(0xfee0_00b0u64, true), (0xfee0_0080, false)] {
        let mut rig = rig();
        let lapic = expired_timer();
        lapic.0.borrow_mut()[0x120] = 1; // ISR bit 0x40
        lapic.0.borrow_mut()[0x380..0x384].copy_from_slice(&[0; 4]);
        rig.nested.attach_l1_lapic(Box::new(lapic.clone()));
        rig.l2_code(&[0x90, 0xee]);
        rig.nested.l2.then(
            VmExit::MmioWrite {
                gpa,
                data: vec![0; 4],
            },
            |s| s.rip = L2_RIP + 1,
        );
        rig.nested.l2.then(
            VmExit::IoOut {
                port: 0x3f8,
                size: 1,
                data: 0,
            },
            step(L2_RIP + 2, 0x3f8, 0),
        );
        rig.vmlaunch();
        assert_l1_got(&mut rig, 30);
        let in_service = lapic_reg(&lapic.0.borrow(), 0x120) & 1 != 0;
        assert_eq!(in_service, !ends, "write to {gpa:#x}");
        assert_eq!(rig.nested.event_stats().l2_eois, u64::from(ends));
    }
}

// ---------------------------------------------------------------------------
// The same rules with L2 on /dev/kvm (REQUIRE_KVM=1 makes a missing /dev/kvm
// a failure): the L2 vCPU is real, L1 is the scripted vCPU, vmcs12 is built
// as in `Rig`.
// ---------------------------------------------------------------------------

use crate::kvm::{KvmVcpu, KvmVm};
use crate::memory::{GuestRam, RamView};
use std::sync::Arc;

struct KRig {
    nested: Nested<KvmVcpu>,
    l1: Fake,
    ram: Arc<GuestRam>,
    host: Host,
    _vm: KvmVm,
}

/// IDT vector 0x40 -> 0x5100: `pop rax; out 0x81, eax; hlt` (reports the
/// interrupted RIP on port 0x81, which L1 does not intercept).
fn krig() -> Option<KRig> {
    if !crate::test_support::kvm_or_skip() {
        return None;
    }
    let ram = kvm_l2_ram(16 << 20);
    let handler: u64 = 0x5100;
    kvm_l2_gate(&ram, 0x40, handler);
    ram.write_bytes(handler, &[0x58, 0xe7, 0x81, 0xf4]).unwrap();
    let vm = KvmVm::new_l2(ram.clone()).unwrap();
    vm.filter_all_msrs().unwrap();
    let caps = caps();
    let nested = Nested::new(VmxCpu::new(caps.clone()), vm.create_vcpu(0).unwrap());
    let mut rig = KRig {
        nested,
        l1: Fake::new(l1_state()),
        ram,
        host: Host::default(),
        _vm: vm,
    };
    rig.l1.state.gprs.set(0, PTRS);
    rig.exec(&[0xf3, 0x0f, 0xc7, 0x30]);
    rig.l1.state.gprs.set(0, PTRS + 8);
    rig.exec(&[0x66, 0x0f, 0xc7, 0x30]);
    rig.exec(&[0x0f, 0xc7, 0x30]);
    let ram = rig.ram.clone();
    write_vmcs(
        rig.nested.cpu.current_vmcs_mut().unwrap(),
        &mut RamView(&ram),
        &caps,
    );
    Some(rig)
}

impl KRig {
    /// A trapped VMX instruction of L1, followed through signals.
    fn exec(&mut self, bytes: &[u8]) -> VmxExitOutcome {
        let ram = self.ram.clone();
        let mut mem = RamView(&ram);
        let mut out = self
            .nested
            .handle_vmx_exit(&mut self.l1, bytes, &mut mem, &mut self.host)
            .unwrap();
        while out == VmxExitOutcome::L2Interrupted {
            out = self
                .nested
                .continue_l2(&mut self.l1, &mut mem, &mut self.host)
                .unwrap();
        }
        out
    }

    fn vmlaunch(&mut self) -> VmxExitOutcome {
        self.exec(&[0x0f, 0x01, 0xc2])
    }

    fn vmresume(&mut self) -> VmxExitOutcome {
        self.exec(&[0x0f, 0x01, 0xc3])
    }

    fn vmcs(&mut self) -> &mut Vmcs12 {
        self.nested.cpu.current_vmcs_mut().unwrap()
    }

    fn or(&mut self, field: VmcsField, bits: u32) {
        let old = self.vmcs().get(field);
        self.vmcs().set(field, old | u64::from(bits));
    }

    fn clear(&mut self, field: VmcsField, bits: u32) {
        let old = self.vmcs().get(field);
        self.vmcs().set(field, old & !u64::from(bits));
    }

    fn code(&self, bytes: &[u8]) {
        self.ram.write_bytes(L2_RIP, bytes).unwrap();
    }

    fn exit(&mut self) -> (u64, u64) {
        let l1 = *self.l1.sets.last().unwrap();
        assert_eq!(l1.rip, HOST_RIP, "L1 resumes at HOST_RIP");
        let v = self.vmcs();
        (v.get(F::VM_EXIT_REASON), v.get(F::GUEST_RIP))
    }
}

#[test]
fn test_kvm_mtf_counts_each_instruction() {
    let Some(mut rig) = krig() else { return };
    // mov eax, 1; nop; inc eax; jmp $
    rig.code(&[0xb8, 0x01, 0x00, 0x00, 0x00, 0x90, 0xff, 0xc0, 0xeb, 0xfe]);
    rig.or(
        F::CPU_BASED_VM_EXEC_CONTROL,
        PrimaryProcBased::MONITOR_TRAP_FLAG.bits(),
    );
    let mut rips = Vec::new();
    rig.vmlaunch();
    for _ in 0..4 {
        let (reason, rip) = rig.exit();
        assert_eq!(reason, 37);
        rips.push(rip - L2_RIP);
        rig.vmresume();
    }
    assert_eq!(
        rips,
        vec![5, 6, 8, 8],
        "one exit per instruction, RIP after it"
    );
    let l1 = *rig.l1.sets.last().unwrap();
    assert_eq!(l1.gprs.get(0), 2, "L2 really ran: EAX");
    // Off again: L2 runs freely to the next intercepted instruction.
    rig.clear(
        F::CPU_BASED_VM_EXEC_CONTROL,
        PrimaryProcBased::MONITOR_TRAP_FLAG.bits(),
    );
    rig.code(&[0x66, 0xba, 0xf8, 0x03, 0xee]);
    rig.vmcs().set(F::GUEST_RIP, L2_RIP);
    let steps = rig.nested.event_stats().steps;
    rig.vmresume();
    assert_eq!(rig.exit(), (30, L2_RIP + 4));
    assert_eq!(rig.nested.event_stats().steps, steps);
}

#[test]
fn test_kvm_mtf_follows_an_instruction_l0_completes() {
    let Some(mut rig) = krig() else { return };
    // out 0xe9, al (L0 prints it: L1 does not intercept 0xe9); nop; jmp $
    rig.code(&[0xe6, 0xe9, 0x90, 0xeb, 0xfe]);
    rig.or(
        F::CPU_BASED_VM_EXEC_CONTROL,
        PrimaryProcBased::MONITOR_TRAP_FLAG.bits(),
    );
    rig.vmlaunch();
    assert_eq!(rig.exit(), (37, L2_RIP + 2));
    assert_eq!(rig.host.out.len(), 1);
    rig.vmresume();
    assert_eq!(rig.exit(), (37, L2_RIP + 3));
}

#[test]
fn test_kvm_interrupt_window_opens_right_after_sti() {
    let Some(mut rig) = krig() else { return };
    // nop; sti; nop; nop; jmp $ with IF = 0: the window opens at the
    // boundary after the instruction that follows STI (STI blocking).
    rig.code(&[0x90, 0xfb, 0x90, 0x90, 0xeb, 0xfe]);
    rig.or(
        F::CPU_BASED_VM_EXEC_CONTROL,
        PrimaryProcBased::INTR_WINDOW_EXITING.bits(),
    );
    rig.vmlaunch();
    assert_eq!(rig.exit(), (7, L2_RIP + 3));
    assert_eq!(rig.vmcs().get(F::GUEST_INTERRUPTIBILITY_INFO), 0);
    assert_eq!(rig.vmcs().get(F::GUEST_RFLAGS) & IF, IF);
    // Resumed with the window still open: exit 7 before any instruction.
    rig.vmresume();
    assert_eq!(rig.exit(), (7, L2_RIP + 3));
}

#[test]
fn test_kvm_interrupt_window_after_an_instruction_l0_completes() {
    let Some(mut rig) = krig() else { return };
    // sti; out 0xe9, al (L0's port); nop; jmp $: open after the OUT.
    rig.code(&[0xfb, 0xe6, 0xe9, 0x90, 0xeb, 0xfe]);
    rig.or(
        F::CPU_BASED_VM_EXEC_CONTROL,
        PrimaryProcBased::INTR_WINDOW_EXITING.bits(),
    );
    rig.vmlaunch();
    assert_eq!(rig.exit(), (7, L2_RIP + 3));
    assert_eq!(rig.host.out.len(), 1);
}

fn timer_ticks(rig: &mut KRig, d: Duration) -> u64 {
    let khz = rig.nested.l2.tsc_khz().unwrap().unwrap_or(DEFAULT_TSC_KHZ);
    let rate = rig.nested.cpu.caps().preemption_timer_rate;
    (d.as_nanos() as u64 * u64::from(khz) / 1_000_000) >> rate
}

#[test]
fn test_kvm_preemption_timer_fires_and_saves_its_remainder() {
    let Some(mut rig) = krig() else { return };
    rig.code(&[0xeb, 0xfe]);
    rig.or(
        F::PIN_BASED_VM_EXEC_CONTROL,
        PinBased::PREEMPTION_TIMER.bits(),
    );
    rig.or(
        F::VM_EXIT_CONTROLS,
        ExitControls::SAVE_PREEMPTION_TIMER.bits(),
    );
    let ticks = timer_ticks(&mut rig, Duration::from_millis(5));
    rig.vmcs().set(F::VMX_PREEMPTION_TIMER_VALUE, ticks);
    let t = std::time::Instant::now();
    rig.vmlaunch();
    let took = t.elapsed();
    assert_eq!(rig.exit(), (52, L2_RIP));
    assert_eq!(rig.vmcs().get(F::VMX_PREEMPTION_TIMER_VALUE), 0);
    assert!(
        took >= Duration::from_millis(5) && took < Duration::from_millis(500),
        "fired after {took:?}"
    );
    // A long timer and an OUT: the remainder is saved.
    rig.code(&[0x66, 0xba, 0xf8, 0x03, 0xee]);
    rig.vmcs().set(F::GUEST_RIP, L2_RIP);
    let long = timer_ticks(&mut rig, Duration::from_secs(10));
    rig.vmcs().set(F::VMX_PREEMPTION_TIMER_VALUE, long);
    rig.vmresume();
    assert_eq!(rig.exit(), (30, L2_RIP + 4));
    let left = rig.vmcs().get(F::VMX_PREEMPTION_TIMER_VALUE);
    let second = timer_ticks(&mut rig, Duration::from_millis(1000));
    assert!(left < long && left > long - second, "left {left} of {long}");
}

/// L1's VM (split irqchip) with its LAPIC timer armed: one-shot, vector
/// 0x40, `ns` nanoseconds (divide by 1, KVM's 1 GHz APIC bus).
fn l1_with_timer(ns: u32) -> (KvmVm, KvmVcpu) {
    let ram = Arc::new(GuestRam::new(4 << 20).unwrap());
    let vm = KvmVm::new_l1(ram, &caps()).unwrap();
    let mut v = vm.create_vcpu(0).unwrap();
    let mut l = v.get_lapic().unwrap();
    let mut put = |off: usize, val: u32| {
        for (i, b) in val.to_le_bytes().iter().enumerate() {
            l.regs[off + i] = *b as _;
        }
    };
    put(0xf0, 0x1ff);
    put(0x320, 0x40);
    put(0x3e0, 0xb);
    put(0x380, ns);
    // KVM_SET_LAPIC restarts the timer from TMCCT (0 would fire at once).
    put(0x390, ns);
    v.set_lapic(&l).unwrap();
    (vm, v)
}

fn l1_bit(v: &mut KvmVcpu, base: usize, vector: usize) -> bool {
    let l = v.get_lapic().unwrap();
    crate::kvm::lapic_reg(&l, base + 0x10 * (vector / 32)) & (1 << (vector % 32)) != 0
}

#[test]
fn test_kvm_l1_timer_exits_with_ack_while_l2_runs() {
    let Some(mut rig) = krig() else { return };
    rig.code(&[0xeb, 0xfe]);
    rig.or(F::VM_EXIT_CONTROLS, ExitControls::ACK_INTR_ON_EXIT.bits());
    let (_vm, mut l1) = l1_with_timer(3_000_000);
    rig.nested
        .attach_l1_lapic(Box::new(l1.lapic_handle().unwrap()));
    let t = std::time::Instant::now();
    rig.vmlaunch();
    let took = t.elapsed();
    assert_eq!(rig.exit(), (1, L2_RIP));
    assert_eq!(rig.vmcs().get(F::VM_EXIT_INTR_INFO), 0x8000_0040);
    assert!(took >= Duration::from_millis(3), "after {took:?}");
    assert!(l1_bit(&mut l1, 0x100, 0x40), "in service in L1's APIC");
    assert!(!l1_bit(&mut l1, 0x200, 0x40), "no longer requested");
}

#[test]
fn test_kvm_l1_timer_exits_without_ack_and_stays_pending() {
    let Some(mut rig) = krig() else { return };
    rig.code(&[0xeb, 0xfe]);
    let (_vm, mut l1) = l1_with_timer(2_000_000);
    rig.nested
        .attach_l1_lapic(Box::new(l1.lapic_handle().unwrap()));
    rig.vmlaunch();
    assert_eq!(rig.exit(), (1, L2_RIP));
    assert_eq!(rig.vmcs().get(F::VM_EXIT_INTR_INFO), 0);
    assert!(l1_bit(&mut l1, 0x200, 0x40), "pending for L1");
    assert!(!l1_bit(&mut l1, 0x100, 0x40));
}

#[test]
fn test_kvm_l1_timer_without_exiting_reaches_l2_idt() {
    let Some(mut rig) = krig() else { return };
    rig.code(&[0x90, 0xeb, 0xfe]);
    rig.clear(
        F::PIN_BASED_VM_EXEC_CONTROL,
        PinBased::EXT_INTR_EXITING.bits(),
    );
    rig.vmcs().set(F::GUEST_RFLAGS, 0x2 | IF);
    let (_vm, mut l1) = l1_with_timer(2_000_000);
    rig.nested
        .attach_l1_lapic(Box::new(l1.lapic_handle().unwrap()));
    rig.vmlaunch();
    // The handler reported the interrupted RIP (the jmp $) and halted:
    // HLT exiting reflects it.
    assert_eq!(rig.exit().0, 12);
    assert_eq!(rig.host.out, vec![(0x81, (L2_RIP + 1) as u32)]);
    assert!(l1_bit(&mut l1, 0x100, 0x40), "acknowledged in L1's APIC");
    assert_eq!(rig.nested.event_stats().delivered_in_l2, 1);
}
