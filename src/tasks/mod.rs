//! The durable task queue: the task model and its SQLite store.

pub mod model;
pub mod store;
