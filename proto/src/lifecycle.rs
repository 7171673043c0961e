//! The service lifecycle both daemons share, as a supervisor sees it: the gRPC health
//! status (`grpc.health.v1.Health`, NOT_SERVING while starting and while draining), the
//! systemd notifications of a `Type=notify` unit (`READY=1`, `STOPPING=1`, `STATUS=` over
//! `$NOTIFY_SOCKET`; nothing is sent when it is unset), and the drain between a stop
//! signal and the listeners closing.
//!
//! Order at a stop: the signal arrives → every health status turns NOT_SERVING and
//! `STOPPING=1` is sent → the listeners stay up for the drain time, answering health
//! checks with NOT_SERVING (so load balancers and monitors see the stop coming) → the
//! shutdown token is cancelled and the process stops as before.

use std::time::Duration;

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;
use tonic_health::ServingStatus;
pub use tonic_health::pb::health_server::HealthServer;
use tonic_health::server::HealthReporter;
pub use tonic_health::server::HealthService;

/// The encoded descriptors of `grpc.health.v1`, for gRPC reflection (grpcurl finds the
/// Health service without a `.proto` file).
pub const HEALTH_DESCRIPTOR_SET: &[u8] = tonic_health::pb::FILE_DESCRIPTOR_SET;

/// The health statuses of one listener's services and the process' notifications.
#[derive(Clone, Debug)]
pub struct Lifecycle {
    reporter: HealthReporter,
    /// The services reported besides the server as a whole (`""`).
    services: Vec<&'static str>,
}

impl Lifecycle {
    /// A lifecycle that reports NOT_SERVING for the server (`""`) and for each of
    /// `services` (full gRPC names, e.g. `siterecovery.v1.Control`) until [`Self::serving`].
    pub async fn starting(services: &[&'static str]) -> Self {
        let me = Self { reporter: HealthReporter::new(), services: services.to_vec() };
        me.set(ServingStatus::NotServing).await;
        me
    }

    /// The `grpc.health.v1.Health` service answering from this lifecycle's statuses.
    pub fn health_service(&self) -> HealthServer<HealthService> {
        HealthServer::new(HealthService::from_health_reporter(self.reporter.clone()))
    }

    /// Health checks answer SERVING from now on (until a drain).
    pub async fn serving(&self) {
        self.set(ServingStatus::Serving).await;
    }

    /// Tells systemd the service is ready (`READY=1`) with a status line.
    pub fn ready(&self, status: &str) {
        notify(&[NotifyState::Ready, NotifyState::Status(status)]);
    }

    /// A `STATUS=` line for `systemctl status`.
    pub fn status(&self, status: &str) {
        notify(&[NotifyState::Status(status)]);
    }

    /// The process' shutdown token, cancelled `drain` after `signals` is: in between,
    /// health checks answer NOT_SERVING and systemd has been told `STOPPING=1`.
    pub fn drain_after(&self, signals: CancellationToken, drain: Duration) -> CancellationToken {
        let shutdown = CancellationToken::new();
        let (me, stop) = (self.clone(), shutdown.clone());
        tokio::spawn(async move {
            tokio::select! {
                _ = signals.cancelled() => {}
                // Stopping for another reason (an error in main): nothing to drain.
                _ = stop.cancelled() => return,
            }
            me.set(ServingStatus::NotServing).await;
            notify(&[NotifyState::Stopping, NotifyState::Status("draining: health NOT_SERVING")]);
            if !drain.is_zero() {
                tracing::info!("draining for {drain:?}: health checks answer NOT_SERVING");
                tokio::time::sleep(drain).await;
            }
            stop.cancel();
        });
        shutdown
    }

    async fn set(&self, status: ServingStatus) {
        self.reporter.set_service_status("", status).await;
        for s in &self.services {
            self.reporter.set_service_status(s, status).await;
        }
    }
}

/// Sends `states` to `$NOTIFY_SOCKET` (a no-op without it); a failure is logged once
/// here, never fatal: the service runs on whether or not a supervisor listens.
fn notify(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(false, states) {
        tracing::warn!("systemd notification to $NOTIFY_SOCKET failed: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_server::Health;

    async fn check(l: &Lifecycle, service: &str) -> i32 {
        let svc = HealthService::from_health_reporter(l.reporter.clone());
        let r = svc.check(tonic::Request::new(HealthCheckRequest { service: service.into() })).await;
        r.map(|r| r.into_inner().status).unwrap_or(-1)
    }

    #[tokio::test]
    async fn not_serving_while_starting_and_draining() {
        let l = Lifecycle::starting(&["siterecovery.v1.Peer"]).await;
        assert_eq!(check(&l, "").await, ServingStatus::NotServing as i32);
        assert_eq!(check(&l, "siterecovery.v1.Peer").await, ServingStatus::NotServing as i32);
        l.serving().await;
        assert_eq!(check(&l, "").await, ServingStatus::Serving as i32);
        assert_eq!(check(&l, "siterecovery.v1.Peer").await, ServingStatus::Serving as i32);
        let signals = CancellationToken::new();
        let shutdown = l.drain_after(signals.clone(), Duration::from_millis(300));
        signals.cancel();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while check(&l, "").await != ServingStatus::NotServing as i32 {
            assert!(tokio::time::Instant::now() < deadline, "never NOT_SERVING after the signal");
            tokio::task::yield_now().await;
        }
        assert!(!shutdown.is_cancelled(), "the drain must keep the listeners up");
        tokio::time::timeout(Duration::from_secs(5), shutdown.cancelled()).await.expect("drain ends");
    }
}
