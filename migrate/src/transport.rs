//! Connections: tokens that name a migration, the interactive demand lane,
//! byte counting for progress and reports.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::wire::FrameReader;

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
