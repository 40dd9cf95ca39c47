//! The enlightenment device from the host's side: asking the guest for its
//! free bitmap and priority map (Prepare, Ready, read the maps), giving its
//! free frames back (Done, Ack), and settling a request a restored VM was
//! in the middle of.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::vm::Shared;

/// How long the guest may take to answer an enlightenment command (a
/// loaded Linux guest under nested emulation takes seconds).
const ENLIGHTEN_TIMEOUT: Duration = Duration::from_secs(30);

impl Shared {
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
