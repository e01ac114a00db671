//! A scripted fake UPnP IGD on the lab's gateway, for the faults a real miniupnpd cannot be made to show.
//!
//! Everything a real gateway does is tested against miniupnpd. This fake exists only for:
//! - **725 OnlyPermanentLeasesSupported** on an AddPortMapping with a lease ([`FakeScript::permanent_only_725`]);
//! - **402 Invalid Args** on an AddPortMapping with a lease ([`FakeScript::invalid_args_402_on_lease`]);
//! - **501 ActionFailed** for the next N adds ([`FakeScript::fail_adds_501`]);
//! - **606 Action not authorized** for adds and deletes ([`FakeScript::not_authorized_606`]);
//! - **728 NoPortMapsAvailable** once the table holds N entries ([`FakeScript::table_full_728`]);
//! - **silence**: TCP connections accepted and never answered ([`FakeScript::silent_http`],
//!   [`FakeScript::silent_control`]), or M-SEARCH never answered ([`FakeScript::silent_ssdp`]);
//! - **garbage**: non-HTTP bytes, truncated HTTP, malformed XML, huge bodies ([`GarbageKind`]);
//! - **double NAT**: any external address, such as 10.0.0.1, 100.64.0.1 or 0.0.0.0 ([`FakeScript::external_ip`]);
//! - **a reboot** at a chosen moment: empty table, new HTTP port, new BOOTID.UPNP.ORG announced with
//!   ssdp:alive ([`FakeIgd::reboot`]);
//! - **a table larger than miniupnpd can hold in minutes** (its nftables backend takes about 0.4 s per
//!   add at 100 entries): 1,000 mappings and more, read through IGDv2's GetListOfPortMappings
//!   ([`FakeScript::igd_v2_listing`]), IGDv1's GetGenericPortMappingEntry, or not listable at all, 401
//!   on both listing calls ([`FakeScript::listing_refused_401`]), so that a client checks entry by entry.
//!
//! Otherwise it is a small, strict IGDv1 router: one WANIPConnection:1 service (no AddAnyPortMapping, no
//! GetListOfPortMappings, as on IGDv1; WANIPConnection:2 with GetListOfPortMappings when scripted), a
//! real in-memory table (718 for another host's port, 714/713 for missing entries, leases that expire),
//! protocol strings accepted only as "TCP"/"UDP". It answers SSDP
//! from LAN hosts only, on br0 (192.168.77.1), and serves HTTP on 192.168.77.1 at a random port, as
//! miniupnpd does with `http_port=0`. It records every request so tests can assert what a client sent.
//!
//! It runs on plain std threads inside the gateway namespace; dropping the [`FakeIgd`] stops them and
//! closes its sockets. Start the lab with `LabConfig { miniupnpd: false, .. }`: both want UDP port 1900.
use std::{
    fmt::Write as _,
    fs::File,
    io::{self, Read, Write},
    net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::{AsRawFd, RawFd},
    str::FromStr,
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc, Arc, Mutex, MutexGuard,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};

use crate::{set_multicast_interface, Lab, Netns, EXTERNAL_IP_PLACEHOLDER, GW_LAN_IP};

const SSDP_GROUP: Ipv4Addr = Ipv4Addr::new(239, 255, 255, 250);
const SSDP_PORT: u16 = 1900;
/// UPnP 1.1's default multicast TTL: SSDP stays on the link.
const SSDP_TTL: u32 = 2;

const DESCRIPTION_PATH: &str = "/rootDesc.xml";
const WANIP_SCPD_PATH: &str = "/WANIPCn.xml";
const WANIP_CONTROL_PATH: &str = "/ctl/IPConn";
const CIF_SCPD_PATH: &str = "/WANCfg.xml";
const CIF_CONTROL_PATH: &str = "/ctl/CmnIfCfg";

const DEVICE_UUID: &str = "7f3c2a10-5e1b-4c6d-9a8e-fa4e1d6b0a77";
const IGD_DEVICE: &str = "urn:schemas-upnp-org:device:InternetGatewayDevice:1";
const WAN_DEVICE: &str = "urn:schemas-upnp-org:device:WANDevice:1";
const WAN_CONNECTION_DEVICE: &str = "urn:schemas-upnp-org:device:WANConnectionDevice:1";
const WANIP_SERVICE: &str = "urn:schemas-upnp-org:service:WANIPConnection:1";
/// IGDv2's WANIPConnection, served instead with [`FakeScript::igd_v2_listing`].
const WANIP_SERVICE_V2: &str = "urn:schemas-upnp-org:service:WANIPConnection:2";
/// miniupnpc counts a device as a valid IGD only if it has this service.
const CIF_SERVICE: &str = "urn:schemas-upnp-org:service:WANCommonInterfaceConfig:1";
/// What this device answers M-SEARCH for and announces in NOTIFY (its NT values).
const SEARCH_TARGETS: [&str; 6] =
    ["upnp:rootdevice", IGD_DEVICE, WAN_DEVICE, WAN_CONNECTION_DEVICE, WANIP_SERVICE, CIF_SERVICE];
const CONFIG_ID: u32 = 1;
const SERVER_HEADER: &str = "Linux/6 UPnP/1.1 natbinder-fake-igd/1.0";

/// Far above any real request, small enough that a hostile client cannot make the fake allocate much.
const MAX_HEAD_BYTES: usize = 8 * 1024;
const MAX_BODY_BYTES: usize = 64 * 1024;
/// An M-SEARCH is a few hundred bytes; longer datagrams are cut here (and then fail to parse).
const MAX_DATAGRAM_BYTES: usize = 2048;
/// Connections served at once; more are closed at once (a client leaking connections shows up as refusals).
const MAX_CONNECTIONS: usize = 64;
/// A client gets this long to send its whole request (a slow sender cannot hold a thread forever).
const REQUEST_TIME_LIMIT: Duration = Duration::from_secs(5);
/// A client that stops reading our answer for this long is given up on.
const WRITE_TIMEOUT: Duration = Duration::from_secs(2);
/// Every waiting step wakes up this often to check the stop flag, so that dropping the fake is quick.
const POLL_INTERVAL: Duration = Duration::from_millis(20);
const STARTUP_TIME_LIMIT: Duration = Duration::from_secs(5);
/// Well over igd-next's 1 MiB response cap.
const HUGE_BODY_BYTES: usize = 16 * 1024 * 1024;
/// Bounds a `upnpc` run in [`run_upnpc`], in seconds (a hang there would otherwise hang the test).
const UPNPC_TIME_LIMIT_SECS: u32 = 60;

/// Scripted HTTP garbage: what the fake sends instead of a proper answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GarbageKind {
    /// Binary bytes that are not HTTP at all, then the connection closes.
    NotHttp,
    /// A complete `200 OK` head announcing a 4096-byte body, a few bytes of it, then the connection closes.
    TruncatedHttp,
    /// A complete `200 OK` whose body is not well-formed XML.
    MalformedXml,
    /// A `200 OK` announcing a 16 MiB XML-looking body, streamed until it is all sent or the client hangs up.
    HugeBody,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum HttpFault {
    Silence,
    Garbage(GarbageKind),
}

/// Which HTTP requests an [`HttpFault`] applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum HttpScope {
    /// Descriptions, SCPDs and control: discovery itself fails.
    Everything,
    /// SOAP control only: discovery succeeds, every call then fails.
    ControlOnly,
}

/// What the fake gateway does wrong. [`FakeScript::new`] is a well-behaved gateway; each builder method
/// adds one fault. Change it while the fake runs with [`FakeIgd::set_script`].
#[derive(Clone, Debug)]
pub struct FakeScript {
    permanent_only: bool,
    invalid_args_on_lease: bool,
    failing_adds: u32,
    not_authorized: bool,
    table_capacity: Option<usize>,
    http_fault: Option<(HttpFault, HttpScope)>,
    silent_ssdp: bool,
    external_ip: Ipv4Addr,
    igd_v2_listing: bool,
    listing_refused: bool,
}

impl Default for FakeScript {
    fn default() -> Self {
        Self {
            permanent_only: false,
            invalid_args_on_lease: false,
            failing_adds: 0,
            not_authorized: false,
            table_capacity: None,
            http_fault: None,
            silent_ssdp: false,
            external_ip: EXTERNAL_IP_PLACEHOLDER,
            igd_v2_listing: false,
            listing_refused: false,
        }
    }
}

impl FakeScript {
    /// A gateway that does everything right, with the lab's placeholder external address.
    pub fn new() -> Self {
        Self::default()
    }

    /// An IGDv1 router that only keeps permanent mappings: AddPortMapping with a non-zero
    /// NewLeaseDuration is refused with 725 OnlyPermanentLeasesSupported; lease 0 is accepted.
    pub fn permanent_only_725(mut self) -> Self {
        self.permanent_only = true;
        self
    }

    /// A router that rejects any lease as malformed: AddPortMapping with a non-zero NewLeaseDuration is
    /// refused with 402 Invalid Args; lease 0 is accepted.
    pub fn invalid_args_402_on_lease(mut self) -> Self {
        self.invalid_args_on_lease = true;
        self
    }

    /// The next `count` AddPortMapping calls that pass the argument and lease checks fail with
    /// 501 ActionFailed; later ones succeed. [`FakeIgd::set_script`] restarts the count.
    pub fn fail_adds_501(mut self, count: u32) -> Self {
        self.failing_adds = count;
        self
    }

    /// AddPortMapping and DeletePortMapping are refused with 606 Action not authorized (UPnP switched to
    /// read-only); reads still work.
    pub fn not_authorized_606(mut self) -> Self {
        self.not_authorized = true;
        self
    }

    /// The table holds at most `capacity` entries; adding a new one beyond that is refused with
    /// 728 NoPortMapsAvailable (updating an existing entry still works).
    pub fn table_full_728(mut self, capacity: usize) -> Self {
        self.table_capacity = Some(capacity);
        self
    }

    /// Every HTTP connection (description, SCPD, control) is accepted, its request read, and never
    /// answered: discovery by description fetch hangs until the client gives up.
    pub fn silent_http(mut self) -> Self {
        self.http_fault = Some((HttpFault::Silence, HttpScope::Everything));
        self
    }

    /// Descriptions are served, SOAP control calls are read and never answered: a gateway that was
    /// found and then hangs.
    pub fn silent_control(mut self) -> Self {
        self.http_fault = Some((HttpFault::Silence, HttpScope::ControlOnly));
        self
    }

    /// Every HTTP request (description, SCPD, control) is answered with `kind` of garbage.
    pub fn garbage_http(mut self, kind: GarbageKind) -> Self {
        self.http_fault = Some((HttpFault::Garbage(kind), HttpScope::Everything));
        self
    }

    /// Descriptions are served, SOAP control calls are answered with `kind` of garbage.
    pub fn garbage_control(mut self, kind: GarbageKind) -> Self {
        self.http_fault = Some((HttpFault::Garbage(kind), HttpScope::ControlOnly));
        self
    }

    /// M-SEARCH requests are recorded and never answered, and a reboot announces nothing: no SSDP at all.
    pub fn silent_ssdp(mut self) -> Self {
        self.silent_ssdp = true;
        self
    }

    /// The address GetExternalIPAddress reports, e.g. 10.0.0.1, 100.64.0.1 or 0.0.0.0 for another NAT
    /// upstream. Nothing is ever sent to it.
    pub fn external_ip(mut self, address: Ipv4Addr) -> Self {
        self.external_ip = address;
        self
    }

    /// An IGDv2 router: the description offers WANIPConnection:2 (answering searches for version 1
    /// too, as UPnP 1.1 asks), whose GetListOfPortMappings lists the table in one call, sorted by port,
    /// in a CDATA section, as miniupnpd does. Clients read the description once: choose it at
    /// [`FakeIgd::start`], or follow a change with [`FakeIgd::reboot`].
    pub fn igd_v2_listing(mut self) -> Self {
        self.igd_v2_listing = true;
        self
    }

    /// A router that will not list its table: GetListOfPortMappings and GetGenericPortMappingEntry are
    /// refused with 401 Invalid Action; GetSpecificPortMappingEntry still answers.
    pub fn listing_refused_401(mut self) -> Self {
        self.listing_refused = true;
        self
    }
}

/// One entry of the fake gateway's table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FakeMapping {
    /// "TCP" or "UDP".
    pub protocol: String,
    pub external_port: u16,
    pub internal_client: Ipv4Addr,
    pub internal_port: u16,
    /// As sent; empty for any remote host.
    pub remote_host: String,
    pub enabled: bool,
    pub description: String,
    /// The lease asked for, in seconds; 0 is permanent.
    pub lease: u32,
    /// When the fake drops this entry; None for a permanent one.
    pub expires_at: Option<Instant>,
}

/// How the fake answered a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FakeOutcome {
    /// Answered with success (an SSDP reply, or HTTP 200).
    Ok,
    /// Answered with HTTP 500 and a SOAP fault carrying this UPnP error code.
    UpnpError(u16),
    /// Answered with this HTTP status and no SOAP (400 malformed request, 404, 405, 413 too large).
    HttpError(u16),
    /// Read and deliberately not answered (scripted silence).
    Silence,
    /// Answered with scripted garbage.
    Garbage(GarbageKind),
    /// An M-SEARCH for a type this device does not have (or not `ssdp:discover`): no reply, as on a real device.
    NotForThisDevice,
}

/// One request the fake received, in arrival order.
#[derive(Clone, Debug)]
pub struct FakeRequest {
    pub at: Instant,
    pub from: SocketAddr,
    /// A SOAP action ("AddPortMapping"), "M-SEARCH", or an HTTP method and path ("GET /rootDesc.xml");
    /// "(malformed HTTP request)" for one that could not be read as HTTP.
    pub action: String,
    /// The SOAP arguments as sent, in order; for M-SEARCH its headers (names upper-cased).
    pub arguments: Vec<(String, String)>,
    /// NewLeaseDuration as sent, if the request carried a numeric one.
    pub lease: Option<u32>,
    pub outcome: FakeOutcome,
}

impl FakeRequest {
    /// The value of argument (or M-SEARCH header) `name`.
    pub fn argument(&self, name: &str) -> Option<&str> {
        self.arguments.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

/// The fake gateway, serving in the lab's gateway namespace until dropped.
pub struct FakeIgd {
    shared: Arc<Shared>,
    commands: mpsc::Sender<ServerCommand>,
    server: Option<JoinHandle<()>>,
}

impl FakeIgd {
    /// Starts the fake on the lab's gateway: SSDP on br0 and HTTP on 192.168.77.1 at a random port.
    /// The lab must not run miniupnpd (both use UDP port 1900).
    pub fn start(lab: &Lab, script: FakeScript) -> Result<Self> {
        let netns_path = lab.gw.path();
        let netns = File::open(&netns_path).with_context(|| format!("opening {}", netns_path.display()))?;
        let shared = Arc::new(Shared::new(script));
        let (command_sender, command_receiver) = mpsc::channel();
        let (ready_sender, ready_receiver) = mpsc::channel::<Result<()>>();
        let server_shared = shared.clone();
        let server = std::thread::Builder::new()
            .name("fake-igd".into())
            .spawn(move || {
                // SAFETY: setns on this thread only, with a namespace file we hold open; the thread and the
                // sockets it opens live in the gateway namespace from here on.
                if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    let error = io::Error::last_os_error();
                    let _ = ready_sender.send(Err(anyhow!("entering the gateway namespace: {error}")));
                    return;
                }
                drop(netns);
                match Server::open(server_shared, command_receiver) {
                    Ok(server) => {
                        let _ = ready_sender.send(Ok(()));
                        server.run();
                    }
                    Err(e) => {
                        let _ = ready_sender.send(Err(e));
                    }
                }
            })
            .context("spawning the fake IGD's thread")?;
        let ready = ready_receiver.recv_timeout(STARTUP_TIME_LIMIT);
        let fake = FakeIgd { shared, commands: command_sender, server: Some(server) };
        match ready {
            Ok(Ok(())) => Ok(fake),
            Ok(Err(e)) => Err(e.context("starting the fake IGD on the lab gateway")),
            Err(_) => bail!("the fake IGD did not start within {STARTUP_TIME_LIMIT:?}"),
        }
    }

    /// The HTTP port of the description and control URLs (a new one after each [`FakeIgd::reboot`]).
    pub fn http_port(&self) -> u16 {
        self.shared.lock().http_port
    }

    /// The root description URL that SSDP replies carry as LOCATION.
    pub fn rootdesc_url(&self) -> String {
        format!("http://{GW_LAN_IP}:{}{DESCRIPTION_PATH}", self.http_port())
    }

    /// BOOTID.UPNP.ORG: 1 at start, one more after each reboot.
    pub fn boot_id(&self) -> u32 {
        self.shared.lock().boot_id
    }

    /// The table now (expired leases already dropped), in GetGenericPortMappingEntry index order.
    pub fn mappings(&self) -> Vec<FakeMapping> {
        let mut state = self.shared.lock();
        state.expire_leases(Instant::now());
        state.mappings.clone()
    }

    /// Every request received so far.
    pub fn requests(&self) -> Vec<FakeRequest> {
        self.shared.lock().requests.clone()
    }

    /// Every request received so far, forgetting them (to look at one phase of a test at a time).
    pub fn take_requests(&self) -> Vec<FakeRequest> {
        std::mem::take(&mut self.shared.lock().requests)
    }

    /// Replaces the script from the next request on; the table and the request log are kept.
    pub fn set_script(&self, script: FakeScript) {
        let mut state = self.shared.lock();
        state.failing_adds_left = script.failing_adds;
        state.script = script;
    }

    /// Reboots the gateway: the table empties, HTTP moves to a new port (the old one refuses
    /// connections), BOOTID.UPNP.ORG goes up by one and an ssdp:alive NOTIFY carrying it goes to
    /// 239.255.255.250:1900 on br0 (unless the script is [`FakeScript::silent_ssdp`]). The script and
    /// the request log are kept. Returns the new HTTP port.
    pub fn reboot(&self) -> Result<u16> {
        let (reply_sender, reply_receiver) = mpsc::channel();
        self.commands
            .send(ServerCommand::Reboot(reply_sender))
            .map_err(|_| anyhow!("rebooting the fake IGD: its thread has stopped"))?;
        reply_receiver
            .recv_timeout(STARTUP_TIME_LIMIT)
            .map_err(|_| anyhow!("the fake IGD did not reboot within {STARTUP_TIME_LIMIT:?}"))?
    }

    /// Runs `upnpc -u <this fake's description URL> ARGS` in `from`; see [`run_upnpc`].
    pub fn upnpc(&self, from: &Netns, args: &[&str]) -> Result<String> {
        let url = self.rootdesc_url();
        let mut all = vec!["-u", url.as_str()];
        all.extend_from_slice(args);
        run_upnpc(from, &all)
    }
}

impl Drop for FakeIgd {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(server) = self.server.take() {
            let _ = server.join();
        }
    }
}

/// Runs miniupnpc's `upnpc ARGS` in `from` and returns all it printed (stdout, then stderr), whatever
/// its exit status: fault tests look at refusals, which upnpc reports with a failing status. Fails only
/// if upnpc could not run or did not finish within 60 s.
pub fn run_upnpc(from: &Netns, args: &[&str]) -> Result<String> {
    crate::run_client_tool(from, "upnpc", UPNPC_TIME_LIMIT_SECS, args)
}

/// State shared by the server thread, the connection threads and the test's [`FakeIgd`] handle.
struct Shared {
    stop: AtomicBool,
    state: Mutex<State>,
}

struct State {
    script: FakeScript,
    /// What is left of the script's [`FakeScript::fail_adds_501`] count.
    failing_adds_left: u32,
    mappings: Vec<FakeMapping>,
    requests: Vec<FakeRequest>,
    http_port: u16,
    boot_id: u32,
    /// Since the last (re)boot, for GetStatusInfo's uptime.
    booted_at: Instant,
}

impl Shared {
    fn new(script: FakeScript) -> Self {
        let state = State {
            failing_adds_left: script.failing_adds,
            script,
            mappings: Vec::new(),
            requests: Vec::new(),
            http_port: 0,
            boot_id: 1,
            booted_at: Instant::now(),
        };
        Self { stop: AtomicBool::new(false), state: Mutex::new(state) }
    }

    /// A panicking connection thread must not take the whole fake down with a poisoned lock.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// Records an M-SEARCH from a LAN host and returns the replies to send it.
    fn answer_search(&self, from: SocketAddr, datagram: &str) -> Vec<String> {
        let Some(headers) = parse_search(datagram) else { return Vec::new() };
        let header = |name: &str| headers.iter().find(|(n, _)| n == name).map_or("", |(_, v)| v.as_str());
        let mut state = self.lock();
        let served = state.search_targets();
        let targets: Vec<&str> = if header("MAN").trim_matches('"') != "ssdp:discover" {
            Vec::new()
        } else if header("ST") == "ssdp:all" {
            served
        } else {
            served.into_iter().filter(|t| *t == header("ST")).collect()
        };
        let (replies, outcome) = if state.script.silent_ssdp {
            (Vec::new(), FakeOutcome::Silence)
        } else if targets.is_empty() {
            (Vec::new(), FakeOutcome::NotForThisDevice)
        } else {
            (targets.iter().map(|t| state.search_reply(t)).collect(), FakeOutcome::Ok)
        };
        state.requests.push(FakeRequest {
            at: Instant::now(),
            from,
            action: "M-SEARCH".into(),
            arguments: headers,
            lease: None,
            outcome,
        });
        replies
    }

    /// Records an HTTP request and decides the answer.
    fn answer_http(&self, from: SocketAddr, request: &HttpRequest) -> Reply {
        let now = Instant::now();
        let mut state = self.lock();
        state.expire_leases(now);
        let is_control = [WANIP_CONTROL_PATH, CIF_CONTROL_PATH].contains(&request.path.as_str());
        let call = if request.method == "POST" && is_control { soap_call(request) } else { None };
        let action = call.as_ref().map_or_else(|| format!("{} {}", request.method, request.path), |c| c.action.clone());
        let arguments = call.as_ref().and_then(|c| c.arguments.clone()).unwrap_or_default();
        let lease = arguments.iter().find(|(n, _)| n == "NewLeaseDuration").and_then(|(_, v)| v.trim().parse().ok());
        let fault = state.script.http_fault.filter(|(_, scope)| *scope == HttpScope::Everything || is_control);
        let (reply, outcome) = match fault {
            Some((HttpFault::Silence, _)) => (Reply::Silence, FakeOutcome::Silence),
            Some((HttpFault::Garbage(kind), _)) => (Reply::Garbage(kind), FakeOutcome::Garbage(kind)),
            None => {
                let (bytes, outcome) = state.route(request, call.as_ref(), now);
                (Reply::Bytes(bytes), outcome)
            }
        };
        state.requests.push(FakeRequest { at: now, from, action, arguments, lease, outcome });
        reply
    }

    fn record_unreadable_request(&self, from: SocketAddr, status: u16) {
        self.lock().requests.push(FakeRequest {
            at: Instant::now(),
            from,
            action: "(malformed HTTP request)".into(),
            arguments: Vec::new(),
            lease: None,
            outcome: FakeOutcome::HttpError(status),
        });
    }
}

fn usn(target: &str) -> String {
    format!("uuid:{DEVICE_UUID}::{target}")
}

impl State {
    fn expire_leases(&mut self, now: Instant) {
        self.mappings.retain(|m| m.expires_at.is_none_or(|t| t > now));
    }

    /// The WANIPConnection version the description offers.
    fn wanip_service(&self) -> &'static str {
        if self.script.igd_v2_listing {
            WANIP_SERVICE_V2
        } else {
            WANIP_SERVICE
        }
    }

    /// What this device answers M-SEARCH for and announces: an IGDv2 device also answers for version 1
    /// of its service (UPnP 1.1 §1.3.2), which is what igd-next searches for.
    fn search_targets(&self) -> Vec<&'static str> {
        let mut targets = SEARCH_TARGETS.to_vec();
        if self.script.igd_v2_listing {
            targets.push(WANIP_SERVICE_V2);
        }
        targets
    }

    fn location(&self) -> String {
        format!("http://{GW_LAN_IP}:{}{DESCRIPTION_PATH}", self.http_port)
    }

    fn search_reply(&self, target: &str) -> String {
        format!(
            "HTTP/1.1 200 OK\r\nCACHE-CONTROL: max-age=120\r\nST: {target}\r\nUSN: {}\r\nEXT:\r\n\
             SERVER: {SERVER_HEADER}\r\nLOCATION: {}\r\nOPT: \"http://schemas.upnp.org/upnp/1/0/\"; ns=01\r\n\
             01-NLS: {boot}\r\nBOOTID.UPNP.ORG: {boot}\r\nCONFIGID.UPNP.ORG: {CONFIG_ID}\r\n\r\n",
            usn(target),
            self.location(),
            boot = self.boot_id,
        )
    }

    fn alive_notifications(&self) -> Vec<String> {
        self.search_targets()
            .into_iter()
            .map(|target| {
                format!(
                    "NOTIFY * HTTP/1.1\r\nHOST: {SSDP_GROUP}:{SSDP_PORT}\r\nCACHE-CONTROL: max-age=120\r\n\
                     LOCATION: {}\r\nSERVER: {SERVER_HEADER}\r\nNT: {target}\r\nUSN: {}\r\nNTS: ssdp:alive\r\n\
                     OPT: \"http://schemas.upnp.org/upnp/1/0/\"; ns=01\r\n01-NLS: {boot}\r\n\
                     BOOTID.UPNP.ORG: {boot}\r\nCONFIGID.UPNP.ORG: {CONFIG_ID}\r\n\r\n",
                    self.location(),
                    usn(target),
                    boot = self.boot_id,
                )
            })
            .collect()
    }

    /// The answer to a request no scripted HTTP fault applies to.
    fn route(&mut self, request: &HttpRequest, call: Option<&SoapCall>, now: Instant) -> (Vec<u8>, FakeOutcome) {
        match (request.method.as_str(), request.path.as_str()) {
            ("GET", DESCRIPTION_PATH) => (http_response(200, &root_description(self.wanip_service())), FakeOutcome::Ok),
            ("GET", WANIP_SCPD_PATH) => {
                let mut actions = WANIP_ACTIONS.to_vec();
                let mut state_variables = WANIP_STATE_VARIABLES.to_vec();
                if self.script.igd_v2_listing {
                    actions.push(GET_LIST_OF_PORT_MAPPINGS);
                    state_variables.extend_from_slice(LISTING_STATE_VARIABLES);
                }
                (http_response(200, &scpd(&actions, &state_variables)), FakeOutcome::Ok)
            }
            ("GET", CIF_SCPD_PATH) => (http_response(200, &scpd(CIF_ACTIONS, CIF_STATE_VARIABLES)), FakeOutcome::Ok),
            ("POST", path @ (WANIP_CONTROL_PATH | CIF_CONTROL_PATH)) => {
                let Some(call) = call else {
                    return (soap_fault(INVALID_ACTION), FakeOutcome::UpnpError(INVALID_ACTION.code));
                };
                let result = match (&call.arguments, path, call.service.as_str()) {
                    (None, _, _) => Err(INVALID_ARGS),
                    (Some(arguments), WANIP_CONTROL_PATH, service) if service == self.wanip_service() => {
                        self.wanip_action(&call.action, &Arguments(arguments), now)
                    }
                    (Some(_), CIF_CONTROL_PATH, CIF_SERVICE) => cif_action(&call.action),
                    _ => Err(INVALID_ACTION),
                };
                match result {
                    Ok(values) => (soap_response(&call.service, &call.action, &values), FakeOutcome::Ok),
                    Err(error) => (soap_fault(error), FakeOutcome::UpnpError(error.code)),
                }
            }
            ("GET" | "POST", _) => (http_status(404), FakeOutcome::HttpError(404)),
            // SUBSCRIBE and the like: this gateway offers no eventing.
            _ => (http_status(405), FakeOutcome::HttpError(405)),
        }
    }

    fn wanip_action(
        &mut self,
        action: &str,
        args: &Arguments,
        now: Instant,
    ) -> Result<Vec<(&'static str, String)>, UpnpError> {
        match action {
            "AddPortMapping" => self.add_port_mapping(args, now).map(|()| Vec::new()),
            "DeletePortMapping" => self.delete_port_mapping(args).map(|()| Vec::new()),
            "GetGenericPortMappingEntry" | "GetListOfPortMappings" if self.script.listing_refused => {
                Err(INVALID_ACTION)
            }
            "GetListOfPortMappings" if self.script.igd_v2_listing => {
                self.list_port_mappings(args, now).map(|listing| vec![("NewPortListing", listing)])
            }
            "GetGenericPortMappingEntry" => {
                let index: usize = args.number("NewPortMappingIndex")?;
                let mapping = self.mappings.get(index).ok_or(ARRAY_INDEX_INVALID)?;
                let mut values = vec![
                    ("NewRemoteHost", mapping.remote_host.clone()),
                    ("NewExternalPort", mapping.external_port.to_string()),
                    ("NewProtocol", mapping.protocol.clone()),
                ];
                values.extend(entry_values(mapping, now));
                Ok(values)
            }
            "GetSpecificPortMappingEntry" => {
                let (protocol, external_port) = mapping_key(args)?;
                let mapping = self.find(protocol, external_port).map(|i| &self.mappings[i]).ok_or(NO_SUCH_ENTRY)?;
                Ok(entry_values(mapping, now))
            }
            "GetExternalIPAddress" => Ok(vec![("NewExternalIPAddress", self.script.external_ip.to_string())]),
            "GetStatusInfo" => Ok(vec![
                ("NewConnectionStatus", "Connected".into()),
                ("NewLastConnectionError", "ERROR_NONE".into()),
                ("NewUptime", self.booted_at.elapsed().as_secs().to_string()),
            ]),
            "GetConnectionTypeInfo" => {
                Ok(vec![("NewConnectionType", "IP_Routed".into()), ("NewPossibleConnectionTypes", "IP_Routed".into())])
            }
            _ => Err(INVALID_ACTION),
        }
    }

    /// Argument checks first (as a strict router does), then the scripted refusals, then the table.
    fn add_port_mapping(&mut self, args: &Arguments, now: Instant) -> Result<(), UpnpError> {
        let remote_host = args.text("NewRemoteHost")?.trim().to_string();
        let (protocol, external_port) = mapping_key(args)?;
        let internal_port: u16 = args.number("NewInternalPort")?;
        let internal_client: Ipv4Addr = args.number("NewInternalClient")?;
        let enabled = match args.text("NewEnabled")?.trim() {
            "1" | "true" => true,
            "0" | "false" => false,
            _ => return Err(INVALID_ARGS),
        };
        let description = args.text("NewPortMappingDescription")?.to_string();
        let lease: u32 = args.number("NewLeaseDuration")?;
        if internal_port == 0 {
            return Err(INVALID_ARGS);
        }
        if external_port == 0 {
            return Err(WILDCARD_EXTERNAL_PORT);
        }
        if self.script.not_authorized {
            return Err(NOT_AUTHORIZED);
        }
        if lease != 0 && self.script.permanent_only {
            return Err(ONLY_PERMANENT_LEASES);
        }
        if lease != 0 && self.script.invalid_args_on_lease {
            return Err(INVALID_ARGS);
        }
        if self.failing_adds_left > 0 {
            self.failing_adds_left -= 1;
            return Err(ACTION_FAILED);
        }
        let mapping = FakeMapping {
            protocol: protocol.to_string(),
            external_port,
            internal_client,
            internal_port,
            remote_host,
            enabled,
            description,
            lease,
            expires_at: (lease != 0).then(|| now + Duration::from_secs(lease.into())),
        };
        match self.find(protocol, external_port) {
            // The same host asking again updates its entry (new lease, description, internal port).
            Some(i) if self.mappings[i].internal_client == internal_client => self.mappings[i] = mapping,
            Some(_) => return Err(CONFLICT),
            None if self.script.table_capacity.is_some_and(|capacity| self.mappings.len() >= capacity) => {
                return Err(NO_PORT_MAPS_AVAILABLE)
            }
            None => self.mappings.push(mapping),
        }
        Ok(())
    }

    /// GetListOfPortMappings (IGDv2): the entries of one protocol within the port range, sorted by port,
    /// at most NewNumberOfPorts of them (0: all), as the PortMappingList document that NewPortListing
    /// carries. NewManage is read and not acted on: every host's mappings are listed.
    fn list_port_mappings(&self, args: &Arguments, now: Instant) -> Result<String, UpnpError> {
        let start_port: u16 = args.number("NewStartPort")?;
        let end_port: u16 = args.number("NewEndPort")?;
        let protocol = args.text("NewProtocol")?;
        if protocol != "TCP" && protocol != "UDP" {
            return Err(INVALID_ARGS);
        }
        args.text("NewManage")?;
        let most: usize = args.number("NewNumberOfPorts")?;
        if start_port > end_port {
            return Err(INCONSISTENT_PARAMETERS);
        }
        let mut listed: Vec<&FakeMapping> = self
            .mappings
            .iter()
            .filter(|m| m.protocol == protocol && (start_port..=end_port).contains(&m.external_port))
            .collect();
        listed.sort_by_key(|m| m.external_port);
        if most != 0 {
            listed.truncate(most);
        }
        if listed.is_empty() {
            return Err(PORT_MAPPING_NOT_FOUND);
        }
        let mut listing = String::from(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<p:PortMappingList \
             xmlns:p=\"urn:schemas-upnp-org:gw:WANIPConnection\" xmlns:xsi=\"http://www.w3.org/2001/XMLSchema-instance\" \
             xsi:schemaLocation=\"urn:schemas-upnp-org:gw:WANIPConnection \
             http://www.upnp.org/schemas/gw/WANIPConnection-v2.xsd\">",
        );
        for m in listed {
            let _ = write!(
                listing,
                "<p:PortMappingEntry><p:NewRemoteHost>{}</p:NewRemoteHost><p:NewExternalPort>{}</p:NewExternalPort>\
                 <p:NewProtocol>{}</p:NewProtocol><p:NewInternalPort>{}</p:NewInternalPort>\
                 <p:NewInternalClient>{}</p:NewInternalClient><p:NewEnabled>{}</p:NewEnabled>\
                 <p:NewDescription>{}</p:NewDescription><p:NewLeaseTime>{}</p:NewLeaseTime></p:PortMappingEntry>",
                xml_escape(&m.remote_host),
                m.external_port,
                m.protocol,
                m.internal_port,
                m.internal_client,
                u8::from(m.enabled),
                xml_escape(&m.description),
                remaining_lease(m, now)
            );
        }
        listing.push_str("</p:PortMappingList>");
        Ok(listing)
    }

    fn delete_port_mapping(&mut self, args: &Arguments) -> Result<(), UpnpError> {
        let (protocol, external_port) = mapping_key(args)?;
        if self.script.not_authorized {
            return Err(NOT_AUTHORIZED);
        }
        let index = self.find(protocol, external_port).ok_or(NO_SUCH_ENTRY)?;
        self.mappings.remove(index);
        Ok(())
    }

    fn find(&self, protocol: &str, external_port: u16) -> Option<usize> {
        self.mappings.iter().position(|m| m.protocol == protocol && m.external_port == external_port)
    }
}

/// NewProtocol and NewExternalPort, checked: protocols only in the upper case the spec uses.
fn mapping_key<'a>(args: &'a Arguments) -> Result<(&'a str, u16), UpnpError> {
    args.text("NewRemoteHost")?;
    let protocol = args.text("NewProtocol")?;
    if protocol != "TCP" && protocol != "UDP" {
        return Err(INVALID_ARGS);
    }
    Ok((protocol, args.number("NewExternalPort")?))
}

/// The seconds left of a mapping's lease (at least 1 until it expires); 0 for a permanent one.
fn remaining_lease(mapping: &FakeMapping, now: Instant) -> u32 {
    mapping.expires_at.map_or(0, |t| {
        let seconds = t.saturating_duration_since(now).as_secs().max(1);
        u32::try_from(seconds).unwrap_or(u32::MAX)
    })
}

/// The values GetGenericPortMappingEntry and GetSpecificPortMappingEntry share; the lease is what remains.
fn entry_values(mapping: &FakeMapping, now: Instant) -> Vec<(&'static str, String)> {
    let remaining = remaining_lease(mapping, now);
    vec![
        ("NewInternalPort", mapping.internal_port.to_string()),
        ("NewInternalClient", mapping.internal_client.to_string()),
        ("NewEnabled", if mapping.enabled { "1" } else { "0" }.into()),
        ("NewPortMappingDescription", mapping.description.clone()),
        ("NewLeaseDuration", remaining.to_string()),
    ]
}

/// WANCommonInterfaceConfig: fixed answers, present so that miniupnpc sees a complete IGD.
fn cif_action(action: &str) -> Result<Vec<(&'static str, String)>, UpnpError> {
    let values: &[(&'static str, &str)] = match action {
        "GetCommonLinkProperties" => &[
            ("NewWANAccessType", "Ethernet"),
            ("NewLayer1UpstreamMaxBitRate", "1000000000"),
            ("NewLayer1DownstreamMaxBitRate", "1000000000"),
            ("NewPhysicalLinkStatus", "Up"),
        ],
        "GetTotalBytesSent" => &[("NewTotalBytesSent", "0")],
        "GetTotalBytesReceived" => &[("NewTotalBytesReceived", "0")],
        "GetTotalPacketsSent" => &[("NewTotalPacketsSent", "0")],
        "GetTotalPacketsReceived" => &[("NewTotalPacketsReceived", "0")],
        _ => return Err(INVALID_ACTION),
    };
    Ok(values.iter().map(|(name, value)| (*name, value.to_string())).collect())
}

/// A UPnP error as it travels in a SOAP fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct UpnpError {
    code: u16,
    description: &'static str,
}

const INVALID_ACTION: UpnpError = UpnpError { code: 401, description: "Invalid Action" };
const INVALID_ARGS: UpnpError = UpnpError { code: 402, description: "Invalid Args" };
const ACTION_FAILED: UpnpError = UpnpError { code: 501, description: "Action Failed" };
const NOT_AUTHORIZED: UpnpError = UpnpError { code: 606, description: "Action not authorized" };
const ARRAY_INDEX_INVALID: UpnpError = UpnpError { code: 713, description: "SpecifiedArrayIndexInvalid" };
const NO_SUCH_ENTRY: UpnpError = UpnpError { code: 714, description: "NoSuchEntryInArray" };
const WILDCARD_EXTERNAL_PORT: UpnpError = UpnpError { code: 716, description: "WildCardNotPermittedInExtPort" };
const CONFLICT: UpnpError = UpnpError { code: 718, description: "ConflictInMappingEntry" };
const ONLY_PERMANENT_LEASES: UpnpError = UpnpError { code: 725, description: "OnlyPermanentLeasesSupported" };
const NO_PORT_MAPS_AVAILABLE: UpnpError = UpnpError { code: 728, description: "NoPortMapsAvailable" };
const PORT_MAPPING_NOT_FOUND: UpnpError = UpnpError { code: 730, description: "PortMappingNotFound" };
const INCONSISTENT_PARAMETERS: UpnpError = UpnpError { code: 733, description: "InconsistentParameters" };

/// A SOAP call's arguments; a missing or unparsable one is 402 Invalid Args, as on a real router.
struct Arguments<'a>(&'a [(String, String)]);

impl Arguments<'_> {
    fn text(&self, name: &str) -> Result<&str, UpnpError> {
        self.0.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str()).ok_or(INVALID_ARGS)
    }

    fn number<T: FromStr>(&self, name: &str) -> Result<T, UpnpError> {
        self.text(name)?.trim().parse().map_err(|_| INVALID_ARGS)
    }
}

/// A POST to a control URL, as far as it could be understood.
struct SoapCall {
    service: String,
    action: String,
    /// None when the body holds no well-formed `<action>` element.
    arguments: Option<Vec<(String, String)>>,
}

/// Reads the SOAPAction header (`"<service type>#<action>"`) and the action's arguments from the body.
/// None without a usable SOAPAction header.
fn soap_call(request: &HttpRequest) -> Option<SoapCall> {
    let header = request.header("SOAPAction")?.trim().trim_matches('"');
    let (service, action) = header.split_once('#')?;
    if action.is_empty() {
        return None;
    }
    let arguments = std::str::from_utf8(&request.body).ok().and_then(|body| soap_arguments(body, action));
    Some(SoapCall { service: service.to_string(), action: action.to_string(), arguments })
}

/// The child elements of the `action` element in a SOAP body, as (local name, unescaped text), in order.
/// None when there is no such element, it is not closed, or an argument is not a simple text element.
fn soap_arguments(body: &str, action: &str) -> Option<Vec<(String, String)>> {
    let mut arguments = Vec::new();
    let mut inside_action = false;
    // The argument element being read: its name and where its text starts.
    let mut open_argument: Option<(String, usize)> = None;
    let mut position = 0;
    while let Some(offset) = body[position..].find('<') {
        let tag_start = position + offset;
        let tag_end = tag_start + body[tag_start..].find('>')?;
        let tag = &body[tag_start + 1..tag_end];
        position = tag_end + 1;
        if tag.starts_with('?') || tag.starts_with('!') {
            continue;
        }
        let closing = tag.starts_with('/');
        let self_closing = tag.ends_with('/');
        let name = tag.trim_start_matches('/').trim_end_matches('/').split_whitespace().next().unwrap_or("");
        let local_name = name.rsplit(':').next().unwrap_or(name);
        if !inside_action {
            if !closing && local_name == action {
                if self_closing {
                    return Some(arguments);
                }
                inside_action = true;
            }
            continue;
        }
        match (open_argument.take(), closing) {
            (None, false) if self_closing => arguments.push((local_name.to_string(), String::new())),
            (None, false) => open_argument = Some((local_name.to_string(), position)),
            (None, true) => return (local_name == action).then_some(arguments),
            (Some((argument, text_start)), true) if argument == local_name => {
                arguments.push((argument, xml_unescape(&body[text_start..tag_start])?));
            }
            // A mismatched end tag, or an element nested inside an argument.
            (Some(_), _) => return None,
        }
    }
    None
}

fn xml_unescape(text: &str) -> Option<String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(amp) = rest.find('&') {
        out.push_str(&rest[..amp]);
        let semicolon = rest[amp..].find(';')? + amp;
        let entity = &rest[amp + 1..semicolon];
        let c = match entity {
            "amp" => '&',
            "lt" => '<',
            "gt" => '>',
            "quot" => '"',
            "apos" => '\'',
            _ => {
                let code = match entity.strip_prefix("#x").or_else(|| entity.strip_prefix("#X")) {
                    Some(hex) => u32::from_str_radix(hex, 16).ok()?,
                    None => entity.strip_prefix('#')?.parse().ok()?,
                };
                char::from_u32(code)?
            }
        };
        out.push(c);
        rest = &rest[semicolon + 1..];
    }
    out.push_str(rest);
    Some(out)
}

fn xml_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            _ => out.push(c),
        }
    }
    out
}

/// The headers of an `M-SEARCH * HTTP/1.1` datagram (names upper-cased); None for anything else.
fn parse_search(datagram: &str) -> Option<Vec<(String, String)>> {
    let mut lines = datagram.split("\r\n");
    if lines.next()?.split_whitespace().collect::<Vec<_>>() != ["M-SEARCH", "*", "HTTP/1.1"] {
        return None;
    }
    Some(
        lines
            .filter_map(|line| line.split_once(':'))
            .map(|(name, value)| (name.trim().to_ascii_uppercase(), value.trim().to_string()))
            .collect(),
    )
}

const SOAP_ENVELOPE_OPEN: &str =
    "<?xml version=\"1.0\"?>\r\n<s:Envelope xmlns:s=\"http://schemas.xmlsoap.org/soap/envelope/\" \
     s:encodingStyle=\"http://schemas.xmlsoap.org/soap/encoding/\"><s:Body>";
const SOAP_ENVELOPE_CLOSE: &str = "</s:Body></s:Envelope>\r\n";

/// Output arguments that carry an XML document: sent in a CDATA section, as miniupnpd sends them (and
/// as miniupnpc reads them: it does not decode entities there). The document escapes its own text, so
/// it holds no "]]>".
const DOCUMENT_ARGUMENTS: [&str; 1] = ["NewPortListing"];

fn soap_response(service: &str, action: &str, values: &[(&str, String)]) -> Vec<u8> {
    let mut body = format!("{SOAP_ENVELOPE_OPEN}<u:{action}Response xmlns:u=\"{service}\">");
    for (name, value) in values {
        if DOCUMENT_ARGUMENTS.contains(name) {
            let _ = write!(body, "<{name}><![CDATA[{value}]]></{name}>");
        } else {
            let _ = write!(body, "<{name}>{}</{name}>", xml_escape(value));
        }
    }
    let _ = write!(body, "</u:{action}Response>{SOAP_ENVELOPE_CLOSE}");
    http_response(200, &body)
}

/// HTTP 500 with the s:Fault / UPnPError body that miniupnpd and commercial routers send.
fn soap_fault(error: UpnpError) -> Vec<u8> {
    let body = format!(
        "{SOAP_ENVELOPE_OPEN}<s:Fault><faultcode>s:Client</faultcode><faultstring>UPnPError</faultstring><detail>\
         <UPnPError xmlns=\"urn:schemas-upnp-org:control-1-0\"><errorCode>{}</errorCode>\
         <errorDescription>{}</errorDescription></UPnPError></detail></s:Fault>{SOAP_ENVELOPE_CLOSE}",
        error.code, error.description
    );
    http_response(500, &body)
}

fn reason_phrase(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        413 => "Payload Too Large",
        500 => "Internal Server Error",
        _ => "Error",
    }
}

/// A complete response with an XML body; every connection closes after one answer.
fn http_response(status: u16, body: &str) -> Vec<u8> {
    let mut response = http_head(status, body.len());
    response.extend_from_slice(body.as_bytes());
    response
}

fn http_head(status: u16, content_length: usize) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: text/xml; charset=\"utf-8\"\r\nConnection: close\r\n\
         Content-Length: {content_length}\r\nServer: {SERVER_HEADER}\r\nExt:\r\n\r\n",
        reason_phrase(status)
    )
    .into_bytes()
}

fn http_status(status: u16) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{reason}",
        reason_phrase(status).len(),
        reason = reason_phrase(status)
    )
    .into_bytes()
}

/// The root description, offering `wanip_service` (WANIPConnection:1 or :2).
fn root_description(wanip_service: &str) -> String {
    let service = |service_type: &str, id: &str, control: &str, scpd: &str| {
        format!(
            "<service><serviceType>{service_type}</serviceType><serviceId>urn:upnp-org:serviceId:{id}</serviceId>\
             <controlURL>{control}</controlURL><eventSubURL>/evt/{id}</eventSubURL><SCPDURL>{scpd}</SCPDURL></service>"
        )
    };
    let device = |device_type: &str, name: &str, suffix: &str, services: String, children: String| {
        format!(
            "<device><deviceType>{device_type}</deviceType><friendlyName>{name}</friendlyName>\
             <manufacturer>natbinder-lab</manufacturer><modelName>fake-igd</modelName>\
             <UDN>uuid:{DEVICE_UUID}{suffix}</UDN><serviceList>{services}</serviceList>{children}</device>"
        )
    };
    let connection_device = device(
        WAN_CONNECTION_DEVICE,
        "WAN connection",
        "-2",
        service(wanip_service, "WANIPConn1", WANIP_CONTROL_PATH, WANIP_SCPD_PATH),
        String::new(),
    );
    let wan_device = device(
        WAN_DEVICE,
        "WAN device",
        "-1",
        service(CIF_SERVICE, "WANCommonIFC1", CIF_CONTROL_PATH, CIF_SCPD_PATH),
        format!("<deviceList>{connection_device}</deviceList>"),
    );
    let root_device =
        device(IGD_DEVICE, "natbinder fake IGD", "", String::new(), format!("<deviceList>{wan_device}</deviceList>"));
    format!(
        "<?xml version=\"1.0\"?>\r\n<root xmlns=\"urn:schemas-upnp-org:device-1-0\" configId=\"{CONFIG_ID}\">\
         <specVersion><major>1</major><minor>1</minor></specVersion>{root_device}</root>\r\n"
    )
}

/// An action of a service description: its name and (argument, direction, related state variable).
type ActionSpec = (&'static str, &'static [(&'static str, &'static str, &'static str)]);

/// The WANIPConnection:1 actions the fake implements. igd-next builds its requests from the "in"
/// arguments listed here, in this order. No AddAnyPortMapping: IGDv1 does not have it.
const WANIP_ACTIONS: &[ActionSpec] = &[
    (
        "AddPortMapping",
        &[
            ("NewRemoteHost", "in", "RemoteHost"),
            ("NewExternalPort", "in", "ExternalPort"),
            ("NewProtocol", "in", "PortMappingProtocol"),
            ("NewInternalPort", "in", "InternalPort"),
            ("NewInternalClient", "in", "InternalClient"),
            ("NewEnabled", "in", "PortMappingEnabled"),
            ("NewPortMappingDescription", "in", "PortMappingDescription"),
            ("NewLeaseDuration", "in", "PortMappingLeaseDuration"),
        ],
    ),
    (
        "DeletePortMapping",
        &[
            ("NewRemoteHost", "in", "RemoteHost"),
            ("NewExternalPort", "in", "ExternalPort"),
            ("NewProtocol", "in", "PortMappingProtocol"),
        ],
    ),
    (
        "GetGenericPortMappingEntry",
        &[
            ("NewPortMappingIndex", "in", "PortMappingNumberOfEntries"),
            ("NewRemoteHost", "out", "RemoteHost"),
            ("NewExternalPort", "out", "ExternalPort"),
            ("NewProtocol", "out", "PortMappingProtocol"),
            ("NewInternalPort", "out", "InternalPort"),
            ("NewInternalClient", "out", "InternalClient"),
            ("NewEnabled", "out", "PortMappingEnabled"),
            ("NewPortMappingDescription", "out", "PortMappingDescription"),
            ("NewLeaseDuration", "out", "PortMappingLeaseDuration"),
        ],
    ),
    (
        "GetSpecificPortMappingEntry",
        &[
            ("NewRemoteHost", "in", "RemoteHost"),
            ("NewExternalPort", "in", "ExternalPort"),
            ("NewProtocol", "in", "PortMappingProtocol"),
            ("NewInternalPort", "out", "InternalPort"),
            ("NewInternalClient", "out", "InternalClient"),
            ("NewEnabled", "out", "PortMappingEnabled"),
            ("NewPortMappingDescription", "out", "PortMappingDescription"),
            ("NewLeaseDuration", "out", "PortMappingLeaseDuration"),
        ],
    ),
    ("GetExternalIPAddress", &[("NewExternalIPAddress", "out", "ExternalIPAddress")]),
    (
        "GetStatusInfo",
        &[
            ("NewConnectionStatus", "out", "ConnectionStatus"),
            ("NewLastConnectionError", "out", "LastConnectionError"),
            ("NewUptime", "out", "Uptime"),
        ],
    ),
    (
        "GetConnectionTypeInfo",
        &[
            ("NewConnectionType", "out", "ConnectionType"),
            ("NewPossibleConnectionTypes", "out", "PossibleConnectionTypes"),
        ],
    ),
];

/// IGDv2's listing call, offered with [`FakeScript::igd_v2_listing`].
const GET_LIST_OF_PORT_MAPPINGS: ActionSpec = (
    "GetListOfPortMappings",
    &[
        ("NewStartPort", "in", "ExternalPort"),
        ("NewEndPort", "in", "ExternalPort"),
        ("NewProtocol", "in", "PortMappingProtocol"),
        ("NewManage", "in", "A_ARG_TYPE_Manage"),
        ("NewNumberOfPorts", "in", "PortMappingNumberOfEntries"),
        ("NewPortListing", "out", "A_ARG_TYPE_PortListing"),
    ],
);

const LISTING_STATE_VARIABLES: &[(&str, &str)] =
    &[("A_ARG_TYPE_Manage", "boolean"), ("A_ARG_TYPE_PortListing", "string")];

const WANIP_STATE_VARIABLES: &[(&str, &str)] = &[
    ("ConnectionType", "string"),
    ("PossibleConnectionTypes", "string"),
    ("ConnectionStatus", "string"),
    ("Uptime", "ui4"),
    ("LastConnectionError", "string"),
    ("ExternalIPAddress", "string"),
    ("PortMappingNumberOfEntries", "ui2"),
    ("PortMappingEnabled", "boolean"),
    ("PortMappingLeaseDuration", "ui4"),
    ("RemoteHost", "string"),
    ("ExternalPort", "ui2"),
    ("InternalPort", "ui2"),
    ("PortMappingProtocol", "string"),
    ("InternalClient", "string"),
    ("PortMappingDescription", "string"),
];

const CIF_ACTIONS: &[ActionSpec] = &[
    (
        "GetCommonLinkProperties",
        &[
            ("NewWANAccessType", "out", "WANAccessType"),
            ("NewLayer1UpstreamMaxBitRate", "out", "Layer1UpstreamMaxBitRate"),
            ("NewLayer1DownstreamMaxBitRate", "out", "Layer1DownstreamMaxBitRate"),
            ("NewPhysicalLinkStatus", "out", "PhysicalLinkStatus"),
        ],
    ),
    ("GetTotalBytesSent", &[("NewTotalBytesSent", "out", "TotalBytesSent")]),
    ("GetTotalBytesReceived", &[("NewTotalBytesReceived", "out", "TotalBytesReceived")]),
    ("GetTotalPacketsSent", &[("NewTotalPacketsSent", "out", "TotalPacketsSent")]),
    ("GetTotalPacketsReceived", &[("NewTotalPacketsReceived", "out", "TotalPacketsReceived")]),
];

const CIF_STATE_VARIABLES: &[(&str, &str)] = &[
    ("WANAccessType", "string"),
    ("Layer1UpstreamMaxBitRate", "ui4"),
    ("Layer1DownstreamMaxBitRate", "ui4"),
    ("PhysicalLinkStatus", "string"),
    ("TotalBytesSent", "ui4"),
    ("TotalBytesReceived", "ui4"),
    ("TotalPacketsSent", "ui4"),
    ("TotalPacketsReceived", "ui4"),
];

/// A service description (SCPD): what igd-next fetches during discovery to learn argument names.
fn scpd(actions: &[ActionSpec], state_variables: &[(&str, &str)]) -> String {
    let mut xml = String::from(
        "<?xml version=\"1.0\"?>\r\n<scpd xmlns=\"urn:schemas-upnp-org:service-1-0\">\
         <specVersion><major>1</major><minor>0</minor></specVersion><actionList>",
    );
    for (action, arguments) in actions {
        let _ = write!(xml, "<action><name>{action}</name><argumentList>");
        for (argument, direction, variable) in *arguments {
            let _ = write!(
                xml,
                "<argument><name>{argument}</name><direction>{direction}</direction>\
                 <relatedStateVariable>{variable}</relatedStateVariable></argument>"
            );
        }
        xml.push_str("</argumentList></action>");
    }
    xml.push_str("</actionList><serviceStateTable>");
    for (variable, data_type) in state_variables {
        let _ = write!(
            xml,
            "<stateVariable sendEvents=\"no\"><name>{variable}</name><dataType>{data_type}</dataType></stateVariable>"
        );
    }
    xml.push_str("</serviceStateTable></scpd>\r\n");
    xml
}

enum ServerCommand {
    Reboot(mpsc::Sender<Result<u16>>),
}

/// The thread in the gateway namespace that owns the SSDP socket and the HTTP listener.
struct Server {
    shared: Arc<Shared>,
    ssdp: UdpSocket,
    listener: TcpListener,
    commands: mpsc::Receiver<ServerCommand>,
    connections: Vec<JoinHandle<()>>,
}

impl Server {
    /// Opens the sockets; must run on a thread already in the gateway namespace.
    fn open(shared: Arc<Shared>, commands: mpsc::Receiver<ServerCommand>) -> Result<Self> {
        // Bound to the wildcard (not the group) so the replies leave from port 1900 with br0's address;
        // unicast M-SEARCH arriving on the WAN side is filtered out by source address instead.
        let ssdp = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, SSDP_PORT)).context(
            "binding UDP port 1900 for SSDP in the gateway namespace (is miniupnpd running there? \
             start the lab with `LabConfig { miniupnpd: false, .. }`)",
        )?;
        ssdp.join_multicast_v4(&SSDP_GROUP, &GW_LAN_IP).context("joining 239.255.255.250 on br0")?;
        set_multicast_interface(&ssdp, GW_LAN_IP).context("sending SSDP multicast through br0")?;
        ssdp.set_multicast_loop_v4(false).context("turning off multicast loopback on the SSDP socket")?;
        ssdp.set_multicast_ttl_v4(SSDP_TTL).context("setting the SSDP multicast TTL")?;
        ssdp.set_nonblocking(true).context("making the SSDP socket non-blocking")?;
        let listener = open_http_listener()?;
        shared.lock().http_port = listener.local_addr().context("reading the HTTP port")?.port();
        Ok(Self { shared, ssdp, listener, commands, connections: Vec::new() })
    }

    fn run(mut self) {
        while !self.shared.stopping() {
            while let Ok(command) = self.commands.try_recv() {
                match command {
                    ServerCommand::Reboot(reply) => {
                        let _ = reply.send(self.reboot());
                    }
                }
            }
            wait_readable(&[self.ssdp.as_raw_fd(), self.listener.as_raw_fd()], POLL_INTERVAL);
            self.answer_searches();
            self.accept_connections();
        }
        for connection in self.connections.drain(..) {
            let _ = connection.join();
        }
    }

    fn answer_searches(&mut self) {
        let mut datagram = [0u8; MAX_DATAGRAM_BYTES];
        // Non-blocking: ends at WouldBlock (or any error; the next round tries again).
        while let Ok((length, from)) = self.ssdp.recv_from(&mut datagram) {
            let SocketAddr::V4(source) = from else { continue };
            if !is_lan_host(*source.ip()) {
                continue;
            }
            let Ok(text) = std::str::from_utf8(&datagram[..length]) else { continue };
            for reply in self.shared.answer_search(from, text) {
                let _ = self.ssdp.send_to(reply.as_bytes(), from);
            }
        }
    }

    fn accept_connections(&mut self) {
        while let Ok((stream, peer)) = self.listener.accept() {
            self.connections.retain(|c| !c.is_finished());
            if self.connections.len() >= MAX_CONNECTIONS {
                continue; // dropping the stream closes it
            }
            let shared = self.shared.clone();
            if let Ok(connection) = std::thread::Builder::new()
                .name("fake-igd-http".into())
                .spawn(move || serve_connection(stream, peer, &shared))
            {
                self.connections.push(connection);
            }
        }
    }

    fn reboot(&mut self) -> Result<u16> {
        // Bound while the old listener still holds its port, so the new port is always a different one.
        let listener = open_http_listener()?;
        let port = listener.local_addr().context("reading the new HTTP port")?.port();
        self.listener = listener;
        let announcements = {
            let mut state = self.shared.lock();
            state.mappings.clear();
            state.http_port = port;
            state.boot_id += 1;
            state.booted_at = Instant::now();
            if state.script.silent_ssdp {
                Vec::new()
            } else {
                state.alive_notifications()
            }
        };
        for announcement in announcements {
            self.ssdp
                .send_to(announcement.as_bytes(), (SSDP_GROUP, SSDP_PORT))
                .context("announcing the reboot with ssdp:alive on br0")?;
        }
        Ok(port)
    }
}

fn open_http_listener() -> Result<TcpListener> {
    let listener = TcpListener::bind((GW_LAN_IP, 0)).context("binding an HTTP port on 192.168.77.1")?;
    listener.set_nonblocking(true).context("making the HTTP listener non-blocking")?;
    Ok(listener)
}

/// The lab's LAN is 192.168.77.0/24; the gateway's own address does not count (its NOTIFYs).
fn is_lan_host(address: Ipv4Addr) -> bool {
    address.octets()[..3] == GW_LAN_IP.octets()[..3] && address != GW_LAN_IP
}

/// Sleeps until one of `fds` is readable or `timeout` passes (the caller then tries them all).
fn wait_readable(fds: &[RawFd; 2], timeout: Duration) {
    let mut pollfds = fds.map(|fd| libc::pollfd { fd, events: libc::POLLIN, revents: 0 });
    let timeout_ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: poll reads and writes exactly pollfds.len() entries of an array we own.
    unsafe { libc::poll(pollfds.as_mut_ptr(), pollfds.len() as libc::nfds_t, timeout_ms) };
}

enum Reply {
    Bytes(Vec<u8>),
    Silence,
    Garbage(GarbageKind),
}

fn serve_connection(mut stream: TcpStream, peer: SocketAddr, shared: &Shared) {
    // Accepted sockets do not inherit the listener's O_NONBLOCK on Linux; the timeouts bound each wait.
    if stream.set_read_timeout(Some(POLL_INTERVAL)).is_err() || stream.set_write_timeout(Some(WRITE_TIMEOUT)).is_err() {
        return;
    }
    let reply = match read_request(&mut stream, &shared.stop) {
        Ok(request) => shared.answer_http(peer, &request),
        Err(ReadFailure::Gone) => return,
        Err(ReadFailure::Invalid(status)) => {
            shared.record_unreadable_request(peer, status);
            Reply::Bytes(http_status(status))
        }
    };
    match reply {
        Reply::Bytes(bytes) => {
            let _ = stream.write_all(&bytes);
        }
        Reply::Silence => hold_silently(&mut stream, &shared.stop),
        Reply::Garbage(kind) => send_garbage(&mut stream, kind, &shared.stop),
    }
    let _ = stream.shutdown(Shutdown::Write);
}

/// Keeps the connection open without a word until the client hangs up or the fake stops; anything more
/// the client sends is read and dropped so that its writes never block.
fn hold_silently(stream: &mut TcpStream, stop: &AtomicBool) {
    let mut sink = [0u8; 4096];
    while !stop.load(Ordering::SeqCst) {
        match stream.read(&mut sink) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if is_timeout(&e) => {}
            Err(_) => return,
        }
    }
}

fn send_garbage(stream: &mut TcpStream, kind: GarbageKind, stop: &AtomicBool) {
    match kind {
        GarbageKind::NotHttp => {
            let _ = stream.write_all(
                b"\x00\xff\xfe\x16\x03\x01\x02\x00SSH-2.0-not-a-web-server\r\n\x80\x81\x82 \xc3\x28\r\n\r\n",
            );
        }
        GarbageKind::TruncatedHttp => {
            let mut response = http_head(200, 4096);
            response.extend_from_slice(SOAP_ENVELOPE_OPEN.as_bytes());
            let _ = stream.write_all(&response);
        }
        GarbageKind::MalformedXml => {
            let body = "<?xml version=\"1.0\"?>\r\n<root xmlns=\"urn:schemas-upnp-org:device-1-0\"><device>\
                        <serviceList><service></serviceType></device><<>>&undefined;</s:Body>\r\n";
            let _ = stream.write_all(&http_response(200, body));
        }
        GarbageKind::HugeBody => {
            if stream.write_all(&http_head(200, HUGE_BODY_BYTES)).is_err() {
                return;
            }
            let chunk = "<padding>natbinder fake IGD: a body far too large to be a gateway's answer</padding>\r\n"
                .repeat(800)
                .into_bytes();
            let mut sent = 0;
            while sent < HUGE_BODY_BYTES && !stop.load(Ordering::SeqCst) {
                let part = &chunk[..chunk.len().min(HUGE_BODY_BYTES - sent)];
                if stream.write_all(part).is_err() {
                    return; // the client hung up (or stopped reading): what a capped client should do
                }
                sent += part.len();
            }
        }
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted)
}

struct HttpRequest {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl HttpRequest {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

enum ReadFailure {
    /// The client hung up, took too long, or the fake is stopping: nothing to answer.
    Gone,
    /// Not a request the fake will read: answered with this HTTP status (400, or 413 when too large).
    Invalid(u16),
}

/// Reads one request: at most MAX_HEAD_BYTES of head and MAX_BODY_BYTES of body, within
/// REQUEST_TIME_LIMIT. The client's Content-Length is checked against the limit before anything is read.
fn read_request(stream: &mut TcpStream, stop: &AtomicBool) -> Result<HttpRequest, ReadFailure> {
    let deadline = Instant::now() + REQUEST_TIME_LIMIT;
    let mut received = Vec::with_capacity(1024);
    let head_length = loop {
        if let Some(end) = received.windows(4).position(|w| w == b"\r\n\r\n") {
            break end;
        }
        if received.len() > MAX_HEAD_BYTES {
            return Err(ReadFailure::Invalid(413));
        }
        read_more(stream, &mut received, deadline, stop)?;
    };
    let head = std::str::from_utf8(&received[..head_length]).map_err(|_| ReadFailure::Invalid(400))?;
    let mut lines = head.split("\r\n");
    let request_line: Vec<&str> = lines.next().unwrap_or("").split(' ').collect();
    let [method, path, version] = request_line[..] else { return Err(ReadFailure::Invalid(400)) };
    if !version.starts_with("HTTP/1.") {
        return Err(ReadFailure::Invalid(400));
    }
    let mut headers = Vec::new();
    for line in lines {
        let (name, value) = line.split_once(':').ok_or(ReadFailure::Invalid(400))?;
        headers.push((name.trim().to_string(), value.trim().to_string()));
    }
    let mut request = HttpRequest { method: method.to_string(), path: path.to_string(), headers, body: Vec::new() };
    // Clients of a gateway send Content-Length; a chunked request body is not worth supporting here.
    if request.header("Transfer-Encoding").is_some() {
        return Err(ReadFailure::Invalid(400));
    }
    let content_length = match request.header("Content-Length") {
        None => 0,
        Some(value) => value.parse::<usize>().map_err(|_| ReadFailure::Invalid(400))?,
    };
    if content_length > MAX_BODY_BYTES {
        return Err(ReadFailure::Invalid(413));
    }
    let mut body = received.split_off(head_length + 4);
    while body.len() < content_length {
        read_more(stream, &mut body, deadline, stop)?;
    }
    body.truncate(content_length);
    request.body = body;
    Ok(request)
}

/// Appends whatever the client sends next (at most 4 KiB).
fn read_more(
    stream: &mut TcpStream,
    into: &mut Vec<u8>,
    deadline: Instant,
    stop: &AtomicBool,
) -> Result<(), ReadFailure> {
    let mut chunk = [0u8; 4096];
    loop {
        if stop.load(Ordering::SeqCst) || Instant::now() > deadline {
            return Err(ReadFailure::Gone);
        }
        match stream.read(&mut chunk) {
            Ok(0) => return Err(ReadFailure::Gone),
            Ok(n) => {
                into.extend_from_slice(&chunk[..n]);
                return Ok(());
            }
            Err(e) if is_timeout(&e) => {}
            Err(_) => return Err(ReadFailure::Gone),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn add_call(lease: &str, external_port: &str, client: &str) -> Vec<(String, String)> {
        [
            ("NewRemoteHost", ""),
            ("NewExternalPort", external_port),
            ("NewProtocol", "TCP"),
            ("NewInternalPort", "8080"),
            ("NewInternalClient", client),
            ("NewEnabled", "1"),
            ("NewPortMappingDescription", "test"),
            ("NewLeaseDuration", lease),
        ]
        .iter()
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .collect()
    }

    fn add(shared: &Shared, lease: &str, external_port: &str, client: &str) -> Result<(), UpnpError> {
        shared.lock().add_port_mapping(&Arguments(&add_call(lease, external_port, client)), Instant::now())
    }

    #[test]
    fn reads_soap_arguments_with_prefixes_entities_and_empty_elements() {
        let body = r#"<?xml version="1.0"?><s:Envelope xmlns:s="x"><s:Body><u:AddPortMapping xmlns:u="y">
            <NewRemoteHost></NewRemoteHost><NewExternalPort>8080</NewExternalPort><NewEnabled/>
            <NewPortMappingDescription>a &amp; b &#x3C;c&#62;</NewPortMappingDescription>
            </u:AddPortMapping></s:Body></s:Envelope>"#;
        let args = soap_arguments(body, "AddPortMapping").unwrap();
        let names: Vec<&str> = args.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["NewRemoteHost", "NewExternalPort", "NewEnabled", "NewPortMappingDescription"]);
        assert_eq!(args[1].1, "8080");
        assert_eq!(args[3].1, "a & b <c>");
    }

    #[test]
    fn rejects_malformed_soap_bodies() {
        for body in [
            "",
            "<u:AddPortMapping><NewExternalPort>1</NewExternalPort>",
            "<u:AddPortMapping><NewExternalPort>1</NewProtocol></u:AddPortMapping>",
            "<u:AddPortMapping><NewExternalPort><x>1</x></NewExternalPort></u:AddPortMapping>",
            "<u:AddPortMapping><NewExternalPort>&bogus;</NewExternalPort></u:AddPortMapping>",
            "<u:AddPortMapping><NewExternalPort>1",
            "<u:DeletePortMapping></u:DeletePortMapping>",
        ] {
            assert!(soap_arguments(body, "AddPortMapping").is_none(), "accepted {body:?}");
        }
    }

    #[test]
    fn parses_m_search_and_ignores_other_datagrams() {
        let search =
            "M-SEARCH * HTTP/1.1\r\nHost:239.255.255.250:1900\r\nST:upnp:rootdevice\r\nMan:\"ssdp:discover\"\r\n\r\n";
        let headers = parse_search(search).unwrap();
        assert!(headers.contains(&("ST".into(), "upnp:rootdevice".into())));
        assert!(parse_search("NOTIFY * HTTP/1.1\r\nNT: x\r\n\r\n").is_none());
        assert!(parse_search("\u{0}\u{1}garbage").is_none());
    }

    #[test]
    fn lease_faults_refuse_leases_and_accept_lease_0() {
        let shared = Shared::new(FakeScript::new().permanent_only_725());
        assert_eq!(add(&shared, "3600", "8080", "192.168.77.10"), Err(ONLY_PERMANENT_LEASES));
        assert_eq!(add(&shared, "0", "8080", "192.168.77.10"), Ok(()));
        let shared = Shared::new(FakeScript::new().invalid_args_402_on_lease());
        assert_eq!(add(&shared, "60", "8080", "192.168.77.10"), Err(INVALID_ARGS));
        assert_eq!(add(&shared, "0", "8080", "192.168.77.10"), Ok(()));
    }

    #[test]
    fn table_conflicts_capacity_and_failing_adds() {
        let shared = Shared::new(FakeScript::new().table_full_728(1).fail_adds_501(1));
        assert_eq!(add(&shared, "60", "8080", "192.168.77.10"), Err(ACTION_FAILED));
        assert_eq!(add(&shared, "60", "8080", "192.168.77.10"), Ok(()));
        // The same host re-adding updates its entry; another host conflicts; a new entry does not fit.
        assert_eq!(add(&shared, "120", "8080", "192.168.77.10"), Ok(()));
        assert_eq!(shared.lock().mappings[0].lease, 120);
        assert_eq!(add(&shared, "60", "8080", "192.168.77.20"), Err(CONFLICT));
        assert_eq!(add(&shared, "60", "9090", "192.168.77.10"), Err(NO_PORT_MAPS_AVAILABLE));
        assert_eq!(add(&shared, "60", "0", "192.168.77.10"), Err(WILDCARD_EXTERNAL_PORT));
        assert_eq!(add(&shared, "x", "9090", "192.168.77.10"), Err(INVALID_ARGS));
        assert_eq!(add(&shared, "60", "9090", "lan1.example"), Err(INVALID_ARGS));
    }

    fn listing_call(protocol: &str, start: &str, end: &str, most: &str) -> Vec<(String, String)> {
        [
            ("NewStartPort", start),
            ("NewEndPort", end),
            ("NewProtocol", protocol),
            ("NewManage", "1"),
            ("NewNumberOfPorts", most),
        ]
        .iter()
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .collect()
    }

    #[test]
    fn an_igd_v2_lists_one_protocol_in_range_sorted_and_capped() {
        let shared = Shared::new(FakeScript::new().igd_v2_listing());
        for port in ["9002", "9000", "9001", "10000"] {
            add(&shared, "60", port, "192.168.77.10").unwrap();
        }
        let mut state = shared.lock();
        let mut list = |args: Vec<(String, String)>| {
            state.wanip_action("GetListOfPortMappings", &Arguments(&args), Instant::now()).map(|mut values| {
                let (_, listing) = values.remove(0);
                listing.matches("<p:NewExternalPort>").count()
            })
        };
        assert_eq!(list(listing_call("TCP", "9000", "9999", "0")), Ok(3));
        assert_eq!(list(listing_call("TCP", "1", "65535", "2")), Ok(2));
        assert_eq!(list(listing_call("UDP", "1", "65535", "0")), Err(PORT_MAPPING_NOT_FOUND));
        assert_eq!(list(listing_call("TCP", "9999", "9000", "0")), Err(INCONSISTENT_PARAMETERS));
        let listing = state.list_port_mappings(&Arguments(&listing_call("TCP", "1", "65535", "0")), Instant::now());
        let ports: Vec<&str> = listing
            .as_deref()
            .unwrap()
            .split("<p:NewExternalPort>")
            .skip(1)
            .filter_map(|r| r.split('<').next())
            .collect();
        assert_eq!(ports, ["9000", "9001", "9002", "10000"]);
    }

    #[test]
    fn an_igd_v1_has_no_listing_call_and_a_refusing_gateway_lists_nothing() {
        let shared = Shared::new(FakeScript::new());
        add(&shared, "60", "9000", "192.168.77.10").unwrap();
        let args = listing_call("TCP", "1", "65535", "0");
        let index = [("NewPortMappingIndex".to_string(), "0".to_string())];
        let specific = [("NewRemoteHost", ""), ("NewExternalPort", "9000"), ("NewProtocol", "TCP")]
            .map(|(n, v)| (n.to_string(), v.to_string()));
        let mut state = shared.lock();
        let now = Instant::now();
        assert_eq!(state.wanip_action("GetListOfPortMappings", &Arguments(&args), now), Err(INVALID_ACTION));
        assert!(state.wanip_action("GetGenericPortMappingEntry", &Arguments(&index), now).is_ok());
        state.script = FakeScript::new().igd_v2_listing().listing_refused_401();
        assert_eq!(state.wanip_action("GetListOfPortMappings", &Arguments(&args), now), Err(INVALID_ACTION));
        assert_eq!(state.wanip_action("GetGenericPortMappingEntry", &Arguments(&index), now), Err(INVALID_ACTION));
        assert!(state.wanip_action("GetSpecificPortMappingEntry", &Arguments(&specific), now).is_ok());
    }

    #[test]
    fn leases_expire() {
        let shared = Shared::new(FakeScript::new());
        add(&shared, "1", "8080", "192.168.77.10").unwrap();
        let mut state = shared.lock();
        state.expire_leases(Instant::now() + Duration::from_secs(2));
        assert!(state.mappings.is_empty());
    }
}
