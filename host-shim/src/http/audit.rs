//! The operator's routes: `GET /v1/audit` and `GET /v1/daemon`.

use std::sync::Arc;

use axum::Json;
use axum::extract::{ConnectInfo, Query, State};
use axum::http::HeaderMap;
use portless_api::DaemonState;
use serde::Deserialize;

use super::identify::Peer;
use super::policy::Action;
use super::{ApiError, ApiResult, App, read};
use crate::records::{AuditOrder, AuditQuery};

/// The daemon's own state, for operators (the `audit` right): its version, when it
/// started, and what its callers hold.
pub(super) async fn daemon_state(
    State(app): State<Arc<App>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    headers: HeaderMap,
) -> ApiResult<Json<DaemonState>> {
    app.authorize(&peer, &headers, &Action::ReadDaemon, None, None)
        .await?;
    let counts = app.callers.counts();
    let wide = |n: usize| u64::try_from(n).unwrap_or(u64::MAX);
    Ok(Json(DaemonState {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        started_at_ms: app.started_ms,
        vms: wide(app.vms.len()),
        follows_open: counts.follows_open.into(),
        follows: counts.follows,
        follows_per_principal: app.callers.follow_limit().into(),
        pushes_in_flight: counts.pushes_in_flight.into(),
        pushes_limit: app.callers.push_limit().into(),
        denied_peers: wide(counts.denied_peers),
    }))
}

/// `GET /v1/audit`'s query string as written (the order is checked by hand, so that a bad
/// one gets a clear message).
#[derive(Deserialize)]
pub(super) struct AuditParams {
    principal: Option<String>,
    action: Option<String>,
    allowed: Option<bool>,
    since_ms: Option<u64>,
    limit: Option<usize>,
    order: Option<String>,
}

pub(super) async fn audit(
    State(app): State<Arc<App>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    headers: HeaderMap,
    Query(q): Query<AuditParams>,
) -> ApiResult<Json<portless_api::AuditLog>> {
    app.authorize(&peer, &headers, &Action::ReadAudit, None, None)
        .await?;
    let order = match q.order.as_deref() {
        Some("oldest") => AuditOrder::Oldest,
        None | Some("newest") => AuditOrder::Newest,
        Some(o) => {
            return Err(ApiError::bad(format!(
                "order is oldest or newest, not \"{o}\""
            )));
        }
    };
    let filter = AuditQuery {
        principal: q.principal,
        action: q.action,
        allowed: q.allowed,
        since_ms: q.since_ms,
        limit: q.limit.or(Some(1000)),
        order,
    };
    let entries = read(&app, move |r| r.audit_log(&filter)).await?;
    Ok(Json(portless_api::AuditLog { entries }))
}
