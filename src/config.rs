//! Configuration: flags and `TETHER_*` environment variables, validated at start.
//!
//! Every setting has a flag and an environment variable; an invalid value stops the process at
//! start with a message that names the variable. Secrets ([`Secret`]) never print: their Debug
//! and Display show `<redacted>`.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;

/// A secret string (JWT secret, admin token, database URL with password).
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

fn secret(
    env: &'static str,
) -> impl Fn(&str) -> Result<Secret, String> + Clone + Send + Sync + 'static {
    move |s: &str| {
        if s.trim().is_empty() {
            Err(format!("{env} must not be empty"))
        } else {
            Ok(Secret(s.to_string()))
        }
    }
}

fn positive(
    env: &'static str,
) -> impl Fn(&str) -> Result<u64, String> + Clone + Send + Sync + 'static {
    move |s: &str| match s.trim().parse::<u64>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("{env} must be a positive integer, got '{s}'")),
    }
}

fn non_negative(
    env: &'static str,
) -> impl Fn(&str) -> Result<u64, String> + Clone + Send + Sync + 'static {
    move |s: &str| {
        s.trim()
            .parse::<u64>()
            .map_err(|_| format!("{env} must be a non-negative integer, got '{s}'"))
    }
}

fn socket_addr(
    env: &'static str,
) -> impl Fn(&str) -> Result<SocketAddr, String> + Clone + Send + Sync + 'static {
    move |s: &str| {
        s.trim()
            .parse::<SocketAddr>()
            .map_err(|_| format!("{env} must be an address like 127.0.0.1:8787, got '{s}'"))
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Human,
    Json,
}

/// JWT algorithms accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum JwtAlg {
    #[value(name = "HS256")]
    Hs256,
    #[value(name = "RS256")]
    Rs256,
    #[value(name = "ES256")]
    Es256,
}

/// Gateway configuration (`tether serve`).
#[derive(Debug, Clone, Args)]
pub struct Config {
    /// Address to listen on.
    #[arg(long, env = "TETHER_LISTEN", default_value = "127.0.0.1:8787", value_parser = socket_addr("TETHER_LISTEN"), global = true)]
    pub listen: SocketAddr,

    /// Directory for the SQLite store and the generated secrets.
    #[arg(
        long,
        env = "TETHER_DATA_DIR",
        default_value = "./tether-data",
        global = true
    )]
    pub data_dir: PathBuf,

    /// Database URL: sqlite://PATH or postgres://... (default: SQLite file in the data directory).
    #[arg(long, env = "TETHER_DATABASE_URL", value_parser = secret("TETHER_DATABASE_URL"), global = true)]
    pub database_url: Option<Secret>,

    /// SQLite `synchronous` mode: FULL (acknowledged writes survive power loss) or NORMAL.
    #[arg(
        long,
        env = "TETHER_SQLITE_SYNCHRONOUS",
        default_value = "FULL",
        global = true
    )]
    pub sqlite_synchronous: String,

    /// HS256 secret for JWTs. If unset, a random secret is generated once and kept in the data
    /// directory, so `tether token` and `tether serve` agree.
    #[arg(long, env = "TETHER_JWT_SECRET", value_parser = secret("TETHER_JWT_SECRET"), global = true)]
    pub jwt_secret: Option<Secret>,

    /// JWT algorithm. RS256/ES256 verify with --jwt-public-key (tokens are then minted elsewhere).
    #[arg(
        long,
        env = "TETHER_JWT_ALG",
        value_enum,
        default_value = "HS256",
        global = true
    )]
    pub jwt_alg: JwtAlg,

    /// PEM file with the public key for RS256/ES256.
    #[arg(long, env = "TETHER_JWT_PUBLIC_KEY", global = true)]
    pub jwt_public_key: Option<PathBuf>,

    /// Admin token for the admin API, /api/stats and the dashboard. If unset, a random one is
    /// generated once and kept in DATA_DIR/admin-token.
    #[arg(long, env = "TETHER_ADMIN_TOKEN", value_parser = secret("TETHER_ADMIN_TOKEN"), global = true)]
    pub admin_token: Option<Secret>,

    /// Most connections one user may hold (over all threads); more are closed with 4008.
    #[arg(long, env = "TETHER_MAX_CONNECTIONS_PER_USER", default_value = "20", value_parser = positive("TETHER_MAX_CONNECTIONS_PER_USER"), global = true)]
    pub max_connections_per_user: u64,

    /// Most managers (threads with live connections) one user may hold; more are closed with 4008.
    #[arg(long, env = "TETHER_MAX_MANAGERS_PER_USER", default_value = "20", value_parser = positive("TETHER_MAX_MANAGERS_PER_USER"), global = true)]
    pub max_managers_per_user: u64,

    /// Largest frame or message in bytes; larger ones are closed with 1009.
    #[arg(long, env = "TETHER_MAX_MESSAGE_BYTES", default_value = "65536", value_parser = positive("TETHER_MAX_MESSAGE_BYTES"), global = true)]
    pub max_message_bytes: u64,

    /// Client frames per second per connection (burst of the same size). Frames over it get
    /// `error rate_limited`; a client that keeps going for another second is closed with 4029.
    #[arg(long, env = "TETHER_MESSAGE_RATE", default_value = "20", value_parser = positive("TETHER_MESSAGE_RATE"), global = true)]
    pub message_rate: u64,

    /// New connections per second per client IP (429 beyond); 0 means no limit.
    #[arg(long, env = "TETHER_CONNECT_RATE_PER_IP", default_value = "20", value_parser = non_negative("TETHER_CONNECT_RATE_PER_IP"), global = true)]
    pub connect_rate_per_ip: u64,

    /// Pause between the demo agent's steps, in ms (0 for benchmarks).
    #[arg(long, env = "TETHER_AGENT_DELAY_MS", default_value = "150", value_parser = non_negative("TETHER_AGENT_DELAY_MS"), global = true)]
    pub agent_delay_ms: u64,

    /// Longest an agent run may take, in ms; then it ends with agent_error `timeout`.
    #[arg(long, env = "TETHER_RUN_TIMEOUT_MS", default_value = "120000", value_parser = positive("TETHER_RUN_TIMEOUT_MS"), global = true)]
    pub run_timeout_ms: u64,

    /// Interval of server pings, in ms.
    #[arg(long, env = "TETHER_HEARTBEAT_INTERVAL_MS", default_value = "25000", value_parser = positive("TETHER_HEARTBEAT_INTERVAL_MS"), global = true)]
    pub heartbeat_interval_ms: u64,

    /// How long a ping may wait for its pong, in ms; then the connection is closed with 4000.
    #[arg(long, env = "TETHER_PONG_TIMEOUT_MS", default_value = "10000", value_parser = positive("TETHER_PONG_TIMEOUT_MS"), global = true)]
    pub pong_timeout_ms: u64,

    /// Frames one connection's outbound queue holds; overflow closes it with 4009.
    #[arg(long, env = "TETHER_OUTBOUND_QUEUE", default_value = "256", value_parser = positive("TETHER_OUTBOUND_QUEUE"), global = true)]
    pub outbound_queue: u64,

    /// WebSocket read buffer per connection, in bytes. Small keeps idle connections cheap;
    /// frames larger than it are read in several steps (and need no more memory than their size).
    #[arg(long, env = "TETHER_WS_READ_BUFFER_BYTES", default_value = "256", value_parser = positive("TETHER_WS_READ_BUFFER_BYTES"), global = true)]
    pub ws_read_buffer_bytes: u64,

    /// Accept `?token=` on /ws (for clients that cannot set headers).
    #[arg(long, env = "TETHER_ALLOW_QUERY_TOKEN", default_value = "true", action = clap::ArgAction::Set, global = true)]
    pub allow_query_token: bool,

    /// Require the admin token on /metrics.
    #[arg(long, env = "TETHER_METRICS_REQUIRE_ADMIN", default_value = "false", action = clap::ArgAction::Set, global = true)]
    pub metrics_require_admin: bool,

    /// Dev mode: POST /api/dev/token mints tokens for anyone. Never in production.
    #[arg(long, env = "TETHER_DEV_MODE", default_value = "false", action = clap::ArgAction::Set, global = true)]
    pub dev_mode: bool,

    /// How long a graceful shutdown waits for connections and runs, in ms.
    #[arg(long, env = "TETHER_SHUTDOWN_GRACE_MS", default_value = "10000", value_parser = positive("TETHER_SHUTDOWN_GRACE_MS"), global = true)]
    pub shutdown_grace_ms: u64,

    /// How long a client may take to send its HTTP request head, in ms (slowloris protection).
    #[arg(long, env = "TETHER_HEADER_READ_TIMEOUT_MS", default_value = "10000", value_parser = positive("TETHER_HEADER_READ_TIMEOUT_MS"), global = true)]
    pub header_read_timeout_ms: u64,

    /// This node's id in the audit table (rows it left open are closed at its next start).
    #[arg(long, env = "TETHER_NODE_ID", default_value = "local", global = true)]
    pub node_id: String,

    /// Log format.
    #[arg(
        long,
        env = "TETHER_LOG_FORMAT",
        value_enum,
        default_value = "human",
        global = true
    )]
    pub log_format: LogFormat,
}

impl Config {
    /// Defaults for tests and embedding: loopback port 0, no limits on connect rate.
    pub fn for_tests(data_dir: &Path) -> Self {
        Self {
            listen: "127.0.0.1:0".parse().expect("valid address"),
            data_dir: data_dir.to_path_buf(),
            database_url: None,
            sqlite_synchronous: "NORMAL".into(),
            jwt_secret: Some(Secret::new("test-secret-0123456789abcdef0123456789")),
            jwt_alg: JwtAlg::Hs256,
            jwt_public_key: None,
            admin_token: Some(Secret::new("admin-test-token")),
            max_connections_per_user: 20,
            max_managers_per_user: 20,
            max_message_bytes: 65_536,
            message_rate: 20,
            connect_rate_per_ip: 0,
            agent_delay_ms: 0,
            run_timeout_ms: 120_000,
            heartbeat_interval_ms: 25_000,
            pong_timeout_ms: 10_000,
            outbound_queue: 256,
            ws_read_buffer_bytes: 256,
            allow_query_token: true,
            metrics_require_admin: false,
            dev_mode: false,
            shutdown_grace_ms: 5_000,
            header_read_timeout_ms: 10_000,
            node_id: "local".into(),
            log_format: LogFormat::Human,
        }
    }

    pub fn heartbeat_interval(&self) -> Duration {
        Duration::from_millis(self.heartbeat_interval_ms)
    }
    pub fn pong_timeout(&self) -> Duration {
        Duration::from_millis(self.pong_timeout_ms)
    }
    pub fn agent_delay(&self) -> Duration {
        Duration::from_millis(self.agent_delay_ms)
    }
    pub fn run_timeout(&self) -> Duration {
        Duration::from_millis(self.run_timeout_ms)
    }
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_millis(self.shutdown_grace_ms)
    }

    /// The JWT secret: configured, or generated once into `DATA_DIR/jwt-secret`.
    pub fn resolve_jwt_secret(&self) -> std::io::Result<Secret> {
        match &self.jwt_secret {
            Some(s) => Ok(s.clone()),
            None => load_or_create(&self.data_dir.join("jwt-secret")),
        }
    }

    /// The admin token: configured, or generated once into `DATA_DIR/admin-token`.
    pub fn resolve_admin_token(&self) -> std::io::Result<Secret> {
        match &self.admin_token {
            Some(s) => Ok(s.clone()),
            None => load_or_create(&self.data_dir.join("admin-token")),
        }
    }
}

/// Read a secret file, or create it with 32 random bytes (hex), readable by the owner only.
fn load_or_create(path: &Path) -> std::io::Result<Secret> {
    if let Ok(s) = std::fs::read_to_string(path) {
        let s = s.trim().to_string();
        if !s.is_empty() {
            return Ok(Secret(s));
        }
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let bytes: [u8; 32] = rand::random();
    let s = hex::encode(bytes);
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, &s)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
    }
    std::fs::rename(&tmp, path)?;
    Ok(Secret(s))
}

/// Parse a duration like `1h`, `30m`, `45s`, `2d` or plain seconds.
pub fn parse_ttl(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map_or((s, "s"), |i| (&s[..i], &s[i..]));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid duration '{s}' (use e.g. 1h, 30m, 3600)"))?;
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("invalid duration unit in '{s}' (use s, m, h or d)")),
    };
    if n == 0 {
        return Err("duration must be positive".into());
    }
    Ok(Duration::from_secs(n * mult))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_never_print() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?} {s}"), "<redacted> <redacted>");
        let mut c = Config::for_tests(Path::new("/tmp/x"));
        c.database_url = Some(Secret::new("postgres://u:pw@h/db"));
        let dbg = format!("{c:?}");
        assert!(
            !dbg.contains("pw@") && !dbg.contains("test-secret") && !dbg.contains("admin-test")
        );
    }

    #[test]
    fn ttl_parses_units() {
        assert_eq!(parse_ttl("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_ttl("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_ttl("2d").unwrap(), Duration::from_secs(172_800));
        assert!(parse_ttl("1y").is_err());
        assert!(parse_ttl("h").is_err());
        assert!(parse_ttl("0").is_err());
    }

    #[test]
    fn invalid_values_name_the_variable() {
        let err = positive("TETHER_MESSAGE_RATE")("abc").unwrap_err();
        assert!(err.contains("TETHER_MESSAGE_RATE"));
        assert!(positive("X")("0").is_err());
        assert!(socket_addr("TETHER_LISTEN")("nope")
            .unwrap_err()
            .contains("TETHER_LISTEN"));
    }

    #[test]
    fn generated_secrets_are_kept() {
        let dir = std::env::temp_dir().join(format!("tether-cfg-{}", crate::ids::connection_id()));
        let c = Config {
            jwt_secret: None,
            ..Config::for_tests(&dir)
        };
        let a = c.resolve_jwt_secret().unwrap();
        let b = c.resolve_jwt_secret().unwrap();
        assert_eq!(a, b);
        assert_eq!(a.expose().len(), 64);
        let _ = std::fs::remove_dir_all(dir);
    }
}
