//! `config show`: the effective configuration in the shape of `dspy-agent.toml`, every setting
//! that applies (defaults included), secrets hidden, and on request where each came from.

use std::collections::BTreeMap;
use std::time::Duration;

use toml::Value;

use super::{
    layers_of, read_config_file, Config, ConfigError, ConfigLayer, LoadOptions, Scalar, Source,
    TasksPatch,
};

const HIDDEN: &str = "(secret; not shown)";

/// Where the setting at a path of keys came from.
type Origin<'a> = &'a dyn Fn(&[&str]) -> String;

/// The effective configuration as TOML; with `origins`, each setting followed by a comment
/// saying where it came from: `default`, `catalog`, the file, `environment` or `arguments`.
pub fn effective(options: &LoadOptions, origins: bool) -> Result<String, ConfigError> {
    let config = Config::load(options.clone())?;
    let file = Config::file_for(options);
    let file_layer = match &file {
        Some(path) => Some(ConfigLayer::from_toml(
            &path.display().to_string(),
            &read_config_file(path)?,
        )?),
        None => None,
    };
    let layers = layers_of(options, file_layer);
    let mut merged = defaults(&config);
    for (_, layer) in &layers {
        merged.apply(layer.clone());
    }
    hide_secrets(&mut merged, &config);
    let tree = to_value(&merged)?;
    let sources: Vec<(String, Value)> = layers
        .iter()
        .map(|(source, layer)| {
            let name = match source {
                Source::Catalog => "catalog".to_string(),
                Source::File => file
                    .as_ref()
                    .map(|f| f.display().to_string())
                    .unwrap_or_default(),
                Source::Environment => "environment".to_string(),
                Source::Arguments => "arguments".to_string(),
            };
            to_value(layer).map(|v| (name, v))
        })
        .collect::<Result<_, _>>()?;
    let origin = |path: &[&str]| -> String {
        sources
            .iter()
            .rev()
            .find(|(_, layer)| lookup(layer, path).is_some())
            .map(|(name, _)| name.clone())
            .unwrap_or_else(|| "default".to_string())
    };
    let origin: Origin = &origin;
    let mut out = String::new();
    write_table(&mut out, &tree, &mut Vec::new(), origins.then_some(origin));
    Ok(out)
}

/// What applies where no layer says otherwise, as the loaded configuration resolved it.
fn defaults(config: &Config) -> ConfigLayer {
    ConfigLayer {
        project: Some(config.project.clone()),
        state_dir: Some(config.state_dir.clone()),
        docker_host: Some(
            config
                .docker_host
                .clone()
                .unwrap_or_else(|| crate::engine::DEFAULT_HOST.to_string()),
        ),
        backend: Some(config.backend.as_str().to_string()),
        orchestrator_addr: Some(config.orchestrator_addr.clone()),
        env_manager_addr: Some(config.env_manager_addr.clone()),
        http_addr: Some(config.http_addr.clone()),
        keep_running: Some(config.keep_running),
        publish_host_ip: Some(super::DEFAULT_PUBLISH_HOST_IP.to_string()),
        allow_remote_without_token: Some(config.allow_without_token),
        tasks: Some(TasksPatch {
            store: Some(config.tasks.store.to_string()),
            lease: Some(Scalar::Str(duration_text(config.tasks.lease))),
            concurrency: Some(config.tasks.concurrency),
            durability: Some(format!("{:?}", config.tasks.durability).to_lowercase()),
            retention: Some(Scalar::Str(
                config
                    .tasks
                    .retention
                    .map(duration_text)
                    .unwrap_or_else(|| "forever".to_string()),
            )),
            ..TasksPatch::default()
        }),
        ..ConfigLayer::default()
    }
}

/// The token, `secret_env` values and the store's password are never shown.
fn hide_secrets(layer: &mut ConfigLayer, config: &Config) {
    if layer.token.is_some() {
        layer.token = Some(HIDDEN.to_string());
    }
    if let Some(tasks) = &mut layer.tasks {
        // Shown as the loaded store says it: a PostgreSQL URL without its password.
        tasks.store = Some(config.tasks.store.to_string());
    }
    for service in layer.services.values_mut() {
        let secret: Vec<String> = service.secret_env.clone().unwrap_or_default();
        if let Some(env) = &mut service.env {
            for key in &secret {
                if let Some(value) = env.get_mut(key) {
                    *value = HIDDEN.to_string();
                }
            }
        }
    }
}

/// "30s", "10m", "7d": the largest unit up to days that divides the duration.
fn duration_text(d: Duration) -> String {
    let ms = d.as_millis();
    for (unit, size) in [
        ("d", 86_400_000),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1000),
    ] {
        if ms >= size && ms.is_multiple_of(size) {
            return format!("{}{unit}", ms / size);
        }
    }
    format!("{ms}ms")
}

fn to_value(layer: &ConfigLayer) -> Result<Value, ConfigError> {
    Value::try_from(layer).map_err(|e| ConfigError::invalid("config", e.to_string()))
}

fn lookup<'a>(value: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(value, |v, key| v.get(*key))
}

fn key_text(key: &str) -> String {
    let bare = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if bare {
        key.to_string()
    } else {
        Value::String(key.to_string()).to_string()
    }
}

/// Writes the plain settings of the table at `path`, then each sub-table under its header.
fn write_table(out: &mut String, table: &Value, path: &mut Vec<String>, origin: Option<Origin>) {
    let Some(entries) = table.as_table() else {
        return;
    };
    let (tables, plain): (BTreeMap<&String, &Value>, BTreeMap<&String, &Value>) =
        entries.iter().partition(|(_, v)| v.is_table());
    if !path.is_empty() && (!plain.is_empty() || tables.is_empty()) {
        let header: Vec<String> = path.iter().map(|k| key_text(k)).collect();
        out.push_str(&format!("\n[{}]\n", header.join(".")));
    }
    for (key, value) in plain {
        out.push_str(&format!("{} = {value}", key_text(key)));
        if let Some(origin) = origin {
            let mut at: Vec<&str> = path.iter().map(String::as_str).collect();
            at.push(key);
            out.push_str(&format!("  # {}", origin(&at)));
        }
        out.push('\n');
    }
    for (key, value) in tables {
        path.push(key.clone());
        write_table(out, value, path, origin);
        path.pop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_written_in_their_largest_unit() {
        assert_eq!(duration_text(Duration::from_secs(30)), "30s");
        assert_eq!(duration_text(Duration::from_secs(7 * 86_400)), "7d");
        assert_eq!(duration_text(Duration::from_secs(2 * 86_400)), "2d");
        assert_eq!(duration_text(Duration::from_millis(1500)), "1500ms");
        assert_eq!(duration_text(Duration::from_secs(90)), "90s");
    }
}
