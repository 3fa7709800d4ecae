//! Lists the VMs a daemon serves, runs a command on a target (a label selector such as
//! `role=web`, a VM name, or `*`) and follows every execution's output as it arrives, each
//! line prefixed with its VM. Exits 0 when every execution succeeded.
//!
//! ```text
//! cargo run -p portless-api --example follow -- /run/portless/portless.sock role=web uname -a
//! ```

use std::process::ExitCode;

use portless_api::{Client, ExecRequest, ExecState, FollowEvent, Stream};

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [socket, target, command, rest @ ..] = args.as_slice() else {
        eprintln!("usage: follow SOCKET TARGET COMMAND [ARG...]");
        return ExitCode::from(2);
    };
    match run(&Client::new(socket), target, command, rest).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("follow: {e}");
            ExitCode::from(2)
        }
    }
}

/// Whether every execution succeeded.
async fn run(
    client: &Client,
    target: &str,
    command: &str,
    args: &[String],
) -> Result<bool, portless_api::ClientError> {
    for vm in client.vms().await? {
        let labels: Vec<String> = vm.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!("vm {} {} [{}]", vm.name, vm.state, labels.join(","));
    }

    let answer = client
        .exec(&ExecRequest {
            target: target.to_owned(),
            command: command.to_owned(),
            args: args.to_vec(),
            timeout_ms: None,
            max_concurrency: None,
            max_errors: None,
            idempotency_key: None,
        })
        .await?;

    let mut all_succeeded = answer.skipped.is_empty();
    for dispatched in &answer.executions {
        let Some(id) = dispatched.id.filter(|_| !dispatched.refused()) else {
            println!(
                "{}: not run: {}",
                dispatched.vm,
                dispatched
                    .error
                    .as_deref()
                    .unwrap_or(dispatched.state.as_str())
            );
            all_succeeded = false;
            continue;
        };
        let mut follow = client.follow(id).await?;
        while let Some(event) = follow.next().await? {
            match event {
                FollowEvent::Output { stream, data, .. } => {
                    let marker = if stream == Stream::Stderr { "!" } else { ":" };
                    for line in String::from_utf8_lossy(&data).lines() {
                        println!("{}{marker} {line}", dispatched.vm);
                    }
                }
                FollowEvent::End(record) => {
                    println!(
                        "{}: execution {} ended {} (exit code {})",
                        record.vm,
                        record.id,
                        record.state,
                        record.exit_code.map_or("-".to_owned(), |c| c.to_string())
                    );
                    all_succeeded &= record.state == ExecState::Succeeded;
                }
            }
        }
    }
    Ok(all_succeeded)
}
