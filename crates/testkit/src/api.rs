//! A client of the gateway's API, as teams and admins call it.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::prometheus::Scrape;
use crate::{ADMIN_TOKEN, DEADLINE, GEMPIX};

/// A client of one gateway, at `base` (`http://host:port`). Clones share their connections.
#[derive(Clone, Debug)]
pub struct Api {
    pub http: reqwest::Client,
    pub base: String,
}

/// A response, read in full.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub text: String,
}

impl Reply {
    /// The body as JSON; panics, showing it, when it is not.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.text)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {} {}", self.status, self.text))
    }

    /// The status and the JSON body, for comparing both at once.
    pub fn status_json(&self) -> (u16, Value) {
        (self.status, self.json())
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .map(|v| v.to_str().expect("ASCII header").to_owned())
    }

    /// The task id of an accepted generation.
    pub fn task_id(&self) -> String {
        assert_eq!(self.status, 200, "{}", self.text);
        self.json()["data"]["task_id"]
            .as_str()
            .unwrap_or_else(|| panic!("no task id in {}", self.text))
            .to_owned()
    }

    /// The task status of a successful status read.
    pub fn task_status(&self) -> String {
        assert_eq!(self.status, 200, "{}", self.text);
        self.json()["data"]["status"]
            .as_str()
            .unwrap_or_else(|| panic!("no status in {}", self.text))
            .to_owned()
    }

    /// `X-Cache`, which every status read that reached the cache carries.
    pub fn x_cache(&self) -> String {
        self.header("x-cache")
            .unwrap_or_else(|| panic!("no X-Cache on {} {}", self.status, self.text))
    }

    /// `RateLimit-Limit`, `-Remaining`, `-Reset`.
    pub fn rate_limit(&self) -> (Option<String>, Option<String>, Option<String>) {
        (
            self.header("ratelimit-limit"),
            self.header("ratelimit-remaining"),
            self.header("ratelimit-reset"),
        )
    }
}

/// How many of `replies` have each status.
pub fn statuses(replies: &[Reply]) -> HashMap<u16, usize> {
    let mut counts = HashMap::new();
    for reply in replies {
        *counts.entry(reply.status).or_default() += 1;
    }
    counts
}

impl Api {
    pub fn new(base: String) -> Api {
        Api::with_client(reqwest::Client::new(), base)
    }

    /// A client sending through `http` (with its own timeouts, say).
    pub fn with_client(http: reqwest::Client, base: String) -> Api {
        Api { http, base }
    }

    /// `{base}{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Sends `request`; an error when the gateway could not be reached or did not answer in
    /// full.
    pub async fn try_send(&self, request: reqwest::RequestBuilder) -> reqwest::Result<Reply> {
        let response = request.send().await?;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let text = response.text().await?;
        Ok(Reply {
            status,
            headers,
            text,
        })
    }

    /// Sends `request`, which the gateway must answer.
    pub async fn send(&self, request: reqwest::RequestBuilder) -> Reply {
        self.try_send(request).await.expect("gateway answers")
    }

    /// `POST /api/image/gen` of `body` (JSON) with a team's key.
    pub fn generate_request(&self, key: &str, body: &str) -> reqwest::RequestBuilder {
        self.submit_request(key, "/api/image/gen", body)
    }

    /// `POST path` of `body` (JSON) with a team's key: a generation on any route.
    pub fn submit_request(&self, key: &str, path: &str, body: &str) -> reqwest::RequestBuilder {
        self.http
            .post(self.url(path))
            .bearer_auth(key)
            .header("content-type", "application/json")
            .body(body.to_owned())
    }

    /// A generation of `body` (JSON) on the route at `path`, with a team's key.
    pub async fn submit(&self, key: &str, path: &str, body: &str) -> Reply {
        self.send(self.submit_request(key, path, body)).await
    }

    /// A generation of `body` (JSON) with a team's key.
    pub async fn generate(&self, key: &str, body: &str) -> Reply {
        self.send(self.generate_request(key, body)).await
    }

    /// A render of one `google/gempix2` image; its task id.
    pub async fn start_task(&self, key: &str) -> String {
        self.generate(key, GEMPIX).await.task_id()
    }

    /// `GET /api/task/query?task_id=…` with a team's key.
    pub async fn query(&self, key: &str, task_id: &str) -> Reply {
        self.send(
            self.http
                .get(self.url("/api/task/query"))
                .query(&[("task_id", task_id)])
                .bearer_auth(key),
        )
        .await
    }

    /// Reads `task_id` until the gateway says it succeeded or failed; that answer.
    pub async fn wait_for_final(&self, key: &str, task_id: &str) -> Reply {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let reply = self.query(key, task_id).await;
            if matches!(reply.task_status().as_str(), "success" | "failed") {
                return reply;
            }
            assert!(
                Instant::now() < deadline,
                "task {task_id} never finished: {}",
                reply.text
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `GET path` with `bearer`, if any.
    pub async fn get(&self, path: &str, bearer: Option<&str>) -> Reply {
        let mut request = self.http.get(self.url(path));
        if let Some(token) = bearer {
            request = request.bearer_auth(token);
        }
        self.send(request).await
    }

    /// `POST path` with `bearer`, if any, and no body.
    pub async fn post(&self, path: &str, bearer: Option<&str>) -> Reply {
        let mut request = self.http.post(self.url(path));
        if let Some(token) = bearer {
            request = request.bearer_auth(token);
        }
        self.send(request).await
    }

    /// `GET /gateway/v1/budget` with the team's key; must answer 200 in JSON.
    pub async fn budget(&self, key: &str) -> Value {
        let reply = self.get("/gateway/v1/budget", Some(key)).await;
        assert_eq!(reply.status, 200, "budget: {}", reply.text);
        assert_eq!(
            reply.header("content-type").as_deref(),
            Some("application/json"),
            "{}",
            reply.text
        );
        reply.json()
    }

    /// Polls the team's budget until `done` holds; returns that budget.
    pub async fn wait_for_budget(
        &self,
        key: &str,
        what: &str,
        done: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let budget = self.budget(key).await;
            if done(&budget) {
                return budget;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; budget is {budget}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `GET path` with the admin token; must answer 200.
    pub async fn admin(&self, path: &str) -> Value {
        let reply = self.get(path, Some(ADMIN_TOKEN)).await;
        assert_eq!(reply.status, 200, "{path}: {}", reply.text);
        reply.json()
    }

    /// Sends `count` copies of a generation at once; the replies, in the order they came.
    pub async fn generate_concurrently(&self, key: &str, body: &str, count: usize) -> Vec<Reply> {
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..count {
            let (api, key, body) = (self.clone(), key.to_owned(), body.to_owned());
            set.spawn(async move { api.generate(&key, &body).await });
        }
        let mut replies = Vec::with_capacity(count);
        while let Some(reply) = set.join_next().await {
            replies.push(reply.expect("request task"));
        }
        replies
    }

    /// Sends all `requests` at once: with a team's key, the status read of a task id, or a
    /// [`GEMPIX`] generation for `None`. The replies, in the same order.
    pub async fn concurrently(&self, requests: &[(&'static str, Option<String>)]) -> Vec<Reply> {
        let mut set = tokio::task::JoinSet::new();
        for (i, (key, task)) in requests.iter().cloned().enumerate() {
            let api = self.clone();
            set.spawn(async move {
                let reply = match task {
                    Some(task) => api.query(key, &task).await,
                    None => api.generate(key, GEMPIX).await,
                };
                (i, reply)
            });
        }
        let mut replies: Vec<Option<Reply>> = (0..requests.len()).map(|_| None).collect();
        while let Some(joined) = set.join_next().await {
            let (i, reply) = joined.expect("request task");
            replies[i] = Some(reply);
        }
        replies.into_iter().map(|r| r.expect("a reply")).collect()
    }

    /// Opens `count` connections to the gateway and leaves them idle in the client's pool, so
    /// that a burst sent next reaches the gateway at once instead of one handshake at a time.
    pub async fn warm_up(&self, count: usize) {
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..count {
            let api = self.clone();
            set.spawn(async move { api.get("/healthz", None).await });
        }
        while let Some(reply) = set.join_next().await {
            assert_eq!(reply.expect("request task").status, 200);
        }
    }

    /// `GET /metrics`, without a key.
    pub async fn scrape(&self) -> Scrape {
        Scrape::fetch(&self.http, &self.url("/metrics")).await
    }

    /// The value of one series, written as on the metrics page (`name{labels}`); 0 if absent.
    pub async fn metric(&self, series: &str) -> f64 {
        self.scrape().await.value_of(series)
    }
}
