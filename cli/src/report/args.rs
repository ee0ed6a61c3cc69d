//! The command line of `memwatch report`: its [`Args`], its long help, and
//! the `--element TAG:INDEX` it parses ([`ElementSpec`]).

use std::path::PathBuf;

const AFTER_HELP: &str = "\
Writes one HTML file that opens in any browser, offline (its scripts and
styles are inline; it loads nothing): the run and how it ended, each tag's
changes over time and seq, the lines that changed what (how often, how many
bytes), a heatmap of the elements of each 1-D and 2-D region (how often
each changed and by how much; more dimensions are shown as rows of the
last one), the values of a few elements over the run, and anything
suspicious (NaN or Inf written, a thread or line writing a tag it had not
written before, a crash, lost events).

The elements followed are the ones given with --element (repeatable),
else the busiest element of each of the busiest tags. A large trace is
summarized: buckets, cells and samples of bounded size, so the page stays
under a few MB; the page says what it sampled.

A run of several processes (fork, multiprocessing, subprocess, torchrun:
run.PID.mwt or run.rankR.PID.mwt beside run.mwt) is reported whole from
its first trace: its processes (pid, rank, parent, trace, how each ended),
timelines on the run's clock, each tag per process (`w (pid 4243)`: a
fork's child keeps its parent's watches under the same tags), and the
process of each line and suspicious event. --pid keeps some processes;
--element TAG:INDEX follows the element in each process with that tag.

Examples:
  memwatch report run.mwt                      # writes run.html
  memwatch report run.mwt -o report.html
  memwatch report run.mwt --element layer1_weight:0,0 --element bias:3
  memwatch report run.mwt --pid 4243           # one process of a run";

/// An element to follow through the run: `TAG:INDEX`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ElementSpec {
    pub tag: String,
    /// One number per dimension, or one flat (C-order) index.
    pub index: Vec<u64>,
}

/// Parses `--element TAG:INDEX`: the index is one number per dimension,
/// comma-separated (`w:3,1`, `w:[3, 1]`), or one flat index (`w:7`). The
/// tag is everything before the last `:`.
///
/// ```
/// use memwatch_cli::report::{parse_element, ElementSpec};
/// assert_eq!(parse_element("w:3,1"), Ok(ElementSpec { tag: "w".into(), index: vec![3, 1] }));
/// assert!(parse_element("w").unwrap_err().contains("TAG:INDEX"));
/// ```
pub fn parse_element(s: &str) -> Result<ElementSpec, String> {
    let Some((tag, index)) = s.rsplit_once(':') else {
        return Err(format!(
            "{s:?} names no element: give TAG:INDEX, like layer1_weight:0,0 (one number per \
             dimension) or bias:3"
        ));
    };
    if tag.is_empty() {
        return Err(format!(
            "{s:?} has no tag before the ':' (TAG:INDEX, like bias:3)"
        ));
    }
    let inner = index.trim().trim_start_matches('[').trim_end_matches(']');
    let index: Result<Vec<u64>, _> = inner.split(',').map(|p| p.trim().parse::<u64>()).collect();
    match index {
        Ok(index) if !index.is_empty() => Ok(ElementSpec {
            tag: tag.to_string(),
            index,
        }),
        _ => Err(format!(
            "{s:?}: the index after the ':' must be whole numbers separated by commas, like \
             {tag}:0,0 or {tag}:3"
        )),
    }
}

/// Write a self-contained HTML report of a trace.
#[derive(Debug, clap::Args)]
#[command(after_help = AFTER_HELP)]
pub struct Args {
    /// The trace file (.mwt).
    pub trace: PathBuf,
    /// The HTML file to write (default: the trace's name with .html; `-`: stdout).
    #[arg(short = 'o', long)]
    pub output: Option<PathBuf>,
    /// An element whose values to plot over the run, TAG:INDEX (repeatable).
    #[arg(long = "element", value_name = "TAG:INDEX", value_parser = parse_element)]
    pub elements: Vec<ElementSpec>,
    /// Only these processes of the run (pids; repeatable, or
    /// comma-separated). Without it, every process of the run.
    #[arg(long, value_delimiter = ',')]
    pub pid: Vec<u32>,
}
