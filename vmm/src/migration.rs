//! Live migration between two VMMs. So far: stop-and-copy.
//!
//! Source: connect and authenticate (shared key, `migrate::wire`) *before*
//! touching the VM, so a wrong address, a dead destination or a stranger
//! leaves it running unchanged; then pause, stream the snapshot (state and
//! memory, checksummed), and wait for the destination's acknowledgement,
//! which it sends only after restoring everything. Until that byte arrives
//! the source can resume; after it, the source VM ends ("migrated").
//!
//! Destination (`vmm receive`): accept connections until one authenticates
//! and delivers a complete, valid stream; a stranger or a broken stream is
//! logged and refused without creating a VM.

use std::io::{BufReader, BufWriter, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::path::Path;
use std::time::{Duration, Instant};

use migrate::wire::{self, Channel, Key};
use serde_json::{json, Value};

use crate::snapshot::SnapshotReader;

/// Byte the destination sends once the VM is restored.
const ACK: u8 = b'A';
/// How long the source waits for the destination to restore.
const ACK_TIMEOUT: Duration = Duration::from_secs(120);

/// Migration modes (the four; stop-and-copy is implemented).
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

/// The source side of a stop-and-copy migration. `pause`/`resume` control
/// the VM; `write_state` streams the snapshot.
pub struct Source<'a> {
    pub pause: &'a dyn Fn() -> Result<bool, String>,
    pub resume: &'a dyn Fn(),
    pub write_state: &'a dyn Fn(&mut dyn Write) -> Result<u64, String>,
}

fn resolve(to: &str) -> Result<SocketAddr, String> {
    to.to_socket_addrs()
        .map_err(|e| format!("bad destination `{to}`: {e}"))?
        .next()
        .ok_or_else(|| format!("bad destination `{to}`: no address"))
}

/// Migrates to `to`. On success returns the report; the caller then ends
/// the source VM. On failure the VM is running as before.
pub fn send(to: &str, key: &Key, mode: Mode, src: Source) -> Result<Value, String> {
    if mode != Mode::StopAndCopy {
        return Err(format!("migration mode `{}` is not implemented yet; use stop-and-copy", mode.name()));
    }
    let t0 = Instant::now();
    let addr = resolve(to)?;
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .map_err(|e| format!("cannot connect to the destination {addr}: {e}"))?;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    stream.set_read_timeout(Some(Duration::from_secs(30))).map_err(|e| e.to_string())?;
    wire::connect_handshake(&mut stream, key, Channel::Main).map_err(|e| format!("destination {addr}: {e}"))?;

    let was_running = (src.pause)()?;
    let t_pause = Instant::now();
    let result = (|| -> Result<(u64, u64), String> {
        let mut counted = Counting { inner: BufWriter::with_capacity(1 << 20, &stream), bytes: 0 };
        let pages = (src.write_state)(&mut counted)?;
        counted.flush().map_err(|e| format!("sending to {addr}: {e}"))?;
        let bytes = counted.bytes;
        drop(counted);
        stream.set_read_timeout(Some(ACK_TIMEOUT)).map_err(|e| e.to_string())?;
        let mut ack = [0u8; 1];
        (&stream).read_exact(&mut ack).map_err(|e| format!("the destination did not confirm the restore: {e}"))?;
        if ack[0] != ACK {
            return Err(format!("the destination answered {:#x} instead of confirming the restore", ack[0]));
        }
        Ok((pages, bytes))
    })();
    match result {
        Ok((pages, bytes)) => {
            let downtime = t_pause.elapsed();
            Ok(json!({
                "mode": mode.name(),
                "to": addr.to_string(),
                "downtime_ms": downtime.as_secs_f64() * 1000.0,
                "execution_transfer_ms": downtime.as_secs_f64() * 1000.0,
                "total_duration_ms": t0.elapsed().as_secs_f64() * 1000.0,
                "bytes": {"stop_and_copy": bytes},
                "pages_sent": pages,
            }))
        }
        Err(e) => {
            if was_running {
                (src.resume)();
            }
            log::error!("migration to {addr} failed, the VM keeps running here: {e}");
            Err(e)
        }
    }
}

struct Counting<W> {
    inner: W,
    bytes: u64,
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

/// An authenticated incoming migration, its state already read and checked.
pub struct Incoming {
    pub stream: TcpStream,
    pub peer: SocketAddr,
    pub reader: SnapshotReader,
}

/// Tells the source the VM is restored: it may end its copy.
pub fn confirm(stream: &mut TcpStream) -> std::io::Result<()> {
    stream.write_all(&[ACK])?;
    stream.flush()
}

/// Waits for a connection that authenticates and starts a valid stream.
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
        let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
        if let Err(e) = wire::accept_handshake(&mut stream, key, Channel::Main) {
            log::warn!("receive: refused connection from {peer}: {e}");
            continue;
        }
        let reader = match stream.try_clone() {
            Ok(s) => SnapshotReader::from_stream(
                Box::new(BufReader::with_capacity(1 << 20, s)),
                Path::new(&format!("migration stream from {peer}")),
            ),
            Err(e) => {
                log::warn!("receive: {e}");
                continue;
            }
        };
        match reader {
            Ok(reader) => {
                log::info!("receive: incoming {}-vCPU VM from {peer}", reader.snapshot.config.vcpus);
                return Incoming { stream, peer, reader };
            }
            Err(e) => log::warn!("receive: refused the stream from {peer}: {e}"),
        }
    }
}
