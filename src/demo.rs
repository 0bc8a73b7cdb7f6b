//! `ketchup-gateway demo`: the gateway on its defaults in front of the built-in fake upstream,
//! with one demo team, so a newcomer sees it work without an upstream account.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use crate::{keygen, server::Server};
use ketchup_domain::{
    clock,
    config::{Config, Secret},
};
use ketchup_fake_upstream::FakeConfig;

/// Every model the fake upstream renders, reserved as the example configuration does.
const MODELS: &str = include_str!("demo_models.toml");

pub async fn run(listen: SocketAddr) -> Result<(), String> {
    let upstream_token = Secret::new(keygen::new_key());
    let mut fake = FakeConfig::new(upstream_token.expose());
    // A render that takes a few seconds, so polling shows every status.
    fake.pending_for = Duration::from_secs(1);
    fake.submitted_for = Duration::from_secs(1);
    fake.in_progress_for = Duration::from_secs(2);
    let fake = ketchup_fake_upstream::start(fake)
        .await
        .map_err(|e| format!("cannot start the fake upstream: {e}"))?;

    let team_key = keygen::new_key();
    let ledger =
        std::env::temp_dir().join(format!("ketchup-gateway-demo-{}.db", std::process::id()));
    let text = format!(
        r#"
[server]
listen = "{listen}"

[upstream]
base_url = "{upstream}"
token_env = "UNUSED_IN_DEMO"

[store]
path = "{ledger}"

{models}
[[teams]]
name = "demo"
keys = [{key_line}]
budget = {{ credits = "50.00", period = "daily", max_in_flight = 5 }}
"#,
        upstream = fake.base_url(),
        ledger = ledger.display(),
        key_line = keygen::config_line(&team_key, "demo", None),
        models = MODELS,
    );
    let config = Config::parse(Path::new("<demo>"), &text).map_err(|e| e.to_string())?;
    let server = Server::bind(config, &[upstream_token], clock::system()).await?;
    let base = format!("http://{}", server.local_addr());
    println!(
        r#"
ketchup-gateway demo: the gateway on {base}, in front of a fake upstream on {upstream}.
Team "demo" has a budget of 50.00 credits a day. Every model of the API is offered: images
(google/gempix2 reserves 0.50), GPT-Image, Wan, Midjourney, Sora, Grok, Seedance, Veo, Suno,
and three text models.
Its key (made for this run only):

  export KEY={team_key}

Start a render, then poll it (it takes about four seconds):

  curl -s {base}/api/image/gen -H "Authorization: Bearer $KEY" \
       -d '{{"model":"google/gempix2","prompt":"a red tomato on a white plate"}}'
  curl -s "{base}/api/task/query?task_id=<task_id from above>" -H "Authorization: Bearer $KEY"

A video, reserved by its duration and polled the same way:

  curl -s {base}/api/sora2/gen -H "Authorization: Bearer $KEY" \
       -d '{{"model":"sora-2","prompt":"a tomato rolling downhill","duration":"10"}}'

Text, streamed as it is written (OpenAI chat completions; /api/v1/messages and
/api/v1beta/models/gemini-3.1-pro-preview:streamGenerateContent?alt=sse work the same way):

  curl -sN {base}/api/v1/chat/completions -H "Authorization: Bearer $KEY" \
       -d '{{"model":"openai/gpt-5.2","max_tokens":100,"stream":true,"messages":[{{"role":"user","content":"ketchup?"}}]}}'

Health: curl -s {base}/healthz    Stop: Ctrl-C. Ledger for this run: {ledger}
"#,
        upstream = fake.base_url(),
        ledger = ledger.display(),
    );
    let result = server.run(None).await;
    drop(fake);
    result
}
