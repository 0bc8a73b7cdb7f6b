//! The configuration files the product ships (the example and the container setups) validate
//! and say what their comments promise.

use std::path::Path;

use ketchup_domain::config::{Config, ConfigError, StoreConfig};

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(Path::new("gateway.toml"), text)
}

#[test]
fn the_design_example_is_valid() {
    let text = include_str!("../config/gateway.example.toml");
    let config = parse(text).expect("shipped example validates");
    assert_eq!(config.teams.len(), 2);
    let design = config.team("design").unwrap();
    assert_eq!(design.budget.unwrap().credits, "250".parse().unwrap());
    assert_eq!(design.limits.generate.count.get(), 120);
    assert_eq!(design.limits.generate_burst.get(), 20);
    let ads = config.team("ads").unwrap();
    assert!(ads.budget.is_none());
    assert_eq!(ads.limits.generate.to_string(), "60 per minute");
    assert_eq!(ads.limits.query.count.get(), 20);
}

#[test]
fn the_shipped_container_configs_are_valid() {
    let single = parse(include_str!("../config/docker/gateway.toml")).unwrap();
    assert!(matches!(single.store, StoreConfig::Sqlite { .. }));
    let replicas = parse(include_str!("../config/docker/gateway-replicas.toml")).unwrap();
    assert!(matches!(
        &replicas.store,
        StoreConfig::Redis { url, password: Some(_), .. } if url.as_str() == "redis://redis:6379/0"
    ));
}

#[test]
fn the_demo_offers_every_model_of_the_example_at_the_same_reserve() {
    let example = parse(include_str!("../config/gateway.example.toml")).unwrap();
    let demo = parse(&format!(
        "[upstream]\ntoken_env = \"T\"\n{}",
        include_str!("../src/demo_models.toml")
    ))
    .unwrap();
    let reserves = |config: &Config| {
        config
            .models
            .iter()
            .map(|(id, model)| (id.clone(), model.kind.clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(reserves(&demo), reserves(&example));
    assert_eq!(example.models.len(), 21);
}
