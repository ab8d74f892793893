//! Property tests: configuration text and values, and task requests, taken from random and
//! hostile input. Whatever comes in, the answer is a value or an error that names the field at
//! fault; nothing panics.

use std::collections::BTreeMap;
use std::time::Duration;

use dspy_agent_infra::config::spec;
use dspy_agent_infra::config::{Config, ConfigError, ConfigLayer, LoadOptions};
use dspy_agent_infra::tasks::model::NewTask;
use proptest::prelude::*;

/// Strings users might write, and strings nobody should.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[0-9]{0,12}",
        "[0-9]{1,6}(\\.[0-9]{1,4})?[kmgtKMGT]?[bB]?",
        "-?[0-9]{1,20}(ms|s|m|h|d)?",
        "([0-9]{1,3}\\.){0,3}[0-9]{0,3}:[0-9]{0,6}:[0-9]{0,6}(/(tcp|udp|sctp))?",
        "\\PC{0,40}",
        Just(String::new()),
        Just("\u{0}\u{7f}\n\t".to_string()),
        Just("9".repeat(400)),
    ]
}

fn options(layer: ConfigLayer, env: BTreeMap<String, String>) -> LoadOptions {
    LoadOptions {
        overlay: Some(layer),
        cwd: std::env::temp_dir(),
        env,
        ..LoadOptions::default()
    }
}

fn names_a_field(e: &ConfigError) -> bool {
    let message = e.to_string();
    !message.is_empty()
        && match e {
            ConfigError::Invalid { field, .. } => !field.is_empty(),
            _ => true,
        }
}

/// Passes a value, or an error whose message starts with the field it was given.
fn named<T>(result: Result<T, ConfigError>, field: &str) -> Result<(), TestCaseError> {
    if let Err(e) = result {
        prop_assert!(e.to_string().starts_with(&format!("{field}: ")), "{e}");
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn every_value_parser_answers_or_names_its_field(s in text()) {
        named(spec::parse_port("services.x.ports", &s, "127.0.0.1"), "services.x.ports")?;
        named(spec::parse_memory("services.x.resources.memory", &s), "services.x.resources.memory")?;
        named(spec::parse_cpus("services.x.resources.cpus", &s), "services.x.resources.cpus")?;
        named(spec::parse_duration("services.x.stop_timeout", &s), "services.x.stop_timeout")?;
        named(spec::parse_gpus("services.x.resources.gpus", &s), "services.x.resources.gpus")?;
        named(spec::parse_restart("services.x.restart", &s), "services.x.restart")?;
        named(spec::parse_pull("services.x.pull", &s), "services.x.pull")?;
    }

    #[test]
    fn values_written_as_documented_read_back(
        n in 0u32..1_000_000, host in 0u16.., container in 1u16.., unit in 0usize..4,
    ) {
        let (suffix, seconds) = [("ms", 0.001), ("s", 1.0), ("m", 60.0), ("", 1.0)][unit];
        let d = spec::parse_duration("f", &format!("{n}{suffix}")).unwrap();
        prop_assert!((d.as_secs_f64() - f64::from(n) * seconds).abs() < 1e-6);
        prop_assert_eq!(spec::parse_memory("f", &format!("{n}m")).unwrap(), i64::from(n) << 20);
        let port = spec::parse_port("f", &format!("{host}:{container}"), "127.0.0.1").unwrap();
        prop_assert_eq!((port.host_port, port.container_port), (host, container));
        prop_assert_eq!(port.host_ip.as_str(), "127.0.0.1");
    }

    #[test]
    fn any_config_text_parses_or_says_where_it_is_wrong(s in "\\PC{0,200}") {
        if let Err(e) = ConfigLayer::from_toml("dspy-agent.toml", &s) {
            prop_assert!(e.to_string().contains("dspy-agent.toml"));
        }
    }

    #[test]
    fn any_service_fields_load_or_name_the_field(
        image in text(), port in text(), memory in text(), cpus in text(),
        interval in text(), restart in text(), depends in text(), addr in text(),
        project in text(), token in text(),
    ) {
        let json = serde_json::json!({
            "project": project,
            "orchestrator_addr": addr,
            "token": token,
            "services": {
                "svc": {
                    "image": image,
                    "ports": [port],
                    "resources": {"memory": memory, "cpus": cpus},
                    "healthcheck": {"type": "http", "interval": interval},
                    "restart": restart,
                    "depends_on": [depends],
                }
            }
        });
        let layer = match ConfigLayer::from_json(json) {
            Ok(l) => l,
            Err(e) => { prop_assert!(names_a_field(&e)); return Ok(()); }
        };
        let opts = options(layer, BTreeMap::new());
        if let Err(e) = Config::load(LoadOptions { services: Some(vec!["svc".into()]), ..opts.clone() }) {
            prop_assert!(names_a_field(&e));
        }
        // Every problem at once, each naming its field.
        for e in Config::problems(&opts) {
            prop_assert!(names_a_field(&e));
            // A bad token is described, never repeated.
            if let ConfigError::Invalid { field, message } = &e {
                if field == "token" && token.len() >= 3 {
                    prop_assert!(!message.contains(&token));
                }
            }
        }
    }

    #[test]
    fn any_task_request_is_accepted_or_refused_by_field(
        id in text(), task_type in text(), priority in any::<i32>(),
        timeout_ms in proptest::option::of(0u64..u64::MAX / 1_000_000),
        retries in any::<u32>(), meta_key in text(), meta_value in text(),
    ) {
        let task = NewTask {
            task_id: id,
            task_type,
            payload: Vec::new(),
            metadata: BTreeMap::from([(meta_key, meta_value)]),
            priority,
            timeout: timeout_ms.map(Duration::from_millis),
            max_retries: retries,
        };
        if let Err(e) = task.validate() {
            let message = e.to_string();
            prop_assert!(
                ["task_id", "task_type", "timeout", "metadata", "max_retries", "payload"]
                    .iter()
                    .any(|f| message.contains(f)),
                "{message}"
            );
        }
    }
}
