//! Network namespaces for the capture tests (`wasp iptables`): the
//! namespace, deleted with every process started in it; a pod (and a
//! service on the other end of a veth pair); Python servers that say when
//! they are ready; wasp itself, run inside, with its admin API asked from
//! inside. The host's own tables are never touched.
//!
//! Needs root, `ip netns` and the iptables package (scripts/test.sh
//! installs it); where the kernel refuses namespaces, the constructors
//! say so and return `None`, and the test skips.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use super::{TempDir, WASP};

pub const PYTHON: &str = "/usr/bin/python3";

/// wasp's admin address inside a namespace (each test has its own).
pub const ADMIN: &str = "127.0.0.1:9901";

/// A network namespace, deleted (with every process started in it by this
/// test) on drop.
pub struct Netns {
    pub name: String,
    pub children: Vec<Child>,
}

impl Netns {
    /// `None` (with the reason printed) where namespaces cannot be made.
    pub fn new(tag: &str) -> Option<Netns> {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "wasp-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let out = Command::new("ip").args(["netns", "add", &name]).output();
        match out {
            Ok(o) if o.status.success() => {}
            Ok(o) => {
                eprintln!(
                    "SKIP: cannot create a network namespace here: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                );
                return None;
            }
            Err(e) => {
                eprintln!("SKIP: `ip` (iproute2) is not available: {e}");
                return None;
            }
        }
        let ns = Netns {
            name,
            children: Vec::new(),
        };
        ns.ok(&["ip", "link", "set", "lo", "up"]);
        Some(ns)
    }

    pub fn cmd(&self, argv: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).args(argv);
        c
    }

    /// Runs `argv` in the namespace as `uid` (when given).
    pub fn as_uid(&self, uid: Option<&str>, argv: &[&str]) -> Command {
        match uid {
            Some(uid) => {
                let mut full = vec!["setpriv", "--reuid", uid, "--regid", uid, "--clear-groups"];
                full.extend_from_slice(argv);
                self.cmd(&full)
            }
            None => self.cmd(argv),
        }
    }

    pub fn output(&self, argv: &[&str]) -> std::process::Output {
        self.cmd(argv)
            .output()
            .unwrap_or_else(|e| panic!("running {argv:?} in {}: {e}", self.name))
    }

    /// Runs `argv`, failing the test unless it exits 0; its stdout.
    pub fn ok(&self, argv: &[&str]) -> String {
        let out = self.output(argv);
        assert!(
            out.status.success(),
            "{argv:?} in {} failed: {}{}",
            self.name,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Starts `cmd`, to be killed when the namespace goes.
    pub fn spawn(&mut self, mut cmd: Command) -> usize {
        let child = cmd.spawn().expect("spawn in namespace");
        self.children.push(child);
        self.children.len() - 1
    }

    /// Starts `python3 -c script args...` in the namespace and waits for
    /// its `ready` line.
    pub fn start_python(&mut self, script: &str, args: &[&str]) {
        let mut argv = vec![PYTHON, "-c", script];
        argv.extend_from_slice(args);
        let mut server = self.as_uid(None, &argv);
        server.stdout(Stdio::piped()).stderr(Stdio::null());
        let i = self.spawn(server);
        wait_for_line(&mut self.children[i], "ready", Duration::from_secs(10));
    }

    /// Writes `config` (with `[admin]` at [`ADMIN`]) into `dir`, starts
    /// `wasp run` on it in the namespace (as `uid` when given, which must
    /// be able to read it) and waits until `/ready` answers. Returns the
    /// path of its log (stderr).
    pub fn start_wasp(&mut self, uid: Option<&str>, dir: &TempDir, config: &str) -> PathBuf {
        let path = dir.path().join("wasp.toml");
        std::fs::write(&path, format!("[admin]\nbind = \"{ADMIN}\"\n\n{config}"))
            .expect("write config");
        // The proxy may run as its own user and must read its config.
        let _ = Command::new("chmod")
            .args(["-R", "a+rX", &dir.path().to_string_lossy()])
            .status();
        let log = dir.path().join("wasp.log");
        let log_file = std::fs::File::create(&log).expect("log file");
        let config_arg = path.to_string_lossy().into_owned();
        let mut wasp = self.as_uid(uid, &[WASP, "run", "--config", &config_arg]);
        wasp.stdout(Stdio::null()).stderr(log_file);
        self.spawn(wasp);
        self.admin_get("/ready", Duration::from_secs(20));
        log
    }

    /// Waits until `GET path` on wasp's admin address (inside the
    /// namespace) answers 200, returning the body.
    pub fn admin_get(&self, path: &str, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let out = self.output(&[
                "curl",
                "-s",
                "-f",
                "-m",
                "2",
                &format!("http://{ADMIN}{path}"),
            ]);
            if out.status.success() {
                return String::from_utf8_lossy(&out.stdout).into_owned();
            }
            assert!(
                Instant::now() < deadline,
                "admin {path} not answering in time"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The namespace's rules in every table wasp touches, as `-S` prints them.
    pub fn rules(&self) -> String {
        let mut all = String::new();
        for tool in ["iptables", "ip6tables"] {
            for table in ["nat", "filter"] {
                let out = self.output(&[tool, "-t", table, "-S"]);
                all.push_str(&String::from_utf8_lossy(&out.stdout));
            }
        }
        all
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn have_iptables() -> bool {
    let ok = Command::new("iptables-restore")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "iptables-restore is missing: scripts/test.sh installs Debian's iptables package"
    );
    ok
}

/// A pod namespace whose app can reach "service addresses" in
/// 10.77.0.0/24 (a veth pair gives it a route; nothing answers there).
pub fn pod() -> Option<Netns> {
    if !have_iptables() {
        return None;
    }
    let ns = Netns::new("pod")?;
    ns.ok(&[
        "ip", "link", "add", "v0", "type", "veth", "peer", "name", "v1",
    ]);
    ns.ok(&["ip", "addr", "add", "10.77.0.1/24", "dev", "v0"]);
    ns.ok(&["ip", "link", "set", "v0", "up"]);
    ns.ok(&["ip", "link", "set", "v1", "up"]);
    Some(ns)
}

/// A pod namespace (10.77.0.1) and a "service" namespace (10.77.0.2) on
/// the two ends of a veth pair: what the app calls is really elsewhere.
pub fn pod_and_service() -> Option<(Netns, Netns)> {
    if !have_iptables() {
        return None;
    }
    let pod = Netns::new("pod")?;
    let svc = Netns::new("svc")?;
    pod.ok(&[
        "ip", "link", "add", "v0", "type", "veth", "peer", "name", "v1",
    ]);
    pod.ok(&["ip", "link", "set", "v1", "netns", &svc.name]);
    pod.ok(&["ip", "addr", "add", "10.77.0.1/24", "dev", "v0"]);
    pod.ok(&["ip", "link", "set", "v0", "up"]);
    svc.ok(&["ip", "addr", "add", "10.77.0.2/24", "dev", "v1"]);
    svc.ok(&["ip", "link", "set", "v1", "up"]);
    Some((pod, svc))
}

/// Waits (bounded) for a line of `child`'s stdout starting with `want`.
pub fn wait_for_line(child: &mut Child, want: &str, limit: Duration) {
    let Some(out) = child.stdout.take() else {
        panic!("no stdout to wait on");
    };
    let (tx, rx) = std::sync::mpsc::channel();
    let prefix = want.to_string();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if line.starts_with(&prefix) {
                let _ = tx.send(());
                return;
            }
        }
    });
    rx.recv_timeout(limit)
        .unwrap_or_else(|_| panic!("no \"{want}\" line within {limit:?}"));
}
