//! A VM: KVM VM and vCPUs, guest memory, buses and devices, boot setup, and
//! the run loop that ends with an [`Outcome`].

use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_mp_state, kvm_pit_config, KVM_MAX_CPUID_ENTRIES, KVM_MP_STATE_RUNNABLE, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use serde_json::{json, Value};
use vm_memory::{Address, GuestAddress, GuestMemoryRegion};
use vm_superio::Serial;
use vmm_sys_util::eventfd::EventFd;

use testbed_abi::{VirtioMmioDevice, WorkloadSpec, VIRTIO_IRQ_BASE, VIRTIO_MMIO_BASE, VIRTIO_MMIO_SIZE};

use crate::api::ApiTarget;
use crate::bus::Bus;
use crate::control::{Control, ExitReason};
use crate::devices::legacy::{self, ExitPort, IrqfdTrigger, ParkPort, SerialDevice, SerialSink, I8042};
use crate::devices::virtio::{VirtioBlockHandle, VirtioEnlightenHandle};
use crate::error::kvm_err;
pub use crate::error::VmError;
use crate::memory::{self, GuestMem};
use crate::migration::Mode;
use crate::snapshot::{DevicesState, SerialSnapshot, Snapshot, SnapshotConfig, SnapshotReader};
use crate::testbed;
use crate::vcpu::{self, VcpuContext, VcpuStates, VcpuThread};
use crate::vstate::VmState;

/// Pre-copy stops iterating once the pages left would take less than this to send.
const PRECOPY_DOWNTIME_MS: f64 = 300.0;
/// ... or after this many rounds ...
const PRECOPY_MAX_ROUNDS: u32 = 30;
/// ... or after this long.
const PRECOPY_MAX_TIME: Duration = Duration::from_secs(300);

/// How long the guest may take to answer an enlightenment command (a
/// loaded Linux guest under nested emulation takes seconds).
const ENLIGHTEN_TIMEOUT: Duration = Duration::from_secs(30);

/// Most vCPUs a Linux guest may have (MP table APIC IDs are 8-bit).
pub const MAX_VCPUS_LINUX: u32 = 254;
/// Legacy IRQ of COM1.
const SERIAL_IRQ: u32 = 4;

/// What the VM boots.
#[derive(Clone, Debug)]
pub enum BootSource {
    /// The built-in testbed guest running a workload (`WORKLOAD[,key=value...]`).
    Testbed { spec: String },
    /// A Linux kernel (bzImage or ELF vmlinux) via the Linux boot protocol.
    Linux { kernel: PathBuf, initramfs: Option<PathBuf>, cmdline: String },
    /// A snapshot file written by `vmm snapshot` (the configuration comes
    /// from the snapshot).
    Restore { snapshot: PathBuf },
}

/// Where serial output goes.
pub enum SerialOut {
    Stdout,
    File(PathBuf),
    Writer(Box<dyn Write + Send>),
}

/// A complete VM configuration.
pub struct VmConfig {
    pub mem_size: u64,
    pub vcpus: u32,
    pub boot: BootSource,
    pub disks: Vec<PathBuf>,
    pub serial: SerialOut,
    /// Give a booted guest the enlightenment device (virtio ID 63) on the
    /// virtio-mmio window after its disks. Restored and incoming VMs get it
    /// exactly where their snapshot says, whatever this is.
    pub enlighten: bool,
    /// Restored and incoming VMs: disk paths to replace (`OLD`, `NEW`): the
    /// VM's disk at `OLD` on the source is `NEW` here.
    pub disk_map: Vec<(PathBuf, PathBuf)>,
    /// Forward the VMM's stdin to the guest's serial port while it runs
    /// (Linux guests with their serial on stdout; see [`crate::console`]).
    pub console_input: bool,
}

impl VmConfig {
    /// A configuration with the defaults of `vmm run`.
    pub fn new(mem_size: u64, vcpus: u32, boot: BootSource, disks: Vec<PathBuf>, serial: SerialOut) -> Self {
        Self { mem_size, vcpus, boot, disks, serial, enlighten: true, disk_map: Vec::new(), console_input: true }
    }
}

/// Applies `map` (`OLD` -> `NEW`) to an incoming VM's disk paths; every
/// `OLD` must name one of them.
pub fn remap_disks(disks: &[PathBuf], map: &[(PathBuf, PathBuf)]) -> Result<Vec<PathBuf>, VmError> {
    for (old, _) in map {
        if !disks.contains(old) {
            let list: Vec<String> = disks.iter().map(|d| d.display().to_string()).collect();
            return Err(VmError::Config(format!(
                "--disk {}=...: the VM has no disk at {} (its disks: {})",
                old.display(),
                old.display(),
                if list.is_empty() { "none".into() } else { list.join(", ") }
            )));
        }
    }
    Ok(disks
        .iter()
        .map(|d| map.iter().find(|(o, _)| o == d).map(|(_, n)| n.clone()).unwrap_or_else(|| d.clone()))
        .collect())
}

/// The virtio-mmio window number `i` (0 = the first disk's).
fn window(i: usize) -> crate::snapshot::DeviceWindow {
    crate::snapshot::DeviceWindow {
        base: VIRTIO_MMIO_BASE + i as u64 * VIRTIO_MMIO_SIZE,
        irq: VIRTIO_IRQ_BASE + i as u32,
    }
}

/// State shared by the run loop, the vCPU threads and the API server.
pub struct Shared {
    pub control: Arc<Control>,
    pub fd: Arc<VmFd>,
    pub mem: Arc<GuestMem>,
    pub config: SnapshotConfig,
    pub serial: Arc<Mutex<SerialDevice>>,
    pub vcpu_states: VcpuStates,
    pub msrs: Arc<Vec<u32>>,
    pub vcpus: u32,
    pub mem_size: u64,
    pub threads: Mutex<Vec<VcpuThread>>,
    pub testbed: Option<WorkloadSpec>,
    pub started: Instant,
    pub blocks: Vec<VirtioBlockHandle>,
    /// The enlightenment device (testbed VMs).
    pub enlighten: Option<VirtioEnlightenHandle>,
    /// How the VM ends once the current API reply is written.
    pub exit_after_reply: Mutex<Option<ExitReason>>,
    /// API requests being handled.
    pub api_in_flight: std::sync::atomic::AtomicI32,
    /// The testbed guest's progress, `(unix ms, ops)` every 100 ms, the
    /// last [`PROGRESS_SAMPLES`] (migration reports carry them).
    pub progress: Mutex<std::collections::VecDeque<(u64, u64)>>,
    /// The migration in progress, if any.
    pub migration: crate::migration::Progress,
    /// The user's session for an `app` testbed guest (session port).
    pub session: Arc<Mutex<Vec<u8>>>,
}

/// Progress samples kept (10 s).
pub const PROGRESS_SAMPLES: usize = 100;

impl Shared {
    /// Gives an `app` testbed guest its session (`app,seed=N,steps=N,think=MS`):
    /// a guest waiting in phase `idle` starts it within 10 ms.
    pub fn set_session(&self, spec: &str) -> Result<(), String> {
        match WorkloadSpec::parse(spec) {
            Ok(s) if s.workload == testbed_abi::Workload::App => {}
            Ok(_) => return Err(format!("session `{spec}`: sessions are for the app workload (app,seed=N,...)")),
            Err(e) => return Err(format!("session `{spec}`: {e}")),
        }
        if spec.len() > 255 {
            return Err("session specification longer than 255 bytes".into());
        }
        *self.session.lock().unwrap_or_else(|e| e.into_inner()) = spec.as_bytes().to_vec();
        Ok(())
    }

    pub fn kick_all(&self) {
        for t in self.threads.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            t.kick();
        }
    }

    /// Writes a snapshot of the VM to `path`. The VM is paused for the
    /// duration (and resumed afterwards if it was running).
    pub fn snapshot(&self, path: &std::path::Path) -> Result<Value, String> {
        let was_paused = self.control.is_paused();
        if !was_paused {
            self.pause()?;
        }
        let t = Instant::now();
        let res = self.write_snapshot(path);
        if !was_paused {
            self.control.resume();
        }
        let stored = res?;
        Ok(json!({
            "path": path.display().to_string(),
            "pages_stored": stored,
            "pause_ms": t.elapsed().as_secs_f64() * 1000.0,
        }))
    }

    fn write_snapshot(&self, path: &std::path::Path) -> Result<u64, String> {
        self.sync_disks()?;
        self.with_snapshot(&mut |snap| crate::snapshot::write(path, snap, &self.mem).map_err(|e| e.to_string()))
    }

    /// Migrates the VM to another VMM; on success the VM here ends and the
    /// report is returned. On failure the VM keeps running here.
    pub fn migrate(&self, to: &str, key: &migrate::wire::Key, mode: Mode) -> Result<Value, String> {
        if self.migration.json().is_some() {
            return Err("a migration is already in progress".into());
        }
        if self.migration.committed.load(Ordering::Acquire) {
            return Err("this VM was already migrated: it runs at the destination".into());
        }
        self.migration.start(mode);
        let r = self.migrate_inner(to, key, mode);
        self.migration.end();
        r
    }

    fn migrate_inner(&self, to: &str, key: &migrate::wire::Key, mode: Mode) -> Result<Value, String> {
        let t0 = Instant::now();
        let stream = crate::migration::connect(to, key)?;
        if matches!(mode, Mode::Postcopy | Mode::Enlightened) {
            return self.migrate_postcopy(to, key, stream, mode, t0);
        }
        let mut paused_here = false;
        let mut logging = false;
        let result = self.migrate_over(&stream, mode, t0, &mut paused_here, &mut logging);
        if logging {
            if let Err(e) = memory::register_slots(&self.fd, &self.mem, false) {
                log::warn!("cannot turn dirty logging off: {e}");
            }
        }
        match result {
            Ok(report) => {
                log::info!("migrated to {to}: {report}");
                // The VM stays paused here; it ends once the reply is out.
                *self.exit_after_reply.lock().unwrap_or_else(|e| e.into_inner()) = Some(ExitReason::Migrated);
                Ok(report)
            }
            Err(e) => {
                if paused_here {
                    self.control.resume();
                }
                log::error!("migration to {to} failed; the VM keeps running here: {e}");
                Err(e)
            }
        }
    }

    /// Pages the guest (KVM dirty log) or a device (vm-memory bitmap) wrote
    /// since the last call, one bitmap per region.
    fn take_dirty(&self) -> Result<Vec<Vec<u64>>, String> {
        use vm_memory::GuestMemoryBackend;
        let mut out = Vec::new();
        for (slot, region) in self.mem.iter().enumerate() {
            let mut kvm = self
                .fd
                .get_dirty_log(slot as u32, region.len() as usize)
                .map_err(|e| format!("KVM_GET_DIRTY_LOG: {e}"))?;
            // The mapping's own bitmap (the region trait only exposes a slice view).
            let dev = std::ops::Deref::deref(region).bitmap().get_and_reset();
            for (k, d) in kvm.iter_mut().zip(dev.iter()) {
                *k |= *d;
            }
            out.push(kvm);
        }
        Ok(out)
    }

    fn migrate_over(
        &self,
        stream: &std::net::TcpStream,
        mode: Mode,
        t0: Instant,
        paused_here: &mut bool,
        logging: &mut bool,
    ) -> Result<Value, String> {
        use migrate::wire::{FrameWriter, Kind};
        use vm_memory::{Bytes, GuestMemoryBackend};
        let io = |e: migrate::wire::WireError| format!("sending: {e}");
        let mut fw = FrameWriter::new(std::io::BufWriter::with_capacity(1 << 20, self.migration.counting(stream)));
        fw.send(Kind::Config, &serde_json::to_vec(&self.config).map_err(|e| e.to_string())?).map_err(io)?;
        let mut rounds = Vec::new();
        let mut dirty: Option<Vec<Vec<u64>>> = None;
        if mode == Mode::Precopy {
            memory::register_slots(&self.fd, &self.mem, true).map_err(|e| e.to_string())?;
            *logging = true;
            self.take_dirty()?; // start from a clean log
            let regions: Vec<(u64, usize)> =
                self.mem.iter().map(|r| (r.start_addr().raw_value(), r.len() as usize)).collect();
            let mut page = vec![0u8; 4096];
            let mut batch: Vec<u8> = Vec::with_capacity(crate::migration::PAGES_PER_FRAME * migrate::wire::PAGE_RECORD);
            for round in 0.. {
                self.migration.check()?;
                self.migration.set(mode, &format!("pre-copy round {round}"));
                if let Some(r) = self.control.exit_reason() {
                    return Err(format!("the VM ended during the migration ({r:?})"));
                }
                let t = Instant::now();
                let before = fw.bytes;
                let mut sent = 0u64;
                for (ri, &(base, len)) in regions.iter().enumerate() {
                    for p in 0..len / 4096 {
                        let wanted = match &dirty {
                            None => true, // round 0: every page that is not zero
                            Some(d) => d[ri][p / 64] & (1 << (p % 64)) != 0,
                        };
                        if !wanted {
                            continue;
                        }
                        let gpa = base + (p * 4096) as u64;
                        self.mem.read_slice(&mut page, GuestAddress(gpa)).map_err(|e| e.to_string())?;
                        if dirty.is_none() && page.iter().all(|&b| b == 0) {
                            continue;
                        }
                        batch.extend_from_slice(&gpa.to_le_bytes());
                        batch.extend_from_slice(&page);
                        sent += 1;
                        if batch.len() >= crate::migration::PAGES_PER_FRAME * migrate::wire::PAGE_RECORD {
                            self.migration.check()?;
                            fw.send(Kind::Pages, &batch).map_err(io)?;
                            batch.clear();
                        }
                    }
                }
                if !batch.is_empty() {
                    fw.send(Kind::Pages, &batch).map_err(io)?;
                    batch.clear();
                }
                fw.flush().map_err(io)?;
                let secs = t.elapsed().as_secs_f64().max(1e-6);
                let bytes = fw.bytes - before;
                let d = self.take_dirty()?;
                let dirty_pages: u64 = d.iter().flatten().map(|w| w.count_ones() as u64).sum();
                let rate = bytes as f64 / secs;
                let expected_ms = dirty_pages as f64 * 4096.0 / rate.max(1.0) * 1000.0;
                rounds.push(json!({
                    "round": round, "pages": sent, "bytes": bytes, "ms": secs * 1000.0,
                    "dirty_after": dirty_pages, "expected_downtime_ms": expected_ms,
                }));
                log::info!("pre-copy round {round}: {sent} pages in {:.0} ms, {dirty_pages} dirty", secs * 1000.0);
                dirty = Some(d);
                if expected_ms < PRECOPY_DOWNTIME_MS
                    || round + 1 >= PRECOPY_MAX_ROUNDS
                    || t0.elapsed() > PRECOPY_MAX_TIME
                {
                    break;
                }
            }
        }
        let precopy_bytes = fw.bytes;

        // Switch over: pause, send state and the remaining pages.
        self.migration.check()?;
        self.migration.set(mode, "stop-and-copy");
        if let Some(r) = self.control.exit_reason() {
            return Err(format!("the VM ended during the migration ({r:?})"));
        }
        if !self.control.is_paused() {
            self.pause()?;
            *paused_here = true;
        }
        let t_pause = Instant::now();
        self.sync_disks()?;
        fw.send(Kind::Switchover, &[]).map_err(io)?;
        let mut last = match dirty {
            Some(mut d) => {
                for (a, b) in d.iter_mut().zip(self.take_dirty()?) {
                    for (x, y) in a.iter_mut().zip(b) {
                        *x |= y;
                    }
                }
                Some(d)
            }
            None => None,
        };
        let mut counting = migrate::transport::Counting { inner: fw.get_mut(), bytes: 0 };
        let final_pages = self.with_snapshot(&mut |snap| {
            let mut include = |ri: usize, p: usize, data: &[u8]| match &mut last {
                Some(d) => d[ri][p / 64] & (1 << (p % 64)) != 0,
                None => data.iter().any(|&b| b != 0),
            };
            crate::snapshot::write_stream(&mut counting, snap, &self.mem, &mut include)
                .map_err(|e| format!("sending the VM state: {e}"))
        })?;
        let final_bytes = counting.bytes;
        fw.flush().map_err(io)?;
        let dest_digest = crate::migration::await_confirmation(stream)?;
        let downtime = t_pause.elapsed().as_secs_f64() * 1000.0;
        let total = t0.elapsed().as_secs_f64() * 1000.0;
        // The VM is still paused here: its memory is the memory at suspension.
        let src_digest = migrate::space::Digests::of_memory(&*self.mem).summary();
        let integrity_ok = src_digest == dest_digest;
        if !integrity_ok {
            log::error!("migration: destination memory differs from the source's at suspension");
        }
        let execution_transfer = if mode == Mode::Precopy { total } else { downtime };
        Ok(json!({
            "mode": mode.name(),
            "to": stream.peer_addr().map(|a| a.to_string()).unwrap_or_default(),
            "downtime_ms": downtime,
            "execution_transfer_ms": execution_transfer,
            "total_duration_ms": total,
            "bytes": {"precopy": precopy_bytes, "stop_and_copy": final_bytes},
            "pages_at_switchover": final_pages,
            "free_pages_sent": 0,
            "rounds": rounds,
            "timeline": {
                "epoch_ms": migrate::report::unix_ms() - t0.elapsed().as_millis() as u64,
                "source": self.progress_json(),
            },
            "integrity": {
                "match": integrity_ok,
                "source": blake3::Hash::from(src_digest).to_hex().to_string(),
                "destination": blake3::Hash::from(dest_digest).to_hex().to_string(),
                "pages_compared": migrate::space::PageSpace::of(&*self.mem).pages(),
            },
        }))
    }

    /// Post-copy and enlightened post-copy, source side (the push and demand threads are [`migrate::source`]).
    fn migrate_postcopy(
        &self,
        to: &str,
        key: &migrate::wire::Key,
        stream: std::net::TcpStream,
        mode: Mode,
        t0: Instant,
    ) -> Result<Value, String> {
        use migrate::source::{Round, Source};
        use migrate::wire::{Channel, FrameReader, FrameWriter, Kind};
        let io = |e: migrate::wire::WireError| format!("sending: {e}");
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let writer = stream.try_clone().map_err(|e| e.to_string())?;
        let mut fw = FrameWriter::new(std::io::BufWriter::with_capacity(1 << 20, self.migration.counting(writer)));
        fw.send(Kind::Config, &serde_json::to_vec(&self.config).map_err(|e| e.to_string())?).map_err(io)?;
        let token = migrate::transport::new_token();
        fw.send(Kind::Info, json!({"mode": mode.name(), "token": token}).to_string().as_bytes()).map_err(io)?;
        fw.flush().map_err(io)?;
        let demand = crate::migration::connect_channel(to, key, Channel::Demand)?;
        migrate::transport::mark_interactive(&demand);

        let source = Arc::new(Source::new(self.mem.clone()));
        let mut enlightenment = None;
        let mut enlightenment_ms = 0.0;
        if mode == Mode::Enlightened {
            self.migration.set(mode, "enlightenment");
            let t = Instant::now();
            let e = self.enlighten_prepare().map_err(|e| format!("enlightenment: {e}"))?;
            enlightenment_ms = ms(t.elapsed());
            log::info!("enlightenment: {} ms, {}", enlightenment_ms.round(), e.summary());
            enlightenment = Some(e);
        }

        // Suspend, send the free ranges and the device state; the
        // destination restores and says so; committing = sending Go.
        let mut paused_here = false;
        let mut demand_thread = None;
        let pre = (|| -> Result<(Instant, f64, u64, u64, Instant), String> {
            self.migration.check()?;
            self.migration.set(mode, "switch-over");
            if !self.control.is_paused() {
                self.pause()?;
                paused_here = true;
            }
            let t_pause = Instant::now();
            self.sync_disks()?;
            let mut free_info = 0;
            if let Some(e) = &enlightenment {
                let ranges = source.mark_free(e.free_bitmap().free_runs());
                free_info = migrate::space::send_ranges(&mut fw, Kind::FreeRanges, &ranges)
                    .map_err(|e| format!("sending FreeRanges: {e}"))?;
            }
            let suspension_ms = ms(t_pause.elapsed());
            fw.send(Kind::Switchover, b"postcopy").map_err(io)?;
            let mut counting = migrate::transport::Counting { inner: fw.get_mut(), bytes: 0 };
            self.with_snapshot(&mut |snap| {
                crate::snapshot::write_state_only(&mut counting, snap, &self.mem)
                    .map_err(|e| format!("sending the VM state: {e}"))
            })?;
            let state_bytes = counting.bytes;
            fw.flush().map_err(io)?;
            let t_state = Instant::now();
            let (src, conn) = (source.clone(), demand.try_clone().map_err(|e| e.to_string())?);
            let counter = self.migration.bytes.clone();
            demand_thread = Some(std::thread::spawn(move || src.serve_demand(conn, counter)));
            crate::migration::await_confirmation(&stream)?;
            self.migration.check()?;
            self.migration.committed.store(true, Ordering::Release);
            fw.send(Kind::Go, &[]).map_err(io)?;
            fw.flush().map_err(io)?;
            Ok((t_pause, suspension_ms, free_info, state_bytes, t_state))
        })();
        let (t_pause, suspension_ms, free_info, state_bytes, t_state) = match pre {
            Ok(v) => v,
            Err(e) => {
                let _ = demand.shutdown(std::net::Shutdown::Both);
                if let Some(t) = demand_thread {
                    let _ = t.join();
                }
                if paused_here {
                    self.control.resume();
                }
                if enlightenment.is_some() {
                    if let Err(r) = self.enlighten_release() {
                        log::warn!("releasing the guest's free frames: {r}");
                    }
                }
                log::error!("migration to {to} failed before the switch-over; the VM keeps running here: {e}");
                return Err(e);
            }
        };
        let t_go = Instant::now();
        let downtime_ms = ms(t_go - t_pause);
        let execution_transfer_ms = ms(t_go - t0);
        log::info!(
            "post-copy: the VM runs at {to} after {execution_transfer_ms:.0} ms (downtime {downtime_ms:.0} ms); pushing"
        );

        // From here on the VM lives at the destination: never resume here.
        // This VMM ends only once every page is delivered (and after the
        // reply to this request, not to any other).
        let rounds: Vec<Round> = match &enlightenment {
            None => {
                vec![Round { name: "address-order".into(), class: None, pages: (0..source.space.pages()).collect() }]
            }
            Some(e) => {
                let prio = e.priority_map();
                bitmap_abi::Class::ALL
                    .iter()
                    .filter(|c| **c != bitmap_abi::Class::Free)
                    .map(|&c| {
                        let pages = prio
                            .frames_of(c)
                            .filter_map(|pfn| source.space.index(pfn * migrate::space::PAGE_SIZE))
                            .filter(|&i| !source.free.get(i))
                            .collect();
                        Round { name: c.name().to_owned(), class: Some(c as u32), pages }
                    })
                    .chain(std::iter::once(Round {
                        // Frames beyond the map (none for a well-formed guest).
                        name: "unmapped".into(),
                        class: None,
                        pages: (0..source.space.pages())
                            .filter(|&i| source.space.gpa(i) / migrate::space::PAGE_SIZE >= e.ready.frames())
                            .collect(),
                    }))
                    .collect()
            }
        };
        self.migration.set(mode, "post-copy push");
        // Push until every page is acknowledged. A broken connection is
        // re-established (the destination says what it still lacks) for as
        // long as it takes: this VMM holds the only copy of those pages.
        let mut stream = stream;
        let mut demand = demand;
        let mut fr = FrameReader::new(std::io::BufReader::new(stream.try_clone().map_err(|e| e.to_string())?));
        let mut reconnections = 0u64;
        let (rounds_report, dest_digest, dest, total_ms) = loop {
            let attempt = (|| -> Result<(Value, [u8; 32], Value, f64), String> {
                let rounds_report = source.push(&rounds, &mut fw, t0)?;
                fw.send(Kind::Complete, &[]).map_err(io)?;
                fw.flush().map_err(io)?;
                stream.set_read_timeout(Some(Duration::from_secs(120))).map_err(|e| e.to_string())?;
                let ack = fr.expect().map_err(|e| format!("waiting for the destination's acknowledgement: {e}"))?;
                if ack.kind != Kind::Ack || ack.payload.len() != 32 {
                    return Err(format!("the destination answered {:?} instead of acknowledging every page", ack.kind));
                }
                let total_ms = ms(t0.elapsed());
                let info = fr.expect().map_err(|e| format!("waiting for the destination's statistics: {e}"))?;
                let dest: Value = if info.kind == Kind::Info {
                    serde_json::from_slice(&info.payload).unwrap_or(Value::Null)
                } else {
                    Value::Null
                };
                let mut digest = [0u8; 32];
                digest.copy_from_slice(&ack.payload);
                Ok((rounds_report, digest, dest, total_ms))
            })();
            match attempt {
                Ok(v) => break v,
                Err(e) => {
                    log::warn!("post-copy to {to}: {e}; reconnecting (the VM runs there, its pages are here)");
                    self.migration.set(mode, "post-copy: reconnecting");
                    let _ = stream.shutdown(std::net::Shutdown::Both);
                    let _ = demand.shutdown(std::net::Shutdown::Both);
                    if let Some(t) = demand_thread.take() {
                        let _ = t.join();
                    }
                    let mut tries = 0u64;
                    let (nfw, nstream, ndemand, nfr) = loop {
                        std::thread::sleep(Duration::from_millis(500));
                        match self.postcopy_reconnect(to, key, &token, &source) {
                            Ok(c) => break c,
                            Err(e) => {
                                tries += 1;
                                if tries % 10 == 1 {
                                    log::warn!("post-copy: cannot reconnect to {to} yet: {e}");
                                }
                            }
                        }
                    };
                    (fw, stream, demand, fr) = (nfw, nstream, ndemand, nfr);
                    let (src, conn) = (source.clone(), demand.try_clone().map_err(|e| e.to_string())?);
                    let counter = self.migration.bytes.clone();
                    demand_thread = Some(std::thread::spawn(move || src.serve_demand(conn, counter)));
                    reconnections += 1;
                    self.migration.set(mode, "post-copy push");
                    log::info!("post-copy: reconnected to {to}");
                }
            }
        };
        let _ = demand.shutdown(std::net::Shutdown::Both);
        let demand_result = demand_thread.map(|t| t.join());
        if let Some(Ok(Err(e))) = demand_result {
            log::debug!("demand thread ended: {e}");
        }
        let src_digest = source.summary();
        let integrity_ok = src_digest == dest_digest;
        if !integrity_ok {
            log::error!("post-copy: destination memory differs from the source's at suspension");
        }
        crate::memory::discard(&self.mem);
        *self.exit_after_reply.lock().unwrap_or_else(|e| e.into_inner()) = Some(ExitReason::Migrated);
        let ld = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        let push_bytes: u64 =
            rounds_report.as_array().map(|a| a.iter().filter_map(|r| r["bytes"].as_u64()).sum()).unwrap_or(0);
        let mut classes = serde_json::Map::new();
        let mut per_round = Vec::new();
        for r in rounds_report.as_array().into_iter().flatten() {
            classes.insert(
                r["name"].as_str().unwrap_or("?").to_owned(),
                json!({"pages": r["pages"], "data_pages": r["data_pages"], "start_ms": r["start_ms"], "ms": r["ms"]}),
            );
            per_round.push(r.clone());
        }
        let report = json!({
            "mode": mode.name(),
            "to": to,
            "enlightenment_ms": enlightenment_ms,
            "suspension_ms": suspension_ms,
            "state_transfer_ms": ms(t_state - t_pause),
            "execution_transfer_ms": execution_transfer_ms,
            "downtime_ms": downtime_ms,
            "total_duration_ms": total_ms,
            "bytes": {
                "precopy": 0,
                "state": state_bytes,
                "push": push_bytes,
                "demand": ld(&source.demand_bytes),
                "free_info": free_info,
            },
            "pages": {
                "total": source.space.pages(),
                "free": enlightenment.as_ref().map(|e| e.free_bitmap().count_free()).unwrap_or(0),
                "demand": ld(&source.demand_pages),
                "demand_duplicates": ld(&source.demand_duplicates),
            },
            "free_pages_sent": ld(&source.free_pages_sent),
            "reconnections": reconnections,
            "enlightenment": enlightenment.as_ref().map(|e| e.summary()),
            "rounds": per_round,
            "classes": classes,
            "destination": dest.clone(),
            "fault_latency_ms": dest["fault_latency_ms"].clone(),
            "integrity": {
                "match": integrity_ok,
                "source": blake3::Hash::from(src_digest).to_hex().to_string(),
                "destination": blake3::Hash::from(dest_digest).to_hex().to_string(),
                "pages_compared": source.space.pages(),
            },
            "timeline": {
                "epoch_ms": migrate::report::unix_ms() - t0.elapsed().as_millis() as u64,
                "source": self.progress_json(),
                "destination": dest["timeline"].clone(),
            },
        });
        log::info!(
            "migrated to {to} ({}): total {total_ms:.0} ms, integrity {}",
            mode.name(),
            if integrity_ok { "ok" } else { "MISMATCH" }
        );
        if !integrity_ok {
            return Err(format!("integrity check failed: {report}"));
        }
        Ok(report)
    }

    /// Re-establishes both connections of a post-copy migration whose
    /// connection broke; returns them with the pages the destination lacks
    /// marked unsent.
    #[allow(clippy::type_complexity)]
    fn postcopy_reconnect(
        &self,
        to: &str,
        key: &migrate::wire::Key,
        token: &str,
        source: &migrate::source::Source,
    ) -> Result<
        (
            migrate::wire::FrameWriter<std::io::BufWriter<migrate::transport::SharedCounting<std::net::TcpStream>>>,
            std::net::TcpStream,
            std::net::TcpStream,
            migrate::wire::FrameReader<std::io::BufReader<std::net::TcpStream>>,
        ),
        String,
    > {
        use migrate::wire::{Channel, FrameReader, FrameWriter, Kind};
        let io = |e: migrate::wire::WireError| e.to_string();
        let stream = crate::migration::connect_channel(to, key, Channel::Main)?;
        let w = self.migration.counting(stream.try_clone().map_err(|e| e.to_string())?);
        let mut fw = FrameWriter::new(std::io::BufWriter::with_capacity(1 << 20, w));
        fw.send(Kind::Info, json!({"resume": token}).to_string().as_bytes()).map_err(io)?;
        fw.flush().map_err(io)?;
        let demand = crate::migration::connect_channel(to, key, Channel::Demand)?;
        migrate::transport::mark_interactive(&demand);
        stream.set_read_timeout(Some(Duration::from_secs(30))).map_err(|e| e.to_string())?;
        let mut fr = FrameReader::new(std::io::BufReader::new(stream.try_clone().map_err(|e| e.to_string())?));
        let info = fr.expect().map_err(io)?;
        if info.kind != Kind::Info {
            return Err(format!("the destination answered {:?} to the resume request", info.kind));
        }
        let mut missing = 0;
        loop {
            let f = fr.expect().map_err(io)?;
            match f.kind {
                Kind::FreeRanges => {
                    for (pfn, count) in
                        migrate::space::decode_ranges(&f.payload, "missing ranges").map_err(|e| e.to_string())?
                    {
                        for (first, n) in source.space.clip(pfn, count) {
                            for i in first..first + n {
                                source.sent.clear(i);
                            }
                            missing += n;
                        }
                    }
                }
                Kind::Complete => break,
                other => return Err(format!("unexpected {other:?} frame in the resume answer")),
            }
        }
        log::info!("post-copy: the destination lacks {missing} pages");
        Ok((fw, stream, demand, fr))
    }

    /// Flushes every disk to stable storage (the VM must be paused): a
    /// destination or a restore opening the same images sees every write
    /// the guest completed.
    pub fn sync_disks(&self) -> Result<(), String> {
        for (b, path) in self.blocks.iter().zip(&self.config.disks) {
            b.sync_data().map_err(|e| format!("flushing disk {}: {e}", path.display()))?;
        }
        Ok(())
    }

    /// Builds the snapshot of the paused VM and hands it to `f`.
    fn with_snapshot(&self, f: &mut dyn FnMut(&Snapshot) -> Result<u64, String>) -> Result<u64, String> {
        let mut table = self.vcpu_states.lock().unwrap_or_else(|e| e.into_inner());
        let mut vcpus = Vec::with_capacity(table.len());
        for (i, slot) in table.iter_mut().enumerate() {
            match slot.take() {
                Some(Ok(st)) => vcpus.push(st),
                Some(Err(e)) => return Err(format!("vCPU {i}: {e}")),
                None => return Err(format!("vCPU {i} has not saved its state")),
            }
        }
        let vm = VmState::capture(&self.fd).map_err(|e| e.to_string());
        let devices = DevicesState {
            serial: SerialSnapshot::from(&self.serial.lock().unwrap_or_else(|e| e.into_inner()).0.state()),
            blocks: self.blocks.iter().map(|b| b.state().encode()).collect(),
            enlighten: self.enlighten.as_ref().map(|e| e.mmio.state().encode()),
            enlighten_protocol: self.enlighten.as_ref().map(|e| e.handle().state().encode()),
        };
        let result = vm.and_then(|vm| {
            let snap = Snapshot { config: self.config.clone(), vm, vcpus, devices };
            let r = f(&snap);
            // Put the vCPU states back: the VM may stay paused and be saved again.
            for (slot, st) in table.iter_mut().zip(snap.vcpus) {
                *slot = Some(Ok(st));
            }
            r
        });
        result
    }

    /// Asks the guest for its free bitmap and priority map (Prepare, Ready,
    /// read the maps). On success the guest holds its free frames until
    /// [`Self::enlighten_release`]; on failure they are released already.
    pub fn enlighten_prepare(&self) -> Result<Enlightenment, String> {
        use bitmap_abi::{FreeBitmap, PriorityMap};
        let dev = self.enlighten.as_ref().ok_or("this VM has no enlightenment device (testbed guests only)")?;
        let h = dev.handle();
        let abort = || {
            if h.send_abort().is_ok() {
                let _ = h.wait_ack(Duration::from_secs(1));
            }
        };
        if h.phase() == virtio_devices::Phase::Failed {
            abort();
        }
        let t0 = Instant::now();
        h.request_prepare(bitmap_abi::wire::DEFAULT_ACTIVE_WINDOW_MS).map_err(|e| format!("Prepare: {e}"))?;
        let ready = h.wait_ready(ENLIGHTEN_TIMEOUT).map_err(|e| {
            abort();
            format!("waiting for Ready: {e}")
        })?;
        let ready_at = t0.elapsed();
        let t1 = Instant::now();
        let (free, prio) = h.read_maps(&*self.mem, &ready).map_err(|e| {
            abort();
            format!("reading the maps: {e}")
        })?;
        let frames = ready.frames();
        if let Err(e) = FreeBitmap::new(&free, frames).and_then(|_| PriorityMap::new(&prio, frames)) {
            abort();
            return Err(format!("maps: {e}"));
        }
        Ok(Enlightenment { ready, free, prio, prepare_to_ready: ready_at, read_maps: t1.elapsed() })
    }

    /// Tells the guest it may use its free frames again (Done, Ack).
    pub fn enlighten_release(&self) -> Result<Duration, String> {
        let dev = self.enlighten.as_ref().ok_or("this VM has no enlightenment device")?;
        let h = dev.handle();
        let t = Instant::now();
        h.send_done().map_err(|e| format!("Done: {e}"))?;
        h.wait_ack(ENLIGHTEN_TIMEOUT).map_err(|e| format!("waiting for Ack: {e}"))?;
        Ok(t.elapsed())
    }

    /// A restored VM (snapshot, migration destination, appliance) whose
    /// guest was asked for its maps on another host before it was saved may
    /// still hold its free frames for that request: nobody here will read
    /// them, so the guest gets them back (Done after a Ready, Abort of a
    /// Prepare still outstanding, or the delivery of a restored Done/Abort).
    pub fn settle_enlightenment(&self) -> Result<Option<&'static str>, String> {
        use virtio_devices::Phase;
        let Some(dev) = self.enlighten.as_ref() else { return Ok(None) };
        let h = dev.handle();
        let what = match h.phase() {
            Phase::Idle => return Ok(None),
            Phase::Ready => {
                self.enlighten_release()?;
                "Done"
            }
            Phase::Preparing | Phase::Failed => {
                h.send_abort().map_err(|e| format!("Abort: {e}"))?;
                h.wait_ack(ENLIGHTEN_TIMEOUT).map_err(|e| format!("waiting for Ack: {e}"))?;
                "Abort"
            }
            Phase::Releasing => {
                dev.deliver_pending();
                h.wait_ack(ENLIGHTEN_TIMEOUT).map_err(|e| format!("waiting for Ack: {e}"))?;
                "the restored release"
            }
        };
        Ok(Some(what))
    }

    /// Asks the guest for its free bitmap and priority map over the
    /// enlightenment device (Prepare, Ready, read the maps, Done, Ack) and
    /// summarises them.
    pub fn enlighten(&self) -> Result<Value, String> {
        let t0 = Instant::now();
        let e = self.enlighten_prepare()?;
        let summary = e.summary();
        let ack_time = self.enlighten_release()?;
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let mut v = summary;
        v["host"] = json!({
            "prepare_to_ready_ms": ms(e.prepare_to_ready),
            "read_maps_ms": ms(e.read_maps),
            "done_to_ack_ms": ms(ack_time),
            "total_ms": ms(t0.elapsed()),
        });
        Ok(v)
    }

    /// Samples the testbed guest's progress every 100 ms until the VM ends.
    fn sample_progress(&self) {
        migrate::report::every_100ms(|| {
            // While paused (a migration's switch-over) the ring keeps the
            // history before it.
            let st = if self.control.is_paused() { None } else { testbed::read_stats(&self.mem) };
            if let Some(st) = st {
                let mut p = self.progress.lock().unwrap_or_else(|e| e.into_inner());
                if p.len() == PROGRESS_SAMPLES {
                    p.pop_front();
                }
                p.push_back((migrate::report::unix_ms(), st.ops));
            }
            self.control.exit_reason().is_none()
        });
    }

    /// The progress samples as JSON `[[unix_ms, ops], ...]`.
    pub fn progress_json(&self) -> Value {
        let p = self.progress.lock().unwrap_or_else(|e| e.into_inner());
        Value::Array(p.iter().map(|&(t, o)| json!([t, o])).collect())
    }

    /// Guest-caused errors reported by all virtio devices.
    pub fn device_errors(&self) -> (u64, Option<String>) {
        let mut n = 0;
        let mut last = None;
        let enl = self.enlighten.as_ref().map(|e| e.mmio.errors());
        for (e, msg) in self.blocks.iter().map(|b| b.errors()).chain(enl) {
            n += e;
            if msg.is_some() {
                last = msg;
            }
        }
        (n, last)
    }
}

impl ApiTarget for Shared {
    fn status(&self) -> Value {
        let state = if self.control.exit_reason().is_some() {
            "exiting"
        } else if self.control.is_paused() {
            "paused"
        } else {
            "running"
        };
        let mut v = json!({
            "state": state,
            "vcpus": self.vcpus,
            "mem_bytes": self.mem_size,
            "uptime_s": self.started.elapsed().as_secs_f64(),
        });
        if let Some(spec) = &self.testbed {
            v["workload"] = testbed::stats_json(spec, testbed::read_stats(&self.mem).as_ref());
        }
        if let Some(m) = self.migration.json() {
            v["migration"] = m;
        }
        v
    }
    fn pause(&self) -> Result<(), String> {
        self.control.pause(|| self.kick_all()).map_err(|r| format!("the VM is ending ({r:?})"))
    }
    fn resume(&self) -> Result<(), String> {
        if self.migration.committed.load(Ordering::Acquire) {
            return Err("this VM was migrated: it runs at the destination; resuming it here would run it twice".into());
        }
        if !self.control.is_paused() {
            return Err("the VM is not paused".into());
        }
        self.control.resume();
        Ok(())
    }
    fn shutdown(&self) {
        *self.exit_after_reply.lock().unwrap_or_else(|e| e.into_inner()) = Some(ExitReason::Shutdown);
    }
    fn in_flight(&self, delta: i32) {
        self.api_in_flight.fetch_add(delta, Ordering::SeqCst);
    }
    fn after_reply(&self) {
        if let Some(reason) = self.exit_after_reply.lock().unwrap_or_else(|e| e.into_inner()).take() {
            self.control.request_exit(reason);
            self.kick_all();
        }
    }
    fn snapshot(&self, path: &std::path::Path) -> Result<Value, String> {
        Shared::snapshot(self, path)
    }
    fn session(&self, spec: &str) -> Result<(), String> {
        self.set_session(spec)
    }
    fn enlighten(&self) -> Result<Value, String> {
        Shared::enlighten(self)
    }
    fn cancel_migration(&self) -> Result<(), String> {
        self.migration.request_cancel()
    }
    fn migrate(&self, req: &Value) -> Result<Value, String> {
        let to = req.get("to").and_then(Value::as_str).ok_or("migrate needs \"to\": \"HOST:PORT\"")?;
        let mode = Mode::parse(req.get("mode").and_then(Value::as_str).unwrap_or("enlightened"))?;
        let key_file = req.get("key_file").and_then(Value::as_str).ok_or("migrate needs \"key_file\"")?;
        let key = crate::migration::load_key(std::path::Path::new(key_file))?;
        Shared::migrate(self, to, &key, mode)
    }
}

/// The guest's maps, read after its Ready reply.
pub struct Enlightenment {
    pub ready: virtio_devices::Ready,
    pub free: Vec<u8>,
    pub prio: Vec<u8>,
    pub prepare_to_ready: Duration,
    pub read_maps: Duration,
}

impl Enlightenment {
    pub fn free_bitmap(&self) -> bitmap_abi::FreeBitmap<'_> {
        bitmap_abi::FreeBitmap::new(&self.free, self.ready.frames()).expect("validated when read")
    }
    pub fn priority_map(&self) -> bitmap_abi::PriorityMap<'_> {
        bitmap_abi::PriorityMap::new(&self.prio, self.ready.frames()).expect("validated when read")
    }
    /// Counts for reports.
    pub fn summary(&self) -> Value {
        use bitmap_abi::Class;
        let f = self.free_bitmap();
        let counts = self.priority_map().counts();
        let classes: serde_json::Map<String, Value> =
            Class::ALL.iter().map(|c| (c.name().to_owned(), counts[*c as usize].into())).collect();
        json!({
            "seq": self.ready.seq(),
            "frames": self.ready.frames(),
            "free_pages": f.count_free(),
            "free_runs": f.free_runs().count() as u64,
            "classes": classes,
            "guest_counts_match": self.ready.info.class_counts == counts,
            "sweep_us": self.ready.info.sweep_us,
            "classify_us": self.ready.info.classify_us,
        })
    }
}

/// How a VM run ended.
pub struct Outcome {
    pub reason: ExitReason,
    pub elapsed: Duration,
    /// Final testbed statistics, as JSON, when the guest is the testbed.
    pub report: Option<Value>,
    /// Workload errors the testbed guest counted.
    pub workload_errors: u64,
    /// Guest-caused device errors (protocol violations).
    pub device_errors: u64,
    pub last_device_error: Option<String>,
}

impl Outcome {
    /// True if the guest ended the way a successful run should.
    pub fn success(&self) -> bool {
        let clean_exit = match &self.reason {
            ExitReason::GuestExit(c) => *c == testbed_abi::ExitCode::Done as u32,
            ExitReason::GuestReset | ExitReason::Shutdown | ExitReason::Migrated => true,
            ExitReason::Fault { .. } => false,
        };
        clean_exit && self.workload_errors == 0 && self.device_errors == 0
    }
}

/// A created, not yet running VM.
pub struct Vm {
    _kvm: Kvm,
    _fd: Arc<VmFd>,
    vcpu_fds: Vec<VcpuFd>,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    shared: Arc<Shared>,
    serial_line_start: Arc<AtomicBool>,
    /// Made from a snapshot or an incoming migration.
    restored: bool,
    /// Forward stdin to the serial port once running.
    console_input: bool,
}

impl Vm {
    pub fn create(cfg: VmConfig) -> Result<Self, VmError> {
        Self::create_from(cfg, None, None)
    }

    /// Creates a VM from an incoming migration stream (already verified up
    /// to its state section; memory is read and checked here).
    pub fn create_incoming(cfg: VmConfig, mem: Arc<GuestMem>, reader: SnapshotReader) -> Result<Self, VmError> {
        Self::create_from(cfg, Some(reader), Some(mem))
    }

    fn create_from(
        mut cfg: VmConfig,
        incoming: Option<SnapshotReader>,
        premade_mem: Option<Arc<GuestMem>>,
    ) -> Result<Self, VmError> {
        // A restore takes the VM's shape from the snapshot.
        let opened = match (&cfg.boot, incoming) {
            (_, Some(r)) => Some(r),
            (BootSource::Restore { snapshot }, None) => Some(SnapshotReader::open(snapshot)?),
            _ => None,
        };
        let restored = opened.is_some();
        let restore = match opened {
            Some(r) => {
                let c = &r.snapshot.config;
                cfg.mem_size = c.mem_size;
                cfg.vcpus = c.vcpus;
                cfg.disks = remap_disks(&c.disks, &cfg.disk_map)?;
                if let Some(spec) = &c.testbed {
                    cfg.boot = BootSource::Testbed { spec: spec.clone() };
                }
                Some(r)
            }
            _ => None,
        };
        let testbed_spec = match &cfg.boot {
            BootSource::Testbed { spec } => {
                let parsed = WorkloadSpec::parse(spec).map_err(|e| VmError::Workload(e.to_string()))?;
                if cfg.vcpus > testbed_abi::MAX_VCPUS {
                    return Err(VmError::Config(format!(
                        "the testbed guest supports at most {} vCPUs (asked for {})",
                        testbed_abi::MAX_VCPUS,
                        cfg.vcpus
                    )));
                }
                if parsed.workload.needs_disk() && cfg.disks.is_empty() {
                    return Err(VmError::Config(format!(
                        "the `{}` workload needs a disk: add --disk FILE",
                        parsed.workload.name()
                    )));
                }
                Some(parsed)
            }
            BootSource::Linux { .. } | BootSource::Restore { .. } => None,
        };
        if cfg.vcpus == 0 || cfg.vcpus > MAX_VCPUS_LINUX {
            return Err(VmError::Config(format!("--vcpus must be between 1 and {MAX_VCPUS_LINUX}")));
        }
        if cfg.disks.len() > testbed_abi::MAX_VIRTIO_DEVICES {
            return Err(VmError::Config(format!("at most {} disks are supported", testbed_abi::MAX_VIRTIO_DEVICES)));
        }
        memory::validate_size(cfg.mem_size)?;

        let kvm = Kvm::new().map_err(VmError::KvmOpen)?;
        let fd = Arc::new(kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?);
        fd.set_tss_address(0xfffb_d000).map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        fd.create_irq_chip().map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
        fd.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;

        let ranges = crate::arch::ram_regions(cfg.mem_size);
        let mem = match premade_mem {
            Some(m) => m,
            None => Arc::new(memory::create(&ranges)?),
        };
        memory::register_slots(&fd, &mem, false)?;

        // Legacy devices.
        let mut pio = Bus::default();
        let console_input = cfg.console_input && matches!(cfg.serial, SerialOut::Stdout);
        let serial_out: Box<dyn Write + Send> = match cfg.serial {
            SerialOut::Stdout => Box::new(std::io::stdout()),
            SerialOut::File(p) => {
                Box::new(File::create(&p).map_err(|source| VmError::File { path: p.clone(), source })?)
            }
            SerialOut::Writer(w) => w,
        };
        let (sink, serial_line_start) = SerialSink::new(serial_out);
        let serial_evt = EventFd::new(libc::EFD_NONBLOCK)?;
        fd.register_irqfd(&serial_evt, SERIAL_IRQ).map_err(kvm_err("KVM_IRQFD (serial)"))?;
        let serial = match &restore {
            Some(r) => Serial::from_state(
                &(&r.snapshot.devices.serial).into(),
                IrqfdTrigger(serial_evt),
                vm_superio::serial::NoEvents,
                sink,
            )
            .map_err(|e| VmError::Restore(format!("serial: {e:?}")))?,
            None => Serial::new(IrqfdTrigger(serial_evt), sink),
        };
        let serial = Arc::new(Mutex::new(SerialDevice(serial)));
        let bus_err = |e: crate::bus::Overlap| VmError::Device(e.to_string());
        pio.insert(testbed_abi::SERIAL_PORT as u64, 8, serial.clone()).map_err(bus_err)?;
        pio.insert(0x60, 5, legacy::shared(I8042::default())).map_err(bus_err)?;
        pio.insert(testbed_abi::EXIT_PORT as u64, 4, legacy::shared(ExitPort)).map_err(bus_err)?;
        pio.insert(testbed_abi::PARK_PORT as u64, 4, legacy::shared(ParkPort)).map_err(bus_err)?;
        let session = Arc::new(Mutex::new(Vec::new()));
        pio.insert(testbed_abi::SESSION_PORT as u64, 1, legacy::shared(legacy::SessionPort::new(session.clone())))
            .map_err(bus_err)?;

        // virtio-blk devices on virtio-mmio.
        let mut mmio = Bus::default();
        let mut blocks = Vec::new();
        let mut virtio_list = Vec::new();
        for (i, path) in cfg.disks.iter().enumerate() {
            let base = VIRTIO_MMIO_BASE + i as u64 * VIRTIO_MMIO_SIZE;
            let irq = VIRTIO_IRQ_BASE + i as u32;
            let evt = EventFd::new(libc::EFD_NONBLOCK)?;
            fd.register_irqfd(&evt, irq).map_err(kvm_err("KVM_IRQFD (virtio)"))?;
            let handle = VirtioBlockHandle::open(path, mem.clone(), evt)?;
            mmio.insert(base, VIRTIO_MMIO_SIZE, handle.bus_device()).map_err(bus_err)?;
            virtio_list.push(VirtioMmioDevice { base, irq, device_id: 2 });
            blocks.push(handle);
        }
        // The enlightenment device: where the snapshot had it, or on the
        // window after the disks.
        let next = virtio_list.len();
        let room = next < testbed_abi::MAX_VIRTIO_DEVICES;
        let enlighten_window = match &restore {
            Some(r) => match r.snapshot.config.enlighten {
                Some(w) => {
                    let valid = (next..testbed_abi::MAX_VIRTIO_DEVICES).map(window).any(|v| v == w);
                    if !valid {
                        return Err(VmError::Restore(format!(
                            "the enlightenment device's window {:#x} (IRQ {}) is not a free virtio-mmio window",
                            w.base, w.irq
                        )));
                    }
                    Some(w)
                }
                // Snapshots from before the field: testbed VMs had it after their disks.
                None => (r.snapshot.config.testbed.is_some() && room).then(|| window(next)),
            },
            None => ((testbed_spec.is_some() || cfg.enlighten) && room).then(|| window(next)),
        };
        let enlighten = if let Some(w) = enlighten_window {
            let (base, irq) = (w.base, w.irq);
            let evt = EventFd::new(libc::EFD_NONBLOCK)?;
            fd.register_irqfd(&evt, irq).map_err(kvm_err("KVM_IRQFD (virtio)"))?;
            let handle = VirtioEnlightenHandle::new(mem.clone(), evt);
            mmio.insert(base, VIRTIO_MMIO_SIZE, handle.mmio.bus_device()).map_err(bus_err)?;
            virtio_list.push(VirtioMmioDevice { base, irq, device_id: bitmap_abi::wire::DEVICE_ID });
            Some(handle)
        } else {
            None
        };

        // vCPUs and boot.
        let vcpu_fds: Vec<VcpuFd> = (0..cfg.vcpus)
            .map(|i| fd.create_vcpu(i as u64).map_err(kvm_err("KVM_CREATE_VCPU")))
            .collect::<Result<_, _>>()?;
        let tsc_khz = vcpu_fds[0].get_tsc_khz().unwrap_or(0);
        let base_cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        for (i, v) in vcpu_fds.iter().enumerate() {
            let cpuid = crate::cpuid::for_vcpu(&base_cpuid, i as u32, cfg.vcpus);
            v.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
        }
        // Which MSRs KVM lets us read depends on the CPUID the vCPU has
        // (KVM refuses MSRs of features the guest does not see): probe after
        // KVM_SET_CPUID2.
        let msrs =
            Arc::new(crate::vstate::readable_msrs(&kvm, &vcpu_fds[0]).map_err(|e| VmError::Restore(e.to_string()))?);
        match &cfg.boot {
            _ if restore.is_some() => {
                let r = restore.expect("checked");
                for (b, st) in blocks.iter().zip(&r.snapshot.devices.blocks) {
                    let state = virtio_devices::MmioState::decode(st).map_err(VmError::Restore)?;
                    b.restore(&state).map_err(VmError::Restore)?;
                }
                if r.snapshot.devices.blocks.len() != blocks.len() {
                    return Err(VmError::Restore("the snapshot's disks do not match".into()));
                }
                if let (Some(e), Some(st)) = (&enlighten, &r.snapshot.devices.enlighten) {
                    let state = virtio_devices::MmioState::decode(st).map_err(VmError::Restore)?;
                    e.mmio.restore(&state).map_err(|m| VmError::Restore(format!("enlightenment device: {m}")))?;
                    // After the transport (whose restore resets the device).
                    if let Some(p) = &r.snapshot.devices.enlighten_protocol {
                        let ps = virtio_devices::enlighten::EnlightenState::decode(p)
                            .and_then(|ps| e.handle().restore(&ps).map(|()| ps))
                            .map_err(|m| VmError::Restore(format!("enlightenment protocol state: {m}")))?;
                        log::info!("enlightenment device restored in phase {:?}", ps.phase);
                    }
                }
                r.snapshot.vm.restore(&fd).map_err(|e| VmError::Restore(e.to_string()))?;
                for (v, st) in vcpu_fds.iter().zip(&r.snapshot.vcpus) {
                    st.restore(v).map_err(|e| VmError::Restore(format!("vCPU {}: {e}", st.id)))?;
                }
                let loaded = r.read_memory(&mem)?;
                log::info!("restored {} vCPU(s) and {loaded} non-zero pages", cfg.vcpus);
            }
            BootSource::Testbed { spec } => {
                let entry = testbed::load(&mem, spec, cfg.vcpus, tsc_khz as u64, &virtio_list)
                    .map_err(|e| VmError::Boot(e.to_string()))?;
                for (i, v) in vcpu_fds.iter().enumerate() {
                    let mut sregs = v.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
                    let (regs, fpu) = crate::arch::testbed_vcpu_state(i as u32, entry, &mut sregs);
                    v.set_sregs(&sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
                    v.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))?;
                    v.set_fpu(&fpu).map_err(kvm_err("KVM_SET_FPU"))?;
                    if i > 0 {
                        v.set_mp_state(kvm_mp_state { mp_state: KVM_MP_STATE_RUNNABLE })
                            .map_err(kvm_err("KVM_SET_MP_STATE"))?;
                    }
                }
            }
            BootSource::Linux { kernel, initramfs, cmdline } => {
                crate::linux::boot(&mem, &vcpu_fds, kernel, initramfs.as_deref(), cmdline, &virtio_list)?;
            }
            BootSource::Restore { .. } => unreachable!("handled above"),
        }
        let config = SnapshotConfig {
            mem_size: cfg.mem_size,
            vcpus: cfg.vcpus,
            testbed: match &cfg.boot {
                BootSource::Testbed { spec } => Some(spec.clone()),
                _ => None,
            },
            disks: cfg.disks.clone(),
            enlighten: enlighten_window,
        };

        let shared = Arc::new(Shared {
            control: Arc::new(Control::new(cfg.vcpus)),
            fd: fd.clone(),
            mem,
            config,
            serial,
            vcpu_states: Arc::new(Mutex::new((0..cfg.vcpus).map(|_| None).collect())),
            msrs,
            vcpus: cfg.vcpus,
            mem_size: cfg.mem_size,
            threads: Mutex::new(Vec::new()),
            testbed: testbed_spec,
            started: Instant::now(),
            blocks,
            enlighten,
            exit_after_reply: Mutex::new(None),
            api_in_flight: std::sync::atomic::AtomicI32::new(0),
            progress: Mutex::new(std::collections::VecDeque::with_capacity(PROGRESS_SAMPLES)),
            migration: Default::default(),
            session,
        });
        Ok(Self {
            _kvm: kvm,
            _fd: fd,
            vcpu_fds,
            pio: Arc::new(pio),
            mmio: Arc::new(mmio),
            shared,
            serial_line_start,
            restored,
            console_input,
        })
    }

    /// The state the API server talks to.
    pub fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    /// Runs the VM until it ends.
    pub fn run(mut self) -> Result<Outcome, VmError> {
        vcpu::install_kick_handler()?;
        // Testbed guests read no input (and keep Ctrl-C for the VMM).
        let _console = if self.console_input && self.shared.testbed.is_none() {
            Some(crate::console::Console::start(self.shared.serial.clone(), self.shared.control.clone())?)
        } else {
            None
        };
        let started = Instant::now();
        for (i, fd) in self.vcpu_fds.drain(..).enumerate() {
            let ctx = VcpuContext {
                index: i as u32,
                fd,
                pio: self.pio.clone(),
                mmio: self.mmio.clone(),
                control: self.shared.control.clone(),
                msrs: self.shared.msrs.clone(),
                states: self.shared.vcpu_states.clone(),
            };
            let t = vcpu::spawn(ctx)?;
            self.shared.threads.lock().unwrap_or_else(|e| e.into_inner()).push(t);
        }
        if self.shared.testbed.is_some() {
            let shared = self.shared.clone();
            std::thread::Builder::new().name("progress".into()).spawn(move || shared.sample_progress())?;
        }
        if self.restored {
            let shared = self.shared.clone();
            std::thread::Builder::new().name("enlighten-settle".into()).spawn(move || {
                match shared.settle_enlightenment() {
                    Ok(Some(what)) => log::info!("enlightenment: the guest has its held frames back ({what})"),
                    Ok(None) => {}
                    Err(e) => log::warn!("enlightenment: releasing the guest's held frames: {e}"),
                }
            })?;
        }
        let reason = self.shared.control.wait_exit(None).unwrap_or(ExitReason::Shutdown);
        let threads = std::mem::take(&mut *self.shared.threads.lock().unwrap_or_else(|e| e.into_inner()));
        for t in &threads {
            while !t.handle.is_finished() {
                t.kick();
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        for t in threads {
            let idx = t.index;
            if t.handle.join().is_err() {
                log::error!("vCPU {idx} thread panicked");
            }
        }
        let elapsed = started.elapsed();
        // Let API requests in progress (a migration the VM ended under) reply.
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.shared.api_in_flight.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let (device_errors, last_device_error) = self.shared.device_errors();
        let mut report = None;
        let mut workload_errors = 0;
        if let Some(spec) = &self.shared.testbed {
            let stats = testbed::read_stats(&self.shared.mem);
            workload_errors = stats.as_ref().map(|s| s.errors).unwrap_or(0);
            let mut v = testbed::stats_json(spec, stats.as_ref());
            v["exit"] = exit_json(&reason);
            v["device_errors"] = device_errors.into();
            v["vcpus"] = self.shared.vcpus.into();
            v["mem_bytes"] = self.shared.mem_size.into();
            v["wall_seconds"] = elapsed.as_secs_f64().into();
            report = Some(v);
        }
        Ok(Outcome { reason, elapsed, report, workload_errors, device_errors, last_device_error })
    }

    /// Whether serial output last ended a line (so a report can start a new one).
    pub fn serial_line_start(&self) -> Arc<AtomicBool> {
        self.serial_line_start.clone()
    }
}

fn exit_json(r: &ExitReason) -> Value {
    match r {
        ExitReason::GuestExit(c) => match testbed_abi::ExitCode::from_u32(*c) {
            Some(testbed_abi::ExitCode::Done) => "done".into(),
            Some(testbed_abi::ExitCode::Failed) => "guest-failed".into(),
            None => format!("guest-exit-{c:#x}").into(),
        },
        ExitReason::GuestReset => "reset".into(),
        ExitReason::Shutdown => "shutdown".into(),
        ExitReason::Migrated => "migrated".into(),
        ExitReason::Fault { message, .. } => format!("fault: {message}").into(),
    }
}

/// Writes `s` on its own line, after whatever the serial console printed.
pub fn print_last_line(line_start: &AtomicBool, s: &str) {
    let mut out = std::io::stdout().lock();
    if !line_start.load(Ordering::Relaxed) {
        let _ = writeln!(out);
    }
    let _ = writeln!(out, "{s}");
    let _ = out.flush();
}
