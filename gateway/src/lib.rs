//! The edge IoT stream gateway: MQTT in, local stages, a SQLite spool, batches to Kafka.
//!
//! Layout (one noun per module):
//! - [`event`]: the event model and the records that travel to Kafka.
//! - [`sources`]: inputs (`sources::mqtt`, `sources::serial`) and payload decoders
//!   ([`sources::payload`]).
//! - [`ack`]: in-order upstream acknowledgements, released when an event is safe.
//! - [`stages`]: synchronous filters and enrichment, run in the input tasks.
//! - [`router`]: the thread that owns the spool and the producer; direct vs spooling mode.
//! - [`spool`]: the SQLite spool.
//! - [`sinks`]: outputs ([`sinks::kafka`]).
//! - [`metrics`]: Prometheus metrics and the `/metrics` + `/health` endpoint.
//! - [`app`]: wires it together; [`app::run`] is the entry point.
//! - [`remote`]: remote configuration (signed pipelines from the control broker), and
//!   `operator` (feature `operator`): `gateway remote` (keys, signing, pushing, fleet
//!   status, diff).
//! - [`cli`]: the `gateway` command line.
//! - `allocator` (feature `mimalloc`): the global allocator, mimalloc.
//! - `demo` (feature `demo`): the self-contained demo behind `gateway demo`.
//! - `mock` (feature `demo`): librdkafka's mock cluster behind a TCP proxy per broker, whose
//!   uplink the demo and the end-to-end tests cut and restore.
//! - `simulate` (feature `serial`): a serial device on a pseudo-terminal, behind
//!   `gateway simulate serial`.
//!
//! ARCHITECTURE.md has the invariants.

pub mod ack;
pub mod app;
pub mod cli;
#[cfg(feature = "demo")]
pub mod demo;
pub mod event;
pub mod metrics;
#[cfg(feature = "demo")]
pub mod mock;
#[cfg(feature = "operator")]
pub mod operator;
pub mod remote;
pub mod router;
#[cfg(feature = "serial")]
pub mod simulate;
pub mod sinks;
pub mod sources;
pub mod spool;
pub mod stages;

#[cfg(feature = "mimalloc")]
pub mod allocator;

/// The global allocator of binaries that link this library (feature `mimalloc`).
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: allocator::Allocator = allocator::Allocator;

/// Tunes the allocator for a small device; the `gateway` command calls it first thing.
/// See [`allocator::tune`] (feature `mimalloc`; otherwise this does nothing).
pub fn tune_allocator() {
    #[cfg(feature = "mimalloc")]
    allocator::tune();
}

/// Tells the allocator whether records flow straight to Kafka (`true`) or the spool is in
/// use; the router calls it with its state. See [`allocator::direct_mode`].
pub fn allocator_direct_mode(direct: bool) {
    #[cfg(feature = "mimalloc")]
    allocator::direct_mode(direct);
    #[cfg(not(feature = "mimalloc"))]
    let _ = direct;
}
