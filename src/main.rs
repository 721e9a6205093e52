//! The `strata` binary: wires the crates together.

mod objbacker_cli;

// `objbacker_cli` reaches the config parser as `crate::config`.
use strata::config;
use strata::logging::{self, LogFormat};
use strata::serve;

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "strata",
    version,
    about = "NVMe-over-TCP block storage with tiered offload to object storage"
)]
struct Cli {
    /// Log line format on stderr: `text` (coloured only on a terminal) or
    /// `json` (one object per line, for log shippers).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the NVMe/TCP target (the embedded default when no --config is given).
    Serve {
        /// TOML configuration file (see docs/CONFIG.md). SIGHUP re-reads it.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Override a listener's address; the Nth --listen replaces the Nth [[listener]].
        #[arg(long)]
        listen: Vec<SocketAddr>,
        /// Override the discovery listener's address.
        #[arg(long)]
        discovery: Option<SocketAddr>,
        /// Reactor threads (default: one per core).
        #[arg(long)]
        reactors: Option<usize>,
        /// Microseconds a connection keeps polling after its last activity
        /// before it sleeps in epoll (default 50; 0 = always sleep). A host
        /// that pipelines is polled up to 4× this, a slow one not at all.
        #[arg(long)]
        poll_us: Option<u64>,
        /// Serve Prometheus metrics on this address (GET /metrics); off by
        /// default. Overrides `[metrics] addr` in the config.
        #[arg(long)]
        metrics_addr: Option<SocketAddr>,
    },
    /// Userspace NVMe/TCP load generator: run, tiers, compare (see docs/bench.md).
    Bench(Box<strata_bench::BenchArgs>),
    /// Object-backed devices: format, info, fsck (see docs/objbacker.md).
    Objbacker(objbacker_cli::ObjBackerArgs),
}

fn main() {
    let cli = Cli::parse();
    logging::init(cli.log_format);
    let r = match cli.cmd {
        Cmd::Serve {
            config,
            listen,
            discovery,
            reactors,
            poll_us,
            metrics_addr,
        } => serve::run(serve::ServeArgs {
            config,
            listen,
            discovery,
            reactors,
            poll_us,
            metrics_addr,
        }),
        Cmd::Bench(args) => strata_bench::cli_main(*args),
        Cmd::Objbacker(args) => objbacker_cli::run(args),
    };
    if let Err(e) = r {
        eprintln!("strata: {e:#}");
        std::process::exit(1);
    }
}
