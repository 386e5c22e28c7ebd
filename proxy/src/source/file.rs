//! The file source: a YAML file, or a directory of them, holding Service,
//! EndpointSlice and optional Node objects (multi-document). Polled: each
//! poll compares the files' names, sizes and modification times, reads them
//! only when one changed, and parses and sends a new snapshot only when the
//! content changed. Documents Ferry cannot use are logged with file and
//! position and skipped; a file with a document that is not YAML at all (a
//! torn or garbled write) is set aside whole, its last good version kept.

use std::collections::BTreeMap;
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
    let event = snapshot(&contents, &mut LastGood::new());
    Ok((contents, event))
}

/// The objects of each file's last version without a syntax error.
type LastGood = BTreeMap<PathBuf, Vec<Object>>;

/// The objects of `text` (file `f`): parsed, or the file's last good ones
/// when a document of it is not YAML.
fn objects_of(f: &Path, text: &str, last_good: &mut LastGood) -> Vec<Object> {
    let (objects, errors) = parse_documents(text, &f.display().to_string());
    let torn = errors.iter().any(|e| e.syntax);
    for e in errors {
        tracing::warn!(error = %e, "skipping document");
    }
    if torn {
        let kept = last_good.get(f).cloned().unwrap_or_default();
        tracing::warn!(
            file = %f.display(),
            kept = kept.len(),
            "a document is not YAML: the file's last good version stays in force"
        );
        return kept;
    }
    last_good.insert(f.to_path_buf(), objects.clone());
    objects
}

fn snapshot(contents: &[(PathBuf, String)], last_good: &mut LastGood) -> SourceEvent {
    let (mut services, mut slices, mut nodes) = (Vec::new(), Vec::new(), Vec::new());
    // A file that went away takes its objects with it.
    last_good.retain(|f, _| contents.iter().any(|(c, _)| c == f));
    for (f, text) in contents {
        for o in objects_of(f, text, last_good) {
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
        let mut last_good = LastGood::new();
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
                        let event = snapshot(&contents, &mut last_good);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn services(e: &SourceEvent) -> Vec<String> {
        match e {
            SourceEvent::Snapshot { services, .. } => services
                .iter()
                .map(|s| s.metadata.name.clone().unwrap_or_default())
                .collect(),
            _ => panic!("a snapshot"),
        }
    }

    #[test]
    fn a_garbled_file_keeps_its_last_good_version_and_a_removed_one_goes() {
        let svc = |name: &str| {
            format!("---\nkind: Service\nmetadata: {{name: {name}, namespace: t}}\nspec: {{clusterIP: 198.19.0.9, ports: [{{port: 80}}]}}\n")
        };
        let (a, b) = (PathBuf::from("/a.yaml"), PathBuf::from("/b.yaml"));
        let mut last_good = LastGood::new();
        let both = vec![(a.clone(), svc("a1")), (b.clone(), svc("b1"))];
        assert_eq!(services(&snapshot(&both, &mut last_good)), ["a1", "b1"]);
        // b is rewritten as garbage: b1 stays; a's new version is used.
        let torn = vec![
            (a.clone(), svc("a2")),
            (b.clone(), "kind: Service\nspec: {ports: [\n".into()),
        ];
        assert_eq!(services(&snapshot(&torn, &mut last_good)), ["a2", "b1"]);
        // A document of a wrong shape is skipped alone: not a torn file.
        let shape = vec![
            (a.clone(), svc("a2")),
            (
                b.clone(),
                format!("{}---\nkind: Service\nspec: 7\n", svc("b3")),
            ),
        ];
        assert_eq!(services(&snapshot(&shape, &mut last_good)), ["a2", "b3"]);
        // b is gone: so are its objects, even the kept ones.
        let only_a = vec![(a, svc("a2"))];
        assert_eq!(services(&snapshot(&only_a, &mut last_good)), ["a2"]);
        assert!(!last_good.contains_key(&b));
    }
}
