//! The bounds that keep the page small whatever the trace's size: how
//! many buckets, tags, lines, heatmap cells, points, suspicious events,
//! elements and processes the report keeps. Everything past them is
//! binned, cut or counted, and said so in the page's "Sampling" notes.

/// Buckets of a timeline, per tag, over time and over seq.
pub const BUCKETS: usize = 240;
/// Tags with a timeline of their own; the others are counted.
pub const MAX_TIMELINE_TAGS: usize = 40;
/// Lines listed, busiest first.
pub const MAX_LINES: usize = 500;
/// Tags with a heatmap, busiest first.
pub const MAX_HEATMAPS: usize = 16;
/// Cells of the heatmap of a 1-D region.
pub const HEAT_1D: u64 = 512;
/// Cells per side of the heatmap of a 2-D region.
pub const HEAT_2D: u64 = 96;
/// Points kept of an element's trajectory.
pub const MAX_POINTS: usize = 1500;
/// Suspicious events listed; more are counted by kind.
pub const MAX_SUSPICIOUS: usize = 200;
/// Elements followed when none is asked for.
pub const AUTO_ELEMENTS: usize = 4;
/// Elements that may be asked for.
pub const MAX_ELEMENTS: usize = 16;
/// "New line" events listed per tag.
pub(super) const NEW_LINES_PER_TAG: u64 = 8;
/// Regions up to this many elements keep an exact count per element.
pub(super) const EXACT_COUNTS: u64 = 1 << 16;
/// Processes listed in the report of a run; more are counted.
pub const MAX_PROCESSES: usize = 256;
