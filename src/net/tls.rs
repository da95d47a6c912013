//! TLS on a listener: rustls, with a certificate that a reload renews in place.
//!
//! The listener keeps one rustls config for its life; the certificate it presents comes from a
//! [`Renewable`] that the config resolves on every handshake, so a reload swaps in renewed files
//! (a certbot or ACME hook's `systemctl reload qsysd`) without a restart, and connections already
//! open keep the certificate they began with.

use std::sync::{Arc, RwLock};

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;

use crate::config::TlsFiles;
use crate::sync::ReadWrite;

/// The certificate a listener presents now.
#[derive(Debug)]
pub(crate) struct Renewable {
    files: TlsFiles,
    current: RwLock<Arc<CertifiedKey>>,
}

impl Renewable {
    /// The certificate in `files` now.
    pub(crate) fn load(files: &TlsFiles) -> Result<Arc<Renewable>, String> {
        Ok(Arc::new(Renewable {
            current: RwLock::new(files.load()?),
            files: files.clone(),
        }))
    }

    /// Reads the files again and presents what they hold from the next handshake on. On an
    /// error the certificate in use stays.
    pub(crate) fn renew(&self) -> Result<(), String> {
        let fresh = self.files.load()?;
        *self.current.writing() = fresh;
        Ok(())
    }

    /// The certificate file, for the log.
    pub(crate) fn cert_path(&self) -> std::path::Display<'_> {
        self.files.cert.display()
    }

    /// A rustls server config that presents this certificate, whatever it is at each handshake:
    /// TLS 1.2 and 1.3, no client certificates.
    pub(crate) fn server_config(self: &Arc<Self>) -> Result<Arc<ServerConfig>, rustls::Error> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(Arc::clone(self) as Arc<dyn ResolvesServerCert>);
        Ok(Arc::new(config))
    }
}

impl ResolvesServerCert for Renewable {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.current.reading()))
    }
}
