//! Per-vCPU CPUID: what KVM supports, with this vCPU's APIC ID, the
//! hypervisor bit and a topology of `count` single-threaded cores in one
//! package (leaves 1, 4, 0xB and 0x1F), as Firecracker and Cloud Hypervisor
//! present it.

use kvm_bindings::CpuId;

/// CPUID for vCPU `index` of `count`, derived from KVM_GET_SUPPORTED_CPUID.
pub fn for_vcpu(supported: &CpuId, index: u32, count: u32) -> CpuId {
    let mut cpuid = supported.clone();
    // Bits of the APIC ID that number the cores.
    let core_bits = 32 - (count.max(1) - 1).leading_zeros();
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                // Initial APIC ID and logical processor count.
                e.ebx = (e.ebx & 0x0000_ffff) | (index << 24) | ((count.min(255)) << 16);
                e.ecx |= 1 << 31; // running under a hypervisor
                if count > 1 {
                    e.edx |= 1 << 28; // HTT: the package has several logical processors
                } else {
                    e.edx &= !(1 << 28);
                }
            }
            4 => {
                // EAX[31:26]: cores per package - 1; EAX[25:14]: threads sharing this cache - 1.
                let cache_level = (e.eax >> 5) & 7;
                let sharing = if cache_level >= 3 { count.min(4096) - 1 } else { 0 };
                e.eax = (e.eax & 0x3fff) | (sharing << 14) | ((count.min(64) - 1) << 26);
            }
            0xb | 0x1f => {
                // Level 0: SMT (one thread per core); level 1: cores; then invalid.
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = 1 << 8;
                    }
                    1 => {
                        e.eax = core_bits;
                        e.ebx = count;
                        e.ecx = (2 << 8) | 1;
                    }
                    n => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = n;
                    }
                }
                e.edx = index; // x2APIC ID
            }
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
            kvm_cpuid_entry2 { function: 0xb, index: 0, edx: 7, ..Default::default() },
            kvm_cpuid_entry2 { function: 0xb, index: 1, eax: 9, ebx: 99, ..Default::default() },
            kvm_cpuid_entry2 { function: 4, eax: (3 << 5) | 0x1f, ..Default::default() },
        ];
        let c = for_vcpu(&CpuId::from_entries(&entries).unwrap(), 3, 4);
        let s = c.as_slice();
        assert_eq!(s[0].ebx >> 24, 3);
        assert_eq!((s[0].ebx >> 16) & 0xff, 4);
        assert_eq!(s[0].ebx & 0xffff, 0x0800);
        assert_ne!(s[0].ecx & (1 << 31), 0);
        assert_ne!(s[0].edx & (1 << 28), 0, "HTT with several vCPUs");
        assert_eq!((s[1].edx, s[1].ebx, s[1].ecx >> 8), (3, 1, 1), "SMT level: one thread");
        assert_eq!((s[2].eax, s[2].ebx, s[2].ecx >> 8), (2, 4, 2), "core level: 4 cores, 2 APIC-ID bits");
        assert_eq!(s[3].eax >> 26, 3, "leaf 4: 4 cores per package");
        assert_eq!(s[3].eax & 0x3fff, (3 << 5) | 0x1f, "cache description kept");
        let one = for_vcpu(&CpuId::from_entries(&entries).unwrap(), 0, 1);
        assert_eq!(one.as_slice()[0].edx & (1 << 28), 0);
        assert_eq!(one.as_slice()[2].eax, 0);
    }
}
