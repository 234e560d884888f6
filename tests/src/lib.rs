//! End-to-end test support for the gateway: a harness that starts real processes (a
//! Mosquitto per test on a free port, librdkafka's mock cluster over TCP, the gateway as
//! its own process) and reads results back. Used by `tests/e2e.rs` and by the
//! `gateway-bench` benchmark command.

pub mod harness;
/// The Kafka mock behind proxies lives in the gateway crate (the demo uses it too).
pub use gateway::mock;
