//! The real binary, started the way a user or a service manager starts it:
//! from a directory that is not the repository, so the page must come from
//! the binary itself. `STATIC_DIR` still overrides it. SIGTERM stops it cleanly.
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Relay {
    child: Child,
    port: u16,
}

impl Relay {
    fn start(dir: &std::path::Path, extra: &[(&str, &str)]) -> Relay {
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
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .expect("connect");
        let extra: String = headers
            .iter()
            .map(|(k, v)| format!("{k}: {v}\r\n"))
            .collect();
        let req =
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n{extra}\r\n");
        s.write_all(req.as_bytes()).await.expect("write");
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.expect("read");
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
        (status, hdrs, body.to_string())
    }

    async fn wait_healthy(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_ok()
                && self.get("/healthz", &[]).await.0 == 200
            {
                return;
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
    let dir = tempfile::tempdir().expect("tempdir");
    let relay = Relay::start(dir.path(), &[]);
    relay.wait_healthy().await;

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
    let dir = tempfile::tempdir().expect("tempdir");
    let site = dir.path().join("site");
    std::fs::create_dir(&site).expect("mkdir");
    std::fs::write(site.join("index.html"), "<p>development copy</p>").expect("write");
    let relay = Relay::start(dir.path(), &[("STATIC_DIR", site.to_str().expect("path"))]);
    relay.wait_healthy().await;
    let (status, _, body) = relay.get("/", &[]).await;
    assert_eq!((status, body.as_str()), (200, "<p>development copy</p>"));
    assert!(relay.terminate().success());
}
