//! A private `redis-server` for a test: on a free port, with a data directory of its
//! own, configured to keep what it acknowledged (`appendonly yes`, `appendfsync
//! always`) — unlike the machine's shared Redis — so a test may kill and restart it
//! and find every acknowledged message again.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running private Redis, stopped and its directory removed when dropped.
pub struct RedisServer {
    child: Child,
    port: u16,
    dir: PathBuf,
    /// Settings on top of the durable defaults (`--requirepass`, `--replicaof`…).
    extra: Vec<String>,
    /// The password `redis-cli` gives (`--requirepass`).
    password: Option<String>,
}

impl RedisServer {
    /// Starts one and waits until it answers.
    pub fn start() -> RedisServer {
        Self::start_with(&[])
    }

    /// [`RedisServer::start`] with more `redis-server` settings, e.g.
    /// `["--requirepass", "secret"]` (which `cli` then gives).
    pub fn start_with(extra: &[&str]) -> RedisServer {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let dir = std::env::temp_dir().join(format!("skald-it-redis-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("redis data directory");
        let extra: Vec<String> = extra.iter().map(|a| a.to_string()).collect();
        let password = extra
            .iter()
            .position(|a| a == "--requirepass")
            .and_then(|i| extra.get(i + 1).cloned());
        let child = spawn(port, &dir, &extra);
        let server = RedisServer {
            child,
            port,
            dir,
            extra,
            password,
        };
        server.wait_ready();
        server
    }

    /// A replica of this server (`--replicaof`), started once it has caught up with
    /// it (`master_link_status:up`).
    pub fn replica(&self) -> RedisServer {
        let port = self.port.to_string();
        let replica = RedisServer::start_with(&["--replicaof", "127.0.0.1", &port]);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !replica
            .cli(&["INFO", "replication"])
            .contains("master_link_status:up")
        {
            assert!(Instant::now() < deadline, "the replica did not catch up");
            std::thread::sleep(Duration::from_millis(50));
        }
        replica
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Its URL, for `REDIS_URL`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills it (SIGKILL: no shutdown save) and starts it again on the same port and
    /// data, waiting until it has loaded its append-only file.
    pub fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = spawn(self.port, &self.dir, &self.extra);
        self.wait_ready();
    }

    /// Runs `redis-cli` against it with `args`; its output.
    pub fn cli(&self, args: &[&str]) -> String {
        let mut cli = Command::new("redis-cli");
        cli.args(["-p", &self.port.to_string()]);
        if let Some(password) = &self.password {
            cli.args(["-a", password, "--no-auth-warning"]);
        }
        let out = cli.args(args).output().expect("redis-cli runs");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.cli(&["PING"]) != "PONG" {
            assert!(
                Instant::now() < deadline,
                "redis-server on {} did not start",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn spawn(port: u16, dir: &std::path::Path, extra: &[String]) -> Child {
    Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args([
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--save",
            "",
        ])
        .arg("--dir")
        .arg(dir)
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server is installed (.ci/run installs it)")
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
