//! The enlightenment device (see `virtio_devices::enlighten`) served to QEMU
//! as a vhost-user backend, plus a small control API. Guest RAM must be a
//! shared memfd backend (`-object memory-backend-memfd,...,share=on`).
//!
//! QEMU 10's generic `vhost-user-device(-pci)` (`virtio-id=63,num_vqs=2,
//! config_size=8`) would be the natural front-end, but QEMU marks it not
//! user-creatable ("Parameter 'driver' expects a pluggable device type").
//! `-device vhost-user-gpio-pci,chardev=...` is a vhost-user device with the
//! same shape (two queues, an 8-byte config read from the backend) under
//! virtio ID 41; the guest module binds it when booted with
//! `enlighten.alias_id=41` (see guest-module/README.md). The backend does
//! not care which ID QEMU shows the guest.
//!
//! # Pieces
//! - [`EnlightenBackend`] implements rust-vmm's [`VhostUserBackend`]. It
//!   wraps the very [`Enlighten`] device the VMM's virtio-mmio transport
//!   uses: a kick on a queue runs [`VirtioDevice::process_queue`] on that
//!   vring's [`Queue`] with the guest memory QEMU shared, and a command the
//!   host queues is pushed to the guest by an eventfd the backend listens on
//!   (the handle's notifier), as [`virtio_devices::enlighten::deliver`]
//!   does for MMIO.
//! - [`Control`] serves line commands on a Unix socket, one JSON object per
//!   reply line (see [`Control::execute`]).
//!
//! # Raw messages
//! `raw HEX` writes arbitrary bytes into the guest's next command buffer
//! (bypassing the device's encoder) and reports the guest's reply decoded
//! by `bitmap-abi` — the way to check that the guest module rejects
//! malformed commands. Only allowed while no command of the device is
//! outstanding (phase Idle or Ready).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bitmap_abi::wire::{self, Class, Header, Kind, NUM_CLASSES};
use bitmap_abi::{FreeBitmap, PriorityMap};
use serde_json::{json, Value};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_devices::enlighten::{error_code_name, Ready};
use virtio_devices::{Enlighten, EnlightenHandle, VirtioDevice};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemory, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier};

/// Guest memory as the vhost-user backend library maps it.
pub type Memory = GuestMemoryAtomic<GuestMemoryMmap<()>>;

/// Epoll data of the "command queued" event (queues are 0..2, the
/// library's exit event is 2).
pub const DELIVER_EVENT: u16 = wire::NUM_QUEUES as u16 + 1;
/// Largest queue size accepted from the front-end.
pub const MAX_QUEUE_SIZE: usize = 1024;

/// A raw message waiting for a command buffer, or the guest's reply to it.
#[derive(Default)]
struct RawState {
    pending: Option<Vec<u8>>,
    /// Delivered; the next reply belongs to it.
    awaiting: bool,
    reply: Option<Result<Vec<u8>, String>>,
}

struct Inner {
    dev: Enlighten,
    mem: Option<Memory>,
    raw: RawState,
    acked_features: u64,
}

/// The vhost-user backend (cheap to clone; clones share the device).
#[derive(Clone)]
pub struct EnlightenBackend {
    inner: Arc<Mutex<Inner>>,
    cond: Arc<Condvar>,
    handle: EnlightenHandle,
    deliver_consumer: Arc<EventConsumer>,
    deliver_notifier: Arc<EventNotifier>,
}

impl Default for EnlightenBackend {
    fn default() -> Self {
        Self::new()
    }
}

impl EnlightenBackend {
    pub fn new() -> Self {
        let dev = Enlighten::new();
        let handle = dev.handle();
        let (consumer, notifier) =
            new_event_consumer_and_notifier(EventFlag::NONBLOCK).expect("creating an eventfd for command delivery");
        let notifier = Arc::new(notifier);
        let n = notifier.clone();
        handle.set_notifier(move || {
            let _ = n.notify();
        });
        Self {
            inner: Arc::new(Mutex::new(Inner { dev, mem: None, raw: RawState::default(), acked_features: 0 })),
            cond: Arc::new(Condvar::new()),
            handle,
            deliver_consumer: Arc::new(consumer),
            deliver_notifier: notifier,
        }
    }

    /// The host API of the device.
    pub fn handle(&self) -> EnlightenHandle {
        self.handle.clone()
    }

    /// The eventfd to register with the daemon's epoll handler under
    /// [`DELIVER_EVENT`].
    pub fn deliver_fd(&self) -> std::os::unix::io::RawFd {
        use std::os::unix::io::AsRawFd;
        self.deliver_consumer.as_raw_fd()
    }

    /// Asks the backend thread to try delivering pending commands again.
    pub fn redeliver(&self) {
        let _ = self.deliver_notifier.notify();
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The guest memory QEMU shared (None before it did).
    pub fn memory(&self) -> Option<Memory> {
        self.lock().mem.clone()
    }

    fn process(&self, index: usize, vrings: &[VringRwLock]) {
        let Some(vring) = vrings.get(index) else { return };
        let mut g = self.lock();
        let Some(mem) = g.mem.clone() else { return };
        let mem = mem.memory();
        let used = {
            let mut state = vring.get_mut();
            let queue = state.get_queue_mut();
            if !queue.ready() {
                return;
            }
            let raw_used = Self::process_raw(&mut g, index, queue, &*mem);
            match g.dev.process_queue(index, queue, &*mem) {
                Ok(p) => {
                    if let Some(why) = p.last_rejection {
                        log::warn!("enlighten-vhost: queue {index}: {why}");
                    }
                    p.used || raw_used
                }
                Err(e) => {
                    log::error!("enlighten-vhost: queue {index}: {}", e.0);
                    raw_used
                }
            }
        };
        drop(g);
        self.cond.notify_all();
        if used {
            if let Err(e) = vring.signal_used_queue() {
                log::error!("enlighten-vhost: signalling queue {index}: {e}");
            }
        }
    }

    /// Handles raw-message traffic before the device sees the queue.
    fn process_raw<M: GuestMemory>(g: &mut Inner, index: usize, queue: &mut Queue, mem: &M) -> bool {
        let raw = &mut g.raw;
        if index == wire::CMD_QUEUE as usize && raw.pending.is_some() {
            let Some(chain) = queue.iter(mem).ok().and_then(|mut it| it.next()) else { return false };
            let head = chain.head_index();
            let msg = raw.pending.take().unwrap_or_default();
            let mut off = 0usize;
            for d in chain {
                if off == msg.len() || !d.is_write_only() {
                    break;
                }
                let n = (d.len() as usize).min(msg.len() - off);
                if mem.write_slice(&msg[off..off + n], d.addr()).is_err() {
                    break;
                }
                off += n;
            }
            let _ = queue.add_used(mem, head, off as u32);
            raw.awaiting = true;
            return true;
        }
        if index == wire::REPLY_QUEUE as usize && raw.awaiting {
            let Some(chain) = queue.iter(mem).ok().and_then(|mut it| it.next()) else { return false };
            let head = chain.head_index();
            let mut msg = Vec::new();
            let mut bad = None;
            for d in chain.take(64) {
                if d.is_write_only() {
                    bad = Some("device-writable descriptor in a reply".to_string());
                    break;
                }
                let n = d.len() as usize;
                if msg.len() + n > wire::MAX_MESSAGE {
                    bad = Some("reply too long".to_string());
                    break;
                }
                let mut buf = vec![0u8; n];
                if let Err(e) = mem.read_slice(&mut buf, GuestAddress(d.addr().0)) {
                    bad = Some(format!("reading reply: {e}"));
                    break;
                }
                msg.extend_from_slice(&buf);
            }
            let _ = queue.add_used(mem, head, 0);
            raw.awaiting = false;
            raw.reply = Some(match bad {
                Some(b) => Err(b),
                None => Ok(msg),
            });
            return true;
        }
        false
    }

    /// Sends `msg` verbatim as the next command and waits for the guest's
    /// reply (raw bytes).
    pub fn send_raw(&self, msg: Vec<u8>, timeout: Duration) -> Result<Vec<u8>, String> {
        // No command of the device may be outstanding: its reply would be
        // taken for the raw message's.
        let phase = self.handle.phase();
        if !matches!(phase, virtio_devices::Phase::Idle | virtio_devices::Phase::Ready) {
            return Err(format!("raw messages need phase Idle or Ready (phase {phase:?})"));
        }
        {
            let mut g = self.lock();
            g.raw = RawState { pending: Some(msg), awaiting: false, reply: None };
        }
        let _ = self.deliver_notifier.notify();
        let deadline = Instant::now() + timeout;
        let mut g = self.lock();
        loop {
            if let Some(r) = g.raw.reply.take() {
                return r;
            }
            let now = Instant::now();
            if now >= deadline {
                g.raw = RawState::default();
                return Err("no reply to the raw message".into());
            }
            g = self.cond.wait_timeout(g, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
        }
    }
}

impl VhostUserBackend for EnlightenBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        wire::NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        wire::DEVICE_FEATURES | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn acked_features(&self, features: u64) {
        let mut g = self.lock();
        g.acked_features = features;
        // Not a reset: QEMU also sets the features again when a stopped VM
        // continues. A host that sees the guest driver go away while it
        // holds frames sends Abort (a new driver acknowledges it).
        log::info!("enlighten-vhost: features {features:#x} acknowledged");
        if let Err(e) = g.dev.activate(features & wire::DEVICE_FEATURES) {
            log::error!("enlighten-vhost: activate: {}", e.0);
        }
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::RESET_DEVICE
    }

    fn reset_device(&self) {
        log::info!("enlighten-vhost: device reset");
        let mut g = self.lock();
        g.dev.reset();
        g.raw = RawState::default();
    }

    fn set_event_idx(&self, _enabled: bool) {}

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let mut data = vec![0u8; size.min(4096) as usize];
        self.lock().dev.read_config(u64::from(offset), &mut data);
        data
    }

    fn update_memory(&self, mem: Memory) -> std::io::Result<()> {
        self.lock().mem = Some(mem);
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> std::io::Result<()> {
        match device_event {
            DELIVER_EVENT => {
                let _ = self.deliver_consumer.consume();
                self.process(wire::CMD_QUEUE as usize, vrings);
            }
            i if (i as usize) < wire::NUM_QUEUES => self.process(i as usize, vrings),
            other => log::warn!("enlighten-vhost: unexpected event {other}"),
        }
        Ok(())
    }
}

/// Counts and consistency of maps read from guest memory.
pub fn summarize_maps(free: &[u8], prio: &[u8], frames: u64) -> Result<Value, String> {
    let fb = FreeBitmap::new(free, frames).map_err(|e| format!("free bitmap: {e}"))?;
    let pm = PriorityMap::new(prio, frames).map_err(|e| format!("priority map: {e}"))?;
    let counts = pm.counts();
    let mut free_not_free_class = 0u64;
    let mut free_class_not_free = 0u64;
    for pfn in 0..frames {
        let f = fb.is_free(pfn);
        let c = pm.class(pfn) == Class::Free;
        if f && !c {
            free_not_free_class += 1;
        }
        if c && !f {
            free_class_not_free += 1;
        }
    }
    Ok(json!({
        "frames": frames,
        "free_frames": fb.count_free(),
        "classes": class_json(&counts),
        "free_bit_without_free_class": free_not_free_class,
        "free_class_without_free_bit": free_class_not_free,
    }))
}

fn class_json(counts: &[u64; NUM_CLASSES]) -> Value {
    let mut m = serde_json::Map::new();
    for c in Class::ALL {
        m.insert(c.name().to_string(), json!(counts[c as usize]));
    }
    Value::Object(m)
}

fn ready_json(r: &Ready, latency: Option<Duration>) -> Value {
    json!({
        "ok": true,
        "seq": r.seq(),
        "frames": r.frames(),
        "sweep_us": r.info.sweep_us,
        "classify_us": r.info.classify_us,
        "latency_us": latency.map(|d| d.as_micros() as u64),
        "classes": class_json(&r.info.class_counts),
        "free_extents": r.free_extents.len(),
        "prio_extents": r.prio_extents.len(),
    })
}

fn hex_decode(s: &str) -> Result<Vec<u8>, String> {
    let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    if s.len() % 2 != 0 {
        return Err("odd number of hex digits".into());
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).map_err(|e| format!("hex: {e}"))).collect()
}

/// Describes a raw reply from the guest.
pub fn describe_reply(msg: &[u8]) -> Value {
    match Header::decode(msg) {
        Err(e) => json!({"ok": false, "error": format!("malformed guest reply: {e}"), "len": msg.len()}),
        Ok(h) => match h.kind {
            Kind::Error => match wire::decode_error(msg) {
                Ok((seq, code)) => json!({"ok": true, "kind": "error", "seq": seq, "code": code,
                    "code_name": error_code_name(code)}),
                Err(e) => json!({"ok": false, "error": format!("malformed Error reply: {e}")}),
            },
            k => json!({"ok": true, "kind": format!("{k:?}").to_lowercase(), "seq": h.seq, "len": msg.len()}),
        },
    }
}

/// The control API (see [`Control::execute`]).
#[derive(Clone)]
pub struct Control {
    backend: EnlightenBackend,
    timeout: Duration,
    last_request: Arc<Mutex<Option<Instant>>>,
}

impl Control {
    pub fn new(backend: EnlightenBackend, timeout: Duration) -> Self {
        Self { backend, timeout, last_request: Arc::new(Mutex::new(None)) }
    }

    /// Runs one command line; the reply is one JSON object:
    /// - `prepare [window_ms]`: queue a Prepare (default window 16000 ms);
    /// - `wait [timeout_ms]`: wait for Ready; timings and class counts;
    /// - `maps [DIR]`: read both maps from guest memory, validate and count
    ///   them (optionally write `DIR/free_bitmap` and `DIR/priority_map`);
    /// - `done` / `abort`: send it and wait for the Ack;
    /// - `raw HEX`: send raw bytes as a command, report the reply;
    /// - `status`: protocol phase and counters.
    pub fn execute(&self, line: &str) -> Value {
        match self.try_execute(line) {
            Ok(v) => v,
            Err(e) => json!({"ok": false, "error": e}),
        }
    }

    fn try_execute(&self, line: &str) -> Result<Value, String> {
        let mut words = line.split_whitespace();
        let cmd = words.next().unwrap_or("");
        let arg = words.next();
        let h = self.backend.handle();
        match cmd {
            "prepare" => {
                let window = match arg {
                    Some(a) => a.parse::<u32>().map_err(|e| format!("window_ms: {e}"))?,
                    None => wire::DEFAULT_ACTIVE_WINDOW_MS,
                };
                *self.last_request.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
                let seq = h.request_prepare(window).map_err(|e| e.to_string())?;
                Ok(json!({"ok": true, "seq": seq}))
            }
            "wait" => {
                let timeout = match arg {
                    Some(a) => Duration::from_millis(a.parse::<u64>().map_err(|e| format!("timeout_ms: {e}"))?),
                    None => self.timeout,
                };
                // Wait in slices; between them, retry delivery of a command
                // still undelivered (a kick the backend might have missed
                // while the driver was (re)initialising its queues).
                let deadline = Instant::now() + timeout;
                let r = loop {
                    let left = deadline.saturating_duration_since(Instant::now());
                    match h.wait_ready(left.min(Duration::from_millis(500))) {
                        Ok(r) => break r,
                        Err(virtio_devices::enlighten::EnlightenError::Timeout { .. }) if !left.is_zero() => {
                            if h.has_undelivered() {
                                self.backend.redeliver();
                            }
                        }
                        Err(e) => return Err(e.to_string()),
                    }
                };
                Ok(ready_json(&r, h.counters().last_ready_latency))
            }
            "maps" => {
                let ready = h.state().ready.ok_or("no maps: not in phase Ready")?;
                let mem = self.backend.memory().ok_or("no guest memory yet")?;
                let t = Instant::now();
                let (free, prio) = h.read_maps(&*mem.memory(), &ready).map_err(|e| e.to_string())?;
                let read_us = t.elapsed().as_micros() as u64;
                let mut v = summarize_maps(&free, &prio, ready.frames())?;
                if let Some(dir) = arg {
                    let dir = Path::new(dir);
                    std::fs::write(dir.join("free_bitmap"), &free).map_err(|e| format!("writing maps: {e}"))?;
                    std::fs::write(dir.join("priority_map"), &prio).map_err(|e| format!("writing maps: {e}"))?;
                }
                v["ok"] = json!(true);
                v["read_us"] = json!(read_us);
                v["reported_classes"] = class_json(&ready.info.class_counts);
                v["matches_report"] = json!(v["classes"] == v["reported_classes"]);
                Ok(v)
            }
            "done" | "abort" => {
                let t = Instant::now();
                let seq = if cmd == "done" { h.send_done() } else { h.send_abort() }.map_err(|e| e.to_string())?;
                h.wait_ack(self.timeout).map_err(|e| e.to_string())?;
                Ok(json!({"ok": true, "seq": seq, "ack_us": t.elapsed().as_micros() as u64}))
            }
            "raw" => {
                let bytes = hex_decode(arg.ok_or("raw needs HEX bytes")?)?;
                let reply = self.backend.send_raw(bytes, self.timeout)?;
                Ok(describe_reply(&reply))
            }
            "status" => {
                let c = h.counters();
                Ok(json!({
                    "ok": true,
                    "phase": format!("{:?}", h.phase()),
                    "commands_requested": c.commands_requested,
                    "commands_delivered": c.commands_delivered,
                    "ready_replies": c.ready_replies,
                    "acks": c.acks,
                    "error_replies": c.error_replies,
                    "protocol_errors": c.protocol_errors,
                    "last_error": c.last_error,
                    "memory": self.backend.memory().is_some(),
                }))
            }
            "" => Err("empty command".into()),
            other => Err(format!("unknown command '{other}'")),
        }
    }

    /// Serves connections on `listener` (one thread per connection).
    pub fn serve(self, listener: UnixListener) {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            let me = self.clone();
            std::thread::spawn(move || me.serve_conn(conn));
        }
    }

    fn serve_conn(&self, conn: UnixStream) {
        let Ok(mut out) = conn.try_clone() else { return };
        for line in BufReader::new(conn).lines() {
            let Ok(line) = line else { break };
            if line.trim().is_empty() {
                continue;
            }
            let reply = self.execute(line.trim());
            if writeln!(out, "{reply}").is_err() {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_are_counted_and_cross_checked() {
        let frames = 20u64;
        let mut free = vec![0u8; wire::free_bitmap_len(frames) as usize];
        let mut prio = vec![0u8; wire::priority_map_len(frames) as usize];
        for pfn in 0..frames {
            wire::set_class(&mut prio, pfn, Class::UserData).unwrap();
        }
        for pfn in 10..15 {
            wire::set_free_bit(&mut free, pfn, true).unwrap();
            wire::set_class(&mut prio, pfn, Class::Free).unwrap();
        }
        let v = summarize_maps(&free, &prio, frames).unwrap();
        assert_eq!(v["free_frames"], 5);
        assert_eq!(v["classes"]["free"], 5);
        assert_eq!(v["classes"]["user_data"], 15);
        assert_eq!(v["free_bit_without_free_class"], 0);
        // A free bit on a frame of another class is reported.
        wire::set_free_bit(&mut free, 3, true).unwrap();
        let v = summarize_maps(&free, &prio, frames).unwrap();
        assert_eq!(v["free_bit_without_free_class"], 1);
        // Wrong sizes are rejected.
        assert!(summarize_maps(&free[..1], &prio, frames).is_err());
    }

    #[test]
    fn guest_replies_are_decoded_or_rejected_with_a_reason() {
        let mut buf = [0u8; 64];
        let n = wire::encode_error(7, wire::error_code::BAD_STATE, &mut buf).unwrap();
        let v = describe_reply(&buf[..n]);
        assert_eq!(v["ok"], true);
        assert_eq!(v["kind"], "error");
        assert_eq!(v["code"], 2);
        assert_eq!(v["code_name"], "bad state");
        let n = wire::encode_simple(Kind::Ack, 8, &mut buf).unwrap();
        assert_eq!(describe_reply(&buf[..n])["kind"], "ack");
        // Bad magic, truncated, wrong version, payload length.
        let mut bad = buf[..n].to_vec();
        bad[0] ^= 1;
        let v = describe_reply(&bad);
        assert_eq!(v["ok"], false);
        assert!(v["error"].as_str().unwrap().contains("bad magic"), "{v}");
        assert_eq!(describe_reply(&buf[..5])["ok"], false);
        let mut bad = buf[..n].to_vec();
        bad[4] = 9;
        assert!(describe_reply(&bad)["error"].as_str().unwrap().contains("ABI version 9"));
        let mut long = buf[..n].to_vec();
        long.push(0);
        assert!(describe_reply(&long)["error"].as_str().unwrap().contains("payload length"));
    }

    #[test]
    fn hex() {
        assert_eq!(hex_decode("00ff 10").unwrap(), vec![0, 255, 16]);
        assert!(hex_decode("abc").is_err());
        assert!(hex_decode("zz").is_err());
    }

    #[test]
    fn control_commands_without_a_guest() {
        let c = Control::new(EnlightenBackend::new(), Duration::from_millis(50));
        let st = c.execute("status");
        assert_eq!(st["ok"], true);
        assert_eq!(st["phase"], "Idle");
        assert_eq!(st["memory"], false);
        for (cmd, needle) in [
            ("bogus", "unknown command"),
            ("", "empty command"),
            ("prepare 0", "active window"),
            ("prepare x", "window_ms"),
            ("maps", "no maps"),
            ("done", "needs Ready"),
            ("raw zz", "hex"),
            ("wait", "no Prepare"),
        ] {
            let r = c.execute(cmd);
            assert_eq!(r["ok"], false, "{cmd}: {r}");
            assert!(r["error"].as_str().unwrap().contains(needle), "{cmd}: {r}");
        }
        // A Prepare is queued (no guest: it waits for a buffer) and times out.
        assert_eq!(c.execute("prepare 1000")["ok"], true);
        let r = c.execute("wait 20");
        assert!(r["error"].as_str().unwrap().contains("no Ready"), "{r}");
        // Aborting an undelivered Prepare withdraws it.
        assert_eq!(c.execute("abort")["ok"], true);
        assert_eq!(c.execute("status")["phase"], "Idle");
    }
}
