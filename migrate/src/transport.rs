//! Connections: tokens that name a migration, the interactive demand lane,
//! byte counting for progress and reports.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::wire::{self, Channel, FrameReader, Key};

/// How long the source waits for the destination to restore.
pub const ACK_TIMEOUT: Duration = Duration::from_secs(120);

/// A main connection: its frame reader (positioned after the frames read so
/// far), a handle to write on, and the sequence number of the next frame
/// written on it.
pub type MainConn = (FrameReader<Box<dyn Read + Send>>, TcpStream, u64);

/// A random token naming one migration (its reconnections present it).
pub fn new_token() -> String {
    let mut b = [0u8; 16];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = f.read_exact(&mut b);
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Marks a demand connection interactive: a priority-aware queue on the
/// path (Linux `pfifo_fast`/`prio` bands, DSCP on a network) sends its
/// packets before bulk traffic.
pub fn mark_interactive(s: &TcpStream) {
    use std::os::fd::AsRawFd;
    let prio: libc::c_int = 6; // TC_PRIO_INTERACTIVE
                               // SAFETY: setsockopt with a valid socket and a c_int option value of the
                               // size given; it does not retain the pointer.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PRIORITY,
            (&prio as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r != 0 {
        log::debug!("SO_PRIORITY on the demand connection: {}", std::io::Error::last_os_error());
    }
}

/// Counts the bytes written through it into a shared counter (progress of
/// a connection that several threads read).
pub struct SharedCounting<W> {
    inner: W,
    counter: Arc<AtomicU64>,
}

impl<W> SharedCounting<W> {
    pub fn new(inner: W, counter: Arc<AtomicU64>) -> Self {
        Self { inner, counter }
    }
}

impl<W: Write> Write for SharedCounting<W> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(b)?;
        self.counter.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
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

/// Reads the migration key from a file (any content; a BLAKE3-derived key).
pub fn load_key(path: &Path) -> Result<Key> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read the key file {}: {e}", path.display()))?;
    if bytes.len() < 16 {
        return Err(Error::from(format!(
            "the key file {} holds fewer than 16 bytes; use a random key",
            path.display()
        )));
    }
    Ok(Key::derive(&bytes))
}

fn resolve(to: &str) -> Result<SocketAddr> {
    to.to_socket_addrs()
        .map_err(|e| format!("bad destination `{to}`: {e}"))?
        .next()
        .ok_or_else(|| Error::from(format!("bad destination `{to}`: no address")))
}

/// Connects to a destination and authenticates (main channel).
pub fn connect(to: &str, key: &Key) -> Result<TcpStream> {
    connect_channel(to, key, Channel::Main)
}

/// Connects one channel of a migration and authenticates.
pub fn connect_channel(to: &str, key: &Key, channel: Channel) -> Result<TcpStream> {
    let addr = resolve(to)?;
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .map_err(|e| format!("cannot connect to the destination {addr}: {e}"))?;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    stream.set_read_timeout(Some(Duration::from_secs(30))).map_err(|e| e.to_string())?;
    wire::connect_handshake(&mut stream, key, channel)
        .map_err(|e| format!("destination {addr} ({channel:?} channel): {e}"))?;
    Ok(stream)
}
