//! The durable task queue: the task model, its SQLite store, the dispatcher and the handlers.

pub mod handlers;
pub mod model;
pub mod queue;
pub mod store;
