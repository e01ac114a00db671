//! Whether this host's own firewall would drop what a port mapping lets in. The gateway forwards a
//! WAN peer's connection to this host; if this host's input filter drops it, the mapping is useless,
//! and natbinder should say so rather than report the port as reachable.
//!
//! What can be told without evaluating every rule: an input hook (nftables, which iptables-nft and
//! firewalld write to as well) whose policy drops, or whose last rule drops or rejects everything;
//! legacy iptables' INPUT policy; and the two front ends desktops use, ufw and firewalld, active. A
//! filter that drops by default may still accept the forwarded ports with a rule: the findings say
//! "may drop", with what to do.
use std::process::Command;

use serde_json::Value;

/// One reason inbound connections to forwarded ports may be dropped here.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    /// Which firewall ("nftables table inet filter, chain input", "ufw", ...).
    pub source: String,
    /// What it does.
    pub detail: String,
    /// What to do about it.
    pub fix: String,
}

/// Everything found on this host (in this network namespace). Tools that are not installed, or that
/// this process may not ask (not root), are skipped.
pub fn inspect() -> Vec<Finding> {
    let mut findings = Vec::new();
    if let Some(json) = output("nft", &["-j", "list", "ruleset"]) {
        findings.extend(nftables_input_drops(&json));
    }
    if let Some(rules) = output("iptables-legacy", &["-S", "INPUT"]) {
        findings.extend(iptables_input_drops(&rules, "iptables-legacy"));
    }
    if let Some(status) = output("ufw", &["status"]) {
        if status.lines().any(|l| l.trim() == "Status: active") {
            findings.push(Finding {
                source: "ufw".into(),
                detail: "ufw is active: it denies incoming connections by default".into(),
                fix: "allow each forwarded port: `sudo ufw allow PORT/tcp` (or /udp)".into(),
            });
        }
    }
    if let Some(state) = output("firewall-cmd", &["--state"]) {
        if state.trim() == "running" {
            findings.push(Finding {
                source: "firewalld".into(),
                detail: "firewalld is running: its zone decides which ports accept connections".into(),
                fix: "open each forwarded port: `sudo firewall-cmd --add-port=PORT/tcp --permanent` then `--reload`"
                    .into(),
            });
        }
    }
    findings
}

fn output(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).stderr(std::process::Stdio::null()).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Input hooks in `nft -j list ruleset` output that drop by default.
pub fn nftables_input_drops(json: &str) -> Vec<Finding> {
    let Ok(document) = serde_json::from_str::<Value>(json) else { return Vec::new() };
    let Some(items) = document["nftables"].as_array() else { return Vec::new() };
    let mut findings = Vec::new();
    for chain in items.iter().filter_map(|item| item.get("chain")) {
        if chain["hook"] != "input" || !matches!(chain["family"].as_str(), Some("ip" | "ip6" | "inet")) {
            continue;
        }
        let (family, table, name) = (
            chain["family"].as_str().unwrap_or("?"),
            chain["table"].as_str().unwrap_or("?"),
            chain["name"].as_str().unwrap_or("?"),
        );
        let last_rule_drops = items
            .iter()
            .filter_map(|item| item.get("rule"))
            .rfind(|r| r["family"] == chain["family"] && r["table"] == chain["table"] && r["chain"] == chain["name"])
            .is_some_and(|r| unconditional_drop(&r["expr"]));
        let what = match (chain["policy"].as_str(), last_rule_drops) {
            (Some("drop"), _) => "its policy is drop",
            (_, true) => "its last rule drops or rejects everything",
            _ => continue,
        };
        findings.push(Finding {
            source: format!("nftables table {family} {table}, chain {name}"),
            detail: format!("the input hook {what}: inbound connections to forwarded ports are dropped unless a rule accepts them"),
            fix: format!("accept the forwarded ports before the drop: `nft insert rule {family} {table} {name} tcp dport PORT accept` (and udp)"),
        });
    }
    findings
}

/// A rule made of a verdict alone: drop or reject, whatever the packet.
fn unconditional_drop(expressions: &Value) -> bool {
    let Some(expressions) = expressions.as_array() else { return false };
    expressions.len() == 1 && (expressions[0].get("drop").is_some() || expressions[0].get("reject").is_some())
}

/// `iptables -S INPUT`'s policy line, and a final catch-all DROP or REJECT.
pub fn iptables_input_drops(rules: &str, tool: &str) -> Vec<Finding> {
    let lines: Vec<&str> = rules.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    let policy_drops = lines.contains(&"-P INPUT DROP");
    let last_drops = lines.last().is_some_and(|l| *l == "-A INPUT -j DROP" || l.starts_with("-A INPUT -j REJECT"));
    if !policy_drops && !last_drops {
        return Vec::new();
    }
    vec![Finding {
        source: format!("{tool} INPUT"),
        detail: "the INPUT chain drops by default: inbound connections to forwarded ports are dropped unless a rule accepts them".into(),
        fix: format!("accept the forwarded ports first: `{tool} -I INPUT -p tcp --dport PORT -j ACCEPT` (and udp)"),
    }]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_input_chain_that_drops_by_policy_or_by_a_last_rule_is_found_and_others_are_not() {
        let json = r#"{"nftables": [
            {"metainfo": {"version": "1.0.6"}},
            {"table": {"family": "inet", "name": "filter", "handle": 1}},
            {"chain": {"family": "inet", "table": "filter", "name": "input", "handle": 1, "type": "filter", "hook": "input", "prio": 0, "policy": "drop"}},
            {"chain": {"family": "inet", "table": "filter", "name": "forward", "handle": 2, "type": "filter", "hook": "forward", "prio": 0, "policy": "drop"}},
            {"chain": {"family": "ip", "table": "fw", "name": "in", "handle": 3, "type": "filter", "hook": "input", "prio": 0, "policy": "accept"}},
            {"rule": {"family": "ip", "table": "fw", "chain": "in", "handle": 4, "expr": [{"match": {"op": "==", "left": {"ct": {"key": "state"}}, "right": ["established", "related"]}}, {"accept": null}]}},
            {"rule": {"family": "ip", "table": "fw", "chain": "in", "handle": 5, "expr": [{"reject": null}]}},
            {"chain": {"family": "ip", "table": "open", "name": "in", "handle": 6, "type": "filter", "hook": "input", "prio": 0, "policy": "accept"}}
        ]}"#;
        let found = nftables_input_drops(json);
        let sources: Vec<&str> = found.iter().map(|f| f.source.as_str()).collect();
        assert_eq!(sources, ["nftables table inet filter, chain input", "nftables table ip fw, chain in"]);
        assert!(
            found[0].detail.contains("policy is drop") && found[0].fix.contains("nft insert rule inet filter input")
        );
        assert!(found[1].detail.contains("last rule"));
        assert!(nftables_input_drops("not json").is_empty());
        assert!(nftables_input_drops(r#"{"nftables": []}"#).is_empty());
    }

    #[test]
    fn iptables_input_that_drops_is_found() {
        assert!(iptables_input_drops("-P INPUT ACCEPT\n-A INPUT -i lo -j ACCEPT\n", "iptables").is_empty());
        assert_eq!(iptables_input_drops("-P INPUT DROP\n", "iptables").len(), 1);
        let found = iptables_input_drops("-P INPUT ACCEPT\n-A INPUT -p tcp --dport 22 -j ACCEPT\n-A INPUT -j REJECT --reject-with icmp-port-unreachable\n", "iptables-legacy");
        assert!(found[0].fix.contains("iptables-legacy -I INPUT"), "{found:?}");
    }
}
