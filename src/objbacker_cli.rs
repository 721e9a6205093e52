//! `strata objbacker format | info | fsck`: manage an object-backed device
//! directly in its buckets, with the target not running.

use anyhow::{Result, bail};
use clap::{Args, Subcommand};
use strata_objbacker::{FormatOptions, ObjBackerConfig};

use crate::config::parse_size;

#[derive(Args, Debug)]
pub struct ObjBackerArgs {
    #[command(subcommand)]
    cmd: ObjCmd,
}

#[derive(Subcommand, Debug)]
enum ObjCmd {
    /// Write a new superblock into every bucket.
    Format {
        #[command(flatten)]
        dev: DevArgs,
        /// Device size, e.g. 100GiB.
        #[arg(long)]
        size: String,
        /// Object size, a power of two from 128KiB to 16MiB.
        #[arg(long, default_value = "1MiB")]
        object_size: String,
        /// Logical block size (512 or 4096).
        #[arg(long, default_value_t = 4096)]
        block_size: u32,
        /// Format over an existing device or foreign data (deletes it).
        #[arg(long)]
        force: bool,
    },
    /// Print the superblock and per-bucket usage.
    Info {
        #[command(flatten)]
        dev: DevArgs,
    },
    /// Check the superblock and flag objects beyond the device and stray keys.
    Fsck {
        #[command(flatten)]
        dev: DevArgs,
    },
}

#[derive(Args, Debug)]
struct DevArgs {
    /// Bucket URL (s3://, gs://, az://, file:///); repeat for striping, in order.
    #[arg(long = "bucket", required = true)]
    buckets: Vec<String>,
    /// object_store option KEY=VALUE (e.g. aws_endpoint=http://127.0.0.1:9000, allow_http=true).
    #[arg(short = 'o', long = "option")]
    options: Vec<String>,
}

fn base(dev: &DevArgs) -> Result<ObjBackerConfig> {
    let mut store_options = Vec::new();
    for o in &dev.options {
        let Some((k, v)) = o.split_once('=') else {
            bail!("--option `{o}`: write it as KEY=VALUE");
        };
        store_options.push((k.to_string(), v.to_string()));
    }
    Ok(ObjBackerConfig {
        name: "cli".into(),
        buckets: dev.buckets.clone(),
        store_options,
        ..ObjBackerConfig::default()
    })
}

pub fn run(args: ObjBackerArgs) -> Result<()> {
    strata_objbacker::install_crypto_provider();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    match args.cmd {
        ObjCmd::Format {
            dev,
            size,
            object_size,
            block_size,
            force,
        } => {
            let size = parse_size(&size).ok_or_else(|| {
                anyhow::anyhow!("--size `{size}` is not a size; write it like 100GiB")
            })?;
            let object_size = parse_size(&object_size).ok_or_else(|| {
                anyhow::anyhow!("--object-size `{object_size}` is not a size; write it like 1MiB")
            })?;
            for url in &dev.buckets {
                if let Some(dir) = url.strip_prefix("file://") {
                    std::fs::create_dir_all(dir)?;
                }
            }
            let cfg = ObjBackerConfig {
                size_bytes: size,
                object_size,
                block_size,
                ..base(&dev)?
            };
            let sb = rt.block_on(strata_objbacker::format(&cfg, FormatOptions { force }))?;
            println!("formatted: {sb:#?}");
        }
        ObjCmd::Info { dev } => {
            let info = rt.block_on(strata_objbacker::info(&base(&dev)?))?;
            println!("{:#?}", info.superblock);
            for b in &info.buckets {
                println!("{b:?}");
            }
        }
        ObjCmd::Fsck { dev } => {
            let r = rt.block_on(strata_objbacker::fsck(&base(&dev)?))?;
            println!(
                "data objects: {}, data bytes: {}",
                r.data_objects, r.data_bytes
            );
            for p in &r.problems {
                println!("problem: {p:?}");
            }
            if !r.problems.is_empty() {
                bail!("fsck found {} problem(s)", r.problems.len());
            }
            println!("clean");
        }
    }
    Ok(())
}
