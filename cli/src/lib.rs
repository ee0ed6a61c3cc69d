//! The `memwatch` command line.
//!
//! One module per subcommand, each with its clap `Args` and a
//! `run(args, out) -> anyhow::Result<u8>` (the exit status). [`run()`] parses, dispatches
//! and turns errors into messages and exit codes; it is the whole of
//! `main`, and the Python package calls it too (`memwatch` installed by pip
//! is a console script that calls this through the extension module), so
//! one `pip install` gives both the library and the command.
//!
//! Exit codes: 0 success (also when stdout is closed early, as by `head`),
//! 1 an error (the message names the file and what to do), 2 a usage error.
//!
//! ```
//! let code = memwatch_cli::run(["memwatch", "dump", "/nonexistent.mwt"]);
//! assert_eq!(code, 1);
//! ```

use std::ffi::OsString;
use std::io::{self, Write};

use clap::{Parser, Subcommand};

pub mod blame;
pub mod dump;
pub mod export;
pub mod perfetto;
pub mod query;
pub mod record;
pub mod report;
pub mod run;
pub mod state;
pub mod summary;
mod text;

pub use text::{element as element_text, parse_point, Point};

/// `memwatch`: record and replay memory changes in Python programs.
#[derive(Debug, Parser)]
#[command(name = "memwatch", version, about, long_about = None, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a program and record every change to the memory it watches.
    Record(record::Args),
    /// List the changes of a trace, filtered.
    Query(query::Args),
    /// Print a region's exact contents after a given seq.
    State(state::Args),
    /// Show the last change that wrote a byte or element.
    Blame(blame::Args),
    /// Summarize a trace: the run, how it ended, each tag, anything suspicious.
    Summary(summary::Args),
    /// Write a self-contained HTML report of a trace: timelines, lines, heatmaps, values, anything suspicious.
    Report(report::Args),
    /// Export the changes of a trace as a Parquet, CSV or JSON-lines table, or a Perfetto timeline.
    Export(export::Args),
    /// Print a trace's header and every record, one per line.
    Dump(dump::Args),
}

/// Exit status for an error the user can act on.
pub const EXIT_ERROR: u8 = 1;
/// Exit status for a command line clap rejected.
pub const EXIT_USAGE: u8 = 2;

/// Runs the command line `args` (the first item is the program name) and
/// returns the exit status.
pub fn run<I, T>(args: I) -> u8
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { EXIT_USAGE } else { 0 };
        }
    };
    let stdout = io::stdout();
    let mut out = io::BufWriter::new(stdout.lock());
    let result = match cli.command {
        Command::Record(args) => {
            drop(out);
            let mut so = io::stdout();
            return match record::run(&args, &mut so) {
                Ok(code) => code,
                Err(e) => {
                    eprintln!("memwatch: error: {}", message(&e));
                    EXIT_ERROR
                }
            };
        }
        Command::Query(args) => query::run(&args, &mut out),
        Command::State(args) => state::run(&args, &mut out),
        Command::Blame(args) => blame::run(&args, &mut out),
        Command::Summary(args) => summary::run(&args, &mut out),
        Command::Report(args) => report::run(&args, &mut out),
        Command::Export(args) => export::run(&args, &mut out),
        Command::Dump(args) => dump::run(&args, &mut out),
    };
    let result = result.and_then(|code| out.flush().map(|()| code).map_err(Into::into));
    match result {
        Ok(code) => code,
        Err(e) if is_broken_pipe(&e) => 0,
        Err(e) => {
            drop(out);
            eprintln!("memwatch: error: {}", message(&e));
            EXIT_ERROR
        }
    }
}

/// The error and its causes, each cause once (our errors often include
/// their cause's text already).
pub fn message(e: &anyhow::Error) -> String {
    let mut msg = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !msg.contains(&text) {
            if !msg.is_empty() {
                msg.push_str(": ");
            }
            msg.push_str(&text);
        }
    }
    msg
}

/// True when the error chain ends in a closed stdout (`memwatch dump | head`).
fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<io::Error>()
            .is_some_and(|io| io.kind() == io::ErrorKind::BrokenPipe)
    })
}
