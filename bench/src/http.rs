//! HTTP to the server under load, over `reqwest`: `GET /api/stats` and `GET /metrics` with the
//! admin token, and the `POST`s that publish frames to stalled clients. Plain HTTP, no proxy
//! (the target is the server itself, usually on loopback), every request bounded in time, kept
//! alive between requests.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context as _};
use serde_json::Value;

use crate::stats::first_words;

/// Longest one request may take, connecting included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// An HTTP client for one server. Cheap to clone: clones share the connection pool.
#[derive(Debug, Clone)]
pub(crate) struct Http {
    client: reqwest::Client,
    base: String,
}

impl Http {
    pub(crate) fn new(addr: SocketAddr) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .no_proxy()
            .timeout(REQUEST_TIMEOUT)
            .tcp_nodelay(true)
            .build()
            .context("cannot build the HTTP client")?;
        Ok(Self {
            client,
            base: format!("http://{addr}"),
        })
    }

    /// `GET path`: the status and body of the answer.
    pub(crate) async fn get(
        &self,
        path: &str,
        bearer: Option<&str>,
    ) -> anyhow::Result<(u16, String)> {
        let mut req = self.client.get(format!("{}{path}", self.base));
        if let Some(t) = bearer {
            req = req.bearer_auth(t);
        }
        answer(req, "GET", path).await
    }

    /// `POST path` with a JSON body: the status and body of the answer.
    pub(crate) async fn post_json(
        &self,
        path: &str,
        bearer: &str,
        body: String,
    ) -> anyhow::Result<(u16, String)> {
        let req = self
            .client
            .post(format!("{}{path}", self.base))
            .bearer_auth(bearer)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body);
        answer(req, "POST", path).await
    }

    /// `GET /api/stats` with the admin token, as JSON.
    pub(crate) async fn stats(&self, admin_token: &str) -> anyhow::Result<Value> {
        let (status, body) = self.get("/api/stats", Some(admin_token)).await?;
        if status != 200 {
            bail!("GET /api/stats answered {status}: {}", first_words(&body));
        }
        serde_json::from_str(&body).context("GET /api/stats: not JSON")
    }
}

async fn answer(
    req: reqwest::RequestBuilder,
    method: &str,
    path: &str,
) -> anyhow::Result<(u16, String)> {
    let resp = req.send().await.map_err(|e| describe(e, method, path))?;
    let status = resp.status().as_u16();
    let body = resp.text().await.map_err(|e| describe(e, method, path))?;
    Ok((status, body))
}

fn describe(e: reqwest::Error, method: &str, path: &str) -> anyhow::Error {
    if e.is_timeout() {
        anyhow::anyhow!("{method} {path} timed out")
    } else {
        anyhow::Error::new(e).context(format!("{method} {path} failed"))
    }
}
