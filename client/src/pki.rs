//! Certificate issuance for the dev PKI (`amoskys pki init`) and for tests.
//!
//! Layout follows cert-manager's Secret keys so the same files work whether
//! they come from here, from the operator, or from cert-manager:
//! `DIR/<name>/{tls.crt,tls.key,ca.crt}`.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use time::OffsetDateTime;

use crate::identity::Role;

/// Why issuing or writing certificates failed.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// rcgen could not build or sign a certificate.
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// A certificate file could not be written or read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the filesystem said.
        #[source]
        source: std::io::Error,
    },
    /// The directory already holds a PKI and overwriting was not asked for.
    #[error("{0} already holds a PKI; pass --force to overwrite it")]
    Exists(PathBuf),
    /// A name for the server certificate is not a DNS name.
    #[error("invalid DNS name {0:?}")]
    BadDnsName(String),
}

/// A CA that can sign leaves: its certificate PEM and key.
pub struct CertAuthority {
    /// The CA certificate.
    pub cert_pem: String,
    /// The CA's private key.
    pub key_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

/// One issued leaf in PEM form.
#[derive(Clone, Debug)]
pub struct IssuedCert {
    /// The leaf certificate.
    pub cert_pem: String,
    /// Its private key.
    pub key_pem: String,
    /// The CA certificate(s) to trust, written as `ca.crt`.
    pub ca_pem: String,
}

/// Validity window; `not_before` is backdated a little for clock skew.
#[derive(Clone, Copy, Debug)]
pub struct Validity {
    /// Valid from.
    pub not_before: OffsetDateTime,
    /// Valid until.
    pub not_after: OffsetDateTime,
}

impl Validity {
    /// From now (backdated 5 minutes) for `lifetime`.
    pub fn from_now(lifetime: Duration) -> Self {
        Self::starting(OffsetDateTime::now_utc(), lifetime)
    }

    /// From `now` (backdated 5 minutes) for `lifetime`; the operator passes
    /// its own clock so renewal schedules can be tested.
    pub fn starting(now: OffsetDateTime, lifetime: Duration) -> Self {
        Self {
            not_before: now - time::Duration::minutes(5),
            not_after: now + lifetime,
        }
    }
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    // A positive DER integer: clear the top bit.
    bytes[0] &= 0x7f;
    SerialNumber::from(bytes.to_vec())
}

impl CertAuthority {
    /// A new self-signed CA named `common_name`.
    pub fn generate(common_name: &str, validity: Validity) -> Result<Self, PkiError> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        dn.push(DnType::OrganizationName, "AMOSKYS");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = validity.not_before;
        params.not_after = validity.not_after;
        params.serial_number = Some(random_serial());
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        Ok(Self {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// Loads a CA from its PEM certificate and key (as written by `write_dir`).
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, PkiError> {
        let key = KeyPair::from_pem(key_pem)?;
        Ok(Self {
            cert_pem: cert_pem.to_string(),
            key_pem: key_pem.to_string(),
            issuer: Issuer::from_ca_cert_pem(cert_pem, key)?,
        })
    }

    /// A server certificate for the bus with the given DNS names and IPs.
    pub fn issue_server(
        &self,
        common_name: &str,
        dns: &[String],
        ips: &[IpAddr],
        validity: Validity,
    ) -> Result<IssuedCert, PkiError> {
        let mut sans = Vec::new();
        for d in dns {
            sans.push(SanType::DnsName(
                d.clone()
                    .try_into()
                    .map_err(|_| PkiError::BadDnsName(d.clone()))?,
            ));
        }
        sans.extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        self.issue(
            common_name,
            sans,
            vec![ExtendedKeyUsagePurpose::ServerAuth],
            validity,
        )
    }

    /// A client certificate carrying `role` (see [`Role::uri`]).
    pub fn issue_client(
        &self,
        common_name: &str,
        role: Role,
        validity: Validity,
    ) -> Result<IssuedCert, PkiError> {
        let uri = role.uri().try_into().map_err(PkiError::Rcgen)?;
        self.issue(
            common_name,
            vec![SanType::URI(uri)],
            vec![ExtendedKeyUsagePurpose::ClientAuth],
            validity,
        )
    }

    fn issue(
        &self,
        common_name: &str,
        sans: Vec<SanType>,
        eku: Vec<ExtendedKeyUsagePurpose>,
        validity: Validity,
    ) -> Result<IssuedCert, PkiError> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        dn.push(DnType::OrganizationName, "AMOSKYS");
        params.distinguished_name = dn;
        params.subject_alt_names = sans;
        params.extended_key_usages = eku;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.use_authority_key_identifier_extension = true;
        params.not_before = validity.not_before;
        params.not_after = validity.not_after;
        params.serial_number = Some(random_serial());
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            ca_pem: self.cert_pem.clone(),
        })
    }
}

impl IssuedCert {
    /// Writes `tls.crt`, `tls.key` (mode 0600) and `ca.crt` into `dir`.
    ///
    /// Each file is written to a temporary name and renamed into place, so a
    /// process reloading the directory never reads a half-written file.
    pub fn write_dir(&self, dir: &Path) -> Result<(), PkiError> {
        write_secret_dir(dir, &self.cert_pem, &self.key_pem, &self.ca_pem)
    }
}

/// Writes a cert-manager style TLS directory atomically per file.
pub fn write_secret_dir(dir: &Path, crt: &str, key: &str, ca: &str) -> Result<(), PkiError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| PkiError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    for (name, body, private) in [
        ("ca.crt", ca, false),
        ("tls.key", key, true),
        ("tls.crt", crt, false),
    ] {
        let path = dir.join(name);
        let tmp = dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, body).map_err(io(&tmp))?;
        if private {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
                .map_err(io(&tmp))?;
        }
        std::fs::rename(&tmp, &path).map_err(io(&path))?;
    }
    Ok(())
}

/// What `amoskys pki init` creates.
#[derive(Clone, Debug)]
pub struct DevPkiOptions {
    /// The directory that gets `ca/`, `bus/`, `agent/`, `reader/`, `admin/`.
    pub out: PathBuf,
    /// DNS names for the bus certificate besides `localhost`.
    pub dns: Vec<String>,
    /// IPs for the bus certificate besides 127.0.0.1 and ::1.
    pub ips: Vec<IpAddr>,
    /// Overwrite a PKI already in `out`.
    pub force: bool,
    /// Lifetime of the leaf certificates.
    pub leaf_validity: Duration,
    /// Lifetime of the CA.
    pub ca_validity: Duration,
}

impl DevPkiOptions {
    /// Defaults: leaves for 90 days, the CA for 5 years, no extra names.
    pub fn new(out: impl Into<PathBuf>) -> Self {
        Self {
            out: out.into(),
            dns: Vec::new(),
            ips: Vec::new(),
            force: false,
            leaf_validity: Duration::from_secs(90 * 24 * 3600),
            ca_validity: Duration::from_secs(5 * 365 * 24 * 3600),
        }
    }
}

/// The directories a dev PKI holds, relative to its root.
pub const DEV_PKI_DIRS: [&str; 6] = ["ca", "bus", "agent", "reader", "admin", "peer"];

/// True when `dir` already holds a complete dev PKI.
pub fn dev_pki_exists(dir: &Path) -> bool {
    DEV_PKI_DIRS
        .iter()
        .all(|d| dir.join(d).join("tls.crt").is_file() && dir.join(d).join("tls.key").is_file())
}

/// Creates a CA and bus/agent/reader/admin/peer leaves under `opts.out`.
///
/// The bus certificate always covers `localhost`, `127.0.0.1` and `::1` so
/// the local all-in-one works without flags. A PKI made before the peer
/// role existed gets its peer leaf from its own CA, and nothing else changes.
pub fn init_dev_pki(opts: &DevPkiOptions) -> Result<(), PkiError> {
    let present: Vec<&str> = DEV_PKI_DIRS
        .iter()
        .copied()
        .filter(|d| opts.out.join(d).join("tls.crt").exists())
        .collect();
    if !present.is_empty() && !opts.force {
        if present.len() == DEV_PKI_DIRS.len() - 1 && !present.contains(&"peer") {
            return add_dev_peer(opts);
        }
        return Err(PkiError::Exists(opts.out.clone()));
    }
    let ca = CertAuthority::generate("amoskys-dev-ca", Validity::from_now(opts.ca_validity))?;
    let leaf = Validity::from_now(opts.leaf_validity);

    let mut dns = vec!["localhost".to_string()];
    dns.extend(opts.dns.iter().filter(|d| *d != "localhost").cloned());
    let mut ips = vec![
        IpAddr::from([127, 0, 0, 1]),
        IpAddr::from(std::net::Ipv6Addr::LOCALHOST),
    ];
    for ip in &opts.ips {
        if !ips.contains(ip) {
            ips.push(*ip);
        }
    }

    write_secret_dir(
        &opts.out.join("ca"),
        &ca.cert_pem,
        &ca.key_pem,
        &ca.cert_pem,
    )?;
    ca.issue_server("amoskys-bus", &dns, &ips, leaf)?
        .write_dir(&opts.out.join("bus"))?;
    for role in [Role::Agent, Role::Reader, Role::Admin, Role::Peer] {
        ca.issue_client(&format!("amoskys-{}", role.as_str()), role, leaf)?
            .write_dir(&opts.out.join(role.as_str()))?;
    }
    Ok(())
}

fn add_dev_peer(opts: &DevPkiOptions) -> Result<(), PkiError> {
    let ca_dir = opts.out.join("ca");
    let read = |f: &str| {
        let path = ca_dir.join(f);
        std::fs::read_to_string(&path).map_err(|source| PkiError::Io { path, source })
    };
    let ca = CertAuthority::from_pem(&read("tls.crt")?, &read("tls.key")?)?;
    ca.issue_client(
        "amoskys-peer",
        Role::Peer,
        Validity::from_now(opts.leaf_validity),
    )?
    .write_dir(&opts.out.join(Role::Peer.as_str()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dev_pki_from_before_the_peer_role_gets_a_peer_leaf_from_its_own_ca() {
        let tmp = tempfile::tempdir().unwrap();
        let opts = DevPkiOptions::new(tmp.path());
        init_dev_pki(&opts).unwrap();
        assert!(dev_pki_exists(tmp.path()));
        let ca_before = std::fs::read(tmp.path().join("ca/tls.crt")).unwrap();
        std::fs::remove_dir_all(tmp.path().join("peer")).unwrap();
        assert!(!dev_pki_exists(tmp.path()));
        init_dev_pki(&opts).unwrap();
        assert!(dev_pki_exists(tmp.path()));
        assert_eq!(
            std::fs::read(tmp.path().join("ca/tls.crt")).unwrap(),
            ca_before
        );
        let der = crate::tls::pem_certs(&std::fs::read(tmp.path().join("peer/tls.crt")).unwrap())
            .unwrap()
            .remove(0);
        let id = crate::identity::PeerIdentity::from_der(&der).unwrap();
        assert_eq!(id.role, Some(Role::Peer));
        // A complete PKI is still never overwritten without --force.
        assert!(matches!(init_dev_pki(&opts), Err(PkiError::Exists(_))));
    }
}
