//! The OpenAPI document (`src/openapi.json`, served at `GET /openapi.json`) kept true against the
//! real binary in front of the fake upstream:
//! - the gateway serves the file as it is, without a key, and a configuration's own routes
//!   described from their definitions;
//! - every path the router names and every route of the route table is in the document, and
//!   every path in it answers the methods the document gives, and only those;
//! - real answers of every kind (each route's example, each status of a task, the gateway's own
//!   errors, the upstream's failures, the admin API, callbacks, probes) have a status, content
//!   type and body the document gives for their operation, and the requests the gateway refuses
//!   as invalid are invalid by the document too.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use jsonschema::{Draft, Validator};
use ketchup_domain::{config::DEFAULT_MAX_REFERENCE_IMAGES, route_table::RouteTable};
use ketchup_fake_upstream::Fault;
use ketchup_gateway::routes::openapi::DOCUMENT;
use ketchup_testkit::{
    ADMIN_TOKEN, ADS_KEY, Api, DESIGN_KEY, Env, GEMPIX, Gateway, GatewayConfig, Reply, fake_config,
    free_port, wait_until_final,
};
use serde_json::{Value, json};

/// The key of team `slow`, whose limits allow one generation a minute.
const SLOW_KEY: &str = "kgw_slow_test_key_5555555555";
/// The methods every path is tried with.
const METHODS: [&str; 5] = ["GET", "POST", "PUT", "PATCH", "DELETE"];

/// An OpenAPI document, and the validators of the schemas checked against it so far.
struct Document {
    root: Value,
    validators: Mutex<HashMap<String, Validator>>,
}

/// `~1api~1image~1gen` for `/api/image/gen`: a name as one step of a JSON pointer.
fn step(name: &str) -> String {
    name.replace('~', "~0").replace('/', "~1")
}

/// `pointer` as a URI fragment: `{`, `}`, spaces and the like percent-encoded.
fn percent_encoded(pointer: &str) -> String {
    pointer
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b'/' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn media_type(content_type: &str) -> String {
    content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase()
}

impl Document {
    fn parse(text: &str) -> Document {
        Document {
            root: serde_json::from_str(text).expect("the document is JSON"),
            validators: Mutex::default(),
        }
    }

    fn file() -> Document {
        Document::parse(DOCUMENT)
    }

    fn paths(&self) -> BTreeSet<String> {
        self.root["paths"]
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect()
    }

    /// The methods the document gives `path`, in upper case.
    fn methods(&self, path: &str) -> BTreeSet<String> {
        self.root["paths"][path]
            .as_object()
            .unwrap()
            .keys()
            .map(|method| method.to_ascii_uppercase())
            .collect()
    }

    fn at(&self, pointer: &str) -> &Value {
        self.root
            .pointer(pointer)
            .unwrap_or_else(|| panic!("nothing at {pointer} in the document"))
    }

    /// `pointer`, or where the `$ref` there leads, followed to the end.
    fn follow(&self, mut pointer: String) -> String {
        while let Some(target) = self.at(&pointer)["$ref"].as_str() {
            pointer = target.trim_start_matches('#').to_owned();
        }
        pointer
    }

    fn operation(&self, method: &str, path: &str) -> String {
        format!("/paths/{}/{}", step(path), method.to_ascii_lowercase())
    }

    /// The errors of `instance` against the schema at `pointer` (resolved within the document).
    fn errors(&self, pointer: &str, instance: &Value) -> Vec<String> {
        let mut validators = self.validators.lock().unwrap();
        let validator = validators.entry(pointer.to_owned()).or_insert_with(|| {
            let mut schema = self.root.clone();
            schema["$schema"] = "https://json-schema.org/draft/2020-12/schema".into();
            schema["$ref"] = format!("#{}", percent_encoded(pointer)).into();
            jsonschema::options()
                .with_draft(Draft::Draft202012)
                .should_validate_formats(true)
                .build(&schema)
                .unwrap_or_else(|e| panic!("the schema at {pointer} does not compile: {e}"))
        });
        validator
            .iter_errors(instance)
            .map(|e| format!("{} at {}", e, e.instance_path()))
            .collect()
    }

    /// Whether `body` is a valid request body of `POST path`.
    fn accepts_request(&self, path: &str, body: &Value) -> bool {
        let media = self.operation("POST", path) + "/requestBody/content/application~1json";
        self.errors(&format!("{media}/schema"), body).is_empty()
    }

    /// `POST path`'s example request body.
    fn example(&self, path: &str) -> Value {
        let media = self.operation("POST", path) + "/requestBody/content/application~1json";
        self.at(&format!("{media}/example")).clone()
    }

    /// Asserts that `reply`, an answer to `method path` (`path` as the document writes it), has
    /// a status, a content type and a body that the document gives the operation.
    fn check(&self, method: &str, path: &str, reply: &Reply) {
        let what = format!("{method} {path} answered {}: {}", reply.status, reply.text);
        let operation = self.operation(method, path);
        assert!(
            self.root.pointer(&operation).is_some(),
            "{method} {path} is not in the document"
        );
        let responses = format!("{operation}/responses");
        let status = reply.status.to_string();
        let response = [status.as_str(), "default"]
            .into_iter()
            .find(|status| {
                self.root
                    .pointer(&format!("{responses}/{status}"))
                    .is_some()
            })
            .unwrap_or_else(|| panic!("the document gives no such status: {what}"));
        let response = self.follow(format!("{responses}/{response}"));
        let content_type = reply
            .header("content-type")
            .unwrap_or_else(|| panic!("no content type: {what}"));
        let key = self
            .at(&format!("{response}/content"))
            .as_object()
            .unwrap()
            .keys()
            .find(|key| media_type(key) == media_type(&content_type));
        let key = key.unwrap_or_else(|| panic!("content type {content_type} is not given: {what}"));
        let instance = if media_type(&content_type) == "application/json" {
            serde_json::from_str(&reply.text).unwrap_or_else(|e| panic!("not JSON ({e}): {what}"))
        } else {
            Value::String(reply.text.clone())
        };
        let schema = format!("{response}/content/{}/schema", step(key));
        let errors = self.errors(&schema, &instance);
        assert!(
            errors.is_empty(),
            "{what}\ndoes not fit {schema}: {errors:#?}"
        );
        assert!(reply.header("x-request-id").is_some(), "{what}");
    }
}

/// Every model of the demo, as `src/demo_models.toml` reserves it, in `config` instead of its
/// own.
fn every_model(config: GatewayConfig) -> GatewayConfig {
    let models: toml::Table =
        toml::from_str(include_str!("../src/demo_models.toml")).expect("the demo's models");
    let models = models["models"].as_table().expect("a models table").clone();
    // Text models have prices, not a reserve; their routes answer at once, not as tasks.
    models
        .into_iter()
        .filter_map(|(id, model)| Some((id, model.get("reserve")?.to_string())))
        .fold(
            config.only_model("google/gempix2", "0.50"),
            |config, (id, reserve)| config.model_reserve(&id, &reserve),
        )
}

/// Both teams of the base config with an admin API and every model; `design` with a budget.
fn config() -> GatewayConfig {
    every_model(GatewayConfig::new().admin())
        .budget("design", r#"{ credits = "1000.00", period = "monthly" }"#)
}

/// The document the gateway serves, after checking that its answer fits itself.
async fn served(api: &Api) -> (Reply, Document) {
    let reply = api.get("/openapi.json", None).await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    let document = Document::parse(&reply.text);
    document.check("GET", "/openapi.json", &reply);
    (reply, document)
}

#[tokio::test]
async fn the_file_is_served_as_it_is_without_a_key() {
    let env = Env::start_with(fake_config(), config()).await;
    let (reply, _) = served(env.api()).await;
    assert_eq!(reply.text, DOCUMENT);
    assert_eq!(
        reply.header("content-type").as_deref(),
        Some("application/json")
    );
}

/// Every `"/…"` string in `src/router.rs`: the paths the router serves besides the route table.
fn router_paths() -> BTreeSet<String> {
    let source = include_str!("../src/router.rs");
    source
        .split('"')
        .skip(1)
        .step_by(2)
        .filter(|literal| literal.starts_with('/'))
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn every_path_served_is_documented_with_exactly_the_methods_it_answers() {
    let document = Document::file();
    let mut served = router_paths();
    served.extend(
        RouteTable::builtin(DEFAULT_MAX_REFERENCE_IMAGES)
            .iter()
            .map(|route| route.path.clone()),
    );
    assert!(
        served.contains("/readyz") && served.contains("/admin/teams"),
        "{served:?}"
    );
    assert_eq!(document.paths(), served);

    let env = Env::start_with(fake_config(), config()).await;
    let api = env.api();
    for path in document.paths() {
        let url = path
            .replace("{token}", "no-such-token")
            .replace("{id}", "0191c6f6-0000-7000-8000-000000000000")
            .replace("{model_action}", "gemini-3.1-pro-preview:generateContent");
        let key = if path.starts_with("/admin/") {
            ADMIN_TOKEN
        } else {
            DESIGN_KEY
        };
        let documented = document.methods(&path);
        for method in METHODS {
            let request = api
                .http
                .request(method.parse().unwrap(), api.url(&url))
                .bearer_auth(key)
                .header("content-type", "application/json")
                .body("{}");
            let reply = api.send(request).await;
            if documented.contains(method) {
                assert_ne!(reply.status, 405, "{method} {path}: {}", reply.text);
                let fallback = reply.status == 404 && reply.json()["message"] == "not found";
                assert!(!fallback, "{method} {path} is not served: {}", reply.text);
                document.check(method, &path, &reply);
            } else {
                assert_eq!(
                    reply.status_json().0,
                    405,
                    "{method} {path} is served but not documented: {}",
                    reply.text
                );
                assert_eq!(reply.json()["message"], "method not allowed");
            }
        }
    }
    let unknown = api.get("/api/no/such/route", Some(DESIGN_KEY)).await;
    assert_eq!(unknown.status_json().0, 404);
    assert_eq!(unknown.json()["message"], "not found");
}

/// Reads `task` until it is final, checking every answer on the way; the final one.
async fn poll_to_the_end(document: &Document, api: &Api, task: &str) -> Reply {
    for _ in 0..600 {
        let reply = api.query(DESIGN_KEY, task).await;
        document.check("GET", "/api/task/query", &reply);
        if matches!(reply.task_status().as_str(), "success" | "failed") {
            return reply;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("task {task} never finished");
}

#[tokio::test]
async fn every_route_example_is_accepted_and_every_answer_fits() {
    let env = Env::start_with(fake_config(), config()).await;
    let (api, fake) = (env.api(), &env.fake);
    let document = Document::file();
    for route in RouteTable::builtin(DEFAULT_MAX_REFERENCE_IMAGES).iter() {
        let example = document.example(&route.path);
        assert!(
            document.accepts_request(&route.path, &example),
            "{}",
            route.path
        );
        let accepted = api
            .submit(DESIGN_KEY, &route.path, &example.to_string())
            .await;
        assert_eq!(accepted.status, 200, "{}: {}", route.path, accepted.text);
        document.check("POST", &route.path, &accepted);
        let task = accepted.task_id();
        let done = poll_to_the_end(&document, api, &task).await;
        assert_eq!(done.task_status(), "success", "{}", done.text);
        let stranger = api.query(ADS_KEY, &task).await;
        assert_eq!(stranger.status, 404);
        document.check("GET", "/api/task/query", &stranger);
    }
    // A failed task's answer fits too.
    fake.faults().inject_generate(Fault::FailTask, 1);
    let task = api.start_task(DESIGN_KEY).await;
    let failed = poll_to_the_end(&document, api, &task).await;
    assert_eq!(failed.task_status(), "failed");

    for key in [DESIGN_KEY, ADS_KEY] {
        for path in ["/api/user", "/gateway/v1/budget"] {
            document.check("GET", path, &api.get(path, Some(key)).await);
        }
    }
    for path in [
        "/admin/teams",
        "/admin/usage",
        "/admin/usage?team=design&from=2020-01-01&to=2100-01-01",
        "/admin/reservations?state=settled",
        "/admin/reservations",
        "/admin/webhooks?state=delivered",
        "/admin/audit",
        "/admin/models",
    ] {
        let reply = api.get(path, Some(ADMIN_TOKEN)).await;
        assert_eq!(reply.status, 200, "{path}: {}", reply.text);
        document.check("GET", path.split('?').next().unwrap(), &reply);
    }
    let usage = api.admin("/admin/usage").await;
    assert_eq!(usage["rows"].as_array().unwrap().len(), 10, "{usage}");
    let settled = api.admin("/admin/reservations?state=settled").await;
    assert_eq!(settled["reservations"].as_array().unwrap().len(), 11);
    let csv = api
        .send(
            api.http
                .get(api.url("/admin/usage"))
                .bearer_auth(ADMIN_TOKEN)
                .header("accept", "text/csv"),
        )
        .await;
    assert!(csv.text.starts_with("day,team,key,family"), "{}", csv.text);
    document.check("GET", "/admin/usage", &csv);
    for path in ["/healthz", "/readyz", "/metrics"] {
        let reply = api.get(path, None).await;
        assert_eq!(reply.status, 200, "{path}: {}", reply.text);
        document.check("GET", path, &reply);
    }
}

#[tokio::test]
async fn the_gateways_own_refusals_fit_and_agree_with_the_request_schemas() {
    let config = config()
        .server("max_body_bytes = 4096")
        .budget("ads", r#"{ credits = "0.10", period = "lifetime" }"#)
        .team("slow", SLOW_KEY)
        .limits("slow", r#"{ generate = "1/min", generate_burst = 1 }"#)
        .budget(
            "slow",
            r#"{ credits = "10.00", period = "daily", max_in_flight = 1 }"#,
        );
    let env = Env::start_with(fake_config(), config).await;
    let api = env.api();
    let document = Document::file();

    // Bodies the gateway refuses before anything is reserved, which the document calls invalid.
    for (path, body) in [
        ("/api/image/gen", json!({"model": "google/gempix2"})),
        (
            "/api/image/gen",
            json!({"model": "google/gempix2", "prompt": " "}),
        ),
        (
            "/api/image/gen",
            json!({"model": "google/gempix2", "prompt": "x", "n": 0}),
        ),
        (
            "/api/image/gen",
            json!({"model": "google/gempix2", "prompt": "x",
            "images": ["https://a/1", "https://a/2", "https://a/3", "https://a/4", "https://a/5"]}),
        ),
        (
            "/api/image/gen",
            json!({"model": "google/gempix2", "prompt": "x", "images": ["ftp://a/1"]}),
        ),
        (
            "/api/image/gen",
            json!({"model": "google/gempix2", "prompt": "x", "callback_url": "javascript:x"}),
        ),
        (
            "/api/sora2/gen",
            json!({"model": "sora-2", "prompt": "x", "duration": 10}),
        ),
        (
            "/api/video/seedance/gen",
            json!({"model": "seedance-2.0", "duration": "5",
            "content": [{"type": "text", "text": "x"}]}),
        ),
        (
            "/api/video/seedance/gen",
            json!({"model": "seedance-2.0",
            "content": [{"type": "image_url", "image_url": {"url": "https://a/1"}}]}),
        ),
        (
            "/api/suno/generate",
            json!({"model": "chirp-v4-5", "prompt": "x"}),
        ),
        (
            "/api/midjourney/edits",
            json!({"prompt": "x", "image": "file:///etc/passwd"}),
        ),
        ("/api/gpt-image/gen", json!(["not", "an", "object"])),
    ] {
        assert!(!document.accepts_request(path, &body), "{path} {body}");
        let refused = api.submit(DESIGN_KEY, path, &body.to_string()).await;
        assert_eq!(refused.status, 400, "{path} {body}: {}", refused.text);
        document.check("POST", path, &refused);
    }
    let broken = api
        .submit(DESIGN_KEY, "/api/image/gen", "{\"model\":")
        .await;
    document.check("POST", "/api/image/gen", &broken);
    let unoffered = api.submit(
        DESIGN_KEY,
        "/api/wan-image/gen",
        r#"{"model":"x","prompt":"y"}"#,
    );
    document.check("POST", "/api/wan-image/gen", &unoffered.await);

    // 401 on every kind of route, for no key and for a team key where the admin token belongs.
    for (method, path, key) in [
        ("POST", "/api/image/gen", None),
        ("GET", "/api/task/query", Some("kgw_wrong")),
        ("GET", "/api/user", None),
        ("GET", "/gateway/v1/budget", None),
        ("GET", "/admin/teams", Some(DESIGN_KEY)),
        ("POST", "/admin/reservations/{id}/release", None),
    ] {
        let url = api.url(&path.replace("{id}", "0191c6f6-0000-7000-8000-000000000000"));
        let mut request = api.http.request(method.parse().unwrap(), url).body(GEMPIX);
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        let reply = api.send(request).await;
        assert_eq!(reply.status, 401, "{method} {path}: {}", reply.text);
        document.check(method, path, &reply);
    }

    let poor = api.generate(ADS_KEY, GEMPIX).await;
    assert_eq!(poor.status, 402, "{}", poor.text);
    document.check("POST", "/api/image/gen", &poor);

    let large = format!(
        r#"{{"model":"google/gempix2","prompt":"{}"}}"#,
        "x".repeat(5000)
    );
    let too_large = api.generate(DESIGN_KEY, &large).await;
    assert_eq!(too_large.status, 413, "{}", too_large.text);
    document.check("POST", "/api/image/gen", &too_large);

    // `slow` may start one generation a minute and hold one task at a time.
    assert_eq!(api.generate(SLOW_KEY, GEMPIX).await.status, 200);
    let limited = api.generate(SLOW_KEY, GEMPIX).await;
    assert_eq!(limited.status, 429, "{}", limited.text);
    assert!(limited.header("retry-after").is_some());
    document.check("POST", "/api/image/gen", &limited);

    for (path, expected) in [
        ("/api/task/query", 400),
        ("/api/task/query?task_id=ta-nobody", 404),
        ("/admin/usage?from=yesterday", 400),
        ("/admin/usage?team=nobody", 400),
        ("/admin/usage?from=2026-02-01&to=2026-01-01", 400),
        ("/admin/reservations?state=lost", 400),
        ("/admin/webhooks?state=lost", 400),
    ] {
        let key = if path.starts_with("/admin") {
            ADMIN_TOKEN
        } else {
            DESIGN_KEY
        };
        let reply = api.get(path, Some(key)).await;
        assert_eq!(reply.status, expected, "{path}: {}", reply.text);
        document.check("GET", path.split('?').next().unwrap(), &reply);
    }
    for (id, expected) in [
        ("not-a-uuid", 400),
        ("0191c6f6-0000-7000-8000-000000000000", 409),
    ] {
        let reply = api
            .post(
                &format!("/admin/reservations/{id}/release"),
                Some(ADMIN_TOKEN),
            )
            .await;
        assert_eq!(reply.status, expected, "{id}: {}", reply.text);
        document.check("POST", "/admin/reservations/{id}/release", &reply);
    }
}

#[tokio::test]
async fn a_team_at_its_in_flight_limit_gets_a_429_that_fits() {
    let mut fake = fake_config();
    fake.in_progress_for = Duration::from_secs(600);
    let config = config().budget(
        "design",
        r#"{ credits = "10.00", period = "daily", max_in_flight = 1 }"#,
    );
    let env = Env::start_with(fake, config).await;
    let document = Document::file();
    assert_eq!(env.api().generate(DESIGN_KEY, GEMPIX).await.status, 200);
    let full = env.api().generate(DESIGN_KEY, GEMPIX).await;
    assert_eq!(full.status_json().1["message"], "too many tasks in flight");
    document.check("POST", "/api/image/gen", &full);
}

#[tokio::test]
async fn callbacks_fit_from_acceptance_to_refusal() {
    let mut fake = fake_config();
    // The fake's own callback stays out of the way: the test sends them.
    fake.in_progress_for = Duration::from_secs(600);
    let config = config()
        .public_url_on_own_port()
        .server("max_body_bytes = 4096")
        .webhooks("max_callback_bytes = 2048")
        .signed_webhooks("design")
        .callback_hosts("design", &["127.0.0.1"])
        .signed_webhooks("ads");
    let env = Env::start_with(fake, config).await;
    let api = env.api();
    let document = Document::file();
    // Nothing listens at the team's own URL: its delivery stays pending.
    let hook = format!("http://127.0.0.1:{}/hook", free_port());
    let body = json!({"model": "google/gempix2", "prompt": "x", "callback_url": hook});
    let task = api.generate(DESIGN_KEY, &body.to_string()).await.task_id();
    let stats = env.fake.stats();
    let url = stats.generate_bodies.last().unwrap()["callback_url"]
        .as_str()
        .unwrap()
        .to_owned();
    let post = |body: String| {
        let request = api
            .http
            .post(url.clone())
            .header("content-type", "application/json");
        api.send(request.body(body))
    };
    let path = "/callbacks/{token}";
    let malformed = post(r#"{"status":"pending"}"#.into()).await;
    assert_eq!(malformed.status, 400, "{}", malformed.text);
    document.check("POST", path, &malformed);
    let large = post(format!(r#"{{"pad":"{}"}}"#, "x".repeat(3000))).await;
    assert_eq!(large.status, 413, "{}", large.text);
    document.check("POST", path, &large);
    // A callback is only a claim: the upstream still renders the task, so it is deferred.
    let payload = json!({"result": [{"image": "https://img.example/1.png"}], "status": "success",
        "task_id": task, "consumed": "0.500000", "status_reason": {"message": null}});
    let deferred = post(payload.to_string()).await;
    assert_eq!(deferred.status, 503, "{}", deferred.text);
    document.check("POST", path, &deferred);
    let unknown = api.post("/callbacks/no-such-token", None).await;
    assert_eq!(unknown.status, 404);
    document.check("POST", path, &unknown);
    document.check(
        "GET",
        "/admin/webhooks",
        &api.get("/admin/webhooks?state=pending", Some(ADMIN_TOKEN))
            .await,
    );
}

#[tokio::test]
async fn confirmed_and_contradicted_callbacks_fit() {
    // The fake's own callbacks go where nothing listens: the test sends them, once the task is
    // final upstream.
    let config = config()
        .server(&format!(
            "public_url = \"http://127.0.0.1:{}\"",
            free_port()
        ))
        .signed_webhooks("design")
        .callback_hosts("design", &["127.0.0.1"])
        .signed_webhooks("ads");
    let env = Env::start_with(fake_config(), config).await;
    let api = env.api();
    let document = Document::file();
    let hook = format!("http://127.0.0.1:{}/hook", free_port());
    let body = json!({"model": "google/gempix2", "prompt": "x", "callback_url": hook});
    let task = api.generate(DESIGN_KEY, &body.to_string()).await.task_id();
    let stats = env.fake.stats();
    let given = stats.generate_bodies.last().unwrap()["callback_url"]
        .as_str()
        .unwrap()
        .to_owned();
    let token = given.rsplit('/').next().unwrap();
    let url = env.gateway.url(&format!("/callbacks/{token}"));
    wait_until_final(&env.fake, std::slice::from_ref(&task)).await;
    let path = "/callbacks/{token}";
    for (consumed, status) in [("0.000000", 409), ("0.500000", 200)] {
        let payload = json!({"result": [{"image": "https://img.example/1.png"}],
            "status": "success", "task_id": task, "consumed": consumed,
            "status_reason": {"message": null}});
        let reply = api
            .send(
                api.http
                    .post(url.clone())
                    .header("content-type", "application/json")
                    .body(payload.to_string()),
            )
            .await;
        assert_eq!(reply.status, status, "{}", reply.text);
        document.check("POST", path, &reply);
    }
}

#[tokio::test]
async fn the_upstreams_failures_fit() {
    let config = config().upstream("timeout = \"1s\"\nquery_retries = 0");
    let env = Env::start_with(fake_config(), config).await;
    let (api, faults) = (env.api(), env.fake.faults());
    let document = Document::file();

    faults.inject_generate(Fault::Status500, 1);
    let refused = api.generate(DESIGN_KEY, GEMPIX).await;
    assert_eq!(refused.status, 500, "{}", refused.text);
    document.check("POST", "/api/image/gen", &refused);

    let task = api.start_task(DESIGN_KEY).await;
    faults.inject_query(Fault::Status500, 1);
    let failed_read = api.query(DESIGN_KEY, &task).await;
    assert_eq!(failed_read.status, 500, "{}", failed_read.text);
    document.check("GET", "/api/task/query", &failed_read);
    faults.inject_query(Fault::Slow(Duration::from_secs(3)), 1);
    let slow_read = api.query(DESIGN_KEY, &task).await;
    assert_eq!(slow_read.status, 504, "{}", slow_read.text);
    document.check("GET", "/api/task/query", &slow_read);

    // A generation the upstream may have started: 504, then an unknown outcome the admin
    // lists and releases.
    faults.inject_generate(Fault::Slow(Duration::from_secs(3)), 1);
    let timed_out = api.generate(DESIGN_KEY, GEMPIX).await;
    assert_eq!(timed_out.status, 504, "{}", timed_out.text);
    document.check("POST", "/api/image/gen", &timed_out);
    let listed = api.get("/admin/reservations", Some(ADMIN_TOKEN)).await;
    document.check("GET", "/admin/reservations", &listed);
    let id = listed.json()["reservations"][0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let released = api
        .post(
            &format!("/admin/reservations/{id}/release"),
            Some(ADMIN_TOKEN),
        )
        .await;
    assert_eq!(released.status, 200, "{}", released.text);
    document.check("POST", "/admin/reservations/{id}/release", &released);
    // The release is in the audit trail.
    let trail = api.get("/admin/audit?limit=1", Some(ADMIN_TOKEN)).await;
    assert_eq!(
        trail.json()["actions"][0]["target"],
        id.as_str(),
        "{}",
        trail.text
    );
    document.check("GET", "/admin/audit", &trail);

    faults.inject_generate(Fault::DropConnection, 1);
    let dropped = api.generate(DESIGN_KEY, GEMPIX).await;
    document.check("POST", "/api/image/gen", &dropped);

    // Nothing listens where this gateway's upstream should be.
    let nowhere = format!("http://127.0.0.1:{}", free_port());
    let gateway = Gateway::start(&GatewayConfig::new().upstream_url(&nowhere));
    let unreachable = gateway.api.generate(DESIGN_KEY, GEMPIX).await;
    assert_eq!(unreachable.status, 502, "{}", unreachable.text);
    document.check("POST", "/api/image/gen", &unreachable);
}

#[tokio::test]
async fn configured_routes_are_served_described_from_their_definitions() {
    let routes = r#"
        [routes."/api/kling/gen"]
        family = "video"
        references = { "image" = 1 }
        types = { duration = "integer" }

        [routes."/api/midjourney/imagine"]
        family = "midjourney"
        fixed_model = "midjourney/imagine"
        accepts_callback = true
    "#;
    let config = config()
        .routes(routes)
        .model("kling-1", "0.30")
        .server(&format!("metrics_listen = \"127.0.0.1:{}\"", free_port()));
    let env = Env::start_with(fake_config(), config).await;
    let api = env.api();
    let (reply, document) = served(api).await;
    assert_ne!(reply.text, DOCUMENT);
    let file = Document::file();
    let mut expected = file.paths();
    expected.remove("/metrics");
    expected.insert("/api/kling/gen".into());
    assert_eq!(document.paths(), expected);
    assert_eq!(
        document.root["paths"]["/api/sora2/gen"],
        file.root["paths"]["/api/sora2/gen"]
    );

    // The route the fake does not have: the gateway accepts, the upstream's 404 passes through.
    let kling = json!({"model": "kling-1", "prompt": "a tomato", "image": "https://a/1.png", "duration": 5});
    assert!(document.accepts_request("/api/kling/gen", &kling));
    let passed = api
        .submit(DESIGN_KEY, "/api/kling/gen", &kling.to_string())
        .await;
    assert_eq!(passed.status, 404, "{}", passed.text);
    document.check("POST", "/api/kling/gen", &passed);
    for refused in [
        json!({"model": "kling-1", "prompt": "x", "duration": "5"}),
        json!({"model": "kling-1", "prompt": "x", "image": ["https://a/1", "https://a/2"]}),
        json!({"prompt": "x"}),
    ] {
        assert!(
            !document.accepts_request("/api/kling/gen", &refused),
            "{refused}"
        );
        let reply = api
            .submit(DESIGN_KEY, "/api/kling/gen", &refused.to_string())
            .await;
        assert_eq!(reply.status, 400, "{refused}: {}", reply.text);
        document.check("POST", "/api/kling/gen", &reply);
    }

    let imagine = json!({"prompt": "a tomato", "speed": "fast"});
    assert!(document.accepts_request("/api/midjourney/imagine", &imagine));
    let accepted = api
        .submit(DESIGN_KEY, "/api/midjourney/imagine", &imagine.to_string())
        .await;
    assert_eq!(accepted.status, 200, "{}", accepted.text);
    document.check("POST", "/api/midjourney/imagine", &accepted);
    // Metrics are served on their own listener, not beside the API.
    assert_eq!(api.get("/metrics", None).await.status, 404);
}
