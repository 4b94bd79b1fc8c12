//! Auth (JWT HS256 and ES256), browser-origin checks and resource limits,
//! against a real relay on port 0 with real WebSocket clients.

mod common;

use std::time::Duration;

use common::app::{Client, TestApp, http_get, spawn_app, sqlite_db, test_config};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const SECRET: &str = "a-test-secret-that-is-at-least-32-bytes-long";

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

fn hs256(secret: &str, claims: Value) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("encode")
}

/// Opens a WebSocket with extra headers: the client, or the refusal's HTTP
/// status and JSON body.
async fn try_ws(url: &str, headers: &[(&str, &str)]) -> Result<Client, (u16, Value)> {
    let mut req = url.into_client_request().expect("request");
    for (k, v) in headers {
        req.headers_mut().insert(
            axum::http::HeaderName::from_bytes(k.as_bytes()).expect("name"),
            v.parse().expect("value"),
        );
    }
    match tokio_tungstenite::connect_async(req).await {
        Ok((ws, _)) => Ok(Client::from_ws(ws)),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            let status = resp.status().as_u16();
            let body = resp
                .body()
                .as_ref()
                .and_then(|b| serde_json::from_slice(b).ok())
                .unwrap_or(Value::Null);
            Err((status, body))
        }
        Err(e) => panic!("unexpected WebSocket error: {e}"),
    }
}

fn refused(r: Result<Client, (u16, Value)>) -> (u16, Value) {
    match r {
        Ok(_) => panic!("the upgrade should have been refused"),
        Err(e) => e,
    }
}

async fn app_with(f: impl FnOnce(&mut chat_relay::config::Config)) -> (tempfile::TempDir, TestApp) {
    let (dir, db) = sqlite_db();
    let mut cfg = test_config(&db);
    f(&mut cfg);
    (dir, spawn_app(cfg).await)
}

fn ws(app: &TestApp, query: &str) -> String {
    format!("ws://127.0.0.1:{}/ws?{query}", app.port)
}

#[tokio::test]
async fn hs256_tokens_decide_who_you_are_and_where_you_may_go() {
    let (_d, app) = app_with(|c| c.auth.auth_jwt_secret = Some(SECRET.into())).await;
    let exp = now() + 600;

    // No token, a forged one, an expired one: 401 with a JSON reason.
    let (s, body) = refused(try_ws(&ws(&app, "user=alice"), &[]).await);
    assert_eq!(
        (s, body["error"]["code"].as_str()),
        (401, Some("unauthorized"))
    );
    let forged = hs256(
        "another-secret-that-is-also-32-bytes-long!!",
        json!({"sub": "alice", "exp": exp}),
    );
    let (s, _) = refused(try_ws(&ws(&app, &format!("token={forged}")), &[]).await);
    assert_eq!(s, 401, "forged signature");
    let expired = hs256(SECRET, json!({"sub": "alice", "exp": now() - 3600}));
    let (s, body) = refused(try_ws(&ws(&app, &format!("token={expired}")), &[]).await);
    assert_eq!(s, 401, "expired");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("Expired")
    );
    let tampered = {
        // Re-sign nothing: swap the payload of a valid token.
        let good = hs256(SECRET, json!({"sub": "alice", "exp": exp}));
        let evil = hs256(
            "x-secret-x-secret-x-secret-x-secret-x",
            json!({"sub": "admin", "exp": exp}),
        );
        let g: Vec<&str> = good.split('.').collect();
        let e: Vec<&str> = evil.split('.').collect();
        format!("{}.{}.{}", g[0], e[1], g[2])
    };
    let (s, _) = refused(try_ws(&ws(&app, &format!("token={tampered}")), &[]).await);
    assert_eq!(s, 401, "tampered payload");

    // A valid token: the name is `sub`, whatever ?user= says.
    let alice = hs256(
        SECRET,
        json!({"sub": "alice", "exp": exp, "rooms": ["chat.guild*", "ai.quest1"]}),
    );
    let mut a = try_ws(&ws(&app, &format!("user=mallory&token={alice}")), &[])
        .await
        .expect("valid token connects");
    a.join("chat.guild-red", None).await;
    a.say("chat.guild-red", "hi").await;
    let m = a.recv_type("message").await;
    assert_eq!(m["user"], "alice", "the token's sub, not ?user=");

    // The rooms claim: prefixes and exact ids; anything else is forbidden.
    a.join("ai.quest1", None).await;
    a.send(json!({"type": "join", "room": "ai.quest2"})).await;
    let e = a.recv_type("error").await;
    assert_eq!(e["code"], "forbidden", "{e}");
    a.send(json!({"type": "send", "room": "ai.quest2", "text": "sneak", "cid": "x"}))
        .await;
    assert_eq!(a.recv_type("error").await["code"], "not_joined");

    // Authorization: Bearer works too, and a token without `rooms` allows all.
    let bob = hs256(SECRET, json!({"sub": "bob", "exp": exp}));
    let mut b = try_ws(
        &ws(&app, ""),
        &[("authorization", &format!("Bearer {bob}"))],
    )
    .await
    .expect("bearer header connects");
    b.join("ai.anything", None).await;

    // POST needs the token too; the author is `sub`; rooms are enforced.
    let url = app.http("/api/rooms/chat.guild-blue/messages");
    let (s, _) = post(&url, None, r#"{"user":"alice","text":"no token"}"#).await;
    assert_eq!(s, 401);
    let (s, v) = post(
        &url,
        Some(&alice),
        r#"{"user":"mallory","text":"with token"}"#,
    )
    .await;
    assert_eq!(s, 202, "{v}");
    let (s, v) = get_with(&url, &alice).await;
    assert_eq!(s, 200, "{v}");
    let (s, _) = common::app::http_get(&app.http("/api/stats")).await;
    assert_eq!(s, 401, "stats without a token");
    let (s, v) = post(
        &app.http("/api/rooms/ai.other/messages"),
        Some(&alice),
        r#"{"text":"x"}"#,
    )
    .await;
    assert_eq!((s, v["error"]["code"].as_str()), (403, Some("forbidden")));
    // History is read with the token too.
    let (s, _) = common::app::http_get(&url).await;
    assert_eq!(s, 401, "history without a token");
    let (s, _) = get_with(&app.http("/api/rooms/ai.other/messages"), &alice).await;
    assert_eq!(s, 403, "history of a room the token does not allow");
    common::app::eventually(Duration::from_secs(10), "POSTed message stored", || {
        let store = app.store.clone();
        async move {
            let room = chat_relay::protocol::RoomId::parse("chat.guild-blue").expect("room");
            store
                .history(&room, None, 10)
                .await
                .map(|m| m.len() == 1 && m[0].user == "alice")
                .unwrap_or(false)
        }
    })
    .await;
    app.stop().await;
}

async fn get_with(url: &str, token: &str) -> (u16, Value) {
    request("GET", url, Some(token), None).await
}

async fn post(url: &str, token: Option<&str>, body: &str) -> (u16, Value) {
    request("POST", url, token, Some(body)).await
}

async fn request(method: &str, url: &str, token: Option<&str>, body: Option<&str>) -> (u16, Value) {
    let bearer = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = bearer
        .as_deref()
        .map(|b| ("Authorization", b))
        .into_iter()
        .collect();
    common::app::http_request_with_headers(method, url, &headers, body).await
}

/// ES256 with a PEM public key made by `openssl` (present wherever the test
/// command runs; the test fails rather than skips without it).
#[tokio::test]
async fn es256_public_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = |name: &str| {
        let private = dir.path().join(format!("{name}.pem"));
        let public = dir.path().join(format!("{name}.pub.pem"));
        let run = |args: &[&str]| {
            let out = std::process::Command::new("openssl")
                .args(args)
                .output()
                .expect("openssl must be installed for this test");
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        run(&[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            private.to_str().expect("path"),
        ]);
        run(&[
            "pkey",
            "-in",
            private.to_str().expect("path"),
            "-pubout",
            "-out",
            public.to_str().expect("path"),
        ]);
        (std::fs::read(private).expect("read"), public)
    };
    let (good_private, good_public) = key("good");
    let (evil_private, _) = key("evil");
    let sign = |pem: &[u8], sub: &str| {
        jsonwebtoken::encode(
            &Header::new(Algorithm::ES256),
            &json!({"sub": sub, "exp": now() + 600}),
            &EncodingKey::from_ec_pem(pem).expect("ec key"),
        )
        .expect("encode")
    };
    let (_d, app) =
        app_with(|c| c.auth.auth_jwt_public_key = Some(good_public.to_string_lossy().into_owned()))
            .await;
    let mut c = try_ws(
        &ws(&app, &format!("token={}", sign(&good_private, "carol"))),
        &[],
    )
    .await
    .expect("ES256 token connects");
    c.join("chat.es", None).await;
    c.say("chat.es", "signed").await;
    assert_eq!(c.recv_type("message").await["user"], "carol");
    let (s, _) = refused(
        try_ws(
            &ws(&app, &format!("token={}", sign(&evil_private, "carol"))),
            &[],
        )
        .await,
    );
    assert_eq!(s, 401, "signed by another key");
    // An HS256 token made with the public key as secret (algorithm confusion).
    let confused = hs256(
        &std::fs::read_to_string(&good_public).expect("pem"),
        json!({"sub": "carol", "exp": now() + 600}),
    );
    let (s, _) = refused(try_ws(&ws(&app, &format!("token={confused}")), &[]).await);
    assert_eq!(s, 401, "alg confusion is refused");
    app.stop().await;
}

#[tokio::test]
async fn browser_origin_is_checked() {
    let (_d, app) = app_with(|_| {}).await;
    let url = ws(&app, "user=o");
    let same = format!("http://127.0.0.1:{}", app.port);
    assert!(
        try_ws(&url, &[("origin", &same)]).await.is_ok(),
        "same origin"
    );
    assert!(try_ws(&url, &[]).await.is_ok(), "no Origin: not a browser");
    let (s, v) = refused(try_ws(&url, &[("origin", "https://evil.example")]).await);
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (403, Some("forbidden_origin"))
    );
    app.stop().await;

    let (_d, app) =
        app_with(|c| c.auth.allowed_origins = vec!["https://game.example".into()]).await;
    let url = ws(&app, "user=o");
    assert!(
        try_ws(&url, &[("origin", "https://game.example")])
            .await
            .is_ok()
    );
    let (s, _) = refused(try_ws(&url, &[("origin", "https://evil.example")]).await);
    assert_eq!(s, 403);
    app.stop().await;
}

#[tokio::test]
async fn resource_limits_answer_clearly() {
    let (_d, app) = app_with(|c| {
        c.limits.max_conns_per_ip = 3;
        c.limits.max_rooms_per_conn = 2;
        c.limits.max_members_per_room = 2;
    })
    .await;
    let mut a = app.client("a").await;
    let mut b = app.client("b").await;
    let c = app.client("c").await;
    let (s, v) = refused(try_ws(&app.ws_url("d"), &[]).await);
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (429, Some("too_many_connections"))
    );

    // Rooms per connection.
    a.join("chat.r1", None).await;
    a.join("chat.r2", None).await;
    a.send(json!({"type": "join", "room": "chat.r3"})).await;
    assert_eq!(a.recv_type("error").await["code"], "too_many_rooms");

    // Members per room.
    b.join("chat.r1", None).await;
    drop(c);
    // A slot frees when a client leaves.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let mut d = loop {
        match try_ws(&app.ws_url("d"), &[]).await {
            Ok(c) => break c,
            Err(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => panic!("the slot was never freed: {e:?}"),
        }
    };
    d.send(json!({"type": "join", "room": "chat.r1"})).await;
    assert_eq!(d.recv_type("error").await["code"], "room_full");
    // Still usable after the refusal.
    d.join("chat.r9", None).await;

    let (_, m) = http_get(&app.http("/metrics")).await;
    let m = m.as_str().unwrap_or_default().to_string();
    for needle in [
        "ws_rejected_total{reason=\"conns_per_ip\"}",
        "ws_limit_breaches_total{limit=\"rooms_per_conn\"}",
        "ws_limit_breaches_total{limit=\"members_per_room\"}",
    ] {
        assert!(m.contains(needle), "metrics lack {needle}");
    }
    app.stop().await;
}

/// A token that expires while its socket is open: the socket is closed with
/// 4001 ("token expired") when `exp` passes, not left open for as long as the
/// client likes.
#[tokio::test]
async fn an_open_socket_closes_when_its_token_expires() {
    let (_d, app) = app_with(|c| c.auth.auth_jwt_secret = Some(SECRET.into())).await;
    let token = hs256(SECRET, json!({"sub": "tess", "exp": now() + 2}));
    let mut c = try_ws(&ws(&app, &format!("token={token}")), &[])
        .await
        .expect("a valid token connects");
    c.join("chat.expiry", None).await;
    // Without the expiry the socket would stay open and this would time out.
    assert_eq!(c.recv_close().await, Some(4001));
    app.stop().await;
}
