//! The durable task queue: the task model, its SQLite store, the dispatcher, the handlers, and
//! the spans of tasks exported over OTLP.

pub mod handlers;
pub mod model;
pub mod queue;
pub mod spans;
pub mod store;
