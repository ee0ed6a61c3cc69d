//! Integration tests of the trace format: one binary, one module per concern.

mod common;
mod errors;
mod golden;
mod journal;
mod roundtrip;
mod truncation;
mod view;
mod writer;
