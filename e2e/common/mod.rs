//! What the end-to-end tests share: the binary, a PKI, bus processes.
#![allow(dead_code)]

pub mod history;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use amoskys_client::ClientOptions;

pub const BIN: &str = env!("CARGO_BIN_EXE_amoskys");

#[allow(unused_imports)] // not every test crate uses it
pub use amoskys_testkit::free_port;

/// GET over HTTP/1.0 on loopback: status code and body; (0, "") when
/// nothing listens (a bus being killed and restarted).
pub fn http_get(port: u16, path: &str, token: Option<&str>) -> (u16, String) {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return (0, String::new());
    };
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let _ = write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n{auth}\r\n");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_string());
    (status, body.unwrap_or_default())
}

/// The value of one series (name with labels, exactly as exposed) on the
/// `/metrics` of the process whose HTTP side is `port`.
pub fn metric(port: u16, series: &str) -> f64 {
    amoskys_testkit::metric(&http_get(port, "/metrics", None).1, series)
}

pub struct Bus {
    pub child: Child,
    pub grpc: u16,
    pub http: u16,
}

impl Drop for Bus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn pki(dir: &Path) {
    let st = Command::new(BIN)
        .args(["pki", "init", "--out"])
        .arg(dir)
        .status()
        .unwrap();
    assert!(st.success());
}

pub fn start_bus(root: &Path, sync: &str, ports: Option<(u16, u16)>) -> Bus {
    start_bus_with(root, sync, ports, &[])
}

/// A bus process with `extra` flags appended.
pub fn start_bus_with(root: &Path, sync: &str, ports: Option<(u16, u16)>, extra: &[&str]) -> Bus {
    let (grpc, http) = ports.unwrap_or_else(|| (free_port(), free_port()));
    let child = Command::new(BIN)
        .arg("bus")
        .args(["--listen", &format!("127.0.0.1:{grpc}")])
        .args(["--http", &format!("127.0.0.1:{http}")])
        .arg("--data-dir")
        .arg(root.join("data"))
        .arg("--tls-dir")
        .arg(root.join("pki/bus"))
        .args(["--sync", sync])
        .args(extra)
        .env("AMOSKYS_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let bus = Bus { child, grpc, http };
    wait_ready(&bus);
    bus
}

pub fn wait_ready(bus: &Bus) {
    wait_http_ready(bus.http)
}

/// Waits until the bus whose HTTP side is `port` answers /readyz with 200.
pub fn wait_http_ready(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            use std::io::{Read, Write};
            let _ = s.write_all(b"GET /readyz HTTP/1.0\r\n\r\n");
            let mut out = String::new();
            let _ = s.read_to_string(&mut out);
            if out.starts_with("HTTP/1.0 200") || out.starts_with("HTTP/1.1 200") {
                return;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("bus did not become ready");
}

pub fn opts(bus: &Bus, root: &Path, who: &str) -> ClientOptions {
    ClientOptions::new(
        format!("https://127.0.0.1:{}", bus.grpc),
        root.join("pki").join(who),
    )
}

/// An `amoskys agent` process, killed when dropped.
pub struct Agent(pub Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts an agent with the YAML `config` against the bus on `bus_port`.
pub fn start_agent(root: &Path, bus_port: u16, agent_id: &str, config: &str) -> Agent {
    let cfg = root.join("agent.yaml");
    std::fs::write(&cfg, config).unwrap();
    let child = Command::new(BIN)
        .arg("agent")
        .arg("--config")
        .arg(&cfg)
        .args(["--bus", &format!("https://127.0.0.1:{bus_port}")])
        .arg("--tls-dir")
        .arg(root.join("pki/agent"))
        .arg("--spool-dir")
        .arg(root.join("spool"))
        .args(["--agent-id", agent_id])
        .env("AMOSKYS_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    Agent(child)
}

/// Runs `amoskys ARGS`: whether it succeeded, and its stdout and stderr.
pub fn cli(args: &[&str]) -> (bool, String) {
    let out = Command::new(BIN)
        .args(args)
        .env("AMOSKYS_LOG", "warn")
        .output()
        .unwrap();
    let text = amoskys_testkit::output_text(&out);
    (out.status.success(), text)
}

/// `amoskys backup now` against the bus whose gRPC port is `grpc`, with the
/// client certificate in `tls_dir`.
pub fn backup_now(grpc: u16, tls_dir: &Path) -> (bool, String) {
    cli(&[
        "backup",
        "now",
        "--bus",
        &format!("https://127.0.0.1:{grpc}"),
        "--tls-dir",
        &tls_dir.display().to_string(),
    ])
}

/// A bus that backs up only on request, into `root/backup`; also returns
/// that directory.
pub fn start_bus_with_backups(root: &Path, ports: Option<(u16, u16)>) -> (Bus, std::path::PathBuf) {
    let cfg = root.join("bus.yaml");
    let backup_dir = root.join("backup");
    std::fs::write(
        &cfg,
        format!("backup:\n  dir: {}\n  interval: 0s\n", backup_dir.display()),
    )
    .unwrap();
    let cfg = cfg.to_str().unwrap().to_string();
    (
        start_bus_with(root, "batch", ports, &["--config", &cfg]),
        backup_dir,
    )
}
