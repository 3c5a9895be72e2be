//! A private three-node RabbitMQ cluster for the cluster tests, on this machine: three
//! nodes `skald<pid>n<i>@localhost` with ports, data and log directories of their own
//! (owned by the `rabbitmq` user), the same Erlang cookie (the `rabbitmq` user's), the
//! consistent-hash exchange plugin enabled, and a config file whose
//! `listeners.tcp.local` names the node's own port (the machine's config pins 5672).
//! The machine's own broker on 5672 is not touched.
//!
//! Starting a cluster takes about half a minute, so the test process starts one and
//! shares it ([`RabbitCluster::shared`]); tests isolate themselves by namespace as on
//! the shared broker, and take [`RabbitCluster::exclusive`] while they stop nodes, so
//! two tests never take down two nodes (a majority) at once. A watchdog process stops
//! the nodes and removes their directories when the test process exits, however it
//! exits.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Where the RabbitMQ scripts are (Debian's package).
const BIN: &str = "/usr/lib/rabbitmq/bin";
/// The `rabbitmq` user's home: its `.erlang.cookie` is every node's cookie.
const RABBITMQ_HOME: &str = "/var/lib/rabbitmq";

/// One node of the cluster.
pub struct Node {
    /// Its Erlang node name, `skald<pid>n<i>@localhost`.
    pub name: String,
    /// Its AMQP port.
    pub port: u16,
    dist_port: u16,
    dir: PathBuf,
}

/// A running three-node cluster.
pub struct RabbitCluster {
    pub nodes: Vec<Node>,
    /// Seconds the cluster took to start and join.
    pub started_in: Duration,
    exclusive: tokio::sync::Mutex<()>,
}

static SHARED: OnceLock<Option<RabbitCluster>> = OnceLock::new();

impl RabbitCluster {
    /// The test process's cluster, started on first use; `None` (and a message on
    /// stderr) when RabbitMQ is not installed here.
    pub fn shared() -> Option<&'static RabbitCluster> {
        SHARED
            .get_or_init(|| {
                if !Path::new(BIN).join("rabbitmq-server").exists() {
                    eprintln!(
                        "SKIPPED: rabbitmq-server is not installed ({BIN}/rabbitmq-server \
                         is missing), so no private RabbitMQ cluster can be started"
                    );
                    return None;
                }
                Some(RabbitCluster::start())
            })
            .as_ref()
    }

    /// Held while a test stops and starts nodes, or needs every node up throughout.
    pub async fn exclusive(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.exclusive.lock().await
    }

    fn start() -> RabbitCluster {
        let started = Instant::now();
        let base = std::env::temp_dir().join(format!("skald-it-cluster-{}", std::process::id()));
        let nodes: Vec<Node> = (1..=3)
            .map(|i| Node {
                name: format!("skald{}n{i}@localhost", std::process::id()),
                port: free_port(),
                dist_port: free_port(),
                dir: base.join(format!("n{i}")),
            })
            .collect();
        watchdog(&nodes, &base);
        for node in &nodes {
            node.prepare();
            node.spawn();
        }
        for node in &nodes {
            node.wait_running();
        }
        for node in &nodes[1..] {
            ctl_ok(&node.name, &["stop_app"]);
            ctl_ok(&node.name, &["join_cluster", &nodes[0].name]);
            ctl_ok(&node.name, &["start_app"]);
        }
        let cluster = RabbitCluster {
            nodes,
            started_in: started.elapsed(),
            exclusive: Default::default(),
        };
        eprintln!(
            "private RabbitMQ cluster on ports {:?} started in {:.1?}",
            cluster.nodes.iter().map(|n| n.port).collect::<Vec<_>>(),
            cluster.started_in
        );
        cluster
    }

    /// `AMQP_URL` listing every node, in node order.
    pub fn amqp_url(&self) -> String {
        self.nodes
            .iter()
            .map(Node::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Stops RabbitMQ on node `i` (0-based): its connections close, its queue
    /// replicas go down; the Erlang VM stays for [`RabbitCluster::start_node`].
    pub fn stop_node(&self, i: usize) {
        ctl_ok(&self.nodes[i].name, &["stop_app"]);
    }

    /// Starts RabbitMQ on node `i` again and waits until it is back in the cluster.
    pub fn start_node(&self, i: usize) {
        ctl_ok(&self.nodes[i].name, &["start_app"]);
        self.nodes[i].wait_running();
    }

    /// Runs `rabbitmqctl` with `args` on the first node where it succeeds (a node whose
    /// RabbitMQ is stopped refuses most commands); its standard output.
    pub fn ctl(&self, args: &[&str]) -> String {
        let mut failures = Vec::new();
        for node in &self.nodes {
            match ctl(&node.name, args) {
                Ok(out) if out.status.success() => {
                    return String::from_utf8_lossy(&out.stdout).to_string();
                }
                Ok(out) => failures.push(String::from_utf8_lossy(&out.stderr).to_string()),
                Err(e) => failures.push(e.to_string()),
            }
        }
        panic!("rabbitmqctl {args:?} failed on every node: {failures:?}")
    }

    /// The index of the node that leads most of `queues` (quorum queues), and how many
    /// of them it leads.
    pub fn leader_of_most(&self, queues: &[String]) -> (usize, usize) {
        let listed = self.ctl(&["list_queues", "name", "leader", "--formatter", "json", "-q"]);
        let rows: Vec<serde_json::Value> =
            serde_json::from_str(listed.trim()).expect("list_queues JSON");
        let mut led = vec![0; self.nodes.len()];
        for row in rows {
            if queues.iter().any(|q| row["name"] == q.as_str())
                && let Some(i) = self.nodes.iter().position(|n| row["leader"] == n.name)
            {
                led[i] += 1;
            }
        }
        let (i, n) = led
            .iter()
            .enumerate()
            .max_by_key(|(_, n)| **n)
            .expect("three nodes");
        (i, *n)
    }

    /// The type of `queue`, as `rabbitmqctl list_queues type` reports it (`classic`,
    /// `quorum`), or `None` when it does not exist.
    pub fn queue_type(&self, queue: &str) -> Option<String> {
        let listed = self.ctl(&["list_queues", "name", "type", "--formatter", "json", "-q"]);
        let rows: Vec<serde_json::Value> =
            serde_json::from_str(listed.trim()).expect("list_queues JSON");
        rows.iter()
            .find(|r| r["name"] == queue)
            .and_then(|r| r["type"].as_str().map(str::to_string))
    }
}

impl Node {
    /// Its `AMQP_URL`.
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// Waits (up to two minutes) until RabbitMQ runs on it: a detached node registers
    /// its name a moment after `rabbitmq-server -detached` returns.
    fn wait_running(&self) {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let out =
                ctl(&self.name, &["await_startup", "--timeout", "120"]).expect("rabbitmqctl runs");
            if out.status.success() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not start (logs in {}): {}",
                self.name,
                self.dir.join("log").display(),
                String::from_utf8_lossy(&out.stdout)
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    fn prepare(&self) {
        std::fs::create_dir_all(self.dir.join("mnesia")).expect("node directory");
        std::fs::create_dir_all(self.dir.join("log")).expect("node directory");
        // `guest` may log in from 127.0.0.1 only, which is where the tests are.
        std::fs::write(
            self.dir.join("rabbitmq.conf"),
            format!("listeners.tcp.local = 127.0.0.1:{}\n", self.port),
        )
        .expect("node config");
        std::fs::write(
            self.dir.join("enabled_plugins"),
            "[rabbitmq_consistent_hash_exchange].\n",
        )
        .expect("node plugins");
        // Not the machine's rabbitmq-env.conf: it names the machine's node.
        std::fs::write(self.dir.join("rabbitmq-env.conf"), "").expect("node env file");
        let status = Command::new("chown")
            .args(["-R", "rabbitmq:rabbitmq"])
            .arg(self.dir.parent().expect("base directory"))
            .status()
            .expect("chown runs");
        assert!(status.success(), "chown the cluster directory to rabbitmq");
    }

    fn spawn(&self) {
        let dir = |name: &str| self.dir.join(name).display().to_string();
        let status = as_rabbitmq("rabbitmq-server")
            .arg("-detached")
            .env("RABBITMQ_CONF_ENV_FILE", dir("rabbitmq-env.conf"))
            .env("RABBITMQ_NODENAME", &self.name)
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", dir("mnesia"))
            .env("RABBITMQ_LOG_BASE", dir("log"))
            .env("RABBITMQ_PID_FILE", dir("pid"))
            .env("RABBITMQ_CONFIG_FILE", dir("rabbitmq.conf"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir("enabled_plugins"))
            .env("ERL_EPMD_ADDRESS", "127.0.0.1")
            .env(
                "RABBITMQ_SERVER_START_ARGS",
                "-kernel inet_dist_use_interface {127,0,0,1}",
            )
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("rabbitmq-server runs");
        assert!(
            status.success(),
            "rabbitmq-server -detached for {}",
            self.name
        );
    }
}

/// A RabbitMQ script run as the `rabbitmq` user (whose cookie every node shares).
fn as_rabbitmq(script: &str) -> Command {
    let path = Path::new(BIN).join(script);
    let mut cmd = if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "rabbitmq", "--"]).arg(path);
        c
    } else {
        Command::new(path)
    };
    cmd.env("HOME", RABBITMQ_HOME).current_dir("/");
    cmd
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn ctl(node: &str, args: &[&str]) -> std::io::Result<std::process::Output> {
    as_rabbitmq("rabbitmqctl")
        .args(["-n", node])
        .args(args)
        .output()
}

fn ctl_ok(node: &str, args: &[&str]) -> String {
    let out = ctl(node, args).expect("rabbitmqctl runs");
    assert!(
        out.status.success(),
        "rabbitmqctl -n {node} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// Stops the nodes and removes `base` once this test process has exited (a process of
/// its own: statics are never dropped, and a failed test must not leave nodes behind).
#[expect(
    clippy::zombie_processes,
    reason = "the watchdog must outlive this process, so it is never waited for"
)]
fn watchdog(nodes: &[Node], base: &Path) {
    let ctl = Path::new(BIN).join("rabbitmqctl");
    let runas = if is_root() {
        "runuser -u rabbitmq -- "
    } else {
        ""
    };
    let stops: String = nodes
        .iter()
        .map(|n| {
            format!(
                "HOME={RABBITMQ_HOME} {runas}{} -n {} stop >/dev/null 2>&1; ",
                ctl.display(),
                n.name
            )
        })
        .collect();
    let script = format!(
        "while kill -0 {pid} 2>/dev/null; do sleep 1; done; {stops} rm -rf '{base}'",
        pid = std::process::id(),
        base = base.display()
    );
    Command::new("sh")
        .args(["-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the cluster's watchdog");
}
