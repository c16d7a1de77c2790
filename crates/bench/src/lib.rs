//! retryctl's benchmarks (in the repository's `benches/`), built without
//! the core's test-only dependencies: see this crate's `Cargo.toml`.

#![forbid(unsafe_code)]
