//! Every asynchronous endpoint of the contract, through the real binary in front of the fake
//! upstream: each renders and is polled at the one `/api/task/query`, its result passes through
//! untouched, its team is charged exactly what the fake consumed, and no other team sees it.
//! Reservations follow the request, and bad input is refused before anything is reserved.

use ketchup_fake_upstream::FakeHandle;
use ketchup_testkit::{ADS_KEY, Api, DESIGN_KEY, Env, GEMPIX, GatewayConfig, fake_config};
use serde_json::Value;

/// One request per route of the contract's table, and where its result's URL is.
const ROUTES: [(&str, &str, &str); 10] = [
    (
        "/api/image/gen",
        r#"{"model":"google/nano-banana-2","prompt":"a tomato","image_size":"2k","n":2}"#,
        "/1/image",
    ),
    (
        "/api/gpt-image/gen",
        r#"{"model":"openai/gpt-image-2","prompt":"a tomato","quality":"high"}"#,
        "/0/image",
    ),
    (
        "/api/wan-image/gen",
        r#"{"model":"wan-2.7-image","prompt":"a tomato","aspect_ratio":"1:1"}"#,
        "/image",
    ),
    (
        "/api/midjourney/imagine",
        r#"{"prompt":"a tomato","bot_type":"MID_JOURNEY","speed":"fast"}"#,
        "/big_image_url",
    ),
    (
        "/api/midjourney/edits",
        r#"{"prompt":"redder","image":"https://img.example/t.png","speed":"relax"}"#,
        "/big_image_url",
    ),
    (
        "/api/sora2/gen",
        r#"{"model":"sora-2","prompt":"a tomato rolls","duration":"15","aspect_ratio":"16:9"}"#,
        "/video",
    ),
    (
        "/api/grok-imagine-video/gen",
        r#"{"model":"grok-imagine-video","prompt":"a tomato","duration":"10"}"#,
        "/video",
    ),
    (
        "/api/video/seedance/gen",
        r#"{"model":"seedance-2.0","duration":10,"ratio":"16:9","content":[{"type":"text","text":"a tomato"},{"type":"image_url","image_url":{"url":"https://img.example/t.png"}}]}"#,
        "/video",
    ),
    (
        "/api/google/veo/generate",
        r#"{"model":"google/veo3.1-fast","prompt":"a tomato","aspect_ratio":"16:9"}"#,
        "/video_url",
    ),
    (
        "/api/suno/generate",
        r#"{"mv":"chirp-v4-5","prompt":"a song about tomatoes","make_instrumental":false}"#,
        "/0/audio_url",
    ),
];

/// Every model of [`ROUTES`], reserved as the example configuration does.
fn every_model(config: GatewayConfig) -> GatewayConfig {
    [
        (
            "google/nano-banana-2",
            r#"{ by = "image_size", prices = { "1k" = "0.06", "2k" = "0.12", "4k" = "0.24" }, default = "1k" }"#,
        ),
        ("openai/gpt-image-2", r#""0.10""#),
        ("wan-2.7-image", r#""0.05""#),
        ("midjourney/imagine", r#""0.20""#),
        ("midjourney/edits", r#""0.25""#),
        (
            "sora-2",
            r#"{ by = "duration", prices = { "10" = "1.00", "15" = "1.50", "25" = "2.50" } }"#,
        ),
        (
            "grok-imagine-video",
            r#"{ by = "duration", prices = { "10" = "0.80", "15" = "1.20" } }"#,
        ),
        (
            "seedance-2.0",
            r#"{ by = "duration", per_unit = "0.12", max = 15 }"#,
        ),
        ("google/veo3.1-fast", r#""1.50""#),
        ("chirp-v4-5", r#""0.10""#),
    ]
    .into_iter()
    .fold(config, |config, (model, reserve)| {
        config.model_reserve(model, reserve)
    })
}

async fn spent(api: &Api) -> (String, String) {
    let budget = api.budget(DESIGN_KEY).await;
    (
        budget["spent"].as_str().unwrap().to_owned(),
        budget["reserved"].as_str().unwrap().to_owned(),
    )
}

/// The fake's own answer for `task`, read with the upstream token.
async fn straight_from_the_fake(fake: &FakeHandle, task: &str) -> Value {
    reqwest::Client::new()
        .get(format!("{}/api/task/query", fake.base_url()))
        .query(&[("task_id", task)])
        .bearer_auth(ketchup_testkit::UPSTREAM_TOKEN)
        .send()
        .await
        .expect("the fake answers")
        .json()
        .await
        .expect("JSON")
}

#[tokio::test]
async fn every_route_renders_is_charged_what_it_consumed_and_stays_its_teams() {
    let config = every_model(GatewayConfig::new())
        .budget("design", r#"{ credits = "100.00", period = "lifetime" }"#);
    let env = Env::start_with(fake_config(), config).await;
    let api = env.api();
    let mut total: ketchup_domain::credits::Credits = "0".parse().unwrap();
    for (path, body, result) in ROUTES {
        let accepted = api.submit(DESIGN_KEY, path, body).await;
        assert_eq!(accepted.status, 200, "{path}: {}", accepted.text);
        let task = accepted.task_id();

        let done = api.wait_for_final(DESIGN_KEY, &task).await;
        let data = done.json()["data"].clone();
        assert_eq!(data["status"], "success", "{path}: {data}");
        assert!(
            data["result"].pointer(result).is_some_and(Value::is_string),
            "{path}: {data}"
        );
        // The result and every other field pass through as the upstream wrote them.
        assert_eq!(
            data,
            straight_from_the_fake(&env.fake, &task).await["data"],
            "{path}"
        );

        // The status read that saw the final state settled it at exactly what it consumed.
        let consumed: ketchup_domain::credits::Credits =
            data["consumed"].as_str().unwrap().parse().unwrap();
        assert!(consumed > "0".parse().unwrap(), "{path}: {data}");
        total = total.checked_add(consumed).unwrap();
        assert_eq!(
            spent(api).await,
            (total.format_places(8), "0.00000000".to_owned()),
            "{path}"
        );

        let stranger = api.query(ADS_KEY, &task).await;
        assert_eq!(
            stranger.status_json(),
            (
                404,
                serde_json::json!({"code": 1, "message": "task not found"})
            ),
            "{path}"
        );
    }
    // The fake's own prices, as the sum of what every route consumed.
    assert_eq!(total.format_places(8), "5.94000000");
    let started = api
        .metric(
            r#"ketchup_gateway_tasks_started_total{family="video",model="sora-2",team="design"}"#,
        )
        .await;
    assert_eq!(started, 1.0);
}

#[tokio::test]
async fn a_video_beyond_the_budget_is_refused_before_the_upstream_while_an_image_fits() {
    let config = every_model(GatewayConfig::new())
        .budget("design", r#"{ credits = "2.00", period = "lifetime" }"#);
    let env = Env::start_with(fake_config(), config).await;
    let api = env.api();

    let long = api
        .submit(
            DESIGN_KEY,
            "/api/sora2/gen",
            r#"{"model":"sora-2","prompt":"a long tomato","duration":"25"}"#,
        )
        .await;
    assert_eq!(long.status, 402, "{}", long.text);
    let detail = long.json()["detail"].as_str().unwrap().to_owned();
    assert!(detail.ends_with("this request needs 2.50"), "{detail}");
    assert_eq!(env.fake.stats().generate_requests, 0);
    assert_eq!(
        spent(api).await,
        ("0.00000000".to_owned(), "0.00000000".to_owned())
    );

    // The same team's image still fits in what is left, and so does a shorter video.
    let image = api.generate(DESIGN_KEY, GEMPIX).await;
    assert_eq!(image.status, 200, "{}", image.text);
    let short = api
        .submit(
            DESIGN_KEY,
            "/api/sora2/gen",
            r#"{"model":"sora-2","prompt":"a short tomato","duration":"10"}"#,
        )
        .await;
    assert_eq!(short.status, 200, "{}", short.text);
    assert_eq!(
        spent(api).await,
        ("0.00000000".to_owned(), "1.50000000".to_owned())
    );
    assert_eq!(env.fake.stats().generate_requests, 2);
}

#[tokio::test]
async fn bad_input_on_any_route_is_refused_locally_and_reserves_nothing() {
    let env = Env::start_with(fake_config(), every_model(GatewayConfig::new())).await;
    let api = env.api();
    let cases = [
        (
            "/api/sora2/gen",
            r#"{"model":"sora-2","prompt":"x","duration":10}"#,
            "duration must be a string here",
        ),
        (
            "/api/sora2/gen",
            r#"{"model":"sora-2","prompt":"x","duration":"30"}"#,
            r#"duration "30" is not priced for model sora-2; priced values: "10", "15", "25""#,
        ),
        (
            "/api/sora2/gen",
            r#"{"model":"sora-2-pro","prompt":"x","duration":"10"}"#,
            "model \"sora-2-pro\" is not offered; choose one of: chirp-v4-5, google/gemini-2.5-flash-image, google/gempix2, google/nano-banana-2, google/veo3.1-fast, grok-imagine-video, midjourney/edits, midjourney/imagine, openai/gpt-image-2, seedance-2.0, sora-2, wan-2.7-image",
        ),
        (
            "/api/video/seedance/gen",
            r#"{"model":"seedance-2.0","duration":5,"content":[{"type":"image_url","image_url":{"url":"https://img.example/t.png"}}]}"#,
            "content[].text is required",
        ),
        (
            "/api/video/seedance/gen",
            r#"{"model":"seedance-2.0","duration":20,"content":[{"type":"text","text":"x"}]}"#,
            "duration 20 is not priced for model seedance-2.0: it must be a whole number from 1 to 15",
        ),
        (
            "/api/midjourney/edits",
            r#"{"prompt":"x","image":"file:///etc/passwd"}"#,
            "image[0] must be an http(s) URL or a data URI",
        ),
        (
            "/api/suno/generate",
            r#"{"model":"chirp-v4-5","prompt":"x"}"#,
            "mv is required",
        ),
        (
            "/api/wan-image/gen",
            r#"{"model":"wan-2.7-image","prompt":"   "}"#,
            "prompt is required",
        ),
        (
            "/api/image/gen",
            r#"{"model":"google/nano-banana-2","prompt":"x","image_size":"8k"}"#,
            r#"image_size "8k" is not priced for model google/nano-banana-2; priced values: "1k", "2k", "4k""#,
        ),
    ];
    for (path, body, detail) in cases {
        let refused = api.submit(DESIGN_KEY, path, body).await;
        assert_eq!(
            refused.status_json(),
            (
                400,
                serde_json::json!({"code": 1, "message": "failed", "detail": detail})
            ),
            "{path} {body}"
        );
    }
    let unknown = api
        .submit(
            DESIGN_KEY,
            "/api/kling/gen",
            r#"{"model":"x","prompt":"x"}"#,
        )
        .await;
    assert_eq!(unknown.status, 404, "{}", unknown.text);
    assert_eq!(unknown.json()["message"], "not found");
    assert_eq!(env.fake.stats().generate_requests, 0);
    assert_eq!(
        spent(api).await,
        ("0.00000000".to_owned(), "0.00000000".to_owned())
    );
}

/// The body is forwarded byte for byte, so one the upstream could read otherwise than the
/// gateway (a key twice, or a case variant of a field the gateway reads) never leaves it.
#[tokio::test]
async fn a_body_with_two_readings_is_refused_on_any_route_and_reserves_nothing() {
    let env = Env::start_with(fake_config(), every_model(GatewayConfig::new())).await;
    let api = env.api();
    let with = |body: &str, extra: &str| format!("{},{extra}}}", body.strip_suffix('}').unwrap());
    let mut cases = Vec::new();
    for (path, body, _) in ROUTES {
        cases.push((
            path,
            with(body, r#""extra":[{"k":1,"k":2}]"#),
            r#"duplicate key "k" in the request body"#,
        ));
        cases.push((
            path,
            with(body, r#""N":4"#),
            r#""N" differs from "n" only in case"#,
        ));
    }
    let image = ROUTES[0].1;
    let sora = ROUTES[5].1;
    cases.extend([
        (
            "/api/image/gen",
            r#"{"model":"google/nano-banana-2","prompt":"x","model":"google/gempix2"}"#.into(),
            r#"duplicate key "model" in the request body"#,
        ),
        (
            "/api/image/gen",
            r#"{"model":"google/nano-banana-2","prompt":"x","n":1,"n":4}"#.into(),
            r#"duplicate key "n" in the request body"#,
        ),
        (
            "/api/image/gen",
            with(image, r#""Model":"google/gempix2""#),
            r#""Model" differs from "model" only in case"#,
        ),
        (
            "/api/image/gen",
            with(image, r#""IMAGES":["https://img.example/t.png"]"#),
            r#""IMAGES" differs from "images" only in case"#,
        ),
        (
            "/api/image/gen",
            with(image, r#""Callback_Url":"https://hooks.example/x""#),
            r#""Callback_Url" differs from "callback_url" only in case"#,
        ),
        // The model's reserve is by `image_size`, which the route itself does not read.
        (
            "/api/image/gen",
            with(image, r#""Image_Size":"4k""#),
            r#""Image_Size" differs from "image_size" only in case"#,
        ),
        (
            "/api/sora2/gen",
            with(sora, r#""Duration":"25""#),
            r#""Duration" differs from "duration" only in case"#,
        ),
        (
            "/api/midjourney/imagine",
            r#"{"Prompt":"a tomato"}"#.into(),
            r#""Prompt" differs from "prompt" only in case"#,
        ),
        (
            "/api/video/seedance/gen",
            with(ROUTES[7].1, r#""Content":[]"#),
            r#""Content" differs from "content" only in case"#,
        ),
        (
            "/api/suno/generate",
            with(ROUTES[9].1, r#""MV":"chirp-v5""#),
            r#""MV" differs from "mv" only in case"#,
        ),
    ]);
    for (path, body, detail) in cases {
        let (status, answer) = api.submit(DESIGN_KEY, path, &body).await.status_json();
        assert_eq!(status, 400, "{path} {body}: {answer}");
        assert_eq!(
            (&answer["code"], &answer["message"]),
            (&1.into(), &"failed".into())
        );
        let said = answer["detail"].as_str().unwrap();
        assert!(said.starts_with(detail), "{path} {body}: {said}");
    }
    assert_eq!(env.fake.stats().generate_requests, 0);
    assert_eq!(
        spent(api).await,
        ("0.00000000".to_owned(), "0.00000000".to_owned())
    );
}

#[tokio::test]
async fn an_admin_adds_an_endpoint_with_config_alone() {
    // The fake serves Seedance at its path; an admin who learns of a second path for it (as
    // a new endpoint of the API would be) describes it in config and the gateway serves it.
    let config = every_model(GatewayConfig::new()).routes(
        r#"[routes."/api/video/seedance/gen"]
family = "film"
prompt_field = "content[].text"
references = { "content[].image_url.url" = 2 }
types = { duration = "integer" }
"#,
    );
    let env = Env::start_with(fake_config(), config).await;
    let api = env.api();
    let three_images = r#"{"model":"seedance-2.0","duration":5,"content":[{"type":"text","text":"x"},
        {"type":"image_url","image_url":{"url":"https://a/1"}},{"type":"image_url","image_url":{"url":"https://a/2"}},
        {"type":"image_url","image_url":{"url":"https://a/3"}}]}"#;
    let refused = api
        .submit(DESIGN_KEY, "/api/video/seedance/gen", three_images)
        .await;
    assert_eq!(refused.status, 400, "{}", refused.text);
    let task = api
        .submit(
            DESIGN_KEY,
            "/api/video/seedance/gen",
            r#"{"model":"seedance-2.0","duration":5,"content":[{"type":"text","text":"x"}]}"#,
        )
        .await
        .task_id();
    assert_eq!(
        api.wait_for_final(DESIGN_KEY, &task).await.task_status(),
        "success"
    );
    let started = api
        .metric(r#"ketchup_gateway_tasks_started_total{family="film",model="seedance-2.0",team="design"}"#)
        .await;
    assert_eq!(started, 1.0);
}
