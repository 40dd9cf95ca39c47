//! `vmm`: a KVM virtual machine monitor for VM migration and streaming.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use vmm::vm::{BootSource, NetSpec, SerialOut, Vm, VmConfig};

/// Exit status for a run whose guest failed (fault, workload errors, device errors).
const EXIT_GUEST_FAILED: u8 = 1;
/// Exit status for bad input (arguments, files, configuration).
const EXIT_BAD_INPUT: u8 = 2;

#[derive(Parser)]
#[command(
    name = "vmm",
    version,
    about = "A KVM virtual machine monitor for kernel-assisted migration and appliance streaming",
    long_about = "A KVM virtual machine monitor for kernel-assisted migration and appliance streaming.\n\n\
        It boots either a Linux kernel (Linux boot protocol: bzImage or vmlinux, initramfs, command line) \
        or the built-in testbed guest, a small program whose workloads run at CPL3 and report statistics \
        the VMM can read.\n\nLogging goes to stderr; set RUST_LOG=debug for more.",
    after_help = "Examples:\n  \
        vmm run --testbed kv,duration=5 --mem 1G\n  \
        vmm run --testbed disk,duration=3 --disk disk.img\n  \
        vmm run --kernel bzImage --initramfs initrd.img --cmdline 'console=ttyS0' --disk rootfs.img\n  \
        vmm api --api-sock /tmp/vmm.sock status\n  \
        vmm snapshot --api-sock /tmp/vmm.sock -o vm.snap && vmm restore --snapshot vm.snap"
)]
struct Cli {
    /// Every vCPU thread joins this cgroup when it starts (cgroup v1: a cpu controller group;
    /// v2: a threaded group); the VMM's own threads (devices, API, migration) stay where the
    /// process runs. Like libvirt's vcpu/emulator split: VMs on one host share a CPU quota
    /// for their guests while a migration's sending threads do not take from it.
    #[arg(long, global = true, value_name = "DIR")]
    vcpu_cgroup: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

/// How the migration's connections authenticate and encrypt (both ends alike).
#[derive(Args, Debug, Clone)]
struct SecurityArgs {
    /// The shared migration key (from `vmm keygen`; at least 32 bytes, mode 0600). Both
    /// hosts use the same file; it authenticates TLS unless X.509 files are given.
    #[arg(long, value_name = "FILE")]
    key_file: Option<PathBuf>,
    /// X.509 instead of a key: this host's certificate chain (PEM).
    #[arg(long, value_name = "PEM", requires_all = ["tls_key", "tls_ca"])]
    tls_cert: Option<PathBuf>,
    /// X.509: this host's private key (PEM).
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// X.509: the CA certificate(s) that sign the other host's certificate (PEM).
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    tls_ca: Option<PathBuf>,
    /// X.509, on `vmm receive`: accept only a source whose certificate is valid for NAME
    /// (like QEMU's tls-authz).
    #[arg(long, value_name = "NAME", requires = "tls_cert")]
    tls_peer: Option<String>,
    /// No encryption: guest memory crosses the network in clear and frames can be
    /// altered in transit (the key file still authenticates each connection's start).
    /// For a trusted, isolated link only.
    #[arg(long, conflicts_with = "tls_cert")]
    insecure: bool,
}

impl SecurityArgs {
    fn into_security(self) -> migrate::transport::Security {
        migrate::transport::Security {
            key_file: self.key_file,
            tls_cert: self.tls_cert,
            tls_key: self.tls_key,
            tls_ca: self.tls_ca,
            tls_peer: self.tls_peer,
            insecure: self.insecure,
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Boot and run a VM until it ends.
    Run(RunArgs),
    /// Restore a VM from a snapshot file and run it until it ends.
    Restore {
        /// The snapshot written by `vmm snapshot`.
        #[arg(long, value_name = "FILE")]
        snapshot: PathBuf,
        /// Serial console output: `stdout` or a file path.
        #[arg(long, value_name = "stdout|FILE", default_value = "stdout")]
        serial: String,
        /// Serve the control API on this Unix socket.
        #[arg(long, value_name = "PATH")]
        api_sock: Option<PathBuf>,
        /// The user's session for an `app` testbed guest, e.g. app,seed=4,steps=10,think=200
        /// (the guest waits idle until it has one; also `vmm api session SPEC`).
        #[arg(long, value_name = "app,KEY=VALUE...")]
        session: Option<String>,
        /// The VM's disk at OLD when it was snapshotted is NEW here (repeatable).
        #[arg(long = "disk", value_name = "OLD=NEW", value_parser = parse_disk_map)]
        disk_map: Vec<(PathBuf, PathBuf)>,
        /// The TAP for the VM's network devices, in order: --net tap=NAME (repeatable; a
        /// device without one uses the TAP named in the snapshot; its MAC never changes).
        #[arg(long = "net", value_name = "tap=NAME")]
        nets: Vec<NetSpec>,
    },
    /// Run the destination of a migration: wait for an authenticated incoming VM, then run it.
    ///
    /// Disks are shared storage: the destination opens each of the VM's disks at the path
    /// the source had it (the source flushes every disk with fdatasync after pausing the VM
    /// and before sending its state), unless --disk OLD=NEW says it is elsewhere here.
    Receive {
        /// Address to listen on, e.g. 0.0.0.0:7000.
        #[arg(long, value_name = "ADDR")]
        listen: String,
        #[command(flatten)]
        security: SecurityArgs,
        /// Serial console output: `stdout` or a file path.
        #[arg(long, value_name = "stdout|FILE", default_value = "stdout")]
        serial: String,
        /// Serve the control API on this Unix socket once the VM runs.
        #[arg(long, value_name = "PATH")]
        api_sock: Option<PathBuf>,
        /// The VM's disk at OLD on the source is NEW here (repeatable), e.g.
        /// --disk /srv/a/root.img=/mnt/shared/root.img
        #[arg(long = "disk", value_name = "OLD=NEW", value_parser = parse_disk_map)]
        disk_map: Vec<(PathBuf, PathBuf)>,
        /// The TAP here for the VM's network devices, in order (repeatable), e.g.
        /// --net tap=tap1. The guest keeps its MAC; right after the switch-over this VMM
        /// announces it (RARP frames into the TAP, and a guest announcement where the
        /// driver supports it) so bridges and switches send its traffic here at once.
        #[arg(long = "net", value_name = "tap=NAME")]
        nets: Vec<NetSpec>,
        /// Prepare up to SIZE of huge pages (e.g. 1G, the guest's size) while waiting, so that
        /// after a post-copy switch-over guest RAM goes in as whole 2 MiB pages with no
        /// allocation or zeroing in the VM's time (like QEMU's -mem-prealloc). Preparation
        /// stops when a migration arrives; what is ready by then is used.
        #[arg(long, value_name = "SIZE", value_parser = parse_mem)]
        prealloc: Option<u64>,
        /// Open each disk and TAP at the path and name the source used (storage mounted
        /// at the same place on both hosts, TAPs named alike). Without it this host decides:
        /// every disk of the incoming VM needs --disk OLD=NEW and every network device a
        /// --net tap=NAME, or the migration is refused (the source keeps its VM). The
        /// stream never chooses what this VMM opens.
        #[arg(long)]
        same_paths: bool,
    },
    /// Write a new migration key file (32 random bytes, mode 0600; never overwrites).
    ///
    /// Both ends of a migration use the same file: it authenticates the TLS connections
    /// (each end derives the same certificate from it and accepts only that one).
    Keygen {
        /// The key file to create.
        #[arg(value_name = "FILE")]
        path: PathBuf,
    },
    /// Migrate a running VM to a `vmm receive` destination and print the report.
    ///
    /// Modes (all four in one binary; the report's fields are the thesis' metrics:
    /// downtime, execution transfer, total duration, bytes by kind, fault latencies):
    ///
    ///   stop-and-copy  pause, send every non-zero page and the device state, resume there.
    ///   precopy        send all pages while the VM runs, resend dirty ones in rounds until
    ///                  a round is small enough, then stop and copy the rest.
    ///   postcopy       pause, send the device state, resume at the destination at once;
    ///                  pages are pushed in address order while a second connection serves
    ///                  the destination's faults (userfaultfd).
    ///   enlightened    post-copy guided by the guest: its module reports free pages (never
    ///                  sent) and a priority map (kernel, page tables, active processes
    ///                  first); needs the guest module (Linux) or the testbed guest.
    ///
    /// Every connection is TLS 1.3, authenticated both ways by the key file (both hosts hold
    /// the same file, from `vmm keygen`) or by X.509 certificates (--tls-cert/--tls-key/
    /// --tls-ca, the destination's certificate valid for the host in --to); plaintext
    /// only with --insecure.
    ///
    /// Example: vmm keygen mig.key  (then copy mig.key to the destination, mode 0600)
    ///          vmm migrate --api-sock /run/vm.sock --to 10.0.0.2:7000 --key-file mig.key
    ///          --enlightened --report report.json
    #[command(verbatim_doc_comment)]
    Migrate {
        /// The source VMM's API socket.
        #[arg(long, value_name = "PATH")]
        api_sock: PathBuf,
        /// The destination, HOST:PORT.
        #[arg(long, value_name = "ADDR")]
        to: String,
        /// Shorthand for --mode enlightened.
        #[arg(long, conflicts_with = "mode")]
        enlightened: bool,
        /// stop-and-copy, precopy, postcopy or enlightened [default: enlightened].
        #[arg(long, value_name = "MODE")]
        mode: Option<String>,
        #[command(flatten)]
        security: SecurityArgs,
        /// Also write the JSON report to this file.
        #[arg(long, value_name = "FILE")]
        report: Option<PathBuf>,
    },
    /// Snapshot a running VM (paused for the duration) to a file.
    Snapshot {
        /// The VMM's API socket.
        #[arg(long, value_name = "PATH")]
        api_sock: PathBuf,
        /// Where to write the snapshot.
        #[arg(long, short, value_name = "FILE")]
        output: PathBuf,
    },
    /// Send one command to a running VMM's API socket and print the JSON reply.
    Api {
        /// The VMM's API socket.
        #[arg(long, value_name = "PATH")]
        api_sock: PathBuf,
        /// status, pause, resume, shutdown, enlighten, `snapshot PATH` or `session SPEC`.
        command: String,
    },
    /// Run a VM from a remote appliance before it has arrived: memory is fetched on first
    /// access (userfaultfd), guided by the server's knowledge of earlier runs (vTube), through
    /// a local content-addressed cache; the session's trace is uploaded when the VM ends.
    /// Make appliances with `vmm appliance create`, serve them with `vmm appliance serve`.
    Stream(StreamArgs),
    /// Write the built-in testbed guest image (an ELF with a multiboot header) to a file,
    /// e.g. to boot it in QEMU: qemu-system-x86_64 -enable-kvm -kernel FILE -append kv,duration=5
    /// -device isa-debug-exit,iobase=0xf4,iosize=4
    TestbedImage {
        /// Where to write the image.
        #[arg(long, short, value_name = "FILE")]
        output: PathBuf,
    },
    /// Streamable appliances: create from a snapshot, serve, analyse traces.
    Appliance {
        #[command(subcommand)]
        command: vmm::appliance_cmd::ApplianceCommand,
    },
}

#[derive(Args)]
struct StreamArgs {
    /// The appliance server, e.g. http://10.0.0.1:8080
    url: String,
    /// The appliance's name.
    #[arg(long)]
    name: String,
    /// Local chunk cache, shared by sessions and appliances.
    #[arg(long, value_name = "DIR", default_value = "~/.cache/vmm/chunks")]
    cache: String,
    /// Where the guest's serial output goes: stdout or a file.
    #[arg(long, default_value = "stdout")]
    serial: String,
    /// Serve the control API on this Unix socket.
    #[arg(long, value_name = "PATH")]
    api_sock: Option<PathBuf>,
    /// How state arrives: vtube (dynamic streaming from the server's knowledge of earlier
    /// runs), demand (each chunk on first access), full (everything before the VM starts),
    /// vmtorrent (VMTorrent's profile order).
    #[arg(long, default_value = "vtube", value_parser = ["vtube", "demand", "full", "vmtorrent"])]
    mode: String,
    /// Same as --mode demand.
    #[arg(long)]
    demand_only: bool,
    /// Do not upload this session's trace.
    #[arg(long)]
    no_upload: bool,
    /// vTube: select a cluster for transfer only if its probability also exceeds this
    /// (0 = the thesis' rule, equation 3.1, alone). Higher: fewer chunks fetched, more misses
    /// (read-ahead keeps them cheap). The default is the best measured by `bench stream-vm`.
    #[arg(long, value_name = "P", default_value_t = 0.6)]
    min_probability: f64,
    /// vTube's lookout window: clusters expected later than this after the current one are
    /// left for later decisions (the thesis' rule alone: --lookout 60 --min-probability 0
    /// --no-readahead).
    #[arg(long, value_name = "SECONDS", default_value_t = 2.0)]
    lookout: f64,
    /// vTube: no sequential read-ahead for misses outside the knowledge.
    #[arg(long)]
    no_readahead: bool,
    /// The user's session for an `app` testbed guest, e.g. app,seed=4,steps=10,think=200
    /// (the guest waits idle until it has one; also `vmm api session SPEC`).
    #[arg(long, value_name = "app,KEY=VALUE...")]
    session: Option<String>,
}

#[derive(Args)]
#[command(after_help = "Testbed workloads (--testbed WORKLOAD[,key=value...]):\n  \
    mem   wss=SIZE|PCT% (default 50%), rate=PAGES_PER_SEC (0 = unlimited)\n  \
    kv    share=PCT of RAM (default 50), value=BYTES (1024), ratio=SET:GET (1:9), theta=ZIPF (0.99)\n  \
    disk  size=SIZE exercised (16M), block=SIZE per request (4096); needs --disk\n  \
    app   state=SIZE|PCT% filled at boot (25%), features=N (32); then waits for a --session:\n        \
    steps=N features opened (8), think=MS between them (200), flow=PCT following the usual\n        \
    next feature (70), seed=N (the user)\n  \
    all   duration=SECONDS of run phase (0 = until shut down), seed=N\n\n\
    With the testbed guest, the last line of stdout is a JSON object with the final statistics\n\
    (ops, ops_per_sec, errors, ...). Exit status: 0 success, 1 the guest failed or reported errors,\n\
    2 bad input.")]
struct RunArgs {
    /// Linux kernel to boot (bzImage or ELF vmlinux).
    #[arg(long, value_name = "FILE", conflicts_with = "testbed", required_unless_present = "testbed")]
    kernel: Option<PathBuf>,
    /// Initial ramdisk for the Linux kernel.
    #[arg(long, value_name = "FILE", requires = "kernel", conflicts_with = "testbed")]
    initramfs: Option<PathBuf>,
    /// Kernel command line (virtio_mmio.device= entries are appended for each virtio device)
    /// [default: console=ttyS0 reboot=k panic=1].
    #[arg(long, value_name = "STR", requires = "kernel", conflicts_with = "testbed")]
    cmdline: Option<String>,
    /// Run the built-in testbed guest with this workload: WORKLOAD[,key=value...].
    #[arg(long, value_name = "WORKLOAD[,KEY=VALUE...]")]
    testbed: Option<String>,
    /// Guest memory size (K, M, G suffixes).
    #[arg(long, value_name = "SIZE", default_value = "512M", value_parser = parse_mem)]
    mem: u64,
    /// Number of vCPUs.
    #[arg(long, value_name = "N", default_value_t = 1)]
    vcpus: u32,
    /// Raw disk image attached as a virtio-blk device (repeatable).
    #[arg(long, value_name = "FILE")]
    disk: Vec<PathBuf>,
    /// A virtio-net device on an existing TAP interface (repeatable), e.g.
    /// --net tap=tap0,mac=52:54:00:12:34:56 (made with `ip tuntap add tap0 mode tap`, up or
    /// on a bridge). Without mac= the device gets a random locally administered one.
    #[arg(long = "net", value_name = "tap=NAME[,mac=MAC]")]
    nets: Vec<NetSpec>,
    /// Serial console output: `stdout` or a file path.
    #[arg(long, value_name = "stdout|FILE", default_value = "stdout")]
    serial: String,
    /// Serve the control API (status, pause, resume, shutdown) on this Unix socket.
    #[arg(long, value_name = "PATH")]
    api_sock: Option<PathBuf>,
    /// The user's session for an `app` testbed guest, e.g. app,seed=4,steps=10,think=200
    /// (without it the guest waits idle after its fill: the moment to snapshot an appliance).
    #[arg(long, value_name = "app,KEY=VALUE...", requires = "testbed")]
    session: Option<String>,
    /// No enlightenment device (virtio ID 63) for a Linux guest. By default the guest gets
    /// one on the virtio-mmio window after its disks (announced on the command line), which
    /// the project's guest module binds to; `vmm migrate --enlightened` needs it.
    #[arg(long)]
    no_enlightenment: bool,
}

fn parse_disk_map(s: &str) -> Result<(PathBuf, PathBuf), String> {
    match s.split_once('=') {
        Some((old, new)) if !old.is_empty() && !new.is_empty() => Ok((PathBuf::from(old), PathBuf::from(new))),
        _ => Err(format!("`{s}` is not OLD=NEW (the disk's path on the source = its path here)")),
    }
}

fn parse_mem(s: &str) -> Result<u64, String> {
    testbed_abi::parse_size(s).ok_or_else(|| format!("`{s}` is not a size; use e.g. 512M or 2G"))
}

fn run(args: RunArgs) -> ExitCode {
    let boot = match (args.kernel, args.testbed) {
        (Some(kernel), None) => BootSource::Linux {
            kernel,
            initramfs: args.initramfs,
            cmdline: args.cmdline.unwrap_or_else(|| "console=ttyS0 reboot=k panic=1".into()),
        },
        (None, Some(spec)) => BootSource::Testbed { spec },
        _ => unreachable!("clap enforces exactly one of --kernel and --testbed"),
    };
    let mut cfg = VmConfig::new(args.mem, args.vcpus, boot, args.disk, serial_out(&args.serial));
    cfg.enlighten = !args.no_enlightenment;
    cfg.nets = args.nets;
    run_vm(cfg, args.api_sock, args.session)
}

fn serial_out(s: &str) -> SerialOut {
    match s {
        "stdout" => SerialOut::Stdout,
        path => SerialOut::File(PathBuf::from(path)),
    }
}

/// Creates the VM, serves the API, runs it to the end and reports.
fn run_vm(cfg: VmConfig, api_sock: Option<PathBuf>, session: Option<String>) -> ExitCode {
    match Vm::create(cfg) {
        Ok(vm) => {
            if let Some(spec) = session {
                if let Err(e) = vm.shared().set_session(&spec) {
                    eprintln!("vmm: {e}");
                    return ExitCode::from(EXIT_BAD_INPUT);
                }
            }
            serve_and_run(vm, api_sock)
        }
        Err(e) => {
            eprintln!("vmm: {e}");
            ExitCode::from(EXIT_BAD_INPUT)
        }
    }
}

/// How long a destination waits for the source to let go of the disks at the commit.
const DISK_HANDOVER: std::time::Duration = std::time::Duration::from_secs(30);

/// Waits for an incoming migration and runs the VM it brings.
fn receive(
    listen: &str,
    security: &migrate::transport::Security,
    serial: &str,
    api_sock: Option<PathBuf>,
    disk_map: Vec<(PathBuf, PathBuf)>,
    nets: Vec<NetSpec>,
    same_paths: bool,
) -> ExitCode {
    let key = match security.load() {
        Ok(k) => k,
        Err(e) => {
            eprintln!("vmm: {e}");
            return ExitCode::from(EXIT_BAD_INPUT);
        }
    };
    let listener = match std::net::TcpListener::bind(listen) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("vmm: cannot listen on {listen}: {e}");
            return ExitCode::from(EXIT_BAD_INPUT);
        }
    };
    log::info!("receive: waiting for a migration on {listen}");
    loop {
        let mut inc = vmm::migration::accept(&listener, &key);
        let peer = inc.peer;
        let mut cfg = VmConfig::new(
            0,
            1,
            BootSource::Restore { snapshot: PathBuf::from(format!("migration from {peer}")) },
            Vec::new(),
            serial_out(serial),
        );
        cfg.disk_map = disk_map.clone();
        cfg.nets = nets.clone();
        // The source holds the disks' locks until it commits.
        cfg.defer_disk_locks = true;
        let built = vmm::migration::state_of(&inc)
            .and_then(|reader| {
                vmm::migration::check_host_resources(&reader, &disk_map, &nets, same_paths)?;
                Ok(reader)
            })
            .and_then(|reader| Vm::create_incoming(cfg, inc.mem.clone(), reader).map_err(|e| e.to_string()));
        let vm = match built {
            Ok(vm) => vm,
            Err(e) => {
                log::error!("receive: refused the migration from {peer}: {e}");
                inc.refuse(&format!("the destination cannot build the VM: {e}"));
                continue;
            }
        };
        if let Err(e) = inc.confirm() {
            // The source did not hear us: it keeps its VM; so must we not run ours.
            eprintln!("vmm: could not confirm the migration to {peer}: {e}; discarding the VM");
            if let Some(pc) = &inc.postcopy {
                pc.discard();
            }
            continue;
        }
        if let Some(mut pc) = inc.postcopy.take() {
            // Post-copy: run only once the source has committed.
            if let Err(e) = pc.wait_go(&inc.stream) {
                pc.discard();
                eprintln!("vmm: post-copy from {peer} was not committed: {e}; discarding the VM");
                continue;
            }
            let mem = vm.shared().mem.clone();
            let sampler = Box::new(move |stop, out| vmm::progress::sample_progress(mem, stop, out));
            if let Err(e) = pc.finish_in_background(&inc.stream, sampler) {
                eprintln!("vmm: post-copy from {peer}: {e}");
                return ExitCode::from(EXIT_GUEST_FAILED);
            }
            // The source let go of the disks before its `Go`. Should another VMM hold one,
            // the VM (which lives only here now: its memory keeps arriving) waits for it.
            while let Err(e) = vm.shared().take_disk_locks(DISK_HANDOVER) {
                log::error!("receive: {e}; the VM waits, paused, until its disks are free");
            }
            log::info!("receive: VM from {peer} resumed; its memory follows (post-copy)");
        } else {
            if let Err(e) = vm.shared().take_disk_locks(DISK_HANDOVER) {
                eprintln!(
                    "vmm: {e}: the source did not hand its disks over (it may run the VM still); discarding the VM"
                );
                continue;
            }
            log::info!("receive: VM from {peer} restored; running it");
        }
        return serve_and_run(vm, api_sock);
    }
}

/// `vmm stream`: runs a VM from a remote appliance.
fn stream(args: StreamArgs) -> ExitCode {
    let StreamArgs {
        url,
        name,
        cache,
        serial,
        api_sock,
        mode,
        demand_only,
        no_upload,
        session,
        min_probability,
        lookout,
        no_readahead,
    } = args;
    if !(lookout > 0.0 && lookout.is_finite()) {
        eprintln!("vmm: --lookout {lookout}: must be a positive number of seconds");
        return ExitCode::from(EXIT_BAD_INPUT);
    }
    if !(0.0..=1.0).contains(&min_probability) {
        eprintln!("vmm: --min-probability {min_probability}: must be between 0 and 1");
        return ExitCode::from(EXIT_BAD_INPUT);
    }
    let mode = if demand_only { "demand".to_string() } else { mode };
    let (url, name, mode, upload) = (url.as_str(), name.as_str(), mode.as_str(), !no_upload);
    let cache = match cache.strip_prefix("~/") {
        Some(rest) => std::env::var_os("HOME").map(PathBuf::from).unwrap_or_default().join(rest),
        None => PathBuf::from(cache),
    };
    use appliance::session::Mode;
    let session_mode = match mode {
        "demand" => Mode::DemandOnly,
        "full" => Mode::FullDownload,
        "vmtorrent" => Mode::VmTorrent { window: 16 },
        _ => Mode::VTube,
    };
    let cfg = appliance::session::SessionConfig {
        mode: session_mode,
        use_knowledge: mode != "demand",
        params: serde_json::json!({"url": url, "mode": mode, "session": session}),
        planner: appliance::planner::PlannerConfig { min_probability, lookout_us: (lookout * 1e6) as u64 },
        readahead: !no_readahead,
        ..Default::default()
    };
    let streamed = match vmm::stream::start(url, name, &cache, serial_out(&serial), cfg) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("vmm: {e}");
            return ExitCode::from(EXIT_BAD_INPUT);
        }
    };
    log::info!("stream: `{name}` launched after {:.2} s", streamed.session.stats().launch_s);
    let (vm, rest) = streamed.into_parts();
    if let Some(spec) = &session {
        if let Err(e) = vm.shared().set_session(spec) {
            eprintln!("vmm: {e}");
            return ExitCode::from(EXIT_BAD_INPUT);
        }
    }
    let code = serve_and_run(vm, api_sock);
    let summary = rest.finish(upload);
    eprintln!("stream: {summary}");
    code
}

fn serve_and_run(vm: Vm, api_sock: Option<PathBuf>) -> ExitCode {
    let _api = match &api_sock {
        Some(path) => match vmm::api::ApiServer::start(path, vm.shared()) {
            Ok(s) => Some(s),
            Err(e) => {
                eprintln!("vmm: cannot serve the API on {}: {e}", path.display());
                return ExitCode::from(EXIT_BAD_INPUT);
            }
        },
        None => None,
    };
    let line_start = vm.serial_line_start();
    let outcome = match vm.run() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("vmm: {e}");
            return ExitCode::from(EXIT_GUEST_FAILED);
        }
    };
    if let Some(report) = &outcome.report {
        vmm::vm::print_last_line(&line_start, &report.to_string());
    }
    if let vmm::control::ExitReason::Fault { message, .. } = &outcome.reason {
        eprintln!("vmm: the guest failed: {message}");
    }
    if outcome.workload_errors > 0 {
        eprintln!("vmm: the guest workload reported {} errors", outcome.workload_errors);
    }
    if outcome.device_errors > 0 {
        eprintln!(
            "vmm: the guest violated the virtio protocol {} time(s); last: {}",
            outcome.device_errors,
            outcome.last_device_error.as_deref().unwrap_or("?")
        );
    }
    if outcome.success() {
        ExitCode::SUCCESS
    } else {
        if let vmm::control::ExitReason::GuestExit(code) = outcome.reason {
            if code != testbed_abi::ExitCode::Done as u32 {
                eprintln!("vmm: the guest reported failure (exit code {code:#x}); see its console output");
            }
        }
        ExitCode::from(EXIT_GUEST_FAILED)
    }
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_millis()
        .init();
    let cli = Cli::parse();
    if let Some(dir) = cli.vcpu_cgroup {
        if let Err(e) = vmm::vcpu_cgroup::set(dir) {
            eprintln!("vmm: --vcpu-cgroup: {e}");
            return ExitCode::from(EXIT_BAD_INPUT);
        }
    }
    match cli.command {
        Command::Run(args) => run(args),
        Command::Restore { snapshot, serial, api_sock, session, disk_map, nets } => {
            let mut cfg = VmConfig::new(0, 1, BootSource::Restore { snapshot }, Vec::new(), serial_out(&serial));
            cfg.disk_map = disk_map;
            cfg.nets = nets;
            run_vm(cfg, api_sock, session)
        }
        Command::Keygen { path } => match migrate::transport::write_key_file(&path) {
            Ok(()) => {
                println!("{}", path.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("vmm: {e}");
                ExitCode::from(EXIT_BAD_INPUT)
            }
        },
        Command::Receive { listen, security, serial, api_sock, disk_map, nets, prealloc, same_paths } => {
            if let Some(bytes) = prealloc {
                if let Err(e) = pager::staging::prepare_pool(bytes) {
                    log::warn!("receive: cannot prepare huge pages: {e}");
                }
            }
            receive(&listen, &security.into_security(), &serial, api_sock, disk_map, nets, same_paths)
        }
        Command::Migrate { api_sock, to, enlightened, mode, security, report } => {
            let mode = if enlightened { "enlightened".to_string() } else { mode.unwrap_or("enlightened".into()) };
            if let Err(e) = vmm::migration::Mode::parse(&mode) {
                eprintln!("vmm: {e}");
                return ExitCode::from(EXIT_BAD_INPUT);
            }
            // The source VMM reads the files: give it absolute paths.
            let security = security.into_security().absolute();
            if let Err(e) = security.load() {
                eprintln!("vmm: {e}");
                return ExitCode::from(EXIT_BAD_INPUT);
            }
            let req = serde_json::json!({"command": "migrate", "to": to, "mode": mode, "security": security});
            // Progress on stderr while the migration runs.
            let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let watcher = {
                let (done, sock) = (done.clone(), api_sock.clone());
                std::thread::spawn(move || {
                    let mut last = String::new();
                    while !done.load(std::sync::atomic::Ordering::Acquire) {
                        std::thread::sleep(std::time::Duration::from_millis(1000));
                        if done.load(std::sync::atomic::Ordering::Acquire) {
                            break;
                        }
                        let Ok(st) = vmm::api::request_with_timeout(&sock, "status", std::time::Duration::from_secs(2))
                        else {
                            continue;
                        };
                        let m = &st["migration"];
                        if m.is_null() {
                            continue;
                        }
                        let line = format!(
                            "migrate: {} {:.1} s, {:.0} MiB sent, {:.0} Mbit/s",
                            m["phase"].as_str().unwrap_or("?"),
                            m["elapsed_s"].as_f64().unwrap_or(0.0),
                            m["bytes_sent"].as_f64().unwrap_or(0.0) / 1048576.0,
                            m["mbit_s"].as_f64().unwrap_or(0.0)
                        );
                        if line != last {
                            eprintln!("{line}");
                            last = line;
                        }
                    }
                })
            };
            let result =
                vmm::api::request_with_timeout(&api_sock, &req.to_string(), std::time::Duration::from_secs(3600));
            done.store(true, std::sync::atomic::Ordering::Release);
            let _ = watcher.join();
            match result {
                Ok(v) => {
                    println!("{v}");
                    if let Some(path) = report {
                        if let Err(e) = std::fs::write(&path, format!("{v:#}\n")) {
                            eprintln!("vmm: cannot write the report to {}: {e}", path.display());
                        }
                    }
                    if v["ok"] == true {
                        ExitCode::SUCCESS
                    } else {
                        eprintln!("vmm: migration failed: {}", v["error"].as_str().unwrap_or("?"));
                        ExitCode::from(EXIT_GUEST_FAILED)
                    }
                }
                Err(e) => {
                    eprintln!("vmm: {e}");
                    ExitCode::from(EXIT_BAD_INPUT)
                }
            }
        }
        Command::Snapshot { api_sock, output } => {
            let output = std::path::absolute(&output).unwrap_or(output);
            let req = serde_json::json!({"command": "snapshot", "path": output}).to_string();
            match vmm::api::request(&api_sock, &req) {
                Ok(v) => {
                    println!("{v}");
                    if v["ok"] == true {
                        ExitCode::SUCCESS
                    } else {
                        eprintln!("vmm: snapshot failed: {}", v["error"].as_str().unwrap_or("?"));
                        ExitCode::from(EXIT_GUEST_FAILED)
                    }
                }
                Err(e) => {
                    eprintln!("vmm: {e}");
                    ExitCode::from(EXIT_BAD_INPUT)
                }
            }
        }
        Command::Stream(args) => stream(args),
        Command::Api { api_sock, command } => match vmm::api::request(&api_sock, &command) {
            Ok(v) => {
                println!("{v}");
                if v["ok"] == true {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::from(EXIT_GUEST_FAILED)
                }
            }
            Err(e) => {
                eprintln!("vmm: {e}");
                ExitCode::from(EXIT_BAD_INPUT)
            }
        },
        Command::Appliance { command } => vmm::appliance_cmd::run(command),
        Command::TestbedImage { output } => match std::fs::write(&output, vmm::testbed::GUEST_ELF) {
            Ok(()) => {
                println!("{}", output.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("vmm: cannot write {}: {e}", output.display());
                ExitCode::from(EXIT_BAD_INPUT)
            }
        },
    }
}
