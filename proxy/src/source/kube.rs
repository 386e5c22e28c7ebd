//! The Kubernetes source: kube-rs watchers (with backoff) for Services,
//! EndpointSlices and this Node, on their own thread and tokio runtime,
//! turned into [`SourceEvent`]s. A (re)list — the initial one, or after a
//! watch expired with 410 Gone — is streamed as a [`Listing`] per kind
//! (begin, each object, end), so the sync loop parses each object as it
//! comes and replaces that kind atomically at the end. An API server outage only delays
//! events: the dataplane stays as it is.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, Config};

use super::{ListKind, Listing, SourceEvent};
use crate::objects::Object;
use crate::parse::InvalidObject;

/// Names of the kinds, as the synced gate knows them.
pub const SOURCES: [&str; 3] = ["services", "endpointslices", "node"];

#[derive(Debug, thiserror::Error)]
pub enum KubeSourceError {
    #[error("reading kubeconfig {path}: {source}")]
    Kubeconfig {
        path: String,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("Kubernetes client configuration: {0}")]
    Config(#[source] kube::config::KubeconfigError),
    #[error("Kubernetes client configuration: {0}")]
    Infer(#[source] kube::config::InferConfigError),
    #[error("Kubernetes client: {0}")]
    Client(#[source] kube::Error),
    #[error("starting the tokio runtime: {0}")]
    Runtime(#[source] std::io::Error),
}

pub(crate) async fn client(kubeconfig: Option<PathBuf>) -> Result<Client, KubeSourceError> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(&path).map_err(|source| {
                KubeSourceError::Kubeconfig {
                    path: path.display().to_string(),
                    source,
                }
            })?;
            Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(KubeSourceError::Config)?
        }
        None => Config::infer().await.map_err(KubeSourceError::Infer)?,
    };
    Client::try_from(config).map_err(KubeSourceError::Client)
}

/// Forwards one watcher's events; a (re)list as a [`Listing`].
async fn forward<K, S>(
    stream: S,
    kind: ListKind,
    wrap: fn(K) -> Object,
    tx: Sender<SourceEvent>,
    what: &'static str,
) where
    S: Stream<Item = Result<watcher::Event<K>, watcher::Error>>,
{
    let mut stream = std::pin::pin!(stream);
    while let Some(item) = stream.next().await {
        let event = match item {
            Ok(watcher::Event::Init) => SourceEvent::Listing(Listing::Begin(kind)),
            Ok(watcher::Event::InitApply(o)) => SourceEvent::Listing(Listing::Item(wrap(o))),
            Ok(watcher::Event::InitDone) => SourceEvent::Listing(Listing::End(kind)),
            Ok(watcher::Event::Apply(o)) => SourceEvent::Apply(wrap(o)),
            Ok(watcher::Event::Delete(o)) => SourceEvent::Delete(wrap(o)),
            Err(e) => {
                tracing::warn!(kind = what, error = %e, "watch failed; retrying with backoff");
                continue;
            }
        };
        if tx.send(event).is_err() {
            return;
        }
    }
}

/// Where the sync loop sends invalid objects to be reported as Events.
pub type EventSender = tokio::sync::mpsc::UnboundedSender<InvalidObject>;
pub type EventReceiver = tokio::sync::mpsc::UnboundedReceiver<InvalidObject>;

pub fn event_channel() -> (EventSender, EventReceiver) {
    tokio::sync::mpsc::unbounded_channel()
}

/// Publishes a Warning Event on each invalid object received.
async fn report_events(client: Client, node_name: String, mut rx: EventReceiver) {
    let recorder = Recorder::new(
        client,
        Reporter {
            controller: "ferry".into(),
            instance: Some(node_name),
        },
    );
    while let Some(e) = rx.recv().await {
        let (api_version, kind) = match e.kind {
            "EndpointSlice" => ("discovery.k8s.io/v1", "EndpointSlice"),
            _ => ("v1", "Service"),
        };
        let reference = ObjectReference {
            api_version: Some(api_version.into()),
            kind: Some(kind.into()),
            namespace: Some(e.object.namespace.to_string()),
            name: Some(e.object.name.to_string()),
            ..Default::default()
        };
        let event = KubeEvent {
            type_: EventType::Warning,
            reason: "Invalid".into(),
            note: Some(format!("{}: {} (skipped by ferry)", e.field, e.reason)),
            action: "Skip".into(),
            secondary: None,
        };
        if let Err(err) = recorder.publish(&event, &reference).await {
            tracing::warn!(object = %e.object, error = %err, "cannot publish an Event");
        }
    }
}

/// Starts the watchers (and, with `events`, the Event publisher) on a
/// thread of their own; they stop when `stop` is set or the receiver is
/// gone.
pub fn spawn(
    kubeconfig: Option<PathBuf>,
    node_name: String,
    tx: Sender<SourceEvent>,
    events: Option<EventReceiver>,
    stop: Arc<AtomicBool>,
) -> Result<std::thread::JoinHandle<()>, KubeSourceError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(KubeSourceError::Runtime)?;
    Ok(std::thread::spawn(move || {
        rt.block_on(async move {
            let client = match client(kubeconfig).await {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(error = %e, "no Kubernetes client");
                    return;
                }
            };
            let reporter = async {
                if let Some(rx) = events {
                    report_events(client.clone(), node_name.clone(), rx).await;
                }
                // Without (or after) events, wait for the others.
                futures::future::pending::<()>().await;
            };
            let watch = async { tokio::join!(watch_all(&client, &node_name, &tx), reporter) };
            let stopped = async {
                while !stop.load(Ordering::Relaxed) {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            };
            tokio::select! {
                _ = watch => {}
                () = stopped => {}
            }
        });
    }))
}

/// Watches Services, EndpointSlices and this node's Node, forwarding each
/// as source events.
async fn watch_all(client: &Client, node_name: &str, tx: &Sender<SourceEvent>) {
    let services = watcher(
        Api::<Service>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff();
    let slices = watcher(
        Api::<EndpointSlice>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff();
    let nodes = watcher(
        Api::<Node>::all(client.clone()),
        watcher::Config::default().fields(&format!("metadata.name={node_name}")),
    )
    .default_backoff();
    tokio::join!(
        forward(
            services,
            ListKind::Services,
            |o| Object::Service(Box::new(o)),
            tx.clone(),
            "Service"
        ),
        forward(
            slices,
            ListKind::Slices,
            |o| Object::EndpointSlice(Box::new(o)),
            tx.clone(),
            "EndpointSlice"
        ),
        forward(
            nodes,
            ListKind::Nodes,
            |o| Object::Node(Box::new(o)),
            tx.clone(),
            "Node"
        ),
    );
}
