//! Who a certificate speaks for: the role and identity it carries.
//!
//! The role is a URI SAN `urn:amoskys:role:<role>`; cert-manager can put the
//! same URI in a `Certificate`'s `uris`, so either issuer works. The bus
//! decides what each role may call; the issuers and the clients only need to
//! name it.

use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
/// What a certificate may do at the bus.
pub enum Role {
    /// Publishes events (a node agent).
    Agent,
    /// Queries and tails.
    Reader,
    /// Everything, and the Admin service.
    Admin,
    /// Another shard of the same bus: reads, and asks what it holds of an
    /// agent when the agent moves (never publishes).
    Peer,
}

/// The URI SAN prefix that carries the role.
pub const ROLE_URI_PREFIX: &str = "urn:amoskys:role:";

impl Role {
    /// `agent`, `reader`, `admin` or `peer`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Agent => "agent",
            Role::Reader => "reader",
            Role::Admin => "admin",
            Role::Peer => "peer",
        }
    }

    /// The URI SAN naming this role.
    pub fn uri(self) -> String {
        format!("{ROLE_URI_PREFIX}{}", self.as_str())
    }

    /// The role [`Role::as_str`] names.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "agent" => Some(Role::Agent),
            "reader" => Some(Role::Reader),
            "admin" => Some(Role::Admin),
            "peer" => Some(Role::Peer),
            _ => None,
        }
    }
}

/// The identity in one certificate (the bus reads it from each TLS peer).
#[derive(Clone, Debug)]
pub struct PeerIdentity {
    /// Its role, if it carries one.
    pub role: Option<Role>,
    /// Its subject's CN.
    pub common_name: String,
    /// Its serial number, hex.
    pub serial: String,
}

impl PeerIdentity {
    /// Reads role, CN and serial from a DER client certificate.
    pub fn from_der(der: &[u8]) -> Result<Self, String> {
        let (_, cert) = X509Certificate::from_der(der)
            .map_err(|e| format!("unparsable client certificate: {e}"))?;
        let common_name = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .unwrap_or_default()
            .to_string();
        let mut role = None;
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                if let GeneralName::URI(uri) = name
                    && let Some(r) = uri.strip_prefix(ROLE_URI_PREFIX)
                {
                    role = Role::parse(r);
                }
            }
        }
        Ok(Self {
            role,
            common_name,
            serial: cert.raw_serial_as_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_round_trips_through_a_certificate() {
        let ca = crate::pki::CertAuthority::generate(
            "t",
            crate::pki::Validity::from_now(std::time::Duration::from_secs(3600)),
        )
        .unwrap();
        for role in [Role::Agent, Role::Reader, Role::Admin, Role::Peer] {
            let c = ca
                .issue_client(
                    "who",
                    role,
                    crate::pki::Validity::from_now(std::time::Duration::from_secs(60)),
                )
                .unwrap();
            let der = crate::tls::pem_certs(c.cert_pem.as_bytes())
                .unwrap()
                .remove(0);
            let id = PeerIdentity::from_der(&der).unwrap();
            assert_eq!(id.role, Some(role));
            assert_eq!(id.common_name, "who");
            assert!(!id.serial.is_empty());
        }
    }
}
