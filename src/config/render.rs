//! A [`ServeConfig`] written back out as the TOML the parser reads: the
//! state file of `strata serve`, `strata ctl save-config`, and the form a
//! management change is validated in (render, edit, parse again, so an
//! API change meets exactly the checks a config file does).
//!
//! Every field is written explicitly (serial, model, UUID, listener list),
//! so a file rendered by one version parses to the same configuration in
//! the next even if a default changes.

use super::{
    BackingSpec, ConfigError, LimitsSpec, NamespaceSpec, RawConfig, RawLimits, RawListener,
    RawMetrics, RawNamespace, RawSize, RawSubsystem, RawTarget, ServeConfig, SubsystemSpec,
};

/// The 8-4-4-4-12 form `uuid = "…"` takes.
pub fn format_uuid(u: &[u8; 16]) -> String {
    let h: String = u.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

impl ServeConfig {
    pub(crate) fn to_raw(&self) -> RawConfig {
        RawConfig {
            target: RawTarget {
                reactors: self.reactors,
                discovery: self.discovery.map(|d| d.to_string()),
            },
            listener: self
                .listeners
                .iter()
                .map(|l| RawListener {
                    name: l.name.clone(),
                    addr: l.addr.to_string(),
                    ana: l
                        .ana
                        .iter()
                        .map(|(g, st)| (g.to_string(), st.name().to_string()))
                        .collect(),
                })
                .collect(),
            subsystem: self
                .subsystems
                .iter()
                .map(|s| self.raw_subsystem(s))
                .collect(),
            limits: raw_limits(&self.limits),
            metrics: RawMetrics {
                addr: self.metrics_addr.map(|a| a.to_string()),
            },
        }
    }

    fn raw_subsystem(&self, s: &SubsystemSpec) -> RawSubsystem {
        RawSubsystem {
            nqn: s.nqn.clone(),
            serial: Some(s.serial.clone()),
            model: Some(s.model.clone()),
            allow_any_host: Some(s.allow_any_host),
            hosts: s.hosts.clone(),
            listeners: Some(
                s.listeners
                    .iter()
                    .map(|&i| self.listeners[i].name.clone())
                    .collect(),
            ),
            namespace: s.namespaces.iter().map(raw_namespace).collect(),
        }
    }

    /// The configuration as TOML text that [`ServeConfig::parse`] reads
    /// back to an equal configuration (but for `source`).
    pub fn to_toml(&self) -> String {
        render_raw(&self.to_raw())
    }

    /// Parses `raw` as if it had been read from `file`: the checks of a
    /// config file, with its field names.
    pub(crate) fn from_raw(raw: &RawConfig, file: &str) -> Result<Self, ConfigError> {
        Self::parse(&render_raw(raw), file)
    }
}

pub(crate) fn render_raw(raw: &RawConfig) -> String {
    // Serializing plain data (strings, integers, maps with string keys)
    // cannot fail.
    toml::to_string(raw).expect("a RawConfig always serializes")
}

fn raw_namespace(n: &NamespaceSpec) -> RawNamespace {
    let mut r = RawNamespace::new(n.nsid, "");
    r.block_size = Some(n.block_size);
    r.ana_group = Some(n.ana_group);
    r.uuid = Some(format_uuid(&n.uuid));
    match &n.backing {
        BackingSpec::Ram { size } => {
            r.kind = "ram".into();
            r.size = Some(size.to_string());
        }
        BackingSpec::File { path, size } => {
            r.kind = "file".into();
            r.path = Some(path.display().to_string());
            r.size = size.map(|s| s.to_string());
        }
        BackingSpec::ObjBacker {
            buckets,
            size,
            object_size,
            store_options,
            auto_format,
            max_in_flight,
            writeback_bytes,
            readahead_bytes,
            inject,
            request_timeout_ms,
            retry_budget_ms,
        } => {
            r.kind = "objbacker".into();
            r.size = Some(size.to_string());
            r.buckets = Some(buckets.clone());
            r.object_size = Some(object_size.to_string());
            r.store_options = store_options.iter().cloned().collect();
            r.auto_format = Some(*auto_format);
            r.max_in_flight = *max_in_flight;
            r.writeback = writeback_bytes.map(|w| w.to_string());
            r.readahead = readahead_bytes.map(|w| w.to_string());
            if let Some((lat_us, err_ppm, to_ppm)) = inject {
                r.inject_latency_ms = Some(*lat_us as f64 / 1000.0);
                r.inject_error_rate = Some(f64::from(*err_ppm) / 1e6);
                r.inject_timeout_rate = Some(f64::from(*to_ppm) / 1e6);
            }
            r.request_timeout_ms = *request_timeout_ms;
            r.retry_budget_ms = *retry_budget_ms;
        }
    }
    r
}

fn raw_limits(l: &LimitsSpec) -> RawLimits {
    let size = |v: usize| Some(RawSize::Bytes(v as u64));
    RawLimits {
        max_connections: Some(l.max_connections),
        max_connections_per_listener: Some(l.max_connections_per_listener),
        max_pending_output: size(l.max_pending_output),
        max_r2t_bytes: size(l.max_r2t_bytes),
        data_phase_timeout_ms: Some(l.data_phase_timeout_ms),
        tx_stall_timeout_ms: Some(l.tx_stall_timeout_ms),
        connect_timeout_ms: Some(l.connect_timeout_ms),
        pool_retain: size(l.pool_retain),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = r#"
[target]
reactors = 3
discovery = "127.0.0.1:8009"

[[listener]]
name = "a"
addr = "127.0.0.1:4420"
ana = { "2" = "non-optimized", "3" = "inaccessible" }

[[listener]]
name = "b"
addr = "[::1]:4421"

[[subsystem]]
nqn = "nqn.2026-12.dev.strata:one"
hosts = ["nqn.2014-08.org.nvmexpress:uuid:1"]
listeners = ["b"]

[[subsystem.namespace]]
nsid = 1
type = "ram"
size = "64MiB"
block_size = 4096
ana_group = 2

[[subsystem.namespace]]
nsid = 7
type = "file"
path = "/var/lib/strata/ns7.img"

[[subsystem]]
nqn = "nqn.2026-12.dev.strata:two"
serial = "S2"
model = "M2"
allow_any_host = true

[[subsystem.namespace]]
nsid = 2
type = "objbacker"
size = "1GiB"
buckets = ["s3://b0/p", "s3://b1/p"]
object_size = "4MiB"
store_options = { endpoint = "http://127.0.0.1:9000", region = "us-east-1" }
auto_format = true
max_in_flight = 12
writeback = "32MiB"
readahead = "8MiB"
inject_latency_ms = 1.234
inject_error_rate = 0.001
request_timeout_ms = 5000
retry_budget_ms = 60000
uuid = "0123abcd-0000-4000-8000-00000000beef"

[limits]
max_connections = 77
max_pending_output = "16MiB"

[metrics]
addr = "127.0.0.1:9464"
"#;

    #[test]
    fn render_then_parse_is_the_identity() {
        let a = ServeConfig::parse(FULL, "full.toml").unwrap();
        let text = a.to_toml();
        let b = ServeConfig::parse(&text, "full.toml")
            .unwrap_or_else(|e| panic!("rendered config does not parse: {e}\n{text}"));
        assert_eq!(a, b, "rendered:\n{text}");
        // And it is a fixed point: rendering again changes nothing.
        assert_eq!(text, b.to_toml());
    }

    #[test]
    fn embedded_default_round_trips() {
        let a = ServeConfig::embedded_default();
        let b = ServeConfig::parse(&a.to_toml(), &a.source).unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn uuid_text_form() {
        let mut u = [0u8; 16];
        u[0] = 0xab;
        u[15] = 0x01;
        assert_eq!(format_uuid(&u), "ab000000-0000-0000-0000-000000000001");
    }
}
