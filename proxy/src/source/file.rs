//! The file source: a YAML file, or a directory of them, holding Service,
//! EndpointSlice and optional Node objects (multi-document). Polled: each
//! poll compares the files' names, sizes and modification times, reads them
//! only when one changed, and parses and sends a new snapshot only when the
//! content changed. Unreadable documents are logged with file and position
//! and skipped.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::Duration;

use super::SourceEvent;
use crate::objects::{parse_documents, Object};

pub const NAME: &str = "file";

/// The files to read: `path` itself, or the *.yaml / *.yml / *.json files of
/// the directory, sorted.
pub fn files(path: &Path) -> std::io::Result<Vec<PathBuf>> {
    if path.is_dir() {
        let mut v: Vec<PathBuf> = std::fs::read_dir(path)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.is_file()
                    && matches!(
                        p.extension().and_then(|e| e.to_str()),
                        Some("yaml" | "yml" | "json")
                    )
            })
            .collect();
        v.sort();
        Ok(v)
    } else {
        std::fs::metadata(path)?;
        Ok(vec![path.to_path_buf()])
    }
}

/// Name, size and modification time of every file: what a poll compares
/// before reading anything.
type Stamps = Vec<(PathBuf, u64, Option<std::time::SystemTime>)>;

fn stamps(path: &Path) -> std::io::Result<Stamps> {
    Ok(files(path)?
        .into_iter()
        .map(|f| {
            let meta = std::fs::metadata(&f).ok();
            let len = meta.as_ref().map_or(0, std::fs::Metadata::len);
            let mtime = meta.and_then(|m| m.modified().ok());
            (f, len, mtime)
        })
        .collect())
}

/// The text of every file.
fn read_files(path: &Path) -> std::io::Result<Vec<(PathBuf, String)>> {
    let mut contents = Vec::new();
    for f in files(path)? {
        match std::fs::read_to_string(&f) {
            Ok(text) => contents.push((f, text)),
            Err(e) => tracing::warn!(file = %f.display(), error = %e, "cannot read file"),
        }
    }
    Ok(contents)
}

/// Reads every file into one snapshot. Returns the contents read (to detect
/// changes) and the event.
pub fn read_snapshot(path: &Path) -> std::io::Result<(Vec<(PathBuf, String)>, SourceEvent)> {
    let contents = read_files(path)?;
    let event = snapshot(&contents);
    Ok((contents, event))
}

fn snapshot(contents: &[(PathBuf, String)]) -> SourceEvent {
    let (mut services, mut slices, mut nodes) = (Vec::new(), Vec::new(), Vec::new());
    for (f, text) in contents {
        let (objects, errors) = parse_documents(text, &f.display().to_string());
        for e in errors {
            tracing::warn!(error = %e, "skipping document");
        }
        for o in objects {
            match o {
                Object::Service(s) => services.push(*s),
                Object::EndpointSlice(s) => slices.push(*s),
                Object::Node(n) => nodes.push(*n),
            }
        }
    }
    SourceEvent::Snapshot {
        source: NAME,
        services,
        slices,
        nodes,
    }
}

/// Polls `path` every `interval` until `stop` is set or the receiver is
/// gone, sending a snapshot at start and after every change.
pub fn spawn(
    path: PathBuf,
    interval: Duration,
    tx: Sender<SourceEvent>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut last: Option<Vec<(PathBuf, String)>> = None;
        let mut last_stamps: Option<Stamps> = None;
        while !stop.load(Ordering::Relaxed) {
            let polled = stamps(&path).and_then(|st| {
                if last_stamps.as_ref() == Some(&st) {
                    return Ok(None);
                }
                last_stamps = Some(st);
                read_files(&path).map(Some)
            });
            match polled {
                // Nothing touched since the last poll.
                Ok(None) => {}
                Ok(Some(contents)) => {
                    if last.as_ref() != Some(&contents) {
                        let event = snapshot(&contents);
                        last = Some(contents);
                        if tx.send(event).is_err() {
                            return;
                        }
                    }
                }
                Err(e) => {
                    last_stamps = None;
                    tracing::warn!(path = %path.display(), error = %e, "cannot read source");
                }
            }
            std::thread::sleep(interval);
        }
    })
}
