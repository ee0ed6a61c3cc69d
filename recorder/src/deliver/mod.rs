//! Where changes go: [`output`] owns the history, the callbacks, the live
//! report and the options, and is where every change ends; [`guard`] owns
//! the conditions and actions on watches (`condition=`, `action=`,
//! `freeze`), which [`output`] shows each change of a guarded tag and the
//! boundary fires. Layers inside: [`guard`] → [`output`].
//!
//! Nothing here runs in signal context.

pub mod guard;
pub mod output;
