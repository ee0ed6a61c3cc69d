//! The three ways of watching: [`buffers`] (memory), [`objects`]
//! (attributes and items of Python objects) and [`vars`] (rebinding of
//! names). Each says whether it has a watch left through
//! `runtime::watched`, so none asks another; [`objects`] asks [`buffers`]
//! whether a name is taken (a name is watched once at a time, whatever
//! way). Layers: [`buffers`] → [`objects`] → [`vars`].
//!
//! Nothing here runs in signal context.

pub mod buffers;
pub mod objects;
pub mod vars;
