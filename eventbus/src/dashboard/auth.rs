//! Who is using the dashboard: a bearer token (header or cookie) from one of
//! the token files, or an admin/reader client certificate when the HTTP side
//! serves TLS.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use axum::http::HeaderMap;
use axum::http::header::{AUTHORIZATION, COOKIE};
use tracing::warn;

use amoskys_client::identity::{PeerIdentity, Role};
use amoskys_client::token::generate_token;

pub const COOKIE_NAME: &str = "amoskys_token";
/// Shorter tokens are ignored: they could be guessed.
pub const MIN_TOKEN_LEN: usize = 16;

/// The authenticated user of one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    pub role: Role,
    /// For logs: "token:admin" or "cert:<common name>".
    pub who: String,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Denied {
    /// 401: nothing presented, or a token no file holds.
    Unauthenticated(String),
    /// 403: authenticated, but the role may not do this.
    Forbidden(String),
}

/// The client certificate of the connection a request came on, if any.
#[derive(Clone, Debug, Default)]
pub struct ConnPeer(pub Option<PeerIdentity>);

/// A file of tokens, one per line, re-read whenever it changes so a rotated
/// Secret takes effect without a restart.
pub struct TokenFile {
    path: PathBuf,
    cache: Mutex<(Option<SystemTime>, Vec<String>)>,
}

impl TokenFile {
    pub fn new(path: &Path) -> Self {
        Self {
            path: path.to_path_buf(),
            cache: Mutex::new((None, Vec::new())),
        }
    }

    fn contains(&self, token: &str) -> bool {
        let mtime = std::fs::metadata(&self.path)
            .and_then(|m| m.modified())
            .ok();
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if mtime.is_none() || cache.0 != mtime {
            cache.1 = match std::fs::read_to_string(&self.path) {
                Ok(text) => parse_tokens(&text, &self.path),
                Err(e) => {
                    warn!(path = %self.path.display(), error = %e, "cannot read dashboard token file; its tokens are refused");
                    Vec::new()
                }
            };
            cache.0 = mtime;
        }
        cache
            .1
            .iter()
            .any(|t| constant_time_eq(t.as_bytes(), token.as_bytes()))
    }
}

fn parse_tokens(text: &str, path: &Path) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter(|l| {
            let ok = l.len() >= MIN_TOKEN_LEN;
            if !ok {
                warn!(path = %path.display(), "ignoring a dashboard token shorter than {MIN_TOKEN_LEN} characters");
            }
            ok
        })
        .map(String::from)
        .collect()
}

/// Compares without an early exit, so timing does not reveal a prefix.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[derive(Default)]
pub struct Tokens {
    pub admin: Option<TokenFile>,
    pub reader: Option<TokenFile>,
}

impl Tokens {
    pub fn from_files(admin: Option<&Path>, reader: Option<&Path>) -> Self {
        Self {
            admin: admin.map(TokenFile::new),
            reader: reader.map(TokenFile::new),
        }
    }

    fn role_of(&self, token: &str) -> Option<Role> {
        if self.admin.as_ref().is_some_and(|f| f.contains(token)) {
            Some(Role::Admin)
        } else if self.reader.as_ref().is_some_and(|f| f.contains(token)) {
            Some(Role::Reader)
        } else {
            None
        }
    }
}

/// The first token in `path`, creating the file (mode 0600) with a new
/// token when it does not exist.
pub fn ensure_token_file(path: &Path) -> std::io::Result<String> {
    if let Ok(text) = std::fs::read_to_string(path)
        && let Some(t) = parse_tokens(&text, path).into_iter().next()
    {
        return Ok(t);
    }
    let token = generate_token();
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    use std::io::Write;
    let mut f = opts.open(path)?;
    writeln!(f, "{token}")?;
    f.sync_all()?;
    Ok(token)
}

/// The token a request carries: `Authorization: Bearer …` first, then the
/// session cookie.
pub fn presented_token(headers: &HeaderMap) -> Option<String> {
    if let Some(v) = headers.get(AUTHORIZATION).and_then(|v| v.to_str().ok()) {
        let v = v.trim();
        if let Some(t) = v
            .strip_prefix("Bearer ")
            .or_else(|| v.strip_prefix("bearer "))
        {
            return Some(t.trim().to_string());
        }
    }
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE_NAME)
        .map(|(_, v)| v.to_string())
}

/// Decides who the caller is. A certificate wins over a token; an agent
/// certificate never gets in.
pub fn authenticate(
    headers: &HeaderMap,
    peer: Option<&PeerIdentity>,
    tokens: &Tokens,
) -> Result<Caller, Denied> {
    if let Some(p) = peer {
        return match p.role {
            Some(role @ (Role::Admin | Role::Reader)) => Ok(Caller {
                role,
                who: format!("cert:{}", p.common_name),
            }),
            _ => Err(Denied::Forbidden(format!(
                "certificate {:?} has no dashboard role (admin or reader)",
                p.common_name
            ))),
        };
    }
    let Some(token) = presented_token(headers) else {
        return Err(Denied::Unauthenticated(
            "sign in: send a bearer token or use an admin client certificate".into(),
        ));
    };
    match tokens.role_of(&token) {
        Some(role) => Ok(Caller {
            role,
            who: format!("token:{}", role.as_str()),
        }),
        None => Err(Denied::Unauthenticated("the token is not valid".into())),
    }
}

/// Control needs the admin role.
pub fn require_admin(c: &Caller) -> Result<(), Denied> {
    if c.role == Role::Admin {
        Ok(())
    } else {
        Err(Denied::Forbidden(format!(
            "{} has the {} role; control needs admin",
            c.who,
            c.role.as_str()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    const ADMIN: &str = "admin-token-0123456789";
    const READER: &str = "reader-token-0123456789";

    fn tokens(dir: &Path) -> Tokens {
        std::fs::write(dir.join("admin"), format!("# admins\n{ADMIN}\nshort\n")).unwrap();
        std::fs::write(dir.join("reader"), format!("{READER}\n")).unwrap();
        Tokens::from_files(Some(&dir.join("admin")), Some(&dir.join("reader")))
    }

    fn with(name: axum::http::HeaderName, v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(name, HeaderValue::from_str(v).unwrap());
        h
    }

    #[test]
    fn tokens_from_header_or_cookie_give_roles() {
        let dir = tempfile::tempdir().unwrap();
        let t = tokens(dir.path());
        let admin = authenticate(&with(AUTHORIZATION, &format!("Bearer {ADMIN}")), None, &t);
        assert_eq!(admin.unwrap().role, Role::Admin);
        let reader = authenticate(
            &with(COOKIE, &format!("theme=dark; {COOKIE_NAME}={READER}")),
            None,
            &t,
        )
        .unwrap();
        assert_eq!(reader.role, Role::Reader);
        assert!(require_admin(&reader).is_err());
        assert!(matches!(
            authenticate(&HeaderMap::new(), None, &t),
            Err(Denied::Unauthenticated(_))
        ));
        assert!(matches!(
            authenticate(&with(AUTHORIZATION, "Bearer short"), None, &t),
            Err(Denied::Unauthenticated(_))
        ));
        assert!(matches!(
            authenticate(&with(AUTHORIZATION, &format!("Bearer {ADMIN}x")), None, &t),
            Err(Denied::Unauthenticated(_))
        ));
    }

    #[test]
    fn a_rewritten_token_file_takes_effect() {
        let dir = tempfile::tempdir().unwrap();
        let t = tokens(dir.path());
        let h = with(AUTHORIZATION, &format!("Bearer {ADMIN}"));
        assert!(authenticate(&h, None, &t).is_ok());
        // Make sure the mtime moves even on coarse file systems.
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(dir.path().join("admin"), "rotated-token-0123456789\n").unwrap();
        let f = std::fs::File::options()
            .write(true)
            .open(dir.path().join("admin"))
            .unwrap();
        f.set_modified(SystemTime::now() + std::time::Duration::from_secs(5))
            .unwrap();
        assert!(authenticate(&h, None, &t).is_err());
    }

    #[test]
    fn a_generated_token_file_is_reused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("token");
        let t = ensure_token_file(&p).unwrap();
        assert_eq!(t.len(), 64);
        assert_eq!(ensure_token_file(&p).unwrap(), t);
        let tokens = Tokens::from_files(Some(&p), None);
        let c = authenticate(&with(AUTHORIZATION, &format!("Bearer {t}")), None, &tokens);
        assert_eq!(c.unwrap().role, Role::Admin);
    }

    #[test]
    fn certificates_by_role() {
        let t = Tokens::default();
        let id = |role| PeerIdentity {
            role,
            common_name: "ops".into(),
            serial: "01".into(),
        };
        let c = authenticate(&HeaderMap::new(), Some(&id(Some(Role::Admin))), &t).unwrap();
        assert_eq!(c.who, "cert:ops");
        assert!(matches!(
            authenticate(&HeaderMap::new(), Some(&id(Some(Role::Agent))), &t),
            Err(Denied::Forbidden(_))
        ));
    }
}
