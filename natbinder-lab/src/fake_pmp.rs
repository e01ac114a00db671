//! A scripted fake NAT-PMP (RFC 6886) and PCP (RFC 6887) server on the lab's gateway, for the faults a
//! real miniupnpd cannot be made to show.
//!
//! Everything a real gateway does is tested against miniupnpd (`LabConfig { natpmp: true, .. }`; what
//! miniupnpd 2.3.1 does as a NAT-PMP/PCP server, checked here, is in `natbinder-lab/miniupnpd-natpmp-pcp.md`).
//! This fake exists only for:
//! - **a NAT-PMP-only gateway**: PCP requests answered with NAT-PMP's UNSUPPORTED_VERSION, always or for
//!   the next N requests ([`PmpScript::nat_pmp_only`], [`PmpScript::pcp_unsupported_for`]);
//! - **refusals**: any NAT-PMP result code (1..5) or PCP result code (1..13: NOT_AUTHORIZED,
//!   NO_RESOURCES, USER_EX_QUOTA, CANNOT_PROVIDE_EXTERNAL, ADDRESS_MISMATCH, ...) for the next N mapping
//!   requests ([`PmpScript::natpmp_result`], [`PmpScript::pcp_result`]);
//! - **short lifetimes** for both protocols (miniupnpd shortens PCP only) ([`PmpScript::lifetime_cap`]),
//!   and **another external port** than the one suggested ([`PmpScript::external_port_offset`]);
//! - **bad replies** for the next N requests: silence, garbage, a truncated reply, a wrong opcode, a
//!   wrong PCP nonce ([`ReplyFault`]);
//! - **a reboot** (epoch back to 0, table lost) or an epoch reset alone ([`FakePmp::reboot`],
//!   [`FakePmp::reset_epoch`]), and **announcements** to 224.0.0.1:5350 in NAT-PMP and PCP format at a
//!   moment the test chooses ([`FakePmp::announce`]);
//! - **a closed port**: the fake stops listening, so the kernel answers with ICMP port unreachable, and
//!   listens again ([`FakePmp::stop_listening`], [`FakePmp::listen`]);
//! - **another external address**, such as 100.64.0.1 for a double NAT ([`PmpScript::external_ip`]).
//!
//! Otherwise it is a small, strict server with a real table keyed by (client, protocol, internal port),
//! shared by both protocols, whose entries expire. Where miniupnpd 2.3.1 departs from the RFCs, the fake
//! follows the RFCs: a PCP request for an existing mapping with another nonce is refused with
//! NOT_AUTHORIZED (miniupnpd hands the mapping over; [`PmpScript::nonce_takeover`] does the same), PCP
//! PREFER_FAILURE is honoured for taken ports, and deleting what is not there succeeds in PCP too
//! (miniupnpd answers NO_RESOURCES). It answers LAN hosts only, on 192.168.77.1:5351, and records every
//! datagram it receives, decoded. Its replies are written here, byte by byte, independently of
//! natbinder's own codec.
//!
//! It runs on a std thread inside the gateway namespace; dropping the [`FakePmp`] stops it and closes
//! its socket. The lab must not run miniupnpd with NAT-PMP on (`LabConfig { miniupnpd: false, .. }`, or
//! the default `natpmp: false`, which leaves miniupnpd's UPnP side next to the fake).
use std::{
    fs::File,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, UdpSocket},
    os::fd::AsRawFd,
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc, Arc, Mutex, MutexGuard,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};

use crate::{
    set_multicast_interface, Lab, Netns, ALL_HOSTS_GROUP, ANNOUNCE_PORT, EXTERNAL_IP_PLACEHOLDER, GW_LAN_IP,
    NATPMP_PORT,
};

/// IANA protocol numbers, as PCP carries them (NAT-PMP's opcodes 1 and 2 are recorded as these too).
pub const TCP: u8 = 6;
pub const UDP: u8 = 17;

/// A script count that never runs out.
pub const ALWAYS: u32 = u32::MAX;

/// NAT-PMP result codes (RFC 6886 section 3.5).
pub mod natpmp_result {
    pub const SUCCESS: u16 = 0;
    pub const UNSUPPORTED_VERSION: u16 = 1;
    pub const NOT_AUTHORIZED: u16 = 2;
    pub const NETWORK_FAILURE: u16 = 3;
    pub const OUT_OF_RESOURCES: u16 = 4;
    pub const UNSUPPORTED_OPCODE: u16 = 5;
}

/// PCP result codes (RFC 6887 section 7.4).
pub mod pcp_result {
    pub const SUCCESS: u8 = 0;
    pub const UNSUPP_VERSION: u8 = 1;
    pub const NOT_AUTHORIZED: u8 = 2;
    pub const MALFORMED_REQUEST: u8 = 3;
    pub const UNSUPP_OPCODE: u8 = 4;
    pub const UNSUPP_OPTION: u8 = 5;
    pub const MALFORMED_OPTION: u8 = 6;
    pub const NETWORK_FAILURE: u8 = 7;
    pub const NO_RESOURCES: u8 = 8;
    pub const UNSUPP_PROTOCOL: u8 = 9;
    pub const USER_EX_QUOTA: u8 = 10;
    pub const CANNOT_PROVIDE_EXTERNAL: u8 = 11;
    pub const ADDRESS_MISMATCH: u8 = 12;
    pub const EXCESSIVE_REMOTE_PEERS: u8 = 13;
}

const NATPMP_VERSION: u8 = 0;
const PCP_VERSION: u8 = 2;
const PCP_OPCODE_ANNOUNCE: u8 = 0;
const PCP_OPCODE_MAP: u8 = 1;
const PCP_OPTION_THIRD_PARTY: u8 = 1;
const PCP_OPTION_PREFER_FAILURE: u8 = 2;
const PCP_OPTION_FILTER: u8 = 3;
const PCP_HEADER_BYTES: usize = 24;
const PCP_MAP_BYTES: usize = PCP_HEADER_BYTES + 36;
const PCP_MAX_BYTES: usize = 1100;
/// The lifetime PCP puts on "short-lived" errors (RFC 6887 section 7.4); long-lived ones carry 0.
const PCP_SHORT_ERROR_LIFETIME: u32 = 30;
const RESPONSE_BIT: u8 = 0x80;
const POLL_INTERVAL: Duration = Duration::from_millis(20);
const STARTUP_TIME_LIMIT: Duration = Duration::from_secs(5);
/// Bounds a `natpmpc` run in [`run_natpmpc`], in seconds (it retries for about 2 minutes on its own).
const NATPMPC_TIME_LIMIT_SECS: u32 = 30;
/// What [`ReplyFault::Garbage`] sends: neither NAT-PMP nor PCP (bad version, odd length).
const GARBAGE: &[u8] = b"\xde\xad\xbe\xefnot NAT-PMP\x00\x01";

/// How the fake spoils its reply to a request (the request is recorded and has no effect on the table).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplyFault {
    /// No reply at all: the client times out and retransmits.
    Silence,
    /// 15 bytes that are neither NAT-PMP nor PCP.
    Garbage,
    /// The proper reply cut to half its length (a 16-byte NAT-PMP mapping reply becomes its 8-byte header).
    Truncated,
    /// The proper reply with the response opcode of another request: NAT-PMP 0->129, 1->130 (a TCP answer
    /// to a UDP request), 2->128; PCP MAP->PEER (130), anything else->MAP (129).
    WrongOpcode,
    /// PCP MAP only: the proper reply with every nonce byte inverted. NAT-PMP and other PCP requests are
    /// answered normally and do not count.
    WrongNonce,
}

/// What the fake gateway does wrong. [`PmpScript::new`] is a well-behaved NAT-PMP and PCP server;
/// each builder method adds one fault. Counts are of requests the fault applies to ([`ALWAYS`] for no
/// end); they run down as requests arrive and start again when [`FakePmp::set_script`] installs a script.
#[derive(Clone, Debug)]
pub struct PmpScript {
    pcp_unsupported: u32,
    natpmp_failure: Option<(u16, u32)>,
    pcp_failure: Option<(u8, u32)>,
    lifetime_cap: Option<u32>,
    external_port_offset: u16,
    reply_fault: Option<(ReplyFault, u32)>,
    external_ip: Ipv4Addr,
    nonce_takeover: bool,
}

impl Default for PmpScript {
    fn default() -> Self {
        Self {
            pcp_unsupported: 0,
            natpmp_failure: None,
            pcp_failure: None,
            lifetime_cap: None,
            external_port_offset: 0,
            reply_fault: None,
            external_ip: EXTERNAL_IP_PLACEHOLDER,
            nonce_takeover: false,
        }
    }
}

impl PmpScript {
    /// A server that does everything right, with the lab's placeholder external address.
    pub fn new() -> Self {
        Self::default()
    }

    /// A NAT-PMP-only gateway: every request with a version other than 0 (PCP) is answered in NAT-PMP
    /// format with result 1, UNSUPPORTED_VERSION (RFC 6887 section 9).
    pub fn nat_pmp_only(self) -> Self {
        self.pcp_unsupported_for(ALWAYS)
    }

    /// As [`PmpScript::nat_pmp_only`] for the next `requests` PCP requests; later ones are served (a
    /// gateway whose PCP came back after a firmware update).
    pub fn pcp_unsupported_for(mut self, requests: u32) -> Self {
        self.pcp_unsupported = requests;
        self
    }

    /// The next `requests` NAT-PMP mapping requests (opcodes 1 and 2, including deletes) are refused
    /// with `code` (1 UNSUPPORTED_VERSION .. 5 UNSUPPORTED_OPCODE, see [`natpmp_result`]).
    pub fn natpmp_result(mut self, code: u16, requests: u32) -> Self {
        self.natpmp_failure = Some((code, requests));
        self
    }

    /// The next `requests` PCP MAP requests (including deletes) that are well formed are refused with
    /// `code` (see [`pcp_result`]), with lifetime 30 for the short-lived errors NETWORK_FAILURE,
    /// NO_RESOURCES and USER_EX_QUOTA and 0 for the others, as RFC 6887 section 7.4 says.
    pub fn pcp_result(mut self, code: u8, requests: u32) -> Self {
        self.pcp_failure = Some((code, requests));
        self
    }

    /// Grants at most `seconds`, whatever lifetime a NAT-PMP or PCP request asks for.
    pub fn lifetime_cap(mut self, seconds: u32) -> Self {
        self.lifetime_cap = Some(seconds);
        self
    }

    /// New mappings get the suggested external port plus `offset` (the internal port when none is
    /// suggested), as if the port were taken; renewals keep the port they have.
    pub fn external_port_offset(mut self, offset: u16) -> Self {
        self.external_port_offset = offset;
        self
    }

    /// The next `requests` requests the fault applies to get a spoiled reply (see [`ReplyFault`]).
    pub fn reply_fault(mut self, fault: ReplyFault, requests: u32) -> Self {
        self.reply_fault = Some((fault, requests));
        self
    }

    /// The external address the fake reports (NAT-PMP opcode 0, announcements, PCP MAP replies), e.g.
    /// 10.0.0.1, 100.64.0.1 or 0.0.0.0 for another NAT upstream. Nothing is ever sent to it.
    pub fn external_ip(mut self, address: Ipv4Addr) -> Self {
        self.external_ip = address;
        self
    }

    /// A PCP MAP with a nonce other than the one that made the mapping takes the mapping over instead of
    /// being refused with NOT_AUTHORIZED, as miniupnpd 2.3.1 does (a restarted client renews).
    pub fn nonce_takeover(mut self) -> Self {
        self.nonce_takeover = true;
        self
    }
}

/// One entry of the fake's table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PmpMapping {
    /// [`TCP`] or [`UDP`].
    pub protocol: u8,
    pub internal_client: Ipv4Addr,
    pub internal_port: u16,
    pub external_port: u16,
    /// The lifetime granted by the last request that made or renewed it, in seconds.
    pub lifetime: u32,
    pub expires_at: Instant,
    /// The nonce of the PCP request that made or renewed it; None when NAT-PMP did.
    pub nonce: Option<[u8; 12]>,
}

/// How the fake answered a datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PmpOutcome {
    /// Answered in NAT-PMP format with this result code (0 is success).
    NatPmp(u16),
    /// Answered in PCP format with this result code (0 is success).
    Pcp(u8),
    /// A PCP request answered as a NAT-PMP-only gateway does: NAT-PMP format, UNSUPPORTED_VERSION.
    NatPmpUnsupportedVersion,
    /// A scripted spoiled reply (or none, for [`ReplyFault::Silence`]).
    Fault(ReplyFault),
    /// Not answered, as on a real server: not from a LAN host, a response rather than a request, or too
    /// short to answer.
    Ignored,
}

/// One datagram the fake received, in arrival order, decoded as far as its version and opcode allow.
#[derive(Clone, Debug)]
pub struct PmpRequest {
    pub at: Instant,
    pub from: SocketAddrV4,
    pub bytes: Vec<u8>,
    /// 0 for NAT-PMP, 2 for PCP (anything else is recorded as sent).
    pub version: u8,
    /// Without the response bit (a response that arrived here shows it in `bytes`).
    pub opcode: u8,
    /// [`TCP`]/[`UDP`]: from a NAT-PMP mapping opcode (1 UDP, 2 TCP) or the PCP MAP protocol field.
    pub protocol: Option<u8>,
    pub internal_port: Option<u16>,
    /// The suggested external port (0 for none).
    pub suggested_port: Option<u16>,
    /// The requested lifetime (0 asks for a delete).
    pub lifetime: Option<u32>,
    /// PCP MAP's mapping nonce.
    pub nonce: Option<[u8; 12]>,
    /// PCP's client IP address field (IPv4-mapped addresses shown as IPv4).
    pub client_ip: Option<IpAddr>,
    /// PCP MAP's suggested external address (IPv4-mapped addresses shown as IPv4).
    pub suggested_ip: Option<IpAddr>,
    /// Whether a PCP MAP carried the PREFER_FAILURE option.
    pub prefer_failure: bool,
    pub outcome: PmpOutcome,
}

/// The kinds of unsolicited announcement a gateway multicasts to 224.0.0.1:5350.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Announcement {
    /// NAT-PMP's external address response (opcode 128), 12 bytes.
    NatPmp,
    /// PCP's unsolicited ANNOUNCE response (opcode 0x80), 24 bytes.
    Pcp,
    /// The NAT-PMP one, then the PCP one.
    Both,
}

/// The fake server, listening in the lab's gateway namespace until dropped.
pub struct FakePmp {
    shared: Arc<Shared>,
    commands: mpsc::Sender<ServerCommand>,
    server: Option<JoinHandle<()>>,
}

impl FakePmp {
    /// Starts the fake on 192.168.77.1:5351 in the lab's gateway (fails if miniupnpd holds the port).
    pub fn start(lab: &Lab, script: PmpScript) -> Result<Self> {
        let netns_path = lab.gw.path();
        let netns = File::open(&netns_path).with_context(|| format!("opening {}", netns_path.display()))?;
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            state: Mutex::new(State { script, mappings: Vec::new(), requests: Vec::new(), booted_at: Instant::now() }),
        });
        let (command_sender, command_receiver) = mpsc::channel();
        let (ready_sender, ready_receiver) = mpsc::channel::<Result<()>>();
        let server_shared = shared.clone();
        let server = std::thread::Builder::new()
            .name("fake-pmp".into())
            .spawn(move || {
                // SAFETY: setns on this thread only, with a namespace file we hold open; the thread and the
                // sockets it opens live in the gateway namespace from here on.
                if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    let error = io::Error::last_os_error();
                    let _ = ready_sender.send(Err(anyhow!("entering the gateway namespace: {error}")));
                    return;
                }
                drop(netns);
                match open_server_socket() {
                    Ok(socket) => {
                        let _ = ready_sender.send(Ok(()));
                        Server { shared: server_shared, socket: Some(socket), commands: command_receiver }.run();
                    }
                    Err(e) => {
                        let _ = ready_sender.send(Err(e));
                    }
                }
            })
            .context("spawning the fake NAT-PMP/PCP server's thread")?;
        let ready = ready_receiver.recv_timeout(STARTUP_TIME_LIMIT);
        let fake = FakePmp { shared, commands: command_sender, server: Some(server) };
        match ready {
            Ok(Ok(())) => Ok(fake),
            Ok(Err(e)) => Err(e.context("starting the fake NAT-PMP/PCP server on the lab gateway")),
            Err(_) => bail!("the fake NAT-PMP/PCP server did not start within {STARTUP_TIME_LIMIT:?}"),
        }
    }

    /// Replaces the script from the next request on (its counts start afresh); the table, the epoch and
    /// the request log are kept.
    pub fn set_script(&self, script: PmpScript) {
        self.shared.lock().script = script;
    }

    /// The table now (expired entries already dropped), oldest first.
    pub fn mappings(&self) -> Vec<PmpMapping> {
        let mut state = self.shared.lock();
        state.expire(Instant::now());
        state.mappings.clone()
    }

    /// Every datagram received so far.
    pub fn requests(&self) -> Vec<PmpRequest> {
        self.shared.lock().requests.clone()
    }

    /// Every datagram received so far, forgetting them (to look at one phase of a test at a time).
    pub fn take_requests(&self) -> Vec<PmpRequest> {
        std::mem::take(&mut self.shared.lock().requests)
    }

    /// Seconds since the start of the epoch, as the next reply will carry them.
    pub fn epoch(&self) -> u32 {
        self.shared.lock().epoch()
    }

    /// Starts the epoch again at 0 and keeps the table (what miniupnpd does on SIGUSR1). Announces nothing.
    pub fn reset_epoch(&self) {
        self.shared.lock().booted_at = Instant::now();
    }

    /// A reboot that lost the table: the epoch starts again at 0 and every mapping is gone. Announces
    /// nothing; follow with [`FakePmp::announce`] for a gateway that does.
    pub fn reboot(&self) {
        let mut state = self.shared.lock();
        state.booted_at = Instant::now();
        state.mappings.clear();
    }

    /// Multicasts `kind` of announcement from 192.168.77.1:5351 to 224.0.0.1:5350 on br0, with the current
    /// epoch and the script's external address. Works while the fake is not listening too.
    pub fn announce(&self, kind: Announcement) -> Result<()> {
        self.command(|reply| ServerCommand::Announce(kind, reply))
    }

    /// Closes the socket: requests to 192.168.77.1:5351 now get ICMP port unreachable.
    pub fn stop_listening(&self) -> Result<()> {
        self.command(ServerCommand::StopListening)
    }

    /// Opens the socket again after [`FakePmp::stop_listening`] (harmless when already listening).
    pub fn listen(&self) -> Result<()> {
        self.command(ServerCommand::Listen)
    }

    fn command(&self, make: impl FnOnce(mpsc::Sender<Result<()>>) -> ServerCommand) -> Result<()> {
        let (reply_sender, reply_receiver) = mpsc::channel();
        self.commands.send(make(reply_sender)).map_err(|_| anyhow!("the fake NAT-PMP/PCP server has stopped"))?;
        reply_receiver
            .recv_timeout(STARTUP_TIME_LIMIT)
            .map_err(|_| anyhow!("the fake NAT-PMP/PCP server did not answer within {STARTUP_TIME_LIMIT:?}"))?
    }
}

impl Drop for FakePmp {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(server) = self.server.take() {
            let _ = server.join();
        }
    }
}

/// Runs libnatpmp's `natpmpc ARGS` in `from` and returns all it printed (stdout, then stderr), whatever
/// its exit status. Fails only if natpmpc could not run or did not finish within 30 s.
pub fn run_natpmpc(from: &Netns, args: &[&str]) -> Result<String> {
    crate::run_client_tool(from, "natpmpc", NATPMPC_TIME_LIMIT_SECS, args)
}

/// Sends `request` from `from` to 192.168.77.1:5351 over a connected UDP socket and returns the first
/// datagram that comes back within `wait`. An ICMP port unreachable shows as an error of kind
/// ConnectionRefused, silence as WouldBlock/TimedOut.
pub fn exchange(from: &Netns, request: &[u8], wait: Duration) -> io::Result<Vec<u8>> {
    let request = request.to_vec();
    from.run(move || {
        let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
        socket.connect((GW_LAN_IP, NATPMP_PORT))?;
        socket.set_read_timeout(Some(wait))?;
        socket.send(&request)?;
        let mut reply = vec![0u8; 2048];
        let n = socket.recv(&mut reply)?;
        reply.truncate(n);
        Ok(reply)
    })
}

/// Client-side encoders and a decoder for tests: how a correct NAT-PMP/PCP client (or a forger on the
/// LAN) writes its datagrams and reads a gateway's. Written from the RFCs, independently of natbinder.
pub mod wire {
    use super::*;

    /// NAT-PMP external address request (opcode 0).
    pub fn natpmp_address_request() -> Vec<u8> {
        vec![NATPMP_VERSION, 0]
    }

    /// NAT-PMP mapping request: opcode 1 for [`UDP`], 2 for [`TCP`]; lifetime 0 deletes.
    pub fn natpmp_map_request(protocol: u8, internal_port: u16, suggested_port: u16, lifetime: u32) -> Vec<u8> {
        let mut bytes = vec![NATPMP_VERSION, if protocol == UDP { 1 } else { 2 }, 0, 0];
        bytes.extend_from_slice(&internal_port.to_be_bytes());
        bytes.extend_from_slice(&suggested_port.to_be_bytes());
        bytes.extend_from_slice(&lifetime.to_be_bytes());
        bytes
    }

    /// PCP MAP request from `client` (60 bytes, 64 with PREFER_FAILURE), suggesting no external address.
    pub fn pcp_map_request(
        client: Ipv4Addr,
        protocol: u8,
        internal_port: u16,
        suggested_port: u16,
        lifetime: u32,
        nonce: [u8; 12],
        prefer_failure: bool,
    ) -> Vec<u8> {
        let mut bytes = pcp_header(PCP_VERSION, PCP_OPCODE_MAP, 0, lifetime, 0, client.to_ipv6_mapped());
        bytes.extend_from_slice(&nonce);
        bytes.extend_from_slice(&[protocol, 0, 0, 0]);
        bytes.extend_from_slice(&internal_port.to_be_bytes());
        bytes.extend_from_slice(&suggested_port.to_be_bytes());
        bytes.extend_from_slice(&Ipv4Addr::UNSPECIFIED.to_ipv6_mapped().octets());
        if prefer_failure {
            bytes.extend_from_slice(&[PCP_OPTION_PREFER_FAILURE, 0, 0, 0]);
        }
        bytes
    }

    /// PCP ANNOUNCE request from `client` (24 bytes).
    pub fn pcp_announce_request(client: Ipv4Addr) -> Vec<u8> {
        pcp_header(PCP_VERSION, PCP_OPCODE_ANNOUNCE, 0, 0, 0, client.to_ipv6_mapped())
    }

    /// NAT-PMP external address announcement (and reply): version 0, opcode 128, result 0, epoch, address.
    pub fn natpmp_announcement(epoch: u32, external_ip: Ipv4Addr) -> Vec<u8> {
        let mut bytes = vec![NATPMP_VERSION, RESPONSE_BIT, 0, 0];
        bytes.extend_from_slice(&epoch.to_be_bytes());
        bytes.extend_from_slice(&external_ip.octets());
        bytes
    }

    /// PCP unsolicited ANNOUNCE response: version 2, opcode 0x80, result 0, lifetime 0, epoch.
    pub fn pcp_announcement(epoch: u32) -> Vec<u8> {
        pcp_header(PCP_VERSION, RESPONSE_BIT | PCP_OPCODE_ANNOUNCE, 0, 0, epoch, Ipv6Addr::UNSPECIFIED)
    }

    /// The common 24-byte PCP header. For a request the second word is the requested lifetime and the
    /// last 16 bytes the client address; for a response, result and lifetime, epoch, then 12 reserved
    /// bytes (the first 4 of `address` are dropped).
    pub(super) fn pcp_header(
        version: u8,
        opcode: u8,
        result: u8,
        lifetime: u32,
        epoch: u32,
        address: Ipv6Addr,
    ) -> Vec<u8> {
        let mut bytes = vec![version, opcode, 0, result];
        bytes.extend_from_slice(&lifetime.to_be_bytes());
        if opcode & RESPONSE_BIT == 0 {
            bytes.extend_from_slice(&address.octets());
        } else {
            bytes.extend_from_slice(&epoch.to_be_bytes());
            bytes.extend_from_slice(&[0; 12]);
        }
        bytes
    }

    /// A NAT-PMP or PCP response, decoded.
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub struct Reply {
        pub version: u8,
        /// With the response bit (128 + request opcode).
        pub opcode: u8,
        /// NAT-PMP's 16-bit result or PCP's 8-bit one.
        pub result: u16,
        pub epoch: u32,
        /// PCP: the header's lifetime; NAT-PMP mapping replies: the mapping lifetime.
        pub lifetime: Option<u32>,
        /// NAT-PMP address replies; PCP MAP replies (IPv4-mapped addresses only).
        pub external_ip: Option<Ipv4Addr>,
        pub internal_port: Option<u16>,
        pub external_port: Option<u16>,
        /// PCP MAP replies.
        pub protocol: Option<u8>,
        pub nonce: Option<[u8; 12]>,
    }

    /// Decodes a response by its version byte; None for anything too short or not a response.
    pub fn decode_reply(bytes: &[u8]) -> Option<Reply> {
        let opcode = *bytes.get(1)?;
        if opcode & RESPONSE_BIT == 0 {
            return None;
        }
        let u16_at = |i: usize| Some(u16::from_be_bytes(bytes.get(i..i + 2)?.try_into().ok()?));
        let u32_at = |i: usize| Some(u32::from_be_bytes(bytes.get(i..i + 4)?.try_into().ok()?));
        let ipv4_at = |i: usize| {
            let octets: [u8; 16] = bytes.get(i..i + 16)?.try_into().ok()?;
            Ipv6Addr::from(octets).to_ipv4_mapped()
        };
        let mut reply = Reply {
            version: bytes[0],
            opcode,
            result: 0,
            epoch: 0,
            lifetime: None,
            external_ip: None,
            internal_port: None,
            external_port: None,
            protocol: None,
            nonce: None,
        };
        if reply.version == NATPMP_VERSION && bytes.len() < PCP_HEADER_BYTES {
            reply.result = u16_at(2)?;
            reply.epoch = u32_at(4)?;
            match opcode {
                128 if bytes.len() >= 12 => {
                    reply.external_ip = Some(Ipv4Addr::from(u32_at(8)?));
                }
                129 | 130 if bytes.len() >= 16 => {
                    reply.internal_port = u16_at(8);
                    reply.external_port = u16_at(10);
                    reply.lifetime = u32_at(12);
                }
                _ => {}
            }
            return Some(reply);
        }
        if bytes.len() < PCP_HEADER_BYTES {
            return None;
        }
        reply.result = bytes[3].into();
        reply.lifetime = u32_at(4);
        reply.epoch = u32_at(8)?;
        if opcode == RESPONSE_BIT | PCP_OPCODE_MAP && bytes.len() >= PCP_MAP_BYTES {
            reply.nonce = bytes[24..36].try_into().ok();
            reply.protocol = Some(bytes[36]);
            reply.internal_port = u16_at(40);
            reply.external_port = u16_at(42);
            reply.external_ip = ipv4_at(44);
        }
        Some(reply)
    }
}

/// State shared by the server thread and the test's [`FakePmp`] handle.
struct Shared {
    stop: AtomicBool,
    state: Mutex<State>,
}

impl Shared {
    /// A panic elsewhere must not take the whole fake down with a poisoned lock.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

struct State {
    script: PmpScript,
    mappings: Vec<PmpMapping>,
    requests: Vec<PmpRequest>,
    booted_at: Instant,
}

impl State {
    fn epoch(&self) -> u32 {
        u32::try_from(self.booted_at.elapsed().as_secs()).unwrap_or(u32::MAX)
    }

    fn expire(&mut self, now: Instant) {
        self.mappings.retain(|m| m.expires_at > now);
    }

    /// Records a datagram and returns the reply to send, if any.
    fn receive(&mut self, from: SocketAddrV4, bytes: &[u8], now: Instant) -> Option<Vec<u8>> {
        self.expire(now);
        let mut request = decode_request(from, bytes, now);
        let answerable = is_lan_host(*from.ip())
            && bytes.len() >= 2
            && bytes[1] & RESPONSE_BIT == 0
            // miniupnpd drops NAT-PMP mapping requests shorter than their 12 bytes without a word.
            && !(request.version == NATPMP_VERSION && matches!(request.opcode, 1 | 2) && bytes.len() < 12);
        if !answerable {
            request.outcome = PmpOutcome::Ignored;
            self.requests.push(request);
            return None;
        }
        let fault = self.script.reply_fault.filter(|(fault, left)| {
            *left > 0
                && (*fault != ReplyFault::WrongNonce
                    || (request.version == PCP_VERSION && request.opcode == PCP_OPCODE_MAP))
        });
        let reply = if let Some((fault, _)) = fault {
            if let Some((_, left)) = &mut self.script.reply_fault {
                count_down(left);
            }
            // What a correct answer would have been, worked out on copies: a spoiled reply changes nothing.
            let (mut script, mut mappings) = (self.script.clone(), self.mappings.clone());
            let (proper, _) = answer(&mut script, &mut mappings, self.booted_at, &request, bytes, now);
            request.outcome = PmpOutcome::Fault(fault);
            spoil(proper, fault)
        } else {
            let (reply, outcome) = answer(&mut self.script, &mut self.mappings, self.booted_at, &request, bytes, now);
            request.outcome = outcome;
            Some(reply)
        };
        self.requests.push(request);
        reply
    }
}

fn count_down(left: &mut u32) {
    if *left != ALWAYS {
        *left = left.saturating_sub(1);
    }
}

/// Takes one from a scripted count and says whether it applied.
fn take(count: &mut u32) -> bool {
    let applies = *count > 0;
    if applies {
        count_down(count);
    }
    applies
}

fn spoil(proper: Vec<u8>, fault: ReplyFault) -> Option<Vec<u8>> {
    let mut reply = proper;
    match fault {
        ReplyFault::Silence => return None,
        ReplyFault::Garbage => reply = GARBAGE.to_vec(),
        ReplyFault::Truncated => reply.truncate(reply.len() / 2),
        ReplyFault::WrongOpcode => {
            let opcode = reply[1] & !RESPONSE_BIT;
            let wrong = if reply[0] == NATPMP_VERSION {
                (opcode + 1) % 3
            } else if opcode == PCP_OPCODE_MAP {
                2
            } else {
                PCP_OPCODE_MAP
            };
            reply[1] = RESPONSE_BIT | wrong;
        }
        ReplyFault::WrongNonce => {
            if let Some(nonce) = reply.get_mut(24..36) {
                nonce.iter_mut().for_each(|b| *b = !*b);
            }
        }
    }
    Some(reply)
}

/// The lab's LAN is 192.168.77.0/24; the gateway's own address does not count.
fn is_lan_host(address: Ipv4Addr) -> bool {
    address.octets()[..3] == GW_LAN_IP.octets()[..3] && address != GW_LAN_IP
}

/// Reads what can be read of a datagram into a record (outcome filled in later).
fn decode_request(from: SocketAddrV4, bytes: &[u8], now: Instant) -> PmpRequest {
    let u16_at = |i: usize| Some(u16::from_be_bytes(bytes.get(i..i + 2)?.try_into().ok()?));
    let u32_at = |i: usize| Some(u32::from_be_bytes(bytes.get(i..i + 4)?.try_into().ok()?));
    let address_at = |i: usize| {
        let octets: [u8; 16] = bytes.get(i..i + 16)?.try_into().ok()?;
        let address = Ipv6Addr::from(octets);
        Some(address.to_ipv4_mapped().map_or(IpAddr::V6(address), IpAddr::V4))
    };
    let version = bytes.first().copied().unwrap_or(0);
    let opcode = bytes.get(1).map_or(0, |o| o & !RESPONSE_BIT);
    let mut request = PmpRequest {
        at: now,
        from,
        bytes: bytes.to_vec(),
        version,
        opcode,
        protocol: None,
        internal_port: None,
        suggested_port: None,
        lifetime: None,
        nonce: None,
        client_ip: None,
        suggested_ip: None,
        prefer_failure: false,
        outcome: PmpOutcome::Ignored,
    };
    if version == NATPMP_VERSION {
        if matches!(opcode, 1 | 2) {
            request.protocol = Some(if opcode == 1 { UDP } else { TCP });
            request.internal_port = u16_at(4);
            request.suggested_port = u16_at(6);
            request.lifetime = u32_at(8);
        }
        return request;
    }
    request.lifetime = u32_at(4);
    request.client_ip = address_at(8);
    if opcode == PCP_OPCODE_MAP && bytes.len() >= PCP_MAP_BYTES {
        request.nonce = bytes[24..36].try_into().ok();
        request.protocol = Some(bytes[36]);
        request.internal_port = u16_at(40);
        request.suggested_port = u16_at(42);
        request.suggested_ip = address_at(44);
        request.prefer_failure =
            pcp_options(&bytes[PCP_MAP_BYTES..]).is_ok_and(|o| o.contains(&PCP_OPTION_PREFER_FAILURE));
    }
    request
}

/// The option codes of a PCP request's options area; Err(MALFORMED_OPTION) when an option runs past the end.
fn pcp_options(mut area: &[u8]) -> Result<Vec<u8>, u8> {
    let mut codes = Vec::new();
    while !area.is_empty() {
        let header: [u8; 4] = area.get(..4).and_then(|h| h.try_into().ok()).ok_or(pcp_result::MALFORMED_OPTION)?;
        let length = 4 + usize::from(u16::from_be_bytes([header[2], header[3]]));
        if area.len() < length {
            return Err(pcp_result::MALFORMED_OPTION);
        }
        codes.push(header[0]);
        // Option data is padded to a multiple of 4 bytes.
        area = area.get(length.next_multiple_of(4)..).unwrap_or(&[]);
    }
    Ok(codes)
}

/// The answer to an answerable request when no reply fault applies: the reply bytes and how it went.
fn answer(
    script: &mut PmpScript,
    mappings: &mut Vec<PmpMapping>,
    booted_at: Instant,
    request: &PmpRequest,
    bytes: &[u8],
    now: Instant,
) -> (Vec<u8>, PmpOutcome) {
    let epoch = u32::try_from(now.saturating_duration_since(booted_at).as_secs()).unwrap_or(u32::MAX);
    if request.version != NATPMP_VERSION && take(&mut script.pcp_unsupported) {
        // RFC 6887 section 9: a NAT-PMP server answers a PCP request with version 0 and result 1.
        let mut reply = vec![NATPMP_VERSION, RESPONSE_BIT | bytes[1], 0, 0];
        reply[2..4].copy_from_slice(&natpmp_result::UNSUPPORTED_VERSION.to_be_bytes());
        reply.extend_from_slice(&epoch.to_be_bytes());
        return (reply, PmpOutcome::NatPmpUnsupportedVersion);
    }
    let mut table = Table { script, mappings, now };
    if request.version == NATPMP_VERSION {
        let (reply, result) = table.natpmp(request, epoch);
        (reply, PmpOutcome::NatPmp(result))
    } else {
        let (reply, result) = table.pcp(request, bytes, epoch);
        (reply, PmpOutcome::Pcp(result))
    }
}

/// The table and the script while one request is served.
struct Table<'a> {
    script: &'a mut PmpScript,
    mappings: &'a mut Vec<PmpMapping>,
    now: Instant,
}

/// What a mapping request asks for, either protocol.
struct MapRequest {
    client: Ipv4Addr,
    protocol: u8,
    internal_port: u16,
    suggested_port: u16,
    lifetime: u32,
    nonce: Option<[u8; 12]>,
    prefer_failure: bool,
}

/// How a mapping request went: the external port to report, the lifetime, and the result.
enum Grant {
    Granted {
        external_port: u16,
        lifetime: u32,
    },
    Deleted {
        external_port: u16,
    },
    /// NOT_AUTHORIZED for a PCP nonce mismatch, with the existing mapping's remaining lifetime.
    WrongNonce {
        remaining: u32,
    },
    CannotProvideExternal,
    /// No free external port at all.
    NoPorts,
}

impl Table<'_> {
    fn natpmp(&mut self, request: &PmpRequest, epoch: u32) -> (Vec<u8>, u16) {
        let header = |result: u16| {
            let mut reply = vec![NATPMP_VERSION, RESPONSE_BIT | request.opcode];
            reply.extend_from_slice(&result.to_be_bytes());
            reply.extend_from_slice(&epoch.to_be_bytes());
            reply
        };
        match request.opcode {
            0 => {
                let mut reply = header(natpmp_result::SUCCESS);
                reply.extend_from_slice(&self.script.external_ip.octets());
                (reply, natpmp_result::SUCCESS)
            }
            1 | 2 => {
                let internal_port = request.internal_port.unwrap_or(0);
                let mapping_reply = |result: u16, external_port: u16, lifetime: u32| {
                    let mut reply = header(result);
                    reply.extend_from_slice(&internal_port.to_be_bytes());
                    reply.extend_from_slice(&external_port.to_be_bytes());
                    reply.extend_from_slice(&lifetime.to_be_bytes());
                    (reply, result)
                };
                if let Some((code, left)) = &mut self.script.natpmp_failure {
                    if take(left) {
                        return mapping_reply(*code, 0, 0);
                    }
                }
                let map = MapRequest {
                    client: *request.from.ip(),
                    protocol: request.protocol.unwrap_or(TCP),
                    internal_port,
                    suggested_port: request.suggested_port.unwrap_or(0),
                    lifetime: request.lifetime.unwrap_or(0),
                    nonce: None,
                    prefer_failure: false,
                };
                if map.lifetime > 0 && internal_port == 0 {
                    return mapping_reply(natpmp_result::NOT_AUTHORIZED, 0, 0);
                }
                match self.map(&map) {
                    Grant::Granted { external_port, lifetime } => {
                        mapping_reply(natpmp_result::SUCCESS, external_port, lifetime)
                    }
                    // RFC 6886 section 3.4: a delete is answered with external port 0 and lifetime 0.
                    Grant::Deleted { .. } => mapping_reply(natpmp_result::SUCCESS, 0, 0),
                    Grant::NoPorts | Grant::CannotProvideExternal | Grant::WrongNonce { .. } => {
                        mapping_reply(natpmp_result::OUT_OF_RESOURCES, 0, 0)
                    }
                }
            }
            _ => (header(natpmp_result::UNSUPPORTED_OPCODE), natpmp_result::UNSUPPORTED_OPCODE),
        }
    }

    fn pcp(&mut self, request: &PmpRequest, bytes: &[u8], epoch: u32) -> (Vec<u8>, u8) {
        // The reply echoes the request's opcode-specific fields, then fills in what was granted.
        let reply = |result: u8, lifetime: u32, granted: Option<(u16, Ipv4Addr)>| {
            let mut reply = wire::pcp_header(
                PCP_VERSION,
                RESPONSE_BIT | request.opcode,
                result,
                lifetime,
                epoch,
                Ipv6Addr::UNSPECIFIED,
            );
            if request.opcode == PCP_OPCODE_MAP && bytes.len() >= PCP_MAP_BYTES {
                reply.extend_from_slice(&bytes[PCP_HEADER_BYTES..PCP_MAP_BYTES]);
                if let Some((port, address)) = granted {
                    reply[42..44].copy_from_slice(&port.to_be_bytes());
                    reply[44..60].copy_from_slice(&address.to_ipv6_mapped().octets());
                }
            }
            (reply, result)
        };
        let error = |result: u8| {
            let short_lived =
                [pcp_result::NETWORK_FAILURE, pcp_result::NO_RESOURCES, pcp_result::USER_EX_QUOTA].contains(&result);
            reply(result, if short_lived { PCP_SHORT_ERROR_LIFETIME } else { 0 }, None)
        };
        if request.version != PCP_VERSION {
            return error(pcp_result::UNSUPP_VERSION);
        }
        if bytes.len() < PCP_HEADER_BYTES || bytes.len() > PCP_MAX_BYTES || !bytes.len().is_multiple_of(4) {
            return error(pcp_result::MALFORMED_REQUEST);
        }
        let client = request.client_ip.and_then(|ip| match ip {
            IpAddr::V4(v4) => Some(v4),
            IpAddr::V6(_) => None,
        });
        if request.opcode == PCP_OPCODE_ANNOUNCE {
            return reply(pcp_result::SUCCESS, 0, None);
        }
        if request.opcode != PCP_OPCODE_MAP {
            return error(pcp_result::UNSUPP_OPCODE);
        }
        if bytes.len() < PCP_MAP_BYTES {
            return error(pcp_result::MALFORMED_REQUEST);
        }
        let options = match pcp_options(&bytes[PCP_MAP_BYTES..]) {
            Ok(options) => options,
            Err(code) => return error(code),
        };
        // THIRD_PARTY is not allowed here; other mandatory options (code < 128) are unknown.
        if options.iter().any(|&o| {
            o == PCP_OPTION_THIRD_PARTY || (o < 128 && o != PCP_OPTION_PREFER_FAILURE && o != PCP_OPTION_FILTER)
        }) {
            return error(pcp_result::UNSUPP_OPTION);
        }
        if options.iter().filter(|&&o| o == PCP_OPTION_PREFER_FAILURE).count() > 1 {
            return error(pcp_result::MALFORMED_OPTION);
        }
        if let Some((code, left)) = &mut self.script.pcp_failure {
            if take(left) {
                return error(*code);
            }
        }
        if client != Some(*request.from.ip()) {
            return error(pcp_result::ADDRESS_MISMATCH);
        }
        let protocol = request.protocol.unwrap_or(0);
        if protocol != TCP && protocol != UDP {
            return error(pcp_result::UNSUPP_PROTOCOL);
        }
        let lifetime = request.lifetime.unwrap_or(0);
        let internal_port = request.internal_port.unwrap_or(0);
        if internal_port == 0 && lifetime > 0 {
            return error(pcp_result::MALFORMED_REQUEST);
        }
        let external_ip = self.script.external_ip;
        let suggested_ip =
            request.suggested_ip.filter(|ip| !ip.is_unspecified() && *ip != IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        if request.prefer_failure && suggested_ip.is_some_and(|ip| ip != IpAddr::V4(external_ip)) {
            return error(pcp_result::CANNOT_PROVIDE_EXTERNAL);
        }
        let map = MapRequest {
            client: *request.from.ip(),
            protocol,
            internal_port,
            suggested_port: request.suggested_port.unwrap_or(0),
            lifetime,
            nonce: request.nonce,
            prefer_failure: request.prefer_failure,
        };
        match self.map(&map) {
            Grant::Granted { external_port, lifetime } => {
                reply(pcp_result::SUCCESS, lifetime, Some((external_port, external_ip)))
            }
            Grant::Deleted { external_port } => reply(pcp_result::SUCCESS, 0, Some((external_port, external_ip))),
            Grant::WrongNonce { remaining } => reply(pcp_result::NOT_AUTHORIZED, remaining, None),
            Grant::CannotProvideExternal => error(pcp_result::CANNOT_PROVIDE_EXTERNAL),
            Grant::NoPorts => error(pcp_result::NO_RESOURCES),
        }
    }

    /// Creates, renews or deletes (lifetime 0) a mapping; shared by both protocols.
    fn map(&mut self, request: &MapRequest) -> Grant {
        let key = |m: &PmpMapping| {
            m.internal_client == request.client
                && m.protocol == request.protocol
                && (m.internal_port == request.internal_port || request.internal_port == 0)
        };
        // A PCP request must carry the nonce that made a PCP mapping (RFC 6887 section 11.3).
        let foreign = |m: &PmpMapping| request.nonce.is_some() && m.nonce.is_some() && m.nonce != request.nonce;
        if let Some(existing) = self.mappings.iter().find(|m| key(m) && foreign(m)) {
            if !self.script.nonce_takeover {
                let remaining = existing.expires_at.saturating_duration_since(self.now).as_secs();
                return Grant::WrongNonce { remaining: u32::try_from(remaining).unwrap_or(u32::MAX) };
            }
        }
        if request.lifetime == 0 {
            let external_port =
                self.mappings.iter().find(|m| key(m)).map_or(request.suggested_port, |m| m.external_port);
            self.mappings.retain(|m| !key(m));
            return Grant::Deleted { external_port };
        }
        let lifetime = self.script.lifetime_cap.map_or(request.lifetime, |cap| request.lifetime.min(cap));
        let expires_at = self.now + Duration::from_secs(lifetime.into());
        if let Some(existing) = self.mappings.iter_mut().find(|m| key(m)) {
            existing.lifetime = lifetime;
            existing.expires_at = expires_at;
            existing.nonce = request.nonce;
            return Grant::Granted { external_port: existing.external_port, lifetime };
        }
        let wanted = if request.suggested_port == 0 { request.internal_port } else { request.suggested_port };
        let wanted = nonzero_port(wanted.wrapping_add(self.script.external_port_offset));
        let taken = |port: u16| self.mappings.iter().any(|m| m.protocol == request.protocol && m.external_port == port);
        let external_port = if !taken(wanted) {
            wanted
        } else if request.prefer_failure {
            return Grant::CannotProvideExternal;
        } else {
            let mut candidate = wanted;
            loop {
                candidate = nonzero_port(candidate.wrapping_add(1));
                if candidate == wanted {
                    return Grant::NoPorts;
                }
                if !taken(candidate) {
                    break candidate;
                }
            }
        };
        self.mappings.push(PmpMapping {
            protocol: request.protocol,
            internal_client: request.client,
            internal_port: request.internal_port,
            external_port,
            lifetime,
            expires_at,
            nonce: request.nonce,
        });
        Grant::Granted { external_port, lifetime }
    }
}

fn nonzero_port(port: u16) -> u16 {
    port.max(1)
}

enum ServerCommand {
    Announce(Announcement, mpsc::Sender<Result<()>>),
    StopListening(mpsc::Sender<Result<()>>),
    Listen(mpsc::Sender<Result<()>>),
}

/// The thread in the gateway namespace that owns the socket.
struct Server {
    shared: Arc<Shared>,
    /// None while scripted to stop listening.
    socket: Option<UdpSocket>,
    commands: mpsc::Receiver<ServerCommand>,
}

/// 192.168.77.1:5351 (as miniupnpd binds it), non-blocking, sending multicast through br0.
fn open_server_socket() -> Result<UdpSocket> {
    let socket = UdpSocket::bind((GW_LAN_IP, NATPMP_PORT)).context(
        "binding 192.168.77.1:5351 in the gateway namespace (is miniupnpd running there with NAT-PMP on? \
         start the lab with `LabConfig { miniupnpd: false, .. }`)",
    )?;
    set_multicast_interface(&socket, GW_LAN_IP).context("sending multicast through br0")?;
    socket.set_multicast_loop_v4(false).context("turning off multicast loopback")?;
    socket.set_nonblocking(true).context("making the socket non-blocking")?;
    Ok(socket)
}

impl Server {
    fn run(mut self) {
        while !self.shared.stop.load(Ordering::SeqCst) {
            while let Ok(command) = self.commands.try_recv() {
                match command {
                    ServerCommand::Announce(kind, reply) => {
                        let _ = reply.send(self.announce(kind));
                    }
                    ServerCommand::StopListening(reply) => {
                        self.socket = None;
                        let _ = reply.send(Ok(()));
                    }
                    ServerCommand::Listen(reply) => {
                        let result = match self.socket {
                            Some(_) => Ok(()),
                            None => open_server_socket().map(|socket| self.socket = Some(socket)),
                        };
                        let _ = reply.send(result);
                    }
                }
            }
            match &self.socket {
                Some(socket) => {
                    wait_readable(socket, POLL_INTERVAL);
                    self.serve();
                }
                None => std::thread::sleep(POLL_INTERVAL),
            }
        }
    }

    fn serve(&self) {
        let Some(socket) = &self.socket else { return };
        // One byte more than PCP allows, to see that a datagram was too long.
        let mut datagram = [0u8; PCP_MAX_BYTES + 4];
        // Non-blocking: ends at WouldBlock (or any error; the next round tries again).
        while let Ok((length, from)) = socket.recv_from(&mut datagram) {
            let SocketAddr::V4(from) = from else { continue };
            let reply = self.shared.lock().receive(from, &datagram[..length], Instant::now());
            if let Some(reply) = reply {
                let _ = socket.send_to(&reply, from);
            }
        }
    }

    fn announce(&self, kind: Announcement) -> Result<()> {
        let (epoch, external_ip) = {
            let state = self.shared.lock();
            (state.epoch(), state.script.external_ip)
        };
        let mut datagrams = Vec::new();
        if matches!(kind, Announcement::NatPmp | Announcement::Both) {
            datagrams.push(wire::natpmp_announcement(epoch, external_ip));
        }
        if matches!(kind, Announcement::Pcp | Announcement::Both) {
            datagrams.push(wire::pcp_announcement(epoch));
        }
        // Announcements come from port 5351 too while the fake is not listening.
        let temporary;
        let socket = match &self.socket {
            Some(socket) => socket,
            None => {
                temporary = open_server_socket()?;
                &temporary
            }
        };
        for datagram in datagrams {
            socket
                .send_to(&datagram, (ALL_HOSTS_GROUP, ANNOUNCE_PORT))
                .context("multicasting an announcement to 224.0.0.1:5350 on br0")?;
        }
        Ok(())
    }
}

/// Sleeps until the socket is readable or `timeout` passes.
fn wait_readable(socket: &UdpSocket, timeout: Duration) {
    let mut pollfd = libc::pollfd { fd: socket.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    let timeout_ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: poll reads and writes exactly one pollfd that we own.
    unsafe { libc::poll(&mut pollfd, 1, timeout_ms) };
}

#[cfg(test)]
mod tests {
    use super::{wire::*, *};

    const LAN1: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 10);
    const LAN2: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 20);
    const NONCE: [u8; 12] = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12];

    fn state(script: PmpScript) -> State {
        State { script, mappings: Vec::new(), requests: Vec::new(), booted_at: Instant::now() }
    }

    fn send(state: &mut State, from: Ipv4Addr, bytes: &[u8]) -> Option<Reply> {
        let reply = state.receive(SocketAddrV4::new(from, 40000), bytes, Instant::now())?;
        Some(decode_reply(&reply).expect("the fake's reply decodes"))
    }

    fn pcp(client: Ipv4Addr, port: u16, suggested: u16, lifetime: u32, nonce: [u8; 12]) -> Vec<u8> {
        pcp_map_request(client, TCP, port, suggested, lifetime, nonce, false)
    }

    #[test]
    fn natpmp_maps_renews_and_deletes() {
        let mut s = state(PmpScript::new());
        let address = send(&mut s, LAN1, &natpmp_address_request()).unwrap();
        assert_eq!((address.opcode, address.result, address.external_ip), (128, 0, Some(EXTERNAL_IP_PLACEHOLDER)));
        let granted = send(&mut s, LAN1, &natpmp_map_request(UDP, 6881, 6881, 3600)).unwrap();
        assert_eq!((granted.opcode, granted.result), (129, 0));
        assert_eq!(
            (granted.internal_port, granted.external_port, granted.lifetime),
            (Some(6881), Some(6881), Some(3600))
        );
        // Another host asking for the same port gets the next one.
        let other = send(&mut s, LAN2, &natpmp_map_request(UDP, 6881, 6881, 3600)).unwrap();
        assert_eq!(other.external_port, Some(6882));
        let deleted = send(&mut s, LAN1, &natpmp_map_request(UDP, 6881, 0, 0)).unwrap();
        assert_eq!((deleted.result, deleted.external_port, deleted.lifetime), (0, Some(0), Some(0)));
        assert_eq!(s.mappings.len(), 1);
        // Deleting what is not there succeeds.
        assert_eq!(send(&mut s, LAN1, &natpmp_map_request(TCP, 1234, 0, 0)).unwrap().result, 0);
        // Too short: dropped without a word, as miniupnpd does.
        assert!(send(&mut s, LAN1, &[0, 2, 0, 0, 0x1a]).is_none());
        assert_eq!(s.requests.last().unwrap().outcome, PmpOutcome::Ignored);
    }

    #[test]
    fn pcp_checks_nonce_client_address_and_prefer_failure() {
        let mut s = state(PmpScript::new());
        let granted = send(&mut s, LAN1, &pcp(LAN1, 8080, 8080, 7200, NONCE)).unwrap();
        assert_eq!((granted.opcode, granted.result, granted.lifetime), (0x81, 0, Some(7200)));
        assert_eq!(
            (granted.nonce, granted.external_port, granted.external_ip),
            (Some(NONCE), Some(8080), Some(EXTERNAL_IP_PLACEHOLDER))
        );
        let other_nonce = send(&mut s, LAN1, &pcp(LAN1, 8080, 8080, 7200, [9; 12])).unwrap();
        assert_eq!(other_nonce.result, u16::from(pcp_result::NOT_AUTHORIZED));
        assert!(other_nonce.lifetime.unwrap() > 7000, "NOT_AUTHORIZED carries the mapping's remaining lifetime");
        let mismatch = send(&mut s, LAN1, &pcp(LAN2, 9090, 9090, 60, NONCE)).unwrap();
        assert_eq!((mismatch.result, mismatch.lifetime), (u16::from(pcp_result::ADDRESS_MISMATCH), Some(0)));
        let taken = pcp_map_request(LAN2, TCP, 8080, 8080, 60, NONCE, true);
        assert_eq!(send(&mut s, LAN2, &taken).unwrap().result, u16::from(pcp_result::CANNOT_PROVIDE_EXTERNAL));
        let moved = send(&mut s, LAN2, &pcp(LAN2, 8080, 8080, 60, NONCE)).unwrap();
        assert_eq!((moved.result, moved.external_port), (0, Some(8081)));
        assert_eq!(send(&mut s, LAN1, &pcp(LAN1, 8080, 8080, 0, NONCE)).unwrap().result, 0);
        assert_eq!(send(&mut s, LAN1, &pcp(LAN1, 8080, 8080, 0, NONCE)).unwrap().result, 0, "deleting twice");
        let announce = send(&mut s, LAN1, &pcp_announce_request(LAN1)).unwrap();
        assert_eq!((announce.opcode, announce.result), (0x80, 0));
        let v1 = send(&mut s, LAN1, &[1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]).unwrap();
        assert_eq!((v1.version, v1.result), (2, u16::from(pcp_result::UNSUPP_VERSION)));
        let mut odd = pcp(LAN1, 1, 1, 60, NONCE);
        odd.push(0);
        assert_eq!(send(&mut s, LAN1, &odd).unwrap().result, u16::from(pcp_result::MALFORMED_REQUEST));
    }

    #[test]
    fn scripted_refusals_lifetimes_and_ports_run_down() {
        let script = PmpScript::new()
            .pcp_unsupported_for(1)
            .pcp_result(pcp_result::USER_EX_QUOTA, 1)
            .natpmp_result(natpmp_result::OUT_OF_RESOURCES, 1)
            .lifetime_cap(4)
            .external_port_offset(100);
        let mut s = state(script);
        let unsupported = send(&mut s, LAN1, &pcp(LAN1, 8080, 8080, 3600, NONCE)).unwrap();
        assert_eq!((unsupported.version, unsupported.opcode, unsupported.result), (0, 0x81, 1));
        let quota = send(&mut s, LAN1, &pcp(LAN1, 8080, 8080, 3600, NONCE)).unwrap();
        assert_eq!((quota.result, quota.lifetime), (u16::from(pcp_result::USER_EX_QUOTA), Some(30)));
        let granted = send(&mut s, LAN1, &pcp(LAN1, 8080, 8080, 3600, NONCE)).unwrap();
        assert_eq!((granted.result, granted.lifetime, granted.external_port), (0, Some(4), Some(8180)));
        assert_eq!(send(&mut s, LAN1, &natpmp_map_request(UDP, 53, 53, 60)).unwrap().result, 4);
        assert_eq!(send(&mut s, LAN1, &natpmp_map_request(UDP, 5353, 0, 60)).unwrap().external_port, Some(5453));
        let outcomes: Vec<PmpOutcome> = s.requests.iter().map(|r| r.outcome).collect();
        assert_eq!(
            outcomes,
            [
                PmpOutcome::NatPmpUnsupportedVersion,
                PmpOutcome::Pcp(pcp_result::USER_EX_QUOTA),
                PmpOutcome::Pcp(0),
                PmpOutcome::NatPmp(4),
                PmpOutcome::NatPmp(0)
            ]
        );
    }

    #[test]
    fn spoiled_replies_leave_the_table_alone() {
        let mut s = state(PmpScript::new().reply_fault(ReplyFault::WrongNonce, 1));
        // NAT-PMP is not touched by a nonce fault and does not use it up.
        assert_eq!(send(&mut s, LAN1, &natpmp_map_request(TCP, 22000, 22000, 60)).unwrap().result, 0);
        let wrong = send(&mut s, LAN1, &pcp(LAN1, 8080, 8080, 60, NONCE)).unwrap();
        assert_eq!(wrong.nonce, Some(NONCE.map(|b| !b)));
        assert_eq!(s.mappings.len(), 1, "the spoiled answer made no mapping");
        assert_eq!(send(&mut s, LAN1, &pcp(LAN1, 8080, 8080, 60, NONCE)).unwrap().nonce, Some(NONCE));
        for (fault, check) in
            [(ReplyFault::Silence, None), (ReplyFault::Garbage, Some(GARBAGE.len())), (ReplyFault::Truncated, Some(8))]
        {
            s.script = PmpScript::new().reply_fault(fault, ALWAYS);
            let reply = s.receive(SocketAddrV4::new(LAN1, 1), &natpmp_map_request(UDP, 9, 9, 60), Instant::now());
            assert_eq!(reply.map(|r| r.len()), check, "{fault:?}");
        }
        s.script = PmpScript::new().reply_fault(ReplyFault::WrongOpcode, 1);
        assert_eq!(send(&mut s, LAN1, &natpmp_map_request(UDP, 9, 9, 60)).unwrap().opcode, 130);
        assert_eq!(s.mappings.len(), 2);
    }

    #[test]
    fn ignores_other_networks_and_responses() {
        let mut s = state(PmpScript::new());
        assert!(send(&mut s, Ipv4Addr::new(172, 31, 77, 100), &natpmp_address_request()).is_none());
        assert!(send(&mut s, LAN1, &natpmp_announcement(5, EXTERNAL_IP_PLACEHOLDER)).is_none());
        assert!(send(&mut s, LAN1, &[0]).is_none());
        assert!(s.requests.iter().all(|r| r.outcome == PmpOutcome::Ignored));
    }

    #[test]
    fn decodes_what_it_records() {
        let bytes = pcp_map_request(LAN1, UDP, 6881, 6882, 120, NONCE, true);
        let r = decode_request(SocketAddrV4::new(LAN1, 5), &bytes, Instant::now());
        assert_eq!(
            (r.version, r.opcode, r.protocol, r.internal_port, r.suggested_port),
            (2, 1, Some(UDP), Some(6881), Some(6882))
        );
        assert_eq!(
            (r.lifetime, r.nonce, r.client_ip, r.prefer_failure),
            (Some(120), Some(NONCE), Some(IpAddr::V4(LAN1)), true)
        );
        let r = decode_request(SocketAddrV4::new(LAN1, 5), &natpmp_map_request(TCP, 80, 8080, 7), Instant::now());
        assert_eq!(
            (r.version, r.opcode, r.protocol, r.internal_port, r.suggested_port, r.lifetime),
            (0, 2, Some(TCP), Some(80), Some(8080), Some(7))
        );
        assert_eq!(pcp_options(&[2, 0, 0, 0, 0x80, 0, 0, 4, 1, 1]), Err(pcp_result::MALFORMED_OPTION));
        assert_eq!(pcp_options(&[2, 0, 0, 0, 0x80, 0, 0, 2, 1, 1, 0, 0]), Ok(vec![2, 0x80]));
    }
}
