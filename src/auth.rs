//! Who may connect, as whom, to which rooms — and from which browser origin.
//!
//! With `AUTH_JWT_SECRET` (HS256) or `AUTH_JWT_PUBLIC_KEY` (RS256/ES256 PEM)
//! set, every WebSocket upgrade and every `POST` of a message needs a token;
//! the user name is the token's `sub`, so a client cannot speak as someone
//! else, and an optional `rooms` claim limits the rooms it may join. Without
//! either variable the relay runs open (any `?user=`), and logs so at start-up.

use std::net::IpAddr;
use std::sync::Arc;

use axum::http::HeaderMap;
use clap::Args;
use dashmap::DashMap;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use crate::protocol::{RoomId, valid_user};

/// Authentication and browser-origin settings.
#[derive(Debug, Clone, Default, Args)]
pub struct AuthConfig {
    /// Shared secret for HS256 tokens; when set, `/ws` and `POST` need a token.
    #[arg(long, env = "AUTH_JWT_SECRET", hide_env_values = true)]
    pub auth_jwt_secret: Option<String>,
    /// Public key for RS256 or ES256 tokens: the PEM text itself or a path to a PEM file.
    #[arg(long, env = "AUTH_JWT_PUBLIC_KEY")]
    pub auth_jwt_public_key: Option<String>,
    /// Expected `iss` claim, when set.
    #[arg(long, env = "AUTH_JWT_ISSUER")]
    pub auth_jwt_issuer: Option<String>,
    /// Expected `aud` claim, when set.
    #[arg(long, env = "AUTH_JWT_AUDIENCE")]
    pub auth_jwt_audience: Option<String>,
    /// Browser origins allowed to open a WebSocket (comma-separated, `*` for any).
    /// Empty: same origin only (the `Origin` host must equal the `Host` header).
    /// Requests without an `Origin` header (non-browser clients) are allowed.
    #[arg(long, env = "ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("missing token: pass ?token=<jwt> or an Authorization: Bearer header")]
    Missing,
    #[error("invalid token: {0}")]
    Invalid(String),
    #[error("bad key configuration: {0}")]
    Config(String),
}

/// Which rooms an identity may join: everything, or exact ids and
/// `prefix*` patterns from the token's `rooms` claim.
#[derive(Debug, Clone, Default)]
pub struct RoomPolicy {
    patterns: Option<Arc<[String]>>,
}

impl RoomPolicy {
    pub fn any() -> RoomPolicy {
        RoomPolicy { patterns: None }
    }

    pub fn only(patterns: Vec<String>) -> RoomPolicy {
        RoomPolicy {
            patterns: Some(patterns.into()),
        }
    }

    pub fn allows(&self, room: &RoomId) -> bool {
        let Some(patterns) = &self.patterns else {
            return true;
        };
        let id = room.as_str();
        patterns.iter().any(|p| match p.strip_suffix('*') {
            Some(prefix) => id.starts_with(prefix),
            None => p == id,
        })
    }
}

/// A verified caller.
#[derive(Debug, Clone)]
pub struct Identity {
    pub user: String,
    pub rooms: RoomPolicy,
    /// The token's `exp` (unix seconds): an open socket is closed then.
    pub expires_at: Option<i64>,
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
    #[serde(default)]
    rooms: Option<Vec<String>>,
    /// Required by the validation; kept to close sockets when it passes.
    #[serde(default)]
    exp: Option<i64>,
}

/// Verifies tokens, or lets everyone in when no key is configured.
pub enum Authenticator {
    Open,
    Jwt {
        key: Box<DecodingKey>,
        validation: Box<Validation>,
    },
}

impl Authenticator {
    pub fn from_config(cfg: &AuthConfig) -> Result<Authenticator, AuthError> {
        let (key, algs) = match (&cfg.auth_jwt_secret, &cfg.auth_jwt_public_key) {
            (None, None) => return Ok(Authenticator::Open),
            (Some(_), Some(_)) => {
                return Err(AuthError::Config(
                    "set AUTH_JWT_SECRET or AUTH_JWT_PUBLIC_KEY, not both".into(),
                ));
            }
            (Some(secret), None) => {
                if secret.len() < 32 {
                    return Err(AuthError::Config(
                        "AUTH_JWT_SECRET must be at least 32 bytes".into(),
                    ));
                }
                (
                    DecodingKey::from_secret(secret.as_bytes()),
                    vec![Algorithm::HS256],
                )
            }
            (None, Some(pem)) => {
                let pem = if pem.trim_start().starts_with("-----BEGIN") {
                    pem.clone().into_bytes()
                } else {
                    std::fs::read(pem)
                        .map_err(|e| AuthError::Config(format!("cannot read {pem}: {e}")))?
                };
                if let Ok(k) = DecodingKey::from_rsa_pem(&pem) {
                    (k, vec![Algorithm::RS256])
                } else if let Ok(k) = DecodingKey::from_ec_pem(&pem) {
                    (k, vec![Algorithm::ES256])
                } else {
                    return Err(AuthError::Config(
                        "AUTH_JWT_PUBLIC_KEY is neither an RSA nor an EC public key in PEM".into(),
                    ));
                }
            }
        };
        let mut validation = Validation::new(algs[0]);
        validation.algorithms = algs;
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.leeway = 5;
        if let Some(iss) = &cfg.auth_jwt_issuer {
            validation.set_issuer(&[iss]);
        }
        match &cfg.auth_jwt_audience {
            Some(aud) => validation.set_audience(&[aud]),
            None => validation.validate_aud = false,
        }
        Ok(Authenticator::Jwt {
            key: Box::new(key),
            validation: Box::new(validation),
        })
    }

    pub fn is_open(&self) -> bool {
        matches!(self, Authenticator::Open)
    }

    /// Checks a token. `Ok(None)` means auth is off: the caller picks a name.
    pub fn verify(&self, token: Option<&str>) -> Result<Option<Identity>, AuthError> {
        let Authenticator::Jwt { key, validation } = self else {
            return Ok(None);
        };
        let token = token.ok_or(AuthError::Missing)?;
        let data = jsonwebtoken::decode::<Claims>(token, key, validation)
            .map_err(|e| AuthError::Invalid(e.to_string()))?;
        let c = data.claims;
        if !valid_user(&c.sub) {
            return Err(AuthError::Invalid(
                "sub must be a valid user name (1-32 characters)".into(),
            ));
        }
        Ok(Some(Identity {
            user: c.sub,
            rooms: c.rooms.map(RoomPolicy::only).unwrap_or_default(),
            expires_at: c.exp,
        }))
    }
}

/// The token of a request: `Authorization: Bearer …` or `?token=…`.
pub fn token_from<'a>(headers: &'a HeaderMap, query: Option<&'a str>) -> Option<&'a str> {
    headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .or(query)
}

/// Is the browser origin of this upgrade allowed?
pub fn origin_allowed(allowed: &[String], headers: &HeaderMap) -> bool {
    let Some(origin) = headers
        .get(axum::http::header::ORIGIN)
        .and_then(|v| v.to_str().ok())
    else {
        // Browsers always send Origin on a WebSocket upgrade; its absence means
        // a non-browser client, which an Origin check cannot constrain anyway.
        return true;
    };
    let allowed: Vec<&str> = allowed
        .iter()
        .map(|s| s.trim())
        .filter(|s| !s.is_empty())
        .collect();
    if allowed.is_empty() {
        let host = headers
            .get(axum::http::header::HOST)
            .and_then(|v| v.to_str().ok());
        let origin_host = origin
            .split_once("://")
            .map(|(_, rest)| rest.trim_end_matches('/'));
        return host.is_some() && origin_host == host;
    }
    allowed
        .iter()
        .any(|a| *a == "*" || a.trim_end_matches('/').eq_ignore_ascii_case(origin))
}

/// Open WebSocket connections per client IP, so one address cannot take
/// every socket. Entries are removed at zero: memory follows live clients.
#[derive(Default)]
pub struct ConnCounter {
    per_ip: DashMap<IpAddr, usize>,
}

/// Holds one slot of [`ConnCounter`] until dropped.
pub struct ConnSlot {
    counter: Arc<ConnCounter>,
    ip: IpAddr,
}

impl ConnCounter {
    /// Takes a slot for `ip` unless it already holds `max` (0 = no limit).
    pub fn try_acquire(self: &Arc<Self>, ip: IpAddr, max: usize) -> Option<ConnSlot> {
        let mut n = self.per_ip.entry(ip).or_insert(0);
        if max > 0 && *n >= max {
            return None;
        }
        *n += 1;
        Some(ConnSlot {
            counter: self.clone(),
            ip,
        })
    }

    pub fn count(&self, ip: IpAddr) -> usize {
        self.per_ip.get(&ip).map(|n| *n).unwrap_or(0)
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        if let Some(mut n) = self.counter.per_ip.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
        }
        self.counter.per_ip.remove_if(&self.ip, |_, n| *n == 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_patterns() {
        let p = RoomPolicy::only(vec!["chat.*".into(), "ai.dungeon1".into()]);
        assert!(p.allows(&RoomId::parse("chat.lobby").unwrap()));
        assert!(p.allows(&RoomId::parse("ai.dungeon1").unwrap()));
        assert!(!p.allows(&RoomId::parse("ai.dungeon2").unwrap()));
        assert!(RoomPolicy::any().allows(&RoomId::parse("ai.x").unwrap()));
        assert!(!RoomPolicy::only(vec![]).allows(&RoomId::parse("chat.a").unwrap()));
    }

    #[test]
    fn same_origin_by_default() {
        let mut h = HeaderMap::new();
        h.insert("host", "chat.example:8080".parse().unwrap());
        assert!(origin_allowed(&[], &h), "no Origin: non-browser client");
        h.insert("origin", "http://chat.example:8080".parse().unwrap());
        assert!(origin_allowed(&[], &h));
        h.insert("origin", "https://evil.example".parse().unwrap());
        assert!(!origin_allowed(&[], &h));
        assert!(origin_allowed(&["https://evil.example".into()], &h));
        assert!(origin_allowed(&["*".into()], &h));
    }

    #[test]
    fn slots_are_released() {
        let c = Arc::new(ConnCounter::default());
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let a = c.try_acquire(ip, 2).unwrap();
        let _b = c.try_acquire(ip, 2).unwrap();
        assert!(c.try_acquire(ip, 2).is_none());
        drop(a);
        assert!(c.try_acquire(ip, 2).is_some());
        assert_eq!(c.count(ip), 1);
    }
}
