//! The cluster through `strata ctl cluster` against real `strata serve`
//! processes on 127.0.0.1: two storage nodes and a witness form a cluster
//! (one `init`, two `join`s, one of them through a follower), agree on the
//! leader, survive a kill -9 of the leader, take the killed node back from
//! its disk, refuse a peer with the wrong token, and shrink with `leave`
//! down to the last storage node, which may not leave.
//!
//! Every wait is bounded and fails with what it last saw.

mod support;

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use support::ctl::{ctl, json, ok, refused};
use support::{Server, free_port, guard_command, wait_until};

const NQN: &str = "nqn.2026-12.dev.strata:cluster";
/// Elections take 1–2 s at the driver's 100 ms tick; this leaves room for
/// a loaded CI machine without hiding a cluster that never converges.
const CONVERGE: Duration = Duration::from_secs(30);

struct Member {
    dir: PathBuf,
    cluster_port: u16,
    witness: bool,
    token: PathBuf,
    server: Option<Server>,
}

fn token_file(dir: &Path, name: &str, token: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, token).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p
}

impl Member {
    fn new(root: &Path, name: &str, witness: bool, token: &Path) -> Member {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        Member {
            dir,
            cluster_port: free_port(),
            witness,
            token: token.to_path_buf(),
            server: None,
        }
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.cluster_port)
    }

    /// Starts (or restarts, on the same directories and ports) its
    /// `strata serve`; waits until it has started.
    fn start(&mut self) {
        let (port, discovery) = (free_port(), free_port());
        let config = self.dir.join("strata.toml");
        std::fs::write(
            &config,
            format!(
                "[target]\ndiscovery = \"127.0.0.1:{discovery}\"\n\n[[listener]]\nname = \"default\"\naddr = \"127.0.0.1:{port}\"\n\n[[subsystem]]\nnqn = \"{NQN}\"\nallow_any_host = true\n"
            ),
        )
        .unwrap();
        let log = self.dir.join(format!("serve-{port}.log"));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_strata"));
        cmd.arg("serve")
            .arg("--config")
            .arg(&config)
            .arg("--cluster-addr")
            .arg(self.addr())
            .arg("--cluster-token-file")
            .arg(&self.token)
            .env("STRATA_LOG", "info,strata_cluster=debug")
            .env("STRATA_DATA_DIR", self.dir.join("data"))
            .env("STRATA_STATE_DIR", self.dir.join("state"))
            .env("STRATA_RUNTIME_DIR", self.dir.join("run"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        if self.witness {
            cmd.arg("--witness");
        }
        let child = guard_command(&mut cmd).spawn().expect("spawn strata serve");
        let s = Server {
            child,
            port,
            discovery_port: discovery,
            log,
        };
        assert!(
            s.wait_log("strata serve started", Duration::from_secs(20)),
            "{} did not start:\n{}",
            self.dir.display(),
            s.log_text()
        );
        self.server = Some(s);
    }

    fn kill9(&mut self) {
        if let Some(mut s) = self.server.take() {
            s.kill9();
        }
    }

    fn status(&self) -> Value {
        json(&self.dir, &["cluster", "status"])
    }

    /// `cluster status`, or `None` while the node cannot answer it.
    fn try_status(&self) -> Option<Value> {
        let o = ctl(&self.dir, &["--json", "cluster", "status"]);
        o.status
            .success()
            .then(|| serde_json::from_slice(&o.stdout).ok())
            .flatten()
    }
}

fn member_ids(s: &Value) -> Vec<u64> {
    s["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_u64().unwrap())
        .collect()
}

/// Waits until every node in `nodes` answers with the members `ids`, all
/// voters, and one leader among `ids` that they all name; that leader.
fn converged(nodes: &[&Member], ids: &[u64]) -> u64 {
    let mut last = Vec::new();
    let agreed = wait_until(CONVERGE, || {
        last = nodes.iter().map(|n| n.try_status()).collect();
        let Some(all) = last.iter().cloned().collect::<Option<Vec<Value>>>() else {
            return false;
        };
        let leaders: Vec<Option<u64>> = all.iter().map(|s| s["leader"].as_u64()).collect();
        all.iter().all(|s| {
            member_ids(s) == ids
                && s["members"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .all(|m| m["voter"] == true)
        }) && leaders[0].is_some_and(|l| ids.contains(&l))
            && leaders.iter().all(|l| *l == leaders[0])
    });
    assert!(
        agreed,
        "no agreement on members {ids:?} and one leader within {CONVERGE:?}; last statuses: {last:#?}"
    );
    last[0].as_ref().unwrap()["leader"].as_u64().unwrap()
}

#[test]
fn members_join_fail_over_rejoin_and_leave() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let token = token_file(root, "cluster.token", "0123456789abcdef-cluster-token");
    let mut a = Member::new(root, "a", false, &token);
    let mut b = Member::new(root, "b", false, &token);
    let mut w = Member::new(root, "w", true, &token);
    for m in [&mut a, &mut b, &mut w] {
        m.start();
    }

    // Before init: nothing to show, and the error says what to do.
    let e = refused(&a.dir, &["cluster", "status"], 7);
    assert!(e.contains("cluster init"), "{e}");

    let s = json(&a.dir, &["cluster", "init", "--name", "a"]);
    assert_eq!(s["id"], 1, "{s}");
    assert_eq!(s["leader"], 1, "{s}");
    let e = refused(&a.dir, &["cluster", "init"], 6);
    assert!(e.contains("already node 1"), "{e}");

    let s = json(&b.dir, &["cluster", "join", &a.addr(), "--name", "b"]);
    assert_eq!(s["id"], 2, "{s}");
    // Through a follower: node 2 forwards the join to the leader.
    let s = json(&w.dir, &["cluster", "join", &b.addr(), "--name", "w"]);
    assert_eq!(s["id"], 3, "{s}");
    let leader = converged(&[&a, &b, &w], &[1, 2, 3]);
    let s = a.status();
    let roles: Vec<&str> = s["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["role"].as_str().unwrap())
        .collect();
    assert_eq!(roles, ["storage", "storage", "witness"], "{s}");
    let text = ok(&b.dir, &["cluster", "status"]);
    assert!(
        text.contains("REACHABLE") && text.contains(&w.addr()),
        "{text}"
    );

    // The witness serves no namespaces; a storage node does.
    let e = refused(&w.dir, &["ns", "add", NQN, "--ram", "16MiB"], 7);
    assert!(e.contains("witness"), "{e}");
    ok(&a.dir, &["ns", "add", NQN, "--ram", "16MiB"]);

    // kill -9 the leader: the two others elect a new one.
    let mut nodes = [a, b, w];
    let li = (leader - 1) as usize;
    let before = nodes[li].status();
    let term_before = before["term"].as_u64().unwrap();
    let applied_before = before["applied"].as_u64().unwrap();
    nodes[li].kill9();
    let killed_at = std::time::Instant::now();
    let survivors: Vec<usize> = (0..3).filter(|&i| i != li).collect();
    let mut last = Vec::new();
    let elected = wait_until(CONVERGE, || {
        last = survivors.iter().map(|&i| nodes[i].try_status()).collect();
        let leaders: Vec<Option<u64>> = last
            .iter()
            .map(|s| s.as_ref().and_then(|s| s["leader"].as_u64()))
            .collect();
        leaders[0].is_some_and(|l| l != leader) && leaders.iter().all(|l| *l == leaders[0])
    });
    assert!(
        elected,
        "the survivors did not agree on a new leader within {CONVERGE:?}: {last:#?}"
    );
    let s = last[0].as_ref().unwrap();
    eprintln!(
        "leader {leader} killed; node {} elected (term {term_before} → {}) after {:?}",
        s["leader"],
        s["term"],
        killed_at.elapsed()
    );
    assert!(s["term"].as_u64().unwrap() > term_before, "{s}");
    let row = |s: &Value, id: u64| -> Value {
        s["members"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["id"] == id)
            .cloned()
            .unwrap()
    };
    let other = survivors[0];
    let seen_down = wait_until(CONVERGE, || {
        nodes[other]
            .try_status()
            .is_some_and(|s| row(&s, leader)["reachable"] == false)
    });
    assert!(seen_down, "the killed node still shows reachable");

    // Restart it: same id, from its disk, and it catches up.
    nodes[li].start();
    let mut seen = (Value::Null, Value::Null);
    let caught_up = wait_until(CONVERGE, || {
        let (Some(mine), Some(theirs)) = (nodes[li].try_status(), nodes[other].try_status()) else {
            return false;
        };
        // Beyond what it had: at least the new leader's first entry.
        let done = mine["id"] == leader
            && mine["applied"].as_u64() > Some(applied_before)
            && mine["applied"].as_u64() >= theirs["applied"].as_u64()
            && mine["leader"].as_u64().is_some();
        seen = (mine, theirs);
        done
    });
    assert!(
        caught_up,
        "the restarted node did not catch up within {CONVERGE:?}: it {:#}, a survivor {:#}",
        seen.0, seen.1
    );
    eprintln!(
        "node {leader} restarted from its disk and caught up: applied {applied_before} → {} (a survivor: {})",
        seen.0["applied"], seen.1["applied"]
    );
    let [a, b, w] = &nodes;
    converged(&[a, b, w], &[1, 2, 3]);

    // A peer with another token is refused, and counted.
    let bad = token_file(root, "other.token", "another-token-of-16-chars");
    let mut x = Member::new(root, "x", false, &bad);
    x.start();
    let before = a.status()["refused_calls"].as_u64().unwrap();
    let e = refused(&x.dir, &["cluster", "join", &a.addr()], 8);
    assert!(e.contains("token"), "{e}");
    let after = a.status()["refused_calls"].as_u64().unwrap();
    assert!(after > before, "refused_calls {before} → {after}");
    assert_eq!(member_ids(&a.status()), [1, 2, 3]);
    drop(x);

    // A join the replicated state machine refuses says why, at once.
    let mut y = Member::new(root, "y", false, &token);
    y.start();
    let long = "n".repeat(300);
    let e = refused(&y.dir, &["cluster", "join", &a.addr(), "--name", &long], 7);
    assert!(
        e.contains("refused by the cluster state") && e.contains("at most 256"),
        "{e}"
    );
    assert_eq!(member_ids(&a.status()), [1, 2, 3]);
    drop(y);

    // Leave: the witness, then storage node b; a, the last storage node,
    // may not.
    ok(&w.dir, &["cluster", "leave"]);
    converged(&[a, b], &[1, 2]);
    let e = refused(&w.dir, &["cluster", "status"], 7);
    assert!(e.contains("not in a cluster"), "{e}");
    ok(&b.dir, &["cluster", "leave"]);
    converged(&[a], &[1]);
    let e = refused(&a.dir, &["cluster", "leave"], 7);
    assert!(e.contains("last storage node"), "{e}");
    assert_eq!(member_ids(&a.status()), [1]);
}

/// `strata serve` with cluster flags that cannot work exits at once and
/// says why.
#[test]
fn cluster_flags_are_checked_at_start() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let open = root.join("open.token");
    std::fs::write(&open, "0123456789abcdef-cluster-token").unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o644)).unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let serve = |args: &[&str]| -> (Option<i32>, String) {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_strata"));
        cmd.arg("serve")
            .args(args)
            .env("STRATA_DATA_DIR", root.join("data"))
            .env("STRATA_STATE_DIR", root.join("state"))
            .env("STRATA_RUNTIME_DIR", root.join("run"));
        let o = support::output_within(guard_command(&mut cmd), Duration::from_secs(20));
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let (code, e) = serve(&["--witness"]);
    assert_eq!(code, Some(1), "{e}");
    assert!(e.contains("--witness needs --cluster-addr"), "{e}");
    let (code, e) = serve(&["--cluster-addr", &addr]);
    assert_eq!(code, Some(1), "{e}");
    assert!(e.contains("needs --cluster-token-file"), "{e}");
    let (code, e) = serve(&[
        "--cluster-addr",
        &addr,
        "--cluster-token-file",
        open.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(1), "{e}");
    assert!(e.contains("chmod 600"), "{e}");
    // The embedded default serves two namespaces: not on a witness.
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (code, e) = serve(&[
        "--cluster-addr",
        &addr,
        "--cluster-token-file",
        open.to_str().unwrap(),
        "--witness",
    ]);
    assert_eq!(code, Some(1), "{e}");
    assert!(e.contains("a witness serves none"), "{e}");
}
