//! Complete KVM state of vCPUs and of the VM, captured from a paused VM and
//! restored into a fresh one (snapshots, migration, streaming).
//!
//! vCPU: mp_state, regs, sregs, xsave, xcrs, debug registers, LAPIC, every
//! MSR from KVM_GET_MSR_INDEX_LIST that KVM lets us read, vcpu events, TSC
//! frequency and CPUID. VM: the irqchip (both PICs and the IOAPIC), the PIT
//! and kvmclock. The structures serialise with serde (kvm-bindings' `serde`
//! feature); framing, versioning and checksums belong to the snapshot format.

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

/// MSR_IA32_TSC_DEADLINE must be restored after the TSC it is relative to.
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
/// MSR_IA32_TSC.
const MSR_IA32_TSC: u32 = 0x10;

#[derive(Debug, thiserror::Error)]
#[error("{what} failed: {source}")]
pub struct StateError {
    pub what: &'static str,
    #[source]
    pub source: kvm_ioctls::Error,
}

fn e(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> StateError {
    move |source| StateError { what, source }
}

/// The MSRs worth saving on this host: KVM_GET_MSR_INDEX_LIST minus those
/// KVM refuses to read on `vcpu` (KVM_GET_MSRS stops at the first failure and
/// reports how many it read, so the failing one is skipped and the rest retried).
pub fn readable_msrs(kvm: &Kvm, vcpu: &VcpuFd) -> Result<Vec<u32>, StateError> {
    let list = kvm.get_msr_index_list().map_err(e("KVM_GET_MSR_INDEX_LIST"))?;
    let all: Vec<u32> = list.as_slice().to_vec();
    let mut ok = Vec::with_capacity(all.len());
    let mut rest: &[u32] = &all;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(256)];
        let entries: Vec<kvm_msr_entry> =
            chunk.iter().map(|&index| kvm_msr_entry { index, ..Default::default() }).collect();
        let mut msrs = Msrs::from_entries(&entries).expect("at most 256 MSR entries");
        let n = vcpu.get_msrs(&mut msrs).map_err(e("KVM_GET_MSRS"))?;
        ok.extend_from_slice(&chunk[..n]);
        // Skip the MSR that failed (if any) and continue after it.
        let consumed = if n < chunk.len() { n + 1 } else { n };
        rest = &rest[consumed..];
    }
    // TSC first, TSC deadline last.
    ok.sort_by_key(|&i| match i {
        MSR_IA32_TSC => 0,
        MSR_IA32_TSC_DEADLINE => 2,
        _ => 1,
    });
    Ok(ok)
}

/// A TSC-deadline timer that fired while the VM was being paused can leave
/// `MSR_IA32_TSC_DEADLINE` at 0 with its interrupt not yet delivered: the
/// restored guest would never get another timer interrupt on that vCPU
/// (Firecracker PR #4618). A deadline of "now" (the saved TSC) instead fires
/// once right after the restore, and the guest re-arms its timer. (Restored
/// after MSR_IA32_TSC: [`readable_msrs`] orders them so.)
fn fix_zero_tsc_deadline(msrs: &mut [kvm_msr_entry]) {
    let tsc = msrs.iter().find(|m| m.index == MSR_IA32_TSC).map(|m| m.data);
    if let (Some(tsc), Some(deadline)) = (tsc, msrs.iter_mut().find(|m| m.index == MSR_IA32_TSC_DEADLINE)) {
        if deadline.data == 0 {
            deadline.data = tsc;
        }
    }
}

/// Everything KVM holds for one vCPU.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    pub id: u32,
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub debug_regs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub msrs: Vec<kvm_msr_entry>,
    pub vcpu_events: kvm_vcpu_events,
    /// TSC frequency in kHz, if KVM reports it.
    pub tsc_khz: Option<u32>,
}

impl VcpuState {
    /// Captures a vCPU's state. The vCPU must not be running.
    pub fn capture(id: u32, vcpu: &VcpuFd, msr_indices: &[u32]) -> Result<Self, StateError> {
        let cpuid = vcpu.get_cpuid2(KVM_MAX_CPUID_ENTRIES).map_err(e("KVM_GET_CPUID2"))?;
        let mp_state = vcpu.get_mp_state().map_err(e("KVM_GET_MP_STATE"))?;
        let regs = vcpu.get_regs().map_err(e("KVM_GET_REGS"))?;
        let sregs = vcpu.get_sregs().map_err(e("KVM_GET_SREGS"))?;
        let xsave = vcpu.get_xsave().map_err(e("KVM_GET_XSAVE"))?;
        let xcrs = vcpu.get_xcrs().map_err(e("KVM_GET_XCRS"))?;
        let debug_regs = vcpu.get_debug_regs().map_err(e("KVM_GET_DEBUGREGS"))?;
        let lapic = vcpu.get_lapic().map_err(e("KVM_GET_LAPIC"))?;
        let mut msrs = Vec::with_capacity(msr_indices.len());
        for chunk in msr_indices.chunks(256) {
            let entries: Vec<kvm_msr_entry> =
                chunk.iter().map(|&index| kvm_msr_entry { index, ..Default::default() }).collect();
            let mut m = Msrs::from_entries(&entries).expect("at most 256 MSR entries");
            let n = vcpu.get_msrs(&mut m).map_err(e("KVM_GET_MSRS"))?;
            if n != chunk.len() {
                return Err(StateError {
                    what: "KVM_GET_MSRS (short read)",
                    source: kvm_ioctls::Error::new(libc::EIO),
                });
            }
            msrs.extend_from_slice(m.as_slice());
        }
        fix_zero_tsc_deadline(&mut msrs);
        let vcpu_events = vcpu.get_vcpu_events().map_err(e("KVM_GET_VCPU_EVENTS"))?;
        let tsc_khz = vcpu.get_tsc_khz().ok();
        Ok(Self {
            id,
            cpuid: cpuid.as_slice().to_vec(),
            mp_state,
            regs,
            sregs,
            xsave,
            xcrs,
            debug_regs,
            lapic,
            msrs,
            vcpu_events,
            tsc_khz,
        })
    }

    /// Restores the state into a freshly created vCPU, in the order KVM needs
    /// (CPUID before anything that depends on it, MSRs after LAPIC, events last).
    pub fn restore(&self, vcpu: &VcpuFd) -> Result<(), StateError> {
        if let Some(khz) = self.tsc_khz {
            if vcpu.get_tsc_khz().ok() != Some(khz) {
                vcpu.set_tsc_khz(khz).map_err(e("KVM_SET_TSC_KHZ"))?;
            }
        }
        let cpuid = CpuId::from_entries(&self.cpuid)
            .map_err(|_| StateError { what: "CPUID entries", source: kvm_ioctls::Error::new(libc::E2BIG) })?;
        vcpu.set_cpuid2(&cpuid).map_err(e("KVM_SET_CPUID2"))?;
        vcpu.set_mp_state(self.mp_state).map_err(e("KVM_SET_MP_STATE"))?;
        vcpu.set_regs(&self.regs).map_err(e("KVM_SET_REGS"))?;
        vcpu.set_sregs(&self.sregs).map_err(e("KVM_SET_SREGS"))?;
        // SAFETY: the kvm_xsave buffer was produced by KVM_GET_XSAVE on a vCPU
        // of the same kind; KVM validates its contents.
        unsafe { vcpu.set_xsave(&self.xsave) }.map_err(e("KVM_SET_XSAVE"))?;
        vcpu.set_xcrs(&self.xcrs).map_err(e("KVM_SET_XCRS"))?;
        vcpu.set_debug_regs(&self.debug_regs).map_err(e("KVM_SET_DEBUGREGS"))?;
        vcpu.set_lapic(&self.lapic).map_err(e("KVM_SET_LAPIC"))?;
        for chunk in self.msrs.chunks(256) {
            let m = Msrs::from_entries(chunk).expect("at most 256 MSR entries");
            let n = vcpu.set_msrs(&m).map_err(e("KVM_SET_MSRS"))?;
            if n != chunk.len() {
                return Err(StateError {
                    what: "KVM_SET_MSRS (MSR refused)",
                    source: kvm_ioctls::Error::new(libc::EINVAL),
                });
            }
        }
        vcpu.set_vcpu_events(&self.vcpu_events).map_err(e("KVM_SET_VCPU_EVENTS"))?;
        Ok(())
    }
}

/// VM-wide KVM state: interrupt controllers, PIT and kvmclock.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

fn get_chip(vm: &VmFd, id: u32) -> Result<kvm_irqchip, StateError> {
    let mut c = kvm_irqchip { chip_id: id, ..Default::default() };
    vm.get_irqchip(&mut c).map_err(e("KVM_GET_IRQCHIP"))?;
    Ok(c)
}

impl VmState {
    pub fn capture(vm: &VmFd) -> Result<Self, StateError> {
        let mut clock = vm.get_clock().map_err(e("KVM_GET_CLOCK"))?;
        // Only the clock value is meaningful on restore.
        clock.flags = 0;
        Ok(Self {
            pic_master: get_chip(vm, KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: get_chip(vm, KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: get_chip(vm, KVM_IRQCHIP_IOAPIC)?,
            pit: vm.get_pit2().map_err(e("KVM_GET_PIT2"))?,
            clock,
        })
    }

    /// Restores into a VM that already has its irqchip and PIT created.
    pub fn restore(&self, vm: &VmFd) -> Result<(), StateError> {
        vm.set_irqchip(&self.pic_master).map_err(e("KVM_SET_IRQCHIP (PIC master)"))?;
        vm.set_irqchip(&self.pic_slave).map_err(e("KVM_SET_IRQCHIP (PIC slave)"))?;
        vm.set_irqchip(&self.ioapic).map_err(e("KVM_SET_IRQCHIP (IOAPIC)"))?;
        vm.set_pit2(&self.pit).map_err(e("KVM_SET_PIT2"))?;
        vm.set_clock(&self.clock).map_err(e("KVM_SET_CLOCK"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_zero_tsc_deadline_becomes_the_saved_tsc() {
        let m = |index, data| kvm_msr_entry { index, data, ..Default::default() };
        let mut msrs = vec![m(MSR_IA32_TSC, 12345), m(0xc000_0080, 0xd01), m(MSR_IA32_TSC_DEADLINE, 0)];
        fix_zero_tsc_deadline(&mut msrs);
        assert_eq!(msrs[2].data, 12345);
        assert_eq!(msrs[1].data, 0xd01);
        // An armed deadline stays as it is.
        let mut armed = vec![m(MSR_IA32_TSC, 12345), m(MSR_IA32_TSC_DEADLINE, 99999)];
        fix_zero_tsc_deadline(&mut armed);
        assert_eq!(armed[1].data, 99999);
    }
    use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};

    fn new_vm(kvm: &Kvm) -> (VmFd, VcpuFd) {
        let vm = kvm.create_vm().unwrap();
        vm.create_irq_chip().unwrap();
        vm.create_pit2(kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() }).unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        let cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
        vcpu.set_cpuid2(&cpuid).unwrap();
        (vm, vcpu)
    }

    /// Capture from one real KVM VM, restore into another, capture again:
    /// the two captures agree.
    #[test]
    fn vcpu_and_vm_state_round_trip_through_kvm() {
        let kvm = Kvm::new().unwrap();
        let (vm_a, vcpu_a) = new_vm(&kvm);
        let mut regs = vcpu_a.get_regs().unwrap();
        regs.rax = 0x1234_5678;
        regs.rip = 0xfff0;
        regs.rflags = 0x3002;
        vcpu_a.set_regs(&regs).unwrap();
        let mut sregs = vcpu_a.get_sregs().unwrap();
        sregs.cr4 |= 1 << 9; // OSFXSR
        vcpu_a.set_sregs(&sregs).unwrap();
        let msrs = readable_msrs(&kvm, &vcpu_a).unwrap();
        assert!(!msrs.is_empty());
        let a = VcpuState::capture(0, &vcpu_a, &msrs).unwrap();
        let vm_state = VmState::capture(&vm_a).unwrap();

        // Through serde, as a snapshot would.
        let json = serde_json::to_vec(&(&a, &vm_state)).unwrap();
        let (a2, vm_state2): (VcpuState, VmState) = serde_json::from_slice(&json).unwrap();

        let (vm_b, vcpu_b) = new_vm(&kvm);
        vm_state2.restore(&vm_b).unwrap();
        a2.restore(&vcpu_b).unwrap();
        let b = VcpuState::capture(0, &vcpu_b, &msrs).unwrap();
        assert_eq!(b.regs.rax, 0x1234_5678);
        assert_eq!(b.regs.rip, 0xfff0);
        assert_eq!(b.sregs.cr4, a.sregs.cr4);
        assert_eq!(b.sregs.cs.selector, a.sregs.cs.selector);
        assert_eq!(b.lapic.regs, a.lapic.regs);
        assert_eq!(b.xcrs.xcrs[0].value, a.xcrs.xcrs[0].value);
        assert_eq!(b.msrs.len(), a.msrs.len());
        let vm_b_state = VmState::capture(&vm_b).unwrap();
        assert_eq!(vm_b_state.ioapic.chip_id, KVM_IRQCHIP_IOAPIC);
        // SAFETY: reading the IOAPIC member of the irqchip union that KVM filled.
        let (ra, rb) = unsafe { (vm_state.ioapic.chip.ioapic.redirtbl, vm_b_state.ioapic.chip.ioapic.redirtbl) };
        for (x, y) in ra.iter().zip(rb.iter()) {
            // SAFETY: the redirection entries are plain u64 bit-fields.
            assert_eq!(unsafe { x.bits }, unsafe { y.bits });
        }
    }
}
