//! How a change is counted into the [`Aggregate`], in the first scan
//! ([`Aggregate::change`], phase by phase: the totals, a thread or line
//! new to its tag, the tag, its elements (heatmap, NaN and Inf), its line)
//! and in the second ([`Aggregate::change_followed`]: the followed
//! elements' values).

use std::sync::Arc;

use memwatch_analyzer::{ChangeRef, WhatRef};
use memwatch_format::dtype::Dtype;

use super::aggregate::Aggregate;
use super::limits::NEW_LINES_PER_TAG;
use super::stats::{
    flat_index, index_text, line_key, unflatten, LineKey, LineStats, Point, Severity, Suspicious, TagAgg,
};

impl Aggregate {
    /// Counts one change, phase by phase: in the run's and its process's
    /// totals, as a thread or line new to its tag, in its tag, element by
    /// element, in its line, and as an element that became NaN or Inf.
    pub fn change(&mut self, row: &ChangeRef<'_>) {
        let bytes = row.bytes_changed();
        self.tally_totals(row, bytes);
        // On the run's clock.
        let time_ns = row.time_ns + self.shift;
        let ti = self.tag_index(row.tag, row.region);
        let where_id = self.where_id(row.frame);
        let lk = row.frame.map(line_key);
        let mut events = self.newcomers(ti, row, lk, time_ns, where_id);
        let t = &mut self.tags[ti];
        tally_tag(t, row, time_ns, bytes);
        let (elements, first_nonfinite) = tally_elements(t, row);
        self.tally_line(ti, lk, row, bytes, elements);
        if let Some(first) = first_nonfinite {
            events.push(self.nonfinite_event(ti, row, time_ns, where_id, first));
        }
        for e in events {
            self.suspect(e);
        }
    }

    /// [`Aggregate::change`]: the change in the run's and its process's
    /// totals.
    fn tally_totals(&mut self, row: &ChangeRef<'_>, bytes: u64) {
        self.changes += 1;
        self.bytes += bytes;
        self.saw(row.time_ns);
        self.procs[self.cur].changes += 1;
        self.procs[self.cur].bytes += bytes;
    }

    /// [`Aggregate::change`]: a thread or a line new to tag `ti`, as an
    /// event (a tag's new lines past [`NEW_LINES_PER_TAG`] are counted).
    fn newcomers(
        &mut self,
        ti: usize,
        row: &ChangeRef<'_>,
        lk: Option<LineKey>,
        time_ns: u64,
        where_id: u32,
    ) -> Vec<Suspicious> {
        let t = &mut self.tags[ti];
        let before = t.changes;
        let new_thread = !t.threads.contains_key(&row.thread);
        let new_line = t.lines.insert(lk);
        let mut events = Vec::new();
        if new_thread && (before > 0 || row.thread_name.is_some_and(|n| n != "MainThread")) {
            events.push(Suspicious {
                severity: Severity::Warning,
                kind: "new_thread",
                tag: Some(ti),
                seq: Some(row.seq),
                time_ns: Some(time_ns),
                line: Some(where_id),
                detail: if before > 0 {
                    format!(
                        "first write from thread {} after {before} change{} from other threads",
                        thread_text(row),
                        if before == 1 { "" } else { "s" }
                    )
                } else {
                    format!("written by thread {}, not the main thread", thread_text(row))
                },
                proc: 0,
            });
        }
        if new_line && before > 0 {
            t.new_lines += 1;
            if t.new_lines > NEW_LINES_PER_TAG {
                *self.more_suspicious.entry("new_line").or_default() += 1;
            } else {
                events.push(Suspicious {
                    severity: Severity::Info,
                    kind: "new_line",
                    tag: Some(ti),
                    seq: Some(row.seq),
                    time_ns: Some(time_ns),
                    line: Some(where_id),
                    detail: format!(
                        "first write from this line, after {before} change{} from other lines",
                        if before == 1 { "" } else { "s" }
                    ),
                    proc: 0,
                });
            }
        }
        events
    }

    /// [`Aggregate::change`]: the change in the stats of its (tag, line),
    /// with the `elements` it changed.
    fn tally_line(&mut self, ti: usize, lk: Option<LineKey>, row: &ChangeRef<'_>, bytes: u64, elements: u64) {
        let line = self.lines.entry((ti, lk)).or_insert_with(|| LineStats {
            tag: ti,
            frame: row.frame.cloned(),
            changes: 0,
            bytes: 0,
            elements: 0,
            first_seq: row.seq,
            last_seq: row.seq,
            threads: Vec::new(),
        });
        line.changes += 1;
        line.bytes += bytes;
        line.elements += elements;
        line.last_seq = row.seq;
        if line.threads.len() < 4 {
            let name = thread_text(row);
            if !line.threads.contains(&name) {
                line.threads.push(name);
            }
        }
    }

    /// [`Aggregate::change`]: the event of the `first` element of a change
    /// to tag `ti` that became NaN or Inf.
    fn nonfinite_event(
        &self,
        ti: usize,
        row: &ChangeRef<'_>,
        time_ns: u64,
        where_id: u32,
        first: FirstNonfinite,
    ) -> Suspicious {
        let FirstNonfinite { flat, old, new, raw } = first;
        let t = &self.tags[ti];
        let idx = flat
            .map(|f| index_text(&unflatten(f, &t.shape)))
            .unwrap_or_default();
        let show = |v: Option<f64>| v.map_or("?".into(), crate::text::fmt_float);
        let new_text = t
            .dtype
            .as_deref()
            .and_then(|d| crate::text::element(d, &raw))
            .unwrap_or_else(|| show(new));
        let n = t.nonfinite;
        Suspicious {
            severity: Severity::Error,
            kind: "nonfinite",
            tag: Some(ti),
            seq: Some(row.seq),
            time_ns: Some(time_ns),
            line: Some(where_id),
            detail: format!(
                "{} written: element {idx} {} -> {new_text} ({n} element{} of this tag so far)",
                if new.is_some_and(f64::is_nan) {
                    "NaN"
                } else {
                    "Inf"
                },
                show(old),
                if n == 1 { "" } else { "s" }
            ),
            proc: 0,
        }
    }

    /// Counts only the trajectories' elements (the second scan).
    pub fn change_followed(&mut self, row: &ChangeRef<'_>) {
        let Some(region) = row.region else {
            return;
        };
        let Some(ti) = self.by_region[self.cur]
            .get(region.region as usize)
            .copied()
            .flatten()
            .or_else(|| self.by_name[self.cur].get(row.tag).copied())
        else {
            return;
        };
        if !self.trajectories.iter().any(|t| t.tag == ti) {
            return;
        }
        let WhatRef::Bytes { ranges, .. } = &row.what else {
            return;
        };
        if memwatch_analyzer::shape_of(region) != self.tags[ti].shape {
            return;
        }
        let Some(dtype) = region.dtype.as_deref().and_then(Dtype::parse) else {
            return;
        };
        let size = u64::from(region.itemsize.max(1));
        let where_id = self.where_id(row.frame);
        for k in 0..self.trajectories.len() {
            if self.trajectories[k].tag != ti {
                continue;
            }
            let Ok((start, _)) = memwatch_analyzer::element_bytes(region, &self.trajectories[k].index) else {
                continue;
            };
            for r in ranges.iter() {
                let end = r.offset + r.old.len() as u64;
                if start < r.offset || start + size > end {
                    continue;
                }
                let o = (start - r.offset) as usize;
                let (a, b) = (&r.old[o..o + size as usize], &r.new[o..o + size as usize]);
                if a == b {
                    continue;
                }
                let v = |x: &[u8]| dtype.decode(x).and_then(|v| v.as_f64()).unwrap_or(f64::NAN);
                self.trajectories[k].push(
                    v(a),
                    Point {
                        seq: row.seq,
                        time_ns: row.time_ns + self.shift,
                        value: v(b),
                        line: where_id,
                    },
                );
            }
        }
    }
}

/// A value that is NaN or Inf.
fn non_finite(v: Option<f64>) -> bool {
    v.is_some_and(|x| !x.is_finite())
}

/// The thread of a change, by name, else by id.
fn thread_text(row: &ChangeRef<'_>) -> String {
    row.thread_name
        .map(String::from)
        .unwrap_or_else(|| format!("thread {}", row.thread))
}

/// [`Aggregate::change`]: the change in its tag's counts, timelines and
/// threads.
fn tally_tag(t: &mut TagAgg, row: &ChangeRef<'_>, time_ns: u64, bytes: u64) {
    if t.changes == 0 {
        t.first = (row.seq, time_ns);
    }
    t.changes += 1;
    t.last = (row.seq, time_ns);
    t.bytes += bytes;
    t.time.add(time_ns, bytes);
    t.seq.add(row.seq, bytes);
    let th = t.threads.entry(row.thread).or_insert((None, 0));
    th.1 += 1;
    if th.0.as_deref() != row.thread_name {
        th.0 = row.thread_name.map(Arc::from);
    }
}

/// The first element of a change that became NaN or Inf: its flat index
/// (when it has one), its old and new values and its new bytes.
struct FirstNonfinite {
    flat: Option<u64>,
    old: Option<f64>,
    new: Option<f64>,
    raw: Vec<u8>,
}

/// [`Aggregate::change`]: the change element by element, in its tag's
/// heatmap and counts (a change of an object counts as one): how many
/// elements it changed, and the first that became NaN or Inf.
fn tally_elements(t: &mut TagAgg, row: &ChangeRef<'_>) -> (u64, Option<FirstNonfinite>) {
    let mut elements = 0;
    let mut first_nonfinite = None;
    if let (WhatRef::Bytes { ranges, .. }, Some(region)) = (&row.what, row.region) {
        let dtype = region.dtype.as_deref().and_then(Dtype::parse);
        let typed = region.dtype.is_some();
        let size = if typed { region.itemsize.max(1) as usize } else { 1 };
        let same_shape = !typed || memwatch_analyzer::shape_of(region) == t.shape;
        // Plain bytes are counted as bytes, their values 0 to 255.
        let value = |b: &[u8]| match (typed, dtype) {
            (true, Some(d)) => d.decode(b).and_then(|v| v.as_f64()),
            (true, None) => None,
            (false, _) => Some(f64::from(b[0])),
        };
        for r in ranges.iter() {
            for (k, (a, b)) in r.old.chunks_exact(size).zip(r.new.chunks_exact(size)).enumerate() {
                if a == b {
                    continue;
                }
                elements += 1;
                let (old, new) = (value(a), value(b));
                let at = r.offset + (k * size) as u64;
                let flat = if typed { flat_index(region, at) } else { Some(at) };
                if !non_finite(old) && non_finite(new) {
                    t.nonfinite += 1;
                    if first_nonfinite.is_none() {
                        first_nonfinite = Some(FirstNonfinite {
                            flat,
                            old,
                            new,
                            raw: b.to_vec(),
                        });
                    }
                }
                let delta = match (old, new) {
                    (Some(o), Some(n)) if (n - o).is_finite() => Some((n - o).abs()),
                    _ => None,
                };
                if let Some(heat) = t.heat.as_mut() {
                    match flat {
                        Some(f) if same_shape => heat.add(f, delta),
                        _ => heat.unplaced += 1,
                    }
                }
            }
        }
        t.elements += elements;
    } else {
        t.object_changes += 1;
    }
    (elements, first_nonfinite)
}
