//! Live migration between two VMMs: stop-and-copy and pre-copy so far.
//!
//! The stream, after the authenticated handshake (shared key,
//! `migrate::wire`), is: a `Config` frame (the VM's shape, so the
//! destination can map its memory), zero or more `Pages` frames (pre-copy
//! rounds, sent while the VM runs), a `Switchover` frame, then a snapshot
//! stream (`snapshot.rs`: KVM and device state plus the pages not yet sent
//! or dirtied since, checksummed). The source connects and authenticates
//! *before* touching the VM, so a wrong address, a dead destination or a
//! stranger leaves it running unchanged; after pausing it waits for the
//! destination's acknowledgement, sent only once the VM is fully restored.
//! Until that byte arrives the source resumes on any failure; after it, the
//! source VM ends ("migrated"). The source side lives in `vm.rs`
//! (`Shared::migrate`), which owns the VM; this module holds the transport
//! and the destination side.

use std::io::{BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::path::Path;
use std::time::Duration;

use migrate::wire::{self, Channel, FrameReader, Key, Kind};
use vm_memory::{Bytes, GuestAddress};

use crate::memory::{self, GuestMem};
use crate::snapshot::{SnapshotConfig, SnapshotReader};

/// Byte the destination sends once the VM is restored.
const ACK: u8 = b'A';
/// How long the source waits for the destination to restore.
const ACK_TIMEOUT: Duration = Duration::from_secs(120);
/// Pages per `Pages` frame (1 MiB of data).
pub const PAGES_PER_FRAME: usize = 256;

/// Migration modes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    StopAndCopy,
    Precopy,
    Postcopy,
    Enlightened,
}

impl Mode {
    pub fn parse(s: &str) -> Result<Mode, String> {
        Ok(match s {
            "stop-and-copy" => Mode::StopAndCopy,
            "precopy" => Mode::Precopy,
            "postcopy" => Mode::Postcopy,
            "enlightened" => Mode::Enlightened,
            other => {
                return Err(format!(
                    "unknown migration mode `{other}`; expected stop-and-copy, precopy, postcopy or enlightened"
                ))
            }
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Mode::StopAndCopy => "stop-and-copy",
            Mode::Precopy => "precopy",
            Mode::Postcopy => "postcopy",
            Mode::Enlightened => "enlightened",
        }
    }
}

/// Reads the migration key from a file (any content; a BLAKE3-derived key).
pub fn load_key(path: &Path) -> Result<Key, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read the key file {}: {e}", path.display()))?;
    if bytes.len() < 16 {
        return Err(format!("the key file {} holds fewer than 16 bytes; use a random key", path.display()));
    }
    Ok(Key::derive(&bytes))
}

fn resolve(to: &str) -> Result<SocketAddr, String> {
    to.to_socket_addrs()
        .map_err(|e| format!("bad destination `{to}`: {e}"))?
        .next()
        .ok_or_else(|| format!("bad destination `{to}`: no address"))
}

/// Connects to a destination and authenticates.
pub fn connect(to: &str, key: &Key) -> Result<TcpStream, String> {
    let addr = resolve(to)?;
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .map_err(|e| format!("cannot connect to the destination {addr}: {e}"))?;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    stream.set_read_timeout(Some(Duration::from_secs(30))).map_err(|e| e.to_string())?;
    wire::connect_handshake(&mut stream, key, Channel::Main).map_err(|e| format!("destination {addr}: {e}"))?;
    Ok(stream)
}

/// Waits for the destination's confirmation that the VM is restored.
pub fn await_confirmation(stream: &TcpStream) -> Result<(), String> {
    stream.set_read_timeout(Some(ACK_TIMEOUT)).map_err(|e| e.to_string())?;
    let mut ack = [0u8; 1];
    let mut s = stream;
    s.read_exact(&mut ack).map_err(|e| format!("the destination did not confirm the restore: {e}"))?;
    if ack[0] != ACK {
        return Err(format!("the destination answered {:#x} instead of confirming the restore", ack[0]));
    }
    Ok(())
}

/// Tells the source the VM is restored: it may end its copy.
pub fn confirm(stream: &mut TcpStream) -> std::io::Result<()> {
    stream.write_all(&[ACK])?;
    stream.flush()
}

/// Counts the bytes written through it.
pub struct Counting<W> {
    pub inner: W,
    pub bytes: u64,
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(b)?;
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// An authenticated incoming migration: memory pre-copied, state read and
/// checked; the rest of memory follows in `reader`.
pub struct Incoming {
    pub stream: TcpStream,
    pub peer: SocketAddr,
    pub mem: GuestMem,
    pub reader: SnapshotReader,
    pub precopied_pages: u64,
}

/// Receives the pre-switchover part of a migration stream.
fn receive_stream(stream: &TcpStream, peer: SocketAddr) -> Result<Incoming, String> {
    let mut br = BufReader::with_capacity(1 << 20, stream.try_clone().map_err(|e| e.to_string())?);
    // Frames up to the switch-over; the snapshot stream follows in `br`.
    let (config, mem, precopied) = {
        let mut fr = FrameReader::new(&mut br);
        let first = fr.expect().map_err(|e| e.to_string())?;
        if first.kind != Kind::Config {
            return Err(format!("expected the VM configuration, got a {:?} frame", first.kind));
        }
        let config: SnapshotConfig =
            serde_json::from_slice(&first.payload).map_err(|e| format!("malformed VM configuration: {e}"))?;
        memory::validate_size(config.mem_size).map_err(|e| e.to_string())?;
        if config.vcpus == 0 || config.vcpus > crate::vm::MAX_VCPUS_LINUX {
            return Err(format!("the incoming VM has {} vCPUs", config.vcpus));
        }
        let mem = memory::create(&crate::arch::ram_regions(config.mem_size)).map_err(|e| e.to_string())?;
        let mut precopied = 0;
        loop {
            let f = fr.expect().map_err(|e| e.to_string())?;
            match f.kind {
                Kind::Pages => {
                    for (gpa, page) in wire::page_records(&f.payload).map_err(|e| e.to_string())? {
                        if gpa % 4096 != 0 {
                            return Err(format!("page address {gpa:#x} is not aligned"));
                        }
                        mem.write_slice(page, GuestAddress(gpa))
                            .map_err(|_| format!("page {gpa:#x} is outside the VM"))?;
                        precopied += 1;
                    }
                }
                Kind::Switchover => break,
                Kind::Abort => return Err(format!("the source aborted: {}", String::from_utf8_lossy(&f.payload))),
                other => return Err(format!("unexpected {other:?} frame before switch-over")),
            }
        }
        (config, mem, precopied)
    };
    let reader = SnapshotReader::from_stream(Box::new(br), Path::new(&format!("migration stream from {peer}")))
        .map_err(|e| e.to_string())?;
    if reader.snapshot.config != config {
        return Err("the VM state does not match the announced configuration".into());
    }
    let stream = stream.try_clone().map_err(|e| e.to_string())?;
    Ok(Incoming { stream, peer, mem, reader, precopied_pages: precopied })
}

/// Waits for a connection that authenticates and delivers a valid stream up
/// to the VM state. Strangers and broken streams are logged and refused.
pub fn accept(listener: &TcpListener, key: &Key) -> Incoming {
    loop {
        let (mut stream, peer) = match listener.accept() {
            Ok(c) => c,
            Err(e) => {
                log::warn!("receive: accept failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let _ = stream.set_read_timeout(Some(Duration::from_secs(60)));
        if let Err(e) = wire::accept_handshake(&mut stream, key, Channel::Main) {
            log::warn!("receive: refused connection from {peer}: {e}");
            continue;
        }
        log::info!("receive: authenticated migration from {peer}");
        match receive_stream(&stream, peer) {
            Ok(inc) => {
                log::info!(
                    "receive: {}-vCPU VM from {peer}, {} pages pre-copied",
                    inc.reader.snapshot.config.vcpus,
                    inc.precopied_pages
                );
                return inc;
            }
            Err(e) => log::error!("receive: refused the migration from {peer}: {e}"),
        }
    }
}
