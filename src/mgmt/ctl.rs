//! `strata ctl`: the management API from the command line, in the manner
//! of `nvmetcli` and SPDK's `rpc.py`. Human tables by default, `--json`
//! for scripts, and exit codes a script can rely on:
//!
//! | code | meaning |
//! |---|---|
//! | 0 | done |
//! | 1 | any other failure |
//! | 2 | bad command line (clap) |
//! | 3 | the target is not running, or not reachable |
//! | 4 | invalid argument (the message names the field and the fix) |
//! | 5 | not found |
//! | 6 | already exists |
//! | 7 | refused by the running state (in use, cannot resize, …) |
//! | 8 | not authenticated (TCP: missing or wrong token) |
//! | 9 | timed out waiting for a cluster change to be applied (it may still commit) |

use std::collections::HashMap;
use std::path::PathBuf;

use clap::{Args, Subcommand};
use serde_json::{Value, json};
use strata_proto::mgmt::v1 as pb;
use strata_proto::mgmt::v1::management_client::ManagementClient;
use tonic::transport::{Channel, Endpoint, Uri};

use super::convert::ana_from_name;
use super::ops::size_arg;

#[derive(Args, Debug)]
pub struct CtlArgs {
    /// The management socket of the `strata serve` to talk to
    /// [default: $STRATA_RUNTIME_DIR/mgmt.sock, see docs/MANAGEMENT.md].
    #[arg(long, global = true)]
    socket: Option<PathBuf>,
    /// A TCP management address instead (`strata serve --mgmt-addr`).
    // Its own id: a global argument shares its values with any argument of
    // the same id in a subcommand, and `listener add NAME ADDR` has an `addr`.
    #[arg(
        long = "addr",
        id = "mgmt_addr",
        global = true,
        value_name = "IP:PORT",
        requires = "token_file"
    )]
    tcp_addr: Option<String>,
    /// The bearer token file for --addr (mode 0600).
    #[arg(long, global = true)]
    token_file: Option<PathBuf>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: CtlCmd,
}

#[derive(Subcommand, Debug)]
enum CtlCmd {
    /// Version, uptime, reactors, counts.
    Status,
    /// Subsystems: add, rm, ls.
    #[command(subcommand)]
    Subsystem(SubsystemCmd),
    /// Namespaces: add, rm, resize, ls.
    #[command(subcommand)]
    Ns(NsCmd),
    /// Listeners: add, rm, ls, attach, detach.
    #[command(subcommand)]
    Listener(ListenerCmd),
    /// The hosts a subsystem allows.
    #[command(subcommand)]
    Host(HostCmd),
    /// ANA states of a listener's groups.
    #[command(subcommand)]
    Ana(AnaCmd),
    /// Connected host controllers.
    #[command(subcommand)]
    Ctrl(CtrlCmd),
    /// The cluster (`strata serve --cluster-addr`): init, join, leave, status.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// Print (or write) the running state as a TOML config file.
    SaveConfig {
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
enum ClusterCmd {
    /// Start a new one-node cluster on this node.
    Init {
        /// This node's name in the cluster [default: node-<id>].
        #[arg(long)]
        name: Option<String>,
    },
    /// Join the cluster that a member at ADDR (its --cluster-addr) is in,
    /// as a voter.
    Join {
        #[arg(value_name = "MEMBER_ADDR")]
        member: String,
        #[arg(long)]
        name: Option<String>,
    },
    /// Leave the cluster (refused for its last storage node); this node's
    /// cluster log is deleted.
    Leave,
    /// Members, leader, term, commit and applied index, ANA groups.
    Status,
}

#[derive(Subcommand, Debug)]
enum SubsystemCmd {
    Add {
        nqn: String,
        #[arg(long)]
        serial: Option<String>,
        #[arg(long)]
        model: Option<String>,
        /// Let any host connect (otherwise only --host NQNs).
        #[arg(long)]
        allow_any_host: bool,
        #[arg(long = "host")]
        hosts: Vec<String>,
        /// Export on these listeners (default: all).
        #[arg(long = "listener")]
        listeners: Vec<String>,
    },
    Rm {
        nqn: String,
        /// Even with hosts connected.
        #[arg(long)]
        force: bool,
    },
    Ls {
        nqn: Option<String>,
    },
}

// One value per process, parsed once from argv: the size of the largest
// variant costs nothing, and boxing it would only obscure the clap derive.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
enum NsCmd {
    /// Add a namespace: one of --ram SIZE, --file PATH, --objbacker.
    Add {
        nqn: String,
        /// Default: the lowest free NSID.
        #[arg(long, default_value_t = 0)]
        nsid: u32,
        #[arg(long, value_name = "SIZE", group = "backing")]
        ram: Option<String>,
        #[arg(long, value_name = "PATH", group = "backing")]
        file: Option<String>,
        #[arg(long, group = "backing", requires = "buckets")]
        objbacker: bool,
        /// objbacker: a bucket URL (repeat for striping).
        #[arg(long = "bucket")]
        buckets: Vec<String>,
        /// file (optional) and objbacker (required): size in bytes or 1GiB.
        #[arg(long)]
        size: Option<String>,
        #[arg(long)]
        object_size: Option<String>,
        /// objbacker: KEY=VALUE store option (repeat).
        #[arg(long = "store-option", value_name = "KEY=VALUE")]
        store_options: Vec<String>,
        #[arg(long)]
        auto_format: bool,
        #[arg(long)]
        writeback: Option<String>,
        /// objbacker: bytes read ahead of a sequential reader (0: off).
        #[arg(long)]
        readahead: Option<String>,
        #[arg(long)]
        block_size: Option<u32>,
        #[arg(long)]
        ana_group: Option<u32>,
        #[arg(long)]
        uuid: Option<String>,
    },
    Rm {
        nqn: String,
        nsid: u32,
        #[arg(long)]
        force: bool,
    },
    /// Grow a file namespace.
    Resize {
        nqn: String,
        nsid: u32,
        size: String,
    },
    Ls {
        nqn: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
enum ListenerCmd {
    Add {
        name: String,
        addr: String,
    },
    Rm {
        name: String,
    },
    Ls,
    /// Export a subsystem on a listener.
    Attach {
        nqn: String,
        listener: String,
    },
    Detach {
        nqn: String,
        listener: String,
    },
}

#[derive(Subcommand, Debug)]
enum HostCmd {
    Allow {
        nqn: String,
        host_nqn: String,
    },
    Deny {
        nqn: String,
        host_nqn: String,
    },
    /// Allow any host: on or off.
    Any {
        nqn: String,
        on: OnOff,
    },
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum OnOff {
    On,
    Off,
}

#[derive(Subcommand, Debug)]
enum AnaCmd {
    /// STATE: optimized, non-optimized, inaccessible, persistent-loss, change.
    Set {
        listener: String,
        group: u32,
        state: String,
    },
}

#[derive(Subcommand, Debug)]
enum CtrlCmd {
    Ls { nqn: Option<String> },
    Disconnect { nqn: String, cntlid: u32 },
}

/// A failure with the exit code it maps to.
pub struct CtlError {
    pub code: i32,
    pub msg: String,
}

fn usage(msg: String) -> CtlError {
    CtlError { code: 4, msg }
}

fn from_status(s: tonic::Status) -> CtlError {
    use tonic::Code as C;
    let code = match s.code() {
        C::Unavailable => 3,
        C::InvalidArgument => 4,
        C::NotFound => 5,
        C::AlreadyExists => 6,
        C::FailedPrecondition => 7,
        C::Unauthenticated => 8,
        C::DeadlineExceeded => 9,
        _ => 1,
    };
    // The cluster's own UNAVAILABLE (no leader right now) says so itself.
    let msg = if s.code() == C::Unavailable && !s.message().contains("cluster") {
        format!("the target is not answering: {}", s.message())
    } else {
        s.message().to_string()
    };
    CtlError { code, msg }
}

async fn connect(a: &CtlArgs) -> Result<(ManagementClient<Channel>, Option<String>), CtlError> {
    let unreachable = |what: String, e: &dyn std::error::Error| {
        // tonic's transport error says only "transport error": the cause
        // (refused, permission denied) is in its sources.
        let mut msg = e.to_string();
        let mut src = e.source();
        while let Some(s) = src {
            msg = format!("{msg}: {s}");
            src = s.source();
        }
        CtlError {
            code: 3,
            msg: format!("strata serve is not running or not reachable at {what}: {msg}"),
        }
    };
    if let Some(addr) = &a.tcp_addr {
        let token = match &a.token_file {
            Some(p) => super::listen::read_token(p).map_err(|e| usage(format!("{e:#}")))?,
            None => return Err(usage("--addr needs --token-file".into())),
        };
        let ch = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| usage(format!("--addr {addr}: {e}")))?
            .connect()
            .await
            .map_err(|e| unreachable(addr.clone(), &e))?;
        return Ok((ManagementClient::new(ch), Some(token)));
    }
    let path = a
        .socket
        .clone()
        .unwrap_or_else(super::listen::default_socket);
    if !path.exists() {
        return Err(CtlError {
            code: 3,
            msg: format!(
                "strata serve is not running: no management socket at {}; fix: start it, or pass --socket",
                path.display()
            ),
        });
    }
    let p = path.clone();
    // The URI is a placeholder: the connector dials the socket.
    let ch = Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let p = p.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(p).await?,
                ))
            }
        }))
        .await
        .map_err(|e| unreachable(path.display().to_string(), &e))?;
    Ok((ManagementClient::new(ch), None))
}

fn req<T>(msg: T, token: &Option<String>) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    if let Some(Ok(v)) = token.as_ref().map(|t| format!("Bearer {t}").parse()) {
        r.metadata_mut().insert("authorization", v);
    }
    r
}

/// Runs one `strata ctl` command; prints its output.
pub fn run(a: CtlArgs) -> Result<(), CtlError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CtlError {
            code: 1,
            msg: e.to_string(),
        })?;
    rt.block_on(run_async(a))
}

fn size(s: &str) -> Result<u64, CtlError> {
    size_arg(s).map_err(usage)
}

async fn run_async(a: CtlArgs) -> Result<(), CtlError> {
    let (mut c, tok) = connect(&a).await?;
    let t = &tok;
    let json = a.json;
    let out: Value = match &a.cmd {
        CtlCmd::Status => {
            let s = c
                .status(req(pb::StatusRequest {}, t))
                .await
                .map_err(from_status)?
                .into_inner();
            let counters: Vec<Value> = s
                .counters
                .iter()
                .map(|c| {
                    json!({"nqn": c.nqn, "nsid": c.nsid, "reads": c.reads, "writes": c.writes,
                           "read_bytes": c.read_bytes, "write_bytes": c.write_bytes,
                           "flushes": c.flushes, "errors": c.errors})
                })
                .collect();
            let v = json!({
                "version": s.version, "uptime_ms": s.uptime_ms, "reactors": s.reactors,
                "subsystems": s.subsystems, "namespaces": s.namespaces,
                "controllers": s.controllers, "state_file": s.state_file,
                "counters": counters,
            });
            if !json {
                for (k, val) in v.as_object().into_iter().flatten() {
                    if k != "counters" {
                        println!(
                            "{k:<12} {}",
                            val.as_str().map(str::to_owned).unwrap_or(val.to_string())
                        );
                    }
                }
                if !s.counters.is_empty() {
                    println!();
                    let rows: Vec<Vec<String>> = s
                        .counters
                        .iter()
                        .map(|c| {
                            vec![
                                c.nqn.clone(),
                                c.nsid.to_string(),
                                c.reads.to_string(),
                                c.writes.to_string(),
                                c.read_bytes.to_string(),
                                c.write_bytes.to_string(),
                                c.flushes.to_string(),
                                c.errors.to_string(),
                            ]
                        })
                        .collect();
                    table(
                        &[
                            "NQN",
                            "NSID",
                            "READS",
                            "WRITES",
                            "READ BYTES",
                            "WRITE BYTES",
                            "FLUSHES",
                            "ERRORS",
                        ],
                        &rows,
                    );
                }
                return Ok(());
            }
            v
        }
        CtlCmd::Subsystem(cmd) => match cmd {
            SubsystemCmd::Add {
                nqn,
                serial,
                model,
                allow_any_host,
                hosts,
                listeners,
            } => {
                let s = c
                    .create_subsystem(req(
                        pb::CreateSubsystemRequest {
                            nqn: nqn.clone(),
                            serial: serial.clone().unwrap_or_default(),
                            model: model.clone().unwrap_or_default(),
                            allow_any_host: *allow_any_host,
                            hosts: hosts.clone(),
                            listeners: listeners.clone(),
                        },
                        t,
                    ))
                    .await
                    .map_err(from_status)?
                    .into_inner();
                subsystems_out(&[s], json)?
            }
            SubsystemCmd::Rm { nqn, force } => {
                c.delete_subsystem(req(
                    pb::DeleteSubsystemRequest {
                        nqn: nqn.clone(),
                        force: *force,
                    },
                    t,
                ))
                .await
                .map_err(from_status)?;
                done(json, format!("subsystem {nqn} removed"))?
            }
            SubsystemCmd::Ls { nqn } => {
                let ss = match nqn {
                    Some(n) => vec![
                        c.get_subsystem(req(pb::GetSubsystemRequest { nqn: n.clone() }, t))
                            .await
                            .map_err(from_status)?
                            .into_inner(),
                    ],
                    None => {
                        c.list_subsystems(req(pb::ListSubsystemsRequest {}, t))
                            .await
                            .map_err(from_status)?
                            .into_inner()
                            .subsystems
                    }
                };
                subsystems_out(&ss, json)?
            }
        },
        CtlCmd::Ns(cmd) => match cmd {
            NsCmd::Add {
                nqn,
                nsid,
                ram,
                file,
                objbacker,
                buckets,
                size: sz,
                object_size,
                store_options,
                auto_format,
                writeback,
                readahead,
                block_size,
                ana_group,
                uuid,
            } => {
                use pb::add_namespace_request::Backing;
                let backing = if let Some(r) = ram {
                    Backing::Ram(pb::RamBacking { size: size(r)? })
                } else if let Some(f) = file {
                    Backing::File(pb::FileBacking {
                        path: f.clone(),
                        size: sz.as_deref().map(size).transpose()?.unwrap_or(0),
                    })
                } else if *objbacker {
                    let mut opts = HashMap::new();
                    for kv in store_options {
                        let (k, v) = kv.split_once('=').ok_or_else(|| {
                            usage(format!("--store-option `{kv}`: write it as KEY=VALUE"))
                        })?;
                        opts.insert(k.to_string(), v.to_string());
                    }
                    Backing::Objbacker(pb::ObjBackerBacking {
                        buckets: buckets.clone(),
                        size: size(
                            sz.as_deref()
                                .ok_or_else(|| usage("--objbacker needs --size".into()))?,
                        )?,
                        object_size: object_size.as_deref().map(size).transpose()?.unwrap_or(0),
                        store_options: opts,
                        auto_format: *auto_format,
                        writeback_bytes: writeback.as_deref().map(size).transpose()?.unwrap_or(0),
                        readahead_bytes: readahead.as_deref().map(size).transpose()?,
                    })
                } else {
                    return Err(usage(
                        "ns add needs one of --ram SIZE, --file PATH or --objbacker --bucket URL --size SIZE".into(),
                    ));
                };
                let n = c
                    .add_namespace(req(
                        pb::AddNamespaceRequest {
                            nqn: nqn.clone(),
                            nsid: *nsid,
                            backing: Some(backing),
                            block_size: block_size.unwrap_or(0),
                            ana_group: ana_group.unwrap_or(0),
                            uuid: uuid.clone().unwrap_or_default(),
                        },
                        t,
                    ))
                    .await
                    .map_err(from_status)?
                    .into_inner();
                namespaces_out(&[n], json)?
            }
            NsCmd::Rm { nqn, nsid, force } => {
                c.remove_namespace(req(
                    pb::RemoveNamespaceRequest {
                        nqn: nqn.clone(),
                        nsid: *nsid,
                        force: *force,
                    },
                    t,
                ))
                .await
                .map_err(from_status)?;
                done(json, format!("namespace {nqn}/{nsid} removed"))?
            }
            NsCmd::Resize { nqn, nsid, size: s } => {
                let n = c
                    .resize_namespace(req(
                        pb::ResizeNamespaceRequest {
                            nqn: nqn.clone(),
                            nsid: *nsid,
                            size: size(s)?,
                        },
                        t,
                    ))
                    .await
                    .map_err(from_status)?
                    .into_inner();
                namespaces_out(&[n], json)?
            }
            NsCmd::Ls { nqn } => {
                let ns = c
                    .list_namespaces(req(
                        pb::ListNamespacesRequest {
                            nqn: nqn.clone().unwrap_or_default(),
                        },
                        t,
                    ))
                    .await
                    .map_err(from_status)?
                    .into_inner()
                    .namespaces;
                namespaces_out(&ns, json)?
            }
        },
        CtlCmd::Listener(cmd) => match cmd {
            ListenerCmd::Add { name, addr } => {
                let l = c
                    .add_listener(req(
                        pb::AddListenerRequest {
                            name: name.clone(),
                            addr: addr.clone(),
                        },
                        t,
                    ))
                    .await
                    .map_err(from_status)?
                    .into_inner();
                listeners_out(&[l], json)?
            }
            ListenerCmd::Rm { name } => {
                c.remove_listener(req(pb::RemoveListenerRequest { name: name.clone() }, t))
                    .await
                    .map_err(from_status)?;
                done(json, format!("listener {name} removed"))?
            }
            ListenerCmd::Ls => {
                let ls = c
                    .list_listeners(req(pb::ListListenersRequest {}, t))
                    .await
                    .map_err(from_status)?
                    .into_inner()
                    .listeners;
                listeners_out(&ls, json)?
            }
            ListenerCmd::Attach { nqn, listener } | ListenerCmd::Detach { nqn, listener } => {
                let r = pb::AttachListenerRequest {
                    nqn: nqn.clone(),
                    listener: listener.clone(),
                };
                let s = if matches!(cmd, ListenerCmd::Attach { .. }) {
                    c.attach_listener(req(r, t)).await
                } else {
                    c.detach_listener(req(r, t)).await
                }
                .map_err(from_status)?
                .into_inner();
                subsystems_out(&[s], json)?
            }
        },
        CtlCmd::Host(cmd) => {
            let s = match cmd {
                HostCmd::Allow { nqn, host_nqn } => {
                    c.allow_host(req(
                        pb::HostRequest {
                            nqn: nqn.clone(),
                            host_nqn: host_nqn.clone(),
                        },
                        t,
                    ))
                    .await
                }
                HostCmd::Deny { nqn, host_nqn } => {
                    c.deny_host(req(
                        pb::HostRequest {
                            nqn: nqn.clone(),
                            host_nqn: host_nqn.clone(),
                        },
                        t,
                    ))
                    .await
                }
                HostCmd::Any { nqn, on } => {
                    c.set_allow_any_host(req(
                        pb::SetAllowAnyHostRequest {
                            nqn: nqn.clone(),
                            allow_any_host: matches!(on, OnOff::On),
                        },
                        t,
                    ))
                    .await
                }
            }
            .map_err(from_status)?
            .into_inner();
            subsystems_out(&[s], json)?
        }
        CtlCmd::Ana(AnaCmd::Set {
            listener,
            group,
            state,
        }) => {
            let st = ana_from_name(state).ok_or_else(|| {
                usage(format!(
                    "state: `{state}` is not an ANA state; fix: use optimized, non-optimized, inaccessible, persistent-loss or change"
                ))
            })?;
            let l = c
                .set_ana_state(req(
                    pb::SetAnaStateRequest {
                        listener: listener.clone(),
                        group: *group,
                        state: st as i32,
                    },
                    t,
                ))
                .await
                .map_err(from_status)?
                .into_inner();
            listeners_out(&[l], json)?
        }
        CtlCmd::Ctrl(CtrlCmd::Ls { nqn }) => {
            let cs = c
                .list_controllers(req(
                    pb::ListControllersRequest {
                        nqn: nqn.clone().unwrap_or_default(),
                    },
                    t,
                ))
                .await
                .map_err(from_status)?
                .into_inner()
                .controllers;
            let rows: Vec<Vec<String>> = cs
                .iter()
                .map(|c| {
                    vec![
                        c.nqn.clone(),
                        c.cntlid.to_string(),
                        c.host_nqn.clone(),
                        c.host_addr.clone(),
                        c.listener.clone(),
                        c.io_queues.to_string(),
                        c.kato_ms.to_string(),
                    ]
                })
                .collect();
            if !json {
                table(
                    &[
                        "NQN",
                        "CNTLID",
                        "HOST NQN",
                        "HOST ADDR",
                        "LISTENER",
                        "IO QUEUES",
                        "KATO MS",
                    ],
                    &rows,
                );
                return Ok(());
            }
            Value::Array(
                cs.iter()
                    .map(|c| {
                        json!({"nqn": c.nqn, "cntlid": c.cntlid, "host_nqn": c.host_nqn,
                               "host_addr": c.host_addr, "listener": c.listener,
                               "io_queues": c.io_queues, "kato_ms": c.kato_ms})
                    })
                    .collect(),
            )
        }
        CtlCmd::Ctrl(CtrlCmd::Disconnect { nqn, cntlid }) => {
            c.disconnect_controller(req(
                pb::DisconnectControllerRequest {
                    nqn: nqn.clone(),
                    cntlid: *cntlid,
                },
                t,
            ))
            .await
            .map_err(from_status)?;
            done(json, format!("controller {cntlid} of {nqn} disconnected"))?
        }
        CtlCmd::Cluster(ClusterCmd::Leave) => {
            c.cluster_leave(req(pb::ClusterLeaveRequest {}, t))
                .await
                .map_err(from_status)?;
            done(json, "left the cluster".into())?
        }
        CtlCmd::Cluster(cmd) => {
            let reply = match cmd {
                ClusterCmd::Init { name } => c
                    .cluster_init(req(
                        pb::ClusterInitRequest {
                            name: name.clone().unwrap_or_default(),
                        },
                        t,
                    ))
                    .await
                    .map_err(from_status)?
                    .into_inner(),
                ClusterCmd::Join { member, name } => c
                    .cluster_join(req(
                        pb::ClusterJoinRequest {
                            member_addr: member.clone(),
                            name: name.clone().unwrap_or_default(),
                        },
                        t,
                    ))
                    .await
                    .map_err(from_status)?
                    .into_inner(),
                // Leave is answered above.
                ClusterCmd::Status | ClusterCmd::Leave => c
                    .cluster_status(req(pb::ClusterStatusRequest {}, t))
                    .await
                    .map_err(from_status)?
                    .into_inner(),
            };
            cluster_out(&reply, json)?
        }
        CtlCmd::SaveConfig { output } => {
            let text = c
                .save_config(req(pb::SaveConfigRequest {}, t))
                .await
                .map_err(from_status)?
                .into_inner()
                .toml;
            match output {
                Some(p) => {
                    let dir = p
                        .parent()
                        .filter(|d| !d.as_os_str().is_empty())
                        .unwrap_or(std::path::Path::new("."));
                    let name = p
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    crate::state::write_atomic(dir, &name, text.as_bytes()).map_err(|e| {
                        CtlError {
                            code: 1,
                            msg: format!("{e:#}"),
                        }
                    })?;
                    done(json, format!("written to {}", p.display()))?
                }
                None => {
                    print!("{text}");
                    return Ok(());
                }
            }
        }
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
    }
    Ok(())
}

fn cluster_out(s: &pb::ClusterStatusReply, json: bool) -> Result<Value, CtlError> {
    let members: Vec<Value> = s
        .members
        .iter()
        .map(|m| {
            json!({"id": m.id, "name": m.name, "raft_addr": m.raft_addr, "role": m.role,
                   "voter": m.voter, "reachable": m.reachable, "up": m.up,
                   "listeners": m.listeners})
        })
        .collect();
    let groups: Vec<Value> = s
        .groups
        .iter()
        .map(|g| json!({"id": g.id, "owner": (g.owner != 0).then_some(g.owner), "epoch": g.epoch}))
        .collect();
    let v = json!({
        "id": s.id, "role": s.role, "leader": (s.leader != 0).then_some(s.leader),
        "leader_addr": s.leader_addr, "term": s.term, "commit": s.commit,
        "applied": s.applied, "witness": s.witness, "refused_calls": s.refused_calls,
        "dropped_messages": s.dropped_messages, "members": members, "groups": groups,
    });
    if json {
        return Ok(v);
    }
    let leader = if s.leader == 0 {
        "(none)".to_string()
    } else {
        format!("{} ({})", s.leader, s.leader_addr)
    };
    println!("node     {} ({})", s.id, s.role);
    println!("leader   {leader}");
    println!("term     {}", s.term);
    println!("commit   {}", s.commit);
    println!("applied  {}", s.applied);
    println!();
    let rows: Vec<Vec<String>> = s
        .members
        .iter()
        .map(|m| {
            vec![
                m.id.to_string(),
                m.name.clone(),
                m.raft_addr.clone(),
                m.role.clone(),
                if m.voter { "yes" } else { "no" }.into(),
                if m.reachable { "yes" } else { "no" }.into(),
            ]
        })
        .collect();
    table(
        &["ID", "NAME", "CLUSTER ADDR", "ROLE", "VOTER", "REACHABLE"],
        &rows,
    );
    if !s.groups.is_empty() {
        println!();
        let rows: Vec<Vec<String>> = s
            .groups
            .iter()
            .map(|g| {
                vec![
                    g.id.to_string(),
                    if g.owner == 0 {
                        "-".into()
                    } else {
                        g.owner.to_string()
                    },
                    g.epoch.to_string(),
                ]
            })
            .collect();
        table(&["ANA GROUP", "OWNER", "EPOCH"], &rows);
    }
    Ok(Value::Null)
}

/// `Null` for JSON (nothing more to say), or the line for humans.
fn done(json: bool, line: String) -> Result<Value, CtlError> {
    if json {
        Ok(json!({ "ok": true }))
    } else {
        println!("{line}");
        Ok(Value::Null)
    }
}

fn table(head: &[&str], rows: &[Vec<String>]) {
    let mut w: Vec<usize> = head.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let s: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<width$}", width = w[i]))
            .collect();
        println!("{}", s.join("  ").trim_end());
    };
    line(head.to_vec());
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
}

fn backing_text(n: &pb::Namespace) -> String {
    use pb::namespace::Backing;
    match &n.backing {
        Some(Backing::Ram(_)) => "ram".into(),
        Some(Backing::File(f)) => format!("file:{}", f.path),
        Some(Backing::Objbacker(o)) => format!("objbacker:{}", o.buckets.join(",")),
        None => "-".into(),
    }
}

fn namespace_json(n: &pb::Namespace) -> Value {
    use pb::namespace::Backing;
    let backing = match &n.backing {
        Some(Backing::Ram(_)) => json!({"type": "ram"}),
        Some(Backing::File(f)) => json!({"type": "file", "path": f.path}),
        Some(Backing::Objbacker(o)) => json!({"type": "objbacker", "buckets": o.buckets,
            "object_size": o.object_size}),
        None => Value::Null,
    };
    json!({"nqn": n.nqn, "nsid": n.nsid, "size": n.size_bytes, "block_size": n.block_size,
           "backing": backing, "uuid": n.uuid, "nguid": n.uuid.replace('-', ""),
           "ana_group": n.ana_group})
}

fn namespaces_out(ns: &[pb::Namespace], json: bool) -> Result<Value, CtlError> {
    if json {
        return Ok(Value::Array(ns.iter().map(namespace_json).collect()));
    }
    let rows: Vec<Vec<String>> = ns
        .iter()
        .map(|n| {
            vec![
                n.nqn.clone(),
                n.nsid.to_string(),
                n.size_bytes.to_string(),
                n.block_size.to_string(),
                backing_text(n),
                n.ana_group.to_string(),
                n.uuid.clone(),
            ]
        })
        .collect();
    table(
        &[
            "NQN",
            "NSID",
            "SIZE",
            "BLOCK",
            "BACKING",
            "ANA GROUP",
            "UUID",
        ],
        &rows,
    );
    Ok(Value::Null)
}

fn subsystems_out(ss: &[pb::Subsystem], json: bool) -> Result<Value, CtlError> {
    if json {
        return Ok(Value::Array(
            ss.iter()
                .map(|s| {
                    json!({"nqn": s.nqn, "serial": s.serial, "model": s.model,
                           "allow_any_host": s.allow_any_host, "hosts": s.hosts,
                           "listeners": s.listeners,
                           "namespaces": s.namespaces.iter().map(namespace_json).collect::<Vec<_>>()})
                })
                .collect(),
        ));
    }
    let rows: Vec<Vec<String>> = ss
        .iter()
        .map(|s| {
            vec![
                s.nqn.clone(),
                s.namespaces.len().to_string(),
                if s.allow_any_host {
                    "any".into()
                } else {
                    s.hosts.join(",")
                },
                s.listeners.join(","),
                s.serial.clone(),
            ]
        })
        .collect();
    table(
        &["NQN", "NAMESPACES", "HOSTS", "LISTENERS", "SERIAL"],
        &rows,
    );
    Ok(Value::Null)
}

fn listeners_out(ls: &[pb::Listener], json: bool) -> Result<Value, CtlError> {
    let ana = |l: &pb::Listener| -> Vec<(u32, String)> {
        l.ana
            .iter()
            .map(|a| {
                let st = pb::AnaState::try_from(a.state)
                    .ok()
                    .and_then(super::convert::ana_name)
                    .unwrap_or("?");
                (a.group, st.to_string())
            })
            .collect()
    };
    if json {
        return Ok(Value::Array(
            ls.iter()
                .map(|l| {
                    let a: serde_json::Map<String, Value> = ana(l)
                        .into_iter()
                        .map(|(g, s)| (g.to_string(), Value::String(s)))
                        .collect();
                    json!({"name": l.name, "addr": l.addr, "bound_addr": l.bound_addr,
                           "ana": a, "subsystems": l.subsystems})
                })
                .collect(),
        ));
    }
    let rows: Vec<Vec<String>> = ls
        .iter()
        .map(|l| {
            vec![
                l.name.clone(),
                l.addr.clone(),
                l.bound_addr.clone(),
                ana(l)
                    .iter()
                    .map(|(g, s)| format!("{g}={s}"))
                    .collect::<Vec<_>>()
                    .join(","),
                l.subsystems.join(","),
            ]
        })
        .collect();
    table(&["NAME", "ADDR", "BOUND", "ANA", "SUBSYSTEMS"], &rows);
    Ok(Value::Null)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        ctl: CtlArgs,
    }

    #[test]
    fn listener_add_address_is_not_the_global_addr() {
        let c = Cli::try_parse_from(["ctl", "listener", "add", "l2", "127.0.0.1:4421"]).unwrap();
        assert_eq!(c.ctl.tcp_addr, None);
        match c.ctl.cmd {
            CtlCmd::Listener(ListenerCmd::Add { name, addr }) => {
                assert_eq!((name.as_str(), addr.as_str()), ("l2", "127.0.0.1:4421"));
            }
            other => panic!("{other:?}"),
        }
        let c = Cli::try_parse_from([
            "ctl",
            "--addr",
            "127.0.0.1:9",
            "--token-file",
            "t",
            "listener",
            "add",
            "l2",
            "127.0.0.1:4421",
        ])
        .unwrap();
        assert_eq!(c.ctl.tcp_addr.as_deref(), Some("127.0.0.1:9"));
    }
}
