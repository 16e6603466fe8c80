//! The C ABI of [`keypool`]: `libkeypool.a` / `libkeypool.so` and `include/keypool.h`.
//!
//! This crate is the only place with `unsafe` code; the engine (`keypool`) forbids it.
//! The header is generated from [`ffi`] by `cargo run -p xtask -- header` (cbindgen)
//! and checked for drift in CI. Install the libraries, headers and pkg-config file with
//! `scripts/install.sh PREFIX`.
//!
//! The `ffi` modules were written inside the engine and name engine items as
//! `crate::…`; the imports below make those paths resolve here, so the code reads the
//! same in both places. Engine internals come only from [`keypool::__capi`].
#![deny(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]

// Public engine API, under the paths the ffi modules use (`crate::Pool`, …).
#[allow(unused_imports)]
use keypool::{
    CancelHandle, Config, DEFAULT_PATH, Error, KeyEvent, KeyEventKind, Pool, Request,
    RequestResult, ResponseStream, StreamChunk, StreamEvent, StreamFailure, Ticket, TimeoutPhase,
    VERSION,
};
// Crate-private engine items the C ABI needs (`crate::thread_role::on_pool_thread`).
use keypool::__capi::thread_role;

mod ffi;
