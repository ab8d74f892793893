//! The service stack: the supervisor that brings the configured services up and keeps them so.

pub mod logs;
pub mod supervisor;
pub mod walk;
