//! The VM routes: `GET /v1/vms`, and a VM's commands, ping and metrics.

use std::sync::Arc;

use axum::Json;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::HeaderMap;
use portless_api::{MetricsResponse, PingResponse, VmInfo, VmList};
use tokio::sync::oneshot;

use super::identify::Peer;
use super::policy::{Action, Principal};
use super::{ApiResult, App, answer};
use crate::vm::Request;

pub(super) async fn list_vms(
    State(app): State<Arc<App>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    headers: HeaderMap,
) -> ApiResult<Json<VmList>> {
    let principal = app
        .authorize(&peer, &headers, &Action::ListVms, None, None)
        .await?;
    Ok(Json(VmList {
        vms: visible_vms(&app, principal),
    }))
}

/// Every VM `principal` may see, in file order, as `GET /v1/vms` lists them.
pub(super) fn visible_vms(app: &App, principal: &Principal) -> Vec<VmInfo> {
    app.config
        .vms
        .iter()
        .filter(|vm| principal.may_access(vm))
        .filter_map(|vm| {
            app.vms.get(&vm.name).map(|h| VmInfo {
                labels: vm.labels.clone(),
                channel: vm.channel.kind().to_owned(),
                ..h.status()
            })
        })
        .collect()
}

pub(super) async fn commands(
    State(app): State<Arc<App>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    headers: HeaderMap,
    Path(vm): Path<String>,
) -> ApiResult<Json<portless_api::CommandList>> {
    let (_, handle, _) = app
        .vm_for(
            &peer,
            &headers,
            &Action::ListCommands,
            &vm,
            Some(vm.clone()),
        )
        .await?;
    let (reply, rx) = oneshot::channel();
    handle.request(Request::Commands { reply })?;
    Ok(Json(answer(&app, rx).await?))
}

pub(super) async fn ping(
    State(app): State<Arc<App>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    headers: HeaderMap,
    Path(vm): Path<String>,
) -> ApiResult<Json<PingResponse>> {
    let (_, handle, _) = app
        .vm_for(&peer, &headers, &Action::Ping, &vm, Some(vm.clone()))
        .await?;
    let (reply, rx) = oneshot::channel();
    handle.request(Request::Ping { reply })?;
    let rtt = answer(&app, rx).await?;
    Ok(Json(PingResponse {
        vm,
        rtt_us: u64::try_from(rtt.as_micros()).unwrap_or(u64::MAX),
    }))
}

pub(super) async fn metrics(
    State(app): State<Arc<App>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    headers: HeaderMap,
    Path(vm): Path<String>,
) -> ApiResult<Json<MetricsResponse>> {
    let (_, handle, _) = app
        .vm_for(&peer, &headers, &Action::Metrics, &vm, Some(vm.clone()))
        .await?;
    let (reply, rx) = oneshot::channel();
    handle.request(Request::Metrics { reply })?;
    let metrics = crate::vm::metrics_for_api(&answer(&app, rx).await?);
    Ok(Json(MetricsResponse { vm, metrics }))
}
