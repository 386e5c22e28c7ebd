//! `ferry run` refuses bad settings, from flags or from --config, with one
//! line naming the setting and exit code 2, before touching anything.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic

use std::process::Command;

fn ferry() -> std::path::PathBuf {
    // target/debug/deps/<test> -> target/debug/ferry
    let exe = std::env::current_exe().unwrap();
    let bin = exe.parent().unwrap().parent().unwrap().join("ferry");
    assert!(
        bin.exists(),
        "{} is not built (cargo build -p ferry-proxy)",
        bin.display()
    );
    bin
}

fn refused(args: &[&str], setting: &str) {
    let out = Command::new(ferry())
        .arg("run")
        .args(args)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    assert!(
        stderr.contains(setting),
        "{args:?} should name {setting}: {stderr}"
    );
}

#[test]
fn bad_flags_exit_2_naming_the_setting() {
    refused(&["--min-sync-period", "soon"], "--min-sync-period");
    refused(&["--sync-period", "3d"], "--sync-period");
    refused(&["--source", "etcd"], "--source");
    refused(&["--dataplane", "fpga"], "--dataplane");
    refused(&["--max-connections", "0"], "--max-connections");
    refused(&["--idle-timeout", "forever"], "--idle-timeout");
    refused(&["--udp-idle-timeout", "0s"], "--udp-idle-timeout");
    refused(&["--interfaces", "eth0,a/b"], "--interfaces");
    refused(&["--interfaces", "a-name-longer-than-15"], "--interfaces");
    refused(&["--lb-ipam", "maybe"], "--lb-ipam");
    refused(&["--l2-interfaces", "eth0,a b"], "--l2-interfaces");
    refused(&["--l2-lease-duration", "0s"], "--l2-lease-duration");
    refused(&["--l2-lease-duration", "long"], "--l2-lease-duration");
    refused(
        &["--nodeport-addresses", "10.0.0.0/33"],
        "--nodeport-addresses",
    );
    refused(
        &["--metrics-bind-address", "localhost"],
        "--metrics-bind-address",
    );
}

#[test]
fn bad_config_files_exit_2_naming_the_setting() {
    let dir = std::env::temp_dir().join(format!("ferry-test-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let unknown = dir.join("unknown.yaml");
    std::fs::write(&unknown, "syncPeriodd: 1s\n").unwrap();
    refused(&["--config", unknown.to_str().unwrap()], "syncPeriodd");
    // Values in the file are checked like flags.
    let bad = dir.join("bad.yaml");
    std::fs::write(&bad, "minSyncPeriod: soon\n").unwrap();
    refused(&["--config", bad.to_str().unwrap()], "--min-sync-period");
    // A flag on the command line wins over the file. (The file also holds
    // a bad dataplane, checked after the source: were the file's source
    // used, the error would name --dataplane and no agent would start.)
    let ok_source = dir.join("source.yaml");
    std::fs::write(&ok_source, "source: file:/nonexistent\ndataplane: fpga\n").unwrap();
    refused(
        &["--config", ok_source.to_str().unwrap(), "--source", "etcd"],
        "--source",
    );
    refused(
        &["--config", dir.join("missing.yaml").to_str().unwrap()],
        "--config",
    );
    let _ = std::fs::remove_dir_all(&dir);
}
