//! The service stack: specs, the built-in catalog, the dependency graph and the supervisor.

pub mod catalog;
pub mod graph;
pub mod spec;
pub mod supervisor;
