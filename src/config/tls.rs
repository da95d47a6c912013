//! A listener's TLS files (`tls_cert`, `tls_key` in `[callback]` or `[admin]`): both or neither,
//! and checked when the config is read, so a bad file is a config error naming its key rather
//! than a listener that fails its first handshake.

use std::path::PathBuf;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;

use super::{invalid, read_capped, ConfigError};

/// Largest certificate chain or key file read (a long chain is a few tens of KiB).
const MAX_TLS_FILE: u64 = 1 << 20;

/// Where a listener's certificate chain (PEM, the server's certificate first) and its private key
/// (PEM: PKCS#8, PKCS#1 or SEC1) are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TlsFiles {
    pub(crate) cert: PathBuf,
    pub(crate) key: PathBuf,
}

impl TlsFiles {
    /// The chain and key as they are in the files now, ready to serve: parsed, and the key
    /// checked against the chain's first certificate. The error says which file and why.
    pub(crate) fn load(&self) -> Result<Arc<CertifiedKey>, String> {
        self.load_each().map_err(|e| match e {
            TlsFileError::Cert(why) | TlsFileError::Key(why) => why,
        })
    }

    /// [`TlsFiles::load`], saying which of the two files is at fault.
    fn load_each(&self) -> Result<Arc<CertifiedKey>, TlsFileError> {
        let cert = self.cert.display();
        let cert_error = |e: &dyn std::fmt::Display| TlsFileError::Cert(format!("{cert}: {e}"));
        let pem = read_capped(&self.cert, MAX_TLS_FILE).map_err(|e| cert_error(&e))?;
        let chain = CertificateDer::pem_slice_iter(pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| cert_error(&e))?;
        if chain.is_empty() {
            return Err(TlsFileError::Cert(format!(
                "{cert}: no PEM certificate in it"
            )));
        }
        let key_error =
            |e: &dyn std::fmt::Display| TlsFileError::Key(format!("{}: {e}", self.key.display()));
        let pem = read_capped(&self.key, MAX_TLS_FILE).map_err(|e| key_error(&e))?;
        let key = PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| key_error(&e))?;
        let provider = rustls::crypto::ring::default_provider();
        let signer = provider
            .key_provider
            .load_private_key(key)
            .map_err(|e| key_error(&e))?;
        let certified = CertifiedKey::new(chain, signer);
        certified
            .keys_match()
            .map_err(|e| key_error(&format!("does not match {cert}: {e}")))?;
        Ok(Arc::new(certified))
    }
}

/// Which TLS file would not load, and why.
enum TlsFileError {
    Cert(String),
    Key(String),
}

/// `[section]`'s `tls_cert` and `tls_key`: both or neither, each file readable and the two a pair.
pub(super) fn tls_files(
    section: &str,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
) -> Result<Option<TlsFiles>, ConfigError> {
    let files = match (cert, key) {
        (None, None) => return Ok(None),
        (Some(cert), Some(key)) => TlsFiles { cert, key },
        (Some(cert), None) => {
            return Err(invalid(
                format!("{section}.tls_cert"),
                cert.display(),
                format!("set {section}.tls_key too (the certificate's private key)"),
            ))
        }
        (None, Some(key)) => {
            return Err(invalid(
                format!("{section}.tls_key"),
                key.display(),
                format!("set {section}.tls_cert too (the certificate chain)"),
            ))
        }
    };
    match files.load_each() {
        Ok(_) => Ok(Some(files)),
        Err(TlsFileError::Cert(why)) => Err(invalid(
            format!("{section}.tls_cert"),
            files.cert.display(),
            why,
        )),
        Err(TlsFileError::Key(why)) => Err(invalid(
            format!("{section}.tls_key"),
            files.key.display(),
            why,
        )),
    }
}
