//! Per-vCPU CPUID: what KVM supports, with this vCPU's APIC ID and the
//! hypervisor bit.

use kvm_bindings::CpuId;

/// CPUID for vCPU `index` of `count`, derived from KVM_GET_SUPPORTED_CPUID.
pub fn for_vcpu(supported: &CpuId, index: u32, count: u32) -> CpuId {
    let mut cpuid = supported.clone();
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                // Initial APIC ID and logical processor count.
                e.ebx = (e.ebx & 0x0000_ffff) | (index << 24) | ((count.min(255)) << 16);
                e.ecx |= 1 << 31; // running under a hypervisor
            }
            0xb | 0x1f => e.edx = index, // x2APIC ID
            _ => {}
        }
    }
    cpuid
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    #[test]
    fn apic_id_and_hypervisor_bit() {
        let entries = [
            kvm_cpuid_entry2 { function: 1, ebx: 0xdead_0800, ..Default::default() },
            kvm_cpuid_entry2 { function: 0xb, edx: 7, ..Default::default() },
        ];
        let c = for_vcpu(&CpuId::from_entries(&entries).unwrap(), 3, 4);
        let s = c.as_slice();
        assert_eq!(s[0].ebx >> 24, 3);
        assert_eq!((s[0].ebx >> 16) & 0xff, 4);
        assert_eq!(s[0].ebx & 0xffff, 0x0800);
        assert_ne!(s[0].ecx & (1 << 31), 0);
        assert_eq!(s[1].edx, 3);
    }
}
