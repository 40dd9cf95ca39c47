//! The built-in testbed guest: embedded image, boot setup and statistics.

use serde_json::{json, Value};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use testbed_abi::{BootInfo, Phase, Stats, VirtioMmioDevice, WorkloadSpec, BOOT_INFO_GPA, PAGE_SIZE, STATS_GPA};

use crate::memory::GuestMem;

/// The testbed guest ELF, built from `testbed-guest/` by `build.rs`.
pub static GUEST_ELF: &[u8] = include_bytes!(env!("TESTBED_GUEST_ELF"));

/// Loads the testbed guest, its page tables, GDT and boot info; returns the
/// entry point.
pub fn load(
    mem: &GuestMem,
    spec: &str,
    vcpus: u32,
    tsc_khz: u64,
    virtio: &[VirtioMmioDevice],
) -> Result<u64, Box<dyn std::error::Error>> {
    let image = crate::arch::load_elf(mem, GUEST_ELF)?;
    let ram_end = mem.iter().map(|r| r.last_addr().raw_value() + 1).max().unwrap_or(0);
    crate::arch::write_testbed_tables(mem, ram_end)?;

    let mut bi = BootInfo { vcpus, tsc_khz, heap_start: image.end.next_multiple_of(2 << 20), ..Default::default() };
    for r in mem.iter() {
        bi.push_mem_region(r.start_addr().raw_value(), r.len()).map_err(|e| e.to_string())?;
    }
    for d in virtio {
        bi.push_virtio(*d).map_err(|e| e.to_string())?;
    }
    bi.set_cmdline(spec).map_err(|e| e.to_string())?;
    let mut page = [0u8; BootInfo::ENCODED_LEN];
    bi.encode(&mut page);
    mem.write_slice(&page, GuestAddress(BOOT_INFO_GPA))?;
    mem.write_slice(&[0u8; PAGE_SIZE as usize], GuestAddress(STATS_GPA))?;
    Ok(image.entry)
}

/// Reads and decodes the stats page; `None` until the guest initialised it.
pub fn read_stats(mem: &GuestMem) -> Option<Stats> {
    let mut page = [0u8; PAGE_SIZE as usize];
    mem.read_slice(&mut page, GuestAddress(STATS_GPA)).ok()?;
    Stats::decode(&page)
}

/// The statistics as a JSON object.
pub fn stats_json(spec: &WorkloadSpec, stats: Option<&Stats>) -> Value {
    let Some(s) = stats else {
        return json!({"workload": spec.workload.name(), "phase": "boot", "ops": 0, "ops_per_sec": 0.0, "errors": 0});
    };
    json!({
        "workload": spec.workload.name(),
        "phase": Phase::from_u32(s.phase).map(Phase::name).unwrap_or("unknown"),
        "ops": s.ops,
        "ops_per_sec": (s.ops_per_sec() * 10.0).round() / 10.0,
        "errors": s.errors,
        "checksum": format!("{:#018x}", s.checksum),
        "fill_ops": s.fill_ops,
        "run_seconds": s.run_seconds(),
        "tsc_khz": s.tsc_khz,
        "held_frames": s.held_frames,
    })
}
