//! The scans of `memwatch report`: the traces of a run ([`Source`]) read
//! into one [`Aggregate`], every change first, then (when there are any)
//! the followed elements' values; and the `--element`s asked, checked
//! against the trace's tags and shapes.

use std::io::IsTerminal;
use std::ops::ControlFlow;

use anyhow::{bail, Result};
use memwatch_analyzer::{for_each_event, seq_bounds, Event, Filter};
use memwatch_format::dtype::Dtype;
use memwatch_format::{Ending, TraceReader};

use super::aggregate::Aggregate;
use super::args::ElementSpec;
use super::json::join;
use super::limits::MAX_ELEMENTS;
use super::stats::{index_text, unflatten};

/// One trace of a run to aggregate: its process, and how much later than
/// the run's start it started (ns).
pub struct Source<'a> {
    pub reader: &'a TraceReader,
    pub pid: u32,
    pub rank: Option<u32>,
    pub shift: u64,
}

/// A progress bar for a scan of `what`, drawn only when stderr is a
/// terminal.
fn progress_bar(what: &str) -> indicatif::ProgressBar {
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(0);
    let style =
        indicatif::ProgressStyle::with_template("memwatch: {msg} [{bar:30}] {pos}/{len} chunks ({eta})")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> ");
    bar.set_style(style);
    bar.set_message(what.to_string());
    bar
}

/// Scans `reader` into an [`Aggregate`]: every change, then (when there
/// are any) the followed elements' values. `elements` are checked
/// against the trace's tags and shapes.
pub fn aggregate(reader: &TraceReader, elements: &[ElementSpec]) -> Result<Aggregate> {
    let source = Source {
        reader,
        pid: reader.header().meta.pid,
        rank: None,
        shift: 0,
    };
    aggregate_run(&[source], false, elements)
}

/// [`aggregate`] of the traces of a run, one after the other, each
/// process's tags its own and its times on the run's clock; `several`
/// labels the tags with their process. In phases: the changes of every
/// trace, the elements to follow, their values.
pub fn aggregate_run(sources: &[Source<'_>], several: bool, elements: &[ElementSpec]) -> Result<Aggregate> {
    if elements.len() > MAX_ELEMENTS {
        bail!(
            "{} --element options given; at most {MAX_ELEMENTS} are drawn: leave some out",
            elements.len()
        );
    }
    let mut agg = scan_changes(sources, several)?;
    let follow = elements_to_follow(&agg, elements)?;
    if follow.is_empty() {
        return Ok(agg);
    }
    agg.follow(follow);
    scan_followed(&mut agg, sources)?;
    Ok(agg)
}

/// [`aggregate_run`], the first scan: every change and record of each
/// trace in turn, then one bucket width for all the timelines.
fn scan_changes(sources: &[Source<'_>], several: bool) -> Result<Aggregate> {
    let known_ns = sources
        .iter()
        .map(|s| match s.reader.ending() {
            Ending::Closed { end_time_ns } => s.shift + end_time_ns,
            _ => 0,
        })
        .max()
        .unwrap_or(0);
    let seqs = sources
        .iter()
        .filter_map(|s| seq_bounds(s.reader))
        .reduce(|a, b| (a.0.min(b.0), a.1.max(b.1)));
    let mut agg = Aggregate::new(seqs, known_ns);
    agg.several = several;
    for s in sources {
        agg.begin(s.pid, s.rank, s.shift);
        let bar = progress_bar(&if several {
            format!("reading changes of pid {}", s.pid)
        } else {
            "reading changes".to_string()
        });
        let mut progress = |done: usize, total: usize| {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        };
        let syms = for_each_event(s.reader, &Filter::default(), &mut progress, |e| {
            match e {
                Event::Change(row) => agg.change(row),
                Event::Record(rec, _) => agg.record(rec),
            }
            ControlFlow::Continue(())
        })?;
        bar.finish_and_clear();
        agg.waited.0 += syms.waited.0;
        agg.waited.1 += syms.waited.1;
    }
    agg.finish();
    Ok(agg)
}

/// [`aggregate_run`]: the elements to follow, the asked ones (in each
/// process with their tag), else the busiest.
fn elements_to_follow(agg: &Aggregate, elements: &[ElementSpec]) -> Result<Vec<Followed>> {
    if elements.is_empty() {
        return Ok(agg.auto_elements());
    }
    let mut v = Vec::new();
    for e in elements {
        v.extend(resolve(agg, e)?);
    }
    if v.len() > MAX_ELEMENTS {
        bail!(
            "the --element options name {} elements in all (a tag in several processes is followed \
             in each); at most {MAX_ELEMENTS} are drawn: leave some out or keep fewer processes with --pid",
            v.len()
        );
    }
    Ok(v)
}

/// [`aggregate_run`], the second scan: the followed elements' values, in
/// each trace that has one, over the seqs their tags changed in.
fn scan_followed(agg: &mut Aggregate, sources: &[Source<'_>]) -> Result<()> {
    for (i, s) in sources.iter().enumerate() {
        let mine = agg
            .trajectories
            .iter()
            .map(|t| t.tag)
            .filter(|&t| agg.tags[t].proc == i);
        let Some((lo, hi)) = mine
            .map(|t| (agg.tags[t].first.0, agg.tags[t].last.0))
            .reduce(|a, b| (a.0.min(b.0), a.1.max(b.1)))
        else {
            continue;
        };
        agg.resume(i, s.shift);
        let filter = Filter {
            seq: Some((lo, hi)),
            ..Filter::default()
        };
        let bar = progress_bar("following elements");
        let mut progress = |done: usize, total: usize| {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        };
        for_each_event(s.reader, &filter, &mut progress, |e| {
            if let Event::Change(row) = e {
                agg.change_followed(row);
            }
            ControlFlow::Continue(())
        })?;
        bar.finish_and_clear();
    }
    Ok(())
}

/// An element to follow: (tag, flat index, index, asked).
type Followed = (usize, u64, Vec<u64>, bool);

/// An asked element in each process with that tag, or why it is not one.
fn resolve(agg: &Aggregate, e: &ElementSpec) -> Result<Vec<Followed>> {
    let found: Vec<usize> = agg
        .by_name
        .iter()
        .filter_map(|m| m.get(e.tag.as_str()).copied())
        .collect();
    if found.is_empty() {
        let mut known: Vec<&str> = agg.tags.iter().map(|t| &*t.name).collect();
        known.sort_unstable();
        known.dedup();
        bail!(
            "--element {}:{}: the trace has no changes to a tag {:?}; its tags are: {}",
            e.tag,
            join(&e.index, |n| n.to_string()),
            e.tag,
            if known.is_empty() {
                "(none)".to_string()
            } else {
                known.join(", ")
            }
        );
    }
    found.into_iter().map(|t| resolve_in(agg, t, e)).collect()
}

/// [`resolve`] in tag `t`.
fn resolve_in(agg: &Aggregate, t: usize, e: &ElementSpec) -> Result<Followed> {
    let tag = &agg.tags[t];
    if tag.dtype.as_deref().and_then(Dtype::parse).is_none() {
        bail!(
            "--element {}: {:?} has no numeric dtype ({}), so its elements have no values to plot; \
             pick a tag of an array",
            e.tag,
            e.tag,
            if tag.heat.is_none() {
                "it is a Python object"
            } else {
                "it is plain bytes"
            }
        );
    }
    let shape = &tag.shape;
    let total = shape.iter().fold(1u64, |a, n| a.saturating_mul(*n));
    let flat = if e.index.len() == 1 && shape.len() != 1 {
        e.index[0]
    } else if e.index.len() == shape.len() && e.index.iter().zip(shape).all(|(i, n)| i < n) {
        e.index.iter().zip(shape).fold(0u64, |a, (i, n)| a * n + i)
    } else {
        bail!(
            "--element {}:{}: {:?} has shape {}; give one index per dimension, each below its size \
             (like {}:{}), or one flat index below {total}",
            e.tag,
            join(&e.index, |n| n.to_string()),
            e.tag,
            index_text(shape).replace('[', "(").replace(']', ")"),
            e.tag,
            join(shape, |_| "0".to_string()),
        );
    };
    if flat >= total {
        bail!(
            "--element {}:{flat}: {:?} has {total} elements (shape {}); a flat index must be below {total}",
            e.tag,
            e.tag,
            index_text(shape).replace('[', "(").replace(']', ")"),
        );
    }
    Ok((t, flat, unflatten(flat, shape), true))
}
