//! `memwatch dump`: the header and every record, one per line.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Result;
use memwatch_analyzer::Symbols;
use memwatch_format::{Context, Record, Tail, TraceReader, NO_SEQ};

use crate::text::{hex, utc, word};

const AFTER_HELP: &str = "\
Output: one line per item, `KIND key=value ...`. Values with spaces or quotes
are in double quotes with backslash escapes; bytes are lower-case hex, cut
after --max-bytes bytes with `..(+N)` saying how many more there were.

  HEADER      version pid python platform page_size start start_time_ns writer argv
  PROPERTY    key value                      (free-form facts: backend, mode)
  CHUNK       index offset records first_seq last_seq stored raw   (with --chunks)
  STRING      id value                       (interned string)
  FRAME       id file function line          (interned frame)
  STACK       id frames=[id,...]             (interned stack, innermost first)
  WATCH       seq t region tag variable address len dtype itemsize shape strides
              origin + context
  CONTENTS    region at_seq offset len data  (initial contents or a checkpoint)
  CHANGE      seq t region tag + context, then one `range=OFFSET:OLD->NEW` per
              changed run (format version 3 stores a change as a DELTA, without
              its old bytes; dump shows it as the CHANGE it stands for)
  DELTA       seq t region tag shuffle xor|full + context, then one
              `range=OFFSET+LEN:DATA` per run (only with --raw)
  WAITED      after_seq waited_ns waits   (the program waited for the writer)
  NOTE        seq key value                  (a fact about the event after it:
              key=op, the op that made a change, e.g. aten::add_.Tensor)
  OBJECT      seq t tag kind key old new + context
  CHECKPOINT  region at_seq                  (CONTENTS records follow)
  UNWATCH     seq t region tag reason + context
  LOST        after_seq events reason
  TRAILER     records chunks last_seq lost_events end_time_ns   (clean close)
  TAIL        status=unclosed|truncated chunks bytes_ignored    (no clean close)

Context: thread (OS thread id), thread_name, at=FILE:LINE and function (the
in-scope line the event is attributed to), stack (interned stack id).
`t` is nanoseconds since the trace's start.

A trace that was not closed cleanly (the program was killed or crashed) is
dumped up to its last whole chunk, and the TAIL line and a note on stderr say
what was ignored; the exit status is still 0. A corrupt chunk stops the dump
with an error naming it (exit status 1).

Example:
  memwatch dump run.mwt | grep '^CHANGE' | head";

/// Print a trace's header and every record, one per line.
#[derive(Debug, clap::Args)]
#[command(after_help = AFTER_HELP)]
pub struct Args {
    /// The trace file (.mwt).
    pub trace: PathBuf,
    /// Show at most this many bytes of each byte string (0: all).
    #[arg(long, default_value_t = 32, value_name = "N")]
    pub max_bytes: usize,
    /// Also print a CHUNK line before each chunk's records.
    #[arg(long)]
    pub chunks: bool,
    /// Print only records (no HEADER, PROPERTY, TRAILER or TAIL lines).
    #[arg(long)]
    pub records_only: bool,
    /// Print records as stored: a version 3 change as its DELTA (new XOR
    /// old, shuffled), not as the CHANGE it stands for.
    #[arg(long)]
    pub raw: bool,
}

pub fn run(args: &Args, out: &mut dyn Write) -> Result<u8> {
    let reader = TraceReader::open(&args.trace)?;
    if !args.records_only {
        write_header(&reader, out)?;
    }
    let mut syms = Symbols::default();
    let mut line = String::with_capacity(256);
    let mut expander = (!args.raw).then(memwatch_format::Expander::default);
    for info in reader.chunks() {
        if args.chunks {
            let h = &info.header;
            writeln!(
                out,
                "CHUNK index={} offset={} records={} first_seq={} last_seq={} stored={} raw={}",
                info.index,
                info.offset,
                h.record_count,
                seq_text(h.first_seq),
                seq_text(h.last_seq),
                h.stored_len,
                h.raw_len
            )?;
        }
        let chunk = reader.decode_chunk(info)?;
        let expanded = match expander.as_mut() {
            Some(ex) => ex.expand(&chunk)?,
            None => None,
        };
        for rec in expanded.as_ref().unwrap_or(&chunk).records() {
            let rec = rec?;
            syms.learn(&rec);
            line.clear();
            format_record(&rec, &syms, args.max_bytes, &mut line);
            writeln!(out, "{line}")?;
        }
    }
    if !args.records_only {
        write_end(&reader, out)?;
    }
    if let Some(msg) = reader.tail_message() {
        out.flush()?;
        eprintln!("memwatch: note: {}: {msg}", reader.path().display());
    }
    Ok(0)
}

fn seq_text(seq: u64) -> String {
    if seq == NO_SEQ {
        "-".into()
    } else {
        seq.to_string()
    }
}

fn write_header(reader: &TraceReader, out: &mut dyn Write) -> Result<()> {
    let h = reader.header();
    let m = &h.meta;
    writeln!(
        out,
        "HEADER version={} pid={} python={} platform={} page_size={} start={} start_time_ns={} writer={} argv={}",
        h.version,
        m.pid,
        word(&m.python_version),
        word(&m.platform),
        m.page_size,
        utc(m.start_time_ns),
        m.start_time_ns,
        word(&m.writer),
        word(&m.argv.join(" ")),
    )?;
    for (k, v) in &m.properties {
        writeln!(out, "PROPERTY key={} value={}", word(k), word(v))?;
    }
    Ok(())
}

fn write_end(reader: &TraceReader, out: &mut dyn Write) -> Result<()> {
    match (reader.tail(), reader.trailer()) {
        (Tail::Closed, Some(t)) => writeln!(
            out,
            "TRAILER records={} chunks={} last_seq={} lost_events={} end_time_ns={}",
            t.records,
            t.chunks.len(),
            seq_text(t.last_seq),
            t.lost_events,
            t.end_time_ns
        )?,
        (Tail::Unclosed, _) => writeln!(
            out,
            "TAIL status=unclosed chunks={} bytes_ignored=0",
            reader.chunks().len()
        )?,
        (Tail::Truncated { bytes_ignored }, _) => writeln!(
            out,
            "TAIL status=truncated chunks={} bytes_ignored={bytes_ignored}",
            reader.chunks().len()
        )?,
        (Tail::Closed, None) => unreachable!("a closed trace has a trailer"),
    }
    Ok(())
}

fn push_context(line: &mut String, ctx: &Context, syms: &Symbols) {
    use std::fmt::Write as _;
    let _ = write!(line, " thread={}", ctx.thread);
    if let Some(name) = syms.string(ctx.thread_name) {
        let _ = write!(line, " thread_name={}", word(name));
    }
    if let Some(f) = syms.frame(ctx.frame) {
        let _ = write!(
            line,
            " at={} function={}",
            word(&format!("{}:{}", f.file, f.line)),
            word(&f.function)
        );
    }
    if ctx.stack != 0 {
        let _ = write!(line, " stack={}", ctx.stack);
    }
}

fn tag_of(syms: &Symbols, region: u32) -> String {
    syms.region(region)
        .map(|r| word(&r.tag))
        .unwrap_or_else(|| "?".into())
}

fn opt_word(v: Option<&str>) -> String {
    v.map(word).unwrap_or_else(|| "-".into())
}

fn list<T: ToString>(v: &[T]) -> String {
    let items: Vec<String> = v.iter().map(ToString::to_string).collect();
    format!("[{}]", items.join(","))
}

/// Formats one record as a dump line (without the newline).
pub fn format_record(rec: &Record<'_>, syms: &Symbols, max_bytes: usize, line: &mut String) {
    use std::fmt::Write as _;
    let kind = rec.kind_name();
    let _ = match rec {
        Record::String(s) => write!(line, "{kind} id={} value={}", s.id, word(s.value)),
        Record::Frame(f) => write!(
            line,
            "{kind} id={} file={} function={} line={}",
            f.id,
            opt_word(syms.string(f.file)),
            opt_word(syms.string(f.function)),
            f.line
        ),
        Record::Stack(s) => write!(line, "{kind} id={} frames={}", s.id, list(&s.frames)),
        Record::RegionWatched(r) => {
            let _ = write!(
                line,
                "{kind} seq={} t={} region={} tag={} variable={} address={:#x} len={} dtype={} itemsize={} \
                 shape={} strides={} origin={}",
                r.seq,
                r.ctx.time_ns,
                r.region,
                word(r.tag),
                opt_word(r.variable),
                r.address,
                r.len,
                opt_word(r.layout.dtype),
                r.layout.itemsize,
                list(&r.layout.shape),
                list(&r.layout.strides),
                r.layout.origin,
            );
            push_context(line, &r.ctx, syms);
            Ok(())
        }
        Record::Contents(c) => write!(
            line,
            "{kind} region={} at_seq={} offset={} len={} data={}",
            c.region,
            c.at_seq,
            c.offset,
            c.data.len(),
            hex(c.data, max_bytes)
        ),
        Record::RegionUnwatched(u) => {
            let _ = write!(
                line,
                "{kind} seq={} t={} region={} tag={} reason={}",
                u.seq,
                u.ctx.time_ns,
                u.region,
                tag_of(syms, u.region),
                u.reason.name()
            );
            push_context(line, &u.ctx, syms);
            Ok(())
        }
        Record::Change(c) => {
            let _ = write!(
                line,
                "{kind} seq={} t={} region={} tag={}",
                c.seq,
                c.ctx.time_ns,
                c.region,
                tag_of(syms, c.region)
            );
            push_context(line, &c.ctx, syms);
            for r in &c.ranges {
                let _ = write!(
                    line,
                    " range={}:{}->{}",
                    r.offset,
                    hex(r.old, max_bytes),
                    hex(r.new, max_bytes)
                );
            }
            Ok(())
        }
        Record::Crashed(c) => {
            let _ = write!(
                line,
                "{kind} signal={} si_code={} thread={} time_ns={} file={:?} line={} changes={} flags={} finished={}",
                c.signal, c.si_code, c.thread, c.time_ns, c.file, c.line, c.changes, c.flags, c.finished
            );
            Ok(())
        }
        Record::Waited(w) => {
            let _ = write!(
                line,
                "{kind} after_seq={} waited_ns={} waits={}",
                w.after_seq, w.waited_ns, w.waits
            );
            Ok(())
        }
        Record::Delta(d) => {
            let _ = write!(
                line,
                "{kind} seq={} t={} region={} tag={} shuffle={} {}",
                d.seq,
                d.ctx.time_ns,
                d.region,
                tag_of(syms, d.region),
                d.shuffle,
                if d.full { "full" } else { "xor" }
            );
            push_context(line, &d.ctx, syms);
            for r in &d.ranges {
                let _ = write!(
                    line,
                    " range={}+{}:{}",
                    r.offset,
                    r.data.len(),
                    hex(r.data, max_bytes)
                );
            }
            Ok(())
        }
        Record::ObjectChange(o) => {
            let _ = write!(
                line,
                "{kind} seq={} t={} tag={} kind={} key={} old={} new={}",
                o.seq,
                o.ctx.time_ns,
                opt_word(syms.string(o.tag)),
                o.kind.name(),
                opt_word(o.key),
                opt_word(o.old),
                opt_word(o.new)
            );
            push_context(line, &o.ctx, syms);
            Ok(())
        }
        Record::Checkpoint(c) => write!(line, "{kind} region={} at_seq={}", c.region, c.at_seq),
        Record::Note(n) => write!(
            line,
            "{kind} seq={} key={} value={}",
            n.seq,
            opt_word(syms.string(n.key)),
            opt_word(syms.string(n.value))
        ),
        Record::ObjectVariable(v) => write!(
            line,
            "{kind} tag={} variable={}",
            opt_word(syms.string(v.tag)),
            opt_word(v.variable)
        ),
        Record::Lost(l) => write!(
            line,
            "{kind} after_seq={} events={} reason={}",
            l.after_seq,
            l.events,
            word(l.reason)
        ),
    };
}
