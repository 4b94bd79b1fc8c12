//! A raw STOMP-over-WebSocket test client: frames are written by hand as the
//! spec shows them (so the tests say exactly what goes on the wire), and the
//! server's frames are read back with the relay's own decoder.

use std::time::Duration;

use chat_relay::gateway::stomp::frame::{Command, DecodeLimits, Decoder, Frame};
use futures::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use super::app::{RECV, Ws};

pub struct Stomp {
    pub ws: Ws,
    decoder: Decoder,
    /// The subprotocol the server chose at the upgrade.
    pub protocol: Option<String>,
    /// Heart-beats (bare EOL messages) received so far.
    pub heartbeats: usize,
}

/// How a read ended when it did not yield a frame.
#[derive(Debug, PartialEq, Eq)]
pub enum End {
    Timeout,
    /// Closed, with the close code when there was one.
    Closed(Option<u16>),
}

impl Stomp {
    /// Opens `ws://127.0.0.1:{port}{path}` offering the stompjs subprotocols.
    pub async fn open(port: u16, path_and_query: &str) -> Stomp {
        let url = format!("ws://127.0.0.1:{port}{path_and_query}");
        let mut req = url.into_client_request().expect("request");
        req.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            "v10.stomp, v11.stomp, v12.stomp".parse().expect("header"),
        );
        let (ws, resp) = tokio_tungstenite::connect_async(req)
            .await
            .expect("stomp upgrade");
        let protocol = resp
            .headers()
            .get("sec-websocket-protocol")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        Stomp {
            ws,
            decoder: Decoder::new(DecodeLimits {
                max_frame: 1 << 20,
                max_headers: 64,
                max_header_line: 1 << 16,
            }),
            protocol,
            heartbeats: 0,
        }
    }

    /// Opens and sends `CONNECT` with `login` and the given extra headers;
    /// returns the client and the server's first frame.
    pub async fn connect(port: u16, login: &str, extra: &[(&str, &str)]) -> (Stomp, Frame) {
        let mut s = Stomp::open(port, "/stomp").await;
        let mut h = vec![
            ("accept-version", "1.2,1.1,1.0"),
            ("host", "localhost"),
            ("heart-beat", "0,0"),
            ("login", login),
        ];
        h.retain(|(k, _)| !extra.iter().any(|(e, _)| e == k));
        h.extend_from_slice(extra);
        s.frame("CONNECT", &h, "").await;
        let f = s.recv().await;
        (s, f)
    }

    /// Sends one frame as one WebSocket text message.
    pub async fn frame(&mut self, command: &str, headers: &[(&str, &str)], body: &str) {
        let mut out = format!("{command}\n");
        for (k, v) in headers {
            out.push_str(&format!("{k}:{v}\n"));
        }
        out.push('\n');
        out.push_str(body);
        out.push('\0');
        self.raw(&out).await;
    }

    pub async fn raw(&mut self, text: &str) {
        self.ws
            .send(Message::Text(text.to_string().into()))
            .await
            .expect("ws send");
    }

    pub async fn subscribe(&mut self, id: &str, destination: &str) -> Frame {
        let receipt = format!("sub-{id}");
        self.frame(
            "SUBSCRIBE",
            &[
                ("id", id),
                ("destination", destination),
                ("receipt", &receipt),
            ],
            "",
        )
        .await;
        // This subscription's members MESSAGE (other subscriptions' frames
        // may come first), then the receipt.
        let members = loop {
            let f = self.recv_command(Command::Message).await;
            let v: serde_json::Value = serde_json::from_slice(&f.body).expect("json body");
            if f.header("subscription") == Some(id) && v["event"] == "members" {
                break f;
            }
        };
        let r = self.recv_command(Command::Receipt).await;
        assert_eq!(r.header("receipt-id"), Some(receipt.as_str()));
        members
    }

    /// `SEND`s `{"roomId", "content"}` with a receipt; returns the message id
    /// the receipt carries.
    pub async fn send(&mut self, destination: &str, room_id: &str, content: &str) -> String {
        let body = serde_json::json!({"roomId": room_id, "content": content}).to_string();
        self.frame(
            "SEND",
            &[
                ("destination", destination),
                ("content-type", "application/json"),
                ("receipt", "send"),
            ],
            &body,
        )
        .await;
        let r = self.recv_command(Command::Receipt).await;
        r.header("message-id").expect("message-id").to_string()
    }

    /// The next frame; panics on timeout or close.
    pub async fn recv(&mut self) -> Frame {
        match self.next(RECV).await {
            Ok(f) => f,
            Err(e) => panic!("no STOMP frame: {e:?}"),
        }
    }

    /// Skips frames until one with `command`.
    pub async fn recv_command(&mut self, command: Command) -> Frame {
        loop {
            let f = self.recv().await;
            if f.command == command {
                return f;
            }
        }
    }

    /// The next `MESSAGE`'s JSON body.
    pub async fn recv_message(&mut self) -> (Frame, serde_json::Value) {
        let f = self.recv_command(Command::Message).await;
        let v = serde_json::from_slice(&f.body).expect("json body");
        (f, v)
    }

    /// The next frame within `wait`, or how the stream ended.
    pub async fn next(&mut self, wait: Duration) -> Result<Frame, End> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some(f) = self.decoder.next_frame().expect("server frames decode") {
                return Ok(f);
            }
            let m = match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => return Err(End::Timeout),
                Ok(m) => m,
            };
            match m {
                Some(Ok(Message::Text(t))) => {
                    if t.as_str().trim_matches(['\r', '\n']).is_empty() {
                        self.heartbeats += 1;
                    }
                    self.decoder.extend(t.as_str().as_bytes());
                }
                Some(Ok(Message::Binary(b))) => self.decoder.extend(&b),
                Some(Ok(Message::Close(f))) => {
                    return Err(End::Closed(f.map(|f| u16::from(f.code))));
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return Err(End::Closed(None)),
            }
        }
    }

    /// Expects an `ERROR` frame and then the close: returns the ERROR.
    pub async fn expect_error(&mut self) -> Frame {
        let f = self.recv_command(Command::Error).await;
        assert!(
            f.header("message").is_some_and(|m| !m.is_empty()),
            "ERROR carries a message header: {f:?}"
        );
        loop {
            match self.next(RECV).await {
                Ok(_) => continue,
                Err(End::Closed(_)) => return f,
                Err(End::Timeout) => panic!("the connection stayed open after ERROR"),
            }
        }
    }
}
