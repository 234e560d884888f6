//! Outputs. Today: Kafka.

pub mod kafka;
