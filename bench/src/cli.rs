//! The command line of each mode: its flags, their defaults (written once, in the `#[arg]`s)
//! and the parsers of durations and fractions. The server's own settings (address, data
//! directory, secrets) are not here: `main.rs` flattens the gateway's `Config` beside the mode.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, Subcommand, ValueEnum};

/// The mode to run.
#[derive(Debug, Clone, Subcommand)]
pub(crate) enum Mode {
    /// Connections send user messages; runs/s, latency percentiles, event order and seq checks.
    Chat(ChatArgs),
    /// Connections held open; the server's resident memory per connection.
    Idle(IdleArgs),
    /// Connect/close cycles (some reset, some mid-run); then /api/stats must be back to zero.
    Churn(ChurnArgs),
}

/// Options every mode takes.
#[derive(Debug, Clone, Args)]
pub(crate) struct CommonArgs {
    /// The server, host:port (default: --listen / TETHER_LISTEN, the server's own setting).
    #[arg(long)]
    pub(crate) target: Option<SocketAddr>,
    /// Print the report as JSON on stdout instead of the summary.
    #[arg(long)]
    pub(crate) json: bool,
    /// No progress bar (it is only drawn when stderr is a terminal anyway).
    #[arg(long)]
    pub(crate) no_progress: bool,
    /// HS256 secret to mint tokens with (default: --jwt-secret / TETHER_JWT_SECRET, else the
    /// secret the server generated in --data-dir).
    #[arg(long)]
    pub(crate) token_secret: Option<String>,
    /// PID of the server, for its memory and CPU (default: the process listening on the port).
    #[arg(long)]
    pub(crate) server_pid: Option<u32>,
}

/// Spread source addresses over 127.0.0.2-127.0.0.254.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Spread {
    /// When there are more than 10,000 connections or cycles to a loopback target.
    Auto,
    On,
    Off,
}

/// `tether-bench chat`.
#[derive(Debug, Clone, Args)]
pub(crate) struct ChatArgs {
    #[command(flatten)]
    pub(crate) common: CommonArgs,
    /// Connections (N).
    #[arg(long, short = 'n', default_value_t = 50)]
    pub(crate) connections: u64,
    /// Users the connections are spread over (U; default: one per connection).
    #[arg(long)]
    pub(crate) users: Option<u64>,
    /// Messages per connection (M; default 100 unless --duration is given).
    #[arg(long, short = 'm')]
    pub(crate) messages: Option<u64>,
    /// Messages in flight per connection (W).
    #[arg(long, short = 'w', default_value_t = 1)]
    pub(crate) in_flight: u64,
    /// Keep sending for this long (e.g. 20s); with --messages, whichever ends first.
    #[arg(long, value_parser = parse_duration)]
    pub(crate) duration: Option<Duration>,
    /// Longest wait for any one frame before the connection counts as failed.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub(crate) timeout: Duration,
    /// The text of each message.
    #[arg(long, default_value = "hello from tether bench")]
    pub(crate) content: String,
    /// Stalled connections (K) besides the N: each is its own user (`bench-stalled-K`), upgrades
    /// with a small receive buffer, reads `connection_established` and never reads again, while
    /// the tool publishes frames to it (POST /api/users/{user}/events, admin token) until the
    /// server refuses one (its queue is full); the tool then times the server's close. A closed
    /// one is replaced by a new one until the load ends. Tether only.
    #[arg(long, default_value_t = 0)]
    pub(crate) stalled: u64,
    /// Run the load twice, without and then with --stalled K (at least 1) stalled connections,
    /// and report the others' latency with over without.
    #[arg(long)]
    pub(crate) stalled_compare: bool,
    /// Frames per second published to each stalled connection.
    #[arg(long, default_value_t = 200)]
    pub(crate) stall_rate: u64,
    /// Bytes of padding in each frame published to a stalled connection.
    #[arg(long, default_value_t = 4096)]
    pub(crate) stall_frame_bytes: u64,
}

/// `tether-bench idle`.
#[derive(Debug, Clone, Args)]
pub(crate) struct IdleArgs {
    #[command(flatten)]
    pub(crate) common: CommonArgs,
    /// Connections (N).
    #[arg(long, short = 'n', default_value_t = 1000)]
    pub(crate) connections: u64,
    /// Users the connections are spread over (default: one per connection).
    #[arg(long)]
    pub(crate) users: Option<u64>,
    /// How long to hold the connections open once all are established.
    #[arg(long, value_parser = parse_duration, default_value = "5s")]
    pub(crate) hold: Duration,
    /// Processes to split the connections over (default: enough for the open-file limit).
    #[arg(long)]
    pub(crate) processes: Option<u32>,
    /// Spread source addresses over 127.0.0.2-127.0.0.254.
    #[arg(long, value_enum, default_value_t = Spread::Auto)]
    pub(crate) spread: Spread,
    /// Handshakes in progress at once (over all processes).
    #[arg(long, default_value_t = 200)]
    pub(crate) connect_concurrency: u64,
    /// Longest one connection may take to reach `connection_established`.
    #[arg(long, value_parser = parse_duration, default_value = "20s")]
    pub(crate) connect_timeout: Duration,
    /// Internal: run as a child of a multi-process idle run.
    #[arg(long, hide = true)]
    pub(crate) child: bool,
    /// Internal: the child's first connection index.
    #[arg(long, hide = true, default_value_t = 0)]
    pub(crate) first_index: u64,
    /// Internal: the child exits by itself after this long.
    #[arg(long, hide = true, value_parser = parse_duration, default_value = "10m")]
    pub(crate) child_deadline: Duration,
}

/// `tether-bench churn`.
#[derive(Debug, Clone, Args)]
pub(crate) struct ChurnArgs {
    #[command(flatten)]
    pub(crate) common: CommonArgs,
    /// Connect/close cycles (C).
    #[arg(long, short = 'c', default_value_t = 1000)]
    pub(crate) cycles: u64,
    /// Cycles in progress at once (K).
    #[arg(long, short = 'k', default_value_t = 32)]
    pub(crate) concurrency: u64,
    /// Fraction of cycles closed by TCP reset (SO_LINGER 0, no close frame).
    #[arg(long, value_parser = parse_fraction, default_value = "0.3")]
    pub(crate) resets: f64,
    /// Fraction of cycles closed mid-run (after the `ack` of a `user_message`).
    #[arg(long, value_parser = parse_fraction, default_value = "0.1")]
    pub(crate) midrun: f64,
    /// Users the cycles are spread over.
    #[arg(long, default_value_t = 100)]
    pub(crate) users: u64,
    /// Cycles before the measured ones, after which the warm baseline is taken (default: a
    /// tenth of --cycles, at most 20,000: SQLite's page cache takes ~10,000 cycles to fill,
    /// and a shorter warm-up shows that growth as if it were a leak).
    #[arg(long)]
    pub(crate) warmup_cycles: Option<u64>,
    /// How long /api/stats may take to come back to zero.
    #[arg(long, value_parser = parse_duration, default_value = "30s")]
    pub(crate) settle_timeout: Duration,
    /// Longest one cycle may take.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub(crate) cycle_timeout: Duration,
    /// Do not poll /api/stats (servers without it, e.g. the baseline); the run then cannot
    /// prove cleanup.
    #[arg(long)]
    pub(crate) no_stats: bool,
    /// Fail when the server's resident memory grows more than this (percent) over the warm
    /// baseline.
    #[arg(long)]
    pub(crate) max_rss_growth_pct: Option<f64>,
    /// Spread source addresses over 127.0.0.2-127.0.0.254.
    #[arg(long, value_enum, default_value_t = Spread::Auto)]
    pub(crate) spread: Spread,
}

/// `250ms`, `20s`, `2m`, or plain seconds.
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid duration '{s}' (use e.g. 250ms, 20s, 2m)"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "" | "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n.saturating_mul(60))),
        _ => Err(format!("invalid duration unit in '{s}' (use ms, s or m)")),
    }
}

fn parse_fraction(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(f) if (0.0..=1.0).contains(&f) => Ok(f),
        _ => Err(format!("'{s}' is not a fraction between 0 and 1")),
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    /// A mode as the command line gives it, with nothing but its defaults.
    #[derive(Parser)]
    struct Only {
        #[command(subcommand)]
        mode: Mode,
    }

    fn defaults(mode: &str) -> Mode {
        Only::try_parse_from(["tether-bench", mode])
            .expect("the defaults parse")
            .mode
    }

    #[test]
    fn defaults_parse() {
        let Mode::Chat(c) = defaults("chat") else {
            panic!("chat parses as chat")
        };
        assert_eq!((c.connections, c.in_flight), (50, 1));
        assert_eq!(c.timeout, Duration::from_secs(10));
        let Mode::Idle(i) = defaults("idle") else {
            panic!("idle parses as idle")
        };
        assert_eq!(i.hold, Duration::from_secs(5));
        let Mode::Churn(ch) = defaults("churn") else {
            panic!("churn parses as churn")
        };
        assert_eq!((ch.resets, ch.midrun), (0.3, 0.1));
    }

    #[test]
    fn stall_options_parse() {
        let Mode::Chat(c) = defaults("chat") else {
            panic!("chat parses as chat")
        };
        assert_eq!((c.stalled, c.stalled_compare), (0, false));
        assert_eq!((c.stall_rate, c.stall_frame_bytes), (200, 4096));
    }

    #[test]
    fn durations_and_fractions_parse() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("20s"), Ok(Duration::from_secs(20)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert!(parse_duration("x").is_err());
        assert!(parse_duration("5h").is_err());
        assert!(parse_fraction("1.5").is_err());
        assert!(parse_fraction("nan").is_err());
        assert_eq!(parse_fraction("0.25"), Ok(0.25));
    }
}
