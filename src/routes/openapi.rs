//! `GET /openapi.json`: the OpenAPI 3.1 document of everything the gateway serves.
//!
//! The document is `src/openapi.json`, written by hand and embedded in the binary: it describes
//! the gateway on its default route table, with each built-in endpoint's request fields as the
//! upstream's contract gives them, which no route definition knows. What a configuration
//! changes is applied to the copy served: a route that `[routes]` adds or redefines (or that
//! `[upstream] max_reference_images` changes) is described from its definition, that is from
//! what the gateway checks; `/metrics` goes when `server.metrics_listen` serves it elsewhere;
//! `/admin/*` goes without an admin token. Served unchanged, it is the file byte for byte.

use std::sync::Arc;

use axum::{extract::State, response::IntoResponse, response::Response};
use bytes::Bytes;
use http::{HeaderValue, StatusCode, header};
use serde_json::{Map, Value, json};

use crate::state::AppState;
use ketchup_domain::{
    config::{Config, DEFAULT_MAX_REFERENCE_IMAGES},
    route_table::{JsonType, ModelSource, Route, RouteTable},
};

/// The document, as written for the default route table.
pub const DOCUMENT: &str = include_str!("../openapi.json");

/// The statuses every generation answers, with the response each one is (`components/responses`).
/// `default` is the upstream's own answer, passed through whatever its status.
pub const GENERATION_RESPONSES: [(&str, &str); 11] = [
    ("200", "Accepted"),
    ("400", "BadRequest"),
    ("401", "Unauthorized"),
    ("402", "BudgetExhausted"),
    ("409", "Conflict"),
    ("413", "PayloadTooLarge"),
    ("429", "TooManyRequests"),
    ("502", "BadGateway"),
    ("503", "Unavailable"),
    ("504", "Timeout"),
    ("default", "UpstreamAnswer"),
];

/// What the served document depends on that is settled when the router is built.
#[derive(Debug, Clone, Copy)]
pub struct Published {
    /// Whether the admin API exists (an admin token is configured).
    pub admin: bool,
    /// Whether `/metrics` is served beside the API.
    pub metrics: bool,
}

pub async fn serve(State(state): State<Arc<AppState>>, published: Published) -> Response {
    let body = document(&state.config.load(), published);
    let mut response = (StatusCode::OK, body).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// The document for `config`: [`DOCUMENT`] itself when the configuration changes nothing in it.
pub fn document(config: &Config, published: Published) -> Bytes {
    let default_table = RouteTable::builtin(DEFAULT_MAX_REFERENCE_IMAGES);
    let redefined: Vec<&Route> = config
        .routes
        .iter()
        .filter(|route| default_table.get(&route.path) != Some(*route))
        .collect();
    if redefined.is_empty() && published.admin && published.metrics {
        return Bytes::from_static(DOCUMENT.as_bytes());
    }
    let mut document: Value =
        serde_json::from_str(DOCUMENT).expect("the embedded document is JSON");
    let paths = document["paths"]
        .as_object_mut()
        .expect("the document has paths");
    if !published.metrics {
        paths.remove("/metrics");
    }
    if !published.admin {
        paths.retain(|path, _| !path.starts_with("/admin/"));
    }
    for route in redefined {
        let operation_id = paths
            .get(&route.path)
            .and_then(|item| item["post"]["operationId"].as_str())
            .map_or_else(|| operation_id(&route.path), str::to_owned);
        paths.insert(route.path.clone(), path_item(route, &operation_id));
    }
    let mut text = serde_json::to_vec_pretty(&document).expect("a document serialises");
    text.push(b'\n');
    text.into()
}

/// `post_api_kling_gen` for `/api/kling/gen`: unique, since route paths are.
fn operation_id(path: &str) -> String {
    let name: String = path
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    format!("post{name}")
}

/// The path item of a route described from its definition.
pub fn path_item(route: &Route, operation_id: &str) -> Value {
    let responses: Map<String, Value> = GENERATION_RESPONSES
        .iter()
        .map(|(status, name)| ((*status).to_owned(), reference("responses", name)))
        .collect();
    json!({
        "post": {
            "operationId": operation_id,
            "tags": ["generation"],
            "summary": format!("Start a task on {} (family {})", route.path, route.family),
            "description": "A route of the configuration's `[routes]`, described from its \
                definition: the fields the gateway checks before anything is reserved. Every \
                other field is forwarded to the upstream untouched.",
            "requestBody": {
                "required": true,
                "content": {"application/json": {"schema": request_schema(route)}},
            },
            "responses": responses,
        }
    })
}

fn reference(kind: &str, name: &str) -> Value {
    json!({ "$ref": format!("#/components/{kind}/{name}") })
}

/// The request body a route accepts, as [`Route::check`] judges it.
pub fn request_schema(route: &Route) -> Value {
    let mut properties = Map::new();
    let mut required = Vec::new();
    let mut notes = Vec::new();
    match &route.model {
        ModelSource::Field(name) => {
            properties.insert(
                name.clone(),
                json!({"type": "string", "description": "A model the configuration offers."}),
            );
            required.push(name.clone());
        }
        ModelSource::Fixed(id) => notes.push(format!(
            "Names no model: the route is its own model, `{id}`, priced as any other."
        )),
    }
    if let Some(prompt) = &route.prompt {
        let text = reference("schemas", "Prompt");
        let nested = insert_at(&mut properties, prompt.as_str(), text);
        if route.prompt_required && !required.iter().any(|name| name == prompt.first()) {
            required.push(prompt.first().to_owned());
            if nested {
                notes.push(format!(
                    "The prompt is at `{}`, required and not blank.",
                    prompt.as_str()
                ));
            }
        }
    }
    for (path, most) in &route.references {
        let image = reference("schemas", "ReferenceImage");
        let leaf = if path.as_str().contains('.') || path.as_str().contains("[]") {
            notes.push(format!(
                "At most {most} reference images at `{}` in all.",
                path.as_str()
            ));
            image
        } else {
            json!({"anyOf": [
                image,
                {"type": "array", "items": image, "maxItems": most},
                {"type": "null"},
            ], "description": format!("Reference images, at most {most}.")})
        };
        insert_at(&mut properties, path.as_str(), leaf);
    }
    // An optional field sent as null is read as one left out.
    for (name, kind) in &route.types {
        let kind = match kind {
            JsonType::String => "string",
            JsonType::Integer => "integer",
            JsonType::Number => "number",
            JsonType::Boolean => "boolean",
        };
        match properties.get_mut(name).and_then(Value::as_object_mut) {
            Some(schema) => {
                schema.insert("type".into(), json!([kind, "null"]));
            }
            None => {
                properties.insert(name.clone(), json!({ "type": [kind, "null"] }));
            }
        }
    }
    properties.insert("n".into(), reference("schemas", "Count"));
    properties.insert("callback_url".into(), reference("schemas", "CallbackUrl"));
    let mut schema = json!({
        "type": "object",
        "required": required,
        "properties": properties,
    });
    if !notes.is_empty() {
        schema["description"] = notes.join(" ").into();
    }
    schema
}

/// Puts `leaf` at a field path (`images`, `content[].image_url.url`) among `properties`, with
/// the objects and arrays on the way, merged with what is there already. Whether the path is
/// nested.
fn insert_at(properties: &mut Map<String, Value>, path: &str, leaf: Value) -> bool {
    let steps: Vec<(&str, bool)> = path
        .split('.')
        .map(|step| match step.strip_suffix("[]") {
            Some(name) => (name, true),
            None => (step, false),
        })
        .collect();
    let mut level = properties;
    for (i, (name, each)) in steps.iter().enumerate() {
        let last = i + 1 == steps.len();
        let value = match (last, each) {
            (true, false) => {
                level.insert((*name).to_owned(), leaf);
                break;
            }
            (true, true) => {
                level.insert((*name).to_owned(), json!({"type": "array", "items": leaf}));
                break;
            }
            (false, false) => level
                .entry(*name)
                .or_insert_with(|| json!({"type": "object"})),
            (false, true) => level
                .entry(*name)
                .or_insert_with(|| json!({"type": "array"}))
                .as_object_mut()
                .expect("a schema object")
                .entry("items")
                .or_insert_with(|| json!({"type": "object"})),
        };
        // Every schema put here is an object, and every `properties` too.
        level = value
            .as_object_mut()
            .expect("a schema object")
            .entry("properties")
            .or_insert_with(|| json!({}))
            .as_object_mut()
            .expect("a properties object");
    }
    steps.len() > 1
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// A configuration with `upstream` lines in `[upstream]` and `tables` after it.
    fn config(upstream: &str, tables: &str) -> Config {
        let text = format!(
            "[upstream]\ntoken_env = \"T\"\n{upstream}\n[models.\"m\"]\nreserve = \"0.10\"\n{tables}"
        );
        Config::parse(Path::new("test.toml"), &text).unwrap()
    }

    fn parsed(config: &Config, published: Published) -> Value {
        serde_json::from_slice(&document(config, published)).unwrap()
    }

    const ALL: Published = Published {
        admin: true,
        metrics: true,
    };

    #[test]
    fn the_default_configuration_serves_the_file_itself() {
        assert_eq!(document(&config("", ""), ALL), DOCUMENT.as_bytes());
    }

    #[test]
    fn what_is_not_served_is_left_out() {
        let served = parsed(
            &config("", ""),
            Published {
                admin: false,
                metrics: false,
            },
        );
        let paths = served["paths"].as_object().unwrap();
        assert!(!paths.contains_key("/metrics"));
        assert!(!paths.keys().any(|path| path.starts_with("/admin")));
        assert!(paths.contains_key("/api/image/gen"));
        assert!(paths.contains_key("/healthz"));
    }

    #[test]
    fn a_configured_route_is_described_from_its_definition() {
        let served = parsed(
            &config(
                "",
                r#"
                [routes."/api/kling/gen"]
                family = "video"
                references = { "image" = 1, "frames[].url" = 3 }
                types = { duration = "integer" }

                [routes."/api/midjourney/imagine"]
                family = "midjourney"
                fixed_model = "midjourney/imagine-v7"

                [routes."/api/video/seedance/gen"]
                family = "video"
                prompt_field = "content[].text"
                references = { "content[].image_url.url" = 9 }
                "#,
            ),
            ALL,
        );
        let kling = &served["paths"]["/api/kling/gen"]["post"];
        assert_eq!(kling["operationId"], "post_api_kling_gen");
        let schema = &kling["requestBody"]["content"]["application/json"]["schema"];
        assert_eq!(schema["required"], json!(["model", "prompt"]));
        assert_eq!(
            schema["properties"]["duration"],
            json!({"type": ["integer", "null"]})
        );
        assert_eq!(schema["properties"]["image"]["anyOf"][1]["maxItems"], 1);
        assert_eq!(
            schema["properties"]["frames"]["items"]["properties"]["url"],
            json!({"$ref": "#/components/schemas/ReferenceImage"})
        );
        assert_eq!(
            kling["responses"]["402"],
            json!({"$ref": "#/components/responses/BudgetExhausted"})
        );

        let imagine = &served["paths"]["/api/midjourney/imagine"]["post"];
        assert_eq!(imagine["operationId"], "midjourneyImagine");
        let schema = &imagine["requestBody"]["content"]["application/json"]["schema"];
        assert_eq!(schema["required"], json!(["prompt"]));
        assert!(
            schema["description"]
                .as_str()
                .unwrap()
                .contains("midjourney/imagine-v7")
        );

        // Redefined with a different model field, seedance's `content` holds both paths.
        let seedance = &served["paths"]["/api/video/seedance/gen"]["post"]["requestBody"]["content"]
            ["application/json"]["schema"];
        let part = &seedance["properties"]["content"]["items"]["properties"];
        assert_eq!(part["text"], json!({"$ref": "#/components/schemas/Prompt"}));
        assert_eq!(
            part["image_url"]["properties"]["url"],
            json!({"$ref": "#/components/schemas/ReferenceImage"})
        );
        assert_eq!(seedance["required"], json!(["model", "content"]));

        // Routes the configuration leaves alone keep the file's description.
        let file: Value = serde_json::from_str(DOCUMENT).unwrap();
        assert_eq!(
            served["paths"]["/api/sora2/gen"],
            file["paths"]["/api/sora2/gen"]
        );
    }

    #[test]
    fn more_reference_images_redescribe_the_image_route() {
        let served = parsed(&config("max_reference_images = 6", ""), ALL);
        let schema = &served["paths"]["/api/image/gen"]["post"]["requestBody"]["content"]["application/json"]
            ["schema"];
        assert_eq!(schema["properties"]["images"]["anyOf"][1]["maxItems"], 6);
    }

    #[test]
    fn the_file_describes_every_built_in_route_with_the_generation_responses() {
        let file: Value = serde_json::from_str(DOCUMENT).unwrap();
        for route in RouteTable::builtin(DEFAULT_MAX_REFERENCE_IMAGES).iter() {
            let generated = path_item(route, "x");
            assert_eq!(
                file["paths"][&route.path]["post"]["responses"], generated["post"]["responses"],
                "{}",
                route.path
            );
        }
    }
}
