//! The starter rule set (`config/rules/`), built into the binary so
//! `amoskys up` can run it with no files around.

/// Each starter rule file: its name and its text.
pub const STARTER_RULES: &[(&str, &str)] = &[
    (
        "cloud-metadata.yaml",
        include_str!("../../config/rules/cloud-metadata.yaml"),
    ),
    (
        "container-package-manager.yaml",
        include_str!("../../config/rules/container-package-manager.yaml"),
    ),
    (
        "container-shell.yaml",
        include_str!("../../config/rules/container-shell.yaml"),
    ),
    (
        "crypto-miner.yaml",
        include_str!("../../config/rules/crypto-miner.yaml"),
    ),
    (
        "exec-from-shm-or-tmp.yaml",
        include_str!("../../config/rules/exec-from-shm-or-tmp.yaml"),
    ),
    (
        "listeners.yaml",
        include_str!("../../config/rules/listeners.yaml"),
    ),
    (
        "netcat-exec.yaml",
        include_str!("../../config/rules/netcat-exec.yaml"),
    ),
    (
        "network-devices.yaml",
        include_str!("../../config/rules/network-devices.yaml"),
    ),
    (
        "port-scan.yaml",
        include_str!("../../config/rules/port-scan.yaml"),
    ),
    (
        "telemetry-gap.yaml",
        include_str!("../../config/rules/telemetry-gap.yaml"),
    ),
];
