//! `memwatch dump`: the header and every record, one per line.

use std::fmt::Write as _;
use std::io::Write;
use std::path::PathBuf;

use anyhow::Result;
use memwatch_analyzer::Symbols;
use memwatch_format::{
    Change, Checkpoint, Contents, Context, Crashed, Delta, FrameDef, Lost, Note, ObjectChange,
    ObjectVariable, Record, RegionUnwatched, RegionWatched, StackDef, StringDef, Tail, TraceReader, Waited,
    NO_SEQ,
};

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

/// Formats one record as a dump line (without the newline): its kind,
/// then its fields, each kind written by a method of its own.
pub fn format_record(rec: &Record<'_>, syms: &Symbols, max_bytes: usize, line: &mut String) {
    let mut d = DumpLine {
        line,
        kind: rec.kind_name(),
        syms,
        max_bytes,
    };
    match rec {
        Record::String(s) => d.string(s),
        Record::Frame(f) => d.frame(f),
        Record::Stack(s) => d.stack(s),
        Record::RegionWatched(r) => d.region_watched(r),
        Record::Contents(c) => d.contents(c),
        Record::RegionUnwatched(u) => d.region_unwatched(u),
        Record::Change(c) => d.change(c),
        Record::Crashed(c) => d.crashed(c),
        Record::Waited(w) => d.waited(w),
        Record::Delta(delta) => d.delta(delta),
        Record::ObjectChange(o) => d.object_change(o),
        Record::Checkpoint(c) => d.checkpoint(c),
        Record::Note(n) => d.note(n),
        Record::ObjectVariable(v) => d.object_variable(v),
        Record::Lost(l) => d.lost(l),
    }
}

/// One dump line being written: the line, the kind name it starts with,
/// and what its fields are formatted with (the names learnt so far, and
/// how many bytes of a byte string to show).
struct DumpLine<'a> {
    line: &'a mut String,
    kind: &'static str,
    syms: &'a Symbols,
    max_bytes: usize,
}

// Writing to a `String` cannot fail: the `fmt::Result`s are dropped.
impl DumpLine<'_> {
    // Interned names.

    /// `STRING id value`.
    fn string(&mut self, s: &StringDef<'_>) {
        let _ = write!(self.line, "{} id={} value={}", self.kind, s.id, word(s.value));
    }

    /// `FRAME id file function line`, the file and function by name.
    fn frame(&mut self, f: &FrameDef) {
        let _ = write!(
            self.line,
            "{} id={} file={} function={} line={}",
            self.kind,
            f.id,
            opt_word(self.syms.string(f.file)),
            opt_word(self.syms.string(f.function)),
            f.line
        );
    }

    /// `STACK id frames=[id,...]`.
    fn stack(&mut self, s: &StackDef) {
        let _ = write!(self.line, "{} id={} frames={}", self.kind, s.id, list(&s.frames));
    }

    // Regions: watched, their contents, unwatched.

    /// `WATCH`: the region, its layout and origin, then the context.
    fn region_watched(&mut self, r: &RegionWatched<'_>) {
        let _ = write!(
            self.line,
            "{} seq={} t={} region={} tag={} variable={} address={:#x} len={} dtype={} itemsize={} \
             shape={} strides={} origin={}",
            self.kind,
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
        push_context(self.line, &r.ctx, self.syms);
    }

    /// `CONTENTS`: a piece of a region's contents, its bytes in hex.
    fn contents(&mut self, c: &Contents<'_>) {
        let _ = write!(
            self.line,
            "{} region={} at_seq={} offset={} len={} data={}",
            self.kind,
            c.region,
            c.at_seq,
            c.offset,
            c.data.len(),
            hex(c.data, self.max_bytes)
        );
    }

    /// `CHECKPOINT region at_seq`.
    fn checkpoint(&mut self, c: &Checkpoint) {
        let _ = write!(self.line, "{} region={} at_seq={}", self.kind, c.region, c.at_seq);
    }

    /// `UNWATCH`: the region and why, then the context.
    fn region_unwatched(&mut self, u: &RegionUnwatched) {
        let _ = write!(
            self.line,
            "{} seq={} t={} region={} tag={} reason={}",
            self.kind,
            u.seq,
            u.ctx.time_ns,
            u.region,
            tag_of(self.syms, u.region),
            u.reason.name()
        );
        push_context(self.line, &u.ctx, self.syms);
    }

    // Changes.

    /// `CHANGE`: the region, the context, then one `range=OFFSET:OLD->NEW`
    /// per changed run.
    fn change(&mut self, c: &Change<'_>) {
        let _ = write!(
            self.line,
            "{} seq={} t={} region={} tag={}",
            self.kind,
            c.seq,
            c.ctx.time_ns,
            c.region,
            tag_of(self.syms, c.region)
        );
        push_context(self.line, &c.ctx, self.syms);
        for r in &c.ranges {
            let _ = write!(
                self.line,
                " range={}:{}->{}",
                r.offset,
                hex(r.old, self.max_bytes),
                hex(r.new, self.max_bytes)
            );
        }
    }

    /// `DELTA`: a change as stored, the region, shuffle and xor|full, the
    /// context, then one `range=OFFSET+LEN:DATA` per run.
    fn delta(&mut self, d: &Delta<'_>) {
        let _ = write!(
            self.line,
            "{} seq={} t={} region={} tag={} shuffle={} {}",
            self.kind,
            d.seq,
            d.ctx.time_ns,
            d.region,
            tag_of(self.syms, d.region),
            d.shuffle,
            if d.full { "full" } else { "xor" }
        );
        push_context(self.line, &d.ctx, self.syms);
        for r in &d.ranges {
            let _ = write!(
                self.line,
                " range={}+{}:{}",
                r.offset,
                r.data.len(),
                hex(r.data, self.max_bytes)
            );
        }
    }

    /// `OBJECT`: an object change's tag, kind, key and reprs, then the
    /// context.
    fn object_change(&mut self, o: &ObjectChange<'_>) {
        let _ = write!(
            self.line,
            "{} seq={} t={} tag={} kind={} key={} old={} new={}",
            self.kind,
            o.seq,
            o.ctx.time_ns,
            opt_word(self.syms.string(o.tag)),
            o.kind.name(),
            opt_word(o.key),
            opt_word(o.old),
            opt_word(o.new)
        );
        push_context(self.line, &o.ctx, self.syms);
    }

    /// `OBJVAR tag variable`: the variable a tag's object changes came
    /// through.
    fn object_variable(&mut self, v: &ObjectVariable<'_>) {
        let _ = write!(
            self.line,
            "{} tag={} variable={}",
            self.kind,
            opt_word(self.syms.string(v.tag)),
            opt_word(v.variable)
        );
    }

    /// `NOTE seq key value`: a fact about the event after it.
    fn note(&mut self, n: &Note) {
        let _ = write!(
            self.line,
            "{} seq={} key={} value={}",
            self.kind,
            n.seq,
            opt_word(self.syms.string(n.key)),
            opt_word(self.syms.string(n.value))
        );
    }

    // The recording itself: waits, losses, a crash.

    /// `WAITED after_seq waited_ns waits`.
    fn waited(&mut self, w: &Waited) {
        let _ = write!(
            self.line,
            "{} after_seq={} waited_ns={} waits={}",
            self.kind, w.after_seq, w.waited_ns, w.waits
        );
    }

    /// `LOST after_seq events reason`.
    fn lost(&mut self, l: &Lost<'_>) {
        let _ = write!(
            self.line,
            "{} after_seq={} events={} reason={}",
            self.kind,
            l.after_seq,
            l.events,
            word(l.reason)
        );
    }

    /// `CRASHED`: the fatal signal, where and when the program died, and
    /// how much its last look found.
    fn crashed(&mut self, c: &Crashed<'_>) {
        let _ = write!(
            self.line,
            "{} signal={} si_code={} thread={} time_ns={} file={:?} line={} changes={} flags={} finished={}",
            self.kind,
            c.signal,
            c.si_code,
            c.thread,
            c.time_ns,
            c.file,
            c.line,
            c.changes,
            c.flags,
            c.finished
        );
    }
}
