//! The enlightenment device (host side): asks the guest for its free bitmap
//! and priority map (thesis 002, section 5.3) over the ABI of `bitmap-abi`.
//!
//! # Pieces
//! - [`Enlighten`] is the [`VirtioDevice`] (device ID
//!   [`wire::DEVICE_ID`], queues [`wire::CMD_QUEUE`] and
//!   [`wire::REPLY_QUEUE`]). It lives behind the transport's `Mutex` and runs
//!   on vCPU threads when the driver notifies a queue.
//! - [`EnlightenHandle`] is the host API, used from a VMM control thread:
//!   [`request_prepare`](EnlightenHandle::request_prepare),
//!   [`wait_ready`](EnlightenHandle::wait_ready),
//!   [`read_maps`](EnlightenHandle::read_maps),
//!   [`send_done`](EnlightenHandle::send_done) /
//!   [`send_abort`](EnlightenHandle::send_abort),
//!   [`wait_ack`](EnlightenHandle::wait_ack). Device and handle share one
//!   `Mutex` + `Condvar`.
//!
//! # Delivering a command
//! The device can write into guest memory only inside
//! [`VirtioDevice::process_queue`], i.e. with the transport locked. A command
//! is therefore first *queued* in the shared state and then *delivered* the
//! next time queue 0 is processed: it is written into the next buffer the
//! driver posted on [`wire::CMD_QUEUE`], that buffer is put in the used ring
//! and the transport raises the used-buffer interrupt (unless the driver set
//! `VIRTQ_AVAIL_F_NO_INTERRUPT`). Queue 0 is processed
//! - when the driver notifies it (it posted a buffer): a command queued
//!   before the driver had a buffer posted goes out right then;
//! - when the VMM calls [`deliver`] with the transport locked. A driver that
//!   posted its buffers long ago (an interrupt-driven Linux driver posts them
//!   at probe time and sleeps; a polling guest spins on the used ring) would
//!   otherwise never see the command. [`EnlightenHandle::set_notifier`]
//!   registers a callback, typically
//!   `move || deliver(&mut transport.lock().unwrap())`, that the handle calls
//!   after queueing each command (without holding its own lock; the lock
//!   order is transport, then handle state — never call the handle's command
//!   methods while holding the transport lock if a notifier is set).
//!
//! Buffers posted on queue 0 are consumed only when there is a command to
//! deliver, so a driver can keep a few posted at all times.
//!
//! # Trust
//! Nothing the guest writes is trusted. Every reply is decoded with
//! bitmap-abi's validating decoders ([`Header::decode`],
//! [`ReadyInfo::decode`] against the guest memory size,
//! [`wire::decode_error`]); wrong sequence numbers, unexpected kinds,
//! oversized or truncated messages, writable reply buffers and extents
//! outside guest memory are counted as guest errors (the transport's
//! [`crate::MmioTransport::guest_errors`] and
//! [`EnlightenCounters::protocol_errors`]) and fail the outstanding request
//! with [`EnlightenError::Protocol`]; they never panic or put the device in
//! DEVICE_NEEDS_RESET. A well-formed reply carrying the sequence number of an
//! earlier, superseded command (e.g. a late Ready after the host aborted) is
//! counted in [`EnlightenCounters::stale_replies`] and ignored. Structural
//! virtqueue violations (broken descriptor chains) are
//! [`ProtocolError`]s, as for virtio-blk. The maps are copied out of guest
//! memory before they are validated, so a guest changing them meanwhile
//! cannot get an unvalidated map past [`EnlightenHandle::read_maps`].
//!
//! # Protocol state
//! [`Phase::Idle`] → `request_prepare` → [`Phase::Preparing`] → Ready reply →
//! [`Phase::Ready`] (the guest holds its free frames) → `send_done` or
//! `send_abort` → [`Phase::Releasing`] → Ack → [`Phase::Idle`]. An Error
//! reply ends the command and returns to Idle; a protocol violation ends it
//! in [`Phase::Failed`] (the guest may still hold frames: `send_abort`).
//! `send_abort` is accepted in every phase but Releasing; an abort of a
//! Prepare the guest has not received yet withdraws it and completes at
//! once. A driver reset fails a delivered command with
//! [`EnlightenError::DeviceReset`] (a reloaded driver holds nothing) but
//! keeps an undelivered one queued.

use std::collections::VecDeque;
use std::fmt;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bitmap_abi::wire::{self, Extent, Header, Kind, ReadyInfo};
use bitmap_abi::{FreeBitmap, PriorityMap};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryBackend, Permissions};

use crate::mmio::MmioTransport;
use crate::{Processed, ProtocolError, VirtioDevice};

/// Most descriptors in one chain; longer chains are structural violations.
const MAX_CHAIN: usize = 256;
/// How many earlier sequence numbers are remembered to recognise stale
/// replies.
const RECENT_SEQS: usize = 16;
/// Largest accepted activity window (the guest refuses more).
pub const MAX_ACTIVE_WINDOW_MS: u32 = 3_600_000;
/// Longest encoded command.
const MAX_COMMAND: usize = wire::Prepare::LEN;

/// A host → guest command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CommandKind {
    Prepare,
    Done,
    Abort,
}

/// A command with its sequence number (plain data).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PendingCommand {
    pub kind: CommandKind,
    pub seq: u32,
    /// Only meaningful for Prepare.
    pub active_window_ms: u32,
}

impl PendingCommand {
    fn encode(&self, out: &mut [u8; MAX_COMMAND]) -> usize {
        let r = match self.kind {
            CommandKind::Prepare => {
                wire::Prepare { seq: self.seq, active_window_ms: self.active_window_ms }.encode(out)
            }
            CommandKind::Done => wire::encode_simple(Kind::Done, self.seq, out),
            CommandKind::Abort => wire::encode_simple(Kind::Abort, self.seq, out),
        };
        // The buffer fits every command.
        r.unwrap_or(0)
    }
}

/// Where the protocol stands (see the module documentation).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Phase {
    #[default]
    Idle,
    /// A Prepare is queued or delivered; Ready or Error awaited.
    Preparing,
    /// The guest replied Ready: the maps are in guest memory and the guest
    /// holds its free frames until Done or Abort.
    Ready,
    /// A Done or Abort is queued or delivered; Ack or Error awaited.
    Releasing,
    /// The guest violated the protocol; it may still hold frames.
    Failed,
}

/// A validated Ready reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ready {
    /// Frames, timings, per-class counts as the guest reported them.
    pub info: ReadyInfo,
    /// Guest-physical extents of the free bitmap, in map order.
    pub free_extents: Vec<Extent>,
    /// Guest-physical extents of the priority map, in map order.
    pub prio_extents: Vec<Extent>,
}

impl Ready {
    pub fn seq(&self) -> u32 {
        self.info.seq
    }

    pub fn frames(&self) -> u64 {
        self.info.frames
    }
}

/// Why a host API call failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EnlightenError {
    /// No reply within the timeout; the command stays outstanding (wait
    /// again, or `send_abort`).
    Timeout {
        waiting_for: &'static str,
        after: Duration,
    },
    /// The guest replied Error to command `seq`.
    GuestError {
        seq: u32,
        code: u32,
    },
    /// The guest broke the protocol (malformed reply, wrong sequence number
    /// or kind, invalid maps, extents outside guest memory).
    Protocol(String),
    /// The call does not fit the current phase.
    InvalidState(String),
    InvalidArgument(String),
    /// The Prepare was aborted by the host before the guest answered.
    Aborted,
    /// The driver reset the device while the command was outstanding.
    DeviceReset,
    /// Guest memory could not be read.
    Memory(String),
}

/// Name of an Error reply's code.
pub fn error_code_name(code: u32) -> &'static str {
    match code {
        wire::error_code::NO_MEMORY => "no memory",
        wire::error_code::BAD_STATE => "bad state",
        wire::error_code::BAD_COMMAND => "bad command",
        wire::error_code::BACKED_OFF => "backed off",
        _ => "unknown code",
    }
}

impl fmt::Display for EnlightenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EnlightenError::Timeout { waiting_for, after } => {
                write!(f, "no {waiting_for} from the guest within {after:?}")
            }
            EnlightenError::GuestError { seq, code } => {
                write!(f, "guest replied Error {code} ({}) to command {seq}", error_code_name(*code))
            }
            EnlightenError::Protocol(m) => write!(f, "guest protocol violation: {m}"),
            EnlightenError::InvalidState(m) => write!(f, "invalid state: {m}"),
            EnlightenError::InvalidArgument(m) => write!(f, "invalid argument: {m}"),
            EnlightenError::Aborted => write!(f, "the Prepare was aborted by the host"),
            EnlightenError::DeviceReset => write!(f, "the driver reset the device"),
            EnlightenError::Memory(m) => write!(f, "guest memory: {m}"),
        }
    }
}

impl std::error::Error for EnlightenError {}

/// Host-side statistics (not part of the snapshot state).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EnlightenCounters {
    pub commands_requested: u64,
    pub commands_delivered: u64,
    pub ready_replies: u64,
    pub acks: u64,
    /// Error replies from the guest.
    pub error_replies: u64,
    /// Malformed or unexpected replies and invalid maps.
    pub protocol_errors: u64,
    /// Well-formed replies to superseded commands (ignored).
    pub stale_replies: u64,
    /// Command buffers the device could not use (too small, readable).
    pub bad_command_buffers: u64,
    pub timeouts: u64,
    /// Request → delivery of the last command.
    pub last_delivery: Option<Duration>,
    /// request_prepare → Ready of the last Prepare.
    pub last_ready_latency: Option<Duration>,
    /// send_done/abort → Ack of the last release.
    pub last_ack_latency: Option<Duration>,
    /// Guest-reported sweep and classification times of the last Ready (µs).
    pub last_sweep_us: u64,
    pub last_classify_us: u64,
    /// Time `read_maps` took (copy and validation).
    pub last_maps_read: Option<Duration>,
    /// The last protocol error or Error reply, in words.
    pub last_error: Option<String>,
}

/// The protocol state as plain data, for snapshots: restore it with
/// [`EnlightenHandle::restore`] *after* restoring the transport (whose
/// restore resets the device).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EnlightenState {
    pub phase: Phase,
    /// Next sequence number to issue (never 0).
    pub next_seq: u32,
    /// The command whose reply is awaited (Preparing, Releasing).
    pub command: Option<PendingCommand>,
    /// Whether `command` was written into a guest buffer.
    pub delivered: bool,
    /// The Ready reply (phase Ready).
    pub ready: Option<Ready>,
    /// Recently delivered sequence numbers, oldest first.
    pub recent_seqs: Vec<u32>,
}

/// "VENL0001": leads an encoded [`EnlightenState`].
const STATE_MAGIC: u64 = u64::from_le_bytes(*b"VENL0001");

impl EnlightenState {
    /// Encodes the state as little-endian plain data (versioned by a magic;
    /// the Ready reply is kept in its wire form).
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(64);
        b.extend_from_slice(&STATE_MAGIC.to_le_bytes());
        b.push(match self.phase {
            Phase::Idle => 0,
            Phase::Preparing => 1,
            Phase::Ready => 2,
            Phase::Releasing => 3,
            Phase::Failed => 4,
        });
        b.extend_from_slice(&self.next_seq.to_le_bytes());
        match self.command {
            None => b.extend_from_slice(&[0; 10]),
            Some(c) => {
                b.push(1);
                b.push(match c.kind {
                    CommandKind::Prepare => 1,
                    CommandKind::Done => 2,
                    CommandKind::Abort => 3,
                });
                b.extend_from_slice(&c.seq.to_le_bytes());
                b.extend_from_slice(&c.active_window_ms.to_le_bytes());
            }
        }
        b.push(self.delivered as u8);
        b.extend_from_slice(&(self.recent_seqs.len() as u16).to_le_bytes());
        for s in &self.recent_seqs {
            b.extend_from_slice(&s.to_le_bytes());
        }
        let mut msg = vec![0u8; wire::MAX_MESSAGE];
        let n = self.ready.as_ref().and_then(|r| r.info.encode(&r.free_extents, &r.prio_extents, &mut msg).ok());
        let n = n.unwrap_or(0);
        b.extend_from_slice(&(n as u32).to_le_bytes());
        b.extend_from_slice(&msg[..n]);
        b
    }

    /// Decodes [`Self::encode`]'s output (untrusted: every field is checked;
    /// [`EnlightenHandle::restore`] checks the combination).
    pub fn decode(b: &[u8]) -> Result<Self, String> {
        let mut r = b;
        let mut take = |n: usize| -> Result<&[u8], String> {
            if r.len() < n {
                return Err("truncated".into());
            }
            let (a, rest) = r.split_at(n);
            r = rest;
            Ok(a)
        };
        let u32_of = |a: &[u8]| u32::from_le_bytes([a[0], a[1], a[2], a[3]]);
        if take(8)? != STATE_MAGIC.to_le_bytes() {
            return Err("bad magic".into());
        }
        let phase = match take(1)?[0] {
            0 => Phase::Idle,
            1 => Phase::Preparing,
            2 => Phase::Ready,
            3 => Phase::Releasing,
            4 => Phase::Failed,
            v => return Err(format!("phase {v}")),
        };
        let next_seq = u32_of(take(4)?);
        let c = take(10)?;
        let command = match (c[0], c[1]) {
            (0, 0) => None,
            (1, k @ 1..=3) => Some(PendingCommand {
                kind: [CommandKind::Prepare, CommandKind::Done, CommandKind::Abort][k as usize - 1],
                seq: u32_of(&c[2..6]),
                active_window_ms: u32_of(&c[6..10]),
            }),
            (p, k) => return Err(format!("command {p}/{k}")),
        };
        let delivered = match take(1)?[0] {
            0 => false,
            1 => true,
            v => return Err(format!("boolean {v}")),
        };
        let n = take(2)?;
        let n = u16::from_le_bytes([n[0], n[1]]) as usize;
        if n > RECENT_SEQS {
            return Err(format!("{n} recent sequence numbers"));
        }
        let recent_seqs = take(4 * n)?.chunks(4).map(u32_of).collect();
        let len = u32_of(take(4)?) as usize;
        let msg = take(len)?;
        let ready = if len == 0 {
            None
        } else {
            let info = ReadyInfo::decode(msg, u64::MAX).map_err(|e| format!("Ready: {e}"))?;
            let all = (0..info.free_extents as usize + info.prio_extents as usize)
                .map(|i| info.extent(msg, i))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("Ready: {e}"))?;
            let (free, prio) = all.split_at(info.free_extents as usize);
            Some(Ready { info, free_extents: free.to_vec(), prio_extents: prio.to_vec() })
        };
        if !r.is_empty() {
            return Err(format!("{} trailing bytes", r.len()));
        }
        Ok(Self { phase, next_seq, command, delivered, ready, recent_seqs })
    }
}

type Notifier = Arc<dyn Fn() + Send + Sync>;

struct Shared {
    phase: Phase,
    next_seq: u32,
    command: Option<PendingCommand>,
    delivered: bool,
    ready: Option<Ready>,
    recent: VecDeque<u32>,
    /// Outcome of the last Prepare and of the last Done/Abort, by seq.
    prepare_result: Option<(u32, Result<Ready, EnlightenError>)>,
    release_result: Option<(u32, Result<(), EnlightenError>)>,
    prepare_seq: Option<u32>,
    release_seq: Option<u32>,
    requested_at: Option<Instant>,
    counters: EnlightenCounters,
    notifier: Option<Notifier>,
}

impl Shared {
    fn new() -> Self {
        Self {
            phase: Phase::Idle,
            next_seq: 1,
            command: None,
            delivered: false,
            ready: None,
            recent: VecDeque::new(),
            prepare_result: None,
            release_result: None,
            prepare_seq: None,
            release_seq: None,
            requested_at: None,
            counters: EnlightenCounters::default(),
            notifier: None,
        }
    }

    fn take_seq(&mut self) -> u32 {
        let s = self.next_seq;
        self.next_seq = self.next_seq.wrapping_add(1).max(1);
        s
    }

    fn queue(&mut self, kind: CommandKind, active_window_ms: u32) -> u32 {
        let seq = self.take_seq();
        self.command = Some(PendingCommand { kind, seq, active_window_ms });
        self.delivered = false;
        self.requested_at = Some(Instant::now());
        self.counters.commands_requested += 1;
        match kind {
            CommandKind::Prepare => {
                self.phase = Phase::Preparing;
                self.prepare_seq = Some(seq);
                self.prepare_result = None;
                self.ready = None;
            }
            CommandKind::Done | CommandKind::Abort => {
                self.phase = Phase::Releasing;
                self.release_seq = Some(seq);
                self.release_result = None;
            }
        }
        seq
    }

    /// The undelivered command, if any.
    fn undelivered(&self) -> Option<PendingCommand> {
        self.command.filter(|_| !self.delivered)
    }

    fn mark_delivered(&mut self, seq: u32) {
        self.delivered = true;
        self.counters.commands_delivered += 1;
        self.counters.last_delivery = self.requested_at.map(|t| t.elapsed());
        if self.recent.len() == RECENT_SEQS {
            self.recent.pop_front();
        }
        self.recent.push_back(seq);
    }

    /// Ends the outstanding command with `err`, moving to `phase`.
    fn finish_err(&mut self, err: EnlightenError, phase: Phase) {
        let Some(cmd) = self.command.take() else { return };
        self.delivered = false;
        self.phase = phase;
        match cmd.kind {
            CommandKind::Prepare => self.prepare_result = Some((cmd.seq, Err(err))),
            CommandKind::Done | CommandKind::Abort => self.release_result = Some((cmd.seq, Err(err))),
        }
    }

    /// Records a protocol violation: the outstanding command fails.
    fn violation(&mut self, why: String) {
        log::warn!("enlighten: {why}");
        self.counters.protocol_errors += 1;
        self.counters.last_error = Some(why.clone());
        if self.command.is_some() {
            self.finish_err(EnlightenError::Protocol(why), Phase::Failed);
        }
    }

    /// Handles one complete reply; an error is a protocol violation (already
    /// recorded) described for the transport's guest error log.
    fn on_reply(&mut self, msg: &[u8], guest_bytes: u64) -> Result<(), String> {
        let r = self.check_reply(msg, guest_bytes);
        if let Err(why) = &r {
            self.violation(why.clone());
        }
        r
    }

    fn check_reply(&mut self, msg: &[u8], guest_bytes: u64) -> Result<(), String> {
        let h = Header::decode(msg).map_err(|e| format!("reply of {} bytes rejected: {e}", msg.len()))?;
        let outstanding = self.command.filter(|_| self.delivered);
        let cmd = match outstanding {
            Some(c) if c.seq == h.seq => c,
            _ if self.recent.contains(&h.seq) => {
                log::info!("enlighten: ignoring stale {:?} reply to command {}", h.kind, h.seq);
                self.counters.stale_replies += 1;
                return Ok(());
            }
            Some(c) => {
                return Err(format!(
                    "{:?} reply with sequence number {}, expected {} (the {:?} command)",
                    h.kind, h.seq, c.seq, c.kind
                ))
            }
            None => {
                return Err(format!(
                    "unsolicited {:?} reply (sequence number {}): no command outstanding",
                    h.kind, h.seq
                ))
            }
        };
        let latency = self.requested_at.map(|t| t.elapsed());
        match (h.kind, cmd.kind) {
            (Kind::Ready, CommandKind::Prepare) => {
                let info = ReadyInfo::decode(msg, guest_bytes)
                    .map_err(|e| format!("Ready reply to command {} rejected: {e}", h.seq))?;
                let n = info.free_extents as usize + info.prio_extents as usize;
                let extents = (0..n)
                    .map(|i| info.extent(msg, i))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| format!("Ready reply to command {}: extent: {e}", h.seq))?;
                let (free, prio) = extents.split_at(info.free_extents as usize);
                let ready = Ready { info, free_extents: free.to_vec(), prio_extents: prio.to_vec() };
                self.counters.ready_replies += 1;
                self.counters.last_ready_latency = latency;
                self.counters.last_sweep_us = info.sweep_us;
                self.counters.last_classify_us = info.classify_us;
                self.command = None;
                self.delivered = false;
                self.phase = Phase::Ready;
                self.ready = Some(ready.clone());
                self.prepare_result = Some((cmd.seq, Ok(ready)));
            }
            (Kind::Ack, CommandKind::Done | CommandKind::Abort) => {
                if h.payload_len != 0 {
                    return Err(format!("Ack to command {} with a {}-byte payload", h.seq, h.payload_len));
                }
                self.counters.acks += 1;
                self.counters.last_ack_latency = latency;
                self.command = None;
                self.delivered = false;
                self.phase = Phase::Idle;
                self.ready = None;
                self.release_result = Some((cmd.seq, Ok(())));
            }
            (Kind::Error, _) => {
                let (seq, code) =
                    wire::decode_error(msg).map_err(|e| format!("Error reply to command {} rejected: {e}", h.seq))?;
                let err = EnlightenError::GuestError { seq, code };
                log::warn!("enlighten: {err}");
                self.counters.error_replies += 1;
                self.counters.last_error = Some(err.to_string());
                // The guest gave up the command and holds nothing.
                self.ready = None;
                self.finish_err(err, Phase::Idle);
            }
            (k, c) => return Err(format!("{k:?} reply to the {c:?} command {}", h.seq)),
        }
        Ok(())
    }

    /// The driver reset the device.
    fn reset(&mut self) {
        if self.delivered {
            self.finish_err(EnlightenError::DeviceReset, Phase::Idle);
        }
        if self.phase != Phase::Preparing && self.phase != Phase::Releasing {
            self.phase = Phase::Idle;
        }
        self.ready = None;
    }
}

struct Inner {
    state: Mutex<Shared>,
    cond: Condvar,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, Shared> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The host API of the enlightenment device (cheap to clone; all clones and
/// the device share one state).
#[derive(Clone)]
pub struct EnlightenHandle {
    inner: Arc<Inner>,
}

impl fmt::Debug for EnlightenHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EnlightenHandle").field("phase", &self.phase()).finish()
    }
}

impl EnlightenHandle {
    fn new() -> Self {
        Self { inner: Arc::new(Inner { state: Mutex::new(Shared::new()), cond: Condvar::new() }) }
    }

    /// Registers the callback that delivers queued commands, typically
    /// `move || deliver(&mut transport.lock().unwrap())` (see the module
    /// documentation). Called from the thread that queues a command, without
    /// the handle's lock held.
    pub fn set_notifier(&self, f: impl Fn() + Send + Sync + 'static) {
        self.inner.lock().notifier = Some(Arc::new(f));
    }

    /// Waits for a change until `deadline` (`None`: forever); `Err` once
    /// the deadline has passed.
    #[allow(clippy::type_complexity)]
    fn wait<'a>(
        &'a self,
        g: MutexGuard<'a, Shared>,
        deadline: Option<Instant>,
    ) -> Result<MutexGuard<'a, Shared>, MutexGuard<'a, Shared>> {
        let Some(deadline) = deadline else {
            return Ok(self.inner.cond.wait(g).unwrap_or_else(|e| e.into_inner()));
        };
        let now = Instant::now();
        if now >= deadline {
            return Err(g);
        }
        Ok(self.inner.cond.wait_timeout(g, deadline - now).unwrap_or_else(|e| e.into_inner()).0)
    }

    fn kick(&self, g: MutexGuard<'_, Shared>) {
        let n = g.notifier.clone();
        drop(g);
        self.inner.cond.notify_all();
        if let Some(n) = n {
            n();
        }
    }

    /// Queues a Prepare (build the maps; processes scheduled within
    /// `active_window_ms` are active); returns its sequence number. Allowed
    /// in phase Idle only.
    pub fn request_prepare(&self, active_window_ms: u32) -> Result<u32, EnlightenError> {
        if active_window_ms == 0 || active_window_ms > MAX_ACTIVE_WINDOW_MS {
            return Err(EnlightenError::InvalidArgument(format!(
                "active window {active_window_ms} ms (must be 1..={MAX_ACTIVE_WINDOW_MS})"
            )));
        }
        let mut g = self.inner.lock();
        if g.phase != Phase::Idle {
            let hint = if g.phase == Phase::Failed { "; send_abort first" } else { "" };
            return Err(EnlightenError::InvalidState(format!("Prepare requested in phase {:?}{hint}", g.phase)));
        }
        let seq = g.queue(CommandKind::Prepare, active_window_ms);
        self.kick(g);
        Ok(seq)
    }

    /// Waits for the reply to the last Prepare: the validated Ready, or why
    /// there is none. Repeated calls return the same outcome.
    pub fn wait_ready(&self, timeout: Duration) -> Result<Ready, EnlightenError> {
        let deadline = Instant::now().checked_add(timeout);
        let mut g = self.inner.lock();
        let Some(seq) = g.prepare_seq else {
            return Err(EnlightenError::InvalidState("no Prepare was requested".into()));
        };
        loop {
            if let Some((s, r)) = &g.prepare_result {
                if *s == seq {
                    return r.clone();
                }
            }
            if g.phase != Phase::Preparing {
                return Err(EnlightenError::InvalidState(format!("no Prepare outstanding (phase {:?})", g.phase)));
            }
            g = match self.wait(g, deadline) {
                Ok(g) => g,
                Err(mut g) => {
                    g.counters.timeouts += 1;
                    return Err(EnlightenError::Timeout { waiting_for: "Ready", after: timeout });
                }
            };
        }
    }

    /// Copies both maps of `ready` out of guest memory and validates them
    /// (`FreeBitmap::new`, `PriorityMap::new`): (free bitmap, priority map).
    /// `ready` must be the current Ready (phase Ready: the guest still holds
    /// its free frames).
    pub fn read_maps<M: GuestMemory>(&self, mem: &M, ready: &Ready) -> Result<(Vec<u8>, Vec<u8>), EnlightenError> {
        {
            let g = self.inner.lock();
            if g.phase != Phase::Ready || g.ready.as_ref().map(|r| r.seq()) != Some(ready.seq()) {
                return Err(EnlightenError::InvalidState(format!(
                    "the maps of command {} are no longer valid (phase {:?})",
                    ready.seq(),
                    g.phase
                )));
            }
        }
        let start = Instant::now();
        let frames = ready.info.frames;
        let res = read_extents(mem, &ready.free_extents, wire::free_bitmap_len(frames))
            .and_then(|free| Ok((free, read_extents(mem, &ready.prio_extents, wire::priority_map_len(frames))?)))
            .and_then(|(free, prio)| {
                FreeBitmap::new(&free, frames)
                    .map_err(|e| EnlightenError::Protocol(format!("free bitmap of command {}: {e}", ready.seq())))?;
                PriorityMap::new(&prio, frames)
                    .map_err(|e| EnlightenError::Protocol(format!("priority map of command {}: {e}", ready.seq())))?;
                Ok((free, prio))
            });
        let mut g = self.inner.lock();
        match &res {
            Ok(_) => g.counters.last_maps_read = Some(start.elapsed()),
            Err(e) => {
                log::warn!("enlighten: {e}");
                g.counters.protocol_errors += 1;
                g.counters.last_error = Some(e.to_string());
            }
        }
        res
    }

    /// Queues a Done (migration finished: release the held frames); allowed
    /// in phase Ready. Returns its sequence number.
    pub fn send_done(&self) -> Result<u32, EnlightenError> {
        let mut g = self.inner.lock();
        if g.phase != Phase::Ready {
            return Err(EnlightenError::InvalidState(format!("Done sent in phase {:?} (needs Ready)", g.phase)));
        }
        let seq = g.queue(CommandKind::Done, 0);
        self.kick(g);
        Ok(seq)
    }

    /// Queues an Abort (release everything); allowed in every phase but
    /// Releasing. Aborting a Prepare the guest has not received withdraws it
    /// and completes at once. Returns the Abort's sequence number.
    pub fn send_abort(&self) -> Result<u32, EnlightenError> {
        let mut g = self.inner.lock();
        if g.phase == Phase::Releasing {
            return Err(EnlightenError::InvalidState("a Done or Abort is already outstanding".into()));
        }
        if let Some(cmd) = g.command {
            // Phase Preparing: waiters of wait_ready learn of the abort.
            g.prepare_result = Some((cmd.seq, Err(EnlightenError::Aborted)));
        }
        let withdrawn = g.undelivered().is_some();
        let seq = g.queue(CommandKind::Abort, 0);
        if withdrawn {
            // The guest never saw the Prepare: nothing to release.
            g.command = None;
            g.phase = Phase::Idle;
            g.release_result = Some((seq, Ok(())));
            drop(g);
            self.inner.cond.notify_all();
            return Ok(seq);
        }
        self.kick(g);
        Ok(seq)
    }

    /// Waits for the Ack to the last Done or Abort.
    pub fn wait_ack(&self, timeout: Duration) -> Result<(), EnlightenError> {
        let deadline = Instant::now().checked_add(timeout);
        let mut g = self.inner.lock();
        let Some(seq) = g.release_seq else {
            return Err(EnlightenError::InvalidState("no Done or Abort was sent".into()));
        };
        loop {
            if let Some((s, r)) = &g.release_result {
                if *s == seq {
                    return r.clone();
                }
            }
            if g.phase != Phase::Releasing {
                return Err(EnlightenError::InvalidState(format!(
                    "no Done or Abort outstanding (phase {:?})",
                    g.phase
                )));
            }
            g = match self.wait(g, deadline) {
                Ok(g) => g,
                Err(mut g) => {
                    g.counters.timeouts += 1;
                    return Err(EnlightenError::Timeout { waiting_for: "Ack", after: timeout });
                }
            };
        }
    }

    pub fn phase(&self) -> Phase {
        self.inner.lock().phase
    }

    /// Whether a queued command still waits for a driver buffer.
    pub fn has_undelivered(&self) -> bool {
        self.inner.lock().undelivered().is_some()
    }

    pub fn counters(&self) -> EnlightenCounters {
        self.inner.lock().counters.clone()
    }

    /// The protocol state as plain data.
    pub fn state(&self) -> EnlightenState {
        let g = self.inner.lock();
        EnlightenState {
            phase: g.phase,
            next_seq: g.next_seq,
            command: g.command,
            delivered: g.delivered,
            ready: g.ready.clone(),
            recent_seqs: g.recent.iter().copied().collect(),
        }
    }

    /// Restores [`Self::state`] (validated first; on error nothing changes).
    /// A restored undelivered command goes out on the next queue-0
    /// processing; call [`deliver`] (or let the notifier run) to push it.
    pub fn restore(&self, s: &EnlightenState) -> Result<(), String> {
        if s.next_seq == 0 {
            return Err("sequence number 0".into());
        }
        if s.recent_seqs.len() > RECENT_SEQS {
            return Err(format!("{} recent sequence numbers", s.recent_seqs.len()));
        }
        let cmd_kind = s.command.map(|c| c.kind);
        let ok = match s.phase {
            Phase::Idle | Phase::Failed => s.command.is_none() && s.ready.is_none(),
            Phase::Preparing => cmd_kind == Some(CommandKind::Prepare) && s.ready.is_none(),
            Phase::Ready => s.command.is_none() && s.ready.is_some(),
            Phase::Releasing => matches!(cmd_kind, Some(CommandKind::Done | CommandKind::Abort)),
        };
        if !ok || (s.delivered && s.command.is_none()) {
            return Err(format!("inconsistent state: phase {:?}, command {:?}", s.phase, s.command));
        }
        if let Some(c) = s.command {
            if c.kind == CommandKind::Prepare && !(1..=MAX_ACTIVE_WINDOW_MS).contains(&c.active_window_ms) {
                return Err(format!("active window {} ms", c.active_window_ms));
            }
        }
        let mut g = self.inner.lock();
        g.phase = s.phase;
        g.next_seq = s.next_seq;
        g.command = s.command;
        g.delivered = s.delivered;
        g.ready = s.ready.clone();
        g.recent = s.recent_seqs.iter().copied().collect();
        g.prepare_result = s.ready.clone().map(|r| (r.seq(), Ok(r)));
        g.release_result = None;
        g.prepare_seq = g.prepare_result.as_ref().map(|(s, _)| *s);
        g.release_seq = None;
        g.requested_at = None;
        if let Some(c) = s.command {
            g.requested_at = Some(Instant::now());
            match c.kind {
                CommandKind::Prepare => g.prepare_seq = Some(c.seq),
                _ => g.release_seq = Some(c.seq),
            }
        }
        drop(g);
        self.inner.cond.notify_all();
        Ok(())
    }
}

/// Reads the concatenation of `extents` (`total` bytes, as checked by
/// `ReadyInfo::decode`).
fn read_extents<M: GuestMemory>(mem: &M, extents: &[Extent], total: u64) -> Result<Vec<u8>, EnlightenError> {
    let sum: u64 = extents.iter().map(|e| e.len).sum();
    if sum != total {
        return Err(EnlightenError::Protocol(format!("map extents add up to {sum} bytes, expected {total}")));
    }
    let total = usize::try_from(total).map_err(|_| EnlightenError::Memory(format!("map of {total} bytes")))?;
    let mut out = vec![0u8; total];
    let mut off = 0usize;
    for e in extents {
        let n = e.len as usize;
        mem.read_slice(&mut out[off..off + n], GuestAddress(e.gpa))
            .map_err(|err| EnlightenError::Memory(format!("reading map extent {:#x}+{:#x}: {err}", e.gpa, e.len)))?;
        off += n;
    }
    Ok(out)
}

/// Delivers a queued command now if the driver has a buffer posted on
/// queue 0 (processing the queue as a notification would, raising the
/// interrupt). Returns whether a command is still waiting for a buffer.
/// Does nothing while the driver has not activated the device.
pub fn deliver<M: GuestMemory + Send + Sync + 'static>(t: &mut MmioTransport<Enlighten, M>) -> bool {
    if t.device().handle.has_undelivered() && t.is_active() {
        t.notify(u32::from(wire::CMD_QUEUE));
    }
    t.device().handle.has_undelivered()
}

/// The enlightenment device (see the module documentation).
pub struct Enlighten {
    handle: EnlightenHandle,
    queue_sizes: [u16; wire::NUM_QUEUES],
    descs: Vec<Descriptor>,
}

impl Default for Enlighten {
    fn default() -> Self {
        Self::new()
    }
}

impl Enlighten {
    pub fn new() -> Self {
        Self { handle: EnlightenHandle::new(), queue_sizes: [wire::QUEUE_SIZE; wire::NUM_QUEUES], descs: Vec::new() }
    }

    /// A handle sharing this device's state.
    pub fn handle(&self) -> EnlightenHandle {
        self.handle.clone()
    }

    /// Collects the next available chain; `None` when the ring is empty.
    fn next_chain<M: GuestMemory>(&mut self, queue: &mut Queue, mem: &M) -> Result<Option<u16>, ProtocolError> {
        crate::next_chain(queue, mem, &mut self.descs, MAX_CHAIN)
    }

    /// Writes `msg` into the collected (device-writable) chain.
    fn write_chain<M: GuestMemory>(&self, mem: &M, msg: &[u8]) -> Result<(), String> {
        if self.descs.iter().any(|d| !d.is_write_only()) {
            return Err("device-readable descriptor in a command buffer".into());
        }
        let room: u64 = self.descs.iter().map(|d| u64::from(d.len())).sum();
        if room < msg.len() as u64 {
            return Err(format!("command buffer of {room} bytes, a command needs {}", msg.len()));
        }
        let mut off = 0usize;
        for d in &self.descs {
            if off == msg.len() {
                break;
            }
            let n = (d.len() as usize).min(msg.len() - off);
            if !mem.check_range(d.addr(), n, Permissions::Write) {
                return Err(format!("command buffer {:#x}+{:#x} is outside guest memory", d.addr().0, d.len()));
            }
            mem.write_slice(&msg[off..off + n], d.addr()).map_err(|e| format!("writing command: {e}"))?;
            off += n;
        }
        Ok(())
    }

    /// Reads the collected (device-readable) chain as one message.
    fn read_chain<M: GuestMemory>(&self, mem: &M) -> Result<Vec<u8>, String> {
        if self.descs.iter().any(|d| d.is_write_only()) {
            return Err("device-writable descriptor in a reply buffer".into());
        }
        let total: u64 = self.descs.iter().map(|d| u64::from(d.len())).sum();
        if total > wire::MAX_MESSAGE as u64 {
            return Err(format!("reply of {total} bytes exceeds the {}-byte limit", wire::MAX_MESSAGE));
        }
        let mut msg = vec![0u8; total as usize];
        let mut off = 0usize;
        for d in &self.descs {
            let n = d.len() as usize;
            if !mem.check_range(d.addr(), n, Permissions::Read) {
                return Err(format!("reply buffer {:#x}+{:#x} is outside guest memory", d.addr().0, d.len()));
            }
            mem.read_slice(&mut msg[off..off + n], d.addr()).map_err(|e| format!("reading reply: {e}"))?;
            off += n;
        }
        Ok(msg)
    }

    fn process_commands<M: GuestMemory>(&mut self, queue: &mut Queue, mem: &M) -> Result<Processed, ProtocolError> {
        let mut out = Processed::default();
        let inner = self.handle.inner.clone();
        for _ in 0..queue.size() {
            // The state stays locked while the command is written, so the
            // handle cannot withdraw or replace it meanwhile (lock order:
            // transport, then state).
            let mut g = inner.lock();
            let Some(cmd) = g.undelivered() else { break };
            let Some(head) = self.next_chain(queue, mem)? else { break };
            let mut buf = [0u8; MAX_COMMAND];
            let n = cmd.encode(&mut buf);
            let res = self.write_chain(mem, &buf[..n]);
            let used_len = if res.is_ok() { n as u32 } else { 0 };
            queue.add_used(mem, head, used_len).map_err(|e| ProtocolError(format!("buffer {head}: used ring: {e}")))?;
            out.used = true;
            match res {
                Ok(()) => g.mark_delivered(cmd.seq),
                Err(why) => {
                    g.counters.bad_command_buffers += 1;
                    out.rejected += 1;
                    out.last_rejection = Some(format!("command buffer {head}: {why}"));
                }
            }
        }
        Ok(out)
    }

    fn process_replies<M: GuestMemory>(&mut self, queue: &mut Queue, mem: &M) -> Result<Processed, ProtocolError> {
        let mut out = Processed::default();
        let guest_bytes = mem.physical_memory().map_or(0, |m| m.last_addr().0.saturating_add(1));
        for _ in 0..queue.size() {
            let Some(head) = self.next_chain(queue, mem)? else { break };
            let res = self.read_chain(mem);
            {
                let mut g = self.handle.inner.lock();
                let res = match res {
                    Ok(msg) => g.on_reply(&msg, guest_bytes),
                    Err(why) => {
                        g.violation(why.clone());
                        Err(why)
                    }
                };
                if let Err(why) = res {
                    out.rejected += 1;
                    out.last_rejection = Some(format!("reply buffer {head}: {why}"));
                }
            }
            self.handle.inner.cond.notify_all();
            queue.add_used(mem, head, 0).map_err(|e| ProtocolError(format!("buffer {head}: used ring: {e}")))?;
            out.used = true;
        }
        Ok(out)
    }
}

impl VirtioDevice for Enlighten {
    fn device_type(&self) -> u32 {
        wire::DEVICE_ID
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        wire::DEVICE_FEATURES
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut cfg = [0u8; wire::config::SIZE];
        cfg[wire::config::ABI_VERSION..wire::config::ABI_VERSION + 4]
            .copy_from_slice(&u32::from(wire::VERSION).to_le_bytes());
        crate::read_config_bytes(&cfg, offset, data);
    }

    fn process_queue<M: GuestMemory>(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &M,
    ) -> Result<Processed, ProtocolError> {
        match u16::try_from(index) {
            Ok(wire::CMD_QUEUE) => self.process_commands(queue, mem),
            Ok(wire::REPLY_QUEUE) => self.process_replies(queue, mem),
            _ => Ok(Processed::default()),
        }
    }

    fn reset(&mut self) {
        let mut g = self.handle.inner.lock();
        g.reset();
        drop(g);
        self.handle.inner.cond.notify_all();
    }

    fn name(&self) -> &str {
        "virtio-enlighten"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_space_and_identity() {
        let d = Enlighten::new();
        assert_eq!(d.device_type(), 63);
        assert_eq!(d.queue_max_sizes(), &[wire::QUEUE_SIZE; 2]);
        let mut b = [0xffu8; 12];
        d.read_config(0, &mut b);
        assert_eq!(&b[..4], &1u32.to_le_bytes());
        assert_eq!(&b[4..], &[0; 8]);
        d.read_config(u64::MAX, &mut b);
        assert_eq!(b, [0; 12]);
    }

    #[test]
    fn state_machine_without_a_guest() {
        let d = Enlighten::new();
        let h = d.handle();
        assert!(matches!(h.wait_ready(Duration::ZERO), Err(EnlightenError::InvalidState(_))));
        assert!(matches!(h.request_prepare(0), Err(EnlightenError::InvalidArgument(_))));
        assert!(matches!(h.send_done(), Err(EnlightenError::InvalidState(_))));
        let seq = h.request_prepare(16_000).unwrap();
        assert_eq!(seq, 1);
        assert!(h.has_undelivered());
        assert!(matches!(h.request_prepare(16_000), Err(EnlightenError::InvalidState(_))));
        let t = Instant::now();
        let e = h.wait_ready(Duration::from_millis(20)).unwrap_err();
        assert!(matches!(e, EnlightenError::Timeout { waiting_for: "Ready", .. }), "{e}");
        assert!(t.elapsed() >= Duration::from_millis(20));
        // The state round-trips.
        let s = h.state();
        assert_eq!(s.phase, Phase::Preparing);
        let h2 = Enlighten::new().handle();
        h2.restore(&s).unwrap();
        assert_eq!(h2.state(), s);
        assert_eq!(EnlightenState::decode(&s.encode()), Ok(s.clone()));
        // An undelivered Prepare is withdrawn by an abort, at once.
        let a = h.send_abort().unwrap();
        assert_eq!(a, 2);
        assert_eq!(h.wait_ready(Duration::ZERO), Err(EnlightenError::Aborted));
        assert_eq!(h.wait_ack(Duration::ZERO), Ok(()));
        assert_eq!(h.phase(), Phase::Idle);
        assert!(!h.has_undelivered());
        // Inconsistent states are refused.
        let bad = EnlightenState { phase: Phase::Ready, next_seq: 3, ..Default::default() };
        assert!(h2.restore(&bad).is_err());
        assert!(h2.restore(&EnlightenState::default()).is_err(), "next_seq 0");
        assert_eq!(h2.state(), s);
    }

    #[test]
    fn state_encoding_rejects_garbage() {
        let free = [Extent { gpa: 0x1000, len: 8 }];
        let prio = [Extent { gpa: 0x2000, len: 16 }, Extent { gpa: 0x3000, len: 16 }];
        let info = ReadyInfo {
            seq: 5,
            frames: 64,
            sweep_us: 1,
            classify_us: 2,
            class_counts: [1; wire::NUM_CLASSES],
            free_extents: 1,
            prio_extents: 2,
        };
        let s = EnlightenState {
            phase: Phase::Releasing,
            next_seq: 7,
            command: Some(PendingCommand { kind: CommandKind::Done, seq: 6, active_window_ms: 0 }),
            delivered: true,
            ready: Some(Ready { info, free_extents: free.to_vec(), prio_extents: prio.to_vec() }),
            recent_seqs: vec![5, 6],
        };
        let b = s.encode();
        assert_eq!(EnlightenState::decode(&b), Ok(s.clone()));
        let h = Enlighten::new().handle();
        h.restore(&s).unwrap();
        assert_eq!(h.state(), s);
        for cut in 0..b.len() {
            assert!(EnlightenState::decode(&b[..cut]).is_err(), "cut at {cut}");
        }
        let mut longer = b.clone();
        longer.push(0);
        assert!(EnlightenState::decode(&longer).is_err());
        // Flipping any byte either fails or decodes to something; never panics.
        for i in 0..b.len() {
            let mut x = b.clone();
            x[i] ^= 0xa5;
            if let Ok(d) = EnlightenState::decode(&x) {
                let _ = h.restore(&d);
            }
        }
    }
}
