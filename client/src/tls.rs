//! The TLS material every AMOSKYS program loads: the three files of a
//! cert-manager style directory (`tls.crt`, `tls.key`, `ca.crt`), parsed
//! with the one crypto provider the workspace uses (ring).

use std::hash::{Hash, Hasher};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::identity::PeerIdentity;

/// Why a TLS directory cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// One of the three files could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What reading it said.
        #[source]
        source: io::Error,
    },
    /// A file is not the PEM it should be.
    #[error("{path}: {message}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// rustls refused the certificate and key.
    #[error("TLS configuration from {dir}: {source}")]
    Rustls {
        /// The TLS directory.
        dir: PathBuf,
        /// rustls's error.
        #[source]
        source: rustls::Error,
    },
    /// The client-certificate verifier could not be built from `ca.crt`.
    #[error("client verifier from {dir}: {message}")]
    Verifier {
        /// The TLS directory.
        dir: PathBuf,
        /// What the verifier builder said.
        message: String,
    },
}

/// The one crypto provider every AMOSKYS TLS config uses (ring; aws-lc-rs
/// beside kube's ring panics the kube client).
pub fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Parses every certificate in a PEM buffer.
pub fn pem_certs(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("bad PEM certificate: {e}"))?;
    if certs.is_empty() {
        return Err("no PEM certificate found".into());
    }
    Ok(certs)
}

/// The three files of a cert-manager style TLS directory, read once.
#[derive(Clone)]
pub struct TlsMaterial {
    /// The directory read.
    pub dir: PathBuf,
    /// `tls.crt`.
    pub cert_pem: Vec<u8>,
    /// `tls.key`.
    pub key_pem: Vec<u8>,
    /// `ca.crt`.
    pub ca_pem: Vec<u8>,
}

impl TlsMaterial {
    /// Reads the three files of `dir`.
    pub fn read(dir: &Path) -> Result<Self, TlsError> {
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read(&path).map_err(|source| TlsError::Read { path, source })
        };
        Ok(Self {
            dir: dir.to_path_buf(),
            cert_pem: read("tls.crt")?,
            key_pem: read("tls.key")?,
            ca_pem: read("ca.crt")?,
        })
    }

    /// Changes whenever any of the three files does.
    pub fn fingerprint(&self) -> u64 {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (&self.cert_pem, &self.key_pem, &self.ca_pem).hash(&mut h);
        h.finish()
    }

    fn pem_err(&self, file: &str, message: String) -> TlsError {
        TlsError::Pem {
            path: self.dir.join(file),
            message,
        }
    }

    /// The certificate chain in `tls.crt`.
    pub fn certs(&self) -> Result<Vec<CertificateDer<'static>>, TlsError> {
        pem_certs(&self.cert_pem).map_err(|m| self.pem_err("tls.crt", m))
    }

    /// The private key in `tls.key`.
    pub fn key(&self) -> Result<PrivateKeyDer<'static>, TlsError> {
        PrivateKeyDer::from_pem_slice(&self.key_pem)
            .map_err(|e| self.pem_err("tls.key", format!("bad PEM private key: {e}")))
    }

    /// The CAs in `ca.crt`, as a trust store.
    pub fn roots(&self) -> Result<RootCertStore, TlsError> {
        let mut roots = RootCertStore::empty();
        for c in pem_certs(&self.ca_pem).map_err(|m| self.pem_err("ca.crt", m))? {
            roots
                .add(c)
                .map_err(|e| self.pem_err("ca.crt", format!("unusable CA certificate: {e}")))?;
        }
        Ok(roots)
    }

    /// When the leaf certificate expires (unix seconds).
    pub fn leaf_not_after(&self) -> Option<i64> {
        use x509_parser::prelude::{FromDer, X509Certificate};
        let der = self.certs().ok()?.into_iter().next()?;
        let (_, cert) = X509Certificate::from_der(&der).ok()?;
        Some(cert.validity().not_after.timestamp())
    }

    /// Serial (hex) of the leaf certificate, for status and logs.
    pub fn leaf_serial(&self) -> Option<String> {
        let der = self.certs().ok()?.into_iter().next()?;
        PeerIdentity::from_der(&der).ok().map(|p| p.serial)
    }
}
