//! `tether-bench`: Tether's load tool, `chat`, `idle` and `churn` against a running server.
//! `tether bench ARGS...` runs this same executable.
//!
//! It speaks only the wire protocol, through the library's client (`tether::client`), so it
//! measures Tether and the bare baseline (`examples/baseline.rs`) with the very same client
//! code: the ratio between the two is the cost of Tether's machinery. Every run is bounded in
//! count and in time and stops by itself; every wait has a deadline.
//!
//! | module | owns |
//! |---|---|
//! | `cli` | each mode's flags and defaults |
//! | `target` | the server's address, secrets and process; tokens, source addresses, connecting |
//! | `http` | `/api/stats`, `/metrics` and publishing, over an HTTP client |
//! | `checker` | every frame against the protocol: event order per run, `seq` +1 per thread |
//! | `chat` | the chat mode, and `--stalled-compare` |
//! | `stalled` | `chat --stalled`: clients that never read (a raw socket below), and the server's slow-consumer close |
//! | `idle` | the idle mode, in this process or split over child processes |
//! | `churn` | the churn mode, and `/api/stats` back to zero |
//! | `stats` | error and violation counts, percentiles, the progress line |
//! | `procfs` | the server's memory, descriptors and CPU from `/proc` |
//! | `report` | JSON reports and one-screen summaries |
//!
//! This file: the command line (a mode beside the server's own settings, so one environment
//! of `TETHER_*` variables drives the server and the tool), running the mode, the exit status.

mod chat;
mod checker;
mod churn;
mod cli;
mod http;
mod idle;
mod procfs;
mod report;
mod stalled;
mod stats;
mod target;

use clap::Parser;
use tether::Config;

use crate::cli::Mode;
use crate::report::print_report;
use crate::target::Target;

#[derive(Parser)]
#[command(
    name = "tether-bench",
    version,
    about = "Load tool for Tether: chat, idle and churn modes against a running server (see BENCHMARKS.md)"
)]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
    /// The server's settings, from the same flags and `TETHER_*` variables as the server: its
    /// address (`--listen`), data directory and secrets.
    #[command(flatten)]
    config: Config,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if !run(cli.mode, &cli.config).await? {
        // The report is printed; the exit status tells scripts the checks failed.
        std::process::exit(1);
    }
    Ok(())
}

/// Run a mode and print its report; `Ok(false)` when the run failed its checks.
async fn run(mode: Mode, config: &Config) -> anyhow::Result<bool> {
    match mode {
        Mode::Chat(a) => {
            let target = Target::resolve(&a.common, config)?;
            if a.stalled_compare {
                let r = chat::chat_stalled_compare(&target, &a).await?;
                print_report(&a.common, &r, || report::stalled_compare_summary(&r));
                return Ok(r.passed);
            }
            let r = chat::chat(&target, &a).await?;
            print_report(&a.common, &r, || report::chat_summary(&r));
            Ok(r.passed)
        }
        Mode::Idle(a) => {
            let target = Target::resolve(&a.common, config)?;
            if a.child {
                idle::idle_child(&target, &a).await?;
                return Ok(true);
            }
            let r = idle::idle(&target, &a).await?;
            print_report(&a.common, &r, || report::idle_summary(&r));
            Ok(r.passed)
        }
        Mode::Churn(a) => {
            let target = Target::resolve(&a.common, config)?;
            let r = churn::churn(&target, &a).await?;
            print_report(&a.common, &r, || report::churn_summary(&r));
            Ok(r.passed)
        }
    }
}
