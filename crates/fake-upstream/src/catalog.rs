//! The asynchronous endpoints the fake serves, one entry per row of the contract's table
//! ("The rest of the API"): where each finds its model and prompt, what it checks, how it prices
//! a task and what its `result` looks like. The fake is the upstream here, so it knows its own
//! API in code; the gateway learns the same from its configuration.

use serde_json::{Map, Value, json};

use ketchup_domain::credits::Credits;

/// Where an endpoint's model id comes from.
#[derive(Debug, Clone, Copy)]
pub(crate) enum ModelSource {
    /// A body field (`model`, or `mv` for Suno).
    Field(&'static str),
    /// No field: the endpoint is its own model (Midjourney).
    Fixed(&'static str),
}

/// Where an endpoint's prompt is.
#[derive(Debug, Clone, Copy)]
pub(crate) enum PromptSource {
    /// A required string field.
    Field(&'static str),
    /// The `text` of a `{"type":"text"}` part of the `content` array (Seedance).
    ContentText,
}

/// What a task's price multiplies by.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Unit {
    /// Each image (`n`, default 1); for the `sized` models, times 1, 2 or 4 for an
    /// `image_size` of `1k`, `2k`, `4k` (other models ignore the field).
    Image { sized: &'static [&'static str] },
    /// Each second of `duration`: a string from `allowed` (Sora, Grok) or an integer (Seedance).
    Second {
        as_string: bool,
        allowed: &'static [u32],
        default: u32,
    },
    /// The task as a whole.
    Task,
}

/// The shape of `result` on success.
#[derive(Debug, Clone, Copy)]
pub(crate) enum ResultShape {
    /// `[{"image": url}, …]`, one per image.
    ImageList,
    /// `{"image": url}`.
    ImageObject,
    /// `{"big_image_url": url}`.
    Midjourney,
    /// `{"video": url}`.
    Video,
    /// `{"video_url": url}`.
    VideoUrl,
    /// `[{"audio_url": url, "title": …}]`: the contract leaves Suno's open; this is the fake's.
    Audio,
}

#[derive(Debug)]
pub(crate) struct Endpoint {
    pub path: &'static str,
    pub model: ModelSource,
    /// The models this endpoint renders; another is a 400.
    pub models: &'static [&'static str],
    pub prompt: PromptSource,
    /// Fields holding reference URLs or data URIs, each with its most.
    pub references: &'static [(&'static str, usize)],
    pub unit: Unit,
    pub result: ResultShape,
}

/// Images per task (`n`). The guides give no limit; a small one keeps results small.
const MAX_IMAGES_PER_TASK: u64 = 4;

pub(crate) const ENDPOINTS: &[Endpoint] = &[
    Endpoint {
        path: "/api/image/gen",
        model: ModelSource::Field("model"),
        models: &[
            "google/gempix2",
            "google/gemini-2.5-flash-image",
            "google/nano-banana",
            "google/nano-banana-2",
            "google/nano-banana-pro",
            "google/gemini-3.1-flash-image-preview",
        ],
        prompt: PromptSource::Field("prompt"),
        // The upstream's feature list says "up to five".
        references: &[("images", 5)],
        unit: Unit::Image {
            sized: &["google/nano-banana-2", "google/nano-banana-pro"],
        },
        result: ResultShape::ImageList,
    },
    Endpoint {
        path: "/api/gpt-image/gen",
        model: ModelSource::Field("model"),
        models: &["openai/gpt-image-1.5", "openai/gpt-image-2"],
        prompt: PromptSource::Field("prompt"),
        references: &[("images", 16)],
        unit: Unit::Image { sized: &[] },
        result: ResultShape::ImageList,
    },
    Endpoint {
        path: "/api/wan-image/gen",
        model: ModelSource::Field("model"),
        models: &["wan-2.7-image"],
        prompt: PromptSource::Field("prompt"),
        references: &[],
        unit: Unit::Task,
        result: ResultShape::ImageObject,
    },
    Endpoint {
        path: "/api/midjourney/imagine",
        model: ModelSource::Fixed("midjourney/imagine"),
        models: &["midjourney/imagine"],
        prompt: PromptSource::Field("prompt"),
        references: &[],
        unit: Unit::Task,
        result: ResultShape::Midjourney,
    },
    Endpoint {
        path: "/api/midjourney/edits",
        model: ModelSource::Fixed("midjourney/edits"),
        models: &["midjourney/edits"],
        prompt: PromptSource::Field("prompt"),
        references: &[("image", 1)],
        unit: Unit::Task,
        result: ResultShape::Midjourney,
    },
    Endpoint {
        path: "/api/sora2/gen",
        model: ModelSource::Field("model"),
        models: &["sora-2", "sora-2-hd", "sora-2-pro"],
        prompt: PromptSource::Field("prompt"),
        references: &[("images", 1)],
        unit: Unit::Second {
            as_string: true,
            allowed: &[10, 15, 25],
            default: 10,
        },
        result: ResultShape::Video,
    },
    Endpoint {
        path: "/api/grok-imagine-video/gen",
        model: ModelSource::Field("model"),
        models: &["grok-imagine-video"],
        prompt: PromptSource::Field("prompt"),
        references: &[("images", 1)],
        unit: Unit::Second {
            as_string: true,
            allowed: &[10, 15],
            default: 10,
        },
        result: ResultShape::Video,
    },
    Endpoint {
        path: "/api/video/seedance/gen",
        model: ModelSource::Field("model"),
        models: &["seedance-2.0"],
        prompt: PromptSource::ContentText,
        references: &[("content[].image_url.url", 9)],
        unit: Unit::Second {
            as_string: false,
            allowed: &[5, 10, 15],
            default: 5,
        },
        result: ResultShape::Video,
    },
    Endpoint {
        path: "/api/google/veo/generate",
        model: ModelSource::Field("model"),
        models: &["google/veo3.1-fast"],
        prompt: PromptSource::Field("prompt"),
        references: &[("image", 1)],
        unit: Unit::Task,
        result: ResultShape::VideoUrl,
    },
    Endpoint {
        path: "/api/suno/generate",
        model: ModelSource::Field("mv"),
        models: &["chirp-v4-5"],
        prompt: PromptSource::Field("prompt"),
        references: &[],
        unit: Unit::Task,
        result: ResultShape::Audio,
    },
];

/// What a valid request asks for.
#[derive(Debug, PartialEq)]
pub(crate) struct Order {
    pub model: String,
    pub prompt: String,
    /// How many units the price multiplies by.
    pub units: u32,
    /// Images a success returns (`n`); 1 for everything else.
    pub images: u32,
}

impl Endpoint {
    /// Checks a request as the upstream would; `Err` is the 400's detail.
    pub fn order(&self, body: &Map<String, Value>) -> Result<Order, String> {
        let prompt = self.prompt(body)?;
        let model = match self.model {
            ModelSource::Fixed(id) => id.to_owned(),
            ModelSource::Field(name) => match field(body, name) {
                Some(Value::String(model)) => model.clone(),
                None => return Err(format!("{name} is required")),
                Some(_) => return Err(format!("{name} must be a string")),
            },
        };
        if !self.models.contains(&model.as_str()) {
            return Err(format!("unsupported model: {model}"));
        }
        for &(path, most) in self.references {
            let count = references(body, path)?;
            if count > most {
                return Err(format!("{path} allows at most {most} reference images"));
            }
        }
        let (units, images) = match self.unit {
            Unit::Image { sized } => {
                let images = image_count(body)?;
                let factor = if sized.contains(&model.as_str()) {
                    size_factor(body)?
                } else {
                    1
                };
                (images * factor, images)
            }
            Unit::Second {
                as_string,
                allowed,
                default,
            } => (duration(body, as_string, allowed, default)?, 1),
            Unit::Task => (1, 1),
        };
        Ok(Order {
            model,
            prompt,
            units,
            images,
        })
    }

    fn prompt(&self, body: &Map<String, Value>) -> Result<String, String> {
        match self.prompt {
            PromptSource::Field(name) => match field(body, name) {
                Some(Value::String(prompt)) if !prompt.trim().is_empty() => Ok(prompt.clone()),
                None | Some(Value::String(_)) => Err(format!("{name} is required")),
                Some(_) => Err(format!("{name} must be a string")),
            },
            PromptSource::ContentText => {
                let parts = field(body, "content")
                    .and_then(Value::as_array)
                    .ok_or("content is required: an array of text and image_url parts")?;
                parts
                    .iter()
                    .filter(|part| part.get("type").and_then(Value::as_str) == Some("text"))
                    .filter_map(|part| part.get("text").and_then(Value::as_str))
                    .find(|text| !text.trim().is_empty())
                    .map(str::to_owned)
                    .ok_or_else(|| "content needs a text part".to_owned())
            }
        }
    }

    /// The `result` of a successful task, its files under `files` (the fake's own
    /// `/_fake/files`, so clients can download what they were given).
    pub fn result(&self, files: &str, task_id: &str, images: u32) -> Value {
        let url = |kind: &str, i: u32, ext: &str| format!("{files}/{kind}/{task_id}/{i}.{ext}");
        match self.result {
            ResultShape::ImageList => Value::Array(
                (0..images)
                    .map(|i| json!({"image": url("images", i, "png")}))
                    .collect(),
            ),
            ResultShape::ImageObject => json!({"image": url("images", 0, "png")}),
            ResultShape::Midjourney => json!({"big_image_url": url("images", 0, "png")}),
            ResultShape::Video => json!({"video": url("videos", 0, "mp4")}),
            ResultShape::VideoUrl => json!({"video_url": url("videos", 0, "mp4")}),
            ResultShape::Audio => {
                json!([{"audio_url": url("audio", 0, "mp3"), "title": "fake song"}])
            }
        }
    }
}

/// The endpoint serving `path`, if any.
pub(crate) fn endpoint(path: &str) -> Option<&'static Endpoint> {
    ENDPOINTS.iter().find(|endpoint| endpoint.path == path)
}

/// What a task of `units` costs at `price` a unit; saturating is only a guard.
pub(crate) fn cost(price: Credits, units: u32) -> Credits {
    price
        .checked_mul(i64::from(units))
        .unwrap_or(Credits::from_units(i64::MAX))
}

/// A present, non-null field: clients send `null` for "not given" as often as they omit it.
pub(crate) fn field<'a>(body: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    body.get(name).filter(|value| !value.is_null())
}

/// How many references a field holds: one string (`image`), an array of strings (any other
/// field), or the `image_url.url` of `content` parts.
fn references(body: &Map<String, Value>, path: &str) -> Result<usize, String> {
    if path == "content[].image_url.url" {
        let parts = field(body, "content").and_then(Value::as_array);
        return Ok(parts.map_or(0, |parts| {
            parts
                .iter()
                .filter(|part| part.pointer("/image_url/url").is_some())
                .count()
        }));
    }
    match (path, field(body, path)) {
        (_, None) => Ok(0),
        ("image", Some(Value::String(_))) => Ok(1),
        ("image", Some(_)) => Err("image must be an image URL or data URI".into()),
        (_, Some(Value::Array(urls))) if urls.iter().all(Value::is_string) => Ok(urls.len()),
        (_, Some(_)) => Err(format!("{path} must be an array of image URLs")),
    }
}

fn image_count(body: &Map<String, Value>) -> Result<u32, String> {
    match field(body, "n") {
        None => Ok(1),
        Some(n) => n
            .as_u64()
            .filter(|n| (1..=MAX_IMAGES_PER_TASK).contains(n))
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| format!("n must be an integer from 1 to {MAX_IMAGES_PER_TASK}")),
    }
}

fn size_factor(body: &Map<String, Value>) -> Result<u32, String> {
    match field(body, "image_size").map(Value::as_str) {
        None | Some(Some("1k")) => Ok(1),
        Some(Some("2k")) => Ok(2),
        Some(Some("4k")) => Ok(4),
        Some(_) => Err("image_size must be 1k, 2k or 4k".into()),
    }
}

fn duration(
    body: &Map<String, Value>,
    as_string: bool,
    allowed: &[u32],
    default: u32,
) -> Result<u32, String> {
    let Some(value) = field(body, "duration") else {
        return Ok(default);
    };
    let seconds = if as_string {
        value.as_str().and_then(|text| text.parse::<u32>().ok())
    } else {
        value.as_u64().and_then(|n| u32::try_from(n).ok())
    };
    let choices = allowed
        .iter()
        .map(|s| {
            if as_string {
                format!("\"{s}\"")
            } else {
                s.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join(", ");
    seconds
        .filter(|seconds| allowed.contains(seconds))
        .ok_or_else(|| format!("duration must be one of {choices}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order(path: &str, body: Value) -> Result<Order, String> {
        endpoint(path)
            .expect("a known endpoint")
            .order(body.as_object().expect("an object"))
    }

    #[test]
    fn video_is_priced_by_duration_in_the_type_of_its_endpoint() {
        let sora = order(
            "/api/sora2/gen",
            json!({"model": "sora-2", "prompt": "x", "duration": "15"}),
        )
        .unwrap();
        assert_eq!(sora.units, 15);
        assert_eq!(
            order(
                "/api/sora2/gen",
                json!({"model": "sora-2", "prompt": "x", "duration": 15})
            ),
            Err(r#"duration must be one of "10", "15", "25""#.into())
        );
        let seedance = order(
            "/api/video/seedance/gen",
            json!({"model": "seedance-2.0", "duration": 10,
                   "content": [{"type": "text", "text": "a cat"},
                               {"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}),
        )
        .unwrap();
        assert_eq!((seedance.units, seedance.prompt.as_str()), (10, "a cat"));
        assert_eq!(
            order(
                "/api/video/seedance/gen",
                json!({"model": "seedance-2.0", "content": [{"type": "text", "text": " "}]})
            ),
            Err("content needs a text part".into())
        );
    }

    #[test]
    fn models_prompts_and_references_are_checked_per_endpoint() {
        let mj = order("/api/midjourney/imagine", json!({"prompt": "x"})).unwrap();
        assert_eq!(mj.model, "midjourney/imagine");
        assert_eq!(
            order(
                "/api/suno/generate",
                json!({"model": "chirp-v4-5", "prompt": "x"})
            ),
            Err("mv is required".into())
        );
        assert_eq!(
            order(
                "/api/wan-image/gen",
                json!({"model": "sora-2", "prompt": "x"})
            ),
            Err("unsupported model: sora-2".into())
        );
        let big = order(
            "/api/image/gen",
            json!({"model": "google/nano-banana-pro", "prompt": "x", "n": 2, "image_size": "4k"}),
        )
        .unwrap();
        assert_eq!((big.units, big.images), (8, 2));
        assert!(
            order(
                "/api/image/gen",
                json!({"model": "google/gempix2", "prompt": "x", "images": ["a","b","c","d","e","f"]})
            )
            .is_err()
        );
    }

    #[test]
    fn results_take_the_shape_of_their_endpoint() {
        let shape = |path: &str| endpoint(path).unwrap().result("http://fake.test", "ta1", 2);
        assert_eq!(shape("/api/image/gen").as_array().map(Vec::len), Some(2));
        assert!(shape("/api/wan-image/gen")["image"].is_string());
        assert!(shape("/api/midjourney/edits")["big_image_url"].is_string());
        assert!(shape("/api/grok-imagine-video/gen")["video"].is_string());
        assert!(shape("/api/google/veo/generate")["video_url"].is_string());
        assert!(shape("/api/suno/generate")[0]["audio_url"].is_string());
    }
}
