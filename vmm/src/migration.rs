//! The destination side of a migration between two VMMs.
//!
//! The engine (`migrate::receive`) reads the stream (see `migrate::wire`
//! for its frames); this module answers its one question, what memory the
//! announced VM needs ([`Host`]), and turns the received state into the
//! snapshot the VM is built from ([`state_of`]). The source connects and
//! authenticates *before* touching the VM, so a wrong address, a dead
//! destination or a stranger leaves it running unchanged; after pausing it
//! waits for the destination's `Ack`, sent only once the VM is fully
//! restored. Until then the source resumes on any failure; after it, the
//! source VM ends ("migrated"). The source side is the engine's
//! (`migrate::source`, driving the VM through `migratable.rs`).

use std::net::TcpListener;
use std::path::Path;

use migrate::receive::Incoming;
use migrate::space::GuestMem;
use migrate::transport::Credentials;
use migrate::vm::IncomingVm;

use crate::memory;
use crate::snapshot::{Snapshot, SnapshotConfig, SnapshotReader};
pub use migrate::progress::{Mode, Progress};

/// This VMM as a migration destination.
pub struct Host;

impl IncomingVm for Host {
    fn memory_for(&self, config: &[u8]) -> migrate::Result<GuestMem> {
        let config: SnapshotConfig =
            serde_json::from_slice(config).map_err(|e| format!("malformed VM configuration: {e}"))?;
        memory::validate_size(config.mem_size).map_err(|e| e.to_string())?;
        if config.vcpus == 0 || config.vcpus > crate::vm::MAX_VCPUS_LINUX {
            return Err(format!("the incoming VM has {} vCPUs", config.vcpus).into());
        }
        Ok(memory::create(&crate::arch::ram_regions(config.mem_size)).map_err(|e| e.to_string())?)
    }
}

/// Waits for a migration that authenticates and delivers a valid stream up
/// to the switch-over (see [`migrate::receive::accept`]).
pub fn accept(listener: &TcpListener, creds: &Credentials) -> Incoming {
    migrate::receive::accept(listener, creds, &Host)
}

/// The destination decides what it opens: each disk of the incoming VM must
/// be mapped by `--disk OLD=NEW` and each network device given a TAP by
/// `--net`, unless the operator allowed the source's own paths and names
/// (`same_paths`).
pub fn check_host_resources(
    reader: &SnapshotReader,
    disk_map: &[(std::path::PathBuf, std::path::PathBuf)],
    nets: &[crate::vm::NetSpec],
    same_paths: bool,
) -> Result<(), String> {
    if same_paths {
        return Ok(());
    }
    let c = &reader.snapshot.config;
    let unmapped: Vec<String> = c
        .disks
        .iter()
        .filter(|d| !disk_map.iter().any(|(old, _)| old == *d))
        .map(|d| d.display().to_string())
        .collect();
    if !unmapped.is_empty() {
        return Err(format!(
            "the VM's disk(s) {} have no --disk OLD=NEW here (or --same-paths to open the source's paths)",
            unmapped.join(", ")
        ));
    }
    if nets.len() < c.nets.len() {
        let taps: Vec<&str> = c.nets.iter().skip(nets.len()).map(|n| n.tap.as_str()).collect();
        return Err(format!(
            "the VM has {} network device(s) and only {} --net tap=NAME here (the source's TAP(s): {}; or --same-paths)",
            c.nets.len(),
            nets.len(),
            taps.join(", ")
        ));
    }
    Ok(())
}

/// The VM state a migration brought, checked against its announced shape.
pub fn state_of(inc: &Incoming) -> Result<SnapshotReader, String> {
    let snapshot: Snapshot =
        serde_json::from_slice(&inc.state).map_err(|e| format!("malformed VM state from {}: {e}", inc.peer))?;
    let config: SnapshotConfig = serde_json::from_slice(&inc.config).map_err(|e| e.to_string())?;
    if snapshot.config != config {
        return Err("the VM state does not match the announced configuration".into());
    }
    SnapshotReader::from_state(snapshot, Path::new(&format!("migration from {}", inc.peer))).map_err(|e| e.to_string())
}
