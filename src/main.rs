//! The `tether` binary: `serve` (default), `token`, `bench`.

use anyhow::Context as _;
use clap::{Parser, Subcommand};
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
    Bench(tether::bench::BenchArgs),
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
    let cli = Cli::parse();
    match cli.cmd {
        Some(Cmd::Token { user, ttl }) => {
            let auth = Auth::from_config(&cli.config).context("cannot load the JWT key")?;
            let token = auth.mint(&user, ttl).context("cannot mint the token")?;
            println!("{token}");
            Ok(())
        }
        Some(Cmd::Bench(args)) => {
            let passed = tether::bench::run(args, &cli.config).await?;
            if !passed {
                // The report is printed; the exit status tells scripts the checks failed.
                std::process::exit(1);
            }
            Ok(())
        }
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
