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
        /// TOML configuration file (see docs/CONFIG.md). It seeds an empty
        /// state directory; afterwards the saved state is what starts.
        /// SIGHUP applies the file again (or, without one, the state file).
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
        /// Where the running state is kept across restarts [default:
        /// $STRATA_STATE_DIR, $STATE_DIRECTORY, or <data dir>/state].
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// The management API's Unix socket [default:
        /// $STRATA_RUNTIME_DIR/mgmt.sock, see docs/MANAGEMENT.md].
        #[arg(long)]
        mgmt_socket: Option<PathBuf>,
        /// Also serve the management API on TCP (needs --mgmt-token-file).
        #[arg(long, value_name = "IP:PORT")]
        mgmt_addr: Option<SocketAddr>,
        /// Bearer token for --mgmt-addr, in a file of mode 0600.
        #[arg(long)]
        mgmt_token_file: Option<PathBuf>,
        /// Serve Prometheus metrics on this address (GET /metrics); off by
        /// default. Overrides `[metrics] addr` in the config.
        #[arg(long)]
        metrics_addr: Option<SocketAddr>,
        /// Take part in a cluster: the Raft transport listens here (see
        /// `strata ctl cluster`); needs --cluster-token-file.
        #[arg(long, value_name = "IP:PORT")]
        cluster_addr: Option<SocketAddr>,
        /// The token every cluster member shares, in a file of mode 0600.
        #[arg(long)]
        cluster_token_file: Option<PathBuf>,
        /// A cluster voter that stores no data and serves no namespaces:
        /// lets two storage nodes keep a quorum when one dies.
        #[arg(long)]
        witness: bool,
    },
    /// Change a running `strata serve`: subsystems, namespaces, listeners,
    /// hosts, ANA, controllers (see docs/MANAGEMENT.md).
    Ctl(strata::mgmt::ctl::CtlArgs),
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
            state_dir,
            mgmt_socket,
            mgmt_addr,
            mgmt_token_file,
            metrics_addr,
            cluster_addr,
            cluster_token_file,
            witness,
        } => serve::run(serve::ServeArgs {
            config,
            listen,
            discovery,
            reactors,
            poll_us,
            state_dir,
            mgmt_socket,
            mgmt_addr,
            mgmt_token_file,
            metrics_addr,
            cluster_addr,
            cluster_token_file,
            witness,
        }),
        Cmd::Ctl(args) => match strata::mgmt::ctl::run(args) {
            Ok(()) => Ok(()),
            Err(e) => {
                eprintln!("strata ctl: {}", e.msg);
                std::process::exit(e.code);
            }
        },
        Cmd::Bench(args) => strata_bench::cli_main(*args),
        Cmd::Objbacker(args) => objbacker_cli::run(args),
    };
    if let Err(e) = r {
        eprintln!("strata: {e:#}");
        std::process::exit(1);
    }
}
