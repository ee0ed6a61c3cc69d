//! Memory and the kernel: finding which bytes of watched memory changed.
//! No Python here (no pyo3): this layer works on addresses, shadows and
//! kernel registrations only.
//!
//! Layers inside, each calling only those before it: [`kernel`] (userfaultfd
//! `WP_ASYNC` and `PAGEMAP_SCAN`, system calls) → [`signals`] (everything
//! that runs in signal context, and the fatal-signal last look in
//! [`signals::crash`]) → [`store`] (store mode's fault thread and
//! single-stepping) → [`engine`] (regions, shadows, and the check that
//! turns written pages or compared bytes into raw changes).
//!
//! Signal context: only [`signals`].

pub mod engine;
pub mod kernel;
pub mod signals;
pub mod store;
