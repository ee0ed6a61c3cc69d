/// What can go wrong answering a question about a trace.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error(transparent)]
    Format(#[from] memwatch_format::Error),

    /// The trace has no region or object with this tag.
    #[error("the trace has no tag {tag:?}; its tags are: {}", if known.is_empty() { "none".to_string() } else { known.join(", ") })]
    UnknownTag { tag: String, known: Vec<String> },

    /// A seq outside the trace's events.
    #[error("seq {seq} is out of range: {what}")]
    SeqOutOfRange { seq: u64, what: String },

    /// A time before the trace's first event.
    #[error("time {} is out of range: {what}", crate::text::duration_text(*time_ns))]
    TimeOutOfRange { time_ns: u64, what: String },

    /// Writing an export failed (polars' message).
    #[error("export failed: {0}")]
    Export(String),

    /// An element index or byte offset outside the region.
    #[error("{what}")]
    OutOfRegion { what: String },
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
