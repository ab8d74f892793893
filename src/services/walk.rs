//! One walk over the dependency graph, used by start (dependencies first) and stop (dependents
//! first). Every chosen service gets its own task at once, so work that needs no neighbour
//! (pulling, creating) overlaps; a task calls `Turn::wait` where it must wait for its neighbours
//! and `Turn::reach` to tell its own progress.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::Arc;

use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::config::graph;
use crate::config::spec::{Condition, ServiceSpec};
use crate::config::ConfigError;

/// Which way the walk goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// A service waits for what it depends on, each edge for its own condition.
    Up,
    /// A service waits until every service that depends on it is done.
    Down,
}

/// How far a service got, as its neighbours in the walk see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reached {
    NotYet,
    Started,
    Healthy,
    /// Ran to completion (a job), or finished its part of the walk.
    Completed,
    Failed,
}

impl Reached {
    fn satisfies(self, condition: Condition) -> bool {
        match condition {
            Condition::Started => matches!(
                self,
                Reached::Started | Reached::Healthy | Reached::Completed
            ),
            Condition::Healthy => matches!(self, Reached::Healthy | Reached::Completed),
            Condition::Completed => self == Reached::Completed,
        }
    }
}

/// A neighbour that failed, so the wait for it can never end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blocked {
    pub neighbour: String,
}

/// One service's part of the walk.
pub struct Turn {
    waits: Vec<(String, Condition, watch::Receiver<Reached>)>,
    progress: Arc<watch::Sender<Reached>>,
}

impl Turn {
    /// The neighbours this service waits for, with the condition each must meet.
    pub fn waits_on(&self) -> Vec<(String, Condition)> {
        self.waits.iter().map(|(n, c, _)| (n.clone(), *c)).collect()
    }

    /// Returns once every neighbour meets its condition; fails as soon as one fails.
    pub async fn wait(&mut self) -> Result<(), Blocked> {
        for (neighbour, condition, rx) in &mut self.waits {
            let condition = *condition;
            let reached = rx
                .wait_for(|r| r.satisfies(condition) || *r == Reached::Failed)
                .await
                .map(|r| *r);
            match reached {
                Ok(r) if r != Reached::Failed => {
                    tracing::trace!(neighbour = %neighbour, "neighbour ready");
                }
                _ => {
                    return Err(Blocked {
                        neighbour: neighbour.clone(),
                    })
                }
            }
        }
        Ok(())
    }

    /// Tells the neighbours how far this service got.
    pub fn reach(&self, reached: Reached) {
        self.progress.send_replace(reached);
    }
}

/// Runs `visit` for every chosen service, each in its own task, and returns every result once
/// all are done (in the order they finished). A service that is not chosen counts as done for its
/// neighbours. A task that ends with `Err` reaches `Failed`, one that ends with `Ok` without
/// having said more reaches `Completed`. A cycle among the chosen services is refused before
/// anything runs, naming the services along it.
pub async fn walk<T, E, F, Fut>(
    services: &[ServiceSpec],
    chosen: &BTreeSet<String>,
    direction: Direction,
    mut visit: F,
) -> Result<Vec<(String, Result<T, E>)>, ConfigError>
where
    F: FnMut(String, Turn) -> Fut,
    Fut: Future<Output = Result<T, E>> + Send + 'static,
    T: Send + 'static,
    E: Send + 'static,
{
    if let Some(cycle) = graph::find_cycle(services.iter().filter(|s| chosen.contains(&s.name))) {
        return Err(ConfigError::Cycle { cycle });
    }
    let mut senders: BTreeMap<&str, Arc<watch::Sender<Reached>>> = BTreeMap::new();
    let mut receivers: BTreeMap<&str, watch::Receiver<Reached>> = BTreeMap::new();
    for s in services {
        let initial = if chosen.contains(&s.name) {
            Reached::NotYet
        } else {
            Reached::Completed
        };
        let (tx, rx) = watch::channel(initial);
        senders.insert(&s.name, Arc::new(tx));
        receivers.insert(&s.name, rx);
    }
    let mut tasks = JoinSet::new();
    for spec in services.iter().filter(|s| chosen.contains(&s.name)) {
        let waits = match direction {
            Direction::Up => spec
                .depends_on
                .iter()
                .filter_map(|(d, c)| Some((d.clone(), *c, receivers.get(d.as_str())?.clone())))
                .collect(),
            Direction::Down => services
                .iter()
                .filter(|d| d.depends_on.contains_key(&spec.name))
                .map(|d| {
                    (
                        d.name.clone(),
                        Condition::Completed,
                        receivers[d.name.as_str()].clone(),
                    )
                })
                .collect(),
        };
        let progress = Arc::clone(&senders[spec.name.as_str()]);
        let turn = Turn {
            waits,
            progress: Arc::clone(&progress),
        };
        let name = spec.name.clone();
        let fut = visit(name.clone(), turn);
        tasks.spawn(async move {
            let result = fut.await;
            match &result {
                Err(_) => {
                    progress.send_replace(Reached::Failed);
                }
                Ok(_) => {
                    progress.send_if_modified(|r| {
                        let said_nothing = matches!(*r, Reached::NotYet | Reached::Started);
                        if said_nothing {
                            *r = Reached::Completed;
                        }
                        said_nothing
                    });
                }
            }
            (name, result)
        });
    }
    let mut results = Vec::with_capacity(tasks.len());
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(r) => results.push(r),
            // A panic in a visit is a bug: let it surface where the walk was asked for.
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => {}
        }
    }
    Ok(results)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::spec::test_service as svc;
    use std::sync::Mutex;
    use std::time::Duration;

    fn all(services: &[ServiceSpec]) -> BTreeSet<String> {
        services.iter().map(|s| s.name.clone()).collect()
    }

    /// Runs a walk whose visits log `begin NAME` before waiting and `NAME` once through.
    async fn order(
        services: &[ServiceSpec],
        chosen: &BTreeSet<String>,
        direction: Direction,
    ) -> Vec<String> {
        let log = Arc::new(Mutex::new(Vec::new()));
        let results = walk(services, chosen, direction, |name, mut turn| {
            let log = Arc::clone(&log);
            async move {
                log.lock().unwrap().push(format!("begin {name}"));
                turn.wait().await.map_err(|b| b.neighbour)?;
                // Let the others run: an order that holds only by chance would show here.
                tokio::time::sleep(Duration::from_millis(5)).await;
                log.lock().unwrap().push(name);
                Ok::<(), String>(())
            }
        })
        .await
        .unwrap();
        assert!(results.iter().all(|(_, r)| r.is_ok()));
        let log = log.lock().unwrap().clone();
        log
    }

    fn position(log: &[String], entry: &str) -> usize {
        log.iter()
            .position(|e| e == entry)
            .unwrap_or_else(|| panic!("{entry:?} not in {log:?}"))
    }

    #[tokio::test]
    async fn up_starts_every_visit_at_once_and_finishes_dependencies_first() {
        let services = vec![
            svc("db", &[], None),
            svc("cache", &[], None),
            svc("api", &["db", "cache"], None),
            svc("web", &["api"], None),
        ];
        let log = order(&services, &all(&services), Direction::Up).await;
        // Every visit began before any finished: waiting is per service, not per level.
        let first_done = log.iter().position(|e| !e.starts_with("begin")).unwrap();
        assert_eq!(first_done, 4, "{log:?}");
        assert!(position(&log, "db") < position(&log, "api"));
        assert!(position(&log, "cache") < position(&log, "api"));
        assert!(position(&log, "api") < position(&log, "web"));
    }

    #[tokio::test]
    async fn down_finishes_dependents_first() {
        let services = vec![
            svc("db", &[], None),
            svc("api", &["db"], None),
            svc("web", &["api"], None),
            svc("worker", &["db"], None),
        ];
        let log = order(&services, &all(&services), Direction::Down).await;
        assert!(position(&log, "web") < position(&log, "api"));
        assert!(position(&log, "api") < position(&log, "db"));
        assert!(position(&log, "worker") < position(&log, "db"));
    }

    #[tokio::test]
    async fn services_not_chosen_count_as_done() {
        let services = vec![svc("db", &[], None), svc("api", &["db"], None)];
        let chosen = BTreeSet::from(["db".to_string()]);
        // Stopping db alone does not wait for api, which is not part of the walk.
        let log = order(&services, &chosen, Direction::Down).await;
        assert_eq!(log, ["begin db", "db"]);
    }

    #[tokio::test]
    async fn a_failure_unblocks_its_dependents_with_its_name() {
        let services = vec![
            svc("db", &[], None),
            svc("api", &["db"], None),
            svc("web", &["api"], None),
        ];
        let results = walk(
            &services,
            &all(&services),
            Direction::Up,
            |name, mut turn| async move {
                turn.wait()
                    .await
                    .map_err(|b| format!("blocked on {}", b.neighbour))?;
                if name == "db" {
                    return Err("db broke".to_string());
                }
                Ok(())
            },
        )
        .await
        .unwrap();
        let by_name: BTreeMap<String, Result<(), String>> = results.into_iter().collect();
        assert_eq!(by_name["db"], Err("db broke".into()));
        assert_eq!(by_name["api"], Err("blocked on db".into()));
        assert_eq!(by_name["web"], Err("blocked on api".into()));
    }

    #[tokio::test]
    async fn conditions_are_per_edge() {
        let job = svc("migrate", &[], None);
        let mut api = svc("api", &["migrate"], None);
        api.depends_on
            .insert("migrate".into(), Condition::Completed);
        let mut side = svc("side", &["migrate"], None);
        side.depends_on.insert("migrate".into(), Condition::Started);
        let services = vec![job, api, side];
        let log = Arc::new(Mutex::new(Vec::new()));
        walk(
            &services,
            &all(&services),
            Direction::Up,
            |name, mut turn| {
                let log = Arc::clone(&log);
                async move {
                    turn.wait().await.map_err(|b| b.neighbour)?;
                    if name == "migrate" {
                        turn.reach(Reached::Started);
                        log.lock().unwrap().push("migrate started".to_string());
                        tokio::time::sleep(Duration::from_millis(30)).await;
                        log.lock().unwrap().push("migrate completed".to_string());
                        turn.reach(Reached::Completed);
                    } else {
                        log.lock().unwrap().push(name);
                    }
                    Ok::<(), String>(())
                }
            },
        )
        .await
        .unwrap();
        let log = log.lock().unwrap().clone();
        // `side` needed only a start, `api` the job's completion.
        assert!(
            position(&log, "side") < position(&log, "migrate completed"),
            "{log:?}"
        );
        assert!(
            position(&log, "migrate completed") < position(&log, "api"),
            "{log:?}"
        );
    }

    #[tokio::test]
    async fn a_cycle_is_refused_naming_its_services() {
        let services = vec![
            svc("a", &["b"], None),
            svc("b", &["a"], None),
            svc("c", &[], None),
        ];
        let ran = Arc::new(Mutex::new(0));
        let err = walk(&services, &all(&services), Direction::Up, |_, _| {
            let ran = Arc::clone(&ran);
            async move {
                *ran.lock().unwrap() += 1;
                Ok::<(), ()>(())
            }
        })
        .await
        .unwrap_err();
        match err {
            ConfigError::Cycle { cycle } => {
                assert!(cycle.contains(&"a".to_string()) && cycle.contains(&"b".to_string()));
                assert!(!cycle.contains(&"c".to_string()));
            }
            other => panic!("{other}"),
        }
        assert_eq!(
            *ran.lock().unwrap(),
            0,
            "nothing runs before the cycle is found"
        );
    }
}
