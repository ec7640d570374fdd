//! Configuration: flags and `TETHER_*` environment variables, parsed once into typed values.
//!
//! [`Config`] is made of sections ([`ListenConfig`], [`StoreConfig`], [`LimitsConfig`],
//! [`AuthConfig`], [`AgentConfig`], [`ClusterConfig`]), each a flattened clap group with its own
//! help heading. Every setting has a flag and an environment variable, and its default is
//! written once, in its `#[arg]`: [`Config::default`] is those defaults, read by clap itself.
//! Every value is checked as it is parsed: an invalid one stops the process at start with a
//! message that names the variable. Durations are [`Duration`]s (the variables are in ms),
//! counts that cannot be 0 are `NonZero*`. Secrets ([`Secret`]) never print.

mod secret;

use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use std::ffi::OsStr;
use std::marker::PhantomData;

use clap::builder::{PossibleValue, TypedValueParser};
use clap::error::ErrorKind;
use clap::{Args, FromArgMatches, ValueEnum};

pub use secret::Secret;

fn secret(env: &'static str) -> impl Fn(&str) -> Result<Secret, String> + Clone + Send + Sync {
    move |s: &str| {
        if s.trim().is_empty() {
            Err(format!("{env} must not be empty"))
        } else {
            Ok(Secret::new(s))
        }
    }
}

/// A whole number greater than 0, of any `NonZero*` type.
fn positive<T: FromStr>(
    env: &'static str,
) -> impl Fn(&str) -> Result<T, String> + Clone + Send + Sync {
    move |s: &str| {
        s.trim()
            .parse::<T>()
            .map_err(|_| format!("{env} must be a positive integer, got '{s}'"))
    }
}

fn non_negative(env: &'static str) -> impl Fn(&str) -> Result<u32, String> + Clone + Send + Sync {
    move |s: &str| {
        s.trim()
            .parse::<u32>()
            .map_err(|_| format!("{env} must be a non-negative integer, got '{s}'"))
    }
}

/// Milliseconds, more than 0.
fn millis(env: &'static str) -> impl Fn(&str) -> Result<Duration, String> + Clone + Send + Sync {
    move |s: &str| match s.trim().parse::<u64>() {
        Ok(n) if n > 0 => Ok(Duration::from_millis(n)),
        _ => Err(format!(
            "{env} must be a positive number of milliseconds, got '{s}'"
        )),
    }
}

/// Milliseconds, 0 allowed.
fn millis_or_zero(
    env: &'static str,
) -> impl Fn(&str) -> Result<Duration, String> + Clone + Send + Sync {
    move |s: &str| {
        s.trim()
            .parse::<u64>()
            .map(Duration::from_millis)
            .map_err(|_| format!("{env} must be a non-negative number of milliseconds, got '{s}'"))
    }
}

/// One of a [`clap::ValueEnum`]'s names: its errors name the variable, and `--help` lists the
/// names. `ignore_case` keeps each setting's old spelling rules (only `TETHER_SQLITE_SYNCHRONOUS`
/// ever took any case).
#[derive(Clone)]
struct OneOf<T> {
    env: &'static str,
    ignore_case: bool,
    of: PhantomData<fn() -> T>,
}

fn one_of<T>(env: &'static str, ignore_case: bool) -> OneOf<T> {
    OneOf {
        env,
        ignore_case,
        of: PhantomData,
    }
}

impl<T> OneOf<T>
where
    T: ValueEnum + Clone + Send + Sync + 'static,
{
    fn parse_str(&self, s: &str) -> Result<T, String> {
        T::from_str(s.trim(), self.ignore_case).map_err(|_| {
            let names: Vec<String> = T::value_variants()
                .iter()
                .filter_map(|v| v.to_possible_value().map(|p| p.get_name().to_string()))
                .collect();
            format!(
                "{} must be one of {}, got '{s}'",
                self.env,
                names.join(", ")
            )
        })
    }
}

impl<T> TypedValueParser for OneOf<T>
where
    T: ValueEnum + Clone + Send + Sync + 'static,
{
    type Value = T;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        _arg: Option<&clap::Arg>,
        value: &OsStr,
    ) -> Result<T, clap::Error> {
        let s = value.to_string_lossy();
        self.parse_str(&s)
            .map_err(|e| clap::Error::raw(ErrorKind::InvalidValue, format!("{e}\n")).with_cmd(cmd))
    }

    fn possible_values(&self) -> Option<Box<dyn Iterator<Item = PossibleValue> + '_>> {
        Some(Box::new(
            T::value_variants()
                .iter()
                .filter_map(ValueEnum::to_possible_value),
        ))
    }
}

/// `true` or `false`, as the settings were always spelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Switch {
    True,
    False,
}

fn boolean(env: &'static str) -> impl TypedValueParser<Value = bool> {
    one_of::<Switch>(env, false).map(|s| s == Switch::True)
}

fn socket_addr(
    env: &'static str,
) -> impl Fn(&str) -> Result<SocketAddr, String> + Clone + Send + Sync {
    move |s: &str| {
        s.trim()
            .parse::<SocketAddr>()
            .map_err(|_| format!("{env} must be an address like 127.0.0.1:8787, got '{s}'"))
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Human,
    /// One JSON object per line.
    Json,
}

/// JWT algorithms accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum JwtAlg {
    /// HMAC with SHA-256 and a shared secret.
    #[value(name = "HS256")]
    Hs256,
    /// RSA with SHA-256: verified with a public key, minted elsewhere.
    #[value(name = "RS256")]
    Rs256,
    /// ECDSA P-256 with SHA-256: verified with a public key, minted elsewhere.
    #[value(name = "ES256")]
    Es256,
}

/// SQLite's `synchronous` pragma.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SqliteSynchronous {
    /// Every commit is on disk before it is acknowledged: survives power loss.
    #[value(name = "FULL")]
    Full,
    /// Commits survive a crash of the process, and may be lost with power.
    #[value(name = "NORMAL")]
    Normal,
    /// As `FULL`, and the journal's deletion is made durable too.
    #[value(name = "EXTRA")]
    Extra,
}

impl SqliteSynchronous {
    /// The pragma's value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Full => "FULL",
            Self::Normal => "NORMAL",
            Self::Extra => "EXTRA",
        }
    }
}

/// Gateway configuration (`tether serve`): the sections below, each under its own heading in
/// `--help`.
#[derive(Debug, Clone, Args)]
pub struct Config {
    /// Where and how the node listens.
    #[command(flatten, next_help_heading = "Listen")]
    pub listen: ListenConfig,
    /// Where data is kept.
    #[command(flatten, next_help_heading = "Store")]
    pub store: StoreConfig,
    /// Per-user and per-connection bounds.
    #[command(flatten, next_help_heading = "Limits")]
    pub limits: LimitsConfig,
    /// Tokens, secrets and who may call what.
    #[command(flatten, next_help_heading = "Auth")]
    pub auth: AuthConfig,
    /// The agent runs are handed to.
    #[command(flatten, next_help_heading = "Agent")]
    pub agent: AgentConfig,
    /// This node among others.
    #[command(flatten, next_help_heading = "Cluster")]
    pub cluster: ClusterConfig,
}

/// Where and how the node listens.
#[derive(Debug, Clone, Args)]
pub struct ListenConfig {
    /// Address to listen on.
    #[arg(long = "listen", value_name = "LISTEN", env = "TETHER_LISTEN", default_value = "127.0.0.1:8787", value_parser = socket_addr("TETHER_LISTEN"), global = true)]
    pub addr: SocketAddr,

    /// How long a client may take to send its HTTP request head, in ms (slowloris protection).
    #[arg(long = "header-read-timeout-ms", value_name = "HEADER_READ_TIMEOUT_MS", env = "TETHER_HEADER_READ_TIMEOUT_MS", default_value = "10000", value_parser = millis("TETHER_HEADER_READ_TIMEOUT_MS"), global = true)]
    pub header_read_timeout: Duration,

    /// How long a graceful shutdown waits for connections and runs, in ms.
    #[arg(long = "shutdown-grace-ms", value_name = "SHUTDOWN_GRACE_MS", env = "TETHER_SHUTDOWN_GRACE_MS", default_value = "10000", value_parser = millis("TETHER_SHUTDOWN_GRACE_MS"), global = true)]
    pub shutdown_grace: Duration,

    /// Log format.
    #[arg(long, env = "TETHER_LOG_FORMAT", default_value = "human", value_parser = one_of::<LogFormat>("TETHER_LOG_FORMAT", false), global = true)]
    pub log_format: LogFormat,
}

/// Where data is kept.
#[derive(Debug, Clone, Args)]
pub struct StoreConfig {
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

    /// SQLite `synchronous` mode: FULL (acknowledged writes survive power loss), NORMAL or EXTRA.
    #[arg(long, env = "TETHER_SQLITE_SYNCHRONOUS", default_value = "FULL", value_parser = one_of::<SqliteSynchronous>("TETHER_SQLITE_SYNCHRONOUS", true), global = true)]
    pub sqlite_synchronous: SqliteSynchronous,
}

/// Per-user and per-connection bounds.
#[derive(Debug, Clone, Args)]
pub struct LimitsConfig {
    /// Most connections one user may hold (over all threads); more are closed with 4008.
    #[arg(long, env = "TETHER_MAX_CONNECTIONS_PER_USER", default_value = "20", value_parser = positive::<NonZeroUsize>("TETHER_MAX_CONNECTIONS_PER_USER"), global = true)]
    pub max_connections_per_user: NonZeroUsize,

    /// Most managers (threads with live connections) one user may hold; more are closed with 4008.
    #[arg(long, env = "TETHER_MAX_MANAGERS_PER_USER", default_value = "20", value_parser = positive::<NonZeroUsize>("TETHER_MAX_MANAGERS_PER_USER"), global = true)]
    pub max_managers_per_user: NonZeroUsize,

    /// Largest frame or message in bytes; larger ones are closed with 1009.
    #[arg(long, env = "TETHER_MAX_MESSAGE_BYTES", default_value = "65536", value_parser = positive::<NonZeroUsize>("TETHER_MAX_MESSAGE_BYTES"), global = true)]
    pub max_message_bytes: NonZeroUsize,

    /// Client frames per second per connection (burst of the same size). Frames over it get
    /// `error rate_limited`; a client that keeps going for another second is closed with 4029.
    #[arg(long, env = "TETHER_MESSAGE_RATE", default_value = "20", value_parser = positive::<NonZeroU32>("TETHER_MESSAGE_RATE"), global = true)]
    pub message_rate: NonZeroU32,

    /// New connections per second per client IP (429 beyond); 0 means no limit.
    #[arg(long, env = "TETHER_CONNECT_RATE_PER_IP", default_value = "20", value_parser = non_negative("TETHER_CONNECT_RATE_PER_IP"), global = true)]
    pub connect_rate_per_ip: u32,

    /// Frames one connection's outbound queue holds; overflow closes it with 4009.
    #[arg(long, env = "TETHER_OUTBOUND_QUEUE", default_value = "256", value_parser = positive::<NonZeroUsize>("TETHER_OUTBOUND_QUEUE"), global = true)]
    pub outbound_queue: NonZeroUsize,

    /// WebSocket read buffer per connection, in bytes. Small keeps idle connections cheap;
    /// frames larger than it are read in several steps (and need no more memory than their size).
    #[arg(long, env = "TETHER_WS_READ_BUFFER_BYTES", default_value = "256", value_parser = positive::<NonZeroUsize>("TETHER_WS_READ_BUFFER_BYTES"), global = true)]
    pub ws_read_buffer_bytes: NonZeroUsize,

    /// Interval of server pings, in ms.
    #[arg(long = "heartbeat-interval-ms", value_name = "HEARTBEAT_INTERVAL_MS", env = "TETHER_HEARTBEAT_INTERVAL_MS", default_value = "25000", value_parser = millis("TETHER_HEARTBEAT_INTERVAL_MS"), global = true)]
    pub heartbeat_interval: Duration,

    /// How long a ping may wait for its pong, in ms; then the connection is closed with 4000.
    #[arg(long = "pong-timeout-ms", value_name = "PONG_TIMEOUT_MS", env = "TETHER_PONG_TIMEOUT_MS", default_value = "10000", value_parser = millis("TETHER_PONG_TIMEOUT_MS"), global = true)]
    pub pong_timeout: Duration,
}

/// Tokens, secrets and who may call what.
#[derive(Debug, Clone, Args)]
pub struct AuthConfig {
    /// HS256 secret for JWTs. If unset, a random secret is generated once and kept in the data
    /// directory, so `tether token` and `tether serve` agree.
    #[arg(long, env = "TETHER_JWT_SECRET", value_parser = secret("TETHER_JWT_SECRET"), global = true)]
    pub jwt_secret: Option<Secret>,

    /// JWT algorithm. RS256/ES256 verify with --jwt-public-key (tokens are then minted elsewhere).
    #[arg(long, env = "TETHER_JWT_ALG", default_value = "HS256", value_parser = one_of::<JwtAlg>("TETHER_JWT_ALG", false), global = true)]
    pub jwt_alg: JwtAlg,

    /// PEM file with the public key for RS256/ES256.
    #[arg(long, env = "TETHER_JWT_PUBLIC_KEY", global = true)]
    pub jwt_public_key: Option<PathBuf>,

    /// Admin token for the admin API, /api/stats and the dashboard. If unset, a random one is
    /// generated once and kept in DATA_DIR/admin-token.
    #[arg(long, env = "TETHER_ADMIN_TOKEN", value_parser = secret("TETHER_ADMIN_TOKEN"), global = true)]
    pub admin_token: Option<Secret>,

    /// Accept `?token=` on /ws (for clients that cannot set headers).
    #[arg(long, env = "TETHER_ALLOW_QUERY_TOKEN", default_value = "true", value_parser = boolean("TETHER_ALLOW_QUERY_TOKEN"), action = clap::ArgAction::Set, global = true)]
    pub allow_query_token: bool,

    /// Require the admin token on /metrics.
    #[arg(long, env = "TETHER_METRICS_REQUIRE_ADMIN", default_value = "false", value_parser = boolean("TETHER_METRICS_REQUIRE_ADMIN"), action = clap::ArgAction::Set, global = true)]
    pub metrics_require_admin: bool,

    /// Dev mode: POST /api/dev/token mints tokens for anyone. Never in production.
    #[arg(long, env = "TETHER_DEV_MODE", default_value = "false", value_parser = boolean("TETHER_DEV_MODE"), action = clap::ArgAction::Set, global = true)]
    pub dev_mode: bool,
}

/// The agent runs are handed to.
#[derive(Debug, Clone, Args)]
pub struct AgentConfig {
    /// Pause between the demo agent's steps, in ms (0 for benchmarks).
    #[arg(long = "agent-delay-ms", value_name = "AGENT_DELAY_MS", env = "TETHER_AGENT_DELAY_MS", default_value = "150", value_parser = millis_or_zero("TETHER_AGENT_DELAY_MS"), global = true)]
    pub delay: Duration,

    /// Longest an agent run may take, in ms; then it ends with agent_error `timeout`.
    #[arg(long = "run-timeout-ms", value_name = "RUN_TIMEOUT_MS", env = "TETHER_RUN_TIMEOUT_MS", default_value = "120000", value_parser = millis("TETHER_RUN_TIMEOUT_MS"), global = true)]
    pub run_timeout: Duration,
}

/// This node among others.
#[derive(Debug, Clone, Args)]
pub struct ClusterConfig {
    /// This node's id in the audit table (rows it left open are closed at its next start).
    #[arg(long, env = "TETHER_NODE_ID", default_value = "local", global = true)]
    pub node_id: String,
}

impl Default for Config {
    /// The defaults of every `#[arg]`, as `tether serve` with no flags and no `TETHER_*`
    /// variables would have them (the environment is not read).
    fn default() -> Self {
        let cmd = <Self as Args>::augment_args(clap::Command::new("defaults"))
            .mut_args(|a| a.env(None::<&'static str>));
        let matches = cmd
            .try_get_matches_from(["defaults"])
            .expect("the defaults parse");
        Self::from_arg_matches(&matches).expect("the defaults are valid")
    }
}

impl Config {
    /// Defaults for tests and embedding: loopback port 0, a fixed JWT secret and admin token,
    /// no connect-rate limit, no agent delay, SQLite `NORMAL`, a 5 s shutdown grace.
    #[cfg(any(test, feature = "testing"))]
    pub fn for_tests(data_dir: &std::path::Path) -> Self {
        let mut c = Self::default();
        c.listen.addr = "127.0.0.1:0".parse().expect("valid address");
        c.listen.shutdown_grace = Duration::from_secs(5);
        c.store.data_dir = data_dir.to_path_buf();
        c.store.sqlite_synchronous = SqliteSynchronous::Normal;
        c.auth.jwt_secret = Some(Secret::new("test-secret-0123456789abcdef0123456789"));
        c.auth.admin_token = Some(Secret::new("admin-test-token"));
        c.limits.connect_rate_per_ip = 0;
        c.agent.delay = Duration::ZERO;
        c
    }

    /// The JWT secret: configured, or generated once into `DATA_DIR/jwt-secret`.
    pub fn resolve_jwt_secret(&self) -> std::io::Result<Secret> {
        match &self.auth.jwt_secret {
            Some(s) => Ok(s.clone()),
            None => secret::load_or_create(&self.store.data_dir.join("jwt-secret")),
        }
    }

    /// The admin token: configured, or generated once into `DATA_DIR/admin-token`.
    pub fn resolve_admin_token(&self) -> std::io::Result<Secret> {
        match &self.auth.admin_token {
            Some(s) => Ok(s.clone()),
            None => secret::load_or_create(&self.store.data_dir.join("admin-token")),
        }
    }
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
    fn a_config_never_prints_its_secrets() {
        let mut c = Config::for_tests(std::path::Path::new("/tmp/x"));
        c.store.database_url = Some(Secret::new("postgres://u:pw@h/db"));
        let dbg = format!("{c:?}");
        assert!(
            !dbg.contains("pw@") && !dbg.contains("test-secret") && !dbg.contains("admin-test")
        );
    }

    #[test]
    fn generated_secrets_are_kept_in_the_data_dir_under_their_names() {
        let dir = std::env::temp_dir().join(format!("tether-cfg-{}", crate::ids::connection_id()));
        let mut c = Config::for_tests(&dir);
        c.auth.jwt_secret = None;
        c.auth.admin_token = None;
        let jwt = c.resolve_jwt_secret().unwrap();
        let admin = c.resolve_admin_token().unwrap();
        assert_ne!(jwt, admin);
        assert_eq!(c.resolve_jwt_secret().unwrap(), jwt);
        assert_eq!(c.resolve_admin_token().unwrap(), admin);
        let on_disk = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap();
        assert_eq!(on_disk("jwt-secret"), jwt.expose());
        assert_eq!(on_disk("admin-token"), admin.expose());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn the_defaults_are_the_documented_ones() {
        let c = Config::default();
        assert_eq!(c.listen.addr.to_string(), "127.0.0.1:8787");
        assert_eq!(c.store.sqlite_synchronous, SqliteSynchronous::Full);
        assert_eq!(c.limits.max_connections_per_user.get(), 20);
        assert_eq!(c.limits.max_managers_per_user.get(), 20);
        assert_eq!(c.limits.max_message_bytes.get(), 65_536);
        assert_eq!(c.limits.message_rate.get(), 20);
        assert_eq!(c.limits.connect_rate_per_ip, 20);
        assert_eq!(c.agent.delay, Duration::from_millis(150));
        assert_eq!(c.agent.run_timeout, Duration::from_secs(120));
        assert!(c.auth.allow_query_token && !c.auth.dev_mode);
        assert_eq!(c.cluster.node_id, "local");
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
        let err = positive::<NonZeroU32>("TETHER_MESSAGE_RATE")("abc").unwrap_err();
        assert!(err.contains("TETHER_MESSAGE_RATE"));
        assert!(positive::<NonZeroU32>("X")("0").is_err());
        assert!(socket_addr("TETHER_LISTEN")("nope")
            .unwrap_err()
            .contains("TETHER_LISTEN"));
        let err = one_of::<SqliteSynchronous>("TETHER_SQLITE_SYNCHRONOUS", true)
            .parse_str("OFF")
            .unwrap_err();
        assert!(
            err.contains("TETHER_SQLITE_SYNCHRONOUS") && err.contains("FULL"),
            "{err}"
        );
        assert_eq!(
            one_of::<SqliteSynchronous>("X", true).parse_str("normal"),
            Ok(SqliteSynchronous::Normal)
        );
        let switch = one_of::<Switch>("TETHER_DEV_MODE", false);
        assert!(switch
            .parse_str("maybe")
            .unwrap_err()
            .contains("TETHER_DEV_MODE"));
        assert!(switch.parse_str("1").is_err() && switch.parse_str("TRUE").is_err());
        assert_eq!(switch.parse_str("true"), Ok(Switch::True));
        assert!(one_of::<JwtAlg>("TETHER_JWT_ALG", false)
            .parse_str("hs256")
            .is_err());
        assert_eq!(
            one_of::<SqliteSynchronous>("X", true).parse_str("extra"),
            Ok(SqliteSynchronous::Extra)
        );
        assert!(millis("TETHER_RUN_TIMEOUT_MS")("0")
            .unwrap_err()
            .contains("TETHER_RUN_TIMEOUT_MS"));
        assert_eq!(millis_or_zero("X")("0"), Ok(Duration::ZERO));
    }
}
