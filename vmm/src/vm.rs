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
use crate::snapshot::{DevicesState, SerialSnapshot, Snapshot, SnapshotConfig, SnapshotReader};
use crate::testbed;
use crate::vcpu::{self, VcpuContext, VcpuStates, VcpuThread};
use crate::vstate::VmState;
use migrate::progress::Mode;

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
    pub migration: migrate::progress::Progress,
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
    pub(crate) fn with_snapshot(&self, f: &mut dyn FnMut(&Snapshot) -> Result<u64, String>) -> Result<u64, String> {
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
        Ok(self.migration.request_cancel()?)
    }
    fn migrate(&self, req: &Value) -> Result<Value, String> {
        let to = req.get("to").and_then(Value::as_str).ok_or("migrate needs \"to\": \"HOST:PORT\"")?;
        let mode = Mode::parse(req.get("mode").and_then(Value::as_str).unwrap_or("enlightened"))?;
        let key_file = req.get("key_file").and_then(Value::as_str).ok_or("migrate needs \"key_file\"")?;
        let key = migrate::transport::load_key(std::path::Path::new(key_file))?;
        Ok(migrate::source::migrate(self, to, &key, mode)?.to_json())
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
