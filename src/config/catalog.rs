//! The built-in services of a DSPy agent's stack, with the hand-off's ports.
//!
//! On by default: `redis`, `reddb` and `infermesh`, the cache, the storage and the inference
//! gateway every agent talks to. Off by default: `ollama` and `model_server`, whose images are
//! several gigabytes, want a GPU and a model; turn them on with `services=[...]` or
//! `enabled = true` in `dspy-agent.toml`. Every field can be overridden there.

use std::collections::BTreeMap;

use super::{ConfigLayer, DependsOn, HealthPatch, ResourcesPatch, Scalar, ServicePatch};

pub const REDIS_IMAGE: &str = "redis:7-alpine";
pub const REDDB_IMAGE: &str = "dspy-agent/reddb:latest";
pub const INFERMESH_IMAGE: &str = "dspy-agent/infermesh:latest";
pub const OLLAMA_IMAGE: &str = "ollama/ollama:latest";
pub const MODEL_SERVER_IMAGE: &str = "dspy-agent/model-server:latest";

fn port(p: &str) -> Vec<Scalar> {
    vec![Scalar::Str(p.to_string())]
}

fn http(path: &str, start_period: &str) -> Option<HealthPatch> {
    Some(HealthPatch {
        kind: Some("http".into()),
        path: Some(path.into()),
        start_period: Some(Scalar::Str(start_period.into())),
        ..HealthPatch::default()
    })
}

fn needs_redis() -> (Option<DependsOn>, Option<BTreeMap<String, String>>) {
    (
        Some(DependsOn::List(vec!["redis".into()])),
        Some(BTreeMap::from([(
            "REDIS_URL".to_string(),
            "redis://redis:6379/0".to_string(),
        )])),
    )
}

/// The catalog as the lowest config layer.
pub fn layer() -> ConfigLayer {
    let mut services = BTreeMap::new();
    services.insert(
        "redis".to_string(),
        ServicePatch {
            enabled: Some(true),
            image: Some(REDIS_IMAGE.into()),
            ports: Some(port("6379:6379")),
            healthcheck: Some(HealthPatch {
                kind: Some("redis".into()),
                start_period: Some(Scalar::Str("30s".into())),
                ..HealthPatch::default()
            }),
            ..ServicePatch::default()
        },
    );
    let (depends_on, env) = needs_redis();
    services.insert(
        "reddb".to_string(),
        ServicePatch {
            enabled: Some(true),
            image: Some(REDDB_IMAGE.into()),
            ports: Some(port("6380:6380")),
            volumes: Some(vec!["reddb-data:/data".into()]),
            depends_on,
            env,
            healthcheck: http("/health", "60s"),
            ..ServicePatch::default()
        },
    );
    let (depends_on, env) = needs_redis();
    services.insert(
        "infermesh".to_string(),
        ServicePatch {
            enabled: Some(true),
            image: Some(INFERMESH_IMAGE.into()),
            ports: Some(port("8000:8000")),
            depends_on,
            env,
            healthcheck: http("/health", "60s"),
            ..ServicePatch::default()
        },
    );
    services.insert(
        "ollama".to_string(),
        ServicePatch {
            enabled: Some(false),
            image: Some(OLLAMA_IMAGE.into()),
            ports: Some(port("11434:11434")),
            volumes: Some(vec!["ollama-models:/root/.ollama".into()]),
            healthcheck: http("/api/tags", "120s"),
            resources: Some(ResourcesPatch {
                gpus: Some(Scalar::Str("auto".into())),
                ..ResourcesPatch::default()
            }),
            ..ServicePatch::default()
        },
    );
    services.insert(
        "model_server".to_string(),
        ServicePatch {
            enabled: Some(false),
            image: Some(MODEL_SERVER_IMAGE.into()),
            ports: Some(port("8001:8001")),
            volumes: Some(vec!["model-cache:/models".into()]),
            healthcheck: http("/health", "120s"),
            ..ServicePatch::default()
        },
    );
    ConfigLayer {
        services,
        ..ConfigLayer::default()
    }
}
