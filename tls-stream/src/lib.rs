//! TLS 1.3 (rustls, ring) on a TCP connection whose reader and writer live
//! on different threads, as a migration's connections do (the source pushes
//! pages on one thread while another reads acknowledgements; the destination
//! answers demand faults while it reads the push).
//!
//! A [`Stream`] is a cloneable handle: every clone shares one TLS session.
//! Reading takes the receive side (its ciphertext buffer), writing the send
//! side; the session itself is locked only to encrypt or decrypt, never
//! while blocked on the socket, so a reader waiting for data never stalls a
//! writer. Ciphertext leaves in the order it was produced: a writer holds the
//! send side from encryption until its bytes are on the socket.
//!
//! Authentication is mutual, by one of:
//! - [`Config::shared_key`]: both ends hold the same secret (at least 32
//!   bytes). Each derives from it the same Ed25519 key and the same
//!   self-signed certificate (Ed25519 signatures are deterministic) and
//!   accepts exactly that certificate from its peer: knowing the secret is
//!   the only way in, as with a TLS pre-shared key (which rustls does not
//!   offer).
//! - [`Config::certificates`]: X.509 as QEMU's `tls-creds-x509`: an own chain
//!   and key, the CA that signs the peer, and optionally the name the peer's
//!   certificate must carry (`tls-authz`); the client also checks the
//!   server's certificate against the name it connected to.
//!
//! [`Stream::plain`] wraps a TCP stream with no TLS (for an explicit
//! `--insecure`), so callers hold one type either way.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{ClientConfig, DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig, SignatureScheme};

/// The shortest shared secret accepted (bytes).
pub const MIN_SHARED_KEY: usize = 32;

/// Ciphertext read from the socket at once: a few TLS records.
const RX_CHUNK: usize = 64 * 1024;

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn err(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("TLS: {e}"))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// How both ends of a connection authenticate each other.
#[derive(Clone)]
pub struct Config {
    client: Arc<ClientConfig>,
    server: Arc<ServerConfig>,
    /// Certificates: the name the client's certificate must carry.
    client_name: Option<String>,
    /// Shared key: the name the derived certificate carries (any name
    /// connects: the certificate, not the name, is what is checked).
    fixed_server_name: Option<ServerName<'static>>,
    what: &'static str,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "tls_stream::Config({})", self.what)
    }
}

/// Accepts exactly one certificate (the one derived from the shared key).
#[derive(Debug)]
struct Pinned {
    cert: CertificateDer<'static>,
    provider: Arc<CryptoProvider>,
}

impl Pinned {
    fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
    ) -> Result<(), rustls::Error> {
        if end_entity.as_ref() == self.cert.as_ref() && intermediates.is_empty() {
            Ok(())
        } else {
            Err(rustls::Error::InvalidCertificate(rustls::CertificateError::ApplicationVerificationFailure))
        }
    }
}

/// The signature checks both verifier traits ask of [`Pinned`]: the
/// provider's own, over the (pinned) certificate's Ed25519 key.
macro_rules! pinned_signatures {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
        }
        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
        }
        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            vec![SignatureScheme::ED25519]
        }
    };
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.check(end_entity, intermediates).map(|_| ServerCertVerified::assertion())
    }
    pinned_signatures!();
}

impl ClientCertVerifier for Pinned {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.check(end_entity, intermediates).map(|_| ClientCertVerified::assertion())
    }
    pinned_signatures!();
}

/// The name inside the certificate derived from a shared key.
const SHARED_KEY_NAME: &str = "vmm-shared-key";

/// The Ed25519 key and self-signed certificate both ends derive from one
/// shared secret (deterministic: the same secret gives the same bytes).
fn derive_identity(secret: &[u8]) -> io::Result<(CertificateDer<'static>, PrivateKeyDer<'static>)> {
    let seed = blake3::derive_key("vmm migration TLS identity v1 (Ed25519 seed)", secret);
    // PKCS#8 v1 of an Ed25519 private key (RFC 8410): a fixed prefix, then the seed.
    let mut pkcs8 =
        vec![0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20];
    pkcs8.extend_from_slice(&seed);
    let key_der = PrivatePkcs8KeyDer::from(pkcs8);
    let kp = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(&key_der, &rcgen::PKCS_ED25519).map_err(err)?;
    let mut params = rcgen::CertificateParams::new(vec![SHARED_KEY_NAME.to_string()]).map_err(err)?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(rcgen::DnType::CommonName, SHARED_KEY_NAME);
    let cert = params.self_signed(&kp).map_err(err)?;
    Ok((cert.der().clone(), PrivateKeyDer::Pkcs8(key_der)))
}

fn read_certs(path: &Path) -> io::Result<Vec<CertificateDer<'static>>> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| io::Error::other(format!("cannot read certificates from {}: {e}", path.display())))?
        .collect::<Result<_, _>>()
        .map_err(|e| io::Error::other(format!("bad certificate in {}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(io::Error::other(format!("{} holds no PEM certificate", path.display())));
    }
    Ok(certs)
}

impl Config {
    /// Mutual authentication by a shared secret (see the crate docs).
    pub fn shared_key(secret: &[u8]) -> io::Result<Self> {
        if secret.len() < MIN_SHARED_KEY {
            return Err(io::Error::other(format!(
                "a shared key needs at least {MIN_SHARED_KEY} bytes (got {})",
                secret.len()
            )));
        }
        let (cert, key) = derive_identity(secret)?;
        let p = provider();
        let pinned = Arc::new(Pinned { cert: cert.clone(), provider: p.clone() });
        let client = ClientConfig::builder_with_provider(p.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(err)?
            .dangerous()
            .with_custom_certificate_verifier(pinned.clone())
            .with_client_auth_cert(vec![cert.clone()], key.clone_key())
            .map_err(err)?;
        let server = ServerConfig::builder_with_provider(p)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(err)?
            .with_client_cert_verifier(pinned)
            .with_single_cert(vec![cert], key)
            .map_err(err)?;
        Ok(Self::finish(client, server, None, Some(ServerName::try_from(SHARED_KEY_NAME).map_err(err)?), "shared key"))
    }

    /// Mutual authentication by X.509 certificates: `cert` (PEM chain) and
    /// `key` (PEM private key) are this end's; `ca` (PEM) signs the peer's.
    /// With `client_name`, the server accepts only a client whose
    /// certificate is valid for that name.
    pub fn certificates(cert: &Path, key: &Path, ca: &Path, client_name: Option<String>) -> io::Result<Self> {
        let chain = read_certs(cert)?;
        let key = PrivateKeyDer::from_pem_file(key)
            .map_err(|e| io::Error::other(format!("cannot read the private key {}: {e}", key.display())))?;
        let mut roots = RootCertStore::empty();
        for c in read_certs(ca)? {
            roots.add(c).map_err(|e| io::Error::other(format!("bad CA certificate in {}: {e}", ca.display())))?;
        }
        let roots = Arc::new(roots);
        let p = provider();
        let client = ClientConfig::builder_with_provider(p.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(err)?
            .with_root_certificates(roots.clone())
            .with_client_auth_cert(chain.clone(), key.clone_key())
            .map_err(err)?;
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(roots, p.clone()).build().map_err(err)?;
        let server = ServerConfig::builder_with_provider(p)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(err)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .map_err(err)?;
        if let Some(n) = &client_name {
            ServerName::try_from(n.as_str()).map_err(|e| io::Error::other(format!("bad peer name `{n}`: {e}")))?;
        }
        Ok(Self::finish(client, server, client_name, None, "X.509 certificates"))
    }

    fn finish(
        client: ClientConfig,
        mut server: ServerConfig,
        client_name: Option<String>,
        fixed_server_name: Option<ServerName<'static>>,
        what: &'static str,
    ) -> Self {
        // No session tickets: nothing arrives after the handshake but data, and no
        // connection resumes another (each migration connection authenticates fully).
        server.send_tls13_tickets = 0;
        server.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        let mut client = client;
        client.resumption = rustls::client::Resumption::disabled();
        let cfg = Self { client: Arc::new(client), server: Arc::new(server), client_name, fixed_server_name, what };
        cfg.warm_up();
        cfg
    }

    /// One handshake in memory, client against server: the crypto library's first use
    /// costs ~20 ms here (one-time initialisation), which must not land in a migration's
    /// execution transfer. Its outcome does not matter (a certificate for another name
    /// fails, after the key exchange and signatures have run).
    fn warm_up(&self) {
        let name = self
            .fixed_server_name
            .clone()
            .unwrap_or_else(|| ServerName::try_from("warm-up.invalid").expect("a valid name"));
        let (Ok(mut c), Ok(mut s)) = (
            rustls::ClientConnection::new(self.client.clone(), name),
            rustls::ServerConnection::new(self.server.clone()),
        ) else {
            return;
        };
        for _ in 0..8 {
            let mut buf = Vec::new();
            while c.wants_write() {
                if c.write_tls(&mut buf).is_err() {
                    return;
                }
            }
            if s.read_tls(&mut &buf[..]).is_err() || s.process_new_packets().is_err() {
                return;
            }
            buf.clear();
            while s.wants_write() {
                if s.write_tls(&mut buf).is_err() {
                    return;
                }
            }
            if c.read_tls(&mut &buf[..]).is_err() || c.process_new_packets().is_err() {
                return;
            }
            if !c.is_handshaking() && !s.is_handshaking() {
                return;
            }
        }
    }

    /// What authenticates (for logs and status).
    pub fn describe(&self) -> &'static str {
        self.what
    }

    /// Client side: the TLS handshake over `tcp` with the server `host`
    /// (the host part of the address connected to; checked against the
    /// server's certificate in X.509 mode). Honors `tcp`'s timeouts.
    pub fn connect(&self, tcp: TcpStream, host: &str) -> io::Result<Stream> {
        let name = match &self.fixed_server_name {
            Some(n) => n.clone(),
            None => ServerName::try_from(host.to_string())
                .map_err(|e| io::Error::other(format!("`{host}` is not a name a certificate can carry: {e}")))?,
        };
        let conn = rustls::ClientConnection::new(self.client.clone(), name).map_err(err)?;
        Stream::handshake(tcp, rustls::Connection::Client(conn), None)
    }

    /// Server side: the TLS handshake on an accepted `tcp`. Honors `tcp`'s
    /// timeouts (set one: a silent client must not hold the listener).
    pub fn accept(&self, tcp: TcpStream) -> io::Result<Stream> {
        let conn = rustls::ServerConnection::new(self.server.clone()).map_err(err)?;
        Stream::handshake(tcp, rustls::Connection::Server(conn), self.client_name.as_deref())
    }
}

/// Receive side: ciphertext read from the socket, not yet fed to the session.
struct Rx {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    eof: bool,
}

struct Tls {
    session: Mutex<rustls::Connection>,
    rx: Mutex<Rx>,
    /// Send side: ciphertext on its way to the socket.
    tx: Mutex<Vec<u8>>,
}

/// A TCP connection, with TLS or (explicitly) without; clones share it.
#[derive(Clone)]
pub struct Stream {
    tcp: Arc<TcpStream>,
    tls: Option<Arc<Tls>>,
}

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Stream({:?}, tls={})", self.tcp.peer_addr().ok(), self.tls.is_some())
    }
}

impl Stream {
    /// No TLS: bytes cross the network as written.
    pub fn plain(tcp: TcpStream) -> Self {
        Self { tcp: Arc::new(tcp), tls: None }
    }

    fn handshake(tcp: TcpStream, mut session: rustls::Connection, client_name: Option<&str>) -> io::Result<Self> {
        let mut t = &tcp;
        while session.is_handshaking() {
            session.complete_io(&mut t).map_err(|e| match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                    io::Error::new(e.kind(), "TLS handshake: the peer did not answer in time")
                }
                io::ErrorKind::InvalidData => io::Error::new(e.kind(), format!("TLS handshake refused: {e}")),
                _ => io::Error::new(e.kind(), format!("TLS handshake: {e}")),
            })?;
        }
        while session.wants_write() {
            session.write_tls(&mut t)?;
        }
        if let Some(name) = client_name {
            let certs = session.peer_certificates().unwrap_or_default();
            let ok = certs
                .first()
                .and_then(|c| webpki::EndEntityCert::try_from(c).ok())
                .zip(ServerName::try_from(name).ok())
                .is_some_and(|(ee, n)| ee.verify_is_valid_for_subject_name(&n).is_ok());
            if !ok {
                return Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    format!("TLS: the peer's certificate is not valid for `{name}`"),
                ));
            }
        }
        log::debug!("TLS 1.3 established with {:?} ({:?})", tcp.peer_addr().ok(), session.negotiated_cipher_suite());
        Ok(Self {
            tcp: Arc::new(tcp),
            tls: Some(Arc::new(Tls {
                session: Mutex::new(session),
                rx: Mutex::new(Rx { buf: vec![0; RX_CHUNK], start: 0, end: 0, eof: false }),
                tx: Mutex::new(Vec::with_capacity(RX_CHUNK + 1024)),
            })),
        })
    }

    /// Whether the bytes are encrypted and authenticated.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Another handle on the same connection (and TLS session).
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(self.clone())
    }

    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        self.tcp.shutdown(how)
    }

    pub fn set_read_timeout(&self, d: Option<Duration>) -> io::Result<()> {
        self.tcp.set_read_timeout(d)
    }

    pub fn set_write_timeout(&self, d: Option<Duration>) -> io::Result<()> {
        self.tcp.set_write_timeout(d)
    }

    pub fn set_nodelay(&self, on: bool) -> io::Result<()> {
        self.tcp.set_nodelay(on)
    }

    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.tcp.peer_addr()
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.tcp.local_addr()
    }

    /// The TCP socket (for socket options; never read or write it directly).
    pub fn tcp(&self) -> &TcpStream {
        &self.tcp
    }

    fn tls_read(&self, tls: &Tls, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let mut rx = lock(&tls.rx);
        loop {
            let mut s = lock(&tls.session);
            match s.reader().read(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // The peer closed TCP without close_notify: an end of stream to the caller,
                // whose framing tells a truncated message from a finished one.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
                Err(e) => return Err(e),
            }
            if rx.start < rx.end {
                let (start, end) = (rx.start, rx.end);
                let mut slice = &rx.buf[start..end];
                let n = s.read_tls(&mut slice)?;
                rx.start += n;
                s.process_new_packets().map_err(err)?;
                let wants_write = s.wants_write();
                drop(s);
                if wants_write {
                    self.send_pending(tls, false)?;
                }
                continue;
            }
            if rx.eof {
                let _ = s.read_tls(&mut &[][..]);
                s.process_new_packets().map_err(err)?;
                return match s.reader().read(buf) {
                    Ok(n) => Ok(n),
                    Err(e) if e.kind() == io::ErrorKind::Other || e.kind() == io::ErrorKind::InvalidData => Err(e),
                    Err(_) => Ok(0),
                };
            }
            drop(s);
            let n = (&*self.tcp).read(&mut rx.buf)?;
            rx.start = 0;
            rx.end = n;
            rx.eof = n == 0;
        }
    }

    /// Sends what the session has queued (alerts, key updates). `wait`:
    /// block for the send side; otherwise leave it to the writer holding it
    /// (it sends the session's queue before it lets go).
    fn send_pending(&self, tls: &Tls, wait: bool) -> io::Result<()> {
        let mut tx = if wait {
            lock(&tls.tx)
        } else {
            match tls.tx.try_lock() {
                Ok(g) => g,
                Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
                Err(std::sync::TryLockError::WouldBlock) => return Ok(()),
            }
        };
        self.drain_and_send(tls, &mut tx)
    }

    fn drain_and_send(&self, tls: &Tls, tx: &mut Vec<u8>) -> io::Result<()> {
        loop {
            {
                let mut s = lock(&tls.session);
                while s.wants_write() {
                    s.write_tls(tx)?;
                }
            }
            if tx.is_empty() {
                return Ok(());
            }
            let r = (&*self.tcp).write_all(tx);
            tx.clear();
            r?;
        }
    }

    fn tls_write(&self, tls: &Tls, buf: &[u8]) -> io::Result<usize> {
        let mut tx = lock(&tls.tx);
        let n = {
            let mut s = lock(&tls.session);
            let n = s.writer().write(buf)?;
            while s.wants_write() {
                s.write_tls(&mut *tx)?;
            }
            n
        };
        let r = (&*self.tcp).write_all(&tx);
        tx.clear();
        r?;
        // Anything a reader queued while this writer held the send side.
        self.drain_and_send(tls, &mut tx)?;
        Ok(n)
    }

    /// Sends TLS close_notify (the peer then reads a clean end of stream).
    pub fn close_notify(&self) -> io::Result<()> {
        if let Some(tls) = &self.tls {
            lock(&tls.session).send_close_notify();
            self.send_pending(tls, true)?;
        }
        Ok(())
    }
}

impl Read for &Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match &self.tls {
            Some(tls) => self.tls_read(tls, buf),
            None => (&*self.tcp).read(buf),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        (&*self).read(buf)
    }
}

impl Write for &Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &self.tls {
            Some(tls) => self.tls_write(tls, buf),
            None => (&*self.tcp).write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        (&*self).write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl AsRawFd for Stream {
    fn as_raw_fd(&self) -> RawFd {
        self.tcp.as_raw_fd()
    }
}
