//! The browser client, embedded in the binary.
//!
//! A copied binary, a `cargo install` or a systemd unit serves its page from
//! any working directory: `static/` is compiled in (also in debug builds), with
//! its content type, an `ETag` from the file's hash (`If-None-Match` → 304) and
//! `Cache-Control: no-cache`, so a browser revalidates and picks up a new
//! binary's page. `STATIC_DIR` serves a directory instead, for working on the
//! client without rebuilding.

use axum::Router;
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use tower_http::services::ServeDir;

#[derive(rust_embed::Embed)]
#[folder = "static/"]
struct Client;

/// The router that serves the client: the embedded files, or `static_dir`.
pub fn client_service<S: Clone + Send + Sync + 'static>(static_dir: Option<&str>) -> Router<S> {
    match static_dir {
        Some(dir) => Router::new().fallback_service(ServeDir::new(dir)),
        None => Router::new().fallback(embedded),
    }
}

async fn embedded(uri: Uri, headers: HeaderMap) -> Response {
    let path = uri.path().trim_start_matches('/');
    let path = if path.is_empty() || path.ends_with('/') {
        format!("{path}index.html")
    } else {
        path.to_string()
    };
    let Some(file) = Client::get(&path) else {
        return (StatusCode::NOT_FOUND, "not found").into_response();
    };
    let hash: String = file
        .metadata
        .sha256_hash()
        .iter()
        .take(16)
        .map(|b| format!("{b:02x}"))
        .collect();
    let etag = format!("\"{hash}\"");
    let cache = [
        (header::ETAG, etag.clone()),
        (header::CACHE_CONTROL, "no-cache".to_string()),
    ];
    let fresh = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"));
    if fresh {
        return (StatusCode::NOT_MODIFIED, cache).into_response();
    }
    let mime = HeaderValue::from_str(file.metadata.mimetype())
        .unwrap_or(HeaderValue::from_static("application/octet-stream"));
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, mime)],
        cache,
        file.data.into_owned(),
    )
        .into_response()
}
