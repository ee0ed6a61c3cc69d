//! The top: the session's entry points that reach across every layer
//! below ([`session`]). The extension module (`lib.rs`) registers them with
//! the other layers' `#[pyfunction]`s and classes. Nothing calls up into
//! here; nothing here runs in signal context.

pub mod session;
