//! The `retryctl` command's library half: the demo (`retryctl demo`), kept
//! apart from `main.rs` so its tests can drive it in-process.
//!
//! Nothing here is for embedders: the retry layer is the `retryctl` crate,
//! the reference gateway `retryctl-gateway`.

#![forbid(unsafe_code)]
#![deny(missing_docs)]
#![warn(missing_debug_implementations, unreachable_pub, rust_2018_idioms)]

pub mod demo;
