//! The allocator's writes: a Service's status.loadBalancer.ingress and
//! condition (with an Event when the condition changes), and a pool's
//! status, each by server-side apply under [`FIELD_MANAGER`] and only when
//! it differs from what the object holds.

use k8s_openapi::api::core::v1::{ObjectReference, Service};
use kube::api::{Patch, PatchParams};
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder};
use kube::{Api, Client, ResourceExt};
use serde_json::{json, Value};

use super::allocate::{Outcome, PoolReport};
use super::controller::FIELD_MANAGER;
use super::pool::{FerryLoadBalancerIPPool, PoolCondition, PoolStatus};
use super::service::{transition_time, SvcRecord, CONDITION};
use crate::model::ServiceName;

/// (status, reason, message) of a Service's allocation condition.
type Condition = (String, String, String);

/// Writes a pool's status when it differs from `report`'s.
pub(super) async fn write_pool(client: &Client, p: &FerryLoadBalancerIPPool, report: &PoolReport) {
    let name = p.name_any();
    let current = p.status.as_ref().map_or(&[][..], |s| &s.conditions[..]);
    let want = pool_status(report, current);
    if p.status.as_ref() == Some(&want) {
        return;
    }
    let body = json!({"apiVersion": "ferry.dev/v1alpha1", "kind": "FerryLoadBalancerIPPool",
                      "metadata": {"name": name}, "status": want});
    let api = Api::<FerryLoadBalancerIPPool>::all(client.clone());
    if let Err(e) = api
        .patch_status(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&body),
        )
        .await
    {
        tracing::warn!(pool = %name, error = %e, "cannot write the pool status");
    }
}

/// A pool's status from its report: the Conflict and Invalid conditions
/// and the address counts.
fn pool_status(report: &PoolReport, current: &[PoolCondition]) -> PoolStatus {
    let conflict = report.conflict.is_some();
    let invalid = report.invalid.is_some();
    PoolStatus {
        conditions: vec![
            condition(
                current,
                "ferry.dev/Conflict",
                conflict,
                if conflict { "Overlap" } else { "NoOverlap" },
                report.conflict.clone().unwrap_or_default(),
            ),
            condition(
                current,
                "ferry.dev/Invalid",
                invalid,
                if invalid { "InvalidSpec" } else { "Valid" },
                report.invalid.clone().unwrap_or_default(),
            ),
        ],
        addresses_total: report.total,
        addresses_used: report.used,
        addresses_free: report.total.saturating_sub(report.used),
    }
}

/// A condition, keeping its lastTransitionTime while its status holds.
fn condition(
    current: &[PoolCondition],
    type_: &str,
    on: bool,
    reason: &str,
    message: String,
) -> PoolCondition {
    let status = if on { "True" } else { "False" };
    let state = current
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.as_str(), c.last_transition_time.as_str()));
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let since = transition_time(state, status, &now);
    PoolCondition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message,
        last_transition_time: since,
    }
}

/// Writes a Service's addresses and condition when they differ from
/// `want`; None releases whatever the allocator gave it.
pub(super) async fn write_service(
    client: &Client,
    recorder: &Recorder,
    name: &ServiceName,
    rec: &SvcRecord,
    want: Option<&Outcome>,
) -> Result<(), kube::Error> {
    let ips: Vec<String> = want
        .map(|o| o.addresses.iter().map(|(ip, _)| ip.to_string()).collect())
        .unwrap_or_default();
    let cond = want.map(wanted_condition);
    let current: Vec<String> = rec
        .ips
        .iter()
        .map(std::string::ToString::to_string)
        .collect();
    if current == ips && rec.condition == cond {
        return Ok(());
    }
    let body = service_status(name, rec, &ips, cond.as_ref());
    Api::<Service>::namespaced(client.clone(), &name.namespace)
        .patch_status(
            &name.name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&body),
        )
        .await?;
    let (type_, reason, note) = match &cond {
        Some((s, reason, message)) if s == "True" => (
            EventType::Normal,
            reason.clone(),
            format!("allocated {message}"),
        ),
        Some((_, reason, message)) => (EventType::Warning, reason.clone(), message.clone()),
        None => (
            EventType::Normal,
            "Released".to_string(),
            format!("released {}", current.join(", ")),
        ),
    };
    tracing::info!(service = %name, addresses = ?ips, reason = %reason, "LoadBalancer status written");
    let event = KubeEvent {
        type_,
        reason,
        note: Some(note),
        action: "Allocate".into(),
        secondary: None,
    };
    if let Err(e) = recorder.publish(&event, &reference(name, rec)).await {
        tracing::warn!(service = %name, error = %e, "cannot publish an Event");
    }
    Ok(())
}

/// The condition an allocation outcome gives a Service.
fn wanted_condition(o: &Outcome) -> Condition {
    match &o.failure {
        None => {
            let parts: Vec<String> = o
                .addresses
                .iter()
                .map(|(ip, pool)| format!("{ip} from pool {pool}"))
                .collect();
            (
                "True".to_string(),
                "Allocated".to_string(),
                parts.join(", "),
            )
        }
        Some((f, why)) => ("False".to_string(), f.reason().to_string(), why.clone()),
    }
}

/// The server-side-apply body of a Service's status: its ingress
/// addresses and our condition (keeping lastTransitionTime while the
/// condition's status holds).
fn service_status(
    name: &ServiceName,
    rec: &SvcRecord,
    ips: &[String],
    cond: Option<&Condition>,
) -> Value {
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let conditions: Vec<Value> = cond
        .iter()
        .map(|(status, reason, message)| {
            let since = transition_time(rec.condition_state(), status, &now);
            json!({"type": CONDITION, "status": status, "reason": reason,
                   "message": message, "lastTransitionTime": since,
                   "observedGeneration": rec.generation})
        })
        .collect();
    let ingress: Vec<Value> = ips
        .iter()
        .map(|ip| json!({"ip": ip, "ipMode": "VIP"}))
        .collect();
    json!({"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": &*name.name, "namespace": &*name.namespace},
           "status": {"loadBalancer": {"ingress": ingress}, "conditions": conditions}})
}

/// The Service an Event is about.
fn reference(name: &ServiceName, rec: &SvcRecord) -> ObjectReference {
    ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Service".into()),
        namespace: Some(name.namespace.to_string()),
        name: Some(name.name.to_string()),
        uid: rec.uid.clone(),
        ..Default::default()
    }
}
