//! The real binary, started the way a user or a service manager starts it:
//! from a directory that is not the repository, so the page must come from
//! the binary itself. `STATIC_DIR` still overrides it. SIGTERM stops it cleanly.
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The two tests run one at a time: each finds its port by binding port 0 and
/// letting it go, and two at once could be handed the same port.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

struct Relay {
    child: Child,
    port: u16,
}

impl Relay {
    /// Starts the binary on a free port and waits until it answers
    /// `/healthz`. The port is found by binding port 0 and letting it go, so
    /// another process may take it before the binary binds it: then the
    /// binary exits, and this starts it again on another port.
    async fn start(dir: &std::path::Path, extra: &[(&str, &str)]) -> Relay {
        for _ in 0..5 {
            let mut relay = Relay::spawn(dir, extra);
            if relay.wait_healthy().await {
                return relay;
            }
        }
        panic!("the binary did not start on a free port in 5 tries");
    }

    fn spawn(dir: &std::path::Path, extra: &[(&str, &str)]) -> Relay {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_chat-relay"));
        cmd.current_dir(dir)
            .env_clear()
            .env("BIND", format!("127.0.0.1:{port}"))
            .env(
                "DATABASE_URL",
                format!("sqlite://{}/relay.db", dir.display()),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        for (k, v) in extra {
            cmd.env(k, v);
        }
        Relay {
            child: cmd.spawn().expect("start the binary"),
            port,
        }
    }

    /// Raw HTTP/1.1 GET: status, lower-cased headers, body.
    async fn get(
        &self,
        path: &str,
        headers: &[(&str, &str)],
    ) -> (u16, Vec<(String, String)>, String) {
        self.try_get(path, headers).await.expect("GET")
    }

    async fn try_get(
        &self,
        path: &str,
        headers: &[(&str, &str)],
    ) -> std::io::Result<(u16, Vec<(String, String)>, String)> {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await?;
        let extra: String = headers
            .iter()
            .map(|(k, v)| format!("{k}: {v}\r\n"))
            .collect();
        let req =
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n{extra}\r\n");
        s.write_all(req.as_bytes()).await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let mut lines = head.lines();
        let status = lines
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let hdrs = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        Ok((status, hdrs, body.to_string()))
    }

    /// True once this binary answers `/healthz`; false if it exited first
    /// (its port was taken). Whoever holds the port, only a live child
    /// counts.
    async fn wait_healthy(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let healthy = self
                .try_get("/healthz", &[])
                .await
                .is_ok_and(|(status, _, _)| status == 200);
            // Checked after the probe, so a healthy answer from whoever else
            // holds the port never counts once this child has exited.
            if let Ok(Some(_)) = self.child.try_wait() {
                return false;
            }
            if healthy {
                return true;
            }
            assert!(
                Instant::now() < deadline,
                "the binary did not become healthy"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGTERM, then the exit status.
    fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("no exit within 20 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn header<'a>(h: &'a [(String, String)], name: &str) -> Option<&'a str> {
    h.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

#[tokio::test]
async fn the_binary_serves_its_embedded_page_from_any_directory() {
    let _one = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let relay = Relay::start(dir.path(), &[]).await;

    let (status, h, body) = relay.get("/", &[]).await;
    assert_eq!(status, 200);
    assert!(
        header(&h, "content-type").is_some_and(|c| c.starts_with("text/html")),
        "{h:?}"
    );
    assert!(body.contains("<title>"), "the page: {body:.200}");
    assert_eq!(header(&h, "cache-control"), Some("no-cache"));
    let etag = header(&h, "etag").expect("an ETag").to_string();

    let (status, h, _) = relay.get("/app.js", &[]).await;
    assert_eq!(status, 200);
    assert!(
        header(&h, "content-type").is_some_and(|c| c.contains("javascript")),
        "{h:?}"
    );
    let (status, _, body) = relay.get("/", &[("If-None-Match", &etag)]).await;
    assert_eq!((status, body.as_str()), (304, ""));
    let (status, _, _) = relay.get("/no-such-file.js", &[]).await;
    assert_eq!(status, 404);

    assert!(relay.terminate().success(), "a clean exit on SIGTERM");
}

#[tokio::test]
async fn static_dir_overrides_the_embedded_page() {
    let _one = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let site = dir.path().join("site");
    std::fs::create_dir(&site).expect("mkdir");
    std::fs::write(site.join("index.html"), "<p>development copy</p>").expect("write");
    let relay = Relay::start(dir.path(), &[("STATIC_DIR", site.to_str().expect("path"))]).await;
    let (status, _, body) = relay.get("/", &[]).await;
    assert_eq!((status, body.as_str()), (200, "<p>development copy</p>"));
    assert!(relay.terminate().success());
}

/// The runtime's worker threads, as the relay's `/metrics` reports them.
async fn worker_threads(relay: &Relay) -> usize {
    let (status, _, body) = relay.get("/metrics", &[]).await;
    assert_eq!(status, 200);
    body.lines()
        .find_map(|l| l.strip_prefix("runtime_worker_threads "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .expect("runtime_worker_threads in /metrics") as usize
}

#[tokio::test]
async fn worker_threads_sets_the_runtime_size() {
    let _one = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().expect("tempdir");
    for (set, want) in [("1", 1), ("3", 3)] {
        let relay = Relay::start(dir.path(), &[("WORKER_THREADS", set)]).await;
        assert_eq!(worker_threads(&relay).await, want, "WORKER_THREADS={set}");
        assert!(relay.terminate().success());
    }
    // 0 (the default) leaves it to Tokio: one per core, or TOKIO_WORKER_THREADS.
    let relay = Relay::start(dir.path(), &[("TOKIO_WORKER_THREADS", "2")]).await;
    assert_eq!(worker_threads(&relay).await, 2);
    assert!(relay.terminate().success());
}
