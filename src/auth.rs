//! Authentication: JWT verification and minting, single-use tickets.
//!
//! Owns the keys. Tokens are checked for signature, algorithm (exactly the configured one, so
//! `alg: none` and algorithm confusion fail), `exp` (required, no leeway) and `sub` (a valid user
//! id). Tickets are 256-bit random strings kept in memory for 30 s and removed when used.
//! Neither tokens nor tickets are ever logged; errors say what was wrong, never the value.

use std::time::{Duration, Instant};

use dashmap::DashMap;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::config::{Config, JwtAlg, Secret};
use crate::context::validate_user_id;

/// Lifetime of a ticket.
pub const TICKET_TTL: Duration = Duration::from_secs(30);
/// Most tickets outstanding at once; issuing more prunes expired ones, then refuses.
const MAX_TICKETS: usize = 100_000;

/// Why a credential was refused (HTTP 401 `unauthorized`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No credential was given.
    #[error("missing credentials")]
    Missing,
    /// The token has expired.
    #[error("token expired")]
    Expired,
    /// The token does not verify (signature, algorithm, claims).
    #[error("invalid token")]
    Invalid,
    /// The token's subject is not a valid user id.
    #[error("invalid user id in token: {0}")]
    BadSubject(String),
    /// The ticket is unknown, used or expired.
    #[error("unknown, expired or already used ticket")]
    BadTicket,
    /// Too many tickets are outstanding.
    #[error("too many outstanding tickets")]
    TooManyTickets,
    /// This node cannot mint tokens (it only has a public key).
    #[error("this server cannot mint tokens (it verifies {0} tokens with a public key)")]
    CannotMint(&'static str),
    /// The key could not be loaded.
    #[error("key error: {0}")]
    Key(String),
}

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    iat: Option<u64>,
}

/// Verifies tokens and tickets.
pub struct Auth {
    decoding: DecodingKey,
    encoding: Option<EncodingKey>,
    validation: Validation,
    tickets: DashMap<String, (String, Instant)>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("algorithms", &self.validation.algorithms)
            .field("tickets", &self.tickets.len())
            .finish()
    }
}

impl Auth {
    /// HS256 with a shared secret.
    pub fn hs256(secret: &Secret) -> Self {
        Self::with_keys(
            Algorithm::HS256,
            DecodingKey::from_secret(secret.expose().as_bytes()),
            Some(EncodingKey::from_secret(secret.expose().as_bytes())),
        )
    }

    fn with_keys(alg: Algorithm, decoding: DecodingKey, encoding: Option<EncodingKey>) -> Self {
        let mut validation = Validation::new(alg);
        validation.leeway = 0;
        validation.validate_exp = true;
        validation.set_required_spec_claims(&["exp", "sub"]);
        Self {
            decoding,
            encoding,
            validation,
            tickets: DashMap::new(),
        }
    }

    /// From configuration (resolving the generated secret when none is configured).
    pub fn from_config(cfg: &Config) -> Result<Self, AuthError> {
        match cfg.auth.jwt_alg {
            JwtAlg::Hs256 => {
                let secret = cfg.resolve_jwt_secret().map_err(|e| {
                    AuthError::Key(format!("cannot read or create the JWT secret: {e}"))
                })?;
                Ok(Self::hs256(&secret))
            }
            alg @ (JwtAlg::Rs256 | JwtAlg::Es256) => {
                let path = cfg.auth.jwt_public_key.as_ref().ok_or_else(|| {
                    AuthError::Key("TETHER_JWT_PUBLIC_KEY is required for RS256/ES256".into())
                })?;
                let pem = std::fs::read(path)
                    .map_err(|e| AuthError::Key(format!("TETHER_JWT_PUBLIC_KEY: {e}")))?;
                let (a, key) = if alg == JwtAlg::Rs256 {
                    (Algorithm::RS256, DecodingKey::from_rsa_pem(&pem))
                } else {
                    (Algorithm::ES256, DecodingKey::from_ec_pem(&pem))
                };
                let key = key.map_err(|e| AuthError::Key(format!("TETHER_JWT_PUBLIC_KEY: {e}")))?;
                Ok(Self::with_keys(a, key, None))
            }
        }
    }

    /// Verify a JWT; returns its user id.
    pub fn verify(&self, token: &str) -> Result<String, AuthError> {
        use jsonwebtoken::errors::ErrorKind;
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => AuthError::Expired,
                _ => AuthError::Invalid,
            })?;
        validate_user_id(&data.claims.sub).map_err(|e| AuthError::BadSubject(e.to_string()))?;
        Ok(data.claims.sub)
    }

    /// Mint a token for `user_id` valid for `ttl` (HS256 only).
    pub fn mint(&self, user_id: &str, ttl: Duration) -> Result<String, AuthError> {
        validate_user_id(user_id).map_err(|e| AuthError::BadSubject(e.to_string()))?;
        let key = self
            .encoding
            .as_ref()
            .ok_or(AuthError::CannotMint("RS256/ES256"))?;
        let now = crate::ids::unix_ms() / 1000;
        let claims = Claims {
            sub: user_id.to_string(),
            exp: now + ttl.as_secs(),
            iat: Some(now),
        };
        jsonwebtoken::encode(&Header::new(self.validation.algorithms[0]), &claims, key)
            .map_err(|e| AuthError::Key(e.to_string()))
    }

    /// Issue a single-use ticket for a verified user.
    pub fn issue_ticket(&self, user_id: &str) -> Result<String, AuthError> {
        if self.tickets.len() >= MAX_TICKETS {
            self.prune_tickets();
            if self.tickets.len() >= MAX_TICKETS {
                return Err(AuthError::TooManyTickets);
            }
        }
        let bytes: [u8; 32] = rand::random();
        let ticket = format!("tkt_{}", hex::encode(bytes));
        self.tickets.insert(
            ticket.clone(),
            (user_id.to_string(), Instant::now() + TICKET_TTL),
        );
        Ok(ticket)
    }

    /// Redeem a ticket: returns its user id once; a second use fails.
    pub fn redeem_ticket(&self, ticket: &str) -> Result<String, AuthError> {
        match self.tickets.remove(ticket) {
            Some((_, (user, expires))) if Instant::now() < expires => Ok(user),
            _ => Err(AuthError::BadTicket),
        }
    }

    /// Drop expired tickets.
    pub fn prune_tickets(&self) {
        let now = Instant::now();
        self.tickets.retain(|_, (_, exp)| *exp > now);
    }
}

/// The token of an `Authorization: Bearer <token>` header (scheme case-insensitive).
pub(crate) fn bearer(headers: &axum::http::HeaderMap) -> Option<&str> {
    let v = headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Compares secrets in time that depends only on their lengths, not on where they differ.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;

    fn auth() -> Auth {
        Auth::hs256(&Secret::new("0123456789abcdef0123456789abcdef"))
    }

    #[test]
    fn minted_tokens_verify() {
        let a = auth();
        let t = a.mint("alice", Duration::from_secs(60)).unwrap();
        assert_eq!(a.verify(&t).unwrap(), "alice");
    }

    #[test]
    fn forged_expired_and_alg_none_tokens_fail() {
        let a = auth();
        let other = Auth::hs256(&Secret::new("another-secret-another-secret-xx"));
        let forged = other.mint("alice", Duration::from_secs(60)).unwrap();
        assert_eq!(a.verify(&forged), Err(AuthError::Invalid));

        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let exp = crate::ids::unix_ms() / 1000 + 60;
        let none = format!(
            "{}.{}.",
            b64.encode(r#"{"alg":"none","typ":"JWT"}"#),
            b64.encode(format!(r#"{{"sub":"alice","exp":{exp}}}"#))
        );
        assert_eq!(a.verify(&none), Err(AuthError::Invalid));

        // Tampered sub: same signature, other payload.
        let good = a.mint("alice", Duration::from_secs(60)).unwrap();
        let parts: Vec<&str> = good.split('.').collect();
        let tampered = format!(
            "{}.{}.{}",
            parts[0],
            b64.encode(format!(r#"{{"sub":"mallory","exp":{exp}}}"#)),
            parts[2]
        );
        assert_eq!(a.verify(&tampered), Err(AuthError::Invalid));

        let key = EncodingKey::from_secret(b"0123456789abcdef0123456789abcdef");
        let past = Claims {
            sub: "alice".into(),
            exp: crate::ids::unix_ms() / 1000 - 10,
            iat: None,
        };
        let expired = jsonwebtoken::encode(&Header::default(), &past, &key).unwrap();
        assert_eq!(a.verify(&expired), Err(AuthError::Expired));
        assert_eq!(a.verify("not.a.jwt"), Err(AuthError::Invalid));
        assert_eq!(a.verify(""), Err(AuthError::Missing));
    }

    #[test]
    fn tokens_with_bad_subjects_fail() {
        let a = auth();
        let key = EncodingKey::from_secret(b"0123456789abcdef0123456789abcdef");
        let exp = crate::ids::unix_ms() / 1000 + 60;
        for sub in ["", "null", &"x".repeat(257), "a\u{0}b"] {
            let c = Claims {
                sub: sub.to_string(),
                exp,
                iat: None,
            };
            let t = jsonwebtoken::encode(&Header::default(), &c, &key).unwrap();
            assert!(
                matches!(a.verify(&t), Err(AuthError::BadSubject(_))),
                "{sub:?}"
            );
        }
    }

    #[test]
    fn tickets_are_single_use() {
        let a = auth();
        let t = a.issue_ticket("alice").unwrap();
        assert_eq!(a.redeem_ticket(&t).unwrap(), "alice");
        assert_eq!(a.redeem_ticket(&t), Err(AuthError::BadTicket));
        assert_eq!(a.redeem_ticket("tkt_nope"), Err(AuthError::BadTicket));
    }
}
