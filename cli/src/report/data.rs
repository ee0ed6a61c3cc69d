//! The report's data, the JSON the page draws (its `<script id="data">`):
//! [`data_json`] writes it section by section (the run, its tags, the
//! timeline, the lines, the heatmaps, the trajectories, the suspicious
//! events, then the lines they name and the "Sampling" notes gathered on
//! the way), from an [`Aggregate`] and the [`RunFacts`] of the header,
//! whose list of a run's processes [`process_json`] writes.

use std::collections::HashMap;
use std::fmt::Write as _;

use memwatch_analyzer::json_str;
use memwatch_format::dtype::{Dtype, FloatFormat};
use memwatch_format::{Ending, TraceReader};

use super::aggregate::Aggregate;
use super::json::{join, num, short};
use super::limits::{BUCKETS, MAX_HEATMAPS, MAX_LINES, MAX_TIMELINE_TAGS};
use super::stats::{index_text, ProcAgg, Trajectory};
use crate::run::Proc;
use crate::summary::{ending_text, trace_size};
use crate::text::utc;

/// The facts of the run that the report's header shows.
pub(super) struct RunFacts {
    pub(super) ending_how: &'static str,
    pub(super) ending_text: String,
    pub(super) ending_bad: bool,
    pub(super) duration_ns: u64,
    pub(super) trace_bytes: u64,
    pub(super) chunks: usize,
    /// For a run: its processes' JSON objects (the first
    /// [`MAX_PROCESSES`](super::limits::MAX_PROCESSES), each a
    /// [`process_json`]) and how many it has.
    pub(super) processes: Option<(Vec<String>, usize)>,
}

/// The report's data, as JSON (the page's `<script id="data">`), one
/// section after the other; `asked`: how many `--element`s were given.
pub(super) fn data_json(reader: &TraceReader, agg: &Aggregate, facts: &RunFacts, asked: usize) -> String {
    let mut sampled: Vec<String> = Vec::new();
    let mut j = String::with_capacity(1 << 16);
    run_section(&mut j, &mut sampled, reader, agg, facts);
    tags_section(&mut j, agg);
    timeline_section(&mut j, &mut sampled, agg);
    lines_section(&mut j, &mut sampled, agg);
    heatmaps_section(&mut j, &mut sampled, agg);
    let (wheres, where_of) = wheres_named(agg);
    trajectories_section(&mut j, &mut sampled, agg, &where_of, asked);
    suspicious_section(&mut j, &mut sampled, agg, &where_of);
    let _ = write!(
        j,
        "\"wheres\":[{}],\"sampled\":[{}]}}",
        join(&wheres, |w| json_str(w)),
        join(&sampled, |s| json_str(s)),
    );
    // Inside a <script>, `</script` or `<!--` would end or confuse it: `<`
    // only occurs in strings, where `\u003c` is the same character.
    j.replace('<', "\\u003c")
}

/// [`data_json`]: the run, from the trace's header, the [`RunFacts`] and
/// the totals, with its processes when it has several.
fn run_section(
    j: &mut String,
    sampled: &mut Vec<String>,
    reader: &TraceReader,
    agg: &Aggregate,
    facts: &RunFacts,
) {
    let meta = &reader.header().meta;
    let _ = write!(
        j,
        "{{\"version\":{},\"run\":{{\"trace\":{},\"argv\":[{}],\"pid\":{},\"python_version\":{},\
         \"platform\":{},\"writer\":{},\"format_version\":{},\"properties\":[{}],\"start_utc\":{},\
         \"duration_ns\":{},\"trace_bytes\":{},\"chunks\":{},\"changes\":{},\"bytes_changed\":{},\
         \"regions_watched\":{},\"checkpoints\":{},\"lost\":{},\"waited_ns\":{},\"waits\":{},\
         \"ending\":{{\"how\":{},\"message\":{},\"bad\":{}}},\"note\":{}{}}},",
        json_str(env!("CARGO_PKG_VERSION")),
        json_str(&reader.path().display().to_string()),
        join(&meta.argv, |a| json_str(a)),
        meta.pid,
        json_str(&meta.python_version),
        json_str(&meta.platform),
        json_str(&meta.writer),
        reader.header().version,
        join(&meta.properties, |(k, v)| format!(
            "[{},{}]",
            json_str(k),
            json_str(v)
        )),
        json_str(&utc(meta.start_time_ns)),
        facts.duration_ns,
        facts.trace_bytes,
        facts.chunks,
        agg.changes,
        agg.bytes,
        agg.regions,
        agg.checkpoints,
        agg.lost,
        agg.waited.0,
        agg.waited.1,
        json_str(facts.ending_how),
        json_str(&facts.ending_text),
        facts.ending_bad,
        reader.tail_message().map_or("null".into(), |m| json_str(&m)),
        match &facts.processes {
            Some((listed, total)) => format!(
                ",\"processes\":[{}],\"processes_total\":{total}",
                listed.join(",")
            ),
            None => String::new(),
        },
    );
    if let Some((listed, total)) = &facts.processes {
        if listed.len() < *total {
            sampled.push(format!(
                "Processes: the first {} of the run's {total} are listed (all are in the counts).",
                listed.len()
            ));
        }
    }
}

/// A tag's process, for a run: `"pid":4243,"rank":null,` first in its
/// object (nothing for one process).
fn process_of(agg: &Aggregate, proc: usize) -> String {
    if agg.several {
        let p = &agg.procs[proc];
        format!(
            "\"pid\":{},\"rank\":{},",
            p.pid,
            p.rank.map_or("null".into(), |r| r.to_string())
        )
    } else {
        String::new()
    }
}

/// [`data_json`]: the tags, in name order (the other sections refer to
/// them by index).
fn tags_section(j: &mut String, agg: &Aggregate) {
    let _ = write!(
        j,
        "\"tags\":[{}],",
        join(agg.tags.iter().enumerate(), |(i, t)| {
            let mut threads: Vec<(String, u64)> = t
                .threads
                .iter()
                .map(|(id, (n, c))| {
                    (
                        n.as_deref().map_or_else(|| format!("thread {id}"), String::from),
                        *c,
                    )
                })
                .collect();
            threads.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
            threads.truncate(8);
            let process = if agg.several {
                format!(
                    "{}\"label\":{},",
                    process_of(agg, t.proc),
                    json_str(&agg.tag_label(i))
                )
            } else {
                String::new()
            };
            format!(
                "{{{process}\"name\":{},\"variable\":{},\"dtype\":{},\"shape\":[{}],\"changes\":{},\"bytes\":{},\
                 \"elements\":{},\"object_changes\":{},\"first_seq\":{},\"first_ns\":{},\"last_seq\":{},\
                 \"last_ns\":{},\"nonfinite\":{},\"threads\":[{}]}}",
                json_str(&t.name),
                t.variable.as_deref().map_or("null".into(), json_str),
                t.dtype.as_deref().map_or("null".into(), json_str),
                join(&t.shape, |n| n.to_string()),
                t.changes,
                t.bytes,
                t.elements,
                t.object_changes,
                t.first.0,
                t.first.1,
                t.last.0,
                t.last.1,
                t.nonfinite,
                join(threads, |(n, c)| format!("[{},{c}]", json_str(&n))),
            )
        })
    );
}

/// [`data_json`]: the timeline of the busiest tags, each bucket list cut
/// after its last use.
fn timeline_section(j: &mut String, sampled: &mut Vec<String>, agg: &Aggregate) {
    let busiest = agg.busiest_tags();
    let shown: Vec<usize> = busiest.iter().copied().take(MAX_TIMELINE_TAGS).collect();
    let used_time = shown.iter().map(|&t| agg.tags[t].time.used()).max().unwrap_or(0);
    let used_seq = shown.iter().map(|&t| agg.tags[t].seq.used()).max().unwrap_or(0);
    let (tw, sw, so) = agg
        .tags
        .first()
        .map_or((1, 1, 0), |t| (t.time.width, t.seq.width, t.seq.origin));
    if busiest.len() > shown.len() {
        sampled.push(format!(
            "Timeline: the {} busiest of {} tags are drawn.",
            shown.len(),
            busiest.len()
        ));
    }
    if agg.changes as usize > BUCKETS {
        sampled.push(format!(
            "Timeline: changes are counted in buckets of {} and of {} seq{}.",
            memwatch_analyzer::duration_text(tw),
            sw,
            if sw == 1 { "" } else { "s" }
        ));
    }
    let _ = write!(
        j,
        "\"timeline\":{{\"time_width\":{tw},\"seq_origin\":{so},\"seq_width\":{sw},\"tags\":[{}],\"hidden\":{}}},",
        join(&shown, |&t| {
            let tg = &agg.tags[t];
            format!(
                "{{\"tag\":{t},\"time_changes\":[{}],\"time_bytes\":[{}],\"seq_changes\":[{}],\"seq_bytes\":[{}]}}",
                join(&tg.time.changes[..used_time], |n| n.to_string()),
                join(&tg.time.bytes[..used_time], |n| n.to_string()),
                join(&tg.seq.changes[..used_seq], |n| n.to_string()),
                join(&tg.seq.bytes[..used_seq], |n| n.to_string()),
            )
        }),
        busiest.len() - shown.len(),
    );
}

/// [`data_json`]: the busiest lines.
fn lines_section(j: &mut String, sampled: &mut Vec<String>, agg: &Aggregate) {
    let lines = agg.busiest_lines();
    if lines.len() > MAX_LINES {
        sampled.push(format!(
            "Lines: the {MAX_LINES} busiest of {} (tag, line) pairs are listed.",
            lines.len()
        ));
    }
    let _ = write!(
        j,
        "\"lines\":[{}],\"lines_total\":{},",
        join(lines.iter().take(MAX_LINES), |l| {
            let (file, line, function) = match &l.frame {
                Some(f) => (json_str(&f.file), f.line.to_string(), json_str(&f.function)),
                None => ("null".into(), "null".into(), "null".into()),
            };
            format!(
                "{{{}\"tag\":{},\"file\":{file},\"line\":{line},\"function\":{function},\"changes\":{},\
                 \"bytes\":{},\"elements\":{},\"first_seq\":{},\"last_seq\":{},\"threads\":[{}]}}",
                process_of(agg, agg.tags[l.tag].proc),
                l.tag,
                l.changes,
                l.bytes,
                l.elements,
                l.first_seq,
                l.last_seq,
                join(&l.threads, |t| json_str(t)),
            )
        }),
        lines.len(),
    );
}

/// [`data_json`]: the heatmaps of the busiest tags (by elements) with a
/// region.
fn heatmaps_section(j: &mut String, sampled: &mut Vec<String>, agg: &Aggregate) {
    let mut heat_tags: Vec<usize> = (0..agg.tags.len())
        .filter(|&t| {
            agg.tags[t]
                .heat
                .as_ref()
                .is_some_and(|h| h.counts.iter().any(|&c| c > 0))
        })
        .collect();
    heat_tags.sort_by(|&a, &b| agg.tags[b].elements.cmp(&agg.tags[a].elements).then(a.cmp(&b)));
    if heat_tags.len() > MAX_HEATMAPS {
        sampled.push(format!(
            "Heatmaps: the {MAX_HEATMAPS} tags with the most element changes of {} are drawn.",
            heat_tags.len()
        ));
        heat_tags.truncate(MAX_HEATMAPS);
    }
    for &t in &heat_tags {
        let h = agg.tags[t].heat.as_ref().expect("filtered");
        if h.is_binned() {
            sampled.push(format!(
                "Heatmap of {}: {} × {} elements are binned into cells of {} × {}.",
                agg.tag_label(t),
                h.rows,
                h.cols,
                h.cell_rows,
                h.cell_cols
            ));
        }
    }
    let _ = write!(
        j,
        "\"heatmaps\":[{}],",
        join(&heat_tags, |&t| {
            let h = agg.tags[t].heat.as_ref().expect("filtered");
            format!(
                "{{\"tag\":{t},\"shape\":[{}],\"rows\":{},\"cols\":{},\"cell_rows\":{},\"cell_cols\":{},\
                 \"grid_rows\":{},\"grid_cols\":{},\"counts\":[{}],\"delta\":[{}],\"unplaced\":{}}}",
                join(&h.shape, |n| n.to_string()),
                h.rows,
                h.cols,
                h.cell_rows,
                h.cell_cols,
                h.grid_rows,
                h.grid_cols,
                join(&h.counts, |n| n.to_string()),
                join(h.delta_sum.iter().zip(&h.delta_n), |(s, n)| if *n == 0 {
                    "0".into()
                } else {
                    short(s / *n as f64)
                }),
                h.unplaced,
            )
        })
    );
}

/// [`data_json`]: only the lines that points and events name go into the
/// page: their texts, and the index of each in them by its index in
/// [`Aggregate::wheres`].
fn wheres_named(agg: &Aggregate) -> (Vec<&str>, HashMap<u32, u32>) {
    let mut wheres: Vec<&str> = Vec::new();
    let mut where_of: HashMap<u32, u32> = HashMap::new();
    let lines_named = agg.suspicious.iter().filter_map(|s| s.line).chain(
        agg.trajectories
            .iter()
            .flat_map(|t| t.finished_points().into_iter().map(|p| p.line)),
    );
    for id in lines_named {
        where_of.entry(id).or_insert_with(|| {
            wheres.push(&agg.wheres[id as usize]);
            wheres.len() as u32 - 1
        });
    }
    (wheres, where_of)
}

/// [`data_json`]: the values of the followed elements.
fn trajectories_section(
    j: &mut String,
    sampled: &mut Vec<String>,
    agg: &Aggregate,
    where_of: &HashMap<u32, u32>,
    asked: usize,
) {
    for tr in &agg.trajectories {
        if tr.every > 1 {
            sampled.push(format!(
                "Values of {}: every {}th of its {} changes is drawn (and the last).",
                element_label(agg, tr),
                tr.every,
                tr.changes
            ));
        }
    }
    let _ = write!(
        j,
        "\"trajectories\":[{}],\"asked_elements\":{asked},",
        join(&agg.trajectories, |tr| {
            let t = &agg.tags[tr.tag];
            let f32v =
                t.dtype.as_deref().and_then(Dtype::parse).is_some_and(|d| {
                    d.float_format() != Some(FloatFormat::F64) && d.float_format().is_some()
                });
            format!(
                "{{\"tag\":{},\"index\":[{}],\"label\":{},\"asked\":{},\"changes\":{},\"every\":{},\
                 \"initial\":{},\"points\":[{}]}}",
                tr.tag,
                join(&tr.index, |n| n.to_string()),
                json_str(&element_label(agg, tr)),
                tr.asked,
                tr.changes,
                tr.every,
                tr.initial.map_or("null".into(), |v| num(v, f32v)),
                join(tr.finished_points(), |p| format!(
                    "[{},{},{},{}]",
                    p.seq,
                    p.time_ns,
                    num(p.value, f32v),
                    where_of.get(&p.line).copied().unwrap_or(0)
                )),
            )
        })
    );
}

/// [`data_json`]: the suspicious events, worst first, and how many more
/// of each kind were counted.
fn suspicious_section(
    j: &mut String,
    sampled: &mut Vec<String>,
    agg: &Aggregate,
    where_of: &HashMap<u32, u32>,
) {
    let mut suspicious = agg.suspicious.clone();
    suspicious.sort_by(|a, b| b.severity.cmp(&a.severity).then(a.seq.cmp(&b.seq)));
    let more: u64 = agg.more_suspicious.values().sum();
    if more > 0 {
        sampled.push(format!(
            "Suspicious events: {} listed, {more} more counted ({}).",
            suspicious.len(),
            join(&agg.more_suspicious, |(k, n)| format!("{k} {n}")).replace(',', ", ")
        ));
    }
    let opt = |v: Option<u64>| v.map_or("null".into(), |n| n.to_string());
    let _ = write!(
        j,
        "\"suspicious\":[{}],\"more_suspicious\":{{{}}},",
        join(&suspicious, |s| {
            format!(
            "{{{}\"severity\":\"{}\",\"kind\":\"{}\",\"tag\":{},\"seq\":{},\"ns\":{},\"where\":{},\"detail\":{}}}",
            if agg.several { process_of(agg, s.proc) } else { String::new() },
            s.severity.name(),
            s.kind,
            s.tag.map_or("null".into(), |t| t.to_string()),
            opt(s.seq),
            opt(s.time_ns),
            s.line.and_then(|l| where_of.get(&l)).map_or("null".into(), |l| l.to_string()),
            json_str(&s.detail),
        )
        }),
        join(&agg.more_suspicious, |(k, n)| format!("\"{k}\":{n}")),
    );
}

/// `w[3]`, or `w[3] (pid 4243)` in a run.
fn element_label(agg: &Aggregate, tr: &Trajectory) -> String {
    let t = &agg.tags[tr.tag];
    let label = format!("{}{}", t.name, index_text(&tr.index));
    if agg.several {
        let p = &agg.procs[t.proc];
        format!("{label} (pid {})", p.pid)
    } else {
        label
    }
}

/// The JSON object of process `p` of a run, for the header's list of
/// processes: `a`, what it did; `e`, how it ended; `shift`, when it
/// started (ns after the run) and `dur`, for how long.
pub(super) fn process_json(p: &Proc, a: &ProcAgg, e: &Ending<'_>, shift: u64, dur: u64) -> String {
    let opt = |v: Option<u32>| v.map_or("null".into(), |n| n.to_string());
    let path = p.reader.path();
    let file = path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    format!(
        "{{\"pid\":{},\"rank\":{},\"parent\":{},\"trace\":{},\"argv\":[{}],\"start_ns\":{shift},\
         \"duration_ns\":{dur},\"trace_bytes\":{},\"changes\":{},\"bytes_changed\":{},\
         \"regions_watched\":{},\"ending\":{{\"how\":{},\"message\":{},\"bad\":{}}}}}",
        p.pid,
        opt(p.rank),
        opt(p.parent),
        json_str(&file),
        join(&p.reader.header().meta.argv, |a| json_str(a)),
        trace_size(&p.reader),
        a.changes,
        a.bytes,
        a.regions,
        json_str(e.name()),
        json_str(&ending_text(&p.reader, e)),
        !matches!(e, Ending::Closed { .. }),
    )
}
