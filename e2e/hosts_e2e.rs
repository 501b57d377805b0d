#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed setup is a failed test
//! Linux hosts without Kubernetes: the systemd units pass `systemd-analyze
//! verify` without a word, the default configs are ones the binary accepts,
//! and `cargo deb` (crates.io's cargo-deb, which scripts/setup.sh installs)
//! packages the binary, units, configs, rules and docs.

use std::path::{Path, PathBuf};
use std::process::Command;

mod common;
use common::BIN;

fn repo(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(p)
}

#[test]
fn the_units_pass_systemd_analyze_verify_silently() {
    let dir = tempfile::tempdir().unwrap();
    let mut units = Vec::new();
    for name in ["amoskys-bus.service", "amoskys-agent.service"] {
        // verify checks that ExecStart's binary exists: point it at this build's.
        let text = std::fs::read_to_string(repo("config/systemd").join(name))
            .unwrap()
            .replace("/usr/bin/amoskys", BIN);
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        units.push(path);
    }
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .args(&units)
        .output()
        .expect("systemd-analyze (Debian's systemd package)");
    let said = amoskys_testkit::output_text(&out);
    assert!(out.status.success() && said.trim().is_empty(), "{said}");

    // The hardening the docs promise is in the units.
    let bus = std::fs::read_to_string(repo("config/systemd/amoskys-bus.service")).unwrap();
    for line in [
        "User=amoskys",
        "ProtectSystem=strict",
        "CapabilityBoundingSet=\n",
        "Restart=on-failure",
        "StateDirectory=amoskys/bus",
    ] {
        assert!(bus.contains(line), "amoskys-bus.service lacks {line:?}");
    }
    let agent = std::fs::read_to_string(repo("config/systemd/amoskys-agent.service")).unwrap();
    assert!(
        agent.contains("CapabilityBoundingSet=CAP_NET_ADMIN CAP_SYS_PTRACE CAP_DAC_READ_SEARCH\n")
    );
    assert!(agent.contains("ProtectSystem=strict") && agent.contains("Restart=on-failure"));
}

#[test]
fn the_default_host_configs_are_accepted_by_the_binary() {
    let bus = amoskys_eventbus::config::read_config_file(&repo("config/host/bus.yaml")).unwrap();
    let bus = amoskys_eventbus::config::resolve(bus, Default::default()).unwrap();
    assert_eq!(bus.data_dir, PathBuf::from("/var/lib/amoskys/bus"));
    assert_eq!(
        bus.detection.unwrap().rules_dir,
        PathBuf::from("/usr/share/amoskys/rules")
    );
    let text = std::fs::read_to_string(repo("config/host/agent.yaml")).unwrap();
    let file = amoskys_agents::config::parse_config(&text).unwrap();
    let cfg = amoskys_agents::config::resolve(file, Default::default()).unwrap();
    assert_eq!(cfg.spool_dir, PathBuf::from("/var/lib/amoskys/agent/spool"));
    assert!(cfg.collectors.process.is_some() && cfg.collectors.flow.is_none());
}

fn cargo_deb() -> PathBuf {
    let home = PathBuf::from(std::env::var("HOME").unwrap());
    let p = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| home.join(".cargo"))
        .join("bin/cargo-deb");
    assert!(
        p.is_file(),
        "{} is missing: run scripts/setup.sh (it installs cargo-deb from crates.io)",
        p.display()
    );
    p
}

#[test]
fn cargo_deb_packages_the_binary_units_configs_rules_and_docs() {
    // The test build's binary stands in for the release one (a release
    // build of RocksDB takes most of an hour); what is checked is the package.
    let dir = tempfile::tempdir().unwrap();
    let deb = dir.path().join("amoskys.deb");
    let target = Path::new(BIN).parent().unwrap().parent().unwrap();
    let out = Command::new(cargo_deb())
        .args([
            "deb",
            "--no-build",
            "--no-strip",
            "--fast",
            "--profile",
            "dev",
            "-p",
            "amoskys",
        ])
        .arg("--output")
        .arg(&deb)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("CARGO_TARGET_DIR", target)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cargo deb: {}",
        amoskys_testkit::output_text(&out)
    );
    let list = Command::new("dpkg-deb")
        .arg("-c")
        .arg(&deb)
        .output()
        .unwrap();
    let list = String::from_utf8_lossy(&list.stdout).to_string();
    for path in [
        "./usr/bin/amoskys",
        "./lib/systemd/system/amoskys-bus.service",
        "./lib/systemd/system/amoskys-agent.service",
        "./etc/amoskys/bus.yaml",
        "./etc/amoskys/agent.yaml",
        "./usr/share/amoskys/rules/container-shell.yaml",
        "./usr/share/doc/amoskys/hosts.md",
    ] {
        assert!(
            list.lines().any(|l| l.ends_with(path)),
            "{path} is not in the package:\n{list}"
        );
    }
    assert!(
        list.lines()
            .any(|l| l.starts_with("-rwxr-xr-x") && l.ends_with("./usr/bin/amoskys"))
    );
    let rules = std::fs::read_dir(repo("config/rules")).unwrap().count();
    assert_eq!(
        list.lines()
            .filter(|l| l.contains("./usr/share/amoskys/rules/") && l.ends_with(".yaml"))
            .count(),
        rules
    );
    let field = |f: &str| {
        let o = Command::new("dpkg-deb")
            .args(["-f"])
            .arg(&deb)
            .arg(f)
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    };
    assert_eq!(field("Package"), "amoskys");
    // libpcap from the binary's own links, adduser for the bus's user.
    let depends = field("Depends");
    assert!(
        depends.contains("libpcap") && depends.contains("adduser"),
        "{depends}"
    );
    let conffiles = Command::new("dpkg-deb")
        .args(["--ctrl-tarfile"])
        .arg(&deb)
        .output()
        .unwrap();
    assert!(conffiles.status.success());
    let ctrl = dir.path().join("control.tar");
    std::fs::write(&ctrl, &conffiles.stdout).unwrap();
    let tar = Command::new("tar")
        .arg("-xOf")
        .arg(&ctrl)
        .arg("./conffiles")
        .output()
        .unwrap();
    let conf = String::from_utf8_lossy(&tar.stdout);
    assert!(
        conf.contains("/etc/amoskys/bus.yaml") && conf.contains("/etc/amoskys/agent.yaml"),
        "{conf}"
    );
    let tar = Command::new("tar")
        .arg("-xOf")
        .arg(&ctrl)
        .arg("./postinst")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&tar.stdout).contains("adduser --system --group"));
}
