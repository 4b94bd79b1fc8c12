//! A private `redis-server` on a free port, for tests that stop and restart
//! Redis without disturbing the shared one. Killed when dropped.

use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
    /// Persistence arguments (default: none, like the shared Redis).
    persistence: Vec<String>,
}

impl RedisServer {
    pub async fn start() -> RedisServer {
        RedisServer::start_with(&["--save", "", "--appendonly", "no"]).await
    }

    /// Starts with these persistence arguments instead, e.g. an AOF with
    /// `--appendfsync always` in a temp `--dir`; restarts reuse them.
    pub async fn start_with(persistence: &[&str]) -> RedisServer {
        let mut s = RedisServer {
            port: super::free_port(),
            child: None,
            persistence: persistence.iter().map(|a| a.to_string()).collect(),
        };
        s.restart().await;
        s
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub async fn restart(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(&self.persistence)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("redis-server must be installed (scripts/services.sh installs it)");
        self.child = Some(child);
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_ok()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("private redis-server did not start on port {}", self.port);
    }

    /// SIGKILL: no goodbye to clients.
    pub async fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill().await;
        }
    }
}
