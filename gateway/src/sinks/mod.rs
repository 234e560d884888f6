//! Outputs. Today: Kafka.

pub mod event_json;
pub mod kafka;
