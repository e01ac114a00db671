//! The commands that talk to a running daemon: status, list, get, external-ip, watch, reload. Each
//! prints for people (aligned, short) or, with --json, the daemon's reply as io.natbinder.varlink
//! documents it (stable: fields are only ever added).
use std::{io::Write, path::PathBuf};

use clap::{Args, ValueEnum};
use serde_json::{json, Value};

use crate::control::{
    client::{Client, ClientError},
    DEFAULT_SOCKET,
};

/// Options every client command takes.
#[derive(Clone, Debug, Args)]
pub struct Output {
    /// Print JSON (one object; JSON lines for watch) instead of text for people.
    #[arg(long)]
    pub json: bool,
    /// The daemon's control socket.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
}

/// PROTO PORT, as the changing commands take them.
#[derive(Clone, Debug, Args)]
pub struct Target {
    #[arg(value_enum)]
    pub protocol: ProtocolArg,
    #[arg(value_parser = clap::value_parser!(u16).range(1..))]
    pub port: u16,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ProtocolArg {
    Tcp,
    Udp,
}

impl ProtocolArg {
    fn name(self) -> &'static str {
        match self {
            ProtocolArg::Tcp => "tcp",
            ProtocolArg::Udp => "udp",
        }
    }
}

/// The exit codes of the client commands.
pub mod exit {
    pub const FAILED: u8 = 1;
    pub const BAD_ARGUMENTS: u8 = 2;
    pub const NOT_RUNNING: u8 = 3;
    pub const NOT_PERMITTED: u8 = 4;
}

/// What a failed command prints and exits with.
pub fn failure(error: &ClientError) -> (u8, String) {
    match error {
        ClientError::NotRunning { .. } => (exit::NOT_RUNNING, error.to_string()),
        ClientError::Failed { name, parameters, .. } if name == "io.natbinder.NotPermitted" => {
            let text = |k: &str| parameters.get(k).and_then(Value::as_str).unwrap_or("").to_string();
            (exit::NOT_PERMITTED, format!("not permitted to {}: {}. {}", text("what"), text("rule"), text("fix")))
        }
        ClientError::Failed { name, parameters, .. } if name == "io.natbinder.NoSuchMapping" => {
            let protocol = parameters.get("protocol").and_then(Value::as_str).unwrap_or("?");
            let port = parameters.get("port").and_then(Value::as_u64).unwrap_or(0);
            let problem = parameters.get("problem").and_then(Value::as_str);
            (
                exit::FAILED,
                problem.map_or(format!("natbinder knows no socket or mapping on {protocol}/{port}"), String::from),
            )
        }
        ClientError::Failed { name, parameters, .. } if name == "io.natbinder.PortNotForwardable" => {
            (exit::FAILED, parameters.get("problem").and_then(Value::as_str).unwrap_or("?").to_string())
        }
        ClientError::Failed { name, parameters, .. } if name == "org.varlink.service.InvalidParameter" => {
            let parameter = parameters.get("parameter").and_then(Value::as_str).unwrap_or("?");
            let hint = if parameter == "description" { " (1 to 64 characters, no control characters)" } else { "" };
            (exit::BAD_ARGUMENTS, format!("natbinder refused the {parameter}{hint}"))
        }
        ClientError::Failed { name, parameters, .. } if name == "io.natbinder.ReloadFailed" => {
            let error = parameters.get("error").and_then(Value::as_str).unwrap_or("?");
            (exit::FAILED, format!("reload refused, the running policy stays: {error}"))
        }
        other => (exit::FAILED, other.to_string()),
    }
}

fn print_json(value: &Value) {
    println!("{}", serde_json::to_string_pretty(value).unwrap_or_default());
}

pub async fn status(output: &Output) -> Result<(), ClientError> {
    let status = Client::connect(&output.socket).await?.call("io.natbinder.Status", json!({})).await?;
    if output.json {
        print_json(&status);
    } else {
        print!("{}", status_text(&status));
    }
    Ok(())
}

fn str_of<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Value::as_str)
}

fn num(v: &Value, key: &str) -> u64 {
    v.get(key).and_then(Value::as_u64).unwrap_or(0)
}

pub fn status_text(s: &Value) -> String {
    let mut rows: Vec<(&str, String)> = Vec::new();
    let version = str_of(s, "version").unwrap_or("?");
    rows.push(("daemon", format!("natbinder {version}, running")));
    match (str_of(s, "gateway"), str_of(s, "gateway_problem")) {
        (Some(gateway), _) => rows.push(("gateway", gateway.to_string())),
        (None, Some(problem)) => rows.push(("gateway", format!("none: {problem}"))),
        (None, None) => rows.push(("gateway", "searching".to_string())),
    }
    rows.push(("external address", str_of(s, "external_address").unwrap_or("unknown").to_string()));
    if let Some(double) = str_of(s, "double_nat") {
        rows.push((
            "warning",
            format!("double NAT: {double}; mappings will not make this host reachable from the internet"),
        ));
    }
    for finding in s.get("firewall").and_then(Value::as_array).into_iter().flatten().filter_map(Value::as_str) {
        rows.push((
            "warning",
            format!("this host's firewall may drop what mappings let in: {finding} (see `natbinder doctor`)"),
        ));
    }
    let scope = match str_of(s, "policy_scope") {
        Some("sessions") => "programs in users' sessions",
        Some("users") => "ordinary users' programs (uid >= 1000)",
        Some("cgroup") => "everything in the cgroup",
        _ => "?",
    };
    rows.push(("cgroup", str_of(s, "cgroup").unwrap_or("?").to_string()));
    let limit = match num(s, "max_mappings_per_user") {
        0 => "no limit per user".to_string(),
        n => format!("at most {n} per user"),
    };
    rows.push(("forwarding", format!("{scope}, but the deny list; {limit}")));
    let c = &s["counts"];
    rows.push((
        "mappings",
        format!(
            "{} mapped, {} pending, {} conflict, {} not forwarded, {} disabled, {} removing",
            num(c, "mapped"),
            num(c, "pending"),
            num(c, "conflict"),
            num(c, "not_forwarded"),
            num(c, "disabled"),
            num(c, "removing")
        ),
    ));
    let ipv6 = &s["ipv6"];
    let addresses: Vec<&str> =
        ipv6.get("addresses").and_then(Value::as_array).into_iter().flatten().filter_map(Value::as_str).collect();
    let addresses = if addresses.is_empty() { "no global address".to_string() } else { addresses.join(", ") };
    let ipv6_text = match str_of(ipv6, "firewall") {
        Some("pinholes") => format!("[::] listeners get a pinhole per address ({addresses})"),
        Some("open") => format!("the gateway's IPv6 firewall is off: no pinholes needed ({addresses})"),
        Some("unavailable") => format!(
            "[::] listeners are not opened: {} ({addresses})",
            str_of(ipv6, "detail").unwrap_or("the gateway cannot be asked")
        ),
        _ => format!("not checked yet ({addresses})"),
    };
    rows.push(("ipv6", ipv6_text));
    rows.push(("lost events", num(s, "lost_events").to_string()));
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    rows.iter().map(|(k, v)| format!("{:<width$}  {v}\n", format!("{k}:"), width = width + 1)).collect()
}

pub async fn list(output: &Output, all: bool) -> Result<(), ClientError> {
    let reply = Client::connect(&output.socket).await?.call("io.natbinder.List", json!({ "all": all })).await?;
    if output.json {
        print_json(&reply);
    } else {
        let rows = reply["mappings"].as_array().cloned().unwrap_or_default();
        if rows.is_empty() {
            println!("no forwarded ports and no bound sockets natbinder follows");
        } else {
            print!("{}", table_text(&rows));
        }
    }
    Ok(())
}

pub async fn get(output: &Output, protocol: ProtocolArg, port: u16) -> Result<(), ClientError> {
    let reply = Client::connect(&output.socket)
        .await?
        .call("io.natbinder.Get", json!({ "protocol": protocol.name(), "port": port }))
        .await?;
    if output.json {
        print_json(&reply);
    } else {
        print!("{}", table_text(&[reply["mapping"].clone()]));
    }
    Ok(())
}

fn duration_text(seconds: u64) -> String {
    match seconds {
        s if s >= 3600 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        s if s >= 60 => format!("{}m{:02}s", s / 60, s % 60),
        s => format!("{s}s"),
    }
}

/// `list`'s table: one line per entry, columns aligned.
pub fn table_text(rows: &[Value]) -> String {
    let mut lines = vec![["PROTO", "EXTERNAL", "INTERNAL", "STATE", "LEASE", "BACKEND", "OWNERS", "WHY"]
        .map(String::from)
        .to_vec()];
    for r in rows {
        let mut owners: Vec<String> = r["owners"]
            .as_array()
            .map(|o| {
                o.iter()
                    .map(|o| {
                        format!("{} {} (uid {})", num(o, "pid"), str_of(o, "program").unwrap_or("?"), num(o, "uid"))
                    })
                    .collect()
            })
            .unwrap_or_default();
        if r["static"].as_bool() == Some(true) {
            owners.insert(0, format!("static \"{}\"", str_of(r, "description").unwrap_or("")));
        }
        let lease = if r["permanent"].as_bool() == Some(true) {
            "permanent".to_string()
        } else {
            r["lease_left_seconds"].as_u64().map_or("-".to_string(), duration_text)
        };
        let why = match (str_of(r, "reason"), str_of(r, "holder")) {
            (Some(reason), Some(holder)) => format!("{reason} ({holder})"),
            (Some(reason), None) => reason.to_string(),
            (None, Some(holder)) => format!("held by {holder}"),
            (None, None) => String::new(),
        };
        // A pinhole has no NAT in between: it is reached at this host's own address and port.
        let (external, internal) = match str_of(r, "pinhole_address") {
            Some(address) => (format!("[{address}]:{}", num(r, "external_port")), "(pinhole)".to_string()),
            None => (num(r, "external_port").to_string(), num(r, "internal_port").to_string()),
        };
        lines.push(vec![
            str_of(r, "protocol").unwrap_or("?").to_string(),
            external,
            internal,
            str_of(r, "state").unwrap_or("?").to_string(),
            lease,
            str_of(r, "backend").unwrap_or("-").to_string(),
            if owners.is_empty() { "-".to_string() } else { owners.join(", ") },
            why,
        ]);
    }
    let widths: Vec<usize> = (0..8).map(|i| lines.iter().map(|l| l[i].chars().count()).max().unwrap_or(0)).collect();
    lines
        .iter()
        .map(|l| {
            let cells: Vec<String> = l.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
            format!("{}\n", cells.join("  ").trim_end())
        })
        .collect()
}

pub async fn external_ip(output: &Output) -> Result<bool, ClientError> {
    let reply = Client::connect(&output.socket).await?.call("io.natbinder.ExternalAddress", json!({})).await?;
    if output.json {
        print_json(&reply);
        return Ok(true);
    }
    match str_of(&reply, "address") {
        Some(address) => {
            println!("{address}");
            Ok(true)
        }
        None => {
            eprintln!("natbinder: no external address known yet (no gateway answered, or it did not say)");
            Ok(false)
        }
    }
}

pub async fn watch(output: &Output) -> Result<(), ClientError> {
    let mut client = Client::connect(&output.socket).await?;
    let json = output.json;
    client
        .call_more("io.natbinder.Watch", json!({}), |event| {
            let line = if json {
                serde_json::to_string(&event).unwrap_or_default()
            } else {
                let time = str_of(&event, "time").unwrap_or("?");
                // The daemon sends microseconds (for programs); a person reads milliseconds.
                let time = match time.split_once('.') {
                    Some((seconds, fraction)) if fraction.len() > 4 => match fraction.get(..3) {
                        Some(millis) => format!("{seconds}.{millis}Z"),
                        None => time.to_string(),
                    },
                    _ => time.to_string(),
                };
                format!("{time}  {}", str_of(&event, "text").unwrap_or("?"))
            };
            let mut out = std::io::stdout().lock();
            // A closed pipe (`natbinder watch | head`) ends the watch.
            writeln!(out, "{line}").and_then(|_| out.flush()).is_ok()
        })
        .await
}

/// add, delete, enable, disable, describe: `method` on protocol/port, then what it did.
pub async fn change(
    output: &Output,
    method: &str,
    protocol: ProtocolArg,
    port: u16,
    description: Option<&str>,
) -> Result<(), ClientError> {
    let mut parameters = json!({ "protocol": protocol.name(), "port": port });
    if let Some(text) = description {
        parameters["description"] = json!(text);
    }
    let mut client = Client::connect(&output.socket).await?;
    client.call(&format!("io.natbinder.{method}"), parameters).await?;
    let entry = client.call("io.natbinder.Get", json!({ "protocol": protocol.name(), "port": port })).await;
    if output.json {
        print_json(&entry.map(|e| e["mapping"].clone()).unwrap_or(json!(null)));
        return Ok(());
    }
    match method {
        "Delete" => println!("deleted the static mapping {}/{port}", protocol.name()),
        _ => match entry {
            Ok(entry) => print!("{}", table_text(&[entry["mapping"].clone()])),
            Err(_) => println!("{}/{port}: done; nothing binds it yet", protocol.name()),
        },
    }
    Ok(())
}

pub async fn reload(output: &Output) -> Result<(), ClientError> {
    let reply = Client::connect(&output.socket).await?.call("io.natbinder.Reload", json!({})).await?;
    if output.json {
        print_json(&reply);
        return Ok(());
    }
    println!("reloaded: the configuration file applies now");
    let restart: Vec<&str> =
        reply["needs_restart"].as_array().map(|a| a.iter().filter_map(Value::as_str).collect()).unwrap_or_default();
    if !restart.is_empty() {
        println!("these settings changed but apply only after a restart: {}", restart.join(", "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_is_aligned_and_says_why() {
        let rows = vec![
            json!({"protocol": "tcp", "external_port": 8080, "internal_port": 8080, "state": "mapped",
                   "owners": [{"pid": 1234, "program": "python3", "uid": 1000}], "lease_left_seconds": 3599,
                   "permanent": false, "backend": "UPnP IGD"}),
            json!({"protocol": "tcp", "external_port": 9000, "internal_port": 9000, "state": "not-forwarded",
                   "reason": "deny everything (default)", "owners": [{"pid": 812, "program": "postgres", "uid": 105}],
                   "permanent": false}),
        ];
        let text = table_text(&rows);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("PROTO  EXTERNAL  INTERNAL  STATE"), "{text}");
        assert!(lines[1].contains("59m59s") && lines[1].contains("1234 python3 (uid 1000)"), "{text}");
        assert!(lines[2].ends_with("deny everything (default)"), "{text}");
        let state_column = lines[0].find("STATE").unwrap();
        assert_eq!(lines[2].find("not-forwarded"), Some(state_column), "aligned:\n{text}");
    }

    #[test]
    fn failures_map_to_the_documented_exit_codes() {
        let not_running = ClientError::NotRunning {
            path: "/run/x".into(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        };
        assert_eq!(failure(&not_running).0, 3);
        let params =
            json!({"what": "reload the configuration", "rule": "changes are for root", "fix": "run it with sudo"});
        let denied = ClientError::Failed {
            method: "io.natbinder.Reload".into(),
            name: "io.natbinder.NotPermitted".into(),
            parameters: params.as_object().unwrap().clone(),
        };
        let (code, text) = failure(&denied);
        assert_eq!(code, 4);
        assert!(text.contains("reload the configuration") && text.contains("sudo"), "{text}");
    }
}
