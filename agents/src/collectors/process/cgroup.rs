//! Container and pod identity from a process's cgroup path, as kubelet and
//! the container runtimes lay it out (cgroupfs and systemd drivers, v1 and v2).

#[derive(Debug, Default, PartialEq, Eq, Clone)]
pub struct Identity {
    pub cgroup: String,
    pub container_id: String,
    pub pod_uid: String,
}

fn is_container_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

fn container_id(segment: &str) -> Option<String> {
    let s = segment.strip_suffix(".scope").unwrap_or(segment);
    let s = [
        "cri-containerd-",
        "crio-",
        "docker-",
        "containerd-",
        "libpod-",
    ]
    .iter()
    .find_map(|p| s.strip_prefix(p))
    .unwrap_or(s);
    is_container_id(s).then(|| s.to_string())
}

fn pod_uid(segment: &str) -> Option<String> {
    let s = segment.strip_suffix(".slice").unwrap_or(segment);
    // systemd: kubepods-burstable-pod<uid with _>.slice; cgroupfs: pod<uid>
    let uid = match s.rfind("-pod") {
        Some(i) if s.starts_with("kubepods") => &s[i + 4..],
        _ => s.strip_prefix("pod")?,
    };
    let uid = uid.replace('_', "-");
    (uid.len() == 36 && uid.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')).then_some(uid)
}

/// Parses the contents of /proc/<pid>/cgroup.
pub fn parse(contents: &str) -> Identity {
    // Prefer the unified (v2) line, else the first line that names a pod or
    // container.
    let mut best = Identity::default();
    for line in contents.lines() {
        let Some(path) = line.splitn(3, ':').nth(2) else {
            continue;
        };
        let mut id = Identity {
            cgroup: path.to_string(),
            ..Default::default()
        };
        for seg in path.split('/') {
            if let Some(p) = pod_uid(seg) {
                id.pod_uid = p;
            }
            if let Some(c) = container_id(seg) {
                id.container_id = c;
            }
        }
        let unified = line.starts_with("0::");
        let better = (!id.container_id.is_empty() && best.container_id.is_empty())
            || (!id.pod_uid.is_empty() && best.pod_uid.is_empty())
            || (unified && best.cgroup.is_empty());
        if better || best.cgroup.is_empty() {
            best = id;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    const CID: &str = "3f1c2e4d5b6a79801234567890abcdef3f1c2e4d5b6a79801234567890abcdef";

    #[test]
    fn systemd_driver_v2() {
        let s = format!(
            "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0a1b2c3d_4e5f_6789_abcd_ef0123456789.slice/cri-containerd-{CID}.scope\n"
        );
        let id = parse(&s);
        assert_eq!(id.pod_uid, "0a1b2c3d-4e5f-6789-abcd-ef0123456789");
        assert_eq!(id.container_id, CID);
    }

    #[test]
    fn cgroupfs_driver_v1() {
        let s = format!(
            "12:pids:/kubepods/besteffort/pod0a1b2c3d-4e5f-6789-abcd-ef0123456789/{CID}\n11:memory:/kubepods/besteffort/pod0a1b2c3d-4e5f-6789-abcd-ef0123456789/{CID}\n"
        );
        let id = parse(&s);
        assert_eq!(id.pod_uid, "0a1b2c3d-4e5f-6789-abcd-ef0123456789");
        assert_eq!(id.container_id, CID);
    }

    #[test]
    fn plain_host_process_has_no_identity() {
        let id = parse("0::/user.slice/user-1000.slice/session-2.scope\n");
        assert_eq!(id.cgroup, "/user.slice/user-1000.slice/session-2.scope");
        assert!(id.pod_uid.is_empty() && id.container_id.is_empty());
        assert_eq!(parse("garbage"), Identity::default());
    }
}
