//! Who is calling: the role and identity carried in the client certificate.
//!
//! The role is a URI SAN `urn:amoskys:role:<role>`; cert-manager can put the
//! same URI in a `Certificate`'s `uris`, so either issuer works.

use tonic::Status;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    Agent,
    Reader,
    Admin,
}

const ROLE_URI_PREFIX: &str = "urn:amoskys:role:";

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Agent => "agent",
            Role::Reader => "reader",
            Role::Admin => "admin",
        }
    }

    pub fn uri(self) -> String {
        format!("{ROLE_URI_PREFIX}{}", self.as_str())
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "agent" => Some(Role::Agent),
            "reader" => Some(Role::Reader),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }
}

/// What an RPC needs from its caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Permission {
    Publish,
    Read,
    Admin,
}

impl Permission {
    pub fn allowed(self, role: Role) -> bool {
        matches!(
            (self, role),
            (_, Role::Admin)
                | (Permission::Publish, Role::Agent)
                | (Permission::Read, Role::Reader)
        )
    }
}

/// The authenticated peer of one TLS connection.
#[derive(Clone, Debug)]
pub struct PeerIdentity {
    pub role: Option<Role>,
    pub common_name: String,
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

    /// `PERMISSION_DENIED` naming the role and what it lacks, or Ok.
    pub fn check(&self, needed: Permission, rpc: &str) -> Result<(), Status> {
        match self.role {
            Some(role) if needed.allowed(role) => Ok(()),
            Some(role) => Err(Status::permission_denied(format!(
                "{rpc}: certificate {:?} has role {:?}, which may not call it",
                self.common_name,
                role.as_str()
            ))),
            None => Err(Status::permission_denied(format!(
                "{rpc}: certificate {:?} carries no AMOSKYS role (expected a URI SAN {ROLE_URI_PREFIX}<agent|reader|admin>)",
                self.common_name
            ))),
        }
    }
}

/// Reads the caller's identity from a request's connection info.
pub fn peer_of<T>(req: &tonic::Request<T>) -> Result<PeerIdentity, Status> {
    req.extensions()
        .get::<crate::tls::TlsConnectInfo>()
        .map(|c| c.peer.clone())
        .ok_or_else(|| Status::unauthenticated("no client certificate on this connection"))
}

/// Checks `needed` for the caller of `req`.
pub fn authorize<T>(
    req: &tonic::Request<T>,
    needed: Permission,
    rpc: &str,
) -> Result<PeerIdentity, Status> {
    let peer = peer_of(req)?;
    peer.check(needed, rpc)?;
    Ok(peer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_matrix() {
        use Permission as P;
        assert!(P::Publish.allowed(Role::Agent));
        assert!(!P::Read.allowed(Role::Agent));
        assert!(!P::Admin.allowed(Role::Agent));
        assert!(!P::Publish.allowed(Role::Reader));
        assert!(P::Read.allowed(Role::Reader));
        assert!(!P::Admin.allowed(Role::Reader));
        assert!(
            [P::Publish, P::Read, P::Admin]
                .iter()
                .all(|p| p.allowed(Role::Admin))
        );
    }

    #[test]
    fn role_round_trips_through_a_certificate() {
        let ca = crate::pki::CertAuthority::generate(
            "t",
            crate::pki::Validity::from_now(std::time::Duration::from_secs(3600)),
        )
        .unwrap();
        for role in [Role::Agent, Role::Reader, Role::Admin] {
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
