//! The gateway's own floor: a bare add and a bare delete by a minimal client from lan1, one request
//! each on a fresh socket, nothing else (no discovery, no retries). What natbinder adds over these is
//! its own cost; what they take is the gateway's.
use std::{
    io::{Read, Write},
    net::{TcpStream, UdpSocket},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use natbinder_lab::{Lab, GW_LAN_IP, LAN1_IP, NATPMP_PORT};

/// The protocol a floor is measured over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Upnp,
    Pcp,
    NatPmp,
}

/// (add, delete) of TCP `port` to lan1's same port, in ms.
pub fn add_and_delete(lab: &Lab, protocol: Protocol, port: u16) -> Result<(f64, f64)> {
    Ok((add(lab, protocol, port)?, delete(lab, protocol, port)?))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The NAT-PMP (RFC 6886 §3.3) TCP mapping request; lifetime 0 and external port 0 delete (§3.4).
fn natpmp_request(port: u16, external: u16, lifetime: u32) -> Vec<u8> {
    let mut r = vec![0u8, 2, 0, 0];
    r.extend_from_slice(&port.to_be_bytes());
    r.extend_from_slice(&external.to_be_bytes());
    r.extend_from_slice(&lifetime.to_be_bytes());
    r
}

/// The PCP (RFC 6887 §11) MAP request for TCP `port` from lan1; lifetime 0 deletes it.
fn pcp_request(port: u16, lifetime: u32) -> Vec<u8> {
    let mut r = vec![2u8, 1, 0, 0];
    r.extend_from_slice(&lifetime.to_be_bytes());
    r.extend_from_slice(&LAN1_IP.to_ipv6_mapped().octets());
    // One nonce for every floor mapping: the delete must name the nonce of the add.
    r.extend_from_slice(b"natbinderflr");
    r.extend_from_slice(&[6, 0, 0, 0]);
    r.extend_from_slice(&port.to_be_bytes());
    r.extend_from_slice(&port.to_be_bytes());
    r.extend_from_slice(&std::net::Ipv4Addr::UNSPECIFIED.to_ipv6_mapped().octets());
    r
}

fn natpmp_ok(reply: &[u8]) -> bool {
    reply[1] == 130 && u16::from_be_bytes([reply[2], reply[3]]) == 0
}

fn pcp_ok(reply: &[u8]) -> bool {
    reply[1] == 0x81 && reply[3] == 0
}

/// A bare add of TCP `port` to lan1's same port, in ms.
pub fn add(lab: &Lab, protocol: Protocol, port: u16) -> Result<f64> {
    let took = match protocol {
        Protocol::Upnp => return upnp_add(lab, lab.config.http_port, 2, port),
        Protocol::NatPmp => udp_exchange(lab, natpmp_request(port, port, 3600), 16, natpmp_ok)?,
        Protocol::Pcp => udp_exchange(lab, pcp_request(port, 3600), 60, pcp_ok)?,
    };
    Ok(ms(took))
}

/// A bare delete of what [`add`] made, in ms.
pub fn delete(lab: &Lab, protocol: Protocol, port: u16) -> Result<f64> {
    let took = match protocol {
        Protocol::Upnp => return upnp_delete(lab, lab.config.http_port, 2, port),
        Protocol::NatPmp => udp_exchange(lab, natpmp_request(port, 0, 0), 16, natpmp_ok)?,
        Protocol::Pcp => udp_exchange(lab, pcp_request(port, 0), 60, pcp_ok)?,
    };
    Ok(ms(took))
}

/// A bare AddPortMapping to the IGD whose HTTP server is on the gateway's `http_port` and which
/// speaks WANIPConnection:`version` (miniupnpd 2, the fake IGD 1), in ms.
pub fn upnp_add(lab: &Lab, http_port: u16, version: u8, port: u16) -> Result<f64> {
    let arguments = format!(
        "<NewRemoteHost></NewRemoteHost><NewExternalPort>{port}</NewExternalPort><NewProtocol>TCP</NewProtocol>\
         <NewInternalPort>{port}</NewInternalPort><NewInternalClient>{LAN1_IP}</NewInternalClient>\
         <NewEnabled>1</NewEnabled><NewPortMappingDescription>bench floor</NewPortMappingDescription>\
         <NewLeaseDuration>3600</NewLeaseDuration>"
    );
    Ok(ms(soap(lab, http_port, version, "AddPortMapping", &arguments)?))
}

/// A bare DeletePortMapping, in ms.
pub fn upnp_delete(lab: &Lab, http_port: u16, version: u8, port: u16) -> Result<f64> {
    let arguments = format!(
        "<NewRemoteHost></NewRemoteHost><NewExternalPort>{port}</NewExternalPort><NewProtocol>TCP</NewProtocol>"
    );
    Ok(ms(soap(lab, http_port, version, "DeletePortMapping", &arguments)?))
}

/// One SOAP action to the IGD's WANIPConnection control URL, over a new TCP connection.
fn soap(lab: &Lab, http_port: u16, version: u8, action: &str, arguments: &str) -> Result<Duration> {
    let request = soap_request(http_port, version, action, arguments);
    let action = action.to_string();
    lab.lan1.run(move || {
        let started = Instant::now();
        let reply = exchange(http_port, &request)?;
        let took = started.elapsed();
        if !reply.starts_with("HTTP/1.1 200") {
            let fault = reply.split("<errorDescription>").nth(1).and_then(|r| r.split('<').next()).unwrap_or("");
            bail!("the gateway refused {action}: {} {fault}", reply.lines().next().unwrap_or(""));
        }
        Ok(took)
    })
}

/// The HTTP request of one SOAP action (`arguments`: the action's argument elements, as XML).
fn soap_request(http_port: u16, version: u8, action: &str, arguments: &str) -> String {
    let body = format!(
        "<?xml version=\"1.0\"?><s:Envelope xmlns:s=\"http://schemas.xmlsoap.org/soap/envelope/\" \
         s:encodingStyle=\"http://schemas.xmlsoap.org/soap/encoding/\"><s:Body>\
         <u:{action} xmlns:u=\"urn:schemas-upnp-org:service:WANIPConnection:{version}\">{arguments}</u:{action}>\
         </s:Body></s:Envelope>"
    );
    format!(
        "POST /ctl/IPConn HTTP/1.1\r\nHost: {GW_LAN_IP}:{http_port}\r\nContent-Type: text/xml; charset=\"utf-8\"\r\n\
         SOAPAction: \"urn:schemas-upnp-org:service:WANIPConnection:{version}#{action}\"\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    )
}

/// Sends `request` to the gateway's `http_port` on a new TCP connection and reads the whole answer
/// (the gateway closes the connection after it). Runs in the caller's namespace.
fn exchange(http_port: u16, request: &str) -> Result<String> {
    let mut stream = TcpStream::connect((GW_LAN_IP, http_port))
        .with_context(|| format!("connecting to the gateway's HTTP port {http_port}"))?;
    stream.write_all(request.as_bytes())?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply)?;
    Ok(reply)
}

/// A SOAP action and its arguments in order, as the gateway recorded them (values unescaped).
pub type SoapCall = (String, Vec<(String, String)>);

/// `calls` from lan1 to the IGD's WANIPConnection:`version` control URL, one after the other, each on
/// a new TCP connection with nothing in between (no parsing, no discovery): what the gateway itself
/// takes to serve them. Returns the time from the first connect to the last answer, in ms, and each
/// answer's HTTP status (200, or 500 for a UPnP error).
pub fn upnp_in_a_row(lab: &Lab, http_port: u16, version: u8, calls: &[SoapCall]) -> Result<(f64, Vec<u16>)> {
    let escape = |v: &str| v.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;");
    let requests: Vec<String> = calls
        .iter()
        .map(|(action, arguments)| {
            let xml: String =
                arguments.iter().map(|(name, value)| format!("<{name}>{}</{name}>", escape(value))).collect();
            soap_request(http_port, version, action, &xml)
        })
        .collect();
    lab.lan1.run(move || {
        let mut statuses = Vec::with_capacity(requests.len());
        let started = Instant::now();
        for request in &requests {
            let reply = exchange(http_port, request)?;
            let status = reply.split_whitespace().nth(1).and_then(|s| s.parse().ok());
            statuses.push(status.with_context(|| format!("the gateway's answer is not HTTP: {:.80}", reply))?);
        }
        Ok((ms(started.elapsed()), statuses))
    })
}

/// One request to the gateway's port 5351 and its reply (at least `reply_len` bytes, `ok` true).
fn udp_exchange(lab: &Lab, request: Vec<u8>, reply_len: usize, ok: fn(&[u8]) -> bool) -> Result<Duration> {
    lab.lan1.run(move || {
        let socket = UdpSocket::bind((LAN1_IP, 0)).context("binding the floor client's socket")?;
        socket.connect((GW_LAN_IP, NATPMP_PORT))?;
        socket.set_read_timeout(Some(Duration::from_secs(2)))?;
        let started = Instant::now();
        socket.send(&request)?;
        let mut reply = [0u8; 1100];
        let n = socket.recv(&mut reply).context("no answer from the gateway's port 5351 within 2 s")?;
        let took = started.elapsed();
        if n < reply_len || !ok(&reply[..n]) {
            bail!("the gateway refused the request: {:02x?}", &reply[..n.min(8)]);
        }
        Ok(took)
    })
}
