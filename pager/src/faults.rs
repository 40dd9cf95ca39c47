//! The one userfaultfd fault loop, shared by post-copy migration and
//! appliance streaming.
//!
//! [`serve`] waits for faults on a [`Pager`], drains the ones already queued
//! into a batch and asks a [`PageSource`] about each page:
//!
//! - [`Answer::Data`]: the source filled the page buffer; the loop installs it
//!   (`UFFDIO_COPY`) and wakes the faulting thread;
//! - [`Answer::Zero`]: the page is known to be zero (or free); the loop maps
//!   the zero page (`UFFDIO_ZEROPAGE`): nothing is copied;
//! - [`Answer::Requested`]: the source asked someone (the migration source, over
//!   the demand connection) and another thread installs the answer; the
//!   faulting thread sleeps until then;
//! - [`Answer::Retry`]: not available now (a server is down); asked again after a
//!   back-off of 100 ms doubling to 5 s, unless the source says it is done.
//!
//! After each batch [`PageSource::end_batch`] lets the source send what it
//! requested as one message. Latencies from fault to installation go into a
//! [`Latencies`] histogram: the loop records the pages it installs itself, the
//! installer of a requested page records it with [`Latencies::record`].

use std::io;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::{Pager, PAGE_SIZE};

/// What a [`PageSource`] says about a faulting page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    /// The page buffer holds the content: install it.
    Data,
    /// The page is zero: map the zero page.
    Zero,
    /// Someone else installs it (an answer is on its way).
    Requested,
    /// Not available now: ask again after a back-off.
    Retry,
}

/// Where faulting pages come from.
pub trait PageSource {
    /// Answers a fault on the page at `gpa` (page aligned). For
    /// [`Answer::Data`], `page` (one page) must be filled.
    fn answer(&mut self, gpa: u64, page: &mut [u8]) -> io::Result<Answer>;

    /// Called after each batch of faults (the requests of a batch can go out
    /// as one message).
    fn end_batch(&mut self) -> io::Result<()> {
        Ok(())
    }

    /// Called before each wait for faults (for example to take over a new
    /// connection after a reconnection).
    fn before_wait(&mut self) -> io::Result<()> {
        Ok(())
    }

    /// Whether the loop should end (checked before each wait and between retries).
    fn done(&self) -> bool;
}

/// How the loop runs.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// Longest wait for a fault before `done` and `before_wait` are checked again.
    pub poll: Duration,
    /// Most faults answered in one batch.
    pub max_batch: usize,
}

impl Default for Options {
    fn default() -> Self {
        Self { poll: Duration::from_millis(50), max_batch: 64 }
    }
}

/// Fault-to-installation latencies.
#[derive(Default)]
pub struct Latencies {
    us: Mutex<Vec<u64>>,
}

/// A summary of [`Latencies`], in milliseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LatencySummary {
    pub count: u64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
    pub mean: f64,
}

impl Latencies {
    /// Records a fault seen at `since` and resolved now.
    pub fn record(&self, since: Instant) {
        self.record_us(since.elapsed().as_micros() as u64);
    }

    /// Records a latency in microseconds.
    pub fn record_us(&self, us: u64) {
        self.us.lock().unwrap_or_else(|e| e.into_inner()).push(us);
    }

    /// Records several latencies in microseconds.
    pub fn extend_us(&self, us: impl IntoIterator<Item = u64>) {
        self.us.lock().unwrap_or_else(|e| e.into_inner()).extend(us);
    }

    pub fn count(&self) -> u64 {
        self.us.lock().unwrap_or_else(|e| e.into_inner()).len() as u64
    }

    /// Percentiles (nearest rank), maximum and mean.
    pub fn summary(&self) -> LatencySummary {
        let mut v = self.us.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if v.is_empty() {
            return LatencySummary::default();
        }
        v.sort_unstable();
        let ms = |us: u64| us as f64 / 1000.0;
        let pct = |p: f64| ms(v[((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1]);
        LatencySummary {
            count: v.len() as u64,
            p50: pct(0.50),
            p90: pct(0.90),
            p99: pct(0.99),
            max: ms(*v.last().unwrap_or(&0)),
            mean: v.iter().sum::<u64>() as f64 / v.len() as f64 / 1000.0,
        }
    }
}

/// What one [`serve`] call did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Served {
    pub faults: u64,
    pub data: u64,
    pub zero: u64,
    pub requested: u64,
    pub retries: u64,
}

const RETRY_FIRST: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);

/// Serves faults on `pager` from `source` until every page is present or
/// `source.done()`. Several threads may serve one pager, each with its own
/// source: each fault is delivered to one of them.
pub fn serve(pager: &Pager, source: &mut dyn PageSource, latencies: &Latencies, opts: Options) -> io::Result<Served> {
    let mut page = vec![0u8; PAGE_SIZE as usize];
    let mut served = Served::default();
    while !source.done() && pager.missing() > 0 {
        source.before_wait()?;
        let Some(first) = pager.wait_fault(opts.poll)? else { continue };
        let seen = Instant::now();
        let mut next = Some(first);
        let mut n = 0;
        while let Some(gpa) = next {
            served.faults += 1;
            match answer_one(pager, source, gpa, &mut page, &mut served)? {
                None => break,
                Some(Answer::Data | Answer::Zero) => latencies.record(seen),
                Some(_) => {}
            }
            n += 1;
            if n >= opts.max_batch {
                break;
            }
            next = pager.wait_fault(Duration::ZERO)?;
        }
        source.end_batch()?;
    }
    Ok(served)
}

/// Answers one fault (retrying as long as the source says so); `None` if
/// the source became done while retrying.
fn answer_one(
    pager: &Pager,
    source: &mut dyn PageSource,
    gpa: u64,
    page: &mut [u8],
    served: &mut Served,
) -> io::Result<Option<Answer>> {
    let mut delay = RETRY_FIRST;
    loop {
        let a = source.answer(gpa, page)?;
        match a {
            Answer::Data => {
                pager.install(gpa, page)?;
                served.data += 1;
            }
            Answer::Zero => {
                pager.install_zero(gpa, PAGE_SIZE)?;
                served.zero += 1;
            }
            Answer::Requested => served.requested += 1,
            Answer::Retry => {
                served.retries += 1;
                if source.done() {
                    return Ok(None);
                }
                std::thread::sleep(delay);
                delay = (delay * 2).min(RETRY_MAX);
                continue;
            }
        }
        return Ok(Some(a));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::{fill, page_of, pattern, setup, BASE};
    use std::collections::HashSet;
    use std::sync::atomic::Ordering;
    use std::sync::{Arc, Mutex};

    /// Even pages are zero, every third page is requested from a helper
    /// thread, page 5 fails twice before it arrives, the rest are data.
    struct Mixed {
        requests: Arc<Mutex<Vec<u64>>>,
        fails: u32,
        batches: u32,
    }

    impl PageSource for Mixed {
        fn answer(&mut self, gpa: u64, page: &mut [u8]) -> io::Result<Answer> {
            let p = (gpa - BASE) / PAGE_SIZE;
            if p == 5 && self.fails < 2 {
                self.fails += 1;
                return Ok(Answer::Retry);
            }
            if p % 2 == 0 {
                return Ok(Answer::Zero);
            }
            if p % 3 == 0 {
                self.requests.lock().unwrap().push(gpa);
                return Ok(Answer::Requested);
            }
            fill(gpa, page);
            Ok(Answer::Data)
        }
        fn end_batch(&mut self) -> io::Result<()> {
            self.batches += 1;
            Ok(())
        }
        fn done(&self) -> bool {
            false
        }
    }

    #[test]
    fn data_zero_requested_and_retried_pages_all_arrive() {
        let pages = 48u64;
        let (m, pager) = setup(pages as usize);
        let requests = Arc::new(Mutex::new(Vec::new()));
        let lat = Arc::new(Latencies::default());
        // The "demand connection": installs requested pages as they come.
        let answerer = {
            let (pager, requests, lat) = (pager.clone(), requests.clone(), lat.clone());
            std::thread::spawn(move || {
                let mut seen = HashSet::new();
                while pager.missing() > 0 {
                    let batch: Vec<u64> = std::mem::take(&mut *requests.lock().unwrap());
                    for gpa in batch {
                        assert!(seen.insert(gpa), "page {gpa:#x} requested twice");
                        let t = Instant::now();
                        pager.install(gpa, &page_of(gpa)).unwrap();
                        lat.record(t);
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
            })
        };
        let readers: Vec<_> = (0..2)
            .map(|t| {
                let m = m.clone();
                std::thread::spawn(move || {
                    for p in (0..pages).filter(|p| p % 2 == t) {
                        let want = if p % 2 == 0 { 0 } else { pattern(BASE + p * PAGE_SIZE + 16) };
                        assert_eq!(m.read_u64((p * PAGE_SIZE) as usize + 16), want, "page {p}");
                    }
                })
            })
            .collect();
        let mut src = Mixed { requests, fails: 0, batches: 0 };
        let served = serve(&pager, &mut src, &lat, Options::default()).unwrap();
        for r in readers {
            r.join().unwrap();
        }
        answerer.join().unwrap();
        assert_eq!(pager.missing(), 0);
        assert_eq!(served.zero, pages / 2, "{served:?}");
        assert_eq!(served.zero + served.data + served.requested, served.faults, "{served:?}");
        assert_eq!(served.retries, 2);
        assert!(src.batches >= 1);
        // Zero pages went through UFFDIO_ZEROPAGE, not a copy.
        assert_eq!(pager.counters.zeroed.load(Ordering::Relaxed), pages / 2);
        assert_eq!(lat.count(), served.faults);
        let s = lat.summary();
        assert!(s.p50 <= s.p99 && s.p99 <= s.max && s.count == served.faults, "{s:?}");
    }

    #[test]
    fn a_done_source_ends_the_loop_while_pages_are_missing() {
        struct Never;
        impl PageSource for Never {
            fn answer(&mut self, _: u64, _: &mut [u8]) -> io::Result<Answer> {
                Ok(Answer::Retry)
            }
            fn done(&self) -> bool {
                true
            }
        }
        let (_m, pager) = setup(4);
        let served = serve(&pager, &mut Never, &Latencies::default(), Options::default()).unwrap();
        assert_eq!(served, Served::default());
        assert_eq!(pager.missing(), 4);
    }

    #[test]
    fn summary_percentiles() {
        let l = Latencies::default();
        assert_eq!(l.summary(), LatencySummary::default());
        l.extend_us((1..=100).map(|i| i * 1000));
        let s = l.summary();
        assert_eq!((s.count, s.p50, s.p90, s.p99, s.max), (100, 50.0, 90.0, 99.0, 100.0));
        assert!((s.mean - 50.5).abs() < 1e-9);
    }
}
