//! The asynchronous endpoints the gateway serves: one route per endpoint of the API, each saying
//! where its request keeps what the gateway checks before anything is reserved (the model, the
//! prompt, reference images, typed fields) and which family it counts under.
//!
//! The contract's endpoints are built in ([`RouteTable::builtin`]); `[routes."/api/…"]` in the
//! configuration adds an endpoint or replaces a built-in one whole, so a new endpoint of the API
//! needs only configuration. Every route is polled at the one `/api/task/query`.

use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::body::{case_detail, case_variant};

/// Paths the gateway answers itself, which no route may take.
const RESERVED_PATHS: [&str; 2] = ["/api/task/query", "/api/user"];

/// Where a route's model id comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// A body field: `model`, or `mv` for Suno.
    Field(String),
    /// No field: the endpoint is its own model (Midjourney), priced as any other model.
    Fixed(String),
}

/// A JSON type a field must have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JsonType {
    String,
    Integer,
    Number,
    Boolean,
}

impl JsonType {
    fn admits(self, value: &Value) -> bool {
        match self {
            JsonType::String => value.is_string(),
            JsonType::Integer => value.is_i64() || value.is_u64(),
            JsonType::Number => value.is_number(),
            JsonType::Boolean => value.is_boolean(),
        }
    }

    fn phrase(self) -> &'static str {
        match self {
            JsonType::String => "a string",
            JsonType::Integer => "a whole number",
            JsonType::Number => "a number",
            JsonType::Boolean => "true or false",
        }
    }
}

/// A place in a request body: field names joined by `.`, and `[]` after a name for every
/// element of an array (`content[].image_url.url`).
#[derive(Clone, PartialEq, Eq)]
pub struct FieldPath {
    text: String,
    steps: Vec<(String, bool)>,
}

impl FieldPath {
    pub fn parse(text: &str) -> Result<FieldPath, String> {
        let steps = text
            .split('.')
            .map(|step| {
                let (name, each) = match step.strip_suffix("[]") {
                    Some(name) => (name, true),
                    None => (step, false),
                };
                let valid = !name.is_empty()
                    && name
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
                valid
                    .then(|| (name.to_owned(), each))
                    .ok_or_else(|| format!("{text:?} is not a field path such as \"images\" or \"content[].image_url.url\""))
            })
            .collect::<Result<_, _>>()?;
        Ok(FieldPath {
            text: text.to_owned(),
            steps,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The top-level field the path starts at.
    pub fn first(&self) -> &str {
        &self.steps[0].0
    }

    /// The present, non-null values at this path. `Err` names a key that a reader matching
    /// names without case would take for a step of the path, in any object along it: the
    /// upstream could read the value there instead.
    fn values<'a>(&self, fields: &'a Map<String, Value>) -> Result<Vec<&'a Value>, String> {
        let mut values: Vec<&Value> = Vec::new();
        let mut objects: Vec<&Map<String, Value>> = vec![fields];
        for (i, (name, each)) in self.steps.iter().enumerate() {
            let last = i + 1 == self.steps.len();
            let mut next = Vec::new();
            for object in objects {
                if let Some(key) = case_variant(object, name) {
                    return Err(format!("{} in {}", case_detail(key, name), self.text));
                }
                let Some(value) = object.get(name).filter(|v| !v.is_null()) else {
                    continue;
                };
                let found: Vec<&Value> = match (each, value) {
                    (true, Value::Array(items)) => items.iter().collect(),
                    (true, _) => continue,
                    (false, value) => vec![value],
                };
                if last {
                    values.extend(found.into_iter().filter(|v| !v.is_null()));
                } else {
                    next.extend(found.into_iter().filter_map(Value::as_object));
                }
            }
            objects = next;
        }
        Ok(values)
    }
}

impl fmt::Debug for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.text)
    }
}

/// One asynchronous endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The path clients post to, the same as upstream (`/api/sora2/gen`).
    pub path: String,
    /// What the route's work is (`image`, `video`, …): a bounded label for metrics and reports.
    pub family: String,
    pub model: ModelSource,
    /// Where the prompt is; `None` for an endpoint without one.
    pub prompt: Option<FieldPath>,
    pub prompt_required: bool,
    /// Fields holding reference images (http(s) URLs or data URIs), each with its most.
    pub references: Vec<(FieldPath, usize)>,
    /// Fields whose JSON type the upstream insists on (`duration` is a string for Sora).
    pub types: BTreeMap<String, JsonType>,
    /// Whether the upstream takes a `callback_url` here, so the gateway may add its own.
    pub accepts_callback: bool,
}

/// What the gateway takes from a valid request; everything else is forwarded untouched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Submission {
    pub model: String,
    /// `n`: how many results the request asks for (1 when absent); reservations multiply by it.
    pub count: i64,
    pub callback_url: Option<String>,
}

impl Route {
    /// The top-level fields [`Route::check`] reads (present or not).
    pub fn fields_read(&self) -> impl Iterator<Item = &str> {
        let model = match &self.model {
            ModelSource::Field(name) => Some(name.as_str()),
            ModelSource::Fixed(_) => None,
        };
        model
            .into_iter()
            .chain(self.prompt.iter().map(FieldPath::first))
            .chain(self.references.iter().map(|(path, _)| path.first()))
            .chain(self.types.keys().map(String::as_str))
            .chain(["n", "callback_url"])
    }

    /// Checks what the upstream would refuse, so a bad request costs neither a reservation nor
    /// an upstream call; `Err` is a 400's detail naming the field.
    pub fn check(&self, fields: &Map<String, Value>) -> Result<Submission, String> {
        let model = match &self.model {
            ModelSource::Fixed(id) => id.clone(),
            ModelSource::Field(name) => match fields.get(name) {
                None | Some(Value::Null) => return Err(format!("{name} is required")),
                Some(Value::String(model)) => model.clone(),
                Some(_) => return Err(format!("{name} must be a string")),
            },
        };
        if let Some(path) = &self.prompt {
            let values = path.values(fields)?;
            if values.iter().any(|value| !value.is_string()) {
                return Err(format!("{} must be a string", path.as_str()));
            }
            let written = values
                .iter()
                .filter_map(|value| value.as_str())
                .any(|text| !text.trim().is_empty());
            if self.prompt_required && !written {
                return Err(format!("{} is required", path.as_str()));
            }
        }
        for (path, most) in &self.references {
            check_references(fields, path, *most)?;
        }
        for (name, kind) in &self.types {
            if let Some(value) = fields.get(name).filter(|v| !v.is_null())
                && !kind.admits(value)
            {
                return Err(format!("{name} must be {} here", kind.phrase()));
            }
        }
        let callback_url = match fields.get("callback_url") {
            None | Some(Value::Null) => None,
            Some(Value::String(url)) if is_http_url(url) => Some(url.clone()),
            Some(_) => return Err("callback_url must be an http(s) URL".into()),
        };
        let count = match fields.get("n") {
            None | Some(Value::Null) => 1,
            Some(n) => n
                .as_i64()
                .filter(|n| *n >= 1)
                .ok_or("n must be a positive whole number")?,
        };
        Ok(Submission {
            model,
            count,
            callback_url,
        })
    }
}

/// Every reference at `path` must be an http(s) URL or a data URI, and there may be `most`.
fn check_references(
    fields: &Map<String, Value>,
    path: &FieldPath,
    most: usize,
) -> Result<(), String> {
    let mut references = Vec::new();
    for value in path.values(fields)? {
        match value {
            Value::String(text) => references.push(text.as_str()),
            Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    let text = item.as_str().ok_or_else(|| {
                        format!(
                            "{}[{i}] must be an http(s) URL or a data URI",
                            path.as_str()
                        )
                    })?;
                    references.push(text);
                }
            }
            _ => {
                return Err(format!(
                    "{} must be http(s) URLs or data URIs",
                    path.as_str()
                ));
            }
        }
    }
    if references.len() > most {
        return Err(format!(
            "at most {most} reference images are allowed in {}, got {}",
            path.as_str(),
            references.len()
        ));
    }
    if let Some(i) = references
        .iter()
        .position(|text| !is_http_url(text) && !is_data_uri(text))
    {
        return Err(format!(
            "{}[{i}] must be an http(s) URL or a data URI",
            path.as_str()
        ));
    }
    Ok(())
}

pub fn is_http_url(text: &str) -> bool {
    url::Url::parse(text)
        .is_ok_and(|url| matches!(url.scheme(), "http" | "https") && url.host().is_some())
}

fn is_data_uri(text: &str) -> bool {
    text.get(..5)
        .is_some_and(|scheme| scheme.eq_ignore_ascii_case("data:"))
        && text.contains(',')
}

/// A route as the admin writes it under `[routes."/api/…"]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    family: String,
    /// The body field holding the model id (default `model`).
    model_field: Option<String>,
    /// A model id for an endpoint whose body names none.
    fixed_model: Option<String>,
    /// Where the prompt is (default `prompt`); `""` for an endpoint without one.
    prompt_field: Option<String>,
    #[serde(default = "yes")]
    prompt_required: bool,
    #[serde(default)]
    references: BTreeMap<String, usize>,
    #[serde(default)]
    types: BTreeMap<String, JsonType>,
    #[serde(default)]
    accepts_callback: bool,
}

fn yes() -> bool {
    true
}

impl RawRoute {
    /// The validated route for `path`.
    pub fn into_route(self, path: &str) -> Result<Route, String> {
        if !path.starts_with("/api/") || path.contains(['?', '#', '{', '}', '*']) {
            return Err(format!("{path:?} must be a plain path under /api/"));
        }
        if RESERVED_PATHS.contains(&path) {
            return Err(format!("{path} is the gateway's own and cannot be a route"));
        }
        if !is_label(&self.family) {
            return Err(format!(
                "family {:?} must be a short name of letters, digits, '_' or '-'",
                self.family
            ));
        }
        let model = match (self.model_field, self.fixed_model) {
            (Some(_), Some(_)) => {
                return Err("set model_field or fixed_model, not both".into());
            }
            (None, Some(id)) if !id.trim().is_empty() => ModelSource::Fixed(id),
            (None, Some(_)) => return Err("fixed_model must not be empty".into()),
            (field, None) => ModelSource::Field(field.unwrap_or_else(|| "model".into())),
        };
        let prompt = match self.prompt_field.as_deref() {
            Some("") => None,
            other => Some(FieldPath::parse(other.unwrap_or("prompt"))?),
        };
        let references = self
            .references
            .into_iter()
            .map(|(path, most)| Ok((FieldPath::parse(&path)?, most)))
            .collect::<Result<_, String>>()?;
        Ok(Route {
            path: path.to_owned(),
            family: self.family,
            model,
            prompt,
            prompt_required: self.prompt_required,
            references,
            types: self.types,
            accepts_callback: self.accepts_callback,
        })
    }
}

fn is_label(text: &str) -> bool {
    (1..=32).contains(&text.len())
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// The routes the gateway serves, by path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteTable {
    routes: BTreeMap<String, Route>,
}

impl RouteTable {
    /// The contract's asynchronous endpoints. `max_reference_images` bounds `images` on
    /// `/api/image/gen` (`[upstream] max_reference_images`).
    pub fn builtin(max_reference_images: usize) -> RouteTable {
        let route = |path: &str, family: &str, model: ModelSource| Route {
            path: path.to_owned(),
            family: family.to_owned(),
            model,
            prompt: Some(FieldPath::parse("prompt").expect("a valid path")),
            prompt_required: true,
            references: Vec::new(),
            types: BTreeMap::new(),
            accepts_callback: false,
        };
        let field = |name: &str| ModelSource::Field(name.to_owned());
        let fixed = |id: &str| ModelSource::Fixed(id.to_owned());
        let refs = |list: &[(&str, usize)]| {
            list.iter()
                .map(|(path, most)| (FieldPath::parse(path).expect("a valid path"), *most))
                .collect()
        };
        let typed = |name: &str, kind| BTreeMap::from([(name.to_owned(), kind)]);
        let routes = [
            Route {
                references: refs(&[("images", max_reference_images)]),
                accepts_callback: true,
                ..route("/api/image/gen", "image", field("model"))
            },
            Route {
                references: refs(&[("images", 16)]),
                ..route("/api/gpt-image/gen", "image", field("model"))
            },
            route("/api/wan-image/gen", "image", field("model")),
            route(
                "/api/midjourney/imagine",
                "midjourney",
                fixed("midjourney/imagine"),
            ),
            Route {
                references: refs(&[("image", 1)]),
                ..route(
                    "/api/midjourney/edits",
                    "midjourney",
                    fixed("midjourney/edits"),
                )
            },
            Route {
                references: refs(&[("images", 1)]),
                types: typed("duration", JsonType::String),
                ..route("/api/sora2/gen", "video", field("model"))
            },
            Route {
                references: refs(&[("images", 1)]),
                types: typed("duration", JsonType::String),
                ..route("/api/grok-imagine-video/gen", "video", field("model"))
            },
            Route {
                prompt: Some(FieldPath::parse("content[].text").expect("a valid path")),
                references: refs(&[("content[].image_url.url", 9)]),
                types: typed("duration", JsonType::Integer),
                ..route("/api/video/seedance/gen", "video", field("model"))
            },
            Route {
                references: refs(&[("image", 1)]),
                ..route("/api/google/veo/generate", "video", field("model"))
            },
            Route {
                accepts_callback: true,
                ..route("/api/suno/generate", "music", field("mv"))
            },
        ];
        RouteTable {
            routes: routes
                .into_iter()
                .map(|route| (route.path.clone(), route))
                .collect(),
        }
    }

    /// The built-in routes with the admin's added or replaced over them.
    pub fn with(mut self, configured: Vec<Route>) -> RouteTable {
        for route in configured {
            self.routes.insert(route.path.clone(), route);
        }
        self
    }

    pub fn get(&self, path: &str) -> Option<&Route> {
        self.routes.get(path)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Route> {
        self.routes.values()
    }

    /// Whether both tables serve the same paths.
    pub fn same_paths(&self, other: &RouteTable) -> bool {
        self.routes.keys().eq(other.routes.keys())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn check(path: &str, body: Value) -> Result<Submission, String> {
        RouteTable::builtin(4)
            .get(path)
            .expect("a built-in route")
            .check(body.as_object().unwrap())
    }

    #[test]
    fn every_contract_endpoint_is_built_in() {
        let table = RouteTable::builtin(4);
        for path in [
            "/api/image/gen",
            "/api/gpt-image/gen",
            "/api/wan-image/gen",
            "/api/midjourney/imagine",
            "/api/midjourney/edits",
            "/api/sora2/gen",
            "/api/grok-imagine-video/gen",
            "/api/video/seedance/gen",
            "/api/google/veo/generate",
            "/api/suno/generate",
        ] {
            assert!(table.get(path).is_some(), "{path}");
        }
        assert_eq!(table.iter().count(), 10);
        assert_eq!(
            table
                .iter()
                .map(|route| route.family.as_str())
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect::<Vec<_>>(),
            ["image", "midjourney", "music", "video"]
        );
    }

    #[test]
    fn models_come_from_their_field_or_the_route() {
        let mj = check("/api/midjourney/imagine", json!({"prompt": "x"})).unwrap();
        assert_eq!(mj.model, "midjourney/imagine");
        let suno = check(
            "/api/suno/generate",
            json!({"mv": "chirp-v4-5", "prompt": "x"}),
        )
        .unwrap();
        assert_eq!(suno.model, "chirp-v4-5");
        assert_eq!(
            check(
                "/api/suno/generate",
                json!({"model": "chirp-v4-5", "prompt": "x"})
            ),
            Err("mv is required".into())
        );
    }

    #[test]
    fn prompts_are_required_where_the_route_says() {
        assert_eq!(
            check("/api/sora2/gen", json!({"model": "sora-2", "prompt": "  "})),
            Err("prompt is required".into())
        );
        assert_eq!(
            check("/api/sora2/gen", json!({"model": "sora-2", "prompt": 3})),
            Err("prompt must be a string".into())
        );
        let seedance = |content: Value| {
            check(
                "/api/video/seedance/gen",
                json!({"model": "seedance-2.0", "content": content}),
            )
        };
        assert!(seedance(json!([{"type": "text", "text": "a cat"}])).is_ok());
        assert_eq!(
            seedance(json!([{"type": "image_url", "image_url": {"url": "https://a/b.png"}}])),
            Err("content[].text is required".into())
        );
        assert_eq!(
            seedance(json!("a cat")),
            Err("content[].text is required".into())
        );
    }

    #[test]
    fn references_are_counted_and_must_be_urls_or_data_uris() {
        let image = |images: Value| {
            check(
                "/api/image/gen",
                json!({"model": "m", "prompt": "x", "images": images}),
            )
        };
        assert!(image(json!(["https://a/1.png", "data:image/png;base64,AAAA"])).is_ok());
        assert_eq!(
            image(json!(["https://a/1.png", "file:///etc/passwd"])),
            Err("images[1] must be an http(s) URL or a data URI".into())
        );
        assert_eq!(
            image(json!([
                "https://a/1",
                "https://a/2",
                "https://a/3",
                "https://a/4",
                "https://a/5"
            ])),
            Err("at most 4 reference images are allowed in images, got 5".into())
        );
        let parts: Vec<Value> = (0..10)
            .map(|i| json!({"type": "image_url", "image_url": {"url": format!("https://a/{i}")}}))
            .chain([json!({"type": "text", "text": "x"})])
            .collect();
        assert_eq!(
            check(
                "/api/video/seedance/gen",
                json!({"model": "seedance-2.0", "content": parts})
            ),
            Err("at most 9 reference images are allowed in content[].image_url.url, got 10".into())
        );
        assert_eq!(
            check(
                "/api/midjourney/edits",
                json!({"prompt": "x", "image": "javascript:alert(1)"})
            ),
            Err("image[0] must be an http(s) URL or a data URI".into())
        );
    }

    #[test]
    fn a_case_variant_along_a_nested_path_is_refused() {
        let seedance = |content: Value| {
            check(
                "/api/video/seedance/gen",
                json!({"model": "seedance-2.0", "content": content}),
            )
        };
        assert_eq!(
            seedance(json!([
                {"type": "text", "text": "x"},
                {"type": "image_url", "image_url": {"url": "https://a/1", "URL": "file:///x"}}
            ])),
            Err(r#""URL" differs from "url" only in case in content[].image_url.url"#.into())
        );
        assert_eq!(
            seedance(json!([{"type": "text", "text": "x", "Text": ""}])),
            Err(r#""Text" differs from "text" only in case in content[].text"#.into())
        );
        let many: Vec<Value> = (0..10)
            .map(|i| json!({"type": "image_url", "imaGe_url": {"url": format!("https://a/{i}")}}))
            .chain([json!({"type": "text", "text": "x"})])
            .collect();
        assert_eq!(
            seedance(json!(many)),
            Err(
                r#""imaGe_url" differs from "image_url" only in case in content[].image_url.url"#
                    .into()
            )
        );
    }

    #[test]
    fn a_duration_must_have_its_routes_type() {
        assert_eq!(
            check(
                "/api/sora2/gen",
                json!({"model": "sora-2", "prompt": "x", "duration": 10})
            ),
            Err("duration must be a string here".into())
        );
        assert_eq!(
            check(
                "/api/video/seedance/gen",
                json!({"model": "seedance-2.0", "duration": "10", "content": [{"type": "text", "text": "x"}]})
            ),
            Err("duration must be a whole number here".into())
        );
    }

    #[test]
    fn counts_and_callbacks_are_checked_on_every_route() {
        let submission = check(
            "/api/gpt-image/gen",
            json!({"model": "m", "prompt": "x", "n": 3, "callback_url": "https://hooks/x"}),
        )
        .unwrap();
        assert_eq!(submission.count, 3);
        assert_eq!(submission.callback_url.as_deref(), Some("https://hooks/x"));
        assert_eq!(
            check(
                "/api/wan-image/gen",
                json!({"model": "m", "prompt": "x", "n": 0})
            ),
            Err("n must be a positive whole number".into())
        );
        assert_eq!(
            check(
                "/api/wan-image/gen",
                json!({"model": "m", "prompt": "x", "callback_url": "ftp://x"})
            ),
            Err("callback_url must be an http(s) URL".into())
        );
    }

    #[test]
    fn admins_add_and_replace_routes_in_config() {
        #[derive(Deserialize)]
        struct File {
            routes: BTreeMap<String, RawRoute>,
        }
        let file: File = toml::from_str(
            r#"
            [routes."/api/kling/gen"]
            family = "video"
            references = { "image" = 1 }
            types = { duration = "integer" }
            accepts_callback = true

            [routes."/api/midjourney/imagine"]
            family = "midjourney"
            fixed_model = "midjourney/imagine-v7"
            "#,
        )
        .unwrap();
        let configured = file
            .routes
            .into_iter()
            .map(|(path, raw)| raw.into_route(&path))
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let table = RouteTable::builtin(4).with(configured);
        assert_eq!(table.iter().count(), 11);
        let kling = table.get("/api/kling/gen").unwrap();
        assert_eq!(kling.model, ModelSource::Field("model".into()));
        assert!(kling.accepts_callback);
        assert_eq!(
            table.get("/api/midjourney/imagine").unwrap().model,
            ModelSource::Fixed("midjourney/imagine-v7".into())
        );

        let refused = |path: &str, text: &str| {
            let raw: RawRoute = toml::from_str(text).unwrap();
            raw.into_route(path).unwrap_err()
        };
        assert!(refused("/api/task/query", "family = \"x\"").contains("gateway's own"));
        assert!(refused("/v1/x", "family = \"x\"").contains("under /api/"));
        assert!(refused("/api/x", "family = \"a b\"").contains("short name"));
        assert!(
            refused(
                "/api/x",
                "family = \"x\"\nmodel_field = \"m\"\nfixed_model = \"y\""
            )
            .contains("not both")
        );
        assert!(
            refused("/api/x", "family = \"x\"\nreferences = { \"a..b\" = 1 }")
                .contains("field path")
        );
        assert!(toml::from_str::<RawRoute>("family = \"x\"\ntypo = 1").is_err());
    }
}
