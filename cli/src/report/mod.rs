//! `memwatch report`: a run at a glance, as one self-contained HTML page.
//!
//! This module owns the report: the aggregation of a trace into bounded
//! summaries ([`Aggregate`]: a timeline per tag, the lines that wrote, an
//! element heatmap per region, value trajectories of a few elements, and
//! the suspicious events), their JSON, and the page around it. The page is
//! `report/report.html` with `report/report.css` and `report/report.js`
//! put inline and the JSON embedded as a `<script type="application/json">`
//! blob that the script draws (SVG and canvas) when the page opens. It
//! loads nothing from anywhere: its Content-Security-Policy forbids it.
//!
//! Whatever the trace's size, the page stays small (a few hundred KB for
//! a 1 GB trace, under 5 MB by construction): the timeline has at most
//! [`BUCKETS`] buckets per tag, the busiest [`MAX_TIMELINE_TAGS`] tags,
//! [`MAX_LINES`] lines, [`MAX_HEATMAPS`] heatmaps of at most
//! [`HEAT_1D`] or [`HEAT_2D`]² cells, trajectories of at most
//! [`MAX_POINTS`] points and [`MAX_SUSPICIOUS`] suspicious events. What
//! was cut or binned is listed in the page's "Sampling" notes.
//!
//! Two scans at most: the first aggregates; when there are elements to
//! follow (asked with `--element TAG:INDEX`, or else the busiest element
//! of the busiest tags), a second one collects their values.
//!
//! The parts, each calling only the ones listed before it:
//!
//! - `args`: the command line ([`Args`], `--element` as [`ElementSpec`]);
//! - `limits`: the bounds above, and the few others the report keeps to;
//! - `json`: numbers and lists as JSON text;
//! - `stats`: the bounded parts of an aggregate ([`Buckets`], [`Heat`],
//!   [`Trajectory`], [`Suspicious`], [`TagAgg`], ...) and element indices;
//! - `aggregate`: the [`Aggregate`] itself, its processes, tags and picks;
//! - `change`: how a change is counted into it, phase by phase, in the
//!   first scan and in the second;
//! - `scan`: the scans of a run's traces ([`aggregate_run`]) and the
//!   `--element`s checked against what they found;
//! - `data`: the JSON of an aggregate, section by section;
//! - `page`: the page around it ([`render`], [`render_run`]) and the
//!   command ([`run`]).
//!
//! No locks, no signal-context code.

mod aggregate;
mod args;
mod change;
mod data;
mod json;
mod limits;
mod page;
mod scan;
mod stats;
#[cfg(test)]
mod tests;

pub use aggregate::Aggregate;
pub use args::{parse_element, Args, ElementSpec};
pub use limits::{
    AUTO_ELEMENTS, BUCKETS, HEAT_1D, HEAT_2D, MAX_ELEMENTS, MAX_HEATMAPS, MAX_LINES, MAX_POINTS,
    MAX_PROCESSES, MAX_SUSPICIOUS, MAX_TIMELINE_TAGS,
};
pub use page::{render, render_run, run};
pub use scan::{aggregate, aggregate_run, Source};
pub use stats::{
    flat_index, unflatten, Buckets, Heat, LineStats, Point, ProcAgg, Severity, Suspicious, TagAgg, Trajectory,
};
