//! The server under load: its address, the secrets the tool needs (read from the server's
//! settings or data directory, never generated), its process; the users' tokens, the source
//! addresses connections are spread over, and a connection up to `connection_established`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use anyhow::{bail, Context as _};
use serde_json::Value;
use tether::client::{Client, ClientError, ConnectOptions, SocketOptions, WsError};
use tether::{Auth, Config, Secret};

use crate::cli::{CommonArgs, Spread};
use crate::http::Http;
use crate::procfs::find_listening_pid;
use crate::stats::first_words;

/// The server under load and what the tool needs to talk to it.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    pub(crate) addr: SocketAddr,
    /// HS256 secret for minting user tokens (the baseline accepts any token).
    pub(crate) jwt_secret: Secret,
    /// For `/api/stats`, `/metrics` and publishing.
    pub(crate) admin_token: Option<Secret>,
    /// For the server's memory, file descriptors and CPU time, when it runs on this machine.
    pub(crate) server_pid: Option<u32>,
    pub(crate) http: Http,
}

impl Target {
    /// From the command line and the server's configuration. Secrets are only read here,
    /// never generated: a generated one would not be the server's.
    pub(crate) fn resolve(common: &CommonArgs, config: &Config) -> anyhow::Result<Self> {
        let addr = common.target.unwrap_or(config.listen.addr);
        let data_dir = &config.store.data_dir;
        let jwt_secret = match (&common.token_secret, &config.auth.jwt_secret) {
            (Some(s), _) => Secret::new(s.clone()),
            (None, Some(s)) => s.clone(),
            (None, None) => read_secret(&data_dir.join("jwt-secret")).with_context(|| {
                format!(
                    "no token secret: pass --token-secret or TETHER_JWT_SECRET, or --data-dir \
                     of the server (no {}/jwt-secret)",
                    data_dir.display()
                )
            })?,
        };
        let admin_token = config
            .auth
            .admin_token
            .clone()
            .or_else(|| read_secret(&data_dir.join("admin-token")).ok());
        let server_pid = common
            .server_pid
            .or_else(|| find_listening_pid(addr.port()));
        Ok(Self {
            addr,
            jwt_secret,
            admin_token,
            server_pid,
            http: Http::new(addr)?,
        })
    }

    pub(crate) fn ws_base(&self) -> String {
        format!("ws://{}", self.addr)
    }

    /// `GET /api/stats` with the admin token.
    pub(crate) async fn stats(&self) -> anyhow::Result<Value> {
        let token = self
            .admin_token
            .as_ref()
            .context("no admin token: set TETHER_ADMIN_TOKEN or --data-dir of the server")?;
        self.http.stats(token.expose()).await
    }
}

fn read_secret(path: &std::path::Path) -> anyhow::Result<Secret> {
    let s = std::fs::read_to_string(path)?;
    let s = s.trim();
    if s.is_empty() {
        bail!("{} is empty", path.display());
    }
    Ok(Secret::new(s))
}

/// How long the tool's tokens live: longer than any run.
pub(crate) const TOKEN_TTL: Duration = Duration::from_secs(6 * 3600);

/// One token per user, minted once: users `bench-u0`, `bench-u1`, ...
pub(crate) struct Tokens(Vec<String>);

impl Tokens {
    pub(crate) fn mint(target: &Target, users: u64) -> anyhow::Result<Self> {
        let auth = Auth::hs256(&target.jwt_secret);
        let tokens = (0..users.max(1))
            .map(|u| auth.mint(&format!("bench-u{u}"), TOKEN_TTL))
            .collect::<Result<Vec<_>, _>>()
            .context("cannot mint tokens")?;
        Ok(Self(tokens))
    }

    /// The token of connection `i` (connections go round-robin over the users).
    pub(crate) fn for_index(&self, i: u64) -> &str {
        &self.0[(i % self.0.len() as u64) as usize]
    }
}

/// Whether source addresses are spread, for `count` connections to `target`.
pub(crate) fn spread_on(spread: Spread, target: &SocketAddr, count: u64) -> bool {
    let loopback_v4 = matches!(target.ip(), IpAddr::V4(ip) if ip.is_loopback());
    match spread {
        Spread::Off => false,
        Spread::On => loopback_v4,
        Spread::Auto => loopback_v4 && count > 10_000,
    }
}

/// Source address of connection `i`: 127.0.0.2-127.0.0.254 round-robin (127.0.0.1 is left
/// to everything else on the machine).
pub(crate) fn source_ip(on: bool, i: u64) -> Option<IpAddr> {
    on.then(|| IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + (i % 253) as u8)))
}

/// Connect and wait for `connection_established`; returns its `data`.
pub(crate) async fn connect_established(
    target: &Target,
    token: &str,
    sock: &SocketOptions,
    timeout: Duration,
) -> Result<(Client, Value), ClientError> {
    let opts = ConnectOptions {
        token: Some(token.to_string()),
        ..Default::default()
    };
    let fut = async {
        let mut client = Client::connect_with(&target.ws_base(), &opts, sock).await?;
        let first = client.next_json(timeout).await?;
        if first["type"] != "connection_established" {
            return Err(ClientError::BadFrame(format!(
                "first frame is {} instead of connection_established",
                first["type"]
            )));
        }
        Ok((client, first["data"].clone()))
    };
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| ClientError::Timeout("connection_established".into()))?
}

/// A short category for a client error, for the error counts.
pub(crate) fn error_kind(e: &ClientError) -> String {
    match e {
        ClientError::Ws(WsError::Http(resp)) => format!("refused: HTTP {}", resp.status().as_u16()),
        ClientError::Ws(WsError::Io(io)) => format!("io: {:?}", io.kind()),
        ClientError::Ws(other) => format!("websocket: {}", first_words(&other.to_string())),
        ClientError::Timeout(what) => format!("timeout waiting for {what}"),
        ClientError::Closed(Some((code, _))) => format!("closed by server: {code}"),
        ClientError::Closed(None) => "closed without close frame".into(),
        ClientError::BadFrame(_) => "bad frame".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_addresses_stay_in_loopback() {
        let t: SocketAddr = "127.0.0.1:1".parse().unwrap();
        assert!(!spread_on(Spread::Auto, &t, 100));
        assert!(spread_on(Spread::Auto, &t, 20_000));
        assert!(!spread_on(
            Spread::On,
            &"10.0.0.1:1".parse().unwrap(),
            20_000
        ));
        assert_eq!(source_ip(true, 0), Some("127.0.0.2".parse().unwrap()));
        assert_eq!(source_ip(true, 252), Some("127.0.0.254".parse().unwrap()));
        assert_eq!(source_ip(true, 253), Some("127.0.0.2".parse().unwrap()));
        assert_eq!(source_ip(false, 5), None);
    }
}
