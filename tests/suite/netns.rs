//! Multi-node rehearsal on one box: two network namespaces made by the test, each a "node"
//! joined by a veth pair, OpenMPI started across them over TCP through `launch/mpirun.sh` and a
//! hostfile (an `plm_rsh_agent` script runs `ip netns exec`); the adapter equals the one-node
//! adapter bitwise, and killing the node of rank 1 ends the job with a message and no output.
//!
//! Needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN) and `ip` (iproute2). Without them the tests fail,
//! unless `EVA_SKIP_NETNS=1` says to skip them.

use super::common::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// The nodes' subnet. Each pair of namespaces has its own veth and nothing routes into them, so
/// concurrent tests (and the host's own networks) never see these addresses.
const SUBNET: &str = "10.88.0";

/// Namespaces made by this test process so far (names are unique per process and test).
static MADE: AtomicUsize = AtomicUsize::new(0);

/// Runs `ip ARGS`; `Err` with its stderr when it fails.
fn ip(args: &[&str]) -> Result<(), String> {
    let o = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run `ip` (install iproute2): {e}"))?;
    if o.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&o.stderr).trim()
        ))
    }
}

/// Pids of the processes inside network namespace `ns`.
fn pids_in(ns: &str) -> Vec<i32> {
    let o = Command::new("ip").args(["netns", "pids", ns]).output();
    o.map(|o| {
        String::from_utf8_lossy(&o.stdout)
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect()
    })
    .unwrap_or_default()
}

/// Kills (SIGKILL) every process inside `ns`; returns how many there were.
fn kill_all_in(ns: &str) -> usize {
    let pids = pids_in(ns);
    for &p in &pids {
        // SAFETY: the processes of a namespace this test made, started by this test.
        unsafe { libc::kill(p, libc::SIGKILL) };
    }
    pids.len()
}

/// Two "nodes": network namespaces joined by a veth pair, with loopback up, node `i` at
/// `10.88.0.(i+1)/24`, a hostfile naming them and an rsh agent that enters them. Dropping it
/// kills what still runs inside and deletes the namespaces (and with them the veths).
struct Nodes {
    names: Vec<String>,
    /// The veth pair's ends (deleted with their namespace; in the host's if moving them failed).
    veths: Vec<String>,
    dir: tempfile::TempDir,
}

impl Nodes {
    /// Makes the nodes, or `None` when `EVA_SKIP_NETNS=1` and namespaces cannot be made here.
    fn create() -> Option<Nodes> {
        let tag = format!(
            "{}x{}",
            std::process::id(),
            MADE.fetch_add(1, Ordering::Relaxed)
        );
        let mut nodes = Nodes {
            names: Vec::new(),
            veths: Vec::new(),
            dir: tempdir(),
        };
        match nodes.wire(&tag) {
            Ok(()) => Some(nodes),
            Err(e) if std::env::var("EVA_SKIP_NETNS").as_deref() == Ok("1") => {
                eprintln!("skipped (EVA_SKIP_NETNS=1): network namespaces unavailable: {e}");
                None
            }
            Err(e) => panic!(
                "network namespaces unavailable ({e}); this test needs root and iproute2, \
                 or EVA_SKIP_NETNS=1 to skip it"
            ),
        }
    }

    /// Makes the namespaces, the veth pair and the addresses; writes the hostfile and agent.
    fn wire(&mut self, tag: &str) -> Result<(), String> {
        self.veths = (0..2).map(|i| format!("e{tag}v{i}")).collect();
        let veths = self.veths.clone();
        for i in 0..2 {
            let ns = format!("eva-test-{tag}-node{i}");
            ip(&["netns", "add", &ns])?;
            self.names.push(ns);
        }
        ip(&[
            "link", "add", &veths[0], "type", "veth", "peer", "name", &veths[1],
        ])?;
        for (i, (ns, veth)) in self.names.iter().zip(&veths).enumerate() {
            ip(&["link", "set", veth, "netns", ns])?;
            let addr = format!("{}/24", self.addr(i));
            ip(&["-n", ns, "addr", "add", &addr, "dev", veth])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
            ip(&["-n", ns, "link", "set", veth, "up"])?;
        }
        let hosts: String = (0..2)
            .map(|i| format!("{} slots=1\n", self.addr(i)))
            .collect();
        std::fs::write(self.hostfile(), hosts).unwrap();
        let cases: String = (0..2)
            .map(|i| format!("    {}) ns={} ;;\n", self.addr(i), self.names[i]))
            .collect();
        // OpenMPI calls the agent as `AGENT HOST COMMAND...` (like ssh: one shell command line).
        let agent = format!(
            "#!/bin/sh\nhost=$1\nshift\ncase $host in\n{cases}    *) echo \"no node $host\" >&2; exit 1 ;;\nesac\n\
             echo \"$ns\" >> {log}\nexec ip netns exec \"$ns\" sh -c \"$*\"\n",
            log = self.agent_log().display()
        );
        std::fs::write(self.agent(), agent).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(self.agent(), std::fs::Permissions::from_mode(0o755)).unwrap();
        Ok(())
    }

    fn addr(&self, i: usize) -> String {
        format!("{SUBNET}.{}", i + 1)
    }

    fn hostfile(&self) -> PathBuf {
        self.dir.path().join("hosts")
    }

    fn agent(&self) -> PathBuf {
        self.dir.path().join("netns-agent.sh")
    }

    /// The namespaces the agent started daemons in, one line per launch.
    fn agent_log(&self) -> PathBuf {
        self.dir.path().join("agent.log")
    }

    /// `launch/mpirun.sh NP ARGS` run inside node 0 (where `mpirun` itself runs), ranks placed
    /// by the hostfile (rank r on node r), TCP only, on the veth subnet only.
    fn mpirun(&self, args: &[&str]) -> Command {
        let script = repo().join("launch/mpirun.sh");
        let subnet = format!("{SUBNET}.0/24");
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.names[0]])
            .arg(script)
            .arg("2")
            .args(args)
            .env("EVA", eva_bin())
            .env("HOSTFILE", self.hostfile())
            .env("OMPI_MCA_plm_rsh_agent", self.agent())
            .env("OMPI_MCA_plm_rsh_no_tree_spawn", "1")
            .env("OMPI_MCA_btl", "tcp,self")
            .env("OMPI_MCA_btl_tcp_if_include", &subnet)
            .env("OMPI_MCA_oob_tcp_if_include", &subnet)
            .env("OPENBLAS_NUM_THREADS", "1");
        c
    }
}

impl Drop for Nodes {
    fn drop(&mut self) {
        for ns in &self.names {
            kill_all_in(ns);
        }
        for ns in &self.names {
            // Deleting a namespace deletes the veth end inside it, and with it the peer.
            let _ = ip(&["netns", "del", ns]);
        }
        for veth in &self.veths {
            // Gone already unless the setup failed before moving it into its namespace.
            let _ = ip(&["link", "del", veth]);
        }
    }
}

fn stderr_of(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

/// The shipped tiny Llama and its text; `--batch-size 16` gives both replicas data each step.
fn tiny_model_args(out: &Path) -> Vec<String> {
    let root = repo();
    [
        "--model",
        root.join("examples/tiny-llama").to_str().unwrap(),
        "--data",
        root.join("examples/data/train.txt").to_str().unwrap(),
        "--batch-size",
        "16",
        "-q",
        "--out",
        out.to_str().unwrap(),
    ]
    .map(String::from)
    .to_vec()
}

fn assert_same_bytes(a: &Path, b: &Path) {
    for f in ["adapter_model.safetensors", "adapter_config.json"] {
        let (x, y) = (
            std::fs::read(a.join(f)).unwrap(),
            std::fs::read(b.join(f)).unwrap(),
        );
        assert!(
            x == y,
            "{f} differs between {} and {}",
            a.display(),
            b.display()
        );
    }
}

#[test]
fn two_namespace_nodes_give_the_one_node_adapter_bitwise() {
    let Some(nodes) = Nodes::create() else {
        return;
    };
    let tmp = tempdir();
    let cases = [
        ("tiny-llama", None),
        (
            "synthetic",
            Some("layers=3,group=2,dim=64,tokens=128,units=30,mean=4"),
        ),
    ];
    for (name, synthetic) in cases {
        let one = tmp.path().join(format!("{name}-one-node"));
        let two = tmp.path().join(format!("{name}-two-nodes"));
        let args = |out: &Path| match synthetic {
            None => tiny_model_args(out),
            Some(spec) => ["--synthetic", spec, "-q", "--out", out.to_str().unwrap()]
                .map(String::from)
                .to_vec(),
        };
        let single: Vec<String> = std::iter::once("init".to_string())
            .chain(args(&one))
            .collect();
        let single: Vec<&str> = single.iter().map(String::as_str).collect();
        let o = eva(&single);
        assert!(o.status.success(), "{name}: {}", stderr_of(&o));
        let a = args(&two);
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        let o = nodes.mpirun(&a).output().unwrap();
        assert!(o.status.success(), "{name}: {}", stderr_of(&o));
        let w = read_adapter(&two);
        assert_eq!(w.report["world_size"], 2, "{name}");
        assert_eq!(w.report["backend"], "mpi", "{name}");
        assert_same_bytes(&one, &two);
    }
    // Rank 1 really ran on the second node: its daemon was started inside that namespace.
    let log = std::fs::read_to_string(nodes.agent_log()).unwrap();
    assert_eq!(log.lines().collect::<Vec<_>>(), vec![&nodes.names[1]; 2]);
}

/// Waits until an eva rank runs inside `ns` (started by `child`), then a little longer.
fn wait_for_rank_in(ns: &str, child: &mut Child) {
    let t = Instant::now();
    loop {
        let eva = pids_in(ns).into_iter().any(|p| {
            std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == "eva")
        });
        if eva {
            break;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the job ended before rank 1 started on node 1: {status}");
        }
        assert!(t.elapsed() < Duration::from_secs(30), "no eva rank in {ns}");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Into the step loop.
    std::thread::sleep(Duration::from_millis(1500));
}

#[test]
fn killing_the_node_of_rank_1_ends_the_job_with_a_message_and_no_output() {
    let Some(nodes) = Nodes::create() else {
        return;
    };
    let tmp = tempdir();
    let out = tmp.path().join("adapter");
    let timeout = 20.0;
    let mut child = nodes
        .mpirun(&[
            "--synthetic",
            "layers=2,dim=128,tokens=512,units=1000000",
            "--no-early-stop",
            "--threads",
            "1",
            "--collective-timeout",
            &timeout.to_string(),
            "--out",
            out.to_str().unwrap(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_rank_in(&nodes.names[1], &mut child);
    assert!(child.try_wait().unwrap().is_none(), "the job ended early");
    // The node fails: every process in it (the OpenMPI daemon and rank 1) dies at once.
    let killed = Instant::now();
    assert!(kill_all_in(&nodes.names[1]) >= 2);
    let o = child.wait_with_output().unwrap();
    let ended = killed.elapsed();
    let err = stderr_of(&o);
    assert!(!o.status.success(), "{err}");
    assert!(
        ended < Duration::from_secs_f64(timeout),
        "the job took {ended:?} to end after the node died: {err}"
    );
    // mpirun names the lost node; rank 0 reports that --out was not written.
    assert!(err.contains(&nodes.addr(1)), "{err}");
    assert!(err.contains("--out was not written"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert_nothing_written(&out);
}
