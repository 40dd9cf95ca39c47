//! Post-copy's source side after the switch-over: pushing pages in rounds
//! over the main connection while a second thread answers demand requests
//! on the demand connection (see [`crate::dest`] for the other end; the
//! rounds come from [`crate::policy`], the driver is [`crate::source`]).

use crate::transport::Conn;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use serde_json::{json, Value};
use vm_memory::{Bytes, GuestAddress};

use crate::error::{Error, Result};
pub use crate::policy::Round;
use crate::space::{
    is_zero, page_digest, send_ranges, zero_digest, Bits, Digests, GuestMem, PageSpace, PAGE_SIZE as PAGE,
    RANGES_PER_FRAME,
};
use crate::transport::SharedCounting;
use crate::wire::{self, FrameReader, FrameWriter, Kind};
use crate::{MAX_REQUEST, PUSH_BATCH};

/// Most data pages a demand answer carries besides the requested one (the
/// rest of its 2 MiB block): 64 KiB, about half a millisecond at 1 Gbit/s.
pub const BLOCK_EXTRA_PAGES: usize = 16;

/// What the source's threads share during post-copy.
pub struct Source {
    pub mem: Arc<GuestMem>,
    pub space: PageSpace,
    /// Pages the destination has or was sent (data, zero or free).
    pub sent: Bits,
    /// Free pages (enlightened); never sent as data.
    pub free: Bits,
    pub digests: Digests,
    pub demand_requests: AtomicU64,
    pub demand_pages: AtomicU64,
    pub demand_bytes: AtomicU64,
    /// Demand pages that had been pushed already (in flight or queued).
    pub demand_duplicates: AtomicU64,
    pub free_pages_sent: AtomicU64,
    /// Pages sent with a demand answer because they share its 2 MiB block.
    pub demand_block_pages: AtomicU64,
}

impl Source {
    pub fn new(mem: Arc<GuestMem>) -> Self {
        let space = PageSpace::of(&*mem);
        let n = space.pages();
        Self {
            mem,
            space,
            sent: Bits::new(n),
            free: Bits::new(n),
            digests: Digests::new(n),
            demand_requests: AtomicU64::new(0),
            demand_pages: AtomicU64::new(0),
            demand_bytes: AtomicU64::new(0),
            demand_duplicates: AtomicU64::new(0),
            free_pages_sent: AtomicU64::new(0),
            demand_block_pages: AtomicU64::new(0),
        }
    }

    /// Marks the free frames (runs of pfns) and returns the ranges clipped to RAM.
    pub fn mark_free(&self, runs: impl Iterator<Item = (u64, u64)>) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        for (pfn, count) in runs {
            for (first, n) in self.space.clip(pfn, count) {
                for i in first..first + n {
                    self.free.set(i);
                    self.sent.set(i);
                }
                out.push((self.space.gpa(first) / PAGE, n));
            }
        }
        out
    }

    fn read(&self, idx: u64, buf: &mut [u8]) -> Result<u64> {
        let gpa = self.space.gpa(idx);
        self.mem.read_slice(buf, GuestAddress(gpa)).map_err(|e| format!("reading page {gpa:#x}: {e}"))?;
        Ok(gpa)
    }

    /// Answers demand requests on `conn` until it closes. Runs on its own thread.
    pub fn serve_demand(&self, conn: Conn, progress: Arc<AtomicU64>) -> Result<()> {
        let mut fr = FrameReader::new(std::io::BufReader::new(conn.try_clone().map_err(|e| e.to_string())?));
        let conn = SharedCounting::new(conn, progress);
        let mut fw = FrameWriter::new(std::io::BufWriter::with_capacity(MAX_REQUEST * wire::PAGE_RECORD + 64, conn));
        let mut out = Vec::with_capacity(MAX_REQUEST * wire::PAGE_RECORD);
        let mut page = vec![0u8; PAGE as usize];
        loop {
            let f = match fr.recv() {
                Ok(Some(f)) => f,
                Ok(None) => return Ok(()),
                Err(e) => return Err(Error::from(format!("demand connection: {e}"))),
            };
            match f.kind {
                Kind::Request => {
                    let gpas = wire::u64s(&f.payload, "request").map_err(|e| e.to_string())?;
                    if gpas.is_empty() || gpas.len() > MAX_REQUEST {
                        return Err(Error::from(format!("a request for {} pages", gpas.len())));
                    }
                    self.demand_requests.fetch_add(1, Ordering::Relaxed);
                    out.clear();
                    let mut zeros: Vec<(u64, u64)> = Vec::new();
                    let mut blocks: Vec<u64> = Vec::new();
                    for gpa in gpas {
                        let idx = self.space.index(gpa).ok_or_else(|| format!("request for {gpa:#x}, not RAM"))?;
                        self.read(idx, &mut page)?;
                        self.digests.set(idx, page_digest(&page));
                        if self.free.get(idx) {
                            self.free_pages_sent.fetch_add(1, Ordering::Relaxed);
                        }
                        if !self.sent.set(idx) {
                            self.demand_duplicates.fetch_add(1, Ordering::Relaxed);
                        }
                        out.extend_from_slice(&gpa.to_le_bytes());
                        out.extend_from_slice(&page);
                        self.demand_pages.fetch_add(1, Ordering::Relaxed);
                        let block = gpa / pager::BLOCK_SIZE;
                        if !blocks.contains(&block) {
                            blocks.push(block);
                            self.block_rest(gpa, &mut out, &mut zeros, &mut page)?;
                        }
                    }
                    let before = fw.bytes;
                    if !zeros.is_empty() {
                        // Before the pages: the destination then sees the
                        // block complete when the pages arrive.
                        send_ranges(&mut fw, Kind::Zero, &zeros).map_err(|e| format!("demand connection: {e}"))?;
                    }
                    fw.send(Kind::Pages, &out).map_err(|e| format!("demand connection: {e}"))?;
                    fw.flush().map_err(|e| format!("demand connection: {e}"))?;
                    self.demand_bytes.fetch_add(fw.bytes - before, Ordering::Relaxed);
                }
                Kind::Abort => {
                    return Err(Error::Aborted {
                        by: "destination",
                        reason: String::from_utf8_lossy(&f.payload).into_owned(),
                    })
                }
                other => return Err(Error::from(format!("unexpected {other:?} frame on the demand connection"))),
            }
        }
    }

    /// With a demand answer, the rest of the requested page's 2 MiB block,
    /// when that is cheap: its zero pages as ranges, and its data pages if
    /// there are at most [`BLOCK_EXTRA_PAGES`]. The destination can then place the whole block
    /// as one huge page at once instead of breaking it into 4 KiB pages.
    fn block_rest(&self, gpa: u64, out: &mut Vec<u8>, zeros: &mut Vec<(u64, u64)>, page: &mut [u8]) -> Result<()> {
        const BLOCK: u64 = pager::BLOCK_SIZE;
        let first = gpa / BLOCK * BLOCK;
        let mut data: Vec<(u64, u64)> = Vec::new();
        let mut zero_idx: Vec<u64> = Vec::new();
        for g in (first..first + BLOCK).step_by(PAGE as usize) {
            let Some(idx) = self.space.index(g) else { continue };
            // Pages sent already go again (a push may hold them in a batch
            // not yet on the wire; the VM is stopped here, so the content is
            // the same and the destination keeps the first copy). Free
            // pages never go.
            if g == gpa || self.free.get(idx) {
                continue;
            }
            self.read(idx, page)?;
            if is_zero(page) {
                zero_idx.push(idx);
            } else {
                data.push((idx, g));
            }
        }
        for idx in zero_idx {
            self.digests.set(idx, zero_digest());
            self.sent.set(idx);
            let pfn = self.space.gpa(idx) / PAGE;
            match zeros.last_mut() {
                Some((a, n)) if *a + *n == pfn => *n += 1,
                _ => zeros.push((pfn, 1)),
            }
        }
        if data.len() > BLOCK_EXTRA_PAGES {
            return Ok(());
        }
        for (idx, g) in data {
            self.read(idx, page)?;
            self.digests.set(idx, page_digest(page));
            self.sent.set(idx);
            out.extend_from_slice(&g.to_le_bytes());
            out.extend_from_slice(page);
            self.demand_block_pages.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Pushes the rounds over `fw`; returns per-round reports.
    pub fn push<W: Write>(&self, rounds: &[Round], fw: &mut FrameWriter<W>, t0: Instant) -> Result<Value> {
        let io = |e: wire::WireError| format!("pushing pages: {e}");
        let mut reports = Vec::new();
        let mut batch: Vec<u8> = Vec::with_capacity(PUSH_BATCH * wire::PAGE_RECORD);
        let mut page = vec![0u8; PAGE as usize];
        for (ri, round) in rounds.iter().enumerate() {
            let t = Instant::now();
            let start_ms = t0.elapsed().as_secs_f64() * 1000.0;
            let before = fw.bytes;
            let mut hdr = Vec::with_capacity(8);
            hdr.extend_from_slice(&(ri as u32).to_le_bytes());
            hdr.extend_from_slice(&round.class.unwrap_or(u32::MAX).to_le_bytes());
            fw.send(Kind::Round, &hdr).map_err(io)?;
            let (mut data, mut zero, mut skipped) = (0u64, 0u64, 0u64);
            let mut zeros: Vec<(u64, u64)> = Vec::new();
            for &idx in &round.pages {
                if self.sent.get(idx) {
                    skipped += 1;
                    continue;
                }
                let gpa = self.read(idx, &mut page)?;
                if is_zero(&page) {
                    self.digests.set(idx, zero_digest());
                    self.sent.set(idx);
                    let pfn = gpa / PAGE;
                    match zeros.last_mut() {
                        Some((a, n)) if *a + *n == pfn => *n += 1,
                        _ => zeros.push((pfn, 1)),
                    }
                    zero += 1;
                    if zeros.len() >= RANGES_PER_FRAME {
                        send_ranges(fw, Kind::Zero, &zeros)?;
                        zeros.clear();
                    }
                    continue;
                }
                self.digests.set(idx, page_digest(&page));
                if self.free.get(idx) {
                    self.free_pages_sent.fetch_add(1, Ordering::Relaxed);
                }
                self.sent.set(idx);
                batch.extend_from_slice(&gpa.to_le_bytes());
                batch.extend_from_slice(&page);
                data += 1;
                if batch.len() >= PUSH_BATCH * wire::PAGE_RECORD {
                    // The zero pages found so far go first: the destination
                    // completes (and places whole) the blocks behind them.
                    if !zeros.is_empty() {
                        send_ranges(fw, Kind::Zero, &zeros)?;
                        zeros.clear();
                    }
                    fw.send(Kind::Pages, &batch).map_err(io)?;
                    batch.clear();
                }
            }
            if !zeros.is_empty() {
                send_ranges(fw, Kind::Zero, &zeros)?;
            }
            if !batch.is_empty() {
                fw.send(Kind::Pages, &batch).map_err(io)?;
                batch.clear();
            }
            fw.flush().map_err(io)?;
            let ms = t.elapsed().as_secs_f64() * 1000.0;
            log::info!(
                "post-copy round {ri} ({}): {data} pages, {zero} zero, {skipped} already there, {:.0} ms",
                round.name,
                ms
            );
            reports.push(json!({
                "round": ri, "name": round.name, "pages": round.pages.len(), "data_pages": data,
                "zero_pages": zero, "skipped": skipped, "bytes": fw.bytes - before,
                "start_ms": start_ms, "ms": ms,
            }));
        }
        Ok(Value::Array(reports))
    }

    /// The source's digest summary (valid once every page was sent).
    pub fn summary(&self) -> [u8; 32] {
        self.digests.summary()
    }
}
