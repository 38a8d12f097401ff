//! KVM facts the nesting of time and interrupts relies on
//! (`l0-vmm/src/nested/events.rs`, docs/platform.md "Time and interrupts in
//! nesting"). The nesting rules themselves are tested next to the code
//! (`nested::tests::events`, with L2 on /dev/kvm); these pin down the host
//! behaviour they are built on. `REQUIRE_KVM=1` makes a missing /dev/kvm a
//! failure.

use l0_vmm::hv::{Vcpu, VmExit};
use l0_vmm::kvm::{lapic_reg, KvmVcpu, KvmVm};
use l0_vmm::memory::GuestRam;
use std::sync::Arc;
use std::time::Duration;

const LVTT: usize = 0x320;
const TMICT: usize = 0x380;
const TMCCT: usize = 0x390;
/// IRR word holding vector 0x40.
const IRR_40: usize = 0x200 + 0x20;

fn put(l: &mut [i8; 1024], off: usize, val: u32) {
    for (i, b) in val.to_le_bytes().iter().enumerate() {
        l[off + i] = *b as i8;
    }
}

/// An L1-style VM (split irqchip) in real mode at 0x1000: enables x2APIC,
/// STI, counts down ECX = 0x200000, then `out 0x91, al; jmp $`. IVT vector
/// 0x40 -> 0x2000: `out 0x90, al`, x2APIC EOI (WRMSR 0x80b), IRET. Its
/// LAPIC timer is armed one-shot, vector 0x40, 1 ms.
fn l1_vm() -> (KvmVm, KvmVcpu) {
    let ram = Arc::new(GuestRam::new(4 << 20).unwrap());
    ram.write_bytes(0x40 * 4, &[0x00, 0x20, 0x00, 0x00])
        .unwrap();
    let handler = [
        0xe6, 0x90, 0x66, 0xb9, 0x0b, 0x08, 0, 0, 0x66, 0x31, 0xc0, 0x66, 0x31, 0xd2, 0x0f, 0x30,
        0xcf,
    ];
    ram.write_bytes(0x2000, &handler).unwrap();
    let main = [
        0x66, 0xb9, 0x1b, 0, 0, 0, 0x0f, 0x32, 0x0d, 0x00, 0x0c, 0x0f, 0x30, 0xfb, 0x66, 0xb9, 0,
        0, 0x20, 0, 0x67, 0xe2, 0xfd, 0xe6, 0x91, 0xeb, 0xfe,
    ];
    ram.write_bytes(0x1000, &main).unwrap();
    let vm = KvmVm::new_l1(ram, &vmcs12::VmxCapabilities::default()).unwrap();
    let mut v = vm.create_vcpu(0).unwrap();
    let mut s = v.get_state().unwrap();
    s.cs.base = 0;
    s.cs.selector = 0;
    s.rip = 0x1000;
    s.rflags = 2;
    v.set_state(&s).unwrap();
    let mut l = v.get_lapic().unwrap();
    put(&mut l.regs, 0xf0, 0x1ff);
    put(&mut l.regs, LVTT, 0x40);
    put(&mut l.regs, 0x3e0, 0xb);
    put(&mut l.regs, TMICT, 1_000_000);
    // KVM_SET_LAPIC restarts the timer from TMCCT.
    put(&mut l.regs, TMCCT, 1_000_000);
    v.set_lapic(&l).unwrap();
    (vm, v)
}

/// Runs the guest to its `out 0x91`; the number of timer interrupts taken.
fn interrupts_taken(v: &mut KvmVcpu) -> usize {
    let mut n = 0;
    for _ in 0..100 {
        match v.run().unwrap() {
            VmExit::IoOut { port: 0x90, .. } => n += 1,
            VmExit::IoOut { port: 0x91, .. } => return n,
            other => panic!("unexpected {other:?}"),
        }
    }
    panic!("the guest did not finish");
}

/// An expired timer stays outside IRR while the vCPU is out of KVM_RUN
/// (so L0 detects it as one-shot with TMCCT = 0), and the guest takes it
/// exactly once when it runs.
#[test]
fn test_kvm_expired_lapic_timer_is_not_in_irr_until_the_vcpu_runs() {
    if !l0_vmm::test_support::kvm_or_skip() {
        return;
    }
    let (_vm, mut v) = l1_vm();
    std::thread::sleep(Duration::from_millis(3));
    let l = v.get_lapic().unwrap();
    assert_eq!(lapic_reg(&l, TMCCT), 0, "expired");
    assert_ne!(lapic_reg(&l, TMICT), 0);
    assert_eq!(lapic_reg(&l, IRR_40) & 1, 0, "not in IRR yet");
    assert_eq!(interrupts_taken(&mut v), 1);
}

/// L0 folds an expired timer into IRR with TMICT = TMCCT = 0
/// (`events::fold_expired_timer`): KVM_SET_LAPIC drops KVM's own pending
/// count, so the guest still takes the interrupt exactly once (after an
/// EOI a duplicate would be delivered).
#[test]
fn test_kvm_set_lapic_replaces_the_pending_timer_count() {
    if !l0_vmm::test_support::kvm_or_skip() {
        return;
    }
    let (_vm, mut v) = l1_vm();
    std::thread::sleep(Duration::from_millis(3));
    let mut l = v.get_lapic().unwrap();
    put(&mut l.regs, IRR_40, 1);
    put(&mut l.regs, TMICT, 0);
    put(&mut l.regs, TMCCT, 0);
    v.set_lapic(&l).unwrap();
    assert_eq!(interrupts_taken(&mut v), 1);
}

/// The TSC rate L0 uses for the VMX-preemption timer.
#[test]
fn test_kvm_reports_the_tsc_rate() {
    if !l0_vmm::test_support::kvm_or_skip() {
        return;
    }
    let (_vm, mut v) = l1_vm();
    let khz = v.tsc_khz().unwrap().expect("KVM_GET_TSC_KHZ answers");
    assert!(khz > 100_000, "{khz} kHz");
}
