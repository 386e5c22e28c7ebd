//! `cargo xtask conformance`: Kubernetes' own sig-network e2e tests (the
//! e2e.test built at the cluster's release, run by ginkgo from the client
//! namespace) against the namespace cluster, images mapped to the local
//! builds through a repo list. Every skip is named here with its reason
//! (docs/CONFORMANCE.md lists them); the JUnit report goes to
//! bench-results/.

use anyhow::{bail, Context, Result};
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use super::{images, Layout, CLIENT_NS};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    /// Every `[sig-network] Services` test, every `[sig-network]`
    /// `[Conformance]` test, kube-proxy's URLs, the Services granular checks
    /// and the Conntrack tests.
    Full,
    /// Every `[sig-network] Services` test (the conformance ones, rejects,
    /// traffic policies, terminating endpoints, session affinity) and
    /// kube-proxy's URLs: CI's subset, about 5 minutes here.
    Ci,
    /// The tests matching a regular expression (`--focus REGEX`), to rerun
    /// one; the skips still apply.
    Focus(String),
}

const FOCUS_FULL: &str = r"\[sig-network\] Services|\[sig-network\].*\[Conformance\]|\[sig-network\] Networking (should check kube-proxy urls|Granular Checks: Services)|\[sig-network\] Conntrack";
const FOCUS_CI: &str =
    r"\[sig-network\] Services|\[sig-network\] Networking should check kube-proxy urls";

/// Tests not run, each with its reason (docs/CONFORMANCE.md).
pub const SKIPS: &[(&str, &str)] = &[
    (
        r"\[Feature:IPv6DualStack\]|IPv6|\[Feature:Networking-IPv6\]",
        "IPv6: the cluster and Ferry's TC path are IPv4-only so far",
    ),
    (r"SCTP", "SCTP: Ferry's TC path does not translate SCTP yet"),
    (
        r"\[Disruptive\]",
        "disruptive tests restart or partition nodes, which a namespace node cannot",
    ),
    (r"\[Flaky\]", "marked flaky upstream"),
    (
        r"\[Feature:ServiceCIDRs\]|\[Feature:",
        "alpha or optional features not enabled in this cluster",
    ),
    (
        r"GCE|AWS|Azure|\[Provider:",
        "needs a cloud provider's load balancer",
    ),
];

fn skip_regex() -> String {
    SKIPS
        .iter()
        .map(|(re, _)| *re)
        .collect::<Vec<_>>()
        .join("|")
}

/// ginkgo running the e2e binary from the client namespace against the
/// cluster, with the test images from the local registry.
fn ginkgo(layout: &Layout, focus: &str, report: &Path, repo_list: &Path) -> Command {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net=/run/netns/{CLIENT_NS}"))
        .arg(layout.program("ginkgo"))
        .args(["--nodes=4", "--timeout=2h", "--no-color", "--silence-skips"])
        .arg(format!("--focus={focus}"))
        .arg(format!("--skip={}", skip_regex()))
        .arg(format!(
            "--junit-report={}",
            report.join("junit.xml").display()
        ))
        .arg(layout.program("e2e.test"))
        .arg("--")
        .arg(format!(
            "--kubeconfig={}",
            layout.admin_kubeconfig().display()
        ))
        .arg(format!(
            "--kubectl-path={}",
            layout.program("kubectl").display()
        ))
        .arg("--provider=local")
        // The schedulable nodes; without it the tests that need several
        // nodes skip themselves ("Requires at least 2 nodes (not -1)").
        .arg(format!("--num-nodes={}", super::NODES.len()))
        .arg(format!("--kube-test-repo-list={}", repo_list.display()))
        .arg(format!("--report-dir={}", report.display()));
    cmd
}

pub fn run(root: &Path, layout: &Layout, selection: &Selection) -> Result<()> {
    if !layout.admin_kubeconfig().is_file() {
        bail!("no cluster is up (cargo xtask cluster up)");
    }
    let name = match selection {
        Selection::Full => "full",
        Selection::Ci => "ci",
        Selection::Focus(_) => "focus",
    };
    let report = root
        .join("bench-results")
        .join(format!("conformance-{name}"));
    let _ = std::fs::remove_dir_all(&report);
    std::fs::create_dir_all(&report)?;
    let repo_list = layout.state.join("repo-list.yaml");
    std::fs::write(
        &repo_list,
        format!(
            "gcRegistry: {r}\npromoterE2eRegistry: {r}/e2e-test-images\n",
            r = images::REGISTRY
        ),
    )?;
    let focus = match &selection {
        Selection::Full => FOCUS_FULL,
        Selection::Ci => FOCUS_CI,
        Selection::Focus(re) => re.as_str(),
    };
    let started = Instant::now();
    let mut cmd = ginkgo(layout, focus, &report, &repo_list);
    let status = cmd.status().context("running ginkgo")?;
    let counts = junit_counts(&report.join("junit.xml"))?;
    println!(
        "== conformance ({name}): {} passed, {} failed, {} skipped in {:.0} s (Kubernetes {})",
        counts.0,
        counts.1,
        counts.2,
        started.elapsed().as_secs_f64(),
        super::KUBERNETES
    );
    if !status.success() || counts.1 > 0 {
        bail!(
            "conformance ({name}): {} failed (report: {})",
            counts.1,
            report.display()
        );
    }
    Ok(())
}

/// (passed, failed, skipped) of the selected specs in the JUnit report;
/// specs outside the selection ("skipped" with no reason) and the suite's
/// set-up and report entries are not counted.
fn junit_counts(path: &Path) -> Result<(usize, usize, usize)> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let (mut pass, mut fail, mut skip) = (0, 0, 0);
    // Suite set-up and reports are testcases too; the specs are the [It]s.
    let specs = text
        .split("<testcase ")
        .skip(1)
        .filter(|c| c.starts_with("name=\"[It]"));
    for case in specs {
        let body = case.split("</testcase>").next().unwrap_or(case);
        let status = body
            .split("status=\"")
            .nth(1)
            .and_then(|s| s.split('"').next())
            .unwrap_or("");
        match status {
            "passed" => pass += 1,
            "skipped" if body.contains("<skipped message=\"skipped\">") => {}
            "skipped" => skip += 1,
            _ => fail += 1,
        }
    }
    Ok((pass, fail, skip))
}

#[cfg(test)]
mod tests {
    #[test]
    fn counts_only_the_selected_specs() {
        let dir = std::env::temp_dir().join(format!("ferry-junit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("junit.xml");
        std::fs::write(
            &path,
            r#"<testsuites><testsuite>
<testcase name="[SynchronizedBeforeSuite]" status="passed" time="1"></testcase>
<testcase name="[It] a" status="passed" time="1"></testcase>
<testcase name="[It] b" status="failed" time="1"><failure message="x"></failure></testcase>
<testcase name="[It] c" status="skipped" time="0"><skipped message="skipped"></skipped></testcase>
<testcase name="[It] d" status="skipped" time="0"><skipped message="skipped - Need at least 3 schedulable nodes"></skipped></testcase>
<testcase name="[It] e" status="timedout" time="1"><failure message="t"></failure></testcase>
</testsuite></testsuites>"#,
        )
        .unwrap();
        assert_eq!(super::junit_counts(&path).unwrap(), (1, 2, 1));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
