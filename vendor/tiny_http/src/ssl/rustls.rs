use crate::connection::Connection;
use crate::util::refined_tcp_stream::Stream as RefinedStream;
use std::error::Error;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use zeroize::Zeroizing;

/// A wrapper around an owned Rustls connection and corresponding stream.
///
/// Uses an internal Mutex to permit disparate reader & writer threads to access the stream independently.
pub(crate) struct RustlsStream(Arc<Mutex<Tls>>);

/// qsysd patch: the stream, and until its handshake is done the deadline for it. Upstream let
/// the handshake run inside the first read, with only the per-read socket timeout: a client that
/// trickles handshake bytes held a connection (and a slot of the connection cap) for good.
pub(crate) struct Tls {
    stream: rustls::StreamOwned<rustls::ServerConnection, Connection>,
    handshake: Option<(Instant, Duration)>,
}

impl Tls {
    /// Completes the handshake before anything else is read or written, by its deadline: one
    /// bounded socket read or write at a time, the deadline checked between them.
    fn handshake(&mut self) -> std::io::Result<()> {
        let Some((deadline, idle)) = self.handshake else {
            return Ok(());
        };
        let (conn, sock) = (&mut self.stream.conn, &mut self.stream.sock);
        while conn.is_handshaking() || conn.wants_write() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "tls handshake not done in time",
                ));
            }
            sock.set_timeouts(left.min(idle))?;
            if conn.wants_write() {
                conn.write_tls(sock)?;
                continue;
            }
            if !conn.is_handshaking() {
                break;
            }
            if conn.read_tls(sock)? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            conn.process_new_packets()
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
        }
        sock.set_timeouts(idle)?;
        self.handshake = None;
        Ok(())
    }
}

impl RustlsStream {
    fn tls(&self) -> std::sync::MutexGuard<'_, Tls> {
        self.0.lock().expect("Failed to lock SSL stream mutex")
    }

    pub(crate) fn peer_addr(&mut self) -> std::io::Result<Option<SocketAddr>> {
        self.tls().stream.sock.peer_addr()
    }

    pub(crate) fn shutdown(&mut self, how: Shutdown) -> std::io::Result<()> {
        self.tls().stream.sock.shutdown(how)
    }
}

impl Clone for RustlsStream {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl Read for RustlsStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let mut tls = self.tls();
        tls.handshake()?;
        tls.stream.read(buf)
    }
}

impl Write for RustlsStream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut tls = self.tls();
        tls.handshake()?;
        tls.stream.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let mut tls = self.tls();
        tls.handshake()?;
        tls.stream.flush()
    }
}

pub(crate) struct RustlsContext(Arc<rustls::ServerConfig>);

impl RustlsContext {
    /// qsysd patch: a context from a config the caller built (its own certificate resolver, so
    /// that renewed certificates can be swapped in while the server runs).
    pub(crate) fn from_config(config: Arc<rustls::ServerConfig>) -> Self {
        Self(config)
    }

    /// qsysd patch: rustls 0.23; PEM through its pki-types, and errors instead of panics for a
    /// key that cannot be read.
    pub(crate) fn from_pem(
        certificates: Vec<u8>,
        private_key: Zeroizing<Vec<u8>>,
    ) -> Result<Self, Box<dyn Error + Send + Sync>> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let certificate_chain = CertificateDer::pem_slice_iter(&certificates)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("certificate chain: {e}"))?;
        if certificate_chain.is_empty() {
            return Err("Couldn't extract certificate chain from config.".into());
        }
        let private_key =
            PrivateKeyDer::from_pem_slice(&private_key).map_err(|e| format!("private key: {e}"))?;
        let tls_conf = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certificate_chain, private_key)?;
        Ok(Self(Arc::new(tls_conf)))
    }

    /// qsysd patch: the handshake must be done `limit` after the accept (reads and writes wait
    /// `idle` at most each, as on a plain connection).
    pub(crate) fn accept(
        &self,
        stream: Connection,
        limit: Duration,
        idle: Duration,
    ) -> Result<RustlsStream, Box<dyn Error + Send + Sync + 'static>> {
        let connection = rustls::ServerConnection::new(self.0.clone())?;
        Ok(RustlsStream(Arc::new(Mutex::new(Tls {
            stream: rustls::StreamOwned::new(connection, stream),
            handshake: Some((Instant::now() + limit, idle)),
        }))))
    }
}

impl From<RustlsStream> for RefinedStream {
    fn from(stream: RustlsStream) -> Self {
        Self::Https(stream)
    }
}
