//! Privileged: `--bpffs-path` may name a bpffs mount itself (not only a
//! directory below /sys/fs/bpf), and a path on no bpffs is refused with a
//! message naming the path given.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ferry_tests::bpf::TestCgroup;
use ferry_tests::{ferry_binary, require_privileged, KillOnDrop};

/// A bpffs mounted at a fresh directory, unmounted and removed on drop.
struct Mount {
    root: PathBuf,
}

impl Mount {
    fn new() -> Mount {
        let root = std::env::temp_dir().join(format!("ferry-bpffs-path-{}", std::process::id()));
        std::fs::create_dir_all(root.join("bpf")).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(root.join("bpf"))
            .status()
            .unwrap()
            .success();
        assert!(ok, "mount -t bpf");
        Mount { root }
    }

    fn bpf(&self) -> PathBuf {
        self.root.join("bpf")
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        ferry_proxy::ebpf::lb::remove_pins(&self.bpf());
        let _ = Command::new("umount").arg(self.bpf()).status();
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

fn run(bin: &Path, yaml: &Path, pins: &Path, cgroup: &Path) -> Command {
    ferry_tests::agent::EbpfAgent {
        netns: None,
        source: format!("--source=file:{}", yaml.display()),
        pins,
        cgroup,
        interfaces: "none",
        hostname: "node-a",
    }
    .command(bin)
}

#[test]
fn a_bpffs_mount_is_accepted_and_a_plain_directory_refused_by_name() {
    if !require_privileged(
        "a_bpffs_mount_is_accepted_and_a_plain_directory_refused_by_name",
        Ok(()),
    ) {
        return;
    }
    let bin = ferry_binary().unwrap();
    let mount = Mount::new();
    let cgroup = TestCgroup::new("bpffs-path").unwrap();
    let yaml = mount.root.join("svc.yaml");
    std::fs::write(
        &yaml,
        "apiVersion: v1\nkind: Service\nmetadata: {name: a, namespace: t}\nspec: {clusterIP: 198.19.0.31, ports: [{port: 80}]}\n",
    )
    .unwrap();

    // The mount itself as --bpffs-path: the maps are pinned in it.
    let agent = KillOnDrop(
        run(&bin, &yaml, &mount.bpf(), cgroup.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    let listed = || {
        let out = Command::new(&bin)
            .args(["services", "--bpffs-path"])
            .arg(mount.bpf())
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).contains("198.19.0.31:80")
    };
    while !listed() {
        assert!(Instant::now() < deadline, "nothing programmed at the mount");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(mount.bpf().join("ferry_svc4").exists());
    drop(agent);
    let cleaned = Command::new(&bin)
        .args(["cleanup", "--bpffs-path"])
        .arg(mount.bpf())
        .status()
        .unwrap();
    assert!(cleaned.success(), "cleanup of a mount root");

    // A directory on no bpffs: refused, naming the path given.
    let plain = mount.root.join("plain/ferry");
    let out = run(&bin, &yaml, &plain, cgroup.path()).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains(&plain.display().to_string()), "{stderr}");
    assert!(stderr.contains("not on a bpf filesystem"), "{stderr}");
}
