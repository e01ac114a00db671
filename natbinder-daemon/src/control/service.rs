//! What each io.natbinder method does, and one connection's life: calls read one at a time, each
//! checked before it is served, with the limits of [`super`].
use std::{sync::Arc, time::Instant};

use serde_json::{json, Map, Value};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    net::{unix::OwnedWriteHalf, UnixStream},
    sync::{broadcast, oneshot, watch},
    time::timeout,
};
use tracing::debug;

use super::{
    peer_of,
    varlink::{self, errors, Call, ReadError, Reply},
    views, ControlState, Peer, INTERFACE, READ_TIMEOUT, WRITE_TIMEOUT,
};
use crate::{
    operator_state::OperatorState,
    table::{PortKey, StaticError},
    Protocol,
};

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

const SERVICE_INTERFACE: &str = "\
interface org.varlink.service
method GetInfo() -> (vendor: string, product: string, version: string, url: string, interfaces: []string)
method GetInterfaceDescription(interface: string) -> (description: string)
error InterfaceNotFound (interface: string)
error MethodNotFound (method: string)
error MethodNotImplemented (method: string)
error InvalidParameter (parameter: string)
error PermissionDenied ()
error ExpectedMore ()
";

/// One connection, until the peer closes it, breaks a limit, or the daemon stops.
pub async fn connection(stream: UnixStream, state: Arc<ControlState>, mut stop: watch::Receiver<bool>) {
    let peer = match peer_of(&stream) {
        Ok(peer) => peer,
        Err(e) => {
            debug!("control socket: no peer credentials ({e}); closing");
            return;
        }
    };
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    let mut buffer = Vec::new();
    loop {
        let read = tokio::select! {
            read = timeout(READ_TIMEOUT, varlink::read_message(&mut reader, &mut buffer)) => read,
            _ = stop.wait_for(|s| *s) => return,
        };
        let call = match read {
            Err(_) => {
                return debug!("control socket: uid {} sent nothing whole in {READ_TIMEOUT:?}; closing", peer.uid)
            }
            Ok(Ok(None)) => return,
            Ok(Ok(Some(()))) => varlink::parse_call(&buffer),
            Ok(Err(e)) => Err(e),
        };
        let call = match call {
            Ok(call) => call,
            Err(ReadError::Io(_)) => return,
            Err(e) => {
                debug!("control socket: uid {}: {e}; closing", peer.uid);
                let reply = Reply::error("io.natbinder.InvalidMessage", json!({"problem": e.to_string()}));
                let _ = send(&mut write, &reply).await;
                return;
            }
        };
        if call.method == "io.natbinder.Watch" && call.more {
            return watch_stream(&mut reader, &mut write, &state, &mut stop).await;
        }
        let reply = handle(&call, &peer, &state).await;
        if !call.oneway && send(&mut write, &reply).await.is_err() {
            return;
        }
    }
}

/// A connection over a limit (`limit`): told so, and closed.
pub async fn turn_away(stream: UnixStream, limit: usize) {
    let (_, mut write) = stream.into_split();
    let reply = Reply::error("io.natbinder.TooManyClients", json!({ "limit": limit }));
    let _ = send(&mut write, &reply).await;
}

async fn send(write: &mut OwnedWriteHalf, reply: &Reply) -> Result<(), ()> {
    match timeout(WRITE_TIMEOUT, varlink::write_message(write, reply)).await {
        Ok(Ok(())) => Ok(()),
        _ => Err(()),
    }
}

fn invalid(parameter: &str) -> Reply {
    Reply::error(errors::INVALID_PARAMETER, json!({"parameter": parameter}))
}

/// The parameters, refusing any that `known` does not list.
fn parameters(call: &Call, known: &[&str]) -> Result<Map<String, Value>, Reply> {
    let parameters = call.parameters();
    match parameters.keys().find(|k| !known.contains(&k.as_str())) {
        Some(unknown) => Err(invalid(unknown)),
        None => Ok(parameters),
    }
}

/// `protocol` and `port`, checked.
pub fn protocol_port(parameters: &Map<String, Value>) -> Result<(Protocol, u16), Reply> {
    let protocol = match parameters.get("protocol").and_then(Value::as_str) {
        Some("tcp") => Protocol::Tcp,
        Some("udp") => Protocol::Udp,
        _ => return Err(invalid("protocol")),
    };
    let port = match parameters.get("port").and_then(Value::as_u64) {
        Some(port @ 1..=65535) => port as u16,
        _ => return Err(invalid("port")),
    };
    Ok((protocol, port))
}

/// Serves one call (all but Watch's stream).
pub async fn handle(call: &Call, peer: &Peer, state: &ControlState) -> Reply {
    match serve(call, peer, state).await {
        Ok(reply) | Err(reply) => reply,
    }
}

async fn serve(call: &Call, peer: &Peer, state: &ControlState) -> Result<Reply, Reply> {
    let now = Instant::now();
    let reply = match call.method.as_str() {
        "io.natbinder.Status" => {
            parameters(call, &[])?;
            let views = state.table.read(|t| views::list(t, false, now));
            let facts = state.facts.lock().unwrap_or_else(|e| e.into_inner()).clone();
            // Read now (a few ms: nft and friends), so that a rule added since is seen.
            let firewall = tokio::task::spawn_blocking(crate::host::firewall::inspect).await.unwrap_or_default();
            let mut status = facts.status(VERSION, &views);
            status["firewall"] =
                json!(firewall.iter().map(|f| format!("{}: {}", f.source, f.detail)).collect::<Vec<_>>());
            Reply::ok(status)
        }
        "io.natbinder.List" => {
            let p = parameters(call, &["all"])?;
            let all = match p.get("all") {
                None | Some(Value::Null) => false,
                Some(Value::Bool(all)) => *all,
                Some(_) => return Err(invalid("all")),
            };
            let views = state.table.read(|t| views::list(t, all, now));
            Reply::ok(json!({ "mappings": views }))
        }
        "io.natbinder.Get" => {
            let (protocol, port) = protocol_port(&parameters(call, &["protocol", "port"])?)?;
            let (view, pinholes) =
                state.table.read(|t| (views::get(t, protocol, port, now), views::pinholes_of(t, protocol, port, now)));
            match view.or_else(|| pinholes.first().cloned()) {
                Some(view) => Reply::ok(json!({ "mapping": view, "pinholes": pinholes })),
                None => {
                    Reply::error("io.natbinder.NoSuchMapping", json!({"protocol": protocol.to_string(), "port": port}))
                }
            }
        }
        "io.natbinder.ExternalAddress" => {
            parameters(call, &[])?;
            let address = state.facts.lock().unwrap_or_else(|e| e.into_inner()).external_address;
            Reply::ok(json!({ "address": address.map(|a| a.to_string()) }))
        }
        "io.natbinder.Watch" => Reply::error(errors::EXPECTED_MORE, Value::Null),
        "io.natbinder.Reload" => {
            parameters(call, &[])?;
            may_change(peer, state, "reload the configuration")?;
            let (tx, rx) = oneshot::channel();
            if state.reload.send(tx).is_err() {
                return Err(Reply::error("io.natbinder.ReloadFailed", json!({"error": "natbinder is shutting down"})));
            }
            match rx.await {
                Ok(Ok(needs_restart)) => Reply::ok(json!({ "needs_restart": needs_restart })),
                Ok(Err(error)) => Reply::error("io.natbinder.ReloadFailed", json!({ "error": error })),
                Err(_) => Reply::error("io.natbinder.ReloadFailed", json!({"error": "natbinder is shutting down"})),
            }
        }
        "io.natbinder.StartRun" => return start_run(call, peer, state).await,
        "io.natbinder.AwaitBind" => return await_bind(call, peer, state).await,
        "io.natbinder.Add"
        | "io.natbinder.Delete"
        | "io.natbinder.Enable"
        | "io.natbinder.Disable"
        | "io.natbinder.Describe" => return operator_change(call, peer, state).await,
        "org.varlink.service.GetInfo" => {
            parameters(call, &[])?;
            Reply::ok(json!({
                "vendor": "natbinder",
                "product": "natbinder",
                "version": VERSION,
                "url": "",
                "interfaces": ["org.varlink.service", "io.natbinder"],
            }))
        }
        "org.varlink.service.GetInterfaceDescription" => {
            let p = parameters(call, &["interface"])?;
            match p.get("interface").and_then(Value::as_str) {
                Some("io.natbinder") => Reply::ok(json!({ "description": INTERFACE })),
                Some("org.varlink.service") => Reply::ok(json!({ "description": SERVICE_INTERFACE })),
                Some(other) => Reply::error(errors::INTERFACE_NOT_FOUND, json!({ "interface": other })),
                None => return Err(invalid("interface")),
            }
        }
        method => match method.rsplit_once('.') {
            Some(("io.natbinder" | "org.varlink.service", _)) => {
                Reply::error(errors::METHOD_NOT_FOUND, json!({ "method": method }))
            }
            Some((interface, _)) => Reply::error(errors::INTERFACE_NOT_FOUND, json!({ "interface": interface })),
            None => Reply::error(errors::METHOD_NOT_FOUND, json!({ "method": method })),
        },
    };
    Ok(reply)
}

/// The longest description accepted (IGD gateways keep about that much).
pub const MAX_DESCRIPTION: usize = 64;

fn description(parameters: &Map<String, Value>, required: bool) -> Result<Option<String>, Reply> {
    match parameters.get("description") {
        None | Some(Value::Null) if !required => Ok(None),
        Some(Value::String(text))
            if !text.trim().is_empty()
                && text.chars().count() <= MAX_DESCRIPTION
                && !text.chars().any(char::is_control) =>
        {
            Ok(Some(text.trim().to_string()))
        }
        _ => Err(invalid("description")),
    }
}

/// Add, Delete, Enable, Disable, Describe: an operator's change to the table, saved before the reply.
async fn operator_change(call: &Call, peer: &Peer, state: &ControlState) -> Result<Reply, Reply> {
    let method = call.method.trim_start_matches("io.natbinder.");
    let known: &[&str] = match method {
        "Add" => &["protocol", "port", "description"],
        "Describe" => &["protocol", "port", "description"],
        _ => &["protocol", "port"],
    };
    let p = parameters(call, known)?;
    let (protocol, port) = protocol_port(&p)?;
    let key = PortKey::new(protocol, port);
    let text = description(&p, method == "Describe")?;
    may_change(peer, state, &format!("{} {key}", method.to_lowercase()))?;
    let now = std::time::Instant::now();
    let done = state.table.update(|t| match method {
        "Add" => t.add_static(key, text.as_deref().unwrap_or("static"), peer.uid, now),
        "Delete" => t.delete_static(key, now),
        "Enable" => {
            t.enable(key, now);
            Ok(())
        }
        "Disable" => {
            t.disable(key, now);
            Ok(())
        }
        _ => t.describe(key, text.as_deref().unwrap_or_default(), now),
    });
    if let Err(e) = done {
        let reply = match e {
            StaticError::BelowMinPort(..) => {
                Reply::error("io.natbinder.PortNotForwardable", json!({"problem": e.to_string()}))
            }
            StaticError::NoSuchStatic(_) | StaticError::NoSuchMapping(_) => Reply::error(
                "io.natbinder.NoSuchMapping",
                json!({"protocol": protocol.to_string(), "port": port, "problem": e.to_string()}),
            ),
        };
        return Err(reply);
    }
    let _one_at_a_time = state.saving.lock().await;
    let snapshot = state.table.read(|t| OperatorState::new(t.statics(), t.disabled().copied().collect()));
    let dir = state.state_dir.clone();
    match tokio::task::spawn_blocking(move || snapshot.save(&dir)).await {
        Ok(Ok(())) => Ok(Reply::ok(Value::Null)),
        Ok(Err(e)) => Err(Reply::error("io.natbinder.SaveFailed", json!({"error": format!("{e:#}")}))),
        Err(e) => Err(Reply::error("io.natbinder.SaveFailed", json!({"error": e.to_string()}))),
    }
}

/// The longest program name StartRun keeps (for the log and `watch`).
const MAX_PROGRAM: usize = 256;

/// StartRun: the caller (`natbinder run`) moves into a new run cgroup, and what it starts is forwarded.
async fn start_run(call: &Call, peer: &Peer, state: &ControlState) -> Result<Reply, Reply> {
    let p = parameters(call, &["program"])?;
    let program = match p.get("program") {
        None | Some(Value::Null) => String::from("?"),
        Some(Value::String(text)) if !text.chars().any(char::is_control) => text.chars().take(MAX_PROGRAM).collect(),
        Some(_) => return Err(invalid("program")),
    };
    state.operators.read().unwrap_or_else(|e| e.into_inner()).may_run(peer).map_err(|(rule, fix)| {
        Reply::error(
            "io.natbinder.NotPermitted",
            json!({"what": "start programs with natbinder run", "rule": rule, "fix": fix}),
        )
    })?;
    let refused = |problem: String| Reply::error("io.natbinder.RunRefused", json!({ "problem": problem }));
    let Some(pid) = peer.pid.filter(|p| *p > 0).map(|p| p as u32) else {
        return Err(refused("the kernel did not say which process is calling (SO_PEERCRED has no pid)".into()));
    };
    // Opened now, while the caller waits for this reply: the move counts only if it still runs after.
    let pidfd = crate::run::cgroups::pidfd_open(pid).map_err(|e| refused(format!("pidfd_open({pid}): {e}")))?;
    let owner = (peer.uid != 0).then_some(peer.uid);
    let cgroup = state.runs.place(pid, pidfd, owner, &program).await.map_err(|e| refused(format!("{e:#}")))?;
    // The event loop makes the kernel watch the new cgroup, if it does not yet, before the caller
    // starts anything there.
    let (done, watched) = tokio::sync::oneshot::channel();
    if state.run_placed.send((state.runs.root().join(&cgroup), done)).is_ok() {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), watched).await;
    }
    state.table.outcomes().publish(crate::outcome::Outcome::RunStarted {
        pid,
        uid: peer.uid,
        program,
        cgroup: cgroup.clone(),
    });
    Ok(Reply::ok(json!({ "cgroup": cgroup, "min_port": state.min_port })))
}

/// AwaitBind: a `run --wait` supervisor holds a bind until the gateway has answered.
async fn await_bind(call: &Call, peer: &Peer, state: &ControlState) -> Result<Reply, Reply> {
    use crate::run::wait::{BindRequest, Verdict, WaitRefused};
    let p = parameters(call, &["pid", "protocol", "port", "family", "v6only", "timeout_ms"])?;
    let (protocol, port) = protocol_port(&p)?;
    let pid = match p.get("pid").and_then(Value::as_u64) {
        Some(pid @ 1..=0x3fff_ffff) => pid as u32,
        _ => return Err(invalid("pid")),
    };
    let family = match p.get("family").and_then(Value::as_str) {
        None | Some("ipv4") => crate::Family::Ipv4,
        Some("ipv6") => crate::Family::Ipv6,
        Some(_) => return Err(invalid("family")),
    };
    let v6only = match p.get("v6only") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(invalid("v6only")),
    };
    let wait = match p.get("timeout_ms").and_then(Value::as_u64) {
        Some(ms) => std::time::Duration::from_millis(ms),
        None => return Err(invalid("timeout_ms")),
    };
    let request = BindRequest { pid, protocol, port, family, v6only, wait };
    let verdict = match state.bind_waits.answer(peer.uid, request).await {
        Ok(verdict) => verdict,
        Err(e @ WaitRefused::NotYours { .. }) => {
            return Err(Reply::error(
                "io.natbinder.NotPermitted",
                json!({"what": format!("wait for the binds of process {pid}"), "rule": e.to_string(), "fix": "run the program with natbinder run yourself"}),
            ))
        }
        Err(e @ WaitRefused::NoSuchProcess(_)) => {
            return Err(Reply::error("io.natbinder.NoSuchProcess", json!({ "pid": pid, "problem": e.to_string() })))
        }
    };
    let mut reply = json!({ "verdict": verdict.name() });
    match &verdict {
        Verdict::Mapped { external_port } => reply["external_port"] = json!(external_port),
        Verdict::Taken { holder, offered } => {
            reply["holder"] = json!(holder.map(|h| h.to_string()));
            reply["offered_port"] = json!(offered);
        }
        Verdict::Pending { reason } => reply["detail"] = json!(reason),
        Verdict::NotForwarded { rule } => reply["detail"] = json!(rule),
        Verdict::NotWatched | Verdict::TimedOut => {}
    }
    Ok(Reply::ok(reply))
}

fn may_change(peer: &Peer, state: &ControlState, what: &str) -> Result<(), Reply> {
    state.operators.read().unwrap_or_else(|e| e.into_inner()).may_change(peer).map_err(|(rule, fix)| {
        debug!("control socket: uid {} may not {what}", peer.uid);
        Reply::error("io.natbinder.NotPermitted", json!({"what": what, "rule": rule, "fix": fix}))
    })
}

/// Watch with "more": every outcome from now on, one reply each, until the peer goes. A peer that
/// falls [`crate::outcome::CAPACITY`] outcomes behind is told how many it missed, and closed.
async fn watch_stream(
    reader: &mut BufReader<tokio::net::unix::OwnedReadHalf>,
    write: &mut OwnedWriteHalf,
    state: &ControlState,
    stop: &mut watch::Receiver<bool>,
) {
    let mut outcomes = state.outcomes.subscribe();
    loop {
        let event = tokio::select! {
            event = outcomes.recv() => event,
            // Anything the peer sends now, or its going, ends the stream.
            _ = reader.fill_buf() => return,
            _ = stop.wait_for(|s| *s) => return,
        };
        let reply = match event {
            Ok(event) => {
                let event = views::watch_event(&event, Instant::now());
                Reply { continues: true, ..Reply::ok(event) }
            }
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                let _ = send(write, &Reply::error("io.natbinder.WatchLagged", json!({ "missed": missed }))).await;
                return;
            }
            Err(broadcast::error::RecvError::Closed) => return,
        };
        if send(write, &reply).await.is_err() {
            return;
        }
    }
}
