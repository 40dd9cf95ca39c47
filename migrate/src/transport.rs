//! Connections: how both ends authenticate and encrypt ([`Security`],
//! [`Credentials`]: TLS 1.3 by a shared key file or X.509 certificates, or
//! plaintext only when asked for), tokens that name a migration, the
//! interactive demand lane, byte counting for progress and reports.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
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
pub type MainConn = (FrameReader<Box<dyn Read + Send>>, Conn, u64);

/// One migration connection (main or demand): TLS, or plaintext with `--insecure`.
pub use tls_stream::Stream as Conn;

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
pub fn mark_interactive(s: &Conn) {
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

/// How a migration's connections authenticate, as the operator gave it
/// (`vmm receive`/`vmm migrate` options; the API's `migrate` request).
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Security {
    /// A shared key (`vmm keygen`): TLS authenticated by it, unless X.509 is given.
    pub key_file: Option<PathBuf>,
    /// X.509: this end's certificate chain (PEM).
    pub tls_cert: Option<PathBuf>,
    /// X.509: this end's private key (PEM).
    pub tls_key: Option<PathBuf>,
    /// X.509: the CA that signs the peer's certificate (PEM).
    pub tls_ca: Option<PathBuf>,
    /// X.509, destination: the name the source's certificate must carry.
    pub tls_peer: Option<String>,
    /// No TLS: pages cross the network in clear (the key file still
    /// authenticates the connection's start, nothing after it).
    pub insecure: bool,
}

/// Authenticated, encrypting ends of a migration's connections.
#[derive(Clone, Debug)]
pub struct Credentials {
    /// Names the channel and proves the shared key inside the connection.
    pub key: Key,
    tls: Option<tls_stream::Config>,
}

/// The key inside a connection authenticated by certificates alone (TLS
/// authenticates; this only names the channel).
const CERT_ONLY_KEY: &[u8] = b"vmm migration: authenticated by X.509 certificates";

impl Security {
    /// The same, with every path absolute (for a VMM with another working directory).
    pub fn absolute(self) -> Self {
        let abs = |p: Option<PathBuf>| p.map(|p| std::path::absolute(&p).unwrap_or(p));
        Self {
            key_file: abs(self.key_file),
            tls_cert: abs(self.tls_cert),
            tls_key: abs(self.tls_key),
            tls_ca: abs(self.tls_ca),
            ..self
        }
    }

    /// Reads the key or certificates and builds the credentials.
    pub fn load(&self) -> Result<Credentials> {
        let secret = match &self.key_file {
            Some(p) => Some(read_key_file(p)?),
            None => None,
        };
        let x509 = [&self.tls_cert, &self.tls_key, &self.tls_ca];
        if x509.iter().any(|o| o.is_some()) {
            if self.insecure {
                return Err(Error::from("--insecure and --tls-cert/--tls-key/--tls-ca exclude each other"));
            }
            let (Some(cert), Some(key), Some(ca)) = (&self.tls_cert, &self.tls_key, &self.tls_ca) else {
                return Err(Error::from("X.509 needs all of --tls-cert, --tls-key and --tls-ca"));
            };
            let tls = tls_stream::Config::certificates(cert, key, ca, self.tls_peer.clone())
                .map_err(|e| Error::from(e.to_string()))?;
            let key = Key::derive(secret.as_deref().unwrap_or(CERT_ONLY_KEY));
            return Ok(Credentials { key, tls: Some(tls) });
        }
        if self.tls_peer.is_some() {
            return Err(Error::from("--tls-peer checks an X.509 certificate: give --tls-cert, --tls-key and --tls-ca"));
        }
        let secret = secret.ok_or(
            "give a key file (--key-file, see `vmm keygen`) or X.509 certificates (--tls-cert, --tls-key, --tls-ca)",
        )?;
        let tls = if self.insecure {
            None
        } else {
            Some(tls_stream::Config::shared_key(&secret).map_err(|e| Error::from(e.to_string()))?)
        };
        Ok(Credentials { key: Key::derive(&secret), tls })
    }
}

impl Credentials {
    /// Plaintext with `key` (tests of the protocol under the encryption).
    pub fn insecure(key: Key) -> Self {
        Self { key, tls: None }
    }

    /// TLS authenticated by the shared `secret` (at least 32 bytes).
    pub fn shared_key(secret: &[u8]) -> Result<Self> {
        let tls = tls_stream::Config::shared_key(secret).map_err(|e| Error::from(e.to_string()))?;
        Ok(Self { key: Key::derive(secret), tls: Some(tls) })
    }

    /// What protects the connections (for logs and reports).
    pub fn describe(&self) -> &'static str {
        self.tls.as_ref().map_or("none (plaintext, --insecure)", |t| t.describe())
    }

    /// Whether the connections are encrypted.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Server side of one channel on an accepted TCP connection: TLS, then
    /// the channel handshake, each within `timeout`.
    pub fn accept(&self, tcp: TcpStream, channel: Channel, timeout: Duration) -> Result<Conn> {
        let _ = tcp.set_nonblocking(false);
        let _ = tcp.set_nodelay(true);
        tcp.set_read_timeout(Some(timeout)).map_err(|e| e.to_string())?;
        let mut conn = match &self.tls {
            Some(t) => t.accept(tcp).map_err(|e| Error::from(e.to_string()))?,
            None => Conn::plain(tcp),
        };
        wire::accept_handshake(&mut conn, &self.key, channel)?;
        Ok(conn)
    }
}

/// A key file: at least 32 bytes, readable by its owner only.
fn read_key_file(path: &Path) -> Result<Vec<u8>> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).map_err(|e| format!("cannot read the key file {}: {e}", path.display()))?;
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(Error::from(format!(
            "the key file {} is accessible to others (mode {:o}): chmod 600 it, or make one with `vmm keygen`",
            path.display(),
            meta.permissions().mode() & 0o777
        )));
    }
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read the key file {}: {e}", path.display()))?;
    if bytes.len() < tls_stream::MIN_SHARED_KEY {
        return Err(Error::from(format!(
            "the key file {} holds {} bytes, fewer than {}: make one with `vmm keygen`",
            path.display(),
            bytes.len(),
            tls_stream::MIN_SHARED_KEY
        )));
    }
    Ok(bytes)
}

/// Writes a new key file: 32 random bytes from the kernel (hex), mode 0600;
/// never overwrites one.
pub fn write_key_file(path: &Path) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut b = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .map_err(|e| format!("reading /dev/urandom: {e}"))?;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("cannot create the key file {}: {e}", path.display()))?;
    f.write_all(format!("{hex}\n").as_bytes()).map_err(|e| format!("writing {}: {e}", path.display()))?;
    f.sync_all().map_err(|e| format!("writing {}: {e}", path.display()))?;
    Ok(())
}

fn resolve(to: &str) -> Result<SocketAddr> {
    to.to_socket_addrs()
        .map_err(|e| format!("bad destination `{to}`: {e}"))?
        .next()
        .ok_or_else(|| Error::from(format!("bad destination `{to}`: no address")))
}

/// Connects to a destination and authenticates (main channel).
pub fn connect(to: &str, creds: &Credentials) -> Result<Conn> {
    connect_channel(to, creds, Channel::Main)
}

/// Connects one channel of a migration: TCP, TLS (the destination's
/// certificate checked against the host part of `to` in X.509 mode), then
/// the channel handshake.
pub fn connect_channel(to: &str, creds: &Credentials, channel: Channel) -> Result<Conn> {
    let addr = resolve(to)?;
    let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .map_err(|e| format!("cannot connect to the destination {addr}: {e}"))?;
    tcp.set_nodelay(true).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(Duration::from_secs(30))).map_err(|e| e.to_string())?;
    let mut conn = match &creds.tls {
        Some(t) => {
            let host = to.rsplit_once(':').map_or(to, |(h, _)| h).trim_start_matches('[').trim_end_matches(']');
            t.connect(tcp, host).map_err(|e| format!("destination {addr} ({channel:?} channel): {e}"))?
        }
        None => Conn::plain(tcp),
    };
    wire::connect_handshake(&mut conn, &creds.key, channel)
        .map_err(|e| format!("destination {addr} ({channel:?} channel): {e}"))?;
    Ok(conn)
}
