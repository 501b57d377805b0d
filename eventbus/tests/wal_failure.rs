#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed setup is a failed test
//! The WAL's disk fills up: acks stop, /readyz turns false, errors are
//! counted, nothing stored is harmed, and writing resumes when space returns.
//!
//! Needs a small filesystem of its own: a tmpfs mounted by the test, which
//! takes root (CI runs as root). Elsewhere it says why it skipped.

mod common;

use std::process::Command;
use std::time::Duration;

use amoskys_proto::publish_response::Msg as OutMsg;
use common::*;

struct Mount(std::path::PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn mount_tmpfs(dir: &std::path::Path, size: &str) -> Result<Mount, String> {
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let out = Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
        .arg(dir)
        .output()
        .map_err(|e| format!("cannot run mount: {e}"))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
    }
    Ok(Mount(dir.to_path_buf()))
}

/// Fills the filesystem under `dir` until a write fails with ENOSPC.
fn fill(dir: &std::path::Path, name: &str) -> std::path::PathBuf {
    use std::io::Write;
    let path = dir.join(name);
    let mut f = std::fs::File::create(&path).unwrap();
    let chunk = vec![0u8; 64 * 1024];
    while f.write_all(&chunk).is_ok() {}
    // Leave not even a partial block.
    let small = [0u8; 512];
    while f.write_all(&small).is_ok() {}
    let _ = f.sync_all();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_disk_withholds_acks_and_recovers() {
    let env = Env::new();
    let disk = env.tmp.path().join("disk");
    let _mount = match mount_tmpfs(&disk, "48m") {
        Ok(m) => m,
        Err(why) => {
            eprintln!(
                "SKIPPED full_disk_withholds_acks_and_recovers: cannot mount a tmpfs ({why}); run as root"
            );
            return;
        }
    };
    let mut cfg = env.config();
    cfg.data_dir = disk.join("wal");
    // Small memtables: RocksDB preallocates its log to about this size, and
    // the test must run out of space within a few MB of writes.
    cfg.write_buffer_bytes = 256 * 1024;
    let bus = amoskys_eventbus::start(cfg).await.unwrap();
    let mut c = client(&bus, &env.pki("agent")).await;
    let mut p = c.publisher(hello("a"), 64).await.unwrap();
    p.send(events("a", 1..=200)).await.unwrap();
    loop {
        if let Some(OutMsg::Ack(a)) = p.next().await.unwrap()
            && a.acked_seq == 200
        {
            break;
        }
    }
    let filler = fill(&disk, "filler");

    // Keep publishing until a write hits the full disk.
    let mut seq = 200u64;
    let mut last_acked = 200u64;
    let mut became_unready = false;
    for _ in 0..400 {
        p.send(events("a", seq + 1..=seq + 200)).await.unwrap();
        seq += 200;
        if let Ok(Ok(Some(OutMsg::Ack(a)))) =
            tokio::time::timeout(Duration::from_millis(100), p.next()).await
        {
            last_acked = a.acked_seq;
        }
        let (code, _) = http_get(bus.http_addr, "/readyz").await;
        if code == 503 {
            became_unready = true;
            break;
        }
    }
    assert!(
        became_unready,
        "/readyz turns false when the WAL cannot be written"
    );
    // Reopening RocksDB after the failure can free the space its log had
    // preallocated; take that too, so the disk stays full.
    let filler2 = fill(&disk, "filler2");
    p.send(events("a", seq + 1..=seq + 200)).await.unwrap();
    seq += 200;

    // While the disk is full, no ack arrives for what is waiting.
    while let Ok(Ok(Some(msg))) = tokio::time::timeout(Duration::from_secs(2), p.next()).await {
        if let OutMsg::Ack(a) = msg {
            last_acked = a.acked_seq;
        }
    }
    assert!(
        last_acked < seq,
        "acks withheld: acked {last_acked} of {seq}"
    );
    assert_eq!(http_get(bus.http_addr, "/readyz").await.0, 503);
    let (_, text) = http_get(bus.http_addr, "/metrics").await;
    assert!(
        metric(&text, "amoskys_bus_wal_write_errors_total") >= 1.0,
        "{text}"
    );
    assert_eq!(metric(&text, "amoskys_bus_writable"), 0.0);
    let before = last_acked;

    // Space returns: the writer gets through, acks resume, /readyz recovers.
    std::fs::remove_file(&filler).unwrap();
    std::fs::remove_file(&filler2).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while last_acked < seq && tokio::time::Instant::now() < deadline {
        if let Ok(Ok(Some(OutMsg::Ack(a)))) =
            tokio::time::timeout(Duration::from_secs(1), p.next()).await
        {
            last_acked = a.acked_seq;
        }
    }
    assert_eq!(
        last_acked, seq,
        "everything sent is acked once the disk recovers (was {before})"
    );
    let ready = eventually(Duration::from_secs(10), || {
        let bus = &bus;
        async move { (http_get(bus.http_addr, "/readyz").await.0 == 200).then_some(()) }
    })
    .await;
    assert!(ready.is_some(), "/readyz recovers");

    let stored = stored(&bus, &env).await;
    let seqs: Vec<u64> = stored.iter().map(|e| e.seq).collect();
    assert_eq!(
        seqs,
        (1..=seq).collect::<Vec<_>>(),
        "nothing lost, nothing twice"
    );
    bus.shutdown().await.unwrap();
}
