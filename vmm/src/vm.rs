//! A VM: KVM VM and vCPUs, guest memory, buses and devices, boot setup, and
//! the run loop that ends with an [`Outcome`].

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use serde_json::{json, Value};

use testbed_abi::{WorkloadSpec, VIRTIO_IRQ_BASE, VIRTIO_MMIO_BASE, VIRTIO_MMIO_SIZE};

use crate::api::ApiTarget;
use crate::bus::Bus;
use crate::control::{Control, ExitReason};
use crate::devices::legacy::SerialDevice;
use crate::devices::virtio::{VirtioBlockHandle, VirtioEnlightenHandle, VirtioNetHandle};
pub use crate::error::VmError;
use crate::memory::GuestMem;
use crate::snapshot::{DevicesState, SerialSnapshot, Snapshot, SnapshotConfig};
use crate::testbed;
use crate::vcpu::{self, VcpuContext, VcpuStates, VcpuThread};
use crate::vstate::VmState;
use migrate::progress::Mode;

/// Most vCPUs a Linux guest may have (MP table APIC IDs are 8-bit).
pub const MAX_VCPUS_LINUX: u32 = 254;
/// Legacy IRQ of COM1.
pub(crate) const SERIAL_IRQ: u32 = 4;

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
    /// Network devices (`--net tap=NAME[,mac=MAC]`). Restored and incoming
    /// VMs: the i-th entry names the TAP of the snapshot's i-th device
    /// (its MAC stays the snapshot's); devices without an entry use the TAP
    /// the snapshot names.
    pub nets: Vec<NetSpec>,
    /// Take the disk images' locks later ([`Shared::take_disk_locks`]): a
    /// migration's destination, whose source holds them until its commit.
    pub defer_disk_locks: bool,
}

/// One `--net` option.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetSpec {
    pub tap: String,
    pub mac: Option<[u8; 6]>,
}

impl std::str::FromStr for NetSpec {
    type Err = String;

    /// `tap=NAME[,mac=aa:bb:cc:dd:ee:ff]`.
    fn from_str(s: &str) -> Result<Self, String> {
        let (mut tap, mut mac) = (None, None);
        for part in s.split(',') {
            match part.split_once('=') {
                Some(("tap", v)) if !v.is_empty() => tap = Some(v.to_string()),
                Some(("mac", v)) => mac = Some(virtio_devices::net::parse_mac(v)?),
                _ => return Err(format!("`{part}` in `{s}`: expected tap=NAME[,mac=aa:bb:cc:dd:ee:ff]")),
            }
        }
        let tap = tap.ok_or_else(|| format!("`{s}`: no tap=NAME"))?;
        Ok(Self { tap, mac })
    }
}

impl VmConfig {
    /// A configuration with the defaults of `vmm run`.
    pub fn new(mem_size: u64, vcpus: u32, boot: BootSource, disks: Vec<PathBuf>, serial: SerialOut) -> Self {
        Self {
            mem_size,
            vcpus,
            boot,
            disks,
            serial,
            enlighten: true,
            disk_map: Vec::new(),
            console_input: true,
            nets: Vec::new(),
            defer_disk_locks: false,
        }
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
pub(crate) fn window(i: usize) -> crate::snapshot::DeviceWindow {
    crate::snapshot::DeviceWindow {
        base: VIRTIO_MMIO_BASE + i as u64 * VIRTIO_MMIO_SIZE,
        irq: VIRTIO_IRQ_BASE + i as u32,
    }
}

impl Shared {
    /// A migration's destination, after the source's commit: takes every disk
    /// image's lock, waiting up to `wait` for the source to let go.
    pub fn take_disk_locks(&self, wait: std::time::Duration) -> Result<(), VmError> {
        let locks = crate::disk_lock::DiskLock::acquire_all(&self.config.disks, Some(wait))?;
        *self.disk_locks.lock().unwrap_or_else(|e| e.into_inner()) = locks;
        Ok(())
    }

    /// Lets go of the disk images (the VM runs elsewhere from now on).
    pub fn release_disk_locks(&self) {
        let n = std::mem::take(&mut *self.disk_locks.lock().unwrap_or_else(|e| e.into_inner())).len();
        if n > 0 {
            log::info!("released the locks of {n} disk image(s) to the destination");
        }
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
    /// The locks on the disk images ([`crate::disk_lock`]); empty until taken
    /// on a migration's destination, emptied at a migration's commit here.
    pub disk_locks: Mutex<Vec<crate::disk_lock::DiskLock>>,
    /// The enlightenment device (testbed VMs).
    pub enlighten: Option<VirtioEnlightenHandle>,
    /// The network devices, in the order of `config.nets`.
    pub nets: Vec<VirtioNetHandle>,
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

    /// Lets the paused VM run again: its devices first, then its vCPUs.
    pub fn resume_vm(&self) {
        for n in &self.nets {
            n.quiesce(false);
        }
        self.control.resume();
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
            self.resume_vm();
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
            nets: self.nets.iter().map(|n| n.mmio.state().encode()).collect(),
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
        let nets = self.nets.iter().map(|n| n.errors());
        for (e, msg) in self.blocks.iter().map(|b| b.errors()).chain(enl).chain(nets) {
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
        if !self.nets.is_empty() {
            v["net"] = self.nets.iter().map(|n| n.status_json()).collect();
        }
        v
    }
    fn pause(&self) -> Result<(), String> {
        self.control.pause(|| self.kick_all()).map_err(|r| format!("the VM is ending ({r:?})"))?;
        // The vCPUs are stopped; so must be the devices that write guest
        // memory on their own (a frame arriving from the network).
        for n in &self.nets {
            n.quiesce(true);
        }
        Ok(())
    }
    fn resume(&self) -> Result<(), String> {
        if self.migration.committed.load(Ordering::Acquire) {
            return Err("this VM was migrated: it runs at the destination; resuming it here would run it twice".into());
        }
        if !self.control.is_paused() {
            return Err("the VM is not paused".into());
        }
        self.resume_vm();
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
        // "security": {key_file, tls_cert, tls_key, tls_ca, insecure}; a bare "key_file" as before.
        let security: migrate::transport::Security = match (req.get("security"), req.get("key_file")) {
            (Some(s), _) => serde_json::from_value(s.clone()).map_err(|e| format!("bad \"security\": {e}"))?,
            (None, Some(Value::String(k))) => {
                migrate::transport::Security { key_file: Some(k.into()), ..Default::default() }
            }
            _ => return Err("migrate needs \"security\" (or \"key_file\")".into()),
        };
        let creds = security.load()?;
        Ok(migrate::source::migrate(self, to, &creds, mode)?.to_json())
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
/// Made by `builder.rs`.
pub struct Vm {
    pub(crate) _kvm: Kvm,
    pub(crate) _fd: Arc<VmFd>,
    pub(crate) vcpu_fds: Vec<VcpuFd>,
    pub(crate) pio: Arc<Bus>,
    pub(crate) mmio: Arc<Bus>,
    pub(crate) shared: Arc<Shared>,
    pub(crate) serial_line_start: Arc<AtomicBool>,
    /// Made from a snapshot or an incoming migration.
    pub(crate) restored: bool,
    /// Forward stdin to the serial port once running.
    pub(crate) console_input: bool,
}

impl Vm {
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
        for n in &self.shared.nets {
            n.start()?;
            if self.restored {
                n.announce();
            }
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
