//! The outbox on real SQLite files: the store, the handle and its worker thread, eviction under
//! the disk budget, clock hold-back. One test binary for the area; the crash test that kills a
//! child process is `outbox_crash` (it has its own `main`).

mod evict;
mod handle;
mod restamp;
mod store;
mod support;
