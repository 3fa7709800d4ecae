//! The sweeper: what no host will do for an invocation, done by the control plane.

use std::sync::Arc;

use super::Control;
use crate::store::StoreError;

/// Sweeps every `sweep_interval` until the task is aborted.
pub(super) async fn run(control: Arc<Control>) {
    let mut tick = tokio::time::interval(control.config.sweep_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut complained = false;
    loop {
        tick.tick().await;
        match sweep(&control).await {
            Ok(()) => complained = false,
            Err(e) if !complained => {
                eprintln!("portless control: sweep: {e} (retrying)");
                complained = true;
            }
            Err(_) => {}
        }
    }
}

/// One sweep. Each statement is conditional on the state it changes, so sweeps of several
/// servers at once change each invocation once.
pub(super) async fn sweep(control: &Control) -> Result<(), StoreError> {
    let c = &control.config;
    let offline = i64::try_from(c.host_offline_after.as_millis()).unwrap_or(i64::MAX);
    let lost = i64::try_from(c.host_lost_after.as_millis()).unwrap_or(i64::MAX);
    let client = control.store.client().await?;
    client.batch_execute("SET lock_timeout = '2s'").await?;
    // New invocations of offline hosts wait as `delayed`; back to `pending` when the host
    // returns.
    client
        .execute(
            "UPDATE invocations SET state = 'delayed' WHERE state = 'pending' AND host IN \
             (SELECT name FROM hosts WHERE heartbeat_at < now() - $1::bigint * interval '1 millisecond')",
            &[&offline],
        )
        .await?;
    client
        .execute(
            "UPDATE invocations SET state = 'pending' WHERE state = 'delayed' AND host IN \
             (SELECT name FROM hosts WHERE heartbeat_at >= now() - $1::bigint * interval '1 millisecond')",
            &[&offline],
        )
        .await?;
    client
        .execute(
            "UPDATE invocations SET state = 'delivery_timed_out', \
               finished_at_ms = (extract(epoch FROM clock_timestamp()) * 1000)::bigint, \
               detail = 'its host did not take it before the delivery deadline' \
             WHERE state IN ('pending', 'delayed') AND deliver_by < now()",
            &[],
        )
        .await?;
    client
        .execute(
            "UPDATE invocations SET state = 'host_lost', \
               finished_at_ms = (extract(epoch FROM clock_timestamp()) * 1000)::bigint, \
               detail = 'its host stopped reporting it and did not come back in time' \
             WHERE state IN ('in_progress', 'running') \
               AND lease_until < now() - $1::bigint * interval '1 millisecond'",
            &[&lost],
        )
        .await?;
    Ok(())
}
