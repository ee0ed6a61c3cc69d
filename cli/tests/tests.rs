//! End-to-end tests of the `memwatch` binary.

mod dump;
mod ops;
mod perfetto;
mod report;
