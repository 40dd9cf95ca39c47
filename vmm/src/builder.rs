//! Building a VM, one step per part: its shape (from the command line or a
//! snapshot), the KVM VM, guest memory, legacy devices, disks, the
//! enlightenment device, vCPUs, then either a restored state or a boot.

use std::fs::File;
use std::io::Write;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use kvm_bindings::{kvm_mp_state, kvm_pit_config, KVM_MAX_CPUID_ENTRIES, KVM_MP_STATE_RUNNABLE, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vm_superio::Serial;
use vmm_sys_util::eventfd::EventFd;

use testbed_abi::{VirtioMmioDevice, WorkloadSpec, VIRTIO_IRQ_BASE, VIRTIO_MMIO_BASE, VIRTIO_MMIO_SIZE};

use crate::bus::Bus;
use crate::control::Control;
use crate::devices::legacy::{self, ExitPort, IrqfdTrigger, ParkPort, SerialDevice, SerialSink, I8042};
use crate::devices::virtio::{VirtioBlockHandle, VirtioEnlightenHandle, VirtioNetHandle};
use crate::error::{kvm_err, VmError};
use crate::memory::{self, GuestMem};
use crate::snapshot::{DeviceWindow, NetConfig, SnapshotConfig, SnapshotReader};
use crate::testbed;
use crate::vm::{
    remap_disks, window, BootSource, SerialOut, Shared, Vm, VmConfig, MAX_VCPUS_LINUX, PROGRESS_SAMPLES, SERIAL_IRQ,
};

impl Vm {
    /// Creates a VM that boots (testbed or Linux) or restores a snapshot file.
    pub fn create(cfg: VmConfig) -> Result<Self, VmError> {
        build(cfg, None, None)
    }

    /// Creates a VM from an incoming migration's state and memory.
    pub fn create_incoming(cfg: VmConfig, mem: Arc<GuestMem>, reader: SnapshotReader) -> Result<Self, VmError> {
        build(cfg, Some(reader), Some(mem))
    }
}

fn bus_err(e: crate::bus::Overlap) -> VmError {
    VmError::Device(e.to_string())
}

/// The VM's shape: a restore takes it from the snapshot; checked limits.
fn shape(
    cfg: &mut VmConfig,
    incoming: Option<SnapshotReader>,
) -> Result<(Option<SnapshotReader>, Option<WorkloadSpec>), VmError> {
    let restore = match (&cfg.boot, incoming) {
        (_, Some(r)) => Some(r),
        (BootSource::Restore { snapshot }, None) => Some(SnapshotReader::open(snapshot)?),
        _ => None,
    };
    if let Some(r) = &restore {
        let c = &r.snapshot.config;
        cfg.mem_size = c.mem_size;
        cfg.vcpus = c.vcpus;
        cfg.disks = remap_disks(&c.disks, &cfg.disk_map)?;
        if let Some(spec) = &c.testbed {
            cfg.boot = BootSource::Testbed { spec: spec.clone() };
        }
    }
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
            if parsed.workload.needs_net() && cfg.nets.is_empty() && restore.is_none() {
                return Err(VmError::Config(format!(
                    "the `{}` workload needs a network device: add --net tap=NAME",
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
    Ok((restore, testbed_spec))
}

/// The KVM VM with its in-kernel interrupt controllers and PIT.
fn create_kvm_vm() -> Result<(Kvm, Arc<VmFd>), VmError> {
    let kvm = Kvm::new().map_err(VmError::KvmOpen)?;
    let fd = Arc::new(kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?);
    fd.set_tss_address(0xfffb_d000).map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
    fd.create_irq_chip().map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
    let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
    fd.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;
    Ok((kvm, fd))
}

/// The port-I/O devices: COM1 (restored if there is a snapshot), i8042, the
/// testbed's exit, park and session ports.
struct Legacy {
    pio: Bus,
    serial: Arc<Mutex<SerialDevice>>,
    serial_line_start: Arc<AtomicBool>,
    session: Arc<Mutex<Vec<u8>>>,
}

fn attach_legacy(fd: &VmFd, out: SerialOut, restore: Option<&SnapshotReader>) -> Result<Legacy, VmError> {
    let mut pio = Bus::default();
    let serial_out: Box<dyn Write + Send> = match out {
        SerialOut::Stdout => Box::new(std::io::stdout()),
        SerialOut::File(p) => Box::new(File::create(&p).map_err(|source| VmError::File { path: p.clone(), source })?),
        SerialOut::Writer(w) => w,
    };
    let (sink, serial_line_start) = SerialSink::new(serial_out);
    let serial_evt = EventFd::new(libc::EFD_NONBLOCK)?;
    fd.register_irqfd(&serial_evt, SERIAL_IRQ).map_err(kvm_err("KVM_IRQFD (serial)"))?;
    let serial = match restore {
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
    pio.insert(testbed_abi::SERIAL_PORT as u64, 8, serial.clone()).map_err(bus_err)?;
    pio.insert(0x60, 5, legacy::shared(I8042::default())).map_err(bus_err)?;
    pio.insert(testbed_abi::EXIT_PORT as u64, 4, legacy::shared(ExitPort)).map_err(bus_err)?;
    pio.insert(testbed_abi::PARK_PORT as u64, 4, legacy::shared(ParkPort)).map_err(bus_err)?;
    let session = Arc::new(Mutex::new(Vec::new()));
    pio.insert(testbed_abi::SESSION_PORT as u64, 1, legacy::shared(legacy::SessionPort::new(session.clone())))
        .map_err(bus_err)?;
    Ok(Legacy { pio, serial, serial_line_start, session })
}

/// virtio-blk devices on the first virtio-mmio windows.
fn attach_disks(
    fd: &VmFd,
    mem: &Arc<GuestMem>,
    cfg: &VmConfig,
    mmio: &mut Bus,
    virtio: &mut Vec<VirtioMmioDevice>,
) -> Result<Vec<VirtioBlockHandle>, VmError> {
    let mut blocks = Vec::new();
    for (i, path) in cfg.disks.iter().enumerate() {
        let base = VIRTIO_MMIO_BASE + i as u64 * VIRTIO_MMIO_SIZE;
        let irq = VIRTIO_IRQ_BASE + i as u32;
        let evt = EventFd::new(libc::EFD_NONBLOCK)?;
        fd.register_irqfd(&evt, irq).map_err(kvm_err("KVM_IRQFD (virtio)"))?;
        let handle = VirtioBlockHandle::open(path, mem.clone(), evt)?;
        mmio.insert(base, VIRTIO_MMIO_SIZE, handle.bus_device()).map_err(bus_err)?;
        virtio.push(VirtioMmioDevice { base, irq, device_id: 2 });
        blocks.push(handle);
    }
    Ok(blocks)
}

/// The network devices, on the windows after the disks (or where the
/// snapshot had them), each with its MAC: the snapshot's, `--net mac=`, or
/// a random locally administered one.
fn attach_nets(
    fd: &VmFd,
    mem: &Arc<GuestMem>,
    cfg: &VmConfig,
    restore: Option<&SnapshotReader>,
    mmio: &mut Bus,
    virtio: &mut Vec<VirtioMmioDevice>,
) -> Result<Vec<VirtioNetHandle>, VmError> {
    let planned: Vec<NetConfig> = match restore {
        Some(r) => {
            let saved = &r.snapshot.config.nets;
            if cfg.nets.len() > saved.len() {
                return Err(VmError::Config(format!(
                    "{} --net options for a VM with {} network device(s)",
                    cfg.nets.len(),
                    saved.len()
                )));
            }
            let mut out = Vec::new();
            for (i, n) in saved.iter().enumerate() {
                let mut n = n.clone();
                if let Some(spec) = cfg.nets.get(i) {
                    if let Some(mac) = spec.mac.filter(|m| virtio_devices::net::format_mac(*m) != n.mac) {
                        return Err(VmError::Config(format!(
                            "--net {}: the VM's network device {i} has MAC {}; it cannot become {}",
                            spec.tap,
                            n.mac,
                            virtio_devices::net::format_mac(mac)
                        )));
                    }
                    n.tap = spec.tap.clone();
                }
                let taken = virtio.iter().any(|v| v.base == n.window.base || v.irq == n.window.irq);
                if taken || !(0..testbed_abi::MAX_VIRTIO_DEVICES).map(window).any(|w| w == n.window) {
                    return Err(VmError::Restore(format!(
                        "network device {i}: window {:#x} (IRQ {}) is not a free virtio-mmio window",
                        n.window.base, n.window.irq
                    )));
                }
                out.push(n);
            }
            out
        }
        None => cfg
            .nets
            .iter()
            .enumerate()
            .map(|(i, spec)| NetConfig {
                window: window(virtio.len() + i),
                mac: virtio_devices::net::format_mac(spec.mac.unwrap_or_else(virtio_devices::net::random_mac)),
                tap: spec.tap.clone(),
            })
            .collect(),
    };
    if virtio.len() + planned.len() > testbed_abi::MAX_VIRTIO_DEVICES {
        return Err(VmError::Config(format!(
            "at most {} virtio devices (disks and network devices together)",
            testbed_abi::MAX_VIRTIO_DEVICES
        )));
    }
    let mut nets = Vec::new();
    for n in planned {
        let mac = virtio_devices::net::parse_mac(&n.mac).map_err(VmError::Restore)?;
        let evt = EventFd::new(libc::EFD_NONBLOCK)?;
        fd.register_irqfd(&evt, n.window.irq).map_err(kvm_err("KVM_IRQFD (virtio-net)"))?;
        let handle = VirtioNetHandle::open(&n.tap, mac, mem.clone(), evt)?;
        mmio.insert(n.window.base, VIRTIO_MMIO_SIZE, handle.mmio.bus_device()).map_err(bus_err)?;
        virtio.push(VirtioMmioDevice { base: n.window.base, irq: n.window.irq, device_id: 1 });
        log::info!("net: {} on TAP {} (virtio-mmio {:#x}, IRQ {})", n.mac, n.tap, n.window.base, n.window.irq);
        nets.push((handle, n));
    }
    Ok(nets.into_iter().map(|(h, _)| h).collect())
}

/// Where the enlightenment device goes: where the snapshot had it, or on
/// the window after the disks (testbed guests, or `--enlighten`).
fn enlighten_window(
    cfg: &VmConfig,
    restore: Option<&SnapshotReader>,
    testbed: bool,
    taken: &[VirtioMmioDevice],
) -> Result<Option<DeviceWindow>, VmError> {
    let next = taken.len();
    let room = next < testbed_abi::MAX_VIRTIO_DEVICES;
    Ok(match restore {
        Some(r) => match r.snapshot.config.enlighten {
            Some(w) => {
                let free = !taken.iter().any(|d| d.base == w.base || d.irq == w.irq);
                if !free || !(0..testbed_abi::MAX_VIRTIO_DEVICES).map(window).any(|v| v == w) {
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
        None => ((testbed || cfg.enlighten) && room).then(|| window(next)),
    })
}

fn attach_enlightenment(
    fd: &VmFd,
    mem: &Arc<GuestMem>,
    w: DeviceWindow,
    mmio: &mut Bus,
    virtio: &mut Vec<VirtioMmioDevice>,
) -> Result<VirtioEnlightenHandle, VmError> {
    let evt = EventFd::new(libc::EFD_NONBLOCK)?;
    fd.register_irqfd(&evt, w.irq).map_err(kvm_err("KVM_IRQFD (virtio)"))?;
    let handle = VirtioEnlightenHandle::new(mem.clone(), evt);
    mmio.insert(w.base, VIRTIO_MMIO_SIZE, handle.mmio.bus_device()).map_err(bus_err)?;
    virtio.push(VirtioMmioDevice { base: w.base, irq: w.irq, device_id: bitmap_abi::wire::DEVICE_ID });
    Ok(handle)
}

/// vCPUs with their CPUID; returns them, the MSRs to save and the TSC rate.
fn create_vcpus(kvm: &Kvm, fd: &VmFd, n: u32) -> Result<(Vec<VcpuFd>, Vec<u32>, u32), VmError> {
    let vcpu_fds: Vec<VcpuFd> =
        (0..n).map(|i| fd.create_vcpu(i as u64).map_err(kvm_err("KVM_CREATE_VCPU"))).collect::<Result<_, _>>()?;
    let tsc_khz = vcpu_fds[0].get_tsc_khz().unwrap_or(0);
    let base_cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
    for (i, v) in vcpu_fds.iter().enumerate() {
        let cpuid = crate::cpuid::for_vcpu(&base_cpuid, i as u32, n);
        v.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
    }
    // Which MSRs KVM lets us read depends on the CPUID the vCPU has (KVM
    // refuses MSRs of features the guest does not see): probe after
    // KVM_SET_CPUID2.
    let msrs = crate::vstate::readable_msrs(kvm, &vcpu_fds[0]).map_err(|e| VmError::Restore(e.to_string()))?;
    Ok((vcpu_fds, msrs, tsc_khz))
}

/// Puts a snapshot's device, KVM and vCPU state back, then its memory.
fn restore_state(
    r: SnapshotReader,
    fd: &VmFd,
    vcpu_fds: &[VcpuFd],
    blocks: &[VirtioBlockHandle],
    nets: &[VirtioNetHandle],
    enlighten: Option<&VirtioEnlightenHandle>,
    mem: &GuestMem,
) -> Result<(), VmError> {
    if r.snapshot.devices.nets.len() != nets.len() {
        return Err(VmError::Restore("the snapshot's network devices do not match".into()));
    }
    for (i, (n, st)) in nets.iter().zip(&r.snapshot.devices.nets).enumerate() {
        let state = virtio_devices::MmioState::decode(st).map_err(VmError::Restore)?;
        n.mmio.restore(&state).map_err(|m| VmError::Restore(format!("network device {i}: {m}")))?;
    }
    if r.snapshot.devices.blocks.len() != blocks.len() {
        return Err(VmError::Restore("the snapshot's disks do not match".into()));
    }
    for (b, st) in blocks.iter().zip(&r.snapshot.devices.blocks) {
        let state = virtio_devices::MmioState::decode(st).map_err(VmError::Restore)?;
        b.restore(&state).map_err(VmError::Restore)?;
    }
    if let (Some(e), Some(st)) = (enlighten, &r.snapshot.devices.enlighten) {
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
    r.snapshot.vm.restore(fd).map_err(|e| VmError::Restore(e.to_string()))?;
    for (v, st) in vcpu_fds.iter().zip(&r.snapshot.vcpus) {
        st.restore(v).map_err(|e| VmError::Restore(format!("vCPU {}: {e}", st.id)))?;
    }
    let loaded = r.read_memory(mem)?;
    log::info!("restored {} vCPU(s) and {loaded} non-zero pages", vcpu_fds.len());
    Ok(())
}

/// Loads the testbed guest and points every vCPU at its entry.
fn boot_testbed(
    mem: &GuestMem,
    vcpu_fds: &[VcpuFd],
    spec: &str,
    tsc_khz: u32,
    virtio: &[VirtioMmioDevice],
) -> Result<(), VmError> {
    let entry = testbed::load(mem, spec, vcpu_fds.len() as u32, tsc_khz as u64, virtio)
        .map_err(|e| VmError::Boot(e.to_string()))?;
    for (i, v) in vcpu_fds.iter().enumerate() {
        let mut sregs = v.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
        let (regs, fpu) = crate::arch::testbed_vcpu_state(i as u32, entry, &mut sregs);
        v.set_sregs(&sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
        v.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))?;
        v.set_fpu(&fpu).map_err(kvm_err("KVM_SET_FPU"))?;
        if i > 0 {
            v.set_mp_state(kvm_mp_state { mp_state: KVM_MP_STATE_RUNNABLE }).map_err(kvm_err("KVM_SET_MP_STATE"))?;
        }
    }
    Ok(())
}

fn build(
    mut cfg: VmConfig,
    incoming: Option<SnapshotReader>,
    premade_mem: Option<Arc<GuestMem>>,
) -> Result<Vm, VmError> {
    let (restore, testbed_spec) = shape(&mut cfg, incoming)?;
    let restored = restore.is_some();
    let (kvm, fd) = create_kvm_vm()?;
    let mem = match premade_mem {
        Some(m) => m,
        None => Arc::new(memory::create(&crate::arch::ram_regions(cfg.mem_size))?),
    };
    memory::register_slots(&fd, &mem, false)?;

    let console_input = cfg.console_input && matches!(cfg.serial, SerialOut::Stdout);
    let serial_out = std::mem::replace(&mut cfg.serial, SerialOut::Stdout);
    let legacy = attach_legacy(&fd, serial_out, restore.as_ref())?;
    let mut mmio = Bus::default();
    let mut virtio = Vec::new();
    let disk_locks =
        if cfg.defer_disk_locks { Vec::new() } else { crate::disk_lock::DiskLock::acquire_all(&cfg.disks, None)? };
    let blocks = attach_disks(&fd, &mem, &cfg, &mut mmio, &mut virtio)?;
    let nets = attach_nets(&fd, &mem, &cfg, restore.as_ref(), &mut mmio, &mut virtio)?;
    let window = enlighten_window(&cfg, restore.as_ref(), testbed_spec.is_some(), &virtio)?;
    let enlighten = match window {
        Some(w) => Some(attach_enlightenment(&fd, &mem, w, &mut mmio, &mut virtio)?),
        None => None,
    };

    let (vcpu_fds, msrs, tsc_khz) = create_vcpus(&kvm, &fd, cfg.vcpus)?;
    match (restore, &cfg.boot) {
        (Some(r), _) => restore_state(r, &fd, &vcpu_fds, &blocks, &nets, enlighten.as_ref(), &mem)?,
        (None, BootSource::Testbed { spec }) => boot_testbed(&mem, &vcpu_fds, spec, tsc_khz, &virtio)?,
        (None, BootSource::Linux { kernel, initramfs, cmdline }) => {
            crate::linux::boot(&mem, &vcpu_fds, kernel, initramfs.as_deref(), cmdline, &virtio)?
        }
        (None, BootSource::Restore { .. }) => unreachable!("a restore always has a snapshot reader"),
    }
    let config = SnapshotConfig {
        mem_size: cfg.mem_size,
        vcpus: cfg.vcpus,
        testbed: match &cfg.boot {
            BootSource::Testbed { spec } => Some(spec.clone()),
            _ => None,
        },
        disks: cfg.disks.clone(),
        enlighten: window,
        nets: nets
            .iter()
            .zip(virtio.iter().filter(|v| v.device_id == 1))
            .map(|(n, v)| NetConfig {
                window: DeviceWindow { base: v.base, irq: v.irq },
                mac: virtio_devices::net::format_mac(n.mac()),
                tap: n.tap_name().to_string(),
            })
            .collect(),
    };
    let shared = Arc::new(Shared {
        control: Arc::new(Control::new(cfg.vcpus)),
        fd: fd.clone(),
        mem,
        config,
        serial: legacy.serial,
        vcpu_states: Arc::new(Mutex::new((0..cfg.vcpus).map(|_| None).collect())),
        msrs: Arc::new(msrs),
        vcpus: cfg.vcpus,
        mem_size: cfg.mem_size,
        threads: Mutex::new(Vec::new()),
        testbed: testbed_spec,
        started: Instant::now(),
        blocks,
        disk_locks: Mutex::new(disk_locks),
        enlighten,
        nets,
        exit_after_reply: Mutex::new(None),
        api_in_flight: std::sync::atomic::AtomicI32::new(0),
        progress: Mutex::new(std::collections::VecDeque::with_capacity(PROGRESS_SAMPLES)),
        migration: Default::default(),
        session: legacy.session,
    });
    Ok(Vm {
        _kvm: kvm,
        _fd: fd,
        vcpu_fds,
        pio: Arc::new(legacy.pio),
        mmio: Arc::new(mmio),
        shared,
        serial_line_start: legacy.serial_line_start,
        restored,
        console_input,
    })
}
