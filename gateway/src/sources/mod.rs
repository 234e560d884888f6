//! Inputs: tasks that turn upstream messages into records for the router.

#[cfg(feature = "mqtt")]
pub mod mqtt;
pub mod payload;

use std::sync::Arc;

use crate::metrics::Metrics;
use crate::router::Item;
use crate::stages::Chain;

/// What every input task gets from the pipeline.
#[derive(Clone)]
pub struct SourceContext {
    /// This gateway's id.
    pub gateway_id: String,
    /// The pipeline's stages.
    pub chain: Arc<Chain>,
    /// The router's input channel.
    pub items: flume::Sender<Item>,
    /// Metrics.
    pub metrics: Metrics,
    /// Undecodable payloads go to the dead-letter topic (one is configured).
    pub dead_letters: bool,
}

/// What an input task should be doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceState {
    /// Take in messages.
    Run,
    /// Stay connected so acknowledgements can still go out, but take in nothing new.
    Quiesce,
    /// Flush acknowledgements, disconnect and return.
    Stop,
}
