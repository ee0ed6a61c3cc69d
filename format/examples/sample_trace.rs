//! Writes the synthetic sample trace (see `memwatch_format::sample`).
//!
//! `cargo run -p memwatch-format --example sample_trace -- OUT.mwt [--chunk-bytes N]`
//!
//! Regenerates the golden file of the current version with
//! `cargo run -p memwatch-format --example sample_trace -- format/tests/data/v4-sample.mwt --chunk-bytes 256`.

use std::process::ExitCode;

use memwatch_format::{sample, TraceWriter, WriterOptions};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut opts = WriterOptions::default();
    let mut out = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--chunk-bytes" => match it.next().and_then(|n| n.parse().ok()) {
                Some(n) => opts.chunk_bytes = n,
                None => {
                    eprintln!("sample_trace: --chunk-bytes needs a number");
                    return ExitCode::from(2);
                }
            },
            _ if out.is_none() => out = Some(a.clone()),
            _ => {
                eprintln!("sample_trace: unexpected argument {a:?}");
                return ExitCode::from(2);
            }
        }
    }
    let Some(out) = out else {
        eprintln!("usage: sample_trace OUT.mwt [--chunk-bytes N]");
        return ExitCode::from(2);
    };
    let run = || -> memwatch_format::Result<()> {
        let mut w = TraceWriter::create(&out, &sample::sample_meta(), opts)?;
        let seq = sample::write_sample(&mut w)?;
        let seq = sample::write_v2_additions(&mut w, seq)?;
        let seq = sample::write_v3_additions(&mut w, seq)?;
        sample::write_v4_additions(&mut w, seq)?;
        let (_, stats) = w.finish(50_000)?;
        println!(
            "wrote {out}: {} records in {} chunks, {} bytes",
            stats.records, stats.chunks, stats.file_bytes
        );
        Ok(())
    };
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sample_trace: {e}");
            ExitCode::FAILURE
        }
    }
}
