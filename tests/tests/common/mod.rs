//! The shared harness lives in the package's library so the benchmark uses it too.

pub use gateway_e2e::harness::*;
