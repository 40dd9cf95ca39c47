//! virtio-net over a TAP interface (VIRTIO 1.x, section 5.1).
//!
//! Three queues: receive (0), transmit (1) and control (2, with
//! `VIRTIO_NET_F_CTRL_VQ`). No offloads are offered: frames cross the TAP
//! complete, with the 12-byte virtio-net header passed through
//! (`IFF_VNET_HDR`, see [`tap`]).
//!
//! - **Transmit** happens on the driver's notification, in the notifying
//!   (vCPU) thread: each chain's device-readable bytes are one header plus
//!   one frame, written to the TAP with one `write`.
//! - **Receive** is driven by the VMM's RX thread when the TAP is readable
//!   (and by the driver's notification when it adds buffers): a frame is
//!   read from the TAP, then copied into the next receive chain. A frame
//!   read while no buffer is posted waits in the device (never dropped, never
//!   delivered twice); while the VM is paused ([`Net::set_quiesced`]) no
//!   frame is read at all, so a paused guest's memory does not change.
//! - **Announce**: after a migration or restore the VMM writes RARP frames
//!   from the guest's MAC into the TAP ([`announce`]) and, if the driver
//!   negotiated `VIRTIO_NET_F_GUEST_ANNOUNCE`, asks the guest to announce
//!   itself too ([`Net::request_guest_announce`]; the guest sends gratuitous
//!   ARPs and acknowledges on the control queue).
//!
//! Nothing the guest writes is trusted: a chain with the wrong kind of
//! descriptors or a frame longer than any Ethernet frame is completed
//! without effect and counted as a guest error; structural violations
//! (truncated or overlong chains, bad rings) put the device into
//! DEVICE_NEEDS_RESET as for every device of this crate.

pub mod announce;
pub mod tap;

use std::io;
use std::sync::Arc;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestMemory};
use vmm_sys_util::eventfd::EventFd;

pub use tap::{Tap, VNET_HDR_LEN};

use crate::{Processed, ProtocolError, VirtioDevice, VIRTIO_F_VERSION_1};

pub const VIRTIO_ID_NET: u32 = 1;

pub const VIRTIO_NET_F_MAC: u64 = 1 << 5;
pub const VIRTIO_NET_F_STATUS: u64 = 1 << 16;
pub const VIRTIO_NET_F_CTRL_VQ: u64 = 1 << 17;
pub const VIRTIO_NET_F_GUEST_ANNOUNCE: u64 = 1 << 21;

/// Status bits of the configuration space.
pub const VIRTIO_NET_S_LINK_UP: u16 = 1;
pub const VIRTIO_NET_S_ANNOUNCE: u16 = 2;

/// Control queue classes and commands this device knows.
pub const VIRTIO_NET_CTRL_ANNOUNCE: u8 = 3;
pub const VIRTIO_NET_CTRL_ANNOUNCE_ACK: u8 = 0;
pub const VIRTIO_NET_OK: u8 = 0;
pub const VIRTIO_NET_ERR: u8 = 1;

pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;
pub const CTRL_QUEUE: usize = 2;
/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// The largest frame (header included) either way: 64 KiB of frame is more
/// than any Ethernet frame without GSO, which is not offered.
pub const MAX_FRAME: usize = VNET_HDR_LEN + 65_535;
/// Most descriptors in one chain.
const MAX_CHAIN: usize = 256;

/// Per-device traffic statistics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetCounters {
    pub rx_frames: u64,
    pub rx_bytes: u64,
    pub tx_frames: u64,
    pub tx_bytes: u64,
    /// Frames the guest sent that the TAP refused (its queue was full or
    /// the interface is down).
    pub tx_dropped: u64,
    /// Frames received that no posted buffer could hold.
    pub rx_dropped: u64,
    /// Guest announcements requested / acknowledged.
    pub announces: u64,
    pub announce_acks: u64,
}

/// Why the last receive pass stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RxStop {
    /// The TAP has no more frames.
    Drained,
    /// A frame waits for the driver to post a buffer.
    NoBuffers,
    /// A queue's worth was delivered in this pass; call again.
    Budget,
    /// The VM is paused: nothing is read.
    Quiesced,
}

/// A virtio-net device backed by a TAP interface.
pub struct Net {
    tap: Arc<Tap>,
    mac: [u8; 6],
    name: String,
    queue_sizes: [u16; 3],
    acked: u64,
    status: u16,
    quiesced: bool,
    /// A frame read from the TAP that no buffer has taken yet (length in
    /// `rx_buf`).
    rx_pending: Option<usize>,
    rx_buf: Vec<u8>,
    tx_buf: Vec<u8>,
    rx_stop: RxStop,
    descs: Vec<Descriptor>,
    counters: NetCounters,
    /// Signalled when a receive pass stops with frames left for lack of
    /// budget in a thread that is not the receive thread (a notification).
    rx_wake: Option<EventFd>,
}

/// A chain that is malformed but can be completed (in-band rejection).
struct Reject(String);

impl Net {
    /// A device with MAC address `mac` on `tap`.
    pub fn new(tap: Arc<Tap>, mac: [u8; 6]) -> Self {
        let name = format!("virtio-net({})", tap.name());
        Self {
            tap,
            mac,
            name,
            queue_sizes: [QUEUE_SIZE; 3],
            acked: 0,
            status: VIRTIO_NET_S_LINK_UP,
            quiesced: false,
            rx_pending: None,
            rx_buf: vec![0; MAX_FRAME],
            tx_buf: Vec::with_capacity(MAX_FRAME),
            rx_stop: RxStop::Drained,
            descs: Vec::new(),
            counters: NetCounters::default(),
            rx_wake: None,
        }
    }

    /// `wake` is written whenever a receive pass ends with frames left over
    /// ([`RxStop::Budget`]): the VMM's receive thread waits on it.
    pub fn set_rx_wake(&mut self, wake: EventFd) {
        self.rx_wake = Some(wake);
    }

    /// The TAP (the VMM's RX thread waits on its fd).
    pub fn tap(&self) -> &Arc<Tap> {
        &self.tap
    }

    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    pub fn counters(&self) -> NetCounters {
        self.counters
    }

    /// Why the last receive pass stopped.
    pub fn rx_stop(&self) -> RxStop {
        self.rx_stop
    }

    /// While quiesced (the VM is paused) no frame is read from the TAP or
    /// written into guest memory; frames wait in the TAP's queue.
    pub fn set_quiesced(&mut self, on: bool) {
        self.quiesced = on;
    }

    /// Sets VIRTIO_NET_S_ANNOUNCE if the driver negotiated
    /// `VIRTIO_NET_F_GUEST_ANNOUNCE`; returns whether it did (the caller then
    /// signals a configuration change, see `MmioTransport::config_changed`).
    pub fn request_guest_announce(&mut self) -> bool {
        let wanted = VIRTIO_NET_F_GUEST_ANNOUNCE | VIRTIO_NET_F_CTRL_VQ;
        if self.acked & wanted != wanted {
            return false;
        }
        self.status |= VIRTIO_NET_S_ANNOUNCE;
        self.counters.announces += 1;
        true
    }

    /// Writes the host-side announcements (RARP from the guest's MAC) into
    /// the TAP: one frame; the VMM sends [`announce::SCHEDULE_MS`] of them.
    pub fn announce_frame(&self) -> io::Result<()> {
        let mut f = [0u8; VNET_HDR_LEN + announce::FRAME_LEN];
        f[VNET_HDR_LEN..].copy_from_slice(&announce::rarp_frame(self.mac));
        self.tap.write_frame(&f).map(|_| ())
    }

    /// Collects the next chain of `queue` into `self.descs`; `None` when
    /// the driver has made nothing more available.
    fn next_chain<M: GuestMemory>(&mut self, queue: &mut Queue, mem: &M) -> Result<Option<u16>, ProtocolError> {
        crate::next_chain(queue, mem, &mut self.descs, MAX_CHAIN)
    }

    fn used<M: GuestMemory>(queue: &mut Queue, mem: &M, head: u16, len: u32) -> Result<(), ProtocolError> {
        queue.add_used(mem, head, len).map_err(|e| ProtocolError(format!("chain {head}: used ring: {e}")))
    }

    /// Makes sure a frame is waiting in `rx_buf`; false if the TAP has none.
    fn fill_pending(&mut self) -> bool {
        if self.rx_pending.is_some() {
            return true;
        }
        loop {
            match self.tap.read_frame(&mut self.rx_buf) {
                Ok(n) if n >= VNET_HDR_LEN => {
                    self.rx_pending = Some(n);
                    return true;
                }
                Ok(n) => log::debug!("{}: short read of {n} bytes from the TAP", self.name),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    if e.kind() != io::ErrorKind::WouldBlock {
                        log::warn!("{}: reading the TAP: {e}", self.name);
                    }
                    return false;
                }
            }
        }
    }

    /// Copies the pending frame into the collected (receive) chain; returns
    /// the bytes written.
    fn deliver<M: GuestMemory>(&mut self, mem: &M, len: usize) -> Result<u32, Reject> {
        if let Some(d) = self.descs.iter().find(|d| !d.is_write_only()) {
            return Err(Reject(format!("receive chain has a device-readable descriptor at {:#x}", d.addr().0)));
        }
        let room: u64 = self.descs.iter().map(|d| u64::from(d.len())).sum();
        if room < len as u64 {
            self.counters.rx_dropped += 1;
            return Err(Reject(format!("receive buffers of {room} bytes cannot hold a {len}-byte frame")));
        }
        // num_buffers: 1 (VIRTIO_NET_F_MRG_RXBUF is not offered).
        self.rx_buf[10..12].copy_from_slice(&1u16.to_le_bytes());
        let mut off = 0usize;
        for d in &self.descs {
            if off == len {
                break;
            }
            let n = (d.len() as usize).min(len - off);
            mem.write_slice(&self.rx_buf[off..off + n], d.addr())
                .map_err(|e| Reject(format!("receive buffer {:#x}+{n:#x}: {e}", d.addr().0)))?;
            off += n;
        }
        Ok(len as u32)
    }

    fn process_rx<M: GuestMemory>(&mut self, queue: &mut Queue, mem: &M) -> Result<Processed, ProtocolError> {
        let mut out = Processed::default();
        if self.quiesced {
            self.rx_stop = RxStop::Quiesced;
            return Ok(out);
        }
        self.rx_stop = RxStop::Budget;
        for _ in 0..queue.size() {
            if !self.fill_pending() {
                self.rx_stop = RxStop::Drained;
                return Ok(out);
            }
            let Some(head) = self.next_chain(queue, mem)? else {
                self.rx_stop = RxStop::NoBuffers;
                return Ok(out);
            };
            let len = self.rx_pending.take().unwrap_or(0);
            let written = match self.deliver(mem, len) {
                Ok(n) => {
                    self.counters.rx_frames += 1;
                    self.counters.rx_bytes += (len - VNET_HDR_LEN) as u64;
                    n
                }
                Err(Reject(why)) => {
                    out.rejected += 1;
                    out.last_rejection = Some(format!("chain {head}: {why} (frame dropped)"));
                    0
                }
            };
            Self::used(queue, mem, head, written)?;
            out.used = true;
        }
        if let Some(w) = &self.rx_wake {
            let _ = w.write(1);
        }
        Ok(out)
    }

    /// Gathers the collected (transmit) chain into `tx_buf`.
    fn gather<M: GuestMemory>(&mut self, mem: &M) -> Result<(), Reject> {
        self.tx_buf.clear();
        for d in &self.descs {
            if d.is_write_only() {
                return Err(Reject(format!("transmit chain has a device-writable descriptor at {:#x}", d.addr().0)));
            }
            let n = d.len() as usize;
            let at = self.tx_buf.len();
            if at + n > MAX_FRAME {
                return Err(Reject(format!("transmit chain longer than {MAX_FRAME} bytes")));
            }
            self.tx_buf.resize(at + n, 0);
            mem.read_slice(&mut self.tx_buf[at..], d.addr())
                .map_err(|e| Reject(format!("transmit buffer {:#x}+{n:#x}: {e}", d.addr().0)))?;
        }
        if self.tx_buf.len() <= VNET_HDR_LEN {
            return Err(Reject(format!("transmit chain of {} bytes holds no frame", self.tx_buf.len())));
        }
        Ok(())
    }

    fn process_tx<M: GuestMemory>(&mut self, queue: &mut Queue, mem: &M) -> Result<Processed, ProtocolError> {
        let mut out = Processed::default();
        for _ in 0..queue.size() {
            let Some(head) = self.next_chain(queue, mem)? else { break };
            match self.gather(mem) {
                Ok(()) => match self.tap.write_frame(&self.tx_buf) {
                    Ok(_) => {
                        self.counters.tx_frames += 1;
                        self.counters.tx_bytes += (self.tx_buf.len() - VNET_HDR_LEN) as u64;
                    }
                    Err(e) => {
                        self.counters.tx_dropped += 1;
                        log::debug!("{}: TAP refused a {}-byte frame: {e}", self.name, self.tx_buf.len());
                    }
                },
                Err(Reject(why)) => {
                    out.rejected += 1;
                    out.last_rejection = Some(format!("chain {head}: {why}"));
                }
            }
            Self::used(queue, mem, head, 0)?;
            out.used = true;
        }
        Ok(out)
    }

    /// Handles one control command in the collected chain: returns the ack.
    fn control<M: GuestMemory>(&mut self, mem: &M) -> Result<(u8, vm_memory::GuestAddress), Reject> {
        let Some(last) = self.descs.last().copied() else { return Err(Reject("empty control chain".into())) };
        if !last.is_write_only() || last.len() == 0 {
            return Err(Reject("control chain does not end with a device-writable ack byte".into()));
        }
        let ack_at = last.addr().checked_add(u64::from(last.len()) - 1).ok_or_else(|| Reject("ack address".into()))?;
        let mut cmd = [0u8; 2];
        let mut got = 0;
        for d in self.descs.iter().filter(|d| !d.is_write_only()) {
            let n = (d.len() as usize).min(2 - got);
            if n == 0 {
                break;
            }
            mem.read_slice(&mut cmd[got..got + n], d.addr()).map_err(|e| Reject(format!("control header: {e}")))?;
            got += n;
        }
        if got < 2 {
            return Ok((VIRTIO_NET_ERR, ack_at));
        }
        match (cmd[0], cmd[1]) {
            (VIRTIO_NET_CTRL_ANNOUNCE, VIRTIO_NET_CTRL_ANNOUNCE_ACK) => {
                self.status &= !VIRTIO_NET_S_ANNOUNCE;
                self.counters.announce_acks += 1;
                Ok((VIRTIO_NET_OK, ack_at))
            }
            (class, command) => {
                log::debug!("{}: unsupported control command {class}/{command}", self.name);
                Ok((VIRTIO_NET_ERR, ack_at))
            }
        }
    }

    fn process_ctrl<M: GuestMemory>(&mut self, queue: &mut Queue, mem: &M) -> Result<Processed, ProtocolError> {
        let mut out = Processed::default();
        for _ in 0..queue.size() {
            let Some(head) = self.next_chain(queue, mem)? else { break };
            let len = match self.control(mem) {
                Ok((ack, at)) => {
                    mem.write_obj(ack, at).map_err(|e| ProtocolError(format!("chain {head}: ack byte: {e}")))?;
                    1
                }
                Err(Reject(why)) => {
                    out.rejected += 1;
                    out.last_rejection = Some(format!("chain {head}: {why}"));
                    0
                }
            };
            Self::used(queue, mem, head, len)?;
            out.used = true;
        }
        Ok(out)
    }

    /// struct virtio_net_config: mac[6], status, max_virtqueue_pairs (1).
    fn config(&self) -> [u8; 10] {
        let mut c = [0u8; 10];
        c[0..6].copy_from_slice(&self.mac);
        c[6..8].copy_from_slice(&self.status.to_le_bytes());
        c[8..10].copy_from_slice(&1u16.to_le_bytes());
        c
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS | VIRTIO_NET_F_CTRL_VQ | VIRTIO_NET_F_GUEST_ANNOUNCE
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::read_config_bytes(&self.config(), offset, data);
    }

    fn activate(&mut self, features: u64) -> Result<(), ProtocolError> {
        self.acked = features;
        Ok(())
    }

    fn process_queue<M: GuestMemory>(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &M,
    ) -> Result<Processed, ProtocolError> {
        match index {
            RX_QUEUE => self.process_rx(queue, mem),
            TX_QUEUE => self.process_tx(queue, mem),
            CTRL_QUEUE if self.acked & VIRTIO_NET_F_CTRL_VQ != 0 => self.process_ctrl(queue, mem),
            _ => Err(ProtocolError(format!("queue {index} used without VIRTIO_NET_F_CTRL_VQ"))),
        }
    }

    fn reset(&mut self) {
        self.acked = 0;
        self.status = VIRTIO_NET_S_LINK_UP;
        // A frame read but not delivered belongs to the old driver session.
        self.rx_pending = None;
        self.rx_stop = RxStop::Drained;
    }

    fn name(&self) -> &str {
        &self.name
    }
}

/// Parses a MAC address `aa:bb:cc:dd:ee:ff`; it must be unicast.
pub fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let parts: Vec<&str> = s.split(':').collect();
    let mut mac = [0u8; 6];
    if parts.len() != 6 {
        return Err(format!("`{s}` is not a MAC address (six hex bytes: 52:54:00:12:34:56)"));
    }
    for (b, p) in mac.iter_mut().zip(&parts) {
        if p.len() != 2 {
            return Err(format!("`{s}` is not a MAC address (six hex bytes: 52:54:00:12:34:56)"));
        }
        *b = u8::from_str_radix(p, 16).map_err(|_| format!("`{s}`: `{p}` is not a hex byte"))?;
    }
    if mac[0] & 1 != 0 {
        return Err(format!("`{s}` is a multicast address; a NIC needs a unicast one"));
    }
    Ok(mac)
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: [u8; 6]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// A random locally administered unicast MAC (52:54:00 would claim QEMU's
/// OUI; 0x02 in the first byte marks it as locally administered).
pub fn random_mac() -> [u8; 6] {
    let mut mac = [0u8; 6];
    let seed =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
            ^ u64::from(std::process::id()).rotate_left(32);
    if std::fs::File::open("/dev/urandom").and_then(|mut f| io::Read::read_exact(&mut f, &mut mac)).is_err() {
        mac.copy_from_slice(&seed.to_le_bytes()[..6]);
    }
    mac[0] = (mac[0] & 0xfc) | 0x02;
    mac
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs() {
        assert_eq!(parse_mac("52:54:00:ab:CD:ef"), Ok([0x52, 0x54, 0, 0xab, 0xcd, 0xef]));
        assert!(parse_mac("53:54:00:ab:cd:ef").is_err());
        assert!(parse_mac("52:54:00:ab:cd").is_err());
        assert!(parse_mac("52:54:00:ab:cd:efa").is_err());
        assert!(parse_mac("52:54:00:ab:cd:zz").is_err());
        assert_eq!(format_mac([2, 0, 0, 0xa, 0xb, 0xff]), "02:00:00:0a:0b:ff");
        let m = random_mac();
        assert_eq!(m[0] & 3, 2);
    }
}
