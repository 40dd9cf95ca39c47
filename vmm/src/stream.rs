//! `vmm stream`: running a VM from a remote appliance before it has arrived
//! (appliances are made by `vmm appliance create`, `appliance_cmd.rs`).
//!
//! Streaming uses the same page-fault machinery as post-copy migration:
//! guest RAM is registered with userfaultfd ([`pager::Pager`]) before the
//! VM is created from the appliance's device state; fault threads resolve
//! each first access through the appliance session (`appliance::session`:
//! zero and free chunks without a fetch, the local content-addressed cache,
//! demand fetches that drive vTube's buffering and streaming decisions).
//! The disk is a sparse local overlay: the virtio-blk device asks
//! [`DiskBackfill`] for the chunks a request covers before it touches them;
//! missing ones are read through the session (same cache, same trace) and
//! written into the overlay; writes go to the overlay (a partly overwritten
//! chunk is fetched first).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use appliance::session::{Session, SessionConfig};
use appliance::Client;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::memory;
use crate::snapshot::SnapshotReader;
use crate::vm::{BootSource, SerialOut, Vm, VmConfig};

/// Fault threads per streamed VM (faults of different vCPUs fetch in parallel).
const FAULT_THREADS: usize = 4;

/// A VM streamed from an appliance, ready to run.
pub struct Streamed {
    pub vm: Vm,
    pub session: Arc<Session>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    pager: Arc<pager::Pager>,
    latencies: Arc<pager::Latencies>,
}

/// The streaming machinery of a [`Streamed`] VM, apart from the VM.
pub struct StreamRest {
    pub session: Arc<Session>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    pager: Arc<pager::Pager>,
    latencies: Arc<pager::Latencies>,
}

impl Streamed {
    /// Splits the VM (to run) from the machinery (to finish afterwards).
    pub fn into_parts(self) -> (Vm, StreamRest) {
        let Streamed { vm, session, stop, threads, pager, latencies } = self;
        (vm, StreamRest { session, stop, threads, pager, latencies })
    }
}

impl StreamRest {
    /// Stops the fault threads and ends the session (uploading its trace).
    pub fn finish(self, upload: bool) -> serde_json::Value {
        self.stop.store(true, Ordering::Release);
        for t in self.threads {
            let _ = t.join();
        }
        let stats = self.session.stats();
        let prediction = self.session.prediction();
        let client = self.session.client().stats();
        let trace = match self.session.finish(upload) {
            Ok(t) => serde_json::json!({"accesses": t.accesses.len(), "uploaded": upload}),
            Err(e) => serde_json::json!({"error": e.to_string()}),
        };
        serde_json::json!({
            "knowledge_version": self.session.knowledge_version(),
            "session": stats,
            "prediction": prediction,
            "client": client,
            "trace": trace,
            "pages_missing": self.pager.missing(),
            "memory_faults": self.pager.counters.faults.load(Ordering::Relaxed),
            "zero_pages_mapped": self.pager.counters.zeroed.load(Ordering::Relaxed),
            "fault_latency_ms": self.latencies.summary(),
        })
    }
}

/// Starts streaming appliance `name` from `url`: the session (launch
/// buffering included), guest RAM behind userfaultfd, the disk, the VM.
pub fn start(url: &str, name: &str, cache: &Path, serial: SerialOut, cfg: SessionConfig) -> Result<Streamed, String> {
    let client = Arc::new(Client::new(url, cache).map_err(|e| format!("appliance server {url}: {e}"))?);
    let session = Session::start(client, name, cfg).map_err(|e| format!("appliance `{name}`: {e}"))?;
    let m = session.manifest();
    let snapshot: crate::snapshot::Snapshot = serde_json::from_slice(&m.device_state)
        .map_err(|e| format!("appliance `{name}`: malformed device state: {e}"))?;
    let mut reader = SnapshotReader::from_state(snapshot, Path::new(&format!("appliance {name}")))
        .map_err(|e| format!("appliance `{name}`: device state: {e}"))?;
    let config = reader.snapshot.config.clone();
    let mem = Arc::new(memory::create(&crate::arch::ram_regions(config.mem_size)).map_err(|e| e.to_string())?);
    let regions: Vec<(u64, u64)> = mem.iter().map(|r| (r.start_addr().0, r.len())).collect();
    let manifest_regions: Vec<(u64, u64)> = m.regions.iter().map(|r| (r.gpa, r.size)).collect();
    if regions != manifest_regions {
        return Err(format!("appliance `{name}`: memory regions {manifest_regions:x?} do not match {regions:x?}"));
    }
    let mut pregions = Vec::new();
    for r in mem.iter() {
        let host = mem.get_host_address(r.start_addr()).map_err(|e| e.to_string())?;
        pregions.push(pager::Region { guest_base: r.start_addr().0, host_addr: host as usize, len: r.len() as usize });
    }
    // SAFETY: the regions are the VM's fresh guest RAM mappings, untouched so
    // far; `mem` lives in the VM, which outlives the pager's use (the fault
    // threads end in `finish`, before the VM's memory is dropped by `main`).
    let pager = Arc::new(unsafe { pager::Pager::register(&pregions) }.map_err(|e| e.to_string())?);
    let stop = Arc::new(AtomicBool::new(false));
    let latencies = Arc::new(pager::Latencies::default());
    let mut threads = Vec::new();
    for i in 0..FAULT_THREADS {
        let (p, s, st, l) = (pager.clone(), session.clone(), stop.clone(), latencies.clone());
        threads.push(
            std::thread::Builder::new()
                .name(format!("stream-fault-{i}"))
                .spawn(move || serve_faults(&p, &s, &st, &l))
                .map_err(|e| e.to_string())?,
        );
    }

    // The disk: a sparse overlay, populated on access.
    let mut backfill = None;
    if m.disk_size.is_some() {
        let path = cache.join(format!("{name}-{}.overlay", session.manifest_hash().to_hex()));
        let overlay = appliance::overlay::DiskOverlay::create(session.clone(), &path)
            .map_err(|e| format!("disk overlay {}: {e}", path.display()))?;
        backfill = Some(Arc::new(DiskBackfill(overlay)));
        reader.snapshot.config.disks = vec![path];
    } else {
        reader.snapshot.config.disks.clear();
    }
    let cfg = VmConfig::new(
        0,
        1,
        BootSource::Restore { snapshot: PathBuf::from(format!("appliance {name}")) },
        Vec::new(),
        serial,
    );
    let vm = Vm::create_incoming(cfg, mem, reader).map_err(|e| format!("creating the VM: {e}"))?;
    if let Some(b) = backfill {
        for d in &vm.shared().blocks {
            d.set_backfill(b.clone());
        }
    }
    // Buffering (vTube): the whole VM waits, not just the faulting vCPU.
    {
        let (sess, shared, st) = (session.clone(), vm.shared(), stop.clone());
        threads.push(
            std::thread::Builder::new()
                .name("stream-buffering".into())
                .spawn(move || pause_while_buffering(&sess, &shared, &st))
                .map_err(|e| e.to_string())?,
        );
    }
    Ok(Streamed { vm, session, stop, threads, pager, latencies })
}

fn pause_while_buffering(session: &Session, shared: &crate::vm::Shared, stop: &AtomicBool) {
    use crate::api::ApiTarget;
    while !stop.load(Ordering::Acquire) {
        if !session.buffering() {
            std::thread::sleep(Duration::from_millis(5));
            continue;
        }
        let ours = !shared.control.is_paused() && shared.pause().is_ok();
        session.wait_resumed();
        if ours {
            shared.resume_vm();
        }
    }
}

/// Streamed memory as the fault loop's page source: a page is fetched
/// through the session (cache, prefetch, or the server), mapped as the zero
/// page if the appliance says it is zero or free, and retried with a back-off
/// while the server is unreachable (only the vCPUs that need it wait).
struct StreamPages<'a> {
    session: &'a Session,
    stop: &'a AtomicBool,
}

impl pager::PageSource for StreamPages<'_> {
    fn answer(&mut self, gpa: u64, page: &mut [u8]) -> std::io::Result<pager::Answer> {
        match self.session.read_mem(gpa) {
            Ok(Some(data)) if data.len() == page.len() => {
                page.copy_from_slice(&data);
                Ok(pager::Answer::Data)
            }
            Ok(Some(data)) => Err(std::io::Error::other(format!(
                "chunk of {} bytes for page {gpa:#x} (a page is {} bytes)",
                data.len(),
                page.len()
            ))),
            Ok(None) => Ok(pager::Answer::Zero),
            Err(e) => {
                log::warn!("stream: page {gpa:#x}: {e}; retrying");
                Ok(pager::Answer::Retry)
            }
        }
    }

    fn done(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }
}

fn serve_faults(pager: &pager::Pager, session: &Session, stop: &AtomicBool, latencies: &pager::Latencies) {
    let mut source = StreamPages { session, stop };
    if let Err(e) = pager::serve(pager, &mut source, latencies, pager::faults::Options::default()) {
        log::error!("stream: serving faults: {e}");
    }
}

/// The streamed disk: the virtio-blk device reads and writes the overlay
/// file itself; before it does, every chunk the request covers is made
/// present (fetched through the session if missing). Writes need the chunk
/// too: the overlay must not later fetch it over what the guest wrote.
struct DiskBackfill(appliance::overlay::DiskOverlay);

impl virtio_devices::block::Backfill for DiskBackfill {
    fn ensure(&self, offset: u64, len: u64, _for_write: bool) -> std::io::Result<()> {
        let cs = appliance::CHUNK_SIZE as u64;
        let end = offset.saturating_add(len).min(self.0.size());
        let mut at = offset;
        let mut byte = [0u8; 1];
        while at < end {
            // Reading one byte of a chunk waits until the chunk is present.
            self.0.read_at(&mut byte, at).map_err(|e| std::io::Error::other(e.to_string()))?;
            at = (at / cs + 1) * cs;
        }
        Ok(())
    }
}
