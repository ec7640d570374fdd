//! The `tether` binary: `serve` (default), `token`, and `bench`, which runs the load tool
//! (`tether-bench`, its own package in `bench/`) installed next to this binary.

use std::ffi::OsString;

use anyhow::Context as _;
use clap::parser::ValueSource;
use clap::{ArgMatches, Args as _, CommandFactory as _, FromArgMatches as _, Parser, Subcommand};
use tether::Auth;
use tether::{parse_ttl, Config, LogFormat};
use tether::{shutdown_signal, Server};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "tether",
    version,
    about = "WebSocket gateway for multi-user real-time chat with AI agents"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    #[command(flatten)]
    config: Config,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the gateway (the default).
    Serve,
    /// Print a JWT for a user, signed with the configured (or generated) secret.
    Token {
        /// The user id (the token's `sub`).
        #[arg(long)]
        user: String,
        /// Lifetime, e.g. 1h, 30m, 3600.
        #[arg(long, default_value = "1h", value_parser = parse_ttl)]
        ttl: std::time::Duration,
    },
    /// Load tool: chat, idle and churn modes against a running server (see BENCHMARKS.md).
    /// Runs `tether-bench`, installed next to this binary, with these arguments.
    #[command(disable_help_flag = true)]
    Bench {
        /// The load tool's arguments, e.g. `chat -n 50 --duration 20s`, or `--help`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
}

fn init_logs(format: LogFormat) {
    let filter = EnvFilter::try_from_env("TETHER_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    // Colour only on a terminal: escape codes in a log file are noise, and the fields each
    // connection's span keeps for its whole life would carry them too.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .init(),
        LogFormat::Human => builder.init(),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut matches = Cli::command().get_matches();
    let settings = settings_given(&matches);
    let cli = Cli::from_arg_matches_mut(&mut matches).unwrap_or_else(|e| e.exit());
    match cli.cmd {
        Some(Cmd::Token { user, ttl }) => {
            let auth = Auth::from_config(&cli.config).context("cannot load the JWT key")?;
            let token = auth.mint(&user, ttl).context("cannot mint the token")?;
            println!("{token}");
            Ok(())
        }
        Some(Cmd::Bench { args }) => run_bench(settings, args),
        None | Some(Cmd::Serve) => {
            init_logs(cli.config.listen.log_format);
            let server = Server::bind(cli.config)
                .await
                .context("cannot start the gateway")?;
            server
                .run(shutdown_signal())
                .await
                .context("gateway failed")?;
            Ok(())
        }
    }
}

/// `tether bench ARGS...`: the load tool is its own executable, `tether-bench`, installed next to
/// this one. Run it with the server settings given on this command line (it reads them the same
/// way) and the arguments after `bench`, and end with its exit status.
fn run_bench(settings: Vec<OsString>, args: Vec<OsString>) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("cannot find the tether binary")?;
    let bench = exe.with_file_name(format!("tether-bench{}", std::env::consts::EXE_SUFFIX));
    if !bench.is_file() {
        anyhow::bail!(
            "`tether bench` runs the load tool, tether-bench, which is not next to this binary \
             (no {}): build it with `cargo build --release -p tether-bench`",
            bench.display()
        );
    }
    let mut cmd = std::process::Command::new(&bench);
    cmd.args(settings).args(args);
    exec(cmd, &bench)
}

/// The server settings given as flags, wherever they stood (`tether --data-dir D bench chat`,
/// `tether bench --data-dir D chat`: clap takes both as this binary's), as `--name=value`.
/// Those after the mode (`tether bench chat --data-dir D`) are among the bench's own arguments.
fn settings_given(matches: &ArgMatches) -> Vec<OsString> {
    let config = Config::augment_args(clap::Command::new("tether"));
    let mut given = Vec::new();
    for arg in config.get_arguments() {
        let id = arg.get_id().as_str();
        let (Some(long), Some(values)) = (arg.get_long(), matches.get_raw(id)) else {
            continue;
        };
        if matches.value_source(id) != Some(ValueSource::CommandLine) {
            continue;
        }
        for value in values {
            let mut flag = OsString::from(format!("--{long}="));
            flag.push(value);
            given.push(flag);
        }
    }
    given
}

/// Become `cmd`: the load tool keeps this process, its terminal and its signals, and its exit
/// status is this one's.
#[cfg(unix)]
fn exec(mut cmd: std::process::Command, path: &std::path::Path) -> anyhow::Result<()> {
    use std::os::unix::process::CommandExt as _;
    let err = cmd.exec();
    Err(err).with_context(|| format!("cannot run {}", path.display()))
}

/// Run `cmd` and end with its exit status.
#[cfg(not(unix))]
fn exec(mut cmd: std::process::Command, path: &std::path::Path) -> anyhow::Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot run {}", path.display()))?;
    std::process::exit(status.code().unwrap_or(1))
}
