//! `memwatch record`: run a program with recording on.

use std::ffi::OsString;
use std::io::Write;
use std::ops::ControlFlow;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use memwatch_analyzer::{for_each_change, Filter};
use memwatch_format::TraceReader;

const AFTER_HELP: &str = "\
Runs COMMAND with recording on: every change to a buffer the program
watches (memwatch.watch) goes to the trace, from the first watch until the
program ends. The program needs no other change. Every Python process of
the program records, to a trace of its own beside it: processes forked
(os.fork, multiprocessing's fork and forkserver), spawned (multiprocessing
spawn, subprocess) or launched (torchrun) write OUTPUT-STEM.PID.mwt
(OUTPUT-STEM.rankR.PID.mwt with $RANK), and `memwatch query` and the other
commands read the whole run from the first trace (--pid picks processes).

--live prints each change to stderr as it happens too: a [MEMWATCH]
report, or with --live=short one line, like
  memwatch: #12 w [3] 0.5 -> 0.25 (+15 more) train.py:12 in step [worker]
(seq, tag, first changed element, old -> new, how many more, line, thread
when not the main one).

--vars PATTERN watches every rebinding of matching variable names in
in-scope code from the program's first line (memwatch.watch_var), with no
change to the program at all.

--torch-inplace turns memwatch.explain_inplace() on in the program as soon
as it imports torch (a program that never does is not affected): when
autograd raises \"one of the variables needed for gradient computation has
been modified by an inplace operation\", the error gets a note naming the
line and the aten op that modified the tensor, and where it was saved.
No tensor needs to be watched.

The exit status is COMMAND's; a program killed by a signal is reported and
memwatch exits with 128 + the signal number. A program that crashes or is
killed still leaves a readable trace of everything recorded before.

Examples:
  memwatch record python train.py
  memwatch record -o run.mwt --exclude tests/ -- python -m mypkg.train --epochs 2
  memwatch record --mode store python counter.py
  memwatch record --vars lr --vars 'loss_*' python train.py
  memwatch record --torch-inplace python train.py";

/// Granularity of recorded changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// One change per executed line per watched region.
    Line,
    /// One change per store instruction, for watches that do not choose
    /// a mode themselves (memwatch.watch(..., mode=...)).
    Store,
}

/// How `--live` prints each change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Live {
    /// The `[MEMWATCH]` report: tag, address, old and new bytes and
    /// elements, variable, line.
    Full,
    /// One line: `memwatch: #12 w [3] 0.5 -> 0.25 (+15 more) train.py:12 in step`.
    Short,
}

/// Run a program and record every change to the memory it watches.
#[derive(Debug, clap::Args)]
#[command(after_help = AFTER_HELP)]
pub struct Args {
    /// Where to write the trace (default: `<script stem>.mwt` here).
    #[arg(short = 'o', long)]
    pub output: Option<PathBuf>,
    /// Only this code is in scope (a path, directory or glob; repeatable).
    #[arg(long)]
    pub include: Vec<String>,
    /// Take this code out of scope (a path, directory or glob; repeatable).
    #[arg(long)]
    pub exclude: Vec<String>,
    /// The mode of every watch that does not pass mode= itself.
    #[arg(long, value_enum, default_value_t = Mode::Line)]
    pub mode: Mode,
    /// Also print each change while recording: `--live` a `[MEMWATCH]`
    /// report, `--live=short` one line (seq, tag, first element's old ->
    /// new, line, thread).
    #[arg(long, value_enum, value_name = "STYLE", num_args = 0..=1, require_equals = true,
          default_missing_value = "full")]
    pub live: Option<Live>,
    /// zstd level of the trace's chunks: negative levels (down to -7) are
    /// faster and larger, 19 smallest and slowest; 0 stores them as they
    /// are. Compression runs off the program's threads; while it falls
    /// behind, chunks are compressed at level -50 (faster, larger), and a
    /// program that changes memory faster than even that waits for it.
    #[arg(long, value_name = "LEVEL", default_value_t = memwatch_format::DEFAULT_LEVEL,
          allow_negative_numbers = true, value_parser = clap::value_parser!(i32).range(-7..=19))]
    pub compression: i32,
    /// Watch every rebinding of variables with this name or glob from the
    /// program's start (memwatch.watch_var; repeatable).
    #[arg(long = "vars", value_name = "PATTERN")]
    pub vars: Vec<String>,
    /// Explain autograd's "modified by an inplace operation" errors: turn
    /// memwatch.explain_inplace() on once the program imports torch.
    #[arg(long)]
    pub torch_inplace: bool,
    /// The program and its arguments.
    #[arg(
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "COMMAND"
    )]
    pub command: Vec<OsString>,
}

/// The trace name for a command line: the script's stem, the module's last
/// component, or the program's name.
pub fn default_output(command: &[OsString]) -> PathBuf {
    let args: Vec<String> = command.iter().map(|a| a.to_string_lossy().into_owned()).collect();
    let mut stem = None;
    let mut i = 1;
    while i < args.len() {
        let a = &args[i];
        if a == "-m" {
            stem = args
                .get(i + 1)
                .map(|m| m.rsplit('.').next().unwrap_or(m).to_string());
            break;
        }
        if a.ends_with(".py") {
            stem = Path::new(a).file_stem().map(|s| s.to_string_lossy().into_owned());
            break;
        }
        if !a.starts_with('-') {
            break;
        }
        i += 1;
    }
    let stem = stem.unwrap_or_else(|| {
        args.first()
            .map(|p| {
                Path::new(p)
                    .file_name()
                    .map(|f| f.to_string_lossy().into_owned())
                    .unwrap_or_default()
            })
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "memwatch".into())
    });
    PathBuf::from(format!("{stem}.mwt"))
}

static PENDING: AtomicI32 = AtomicI32::new(0);

// Runs in signal context: one atomic store, nothing else.
extern "C" fn remember_signal(sig: libc::c_int) {
    PENDING.store(sig, Ordering::SeqCst);
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGINT => "SIGINT",
        libc::SIGTERM => "SIGTERM",
        libc::SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGHUP => "SIGHUP",
        libc::SIGQUIT => "SIGQUIT",
        _ => "signal",
    }
}

/// Runs the program with recording on, then prints the summary; the exit
/// status is the program's.
pub fn run(args: &Args, out: &mut dyn Write) -> Result<u8> {
    let boot = boot_dir(args)?;
    let output = prepare_output(args)?;
    let run_id = format!("{}-{}", std::process::id(), unix_ns());
    let cmd = program_command(args, &output, &run_id, boot);
    let mut child = start(cmd, &args.command[0], &output)?;
    let pid = child.id();
    let status = wait_forwarding_signals(&mut child)?;
    let code = exit_code(status);
    report(&output, &run_id, pid, &args.command, args.torch_inplace, out)?;
    Ok(code)
}

/// The trace's absolute path, once the program is known to exist and the
/// trace is created (empty, so that a path it cannot be written to fails
/// now, before the program runs) and the traces an earlier run to the same
/// path left beside it are gone.
fn prepare_output(args: &Args) -> Result<PathBuf> {
    let output = args
        .output
        .clone()
        .unwrap_or_else(|| default_output(&args.command));
    let output =
        std::path::absolute(&output).with_context(|| format!("bad output path {}", output.display()))?;
    check_command(&args.command)?;
    // Find out now, before the program runs, whether the trace can be written.
    memwatch_format::create_private(&output).with_context(|| {
        format!(
            "cannot write the trace to {}; pass -o with a writable path",
            output.display()
        )
    })?;
    // Traces an earlier run to the same path left beside it are not this
    // run's: they go, as the root trace's old contents did.
    for m in memwatch_format::run::scan(&output, None) {
        remove_trace(&m.path);
    }
    Ok(output)
}

/// What --vars and --torch-inplace need, checked before anything is
/// written (an earlier run's trace at the output path stays when they are
/// wrong): each --vars one name or glob, and memwatch's boot directory
/// (`None` when neither option is given).
fn boot_dir(args: &Args) -> Result<Option<std::ffi::OsString>> {
    if let Some(bad) = args.vars.iter().find(|v| v.is_empty() || v.contains(',')) {
        anyhow::bail!("--vars {bad:?}: give one name or glob per --vars");
    }
    if args.vars.is_empty() && !args.torch_inplace {
        return Ok(None);
    }
    let flag = if args.vars.is_empty() {
        "--torch-inplace"
    } else {
        "--vars"
    };
    std::env::var_os("MEMWATCH_BOOT_DIR").map(Some).with_context(|| {
        format!("{flag} needs memwatch's Python package: run the `memwatch` that pip installed")
    })
}

/// The program's command line, with the environment that tells the
/// recorder in it what to record, where, and as part of which run
/// (`run_id`); with `boot` (for --vars and --torch-inplace), memwatch's
/// boot directory first on PYTHONPATH.
fn program_command(args: &Args, output: &Path, run_id: &str, boot: Option<std::ffi::OsString>) -> Command {
    let sep = ":";
    let mut cmd = Command::new(&args.command[0]);
    cmd.args(&args.command[1..])
        .env("MEMWATCH_TRACE", output)
        .env("MEMWATCH_TRACE_PARENT", std::process::id().to_string())
        .env("MEMWATCH_RUN", run_id)
        .env(
            "MEMWATCH_LIVE",
            match args.live {
                None => "0",
                Some(Live::Full) => "1",
                Some(Live::Short) => "short",
            },
        )
        .env("MEMWATCH_COMPRESSION", args.compression.to_string())
        .env(
            "MEMWATCH_MODE",
            match args.mode {
                Mode::Line => "line",
                Mode::Store => "store",
            },
        );
    if !args.include.is_empty() {
        cmd.env("MEMWATCH_INCLUDE", args.include.join(sep));
    }
    if !args.exclude.is_empty() {
        cmd.env("MEMWATCH_EXCLUDE", args.exclude.join(sep));
    }
    if !args.vars.is_empty() {
        cmd.env("MEMWATCH_VARS", args.vars.join(","));
    }
    if args.torch_inplace {
        cmd.env("MEMWATCH_TORCH_INPLACE", "1");
    }
    if let Some(boot) = boot {
        // A sitecustomize in memwatch's package starts the watches (and
        // the import hook of --torch-inplace) before the program's first
        // line, then runs the one it shadows.
        let mut path = boot;
        if let Some(old) = std::env::var_os("PYTHONPATH").filter(|p| !p.is_empty()) {
            path.push(":");
            path.push(old);
        }
        cmd.env("PYTHONPATH", path);
    }
    cmd
}

/// Starts the program (`program`, for the error); a program that cannot
/// start leaves no trace: the empty one at `output` goes.
fn start(mut cmd: Command, program: &OsString, output: &Path) -> Result<Child> {
    match cmd.spawn() {
        Ok(c) => Ok(c),
        Err(e) => {
            let _ = std::fs::remove_file(output);
            Err(e).with_context(|| format!("cannot start {}", program.to_string_lossy()))
        }
    }
}

/// Waits for the program to end, forwarding to it the signals someone
/// sends us meanwhile.
fn wait_forwarding_signals(child: &mut Child) -> Result<ExitStatus> {
    let pid = child.id() as libc::pid_t;
    // Forward the signals someone sends us; a terminal's Ctrl-C already
    // reaches the child (same process group), so that one is not resent.
    let handler = remember_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
    for sig in [
        libc::SIGINT,
        libc::SIGTERM,
        libc::SIGHUP,
        libc::SIGQUIT,
        libc::SIGUSR1,
        libc::SIGUSR2,
    ] {
        // SAFETY: installing a handler that only stores to an atomic.
        unsafe { libc::signal(sig, handler) };
    }
    loop {
        if let Some(st) = child.try_wait()? {
            return Ok(st);
        }
        let sig = PENDING.swap(0, Ordering::SeqCst);
        if sig != 0 {
            // SAFETY: plain syscalls.
            let from_terminal = sig == libc::SIGINT && unsafe { libc::tcgetpgrp(0) == libc::getpgrp() };
            if !from_terminal {
                // SAFETY: signalling our own child.
                unsafe { libc::kill(pid, sig) };
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// memwatch's exit status for the program's: the same, or 128 + the
/// signal that killed it (which is reported).
fn exit_code(status: ExitStatus) -> u8 {
    match (status.code(), status.signal()) {
        (Some(c), _) => c.clamp(0, 255) as u8,
        (None, Some(sig)) => {
            eprintln!(
                "memwatch: the program was killed by signal {sig} ({})",
                signal_name(sig)
            );
            (128 + sig).clamp(0, 255) as u8
        }
        _ => 1,
    }
}

/// Refuses, before anything is created, a program that does not exist, and
/// a Python script that does not (`python missing.py` would fail at once
/// and leave nothing to record).
fn check_command(command: &[std::ffi::OsString]) -> Result<()> {
    let program = Path::new(&command[0]);
    let found = if program.components().count() > 1 {
        program.is_file().then(|| program.to_path_buf())
    } else {
        std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join(program))
                .find(|p| p.is_file())
        })
    };
    let Some(found) = found else {
        anyhow::bail!(
            "cannot start {}: no such program{}; nothing was recorded",
            program.display(),
            if program.components().count() > 1 {
                ""
            } else {
                " on PATH"
            }
        );
    };
    let is_python = found
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with("python"));
    if let (true, Some(script)) = (is_python, command.get(1)) {
        let script = Path::new(script);
        let is_option = script.to_str().is_some_and(|s| s.starts_with('-'));
        if !is_option && !script.exists() {
            anyhow::bail!(
                "no such script: {} (python could not open it); nothing was recorded",
                script.display()
            );
        }
    }
    Ok(())
}

fn unix_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Removes a trace and the journal and crash area beside it.
fn remove_trace(path: &Path) {
    let _ = std::fs::remove_file(path);
    let _ = std::fs::remove_file(memwatch_format::journal_path(path));
    let mut crash = path.as_os_str().to_owned();
    crash.push(".crash");
    let _ = std::fs::remove_file(crash);
}

/// What one trace of the run holds, for the summary.
struct Counted {
    changes: u64,
    bytes: u64,
    tags: usize,
    size: u64,
    note: Option<String>,
    folded: Option<u32>,
}

/// Folds the journal of the trace at `path` into it and counts its changes.
fn count(path: &Path) -> std::result::Result<Counted, String> {
    let size = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    // Records the program wrote but that had not reached the trace when it
    // ended (killed, crashed) wait in its journal: move them in, so that
    // the trace holds everything on its own.
    let folded = match memwatch_format::recover::fold(path) {
        Ok(n) => n,
        Err(e) => {
            eprintln!(
                "memwatch: the journal of {} could not be moved into it: {e}",
                path.display()
            );
            None
        }
    };
    let reader = TraceReader::open(path).map_err(|e| e.to_string())?;
    let (mut changes, mut bytes) = (0u64, 0u64);
    let mut tags = std::collections::BTreeSet::new();
    let counted = for_each_change(&reader, &Filter::default(), |row| {
        changes += 1;
        bytes += row.bytes_changed();
        tags.insert(row.tag.to_string());
        ControlFlow::Continue(())
    });
    let tags = counted.map(|s| s.tags().len()).unwrap_or(tags.len());
    Ok(Counted {
        changes,
        bytes,
        tags,
        size: std::fs::metadata(path).map(|m| m.len()).unwrap_or(size),
        note: reader.tail_message(),
        folded,
    })
}

fn plural(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// Writes a root trace with no records for a run whose first process
/// watched nothing while others did, so that the run is read from it as
/// from any root.
fn write_empty_root(output: &Path, run_id: &str, pid: u32, command: &[OsString]) -> Result<()> {
    let meta = memwatch_format::Meta {
        pid,
        argv: command.iter().map(|a| a.to_string_lossy().into_owned()).collect(),
        platform: format!("{}-{}", std::env::consts::OS, std::env::consts::ARCH),
        // SAFETY: a plain query.
        page_size: unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u32,
        start_time_ns: unix_ns(),
        writer: format!("memwatch {}", env!("CARGO_PKG_VERSION")),
        properties: vec![
            (memwatch_format::run::PROP_RUN.into(), run_id.into()),
            ("watched".into(), "nothing".into()),
        ],
        ..memwatch_format::Meta::default()
    };
    let w = memwatch_format::TraceWriter::new(
        Vec::new(),
        output,
        &meta,
        memwatch_format::WriterOptions::default(),
    )?;
    let (bytes, _) = w.finish(0)?;
    std::fs::write(output, bytes).with_context(|| format!("cannot write {}", output.display()))
}

/// The summary printed after the program ends: a line for the trace, and
/// one for each other process of the run that recorded.
fn report(
    output: &Path,
    run_id: &str,
    pid: u32,
    command: &[OsString],
    torch_inplace: bool,
    _out: &mut dyn Write,
) -> Result<()> {
    let members = memwatch_format::run::scan(output, Some(run_id));
    let size = std::fs::metadata(output).map(|m| m.len()).unwrap_or(0);
    if size == 0 {
        if members.is_empty() {
            let _ = std::fs::remove_file(output);
            if torch_inplace {
                // The run was for --torch-inplace, which needs no watch: not a mistake.
                eprintln!(
                    "memwatch: no trace written: the program watched nothing (--torch-inplace needs no watch)"
                );
            } else {
                eprintln!("memwatch: nothing recorded: the program never called memwatch.watch()");
            }
            return Ok(());
        }
        if let Err(e) = write_empty_root(output, run_id, pid, command) {
            eprintln!("memwatch: {e:#}");
        }
    }
    let say = |label: &str, path: &Path, c: &Counted| {
        eprintln!(
            "memwatch: {label}{} to {} ({}) in {} ({} bytes)",
            plural(c.changes, "change", "changes"),
            plural(c.tags as u64, "tag", "tags"),
            plural(c.bytes, "byte changed", "bytes changed"),
            path.display(),
            c.size
        );
        if let Some(msg) = &c.note {
            eprintln!("memwatch: note: {msg}");
        }
        if let Some(n) = c.folded {
            eprintln!(
                "memwatch: note: the last {n} record{} had not reached the trace when the program ended; \
                 they were recovered from its journal",
                if n == 1 { "" } else { "s" }
            );
        }
    };
    let mut total = (0u64, 0u64);
    for m in &members {
        match count(&m.path) {
            Ok(c) => {
                let who = match m.rank {
                    Some(r) => format!("process {} (rank {r}) recorded ", m.pid),
                    None => format!("process {} recorded ", m.pid),
                };
                say(&who, &m.path, &c);
                total.0 += c.changes;
                total.1 += 1;
            }
            Err(e) => eprintln!("memwatch: the trace of process {} cannot be read: {e}", m.pid),
        }
    }
    match count(output) {
        Ok(c) => {
            let label = if members.is_empty() {
                "recorded ".to_string()
            } else {
                format!(
                    "{} of the run recorded {} in all; the first recorded ",
                    plural(members.len() as u64 + 1, "process", "processes"),
                    plural(total.0 + c.changes, "change", "changes"),
                )
            };
            say(&label, output, &c);
        }
        Err(e) => eprintln!("memwatch: the trace cannot be read: {e}"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::Live;
    use crate::{Cli, Command};
    use clap::Parser;

    fn record(args: &[&str]) -> Result<super::Args, clap::Error> {
        let argv = ["memwatch", "record"].iter().chain(args);
        match Cli::try_parse_from(argv)?.command {
            Command::Record(a) => Ok(a),
            other => unreachable!("parsed as {other:?}"),
        }
    }

    #[test]
    fn live_takes_an_optional_style_after_an_equals_sign() {
        let a = record(&["python", "x.py"]).unwrap();
        assert_eq!(a.live, None);
        let a = record(&["--live", "python", "x.py"]).unwrap();
        assert_eq!(a.live, Some(Live::Full));
        assert_eq!(a.command, ["python", "x.py"]);
        assert_eq!(
            record(&["--live=short", "python", "x.py"]).unwrap().live,
            Some(Live::Short)
        );
        assert_eq!(
            record(&["--live=full", "python", "x.py"]).unwrap().live,
            Some(Live::Full)
        );
        let e = record(&["--live=loud", "python", "x.py"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("loud") && e.contains("short"), "{e}");
    }
}
