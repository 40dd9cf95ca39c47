//! `vmm appliance …`: build, serve and analyse streamable appliances
//! (issue 5; the format, store, server and analysis live in the
//! `appliance` crate).
//!
//! - `create` reads a `vmm snapshot` file, cuts its memory (and a disk) into
//!   4 KiB content-addressed chunks in a store, and records the snapshot's
//!   state (VM configuration, KVM, vCPU and device state: everything but
//!   memory, as the snapshot's own JSON) as the appliance's device state.
//!   Zero pages are detected and marked, never stored.
//! - `serve` serves a store over HTTP.
//! - `analyze` runs vTube's clustering analysis over the traces uploaded for
//!   an appliance and stores the next knowledge version.

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use appliance::analysis::{analyze_appliance, AnalysisParams};
use appliance::server::Server;
use appliance::store::{CreateReport, MemorySource};
use appliance::Store;
use clap::Subcommand;
use vm_memory::{Bytes, GuestAddress};

use crate::memory::GuestMem;
use crate::snapshot::SnapshotReader;

#[derive(Subcommand, Debug)]
pub enum ApplianceCommand {
    /// Make an appliance from a snapshot file (and a disk image) in a chunk store.
    Create {
        /// Snapshot written by `vmm snapshot`.
        #[arg(long, value_name = "FILE")]
        snapshot: PathBuf,
        /// Disk image (default: the snapshot's first disk, if any).
        #[arg(long, value_name = "FILE")]
        disk: Option<PathBuf>,
        /// Store directory (created if missing).
        #[arg(long, value_name = "DIR")]
        store: PathBuf,
        /// Appliance name ([A-Za-z0-9._-], up to 64 characters).
        #[arg(long)]
        name: String,
    },
    /// Serve a store over HTTP (manifests, chunks, knowledge; accepts traces).
    Serve {
        #[arg(long, value_name = "DIR")]
        store: PathBuf,
        /// Address to listen on, e.g. 0.0.0.0:8080.
        #[arg(long, value_name = "ADDR")]
        listen: String,
    },
    /// Run the clustering analysis over an appliance's uploaded traces.
    Analyze {
        #[arg(long, value_name = "DIR")]
        store: PathBuf,
        /// Clustering interval in seconds.
        #[arg(long, default_value_t = 2.0)]
        interval: f64,
        /// Appliance name.
        name: String,
    },
}

/// Reads a range of guest memory as a stream.
struct GuestReader<'a> {
    mem: &'a GuestMem,
    addr: u64,
    end: u64,
}

impl Read for GuestReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = (buf.len() as u64).min(self.end - self.addr) as usize;
        if n == 0 {
            return Ok(0);
        }
        self.mem.read_slice(&mut buf[..n], GuestAddress(self.addr)).map_err(io::Error::other)?;
        self.addr += n as u64;
        Ok(n)
    }
}

/// Creates appliance `name` in the store at `store_dir` from a snapshot file.
pub fn create(snapshot: &Path, disk: Option<&Path>, store_dir: &Path, name: &str) -> Result<CreateReport, String> {
    let reader = SnapshotReader::open(snapshot).map_err(|e| e.to_string())?;
    let state = serde_json::to_vec(&reader.snapshot).map_err(|e| e.to_string())?;
    let config = serde_json::to_value(&reader.snapshot.config).map_err(|e| e.to_string())?;
    let disk_path = disk.map(Path::to_path_buf).or_else(|| reader.snapshot.config.disks.first().cloned());
    let ranges = crate::arch::ram_regions(reader.snapshot.config.mem_size);
    let mem = crate::memory::create(&ranges).map_err(|e| e.to_string())?;
    reader.read_memory(&mem).map_err(|e| e.to_string())?;
    let mut disk_file = match &disk_path {
        Some(p) => Some(File::open(p).map_err(|e| format!("{}: {e}", p.display()))?),
        None => None,
    };
    let store = Store::open(store_dir).map_err(|e| e.to_string())?;
    let sources: Vec<MemorySource> = ranges
        .iter()
        .map(|&(start, size)| MemorySource {
            gpa: start.0,
            size: size as u64,
            data: Box::new(GuestReader { mem: &mem, addr: start.0, end: start.0 + size as u64 }),
        })
        .collect();
    store.create_appliance(name, config, state, sources, &|_| false, disk_file.as_mut()).map_err(|e| e.to_string())
}

/// Runs a subcommand; the exit status follows `vmm`'s (2: bad input or failure).
pub fn run(cmd: ApplianceCommand) -> ExitCode {
    let res = match cmd {
        ApplianceCommand::Create { snapshot, disk, store, name } => create(&snapshot, disk.as_deref(), &store, &name)
            .map(|r| {
                println!("{}", serde_json::to_string_pretty(&r).unwrap_or_default());
                eprintln!(
                    "vmm: appliance `{name}`: {} chunks ({} zero, {} stored new, {} shared), {:.0} MB/s of state",
                    r.mem_chunks + r.disk_chunks,
                    r.zero_chunks,
                    r.new_chunks,
                    r.dedup_chunks,
                    r.input_bytes as f64 / 1e6 / r.seconds.max(1e-9)
                );
            }),
        ApplianceCommand::Serve { store, listen } => (|| {
            let server =
                Server::bind(Store::open(&store).map_err(|e| e.to_string())?, &listen).map_err(|e| e.to_string())?;
            log::info!("serving appliances from {} on http://{}", store.display(), server.local_addr());
            server.run();
            Ok(())
        })(),
        ApplianceCommand::Analyze { store, interval, name } => (|| {
            if !(interval > 0.0 && interval.is_finite()) {
                return Err(format!("--interval {interval}: must be a positive number of seconds"));
            }
            let store = Store::open(&store).map_err(|e| e.to_string())?;
            let params = AnalysisParams { clustering_interval_us: (interval * 1e6) as u64, ..Default::default() };
            let (v, k) = analyze_appliance(&store, &name, &params).map_err(|e| e.to_string())?;
            let chunks: usize = k.clusters.iter().map(|c| c.len()).sum();
            let relations: usize = k.clusters.iter().map(|c| c.next.len()).sum();
            println!(
                "{}",
                serde_json::json!({
                    "appliance": name, "version": v, "traces": k.traces, "clusters": k.clusters.len(),
                    "chunks": chunks, "relations": relations, "start_relations": k.start.len(),
                })
            );
            Ok(())
        })(),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vmm: {e}");
            ExitCode::from(2)
        }
    }
}
