//! What the allocator reads of a Service, pure: whether it is ours (type
//! LoadBalancer, loadBalancerClass unset or `ferry.dev/lb`), the addresses
//! it asks for, its sharing key, ports and policy, and the addresses and
//! condition its status shows.

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::Service;

use super::allocate::LbService;
use super::pool::{NAMESPACE_LABEL, NAME_LABEL};
use crate::model::{Protocol, ServiceName};

/// The loadBalancerClass Ferry serves (besides an unset one).
pub const LB_CLASS: &str = "ferry.dev/lb";
/// Requested addresses, comma-separated.
pub const IPS_ANNOTATION: &str = "ferry.dev/load-balancer-ips";
/// Services with the same key may share an address.
pub const SHARING_ANNOTATION: &str = "ferry.dev/sharing-key";
/// The condition the allocator keeps on each Service it serves.
pub const CONDITION: &str = "ferry.dev/LoadBalancerIPAllocated";

pub fn name_of(svc: &Service) -> ServiceName {
    ServiceName::new(
        svc.metadata.namespace.as_deref().unwrap_or("default"),
        svc.metadata.name.as_deref().unwrap_or(""),
    )
}

/// The addresses in status.loadBalancer.ingress.
pub fn status_ips(svc: &Service) -> Vec<IpAddr> {
    svc.status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .map(|ingress| {
            ingress
                .iter()
                .filter_map(|i| i.ip.as_deref()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// What the allocator keeps of a Service: only Services of ours, and those
/// it served before (to release them), never the whole object — a cluster
/// of 10,000 ClusterIP Services costs the leader nothing.
#[derive(Clone, Debug, PartialEq)]
pub struct SvcRecord {
    /// The Service as the allocator sees it; None when it is no longer ours.
    pub lb: Option<LbService>,
    /// status.loadBalancer.ingress IPs.
    pub ips: Vec<IpAddr>,
    /// (status, reason, message) of the allocator's condition.
    pub condition: Option<(String, String, String)>,
    /// The condition's lastTransitionTime.
    pub condition_since: Option<String>,
    pub generation: i64,
    pub uid: Option<String>,
}

/// The record of a Service, if the allocator has anything to do with it.
pub fn record(svc: &Service) -> Option<SvcRecord> {
    let lb = lb_service(svc);
    let ours = svc
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == CONDITION));
    if lb.is_none() && ours.is_none() {
        return None;
    }
    Some(SvcRecord {
        lb,
        ips: status_ips(svc),
        condition: ours.map(|c| (c.status.clone(), c.reason.clone(), c.message.clone())),
        condition_since: ours.map(|c| c.last_transition_time.0.to_string()),
        generation: svc.metadata.generation.unwrap_or(0),
        uid: svc.metadata.uid.clone(),
    })
}

impl SvcRecord {
    /// The current (status, lastTransitionTime) of the allocator's
    /// condition, for [`transition_time`].
    pub fn condition_state(&self) -> Option<(&str, &str)> {
        let status = self.condition.as_ref().map(|c| c.0.as_str());
        status.zip(self.condition_since.as_deref())
    }
}

/// The lastTransitionTime of a condition whose status becomes
/// `new_status`, given its current (status, lastTransitionTime): kept while
/// the status holds, `now` when it changes (metav1.Condition semantics).
/// Serves Service and pool conditions alike.
pub fn transition_time(current: Option<(&str, &str)>, new_status: &str, now: &str) -> String {
    match current {
        Some((status, since)) if status == new_status => since.to_string(),
        _ => now.to_string(),
    }
}

/// The addresses a Service asks for: the annotation's list, else
/// spec.loadBalancerIP; an address that does not parse is the error.
fn requested(annotation: Option<&str>, spec_ip: Option<&str>) -> Result<Vec<IpAddr>, String> {
    match annotation {
        Some(list) => list
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| {
                s.parse::<IpAddr>()
                    .map_err(|_| format!("{IPS_ANNOTATION}: {s:?} is not an IP address"))
            })
            .collect(),
        None => match spec_ip.map(str::trim) {
            Some(ip) if !ip.is_empty() => ip
                .parse::<IpAddr>()
                .map(|ip| vec![ip])
                .map_err(|_| format!("spec.loadBalancerIP: {ip:?} is not an IP address")),
            _ => Ok(vec![]),
        },
    }
}

/// The Service as the allocator sees it; None when it is not ours.
pub fn lb_service(svc: &Service) -> Option<LbService> {
    let spec = svc.spec.as_ref()?;
    if spec.type_.as_deref() != Some("LoadBalancer") {
        return None;
    }
    if spec
        .load_balancer_class
        .as_deref()
        .is_some_and(|c| c != LB_CLASS)
    {
        return None;
    }
    let name = name_of(svc);
    let mut labels: BTreeMap<String, String> = svc
        .metadata
        .labels
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect();
    labels.insert(NAMESPACE_LABEL.into(), name.namespace.to_string());
    labels.insert(NAME_LABEL.into(), name.name.to_string());
    let annotations = svc.metadata.annotations.as_ref();
    let annotation = |key: &str| annotations.and_then(|a| a.get(key)).map(|v| v.trim());
    let requested = requested(annotation(IPS_ANNOTATION), spec.load_balancer_ip.as_deref());
    let families = match spec.ip_families.as_deref() {
        Some(f) if !f.is_empty() => f.iter().map(|f| f == "IPv6").collect(),
        _ => vec![false],
    };
    let ports = spec
        .ports
        .iter()
        .flatten()
        .filter_map(|p| {
            let proto = Protocol::parse(p.protocol.as_deref().unwrap_or("TCP"))?;
            Some((proto, u16::try_from(p.port).ok()?))
        })
        .collect();
    Some(LbService {
        name,
        labels,
        created: svc
            .metadata
            .creation_timestamp
            .as_ref()
            .map_or(0, |t| t.0.as_second()),
        families,
        requested,
        sharing_key: annotation(SHARING_ANNOTATION)
            .filter(|k| !k.is_empty())
            .map(str::to_string),
        ports,
        local_policy: spec.external_traffic_policy.as_deref() == Some("Local"),
        current: status_ips(svc),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Option<LbService> {
        let svc: Service = yaml_serde::from_str(yaml).expect("a Service");
        lb_service(&svc)
    }

    #[test]
    fn only_our_load_balancers() {
        let base = "metadata: {name: a, namespace: n}\nspec:\n  ports: [{port: 80}]\n";
        assert!(parse(&format!("{base}  type: ClusterIP\n")).is_none());
        assert!(parse(&format!(
            "{base}  type: LoadBalancer\n  loadBalancerClass: other\n"
        ))
        .is_none());
        assert!(parse(&format!(
            "{base}  type: LoadBalancer\n  loadBalancerClass: ferry.dev/lb\n"
        ))
        .is_some());
        let s = parse(&format!("{base}  type: LoadBalancer\n")).expect("ours");
        assert_eq!(s.name, ServiceName::new("n", "a"));
        assert_eq!(s.labels[NAMESPACE_LABEL], "n");
        assert_eq!(s.labels[NAME_LABEL], "a");
        assert_eq!(s.families, [false]);
        assert_eq!(s.ports, [(Protocol::Tcp, 80)]);
        assert_eq!(s.requested, Ok(vec![]));
    }

    #[test]
    fn requests_sharing_and_status() {
        let s = parse(
            "metadata:
  name: a
  annotations: {ferry.dev/load-balancer-ips: '10.0.0.1, fd00::1', ferry.dev/sharing-key: web}
spec:
  type: LoadBalancer
  loadBalancerIP: 10.9.9.9
  externalTrafficPolicy: Local
  ipFamilies: [IPv4, IPv6]
  ports: [{port: 53, protocol: UDP}, {port: 53}]
status:
  loadBalancer: {ingress: [{ip: 10.0.0.1}, {hostname: x.example}]}
",
        )
        .expect("ours");
        let want: Vec<IpAddr> = vec![
            "10.0.0.1".parse().expect("ip"),
            "fd00::1".parse().expect("ip"),
        ];
        assert_eq!(s.requested, Ok(want));
        assert_eq!(s.sharing_key.as_deref(), Some("web"));
        assert!(s.local_policy);
        assert_eq!(s.families, [false, true]);
        assert_eq!(s.ports, [(Protocol::Udp, 53), (Protocol::Tcp, 53)]);
        assert_eq!(s.current, ["10.0.0.1".parse::<IpAddr>().expect("ip")]);
        let legacy =
            parse("metadata: {name: a}\nspec: {type: LoadBalancer, loadBalancerIP: 10.9.9.9}\n")
                .expect("ours");
        assert_eq!(legacy.requested, Ok(vec!["10.9.9.9".parse().expect("ip")]));
        let bad = parse(
            "metadata: {name: a, annotations: {ferry.dev/load-balancer-ips: nope}}\nspec: {type: LoadBalancer}\n",
        )
        .expect("ours");
        assert!(bad
            .requested
            .expect_err("bad")
            .contains("\"nope\" is not an IP address"));
    }

    #[test]
    fn records_only_what_the_allocator_serves_or_served() {
        let svc = |yaml: &str| -> Service { yaml_serde::from_str(yaml).expect("a Service") };
        assert!(record(&svc("metadata: {name: a}\nspec: {type: ClusterIP}\n")).is_none());
        let ours = record(&svc("metadata: {name: a}\nspec: {type: LoadBalancer}\n")).expect("ours");
        assert!(ours.lb.is_some() && ours.condition.is_none());
        // No longer a LoadBalancer, but the allocator served it: kept, to
        // release its address.
        let served = record(&svc(
            "metadata: {name: a, generation: 3, uid: u1}
spec: {type: ClusterIP}
status:
  loadBalancer: {ingress: [{ip: 10.0.0.1}]}
  conditions:
  - {type: ferry.dev/LoadBalancerIPAllocated, status: 'True', reason: Allocated, message: m, lastTransitionTime: '2026-11-27T00:00:00Z'}
",
        ))
        .expect("served before");
        assert!(served.lb.is_none());
        assert_eq!(served.ips, ["10.0.0.1".parse::<IpAddr>().expect("ip")]);
        assert_eq!(
            served.condition,
            Some(("True".into(), "Allocated".into(), "m".into()))
        );
        assert_eq!((served.generation, served.uid.as_deref()), (3, Some("u1")));
        // The transition time holds while the status does.
        let now = "2026-11-28T00:00:00Z";
        assert_eq!(
            transition_time(served.condition_state(), "True", now),
            "2026-11-27T00:00:00Z"
        );
        assert_eq!(transition_time(served.condition_state(), "False", now), now);
        assert_eq!(transition_time(ours.condition_state(), "True", now), now);
    }
}
