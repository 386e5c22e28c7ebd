//! A coordination.k8s.io/v1 Lease as a lock, the way client-go's leader
//! election uses one: the holder renews it; a contender takes it over when
//! it saw the same record unchanged for a whole lease duration (measured
//! on its own monotonic clock, so clock skew between nodes does not
//! matter); every write carries the resourceVersion it read, so two
//! contenders cannot both win. While the API server does not answer, a
//! contender's observation starts over (it takes nothing over the moment
//! the server is back, before the holder could renew), and the holder may
//! go on acting as such ([`LeaseLock::held_or_unreachable`]).

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::PostParams;
use kube::Api;

#[derive(Debug)]
pub struct LeaseLock {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
    /// The last record seen (holder, renewTime) and when it was first seen.
    observed: Option<(String, String, Instant)>,
    /// When this identity last wrote the lease successfully.
    renewed: Option<Instant>,
    /// Whether this identity held the lease when the API server last
    /// answered.
    mine_at_last_answer: bool,
}

fn now() -> MicroTime {
    MicroTime(k8s_openapi::jiff::Timestamp::now())
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

impl LeaseLock {
    pub fn new(api: Api<Lease>, name: &str, identity: &str, duration: Duration) -> LeaseLock {
        LeaseLock {
            api,
            name: name.into(),
            identity: identity.into(),
            duration,
            observed: None,
            renewed: None,
            mine_at_last_answer: false,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether this identity holds the lease by its own last successful
    /// write (it stops counting a little before the lease could expire for
    /// the others).
    pub fn held(&self) -> bool {
        let margin = self.duration / 4;
        self.renewed
            .is_some_and(|t| t.elapsed() + margin < self.duration)
    }

    /// Held, or held when the API server last answered and not answering
    /// since: nobody can take the lease over while the server is away, so
    /// the holder (an L2 announcer) keeps acting instead of leaving its
    /// address unanswered for the length of an API outage.
    pub fn held_or_unreachable(&self) -> bool {
        self.held() || self.mine_at_last_answer
    }

    /// One attempt to take or renew the lease: Ok(true) when this identity
    /// holds it afterwards. An error (the API server did not answer, or
    /// refused) restarts the observation of the others' record.
    pub async fn try_acquire_or_renew(&mut self) -> Result<bool, kube::Error> {
        match self.attempt().await {
            Ok(held) => {
                self.mine_at_last_answer = held;
                Ok(held)
            }
            Err(e) => {
                self.observed = None;
                Err(e)
            }
        }
    }

    fn spec(&self, transitions: i32, acquired: Option<MicroTime>) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(self.duration.as_secs().max(1) as i32),
            acquire_time: Some(acquired.unwrap_or_else(now)),
            renew_time: Some(now()),
            lease_transitions: Some(transitions),
            ..Default::default()
        }
    }

    async fn attempt(&mut self) -> Result<bool, kube::Error> {
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            return self.create().await;
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().unwrap_or_default();
        let renew = spec
            .renew_time
            .as_ref()
            .map(|t| t.0.to_string())
            .unwrap_or_default();
        let duration = spec
            .lease_duration_seconds
            .map_or(self.duration, |s| Duration::from_secs(s.max(1) as u64));
        let changed = self
            .observed
            .as_ref()
            .is_none_or(|(h, r, _)| *h != holder || *r != renew);
        if changed {
            self.observed = Some((holder.clone(), renew, Instant::now()));
        }
        let seen_since = self.observed.as_ref().map_or_else(Instant::now, |o| o.2);
        let mine = holder == self.identity;
        if !mine && !holder.is_empty() && seen_since.elapsed() < duration {
            self.renewed = None;
            return Ok(false);
        }
        let transitions = spec.lease_transitions.unwrap_or(0) + i32::from(!mine);
        let acquired = if mine { spec.acquire_time } else { None };
        lease.spec = Some(self.spec(transitions, acquired));
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => {
                if !mine {
                    tracing::info!(lease = %self.name, previous = %holder, "took the lease over");
                }
                self.renewed = Some(Instant::now());
                Ok(true)
            }
            Err(e) if is_conflict(&e) => {
                self.renewed = None;
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// Creates the lease, held by this identity: Ok(false) when another
    /// contender created it first.
    async fn create(&mut self) -> Result<bool, kube::Error> {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                ..Default::default()
            },
            spec: Some(self.spec(0, None)),
        };
        match self.api.create(&PostParams::default(), &lease).await {
            Ok(_) => {
                self.renewed = Some(Instant::now());
                Ok(true)
            }
            Err(e) if is_conflict(&e) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Gives the lease up (if held) so another contender takes it at once.
    pub async fn release(&mut self) -> Result<(), kube::Error> {
        self.mine_at_last_answer = false;
        if self.renewed.take().is_none() {
            return Ok(());
        }
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            return Ok(());
        };
        let spec = lease.spec.get_or_insert_with(Default::default);
        if spec.holder_identity.as_deref() != Some(&self.identity) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(now());
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if is_conflict(&e) => Ok(()),
            Err(e) => Err(e),
        }
    }
}
