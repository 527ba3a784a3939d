//! `tessera health`: a `grpc.health.v1` check for container health and readiness probes; exits
//! 0 only when the service answers SERVING.

use std::time::Duration;

use anyhow::{Result, bail};
use clap::Args;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

use super::client::{DEFAULT_ENDPOINT, channel, status_error};

/// Arguments of `tessera health`.
#[derive(Args, Debug)]
pub struct HealthArgs {
    /// The process to check.
    #[arg(long, default_value = DEFAULT_ENDPOINT)]
    pub endpoint: String,
    /// The service: "" (the process is up) or `tessera.v1.Inference` (a plan serves).
    #[arg(long, default_value = "")]
    pub service: String,
}

/// Runs `tessera health`.
///
/// # Errors
/// When the endpoint does not answer within 3 s (connecting, then answering: 6 s at most) or
/// the service is not SERVING.
pub async fn run(args: HealthArgs) -> Result<()> {
    let channel = channel(&args.endpoint, Duration::from_secs(3))
        .await
        .map_err(|e| e.into_error("nothing serves there"))?;
    let resp = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: args.service.clone(),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    let status = tonic_health::pb::health_check_response::ServingStatus::try_from(resp.status)
        .map_or("UNKNOWN", |s| s.as_str_name());
    println!("{status}");
    if status != "SERVING" {
        bail!("service {:?} is {status}", args.service);
    }
    Ok(())
}
