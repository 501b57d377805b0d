//! What each role may call, and who is calling this RPC (the identity of the
//! TLS peer; roles and identities themselves live in `amoskys_client::identity`).

use amoskys_client::identity::{PeerIdentity, ROLE_URI_PREFIX, Role};
use tonic::Status;

/// What an RPC needs from its caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Permission {
    Publish,
    Read,
    Admin,
    /// Bus-to-bus calls between shards.
    Peer,
}

impl Permission {
    pub fn allowed(self, role: Role) -> bool {
        matches!(
            (self, role),
            (_, Role::Admin)
                | (Permission::Publish, Role::Agent)
                | (Permission::Read, Role::Reader | Role::Peer)
                | (Permission::Peer, Role::Peer)
        )
    }
}

/// `PERMISSION_DENIED` naming the role and what it lacks, or Ok.
pub fn check(peer: &PeerIdentity, needed: Permission, rpc: &str) -> Result<(), Status> {
    match peer.role {
        Some(role) if needed.allowed(role) => Ok(()),
        Some(role) => Err(Status::permission_denied(format!(
            "{rpc}: certificate {:?} has role {:?}, which may not call it",
            peer.common_name,
            role.as_str()
        ))),
        None => Err(Status::permission_denied(format!(
            "{rpc}: certificate {:?} carries no AMOSKYS role (expected a URI SAN {ROLE_URI_PREFIX}<agent|reader|admin|peer>)",
            peer.common_name
        ))),
    }
}

/// Reads the caller's identity from a request's connection info.
pub fn peer_of<T>(req: &tonic::Request<T>) -> Result<PeerIdentity, Status> {
    req.extensions()
        .get::<crate::tls::TlsConnectInfo>()
        .map(|c| c.peer.clone())
        .ok_or_else(|| Status::unauthenticated("no client certificate on this connection"))
}

/// The caller's address. tonic's `remote_addr()` only knows its own connect
/// info types, so for the bus's connections it is always `None`.
pub fn remote_of<T>(req: &tonic::Request<T>) -> Option<std::net::SocketAddr> {
    req.extensions()
        .get::<crate::tls::TlsConnectInfo>()
        .map(|c| c.remote)
}

/// Checks `needed` for the caller of `req`.
pub fn authorize<T>(
    req: &tonic::Request<T>,
    needed: Permission,
    rpc: &str,
) -> Result<PeerIdentity, Status> {
    let peer = peer_of(req)?;
    check(&peer, needed, rpc)?;
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
        assert!(!P::Peer.allowed(Role::Reader) && !P::Peer.allowed(Role::Agent));
        assert!(P::Peer.allowed(Role::Peer) && P::Read.allowed(Role::Peer));
        assert!(!P::Publish.allowed(Role::Peer) && !P::Admin.allowed(Role::Peer));
        assert!(
            [P::Publish, P::Read, P::Admin, P::Peer]
                .iter()
                .all(|p| p.allowed(Role::Admin))
        );
    }
}
