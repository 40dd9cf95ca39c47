//! Post-copy's destination side: guest RAM registered with userfaultfd
//! before anything touches it; the pager's fault loop turns faults into
//! `Request` frames on the demand connection ([`DemandRequests`]), a reader
//! installs the answers, another installs pushed pages; free pages are
//! mapped here as zero pages, never fetched. When no page is missing it
//! unregisters and acknowledges with the digest of everything installed.
//! Pages go in as whole 2 MiB huge pages where they can ([`crate::blocks`]).

use crate::transport::Conn;
use std::collections::HashMap;
use std::io::Read;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::blocks::{Blocks, LazyFault, Staged};
use crate::error::{Error, Result};
use crate::space::{decode_ranges, page_digest, send_ranges, zero_digest, Bits, Digests, PageSpace, PAGE_SIZE as PAGE};
pub use crate::transport::MainConn;
use crate::wire::{self, FrameReader, FrameWriter, Kind};
use crate::MAX_REQUEST;

/// What the destination's threads share during post-copy.
pub struct Dest {
    pub pager: pager::Pager,
    /// Guest RAM as the pager sees it (host addresses).
    regions: Vec<pager::Region>,
    pub space: PageSpace,
    pub digests: Digests,
    /// 2 MiB blocks gathered and placed as huge pages.
    blocks: Blocks,
    /// Requested pages and when the first fault on each was seen.
    pending: Mutex<HashMap<u64, Instant>>,
    latencies: pager::Latencies,
    /// Faults on free pages, mapped here by the fault loop.
    free_latencies: pager::Latencies,
    pub done: AtomicBool,
    pub failed: Mutex<Option<String>>,
    pub push_pages: AtomicU64,
    pub demand_pages: AtomicU64,
    /// Pages that came with a demand answer as the rest of its block.
    pub block_pages: AtomicU64,
    pub zero_pages: AtomicU64,
    pub free_pages: AtomicU64,
    /// Free pages (enlightened): deferred in the pager (never fetched,
    /// zero when faulted), like zero pages.
    free: Bits,
    /// Faults on free pages, resolved locally.
    pub free_faults: AtomicU64,
    pub requests: AtomicU64,
    pub resumed_at: Mutex<Option<Instant>>,
    pub completed_at: Mutex<Option<Instant>>,
    /// (unix ms, ops) samples of the guest's progress.
    pub timeline: Arc<Mutex<Vec<(u64, u64)>>>,
    /// The migration's token (the source presents it to reconnect).
    pub token: Mutex<String>,
    /// A new demand connection for the fault thread (after a reconnection).
    demand_slot: Mutex<Option<Conn>>,
    /// A new main connection for the main reader (after a reconnection).
    main_slot: (Mutex<Option<MainConn>>, std::sync::Condvar),
    /// Sockets of the current connections (shut down when replaced, so
    /// threads blocked on them wake up).
    sockets: Mutex<Vec<Conn>>,
    pub reconnections: AtomicU64,
    /// Ends the sampling.
    pub sampling_done: Arc<AtomicBool>,
}

impl Dest {
    /// Registers all of `mem` with userfaultfd. Nothing may have touched it.
    pub fn register<M: GuestMemoryBackend>(mem: &M) -> Result<Self> {
        let mut regions = Vec::new();
        for r in mem.iter() {
            let host = mem.get_host_address(r.start_addr()).map_err(|e| format!("guest memory: {e}"))?;
            regions.push(pager::Region {
                guest_base: r.start_addr().0,
                host_addr: host as usize,
                len: r.len() as usize,
            });
        }
        // SAFETY: the regions are the VM's guest RAM mappings, which live as
        // long as the VM (the caller keeps `mem` alive as long as the pager)
        // and are not accessed before registration.
        let pager = unsafe { pager::Pager::register(&regions) }.map_err(|e| e.to_string())?;
        let blocks = Blocks::new(&pager, &regions);
        let space = PageSpace::of(mem);
        let n = space.pages();
        Ok(Self {
            pager,
            regions,
            space,
            digests: Digests::new(n),
            blocks,
            pending: Mutex::new(HashMap::new()),
            latencies: pager::Latencies::default(),
            free_latencies: pager::Latencies::default(),
            done: AtomicBool::new(false),
            failed: Mutex::new(None),
            push_pages: AtomicU64::new(0),
            demand_pages: AtomicU64::new(0),
            block_pages: AtomicU64::new(0),
            zero_pages: AtomicU64::new(0),
            free_pages: AtomicU64::new(0),
            free: Bits::new(n),
            free_faults: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            resumed_at: Mutex::new(None),
            completed_at: Mutex::new(None),
            timeline: Arc::new(Mutex::new(Vec::new())),
            token: Mutex::new(String::new()),
            demand_slot: Mutex::new(None),
            main_slot: (Mutex::new(None), std::sync::Condvar::new()),
            sockets: Mutex::new(Vec::new()),
            reconnections: AtomicU64::new(0),
            sampling_done: Arc::new(AtomicBool::new(false)),
        })
    }

    fn fail(&self, e: String) {
        log::error!("post-copy: {e}");
        let mut f = self.failed.lock().unwrap_or_else(|p| p.into_inner());
        if f.is_none() {
            *f = Some(e);
        }
    }

    /// Notes free `(first_pfn, count)` ranges (before the switch-over):
    /// deferred like zero pages, so nothing is mapped (no downtime) and
    /// nothing fetched; a fault on one maps zero locally.
    pub fn note_free(&self, ranges: &[(u64, u64)]) -> Result<()> {
        self.install_ranges(ranges, true)
    }

    /// Zero (or, with `free`, free) `(first_pfn, count)` ranges: deferred in
    /// the pager and the blocks, not mapped; vCPUs already waiting for one
    /// of these pages get a zero page now.
    pub fn install_ranges(&self, ranges: &[(u64, u64)], free: bool) -> Result<()> {
        for &(pfn, count) in ranges {
            let clipped = self.space.clip(pfn, count);
            let total: u64 = clipped.iter().map(|c| c.1).sum();
            if total != count {
                return Err(Error::from(format!("range of {count} pages at frame {pfn:#x} is not all RAM")));
            }
            for (first, n) in clipped {
                let gpa = self.space.gpa(first);
                self.blocks.defer(&self.pager, gpa, n).map_err(|e| format!("noting zero pages at {gpa:#x}: {e}"))?;
                if free {
                    for i in first..first + n {
                        self.free.set(i);
                    }
                }
                let d = if free { 0 } else { zero_digest() };
                for i in first..first + n {
                    self.digests.set(i, d);
                }
                let c = if free { &self.free_pages } else { &self.zero_pages };
                c.fetch_add(n, Ordering::Relaxed);
            }
        }
        self.resolve_pending_ranges(ranges)
    }

    fn resolve_pending_ranges(&self, ranges: &[(u64, u64)]) -> Result<()> {
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if p.is_empty() {
            return Ok(());
        }
        let now = Instant::now();
        let mut lat = Vec::new();
        let mut hits = Vec::new();
        p.retain(|gpa, t| {
            let pfn = gpa / PAGE;
            let hit = ranges.iter().any(|&(a, n)| pfn >= a && pfn < a + n);
            if hit {
                lat.push(now.duration_since(*t).as_micros() as u64);
                hits.push(*gpa);
            }
            !hit
        });
        drop(p);
        for gpa in hits {
            self.zero_fault(gpa).map_err(|e| format!("mapping zero page {gpa:#x}: {e}"))?;
        }
        self.latencies.extend_us(lat);
        Ok(())
    }

    /// Resolves a vCPU's wait for a page now known to be zero: a zeroed
    /// huge page where its block is all zero, else a 4 KiB zero page.
    fn zero_fault(&self, gpa: u64) -> std::io::Result<()> {
        if self.zero_locally(gpa)? {
            self.pager.install_zero(gpa, PAGE)?;
        }
        Ok(())
    }

    /// Resolves a zero (or free) page here, never asking the source: a
    /// zeroed huge page for a block that is all zero (`Ok(false)`: done,
    /// the vCPU woken), else its block breaks and `Ok(true)` says one 4 KiB
    /// zero page is to go in.
    fn zero_locally(&self, gpa: u64) -> std::io::Result<bool> {
        Ok(match self.blocks.fault_lazy(&self.pager, gpa, || {})? {
            LazyFault::Resolved => false,
            LazyFault::Requested => {
                self.blocks.break_at(&self.pager, gpa)?;
                true
            }
            LazyFault::Zero => true,
        })
    }

    /// Installs the pages of a `Pages` payload.
    fn install_pages(&self, payload: &[u8], demand: bool) -> Result<()> {
        let records: Vec<(u64, &[u8])> = wire::page_records(payload).map_err(|e| e.to_string())?.collect();
        // Gather (or install) them all first: a demand answer can carry the
        // rest of its block, which then goes in whole.
        for &(gpa, data) in &records {
            let idx = self.space.index(gpa).ok_or_else(|| format!("page {gpa:#x} is not RAM"))?;
            let staged =
                self.blocks.stage(&self.pager, gpa, data).map_err(|e| format!("gathering page {gpa:#x}: {e}"))?;
            let new = match staged {
                Staged::Gathered(new) => new,
                Staged::Direct => {
                    self.pager.install(gpa, data).map_err(|e| format!("installing page {gpa:#x}: {e}"))?
                        == pager::Installed::New
                }
            };
            if new {
                self.digests.set(idx, page_digest(data));
                let asked = demand && self.pending.lock().unwrap_or_else(|e| e.into_inner()).contains_key(&gpa);
                match (demand, asked) {
                    (false, _) => &self.push_pages,
                    (true, true) => &self.demand_pages,
                    (true, false) => &self.block_pages,
                }
                .fetch_add(1, Ordering::Relaxed);
            }
        }
        // Then no vCPU may wait for a page that is here: a page asked for
        // and still gathered breaks its block (it goes in now).
        for &(gpa, data) in &records {
            let t = self.pending.lock().unwrap_or_else(|e| e.into_inner()).remove(&gpa);
            let Some(t) = t else { continue };
            if !self.pager.is_present(gpa) {
                self.blocks.break_at(&self.pager, gpa).map_err(|e| format!("installing page {gpa:#x}: {e}"))?;
            }
            if !self.pager.is_present(gpa) {
                // A deferred (zero or free) page the vCPU asked the source for.
                let r = self.pager.install(gpa, data).map_err(|e| format!("installing page {gpa:#x}: {e}"))?;
                if let (pager::Installed::New, Some(idx)) = (r, self.space.index(gpa)) {
                    self.digests.set(idx, page_digest(data));
                }
            }
            self.latencies.record(t);
        }
        Ok(())
    }

    /// Turns userfaultfd faults into requests on the demand connection
    /// (the pager's fault loop with a [`DemandRequests`] source). If the
    /// connection breaks, faulting vCPUs wait (the others run on) and the
    /// requests still pending go out again on the next connection.
    pub fn fault_loop(&self, conn: Conn) {
        let mut source = DemandRequests {
            dest: self,
            fw: Some(FrameWriter::new(std::io::BufWriter::new(conn))),
            req: Vec::with_capacity(MAX_REQUEST * 8),
        };
        let opts = pager::faults::Options { poll: Duration::from_millis(50), max_batch: MAX_REQUEST };
        if let Err(e) = pager::serve(&self.pager, &mut source, &self.free_latencies, opts) {
            self.fail(format!("userfaultfd: {e}"));
        }
    }

    /// Installs demand answers until the connection closes.
    pub fn demand_reader(&self, conn: Conn) {
        let mut fr = FrameReader::new(std::io::BufReader::new(conn));
        loop {
            match fr.recv() {
                Ok(Some(f)) if f.kind == Kind::Pages => {
                    if let Err(e) = self.install_pages(&f.payload, true) {
                        return self.fail(e.to_string());
                    }
                }
                // The zero pages of a requested page's block.
                Ok(Some(f)) if f.kind == Kind::Zero => {
                    if let Err(e) = decode_ranges(&f.payload, "zero")
                        .map_err(Error::from)
                        .and_then(|r| self.install_ranges(&r, false))
                    {
                        return self.fail(e.to_string());
                    }
                }
                Ok(Some(f)) => return self.fail(format!("unexpected {:?} frame on the demand connection", f.kind)),
                Ok(None) => return,
                Err(e) => {
                    if !self.done.load(Ordering::Acquire) {
                        log::warn!("post-copy: demand connection: {e}");
                    }
                    return;
                }
            }
        }
    }

    /// Reads pushed pages until `Complete`, waits for the last demand
    /// answers, unregisters the userfaultfd and acknowledges with the
    /// integrity digest and the destination's statistics.
    pub fn main_reader(&self, conn: MainConn) -> Result<()> {
        let (mut fr, mut main, mut wseq) = conn;
        loop {
            match self.read_pushed(&mut fr) {
                Ok(()) => break,
                Err(e) => {
                    // Wait for the source to reconnect; faulting vCPUs wait too.
                    log::warn!("post-copy: main connection: {e}; waiting for the source to reconnect");
                    let (slot, cv) = &self.main_slot;
                    let mut g = slot.lock().unwrap_or_else(|p| p.into_inner());
                    loop {
                        if let Some(c) = g.take() {
                            (fr, main, wseq) = c;
                            break;
                        }
                        g = cv.wait(g).unwrap_or_else(|p| p.into_inner());
                    }
                }
            }
        }
        // Every pushed page is here: the blocks still gathering go in.
        self.blocks.finish(&self.pager).map_err(|e| format!("placing huge pages: {e}"))?;
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.pager.missing() > 0 {
            if let Some(e) = self.failed.lock().unwrap_or_else(|p| p.into_inner()).clone() {
                return Err(Error::Protocol(e));
            }
            if Instant::now() > deadline {
                return Err(Error::from(format!(
                    "{} pages still missing after the source completed",
                    self.pager.missing()
                )));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        *self.completed_at.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        self.done.store(true, Ordering::Release);
        self.pager.unregister().map_err(|e| format!("unregistering the userfaultfd: {e}"))?;
        let summary = self.digests.summary();
        let mut fw = FrameWriter::with_seq(&mut main, wseq);
        fw.send(Kind::Ack, &summary).map_err(|e| format!("acknowledging: {e}"))?;
        fw.flush().map_err(|e| e.to_string())?;
        log::info!("post-copy: every page present; userfaultfd unregistered");
        // A second of the guest's progress after completion, then the stats.
        std::thread::sleep(Duration::from_millis(1000));
        self.sampling_done.store(true, Ordering::Release);
        let stats = self.stats();
        fw.send(Kind::Info, stats.to_string().as_bytes()).map_err(|e| format!("sending statistics: {e}"))?;
        fw.flush().map_err(|e| e.to_string())?;
        // Last, at the lowest priority: huge pages back.
        set_thread_nice(19);
        self.collapse_huge_pages();
        Ok(())
    }

    fn read_pushed(&self, fr: &mut FrameReader<Box<dyn Read + Send>>) -> Result<()> {
        loop {
            let f = fr.expect().map_err(|e| format!("{e}"))?;
            match f.kind {
                Kind::Pages => self.install_pages(&f.payload, false)?,
                Kind::Zero => self.install_ranges(&decode_ranges(&f.payload, "zero")?, false)?,
                Kind::Round => log::debug!("post-copy: round {:?}", &f.payload),
                Kind::Complete => return Ok(()),
                Kind::Abort => {
                    return Err(Error::Aborted {
                        by: "source",
                        reason: String::from_utf8_lossy(&f.payload).into_owned(),
                    })
                }
                other => return Err(Error::from(format!("unexpected {other:?} frame during post-copy"))),
            }
        }
    }

    /// Records the sockets of the current connections.
    pub fn set_sockets(&self, socks: Vec<Conn>) {
        let old = std::mem::replace(&mut *self.sockets.lock().unwrap_or_else(|e| e.into_inner()), socks);
        for s in old {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    /// The pages not yet present, as `(first_pfn, count)` ranges.
    pub fn missing_ranges(&self) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for i in 0..self.space.pages() {
            let gpa = self.space.gpa(i);
            if !self.pager.is_present(gpa) && !self.pager.is_deferred(gpa) && !self.blocks.is_staged(gpa) {
                let pfn = gpa / PAGE;
                match out.last_mut() {
                    Some((a, n)) if *a + *n == pfn => *n += 1,
                    _ => out.push((pfn, 1)),
                }
            }
        }
        out
    }

    /// A source reconnected (`main` authenticated, its resume request read):
    /// tell it what is missing, then hand the connections to the threads.
    pub fn reattach(
        self: &Arc<Self>,
        mut fr: FrameReader<Box<dyn Read + Send>>,
        main: Conn,
        demand: Conn,
    ) -> Result<()> {
        let missing = self.missing_ranges();
        let n: u64 = missing.iter().map(|r| r.1).sum();
        let mut w = main.try_clone().map_err(|e| e.to_string())?;
        let mut fw = FrameWriter::new(&mut w);
        let io = |e: wire::WireError| format!("answering the reconnection: {e}");
        fw.send(Kind::Info, &wire::control::encode(&wire::control::Resumed { resumed: true, missing: n }))
            .map_err(io)?;
        send_ranges(&mut fw, Kind::Missing, &missing)?;
        fw.send(Kind::Complete, &[]).map_err(io)?;
        fw.flush().map_err(io)?;
        let wseq = fw.next_seq();
        self.reconnections.fetch_add(1, Ordering::Relaxed);
        log::info!("post-copy: the source reconnected; {n} pages still missing");
        if self.done.load(Ordering::Acquire) {
            // Already complete: acknowledge again on the new connection.
            fr.expect().map_err(|e| e.to_string())?;
            fw.send(Kind::Ack, &self.digests.summary()).map_err(io)?;
            fw.send(Kind::Info, self.stats().to_string().as_bytes()).map_err(io)?;
            fw.flush().map_err(io)?;
            return Ok(());
        }
        self.set_sockets(vec![
            main.try_clone().map_err(|e| e.to_string())?,
            demand.try_clone().map_err(|e| e.to_string())?,
        ]);
        let reader = demand.try_clone().map_err(|e| e.to_string())?;
        let d = self.clone();
        std::thread::Builder::new()
            .name("postcopy-demand".into())
            .spawn(move || d.demand_reader(reader))
            .map_err(|e| e.to_string())?;
        *self.demand_slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(demand);
        let (slot, cv) = &self.main_slot;
        *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some((fr, main, wseq));
        cv.notify_all();
        Ok(())
    }

    /// Pages installed one by one are 4 KiB pages; the source had huge
    /// pages (MADV_HUGEPAGE). Collapse every 2 MiB block that went in that
    /// way back into a huge page (MADV_COLLAPSE, Linux 6.1+), so the guest
    /// gets its TLB reach back. Blocks placed whole are huge already; blocks
    /// never touched stay unbacked (the kernel gives them a huge page on
    /// first touch); where no block could be placed (no UFFDIO_MOVE), those
    /// with free pages stay as they are.
    fn collapse_huge_pages(&self) {
        const HUGE: usize = 2 << 20;
        let t = Instant::now();
        let (mut done, mut failed) = (0u64, 0u64);
        for r in &self.regions {
            let first = r.host_addr.next_multiple_of(HUGE);
            let mut a = first;
            while a + HUGE <= r.host_addr + r.len {
                let gpa = r.guest_base + (a - r.host_addr) as u64;
                let idx = self.space.index(gpa).unwrap_or(0);
                let pages = idx..idx + (HUGE as u64 / PAGE);
                let worth = if self.blocks.placeable(gpa) {
                    self.blocks.went_small(gpa)
                } else {
                    !pages.clone().any(|i| self.free.get(i))
                };
                let touched = pages.clone().any(|i| self.pager.is_present(self.space.gpa(i)));
                if worth && touched {
                    // SAFETY: [a, a+2M) lies inside a guest RAM mapping this
                    // VMM owns; MADV_COLLAPSE only changes how its (present)
                    // pages are backed, never their content.
                    let rc = unsafe { libc::madvise(a as *mut libc::c_void, HUGE, libc::MADV_COLLAPSE) };
                    if rc == 0 {
                        done += 1;
                    } else {
                        failed += 1;
                    }
                }
                a += HUGE;
            }
        }
        log::info!(
            "post-copy: collapsed {done} 2 MiB blocks into huge pages ({failed} not) in {:.0} ms",
            t.elapsed().as_secs_f64() * 1000.0
        );
    }

    /// Notes that a vCPU waits for `gpa` and adds it to the next request
    /// (once).
    fn ask(&self, gpa: u64, req: &mut Vec<u8>) {
        let fresh = {
            let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            !self.pager.is_present(gpa) && p.insert(gpa, Instant::now()).is_none()
        };
        if fresh {
            req.extend_from_slice(&gpa.to_le_bytes());
        }
    }

    /// Statistics for the source's report.
    pub fn stats(&self) -> Value {
        let lat = self.latencies.summary();
        let since = |t: Option<Instant>, u: Option<Instant>| match (t, u) {
            (Some(a), Some(b)) => b.duration_since(a).as_secs_f64() * 1000.0,
            _ => 0.0,
        };
        let resumed = *self.resumed_at.lock().unwrap_or_else(|e| e.into_inner());
        let completed = *self.completed_at.lock().unwrap_or_else(|e| e.into_inner());
        json!({
            "faults": lat.count,
            "requests": self.requests.load(Ordering::Relaxed),
            "push_pages": self.push_pages.load(Ordering::Relaxed),
            "demand_pages": self.demand_pages.load(Ordering::Relaxed),
            "block_pages": self.block_pages.load(Ordering::Relaxed),
            "zero_pages": self.zero_pages.load(Ordering::Relaxed),
            "free_pages": self.free_pages.load(Ordering::Relaxed),
            "free_faults": self.free_faults.load(Ordering::Relaxed),
            "reconnections": self.reconnections.load(Ordering::Relaxed),
            "huge_blocks_placed": self.blocks.counters.placed.load(Ordering::Relaxed),
            "zero_blocks_placed": self.blocks.counters.zero_placed.load(Ordering::Relaxed),
            "blocks_broken": self.blocks.counters.broken.load(Ordering::Relaxed),
            "blocks_broken_by": self.blocks.counters.broken_by_reason(),
            "blocks_from_prepared_pool": self.blocks.from_pool.load(Ordering::Relaxed),
            "fault_latency_ms": lat,
            "free_fault_latency_ms": self.free_latencies.summary(),
            "resume_to_complete_ms": since(resumed, completed),
            "timeline": self.timeline.lock().unwrap_or_else(|e| e.into_inner())
                .iter().map(|&(t, ops)| json!([t, ops])).collect::<Vec<_>>(),
        })
    }
}

/// The destination's page source for the fault loop: free pages are
/// zero here (never asked for), every other fault becomes a request on the
/// demand connection, sent once per batch; the demand reader installs the
/// answers.
struct DemandRequests<'a> {
    dest: &'a Dest,
    fw: Option<FrameWriter<std::io::BufWriter<Conn>>>,
    req: Vec<u8>,
}

impl DemandRequests<'_> {
    fn send(&mut self, req: &[u8]) {
        if let Some(w) = &mut self.fw {
            self.dest.requests.fetch_add(1, Ordering::Relaxed);
            if let Err(e) = w.send(Kind::Request, req).and_then(|_| w.flush()) {
                log::warn!("post-copy: demand connection lost ({e}); faulting vCPUs wait for the source");
                self.fw = None;
            }
        }
    }
}

impl pager::PageSource for DemandRequests<'_> {
    fn answer(&mut self, gpa: u64, _page: &mut [u8]) -> std::io::Result<pager::Answer> {
        let d = self.dest;
        if d.pager.is_deferred(gpa) {
            if d.space.index(gpa).is_some_and(|i| d.free.get(i)) {
                // Free pages are never asked for: resolved here (a zeroed
                // huge page for a block that is all zero or free, else its
                // block breaks and one zero page goes in).
                d.free_faults.fetch_add(1, Ordering::Relaxed);
                return Ok(if d.zero_locally(gpa)? { pager::Answer::Zero } else { pager::Answer::Requested });
            }
            // A whole zero block placed as a huge page (the vCPU woken), the
            // rest of a filling block asked for, or one zero page.
            let req = &mut self.req;
            return Ok(match d.blocks.fault_lazy(&d.pager, gpa, || d.ask(gpa, req))? {
                LazyFault::Resolved | LazyFault::Requested => pager::Answer::Requested,
                LazyFault::Zero => pager::Answer::Zero,
            });
        }
        let req = &mut self.req;
        d.blocks.fault_data(&d.pager, gpa, || d.ask(gpa, req))?;
        Ok(pager::Answer::Requested)
    }

    fn end_batch(&mut self) -> std::io::Result<()> {
        if !self.req.is_empty() {
            let req = std::mem::take(&mut self.req);
            self.send(&req);
            self.req = req;
            self.req.clear();
        }
        Ok(())
    }

    fn before_wait(&mut self) -> std::io::Result<()> {
        let new = self.dest.demand_slot.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(c) = new {
            self.fw = Some(FrameWriter::new(std::io::BufWriter::new(c)));
            let pending: Vec<u64> =
                self.dest.pending.lock().unwrap_or_else(|e| e.into_inner()).keys().copied().collect();
            for chunk in pending.chunks(MAX_REQUEST) {
                let b: Vec<u8> = chunk.iter().flat_map(|g| g.to_le_bytes()).collect();
                self.send(&b);
            }
        }
        Ok(())
    }

    fn done(&self) -> bool {
        self.dest.done.load(Ordering::Acquire)
    }
}

/// Sets the calling thread's nice value (Linux: per thread), so that
/// background work (collapsing huge pages) yields to the guest's vCPUs.
pub(crate) fn set_thread_nice(nice: i32) {
    // SAFETY: gettid has no preconditions; setpriority on the calling thread
    // (its tid) touches no memory of ours.
    let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, nice) };
    if r != 0 {
        log::debug!("setpriority({nice}): {}", std::io::Error::last_os_error());
    }
}
