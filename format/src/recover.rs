//! Recovery after the writer is gone: [`fold`] moves what a dead writer
//! left in a trace's journal into the trace itself, so that the trace holds
//! everything on its own.
//!
//! It is above the reader, the journal and the crash file, which it reads
//! and removes; nothing in this crate calls it (`memwatch record` does,
//! after the program ended). No locks, no signal-context code.

use std::path::Path;

use crate::journal::{journal_path, read};

/// Moves what a dead writer left in the journal of the trace at `trace`
/// into the trace itself, as its last chunk (replacing a partial chunk the
/// writer was cut off in), then removes the journal: the trace holds
/// everything on its own and can be copied alone. Returns how many records
/// moved (`None`: none; a note that recording stopped may still have moved,
/// as a `Lost` record). A journal whose records
/// already reached the trace is removed too. A closed trace is left as it
/// is.
///
/// Only for a trace whose writer is gone (`memwatch record` calls it after
/// the program ended): a live writer would go on writing after the chunk.
pub fn fold(trace: &Path) -> crate::Result<Option<u32>> {
    let reader = crate::TraceReader::open(trace)?;
    if reader.tail() == crate::Tail::Closed {
        return Ok(None);
    }
    let jpath = journal_path(trace);
    let io = |path: &Path, source| crate::Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let cpath = crate::crash::crash_path(trace);
    let header_crc = crc32fast::hash(&reader.bytes()[..reader.header().len as usize]);
    let crash_ours = crate::crash::belongs(&cpath, header_crc);
    if !reader.last_chunk_from_journal() {
        if read(&jpath, header_crc).is_some() {
            std::fs::remove_file(&jpath).map_err(|e| io(&jpath, e))?;
        }
        if crash_ours {
            std::fs::remove_file(&cpath).map_err(|e| io(&cpath, e))?;
        }
        return Ok(None);
    }
    let n = reader.recovered().map_or(0, |(n, _)| n);
    let last = *reader.chunks().last().expect("a recovered chunk");
    let chunk = &reader.bytes()[last.offset as usize..(last.offset + last.header.total_len()) as usize];
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .open(trace)
        .map_err(|e| io(trace, e))?;
    use std::io::{Seek, SeekFrom, Write};
    file.set_len(last.offset)
        .and_then(|()| file.seek(SeekFrom::Start(last.offset)))
        .and_then(|_| file.write_all(chunk))
        .and_then(|()| file.sync_data())
        .map_err(|e| io(trace, e))?;
    if jpath.exists() {
        std::fs::remove_file(&jpath).map_err(|e| io(&jpath, e))?;
    }
    if crash_ours {
        std::fs::remove_file(&cpath).map_err(|e| io(&cpath, e))?;
    }
    Ok((n > 0).then_some(n))
}
