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
///
/// mimalloc keeps freed pages for 1 s before it returns them to the OS. With librdkafka
/// and SQLite on mimalloc too, that raised the gateway's peak RSS during an outage and
/// the drain after it by 10 to 15 MiB (past the 64 MiB target); 10 ms kept the peak at
/// 55 MiB, at the same drain rate (0 ms cut the drain rate by two thirds). BENCHMARKS.md
/// has the runs. `MIMALLOC_PURGE_DELAY` in the environment still wins.
pub fn tune_allocator() {
    #[cfg(feature = "mimalloc")]
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none()
        && std::env::var_os("MIMALLOC_RESET_DELAY").is_none()
    {
        // `mi_option_purge_delay` in mimalloc.h (not exported as a constant by the sys
        // crate "for stability reasons"; the same position in mimalloc 2 and 3).
        const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
        // SAFETY: `mi_option_set` stores an option's value; it may be called from any
        // thread at any time, and a purge delay of 10 ms is in its documented range.
        #[allow(unsafe_code)]
        unsafe {
            libmimalloc_sys::mi_option_set(PURGE_DELAY, 10)
        };
    }
}
