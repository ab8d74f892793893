//! The service dependency graph: checked before anything starts.

use std::collections::{BTreeMap, BTreeSet};

use super::error::ConfigError;
use super::spec::ServiceSpec;

/// Checks dependencies, cycles and host ports; returns the services in a start order where each
/// comes after everything it depends on (ties broken by name, so the order is stable).
pub fn validate(services: Vec<ServiceSpec>) -> Result<Vec<ServiceSpec>, ConfigError> {
    let mut by_name: BTreeMap<String, ServiceSpec> = BTreeMap::new();
    for s in services {
        by_name.insert(s.name.clone(), s);
    }
    let known = || by_name.keys().cloned().collect::<Vec<_>>().join(", ");
    for s in by_name.values() {
        for dep in s.depends_on.keys() {
            if !by_name.contains_key(dep) {
                return Err(ConfigError::UnknownDependency {
                    service: s.name.clone(),
                    dependency: dep.clone(),
                    known: known(),
                });
            }
        }
    }
    if let Some(cycle) = find_cycle(by_name.values()) {
        return Err(ConfigError::Cycle { cycle });
    }

    let mut published: BTreeMap<(u16, String), String> = BTreeMap::new();
    for s in by_name.values() {
        for p in s.ports.iter().filter(|p| p.host_port != 0) {
            let key = (p.host_port, p.protocol.to_string());
            if let Some(first) = published.insert(key, s.name.clone()) {
                if first != s.name {
                    return Err(ConfigError::DuplicatePort {
                        port: p.host_port,
                        first,
                        second: s.name.clone(),
                    });
                }
                return Err(ConfigError::invalid(
                    format!("services.{}.ports", s.name),
                    format!("host port {} is listed twice", p.host_port),
                ));
            }
        }
    }

    // Kahn's algorithm over a sorted ready set.
    let mut missing: BTreeMap<&str, usize> = by_name
        .values()
        .map(|s| (s.name.as_str(), s.depends_on.len()))
        .collect();
    let mut ready: BTreeSet<&str> = missing
        .iter()
        .filter(|(_, n)| **n == 0)
        .map(|(name, _)| *name)
        .collect();
    let mut order: Vec<String> = Vec::with_capacity(by_name.len());
    while let Some(name) = ready.pop_first() {
        order.push(name.to_string());
        for s in by_name.values().filter(|s| s.depends_on.contains_key(name)) {
            let n = missing
                .get_mut(s.name.as_str())
                .expect("every service has a count");
            *n -= 1;
            if *n == 0 {
                ready.insert(s.name.as_str());
            }
        }
    }
    Ok(order
        .into_iter()
        .filter_map(|name| by_name.remove(&name))
        .collect())
}

/// A cycle as the list of services along it, the first repeated at the end.
pub fn find_cycle<'a>(services: impl IntoIterator<Item = &'a ServiceSpec>) -> Option<Vec<String>> {
    let by_name: BTreeMap<&str, &ServiceSpec> =
        services.into_iter().map(|s| (s.name.as_str(), s)).collect();
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Open,
        Done,
    }
    fn visit<'a>(
        name: &'a str,
        by_name: &BTreeMap<&'a str, &'a ServiceSpec>,
        marks: &mut BTreeMap<&'a str, Mark>,
        path: &mut Vec<&'a str>,
    ) -> Option<Vec<String>> {
        match marks.get(name) {
            Some(Mark::Done) => return None,
            Some(Mark::Open) => {
                let start = path.iter().position(|n| *n == name).unwrap_or(0);
                let mut cycle: Vec<String> = path[start..].iter().map(|s| s.to_string()).collect();
                cycle.push(name.to_string());
                return Some(cycle);
            }
            None => {}
        }
        marks.insert(name, Mark::Open);
        path.push(name);
        if let Some(spec) = by_name.get(name) {
            for dep in spec.depends_on.keys() {
                if let Some(cycle) = visit(dep, by_name, marks, path) {
                    return Some(cycle);
                }
            }
        }
        path.pop();
        marks.insert(name, Mark::Done);
        None
    }
    let mut marks = BTreeMap::new();
    for name in by_name.keys() {
        if let Some(cycle) = visit(name, &by_name, &mut marks, &mut Vec::new()) {
            return Some(cycle);
        }
    }
    None
}

/// Every service that depends on `name`, directly or through others.
pub fn dependents_of(services: &[ServiceSpec], name: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut queue = vec![name.to_string()];
    while let Some(current) = queue.pop() {
        for s in services
            .iter()
            .filter(|s| s.depends_on.contains_key(&current))
        {
            if found.insert(s.name.clone()) {
                queue.push(s.name.clone());
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::spec::test_service as svc;

    fn names(v: &[ServiceSpec]) -> Vec<&str> {
        v.iter().map(|s| s.name.as_str()).collect()
    }

    #[test]
    fn orders_dependencies_first() {
        let order = validate(vec![
            svc("c", &["b"], None),
            svc("b", &["a"], None),
            svc("a", &[], None),
            svc("z", &[], None),
        ])
        .unwrap();
        assert_eq!(names(&order), ["a", "b", "c", "z"]);
    }

    #[test]
    fn names_every_service_of_a_cycle() {
        let err = validate(vec![
            svc("a", &["b"], None),
            svc("b", &["c"], None),
            svc("c", &["a"], None),
            svc("d", &[], None),
        ])
        .unwrap_err();
        match err {
            ConfigError::Cycle { cycle } => {
                assert_eq!(cycle.len(), 4);
                for n in ["a", "b", "c"] {
                    assert!(cycle.contains(&n.to_string()));
                }
                assert!(!cycle.contains(&"d".to_string()));
            }
            other => panic!("{other}"),
        }
    }

    #[test]
    fn unknown_dependency_and_duplicate_port() {
        assert!(matches!(
            validate(vec![svc("a", &["ghost"], None)]),
            Err(ConfigError::UnknownDependency { .. })
        ));
        assert!(matches!(
            validate(vec![svc("a", &[], Some(80)), svc("b", &[], Some(80))]),
            Err(ConfigError::DuplicatePort { port: 80, .. })
        ));
        assert!(validate(vec![svc("a", &[], Some(0)), svc("b", &[], Some(0))]).is_ok());
    }

    #[test]
    fn transitive_dependents() {
        let all = vec![
            svc("a", &[], None),
            svc("b", &["a"], None),
            svc("c", &["b"], None),
            svc("d", &[], None),
        ];
        let deps = dependents_of(&all, "a");
        assert_eq!(deps.into_iter().collect::<Vec<_>>(), ["b", "c"]);
    }
}
