//! dspy-agent-infra: the Rust core behind the `dspy_agent_infra` Python package.
//!
//! Dependency direction: `python/cli/daemon → stack (local, remote) → infra → grpc →
//! {services, tasks} → {owner, watchdog, engine, health, access} → config → util`; no module
//! imports one above it.

pub mod access;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod engine;
pub mod grpc;
pub mod health;
pub mod http;
pub mod infra;
pub mod kubernetes;
pub mod metrics;
pub mod owner;
pub mod runtime;
pub mod services;
pub mod stack;
pub mod tasks;
pub mod util;
pub mod watchdog;
pub mod yaml;

#[cfg(feature = "python")]
mod python;
