//! Ferry's and Kubernetes' annotations on a Service: the active health
//! check (`ferry.dev/health-check*`), the balancing algorithm
//! (`ferry.dev/lb-algorithm`) and topology-aware routing.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::service::Ctx;
use super::InvalidObject;
use crate::model::{Algorithm, ProbeSpec, Topology};

pub const ALGORITHM_ANNOTATION: &str = "ferry.dev/lb-algorithm";
const TOPOLOGY_MODE_ANNOTATION: &str = "service.kubernetes.io/topology-mode";
const TOPOLOGY_HINTS_ANNOTATION: &str = "service.kubernetes.io/topology-aware-hints";

pub const HEALTH_CHECK_ANNOTATION: &str = "ferry.dev/health-check";
pub const HEALTH_CHECK_INTERVAL_ANNOTATION: &str = "ferry.dev/health-check-interval";
pub const HEALTH_CHECK_TIMEOUT_ANNOTATION: &str = "ferry.dev/health-check-timeout";
pub const HEALTH_CHECK_UNHEALTHY_ANNOTATION: &str = "ferry.dev/health-check-unhealthy-threshold";
pub const HEALTH_CHECK_HEALTHY_ANNOTATION: &str = "ferry.dev/health-check-healthy-threshold";

/// The `ferry.dev/health-check*` annotations: `tcp` or `http:/path`, an
/// interval and timeout ("2s", "500ms"), and thresholds (1-100).
pub(super) fn parse_probe(
    cx: &Ctx<'_>,
    annotations: &BTreeMap<String, String>,
) -> Result<Option<Arc<ProbeSpec>>, InvalidObject> {
    let Some(kind) = annotations.get(HEALTH_CHECK_ANNOTATION) else {
        return Ok(None);
    };
    let field = |a: &str| format!("metadata.annotations[{a}]");
    let kind = kind.trim();
    let http_path = if kind == "tcp" {
        None
    } else if let Some(path) = kind.strip_prefix("http:").filter(|p| p.starts_with('/')) {
        Some(Arc::from(path))
    } else {
        return Err(cx.err(
            field(HEALTH_CHECK_ANNOTATION),
            format!("{kind:?} is not tcp or http:/path"),
        ));
    };
    let duration_ms = |a: &str, default: u32| -> Result<u32, InvalidObject> {
        match annotations.get(a) {
            None => Ok(default),
            Some(v) => match crate::units::parse_duration(v) {
                Ok(d) if (10..=3_600_000).contains(&d.as_millis()) => Ok(d.as_millis() as u32),
                Ok(_) => Err(cx.err(field(a), format!("{v:?} is not between 10ms and 1h"))),
                Err(e) => Err(cx.err(field(a), e)),
            },
        }
    };
    let threshold = |a: &str, default: u32| -> Result<u32, InvalidObject> {
        match annotations.get(a) {
            None => Ok(default),
            Some(v) => match v.trim().parse::<u32>() {
                Ok(n) if (1..=100).contains(&n) => Ok(n),
                _ => Err(cx.err(field(a), format!("{v:?} is not a count from 1 to 100"))),
            },
        }
    };
    Ok(Some(Arc::new(ProbeSpec {
        http_path,
        interval_ms: duration_ms(HEALTH_CHECK_INTERVAL_ANNOTATION, 5000)?,
        timeout_ms: duration_ms(HEALTH_CHECK_TIMEOUT_ANNOTATION, 1000)?,
        unhealthy_threshold: threshold(HEALTH_CHECK_UNHEALTHY_ANNOTATION, 3)?,
        healthy_threshold: threshold(HEALTH_CHECK_HEALTHY_ANNOTATION, 2)?,
    })))
}

/// Ferry's balancing algorithm annotation, if set.
pub(super) fn algorithm(
    cx: &Ctx<'_>,
    annotations: &BTreeMap<String, String>,
) -> Result<Option<Algorithm>, InvalidObject> {
    let Some(v) = annotations.get(ALGORITHM_ANNOTATION) else {
        return Ok(None);
    };
    Algorithm::parse(v.trim()).map(Some).ok_or_else(|| {
        cx.err(
            format!("metadata.annotations[{ALGORITHM_ANNOTATION}]"),
            format!("{v:?} is not random, maglev or least-connections"),
        )
    })
}

/// The topology-mode annotation (Auto) wins over trafficDistribution.
pub(super) fn topology(
    annotations: &BTreeMap<String, String>,
    distribution: Option<&str>,
) -> Topology {
    let mode = annotations
        .get(TOPOLOGY_MODE_ANNOTATION)
        .or_else(|| annotations.get(TOPOLOGY_HINTS_ANNOTATION));
    if mode.is_some_and(|m| m.eq_ignore_ascii_case("auto")) {
        return Topology::SameZone;
    }
    match distribution {
        Some("PreferClose" | "PreferSameZone") => Topology::SameZone,
        Some("PreferSameNode") => Topology::SameNode,
        _ => Topology::None,
    }
}
