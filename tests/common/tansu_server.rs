//! A private tansu (Kafka-protocol broker) on a free port, for tests that
//! kill, restart or stall the broker. With SQLite storage ([`TansuServer::start`])
//! the file keeps topics, the log and committed offsets across a restart, as
//! a real Kafka broker's disk does; with memory storage
//! ([`TansuServer::start_memory`]) it is the shared broker's engine.

use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

pub struct TansuServer {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
    memory: bool,
}

impl TansuServer {
    pub async fn start() -> TansuServer {
        Self::start_with(false).await
    }

    /// Memory storage, as the shared broker runs (nothing survives a restart).
    pub async fn start_memory() -> TansuServer {
        Self::start_with(true).await
    }

    async fn start_with(memory: bool) -> TansuServer {
        let port = super::free_port();
        let mut s = TansuServer {
            port,
            dir: tempfile::tempdir().expect("tempdir"),
            child: None,
            memory,
        };
        s.restart().await;
        s
    }

    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub async fn restart(&mut self) {
        let bin = std::env::var("TANSU_BIN").unwrap_or_else(|_| {
            let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
            format!("{home}/.cargo/bin/tansu")
        });
        let url = format!("tcp://127.0.0.1:{}", self.port);
        // Four slashes: tansu drops the URL's leading "/" from the path.
        let storage = if self.memory {
            "memory://tansu/".to_string()
        } else {
            format!("sqlite:///{}/tansu.db", self.dir.path().display())
        };
        let log = std::fs::File::create(self.dir.path().join("tansu.log")).expect("log");
        let child = Command::new(&bin)
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
                "--storage-engine",
                &storage,
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {bin} (run scripts/services.sh): {e}"));
        self.child = Some(child);
        for _ in 0..150 {
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_ok()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let log = std::fs::read_to_string(self.dir.path().join("tansu.log")).unwrap_or_default();
        panic!("tansu did not listen on {}: {log}", self.port);
    }

    /// SIGKILL: no clean shutdown, as in a crash.
    pub async fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill().await;
            let _ = c.wait().await;
        }
    }

    /// SIGSTOP / SIGCONT: the broker stops answering without closing a
    /// connection, as a broker stalled by GC, disk or an overloaded host.
    pub fn pause(&self, stopped: bool) {
        let Some(pid) = self.child.as_ref().and_then(|c| c.id()) else {
            return;
        };
        let sig = if stopped { "-STOP" } else { "-CONT" };
        let ok = std::process::Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill {sig} {pid} failed");
    }
}
