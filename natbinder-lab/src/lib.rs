//! A NAT lab in network namespaces, shared by natbinder's tests and its demo.
//!
//! ```text
//!   lan1 (192.168.77.10) ─┐                         ┌─ wan peer (172.31.77.100)
//!                         ├─ br0 ─ gw ─ wan0 ───────┘
//!   lan2 (192.168.77.20) ─┘   192.168.77.1   172.31.77.1
//! ```
//! The gateway forwards, masquerades LAN->WAN with nftables and runs the distribution's miniupnpd
//! (UPnP IGD and/or NAT-PMP/PCP) on br0, or a scripted fake gateway ([`fake_igd`], [`fake_pmp`]). The WAN peer has no route to the LAN: it reaches a LAN
//! program only through a port mapping on the gateway's WAN address, exactly as the internet would.
//!
//! With [`LabConfig::ipv6`] every host also gets a global IPv6 address and the gateway routes IPv6
//! without NAT, opening its firewall per pinhole (see [`ipv6`]).
//!
//! Everything the lab creates (namespaces, a cgroup, processes, files) is removed when the [`Lab`] is
//! dropped, also when a test panics; labs left behind by a killed run are removed by the next one.
//! All traffic stays inside these namespaces.
use std::{
    fs::{self, File, OpenOptions},
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream, UdpSocket},
    os::{
        fd::{AsRawFd, FromRawFd},
        unix::process::CommandExt,
    },
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};

pub mod fake_igd;
pub mod fake_pmp;
pub mod ipv6;

pub use ipv6::{
    parse_nft_pinholes, parse_pcp_map6_reply, pcp_map6_request, tcp6_from_wan, udp6_from_wan, AddressChange,
    GatewayPinhole, LabAddress6, PcpMap6Reply, PinholeSoapReply, GW_LAN_IP6, GW_LAN_LL6, GW_WAN_IP6, LAN1_IP6,
    LAN2_IP6, LAN6_PREFIX, PINHOLE_CONTROL_PATH, WAN6_PREFIX, WANIPV6_FIREWALL_CONTROL, WAN_PEER_IP6,
};

pub const GW_LAN_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 1);
pub const LAN1_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 10);
pub const LAN2_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 20);
pub const GW_WAN_IP: Ipv4Addr = Ipv4Addr::new(172, 31, 77, 1);
pub const WAN_PEER_IP: Ipv4Addr = Ipv4Addr::new(172, 31, 77, 100);
/// miniupnpd refuses private WAN addresses; it is given this public-looking placeholder as its external
/// address instead. Its DNAT rules match the WAN interface, so peers use GW_WAN_IP. Nothing is ever sent
/// to the placeholder.
pub const EXTERNAL_IP_PLACEHOLDER: Ipv4Addr = Ipv4Addr::new(11, 77, 77, 77);
/// Where NAT-PMP and PCP servers listen (RFC 6886, RFC 6887).
pub const NATPMP_PORT: u16 = 5351;
/// Where NAT-PMP and PCP clients listen for a gateway's multicast announcements, on [`ALL_HOSTS_GROUP`].
pub const ANNOUNCE_PORT: u16 = 5350;
pub const ALL_HOSTS_GROUP: Ipv4Addr = Ipv4Addr::new(224, 0, 0, 1);

const NETNS_PREFIX: &str = "nbl-";
const CGROUP_PREFIX: &str = "natbinder-lab-";

static LAB_SEQ: AtomicU32 = AtomicU32::new(0);

/// What lan2 asks for in [`Lab::lan2_maps`] over NAT-PMP: longer than any test.
const LAN2_NATPMP_LIFETIME: &str = "3600";

#[derive(Clone, Debug)]
pub struct LabConfig {
    pub upnp: bool,
    pub natpmp: bool,
    /// miniupnpd's HTTP port; clients find it over SSDP, so tests may change it across restarts.
    pub http_port: u16,
    /// Whether [`Lab::start`] starts miniupnpd. Off for tests that put a [`fake_igd::FakeIgd`] or a
    /// [`fake_pmp::FakePmp`] on the gateway instead; the network and nftables are the same either way.
    pub miniupnpd: bool,
    /// miniupnpd's `min_lifetime` (default 120 s): PCP lifetimes asked below it are raised to it.
    /// It must stay below `max_lifetime`, or miniupnpd refuses to start.
    pub min_lifetime: Option<u32>,
    /// miniupnpd's `max_lifetime` (default 86400 s): PCP lifetimes asked above it are cut to it, so
    /// `Some(4)` with `min_lifetime: Some(1)` makes the gateway grant 4 s when a client asks 3600.
    /// NAT-PMP grants are not affected (miniupnpd 2.3.1 grants NAT-PMP lifetimes as asked).
    pub max_lifetime: Option<u32>,
    /// miniupnpd's `system_uptime`: its NAT-PMP/PCP epoch is the system's uptime, not the time since
    /// miniupnpd started, a common router setting. A restart that loses every mapping then keeps the
    /// epoch counting, and the epoch rule sees nothing.
    pub system_uptime: bool,
    /// IPv6 as well: global addresses ([`GW_LAN_IP6`], [`LAN1_IP6`], [`LAN2_IP6`], [`GW_WAN_IP6`],
    /// [`WAN_PEER_IP6`]), IPv6 forwarding in the gateway behind the same drop-by-default forward chain,
    /// and miniupnpd with IPv6 on (pinholes over UPnP WANIPv6FirewallControl and PCP). Off by default:
    /// with IPv6 on, miniupnpd 2.3.1 rescans its whole nftables chain on every request, which makes
    /// each request a few milliseconds slower per rule the gateway holds.
    pub ipv6: bool,
    /// With `ipv6`: also give miniupnpd `ipv6_listening_ip=<GW_LAN_IP6>`, as some routers do. miniupnpd
    /// 2.3.1 then binds its only HTTP socket to that address: UPnP over IPv4 (and SSDP's LOCATION, which
    /// names the IPv4 address) stops working, as do HTTP and PCP on the link-local address and SSDP over
    /// IPv6 multicast. For tests of exactly that router.
    pub ipv6_listening_ip: bool,
}

impl Default for LabConfig {
    fn default() -> Self {
        Self {
            upnp: true,
            natpmp: false,
            http_port: 5555,
            miniupnpd: true,
            min_lifetime: None,
            max_lifetime: None,
            system_uptime: false,
            ipv6: false,
            ipv6_listening_ip: false,
        }
    }
}

/// Run between fork and exec of the command that becomes miniupnpd: gives it a mount namespace of its
/// own in which /dev/console and /dev/log are /dev/null. miniupnpd logs through syslog(3) with
/// LOG_CONS, so where no syslog daemon listens on /dev/log (a CI VM) every line it logs went to
/// /dev/console, here a serial port at 115200 baud: perf showed miniupnpd spending most of its time in
/// uart_write, each request taking 10 to 400 ms as its debug output grew with its table. Where one
/// listens (a desktop), the lab's lines would fill the system journal. Its stderr, which the lab keeps
/// in miniupnpd.log, has every line either way. `ip netns exec` makes its own mount namespace from
/// this one, so the bind mounts carry over.
fn syslog_to_null() -> std::io::Result<()> {
    let fail = || Err(std::io::Error::last_os_error());
    // SAFETY: plain syscalls on NUL-terminated static strings.
    unsafe {
        if libc::unshare(libc::CLONE_NEWNS) != 0 {
            return fail();
        }
        let root = c"/".as_ptr();
        if libc::mount(std::ptr::null(), root, std::ptr::null(), libc::MS_REC | libc::MS_PRIVATE, std::ptr::null()) != 0
        {
            return fail();
        }
        for target in [c"/dev/console", c"/dev/log"] {
            // ENOENT (no /dev/log on a machine without a syslog daemon) is fine: nothing to hide.
            if libc::mount(c"/dev/null".as_ptr(), target.as_ptr(), std::ptr::null(), libc::MS_BIND, std::ptr::null())
                != 0
                && *libc::__errno_location() != libc::ENOENT
            {
                return fail();
            }
        }
    }
    Ok(())
}

/// The ephemeral ports of the lab's LAN hosts: tests and benchmarks bind explicit ports below these.
pub const LAN_EPHEMERAL_PORTS: &str = "50000 60999";

/// A network namespace created by the lab (a file under /run/netns).
#[derive(Debug)]
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// Runs `f` on a new thread inside this namespace: sockets it opens live there.
    pub fn run<R: Send + 'static>(&self, f: impl FnOnce() -> R + Send + 'static) -> R {
        let file = File::open(self.path()).expect("opening the lab namespace");
        std::thread::spawn(move || {
            // SAFETY: setns on this thread only; the file stays open for the call.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                panic!("setns: {}", std::io::Error::last_os_error());
            }
            f()
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
    }

    /// Runs a command inside the namespace with `ip netns exec` (fine for tools that need no cgroup).
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<String> {
        run_cmd(Command::new("ip").args(["netns", "exec", &self.name, program]).args(args))
    }
}

/// A network namespace owned by a test on its own (outside a [`Lab`]): deleted on drop.
pub struct ScratchNetns(pub Netns);

impl ScratchNetns {
    /// Creates a namespace with only `lo` up, named after this process so stale ones can be found.
    pub fn create(role: &str) -> Result<Self> {
        remove_stale_labs();
        let seq = LAB_SEQ.fetch_add(1, Ordering::SeqCst);
        let name = format!("{NETNS_PREFIX}{}-{seq}-{role}", std::process::id());
        run_cmd(Command::new("ip").args(["netns", "add", &name]))?;
        let ns = ScratchNetns(Netns { name });
        run_cmd(Command::new("ip").args(["-n", &ns.0.name, "link", "set", "lo", "up"]))?;
        Ok(ns)
    }
}

impl Drop for ScratchNetns {
    fn drop(&mut self) {
        kill_netns_processes(&self.0.name);
        let _ = Command::new("ip").args(["netns", "delete", &self.0.name]).stderr(Stdio::null()).status();
    }
}

/// The name for a scratch cgroup of this process (found and removed by later runs if left behind).
pub fn scratch_cgroup_name(role: &str) -> String {
    format!("{CGROUP_PREFIX}{}-{}-{role}", std::process::id(), LAB_SEQ.fetch_add(1, Ordering::SeqCst))
}

/// A command that runs in network namespace `ns` and, if given, in `cgroup`. Enters only the network
/// namespace, so /sys/fs/cgroup stays visible inside (unlike `ip netns exec`).
pub fn command_in(ns: &Netns, cgroup: Option<&Cgroup>, program: impl AsRef<std::ffi::OsStr>) -> Result<Command> {
    command_in_as(ns, cgroup, None, program)
}

/// As [`command_in`], the program running as `user` (uid, gid) with no supplementary groups. The
/// switch happens after entering the namespace, which needs root; `program` must be executable by
/// that user.
pub fn command_in_as(
    ns: &Netns,
    cgroup: Option<&Cgroup>,
    user: Option<(u32, u32)>,
    program: impl AsRef<std::ffi::OsStr>,
) -> Result<Command> {
    let netns = File::open(ns.path()).with_context(|| format!("opening {}", ns.path().display()))?;
    let procs = match cgroup {
        Some(c) => Some(OpenOptions::new().write(true).open(c.path.join("cgroup.procs"))?),
        None => None,
    };
    let mut cmd = Command::new(program);
    // SAFETY: only async-signal-safe syscalls (write, setns) run between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(procs) = &procs {
                // "0" moves the writing process itself.
                if libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if let Some((uid, gid)) = user {
                if libc::setgroups(0, std::ptr::null()) != 0 || libc::setgid(gid) != 0 || libc::setuid(uid) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    Ok(cmd)
}

/// A cgroup v2 directory made by the lab; programs under test run in it.
#[derive(Debug)]
pub struct Cgroup {
    pub path: PathBuf,
}

impl Cgroup {
    /// Creates `<cgroup2 root>/<name>`; removed (its processes killed) on drop.
    pub fn create(name: &str) -> Result<Self> {
        let root = cgroup2_root()?;
        let path = root.join(name);
        fs::create_dir(&path).with_context(|| format!("creating cgroup {}", path.display()))?;
        Ok(Self { path })
    }

    /// Creates a cgroup under this one (a unit started later, a container); removed on drop.
    pub fn child(&self, name: &str) -> Result<Cgroup> {
        let path = self.path.join(name);
        fs::create_dir(&path).with_context(|| format!("creating cgroup {}", path.display()))?;
        Ok(Cgroup { path })
    }

    pub fn pids(&self) -> Vec<i32> {
        fs::read_to_string(self.path.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    fn destroy(path: &Path) {
        // cgroup.kill (Linux 5.14+) kills every process in the subtree at once.
        let _ = fs::write(path.join("cgroup.kill"), "1");
        // Children first: a cgroup with children cannot be removed.
        if let Ok(entries) = fs::read_dir(path) {
            for entry in entries.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    Self::destroy(&entry.path());
                }
            }
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while fs::remove_dir(path).is_err() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        Self::destroy(&self.path);
    }
}

/// The cgroup2 mount point, from /proc/self/mounts.
pub fn cgroup2_root() -> Result<PathBuf> {
    let mounts = fs::read_to_string("/proc/self/mounts")?;
    mounts
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 2 && f[2] == "cgroup2").then(|| PathBuf::from(f[1]))
        })
        .ok_or_else(|| anyhow!("no cgroup2 filesystem mounted"))
}

fn run_cmd(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs a client tool (upnpc, natpmpc) in `from` and returns all it printed (stdout, then stderr),
/// whatever its exit status: tests look at refusals, which such tools report with a failing status.
/// Fails only if the tool could not run or did not finish within `time_limit_secs`.
pub fn run_client_tool(from: &Netns, tool: &str, time_limit_secs: u32, args: &[&str]) -> Result<String> {
    let limit = time_limit_secs.to_string();
    let output = Command::new("ip")
        .args(["netns", "exec", &from.name, "timeout", &limit, tool])
        .args(args)
        .output()
        .with_context(|| format!("running {tool} {args:?} in {}", from.name))?;
    // timeout(1) exits with 124 when it had to stop the command.
    if output.status.code() == Some(124) {
        bail!("{tool} {args:?} in {} did not finish within {limit} s", from.name);
    }
    let mut printed = String::from_utf8_lossy(&output.stdout).into_owned();
    printed.push_str(&String::from_utf8_lossy(&output.stderr));
    Ok(printed)
}

/// Runs iproute2 commands in one process, in namespace `netns` if given.
fn run_ip_batch(netns: Option<&str>, commands: &str) -> Result<()> {
    let mut cmd = Command::new("ip");
    if let Some(ns) = netns {
        cmd.args(["-n", ns]);
    }
    let mut child = cmd
        .args(["-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running ip (iproute2): is it installed?")?;
    child.stdin.take().unwrap().write_all(commands.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("setting up the lab network failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

fn pid_alive(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Removes namespaces and cgroups left by labs whose process is gone (a test run that was killed).
pub fn remove_stale_labs() {
    if let Ok(entries) = fs::read_dir("/run/netns") {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(pid) =
                name.strip_prefix(NETNS_PREFIX).and_then(|r| r.split('-').next()).and_then(|p| p.parse().ok())
            {
                if !pid_alive(pid) {
                    kill_netns_processes(&name);
                    let _ = Command::new("ip").args(["netns", "delete", &name]).status();
                }
            }
        }
    }
    if let Ok(root) = cgroup2_root() {
        if let Ok(entries) = fs::read_dir(&root) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if let Some(pid) =
                    name.strip_prefix(CGROUP_PREFIX).and_then(|r| r.split('-').next()).and_then(|p| p.parse().ok())
                {
                    if !pid_alive(pid) {
                        Cgroup::destroy(&e.path());
                    }
                }
            }
        }
    }
}

/// Kills every process whose network namespace is the named one (miniupnpd, daemons, programs).
fn kill_netns_processes(name: &str) {
    let Ok(target) = fs::metadata(Path::new("/run/netns").join(name)) else { return };
    use std::os::unix::fs::MetadataExt;
    let Ok(procs) = fs::read_dir("/proc") else { return };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
        if let Ok(m) = fs::metadata(p.path().join("ns/net")) {
            if m.ino() == target.ino() && m.dev() == target.dev() {
                // SAFETY: plain kill(2).
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

/// A port mapping the gateway holds, as its forwarding rules show it (or `upnpc -l` lists it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GatewayMapping {
    pub protocol: String,
    pub external_port: u16,
    pub internal_client: Ipv4Addr,
    pub internal_port: u16,
    pub description: String,
}

pub struct Lab {
    pub id: String,
    pub dir: PathBuf,
    pub gw: Netns,
    pub lan1: Netns,
    pub lan2: Netns,
    pub wan: Netns,
    /// Programs under test run here; natbinder watches it.
    pub cgroup: Cgroup,
    pub config: LabConfig,
    miniupnpd: Option<Child>,
    children: Vec<Child>,
}

impl Lab {
    /// Builds the topology and starts miniupnpd.
    pub fn start(config: LabConfig) -> Result<Self> {
        if unsafe { libc::geteuid() } != 0 {
            bail!("the lab needs root (network namespaces, nftables, cgroups, eBPF): run it as root or with sudo");
        }
        for tool in ["ip", "nft", "miniupnpd", "upnpc"] {
            if Command::new("sh")
                .args(["-c", &format!("command -v {tool} || test -x /usr/sbin/{tool}")])
                .output()
                .map_or(true, |o| !o.status.success())
            {
                bail!("`{tool}` is not installed: run scripts/setup.sh, which installs the lab's packages");
            }
        }
        remove_stale_labs();
        let seq = LAB_SEQ.fetch_add(1, Ordering::SeqCst);
        let id = format!("{}-{seq}", std::process::id());
        let dir = std::env::temp_dir().join(format!("natbinder-lab-{id}"));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir)?;
        let ns = |role: &str| Netns { name: format!("{NETNS_PREFIX}{id}-{role}") };
        let cgroup = Cgroup::create(&format!("{CGROUP_PREFIX}{id}"))?;
        let mut lab = Lab {
            gw: ns("gw"),
            lan1: ns("lan1"),
            lan2: ns("lan2"),
            wan: ns("wan"),
            id,
            dir,
            cgroup,
            config,
            miniupnpd: None,
            children: Vec::new(),
        };
        lab.build_network()?;
        if lab.config.miniupnpd {
            lab.start_miniupnpd()?;
        }
        Ok(lab)
    }

    fn build_network(&self) -> Result<()> {
        let (gw, lan1, lan2, wan) = (&self.gw.name, &self.lan1.name, &self.lan2.name, &self.wan.name);
        run_ip_batch(
            None,
            &format!(
                "netns add {gw}\nnetns add {lan1}\nnetns add {lan2}\nnetns add {wan}\n\
                 link add name br0 netns {gw} type bridge\n\
                 link add name eth0 netns {lan1} type veth peer name lan1 netns {gw}\n\
                 link add name eth0 netns {lan2} type veth peer name lan2 netns {gw}\n\
                 link add name eth0 netns {wan} type veth peer name wan0 netns {gw}\n"
            ),
        )?;
        let ipv6 = self.config.ipv6;
        if ipv6 {
            // DAD off on the hosts' interfaces, so that their link-local and (kernel-made) temporary
            // addresses are usable at once; the lab's own addresses are added with `nodad` anyway.
            for (ns, dev) in [(&self.gw, "wan0"), (&self.lan1, "eth0"), (&self.lan2, "eth0"), (&self.wan, "eth0")] {
                ns.sysctl(&format!("net/ipv6/conf/{dev}/accept_dad"), "0")?;
            }
            self.gw.sysctl("net/ipv6/conf/all/forwarding", "1")?;
        }
        let mut gw_cmds = String::new();
        if ipv6 {
            // br0's only link-local address is a fixed fe80::1 (as many routers use); the bridge ports get
            // none. Both must be set before the links go up.
            gw_cmds.push_str(&format!(
                "link set br0 addrgenmode none\nlink set lan1 addrgenmode none\nlink set lan2 addrgenmode none\n\
                 addr add {GW_LAN_LL6}/64 dev br0 nodad\naddr add {GW_LAN_IP6}/64 dev br0 nodad\n\
                 addr add {GW_WAN_IP6}/64 dev wan0 nodad\n"
            ));
        }
        gw_cmds.push_str(&format!(
            "link set lan1 master br0\nlink set lan2 master br0\n\
             addr add {GW_LAN_IP}/24 dev br0\naddr add {GW_WAN_IP}/24 dev wan0\n\
             link set lo up\nlink set br0 up\nlink set lan1 up\nlink set lan2 up\nlink set wan0 up\n"
        ));
        run_ip_batch(Some(gw), &gw_cmds)?;
        for (ns, ip, ip6, route) in
            [(lan1, LAN1_IP, LAN1_IP6, true), (lan2, LAN2_IP, LAN2_IP6, true), (wan, WAN_PEER_IP, WAN_PEER_IP6, false)]
        {
            let mut cmds = format!("addr add {ip}/24 dev eth0\nlink set lo up\nlink set eth0 up\n");
            if route {
                cmds.push_str(&format!("route add default via {GW_LAN_IP}\n"));
            }
            if ipv6 {
                cmds.push_str(&format!("addr add {ip6}/64 dev eth0 nodad\n"));
                if route {
                    // The default router is the gateway's link-local address, as a router advertisement
                    // would give it (RFC 4861 routers advertise from link-local). miniupnpd serves HTTP
                    // and PCP there too (unless `ipv6_listening_ip` is set), so a client that takes its
                    // gateway from the default route can use it, binding its source to the global
                    // address it opens; routing works the same via GW_LAN_IP6.
                    cmds.push_str(&format!("route add default via {GW_LAN_LL6} dev eth0\n"));
                } else {
                    // The WAN peer (the internet) routes the LAN's prefix to the gateway.
                    cmds.push_str(&format!("route add {LAN6_PREFIX}/64 via {GW_WAN_IP6}\n"));
                }
            }
            run_ip_batch(Some(ns), &cmds)?;
        }
        for host in [&self.lan1, &self.lan2] {
            // A LAN host's client connections (the daemon's to the gateway, the benchmarks' bare
            // clients) take their ports from here, above every port a test or benchmark binds on purpose:
            // a listener's bind() must never meet a connection that happens to hold its port (`run
            // --wait` once failed with EADDRINUSE on 33004 that way).
            host.sysctl("net/ipv4/ip_local_port_range", LAN_EPHEMERAL_PORTS)?;
        }
        self.gw.exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
        // LAN hosts talk to each other through br0 unfiltered, as on a home router's switch. Where the
        // br_netfilter module is loaded (bridge-nf-call-iptables=1), bridged frames pass the forward
        // chain below, hence its br0 -> br0 rule. The forward chain serves IPv6 too (an `inet` table):
        // only established/related traffic and miniupnpd's pinholes come in from the WAN. Masquerading
        // is IPv4 only: IPv6 LAN hosts keep their own addresses. Neighbor discovery is addressed to the
        // gateway itself (no input filter), so nothing else needs accepting.
        let rules = self.dir.join("gateway.nft");
        fs::write(
            &rules,
            r#"table inet filter {
    chain forward {
        type filter hook forward priority 0; policy drop;
        ct state established,related accept
        iifname "br0" oifname "wan0" accept
        iifname "br0" oifname "br0" accept
        jump miniupnpd
    }
    chain miniupnpd {
    }
    chain prerouting {
        type nat hook prerouting priority dstnat; policy accept;
        jump prerouting_miniupnpd
    }
    chain prerouting_miniupnpd {
    }
    chain postrouting {
        type nat hook postrouting priority srcnat; policy accept;
        jump postrouting_miniupnpd
        oifname "wan0" meta nfproto ipv4 masquerade
    }
    chain postrouting_miniupnpd {
    }
}
"#,
        )?;
        self.gw.exec("nft", &["-f", rules.to_str().unwrap()])?;
        Ok(())
    }

    /// `ipv6_disable=yes` unless [`LabConfig::ipv6`]: with IPv6 on, miniupnpd 2.3.1's nftables backend
    /// re-reads its whole `miniupnpd` chain (looking for expired pinholes) every time its main loop
    /// wakes, so every request costs a few milliseconds more per rule held: measured here, a SOAP
    /// request took ~3 ms with an empty chain, ~12 ms with 100 pinholes and ~330 ms with 100 IPv4
    /// mappings (~110 ms with IPv6 off); an AddPinhole with 100 pinholes held ~225 ms.
    /// With IPv6 on, `ipv6_listening_ip` stays unset unless [`LabConfig::ipv6_listening_ip`] (see there):
    /// miniupnpd then finds GW_LAN_IP6 on br0 itself and names it in SSDP answers over IPv6.
    fn miniupnpd_config(&self) -> String {
        let yn = |b: bool| if b { "yes" } else { "no" };
        let mut conf = format!(
            "ext_ifname=wan0\next_ip={EXTERNAL_IP_PLACEHOLDER}\nlistening_ip=br0\nhttp_port={}\n\
             enable_upnp={}\nenable_natpmp={}\nsecure_mode=yes\nsystem_uptime={}\n\
             lease_file={}\nuuid=3d3cec3a-8cf0-11e0-98ee-001a6bd2d07b\nnotify_interval=60\n\
             clean_ruleset_interval=600\nipv6_disable={}\n",
            self.config.http_port,
            yn(self.config.upnp),
            yn(self.config.natpmp),
            yn(self.config.system_uptime),
            self.dir.join("miniupnpd.leases").display(),
            yn(!self.config.ipv6),
        );
        if self.config.ipv6 && self.config.ipv6_listening_ip {
            conf.push_str(&format!("ipv6_listening_ip={GW_LAN_IP6}\n"));
        }
        if let Some(seconds) = self.config.min_lifetime {
            conf.push_str(&format!("min_lifetime={seconds}\n"));
        }
        if let Some(seconds) = self.config.max_lifetime {
            conf.push_str(&format!("max_lifetime={seconds}\n"));
        }
        conf.push_str("allow 1024-65535 192.168.77.0/24 1024-65535\ndeny 0-65535 0.0.0.0/0 0-65535\n");
        conf
    }

    /// Starts miniupnpd in the gateway and waits until it answers: its HTTP port when UPnP is on, a NAT-PMP
    /// external address request when NAT-PMP is on. Also works in a lab started with `miniupnpd: false`:
    /// an explicit call means the test wants it now.
    pub fn start_miniupnpd(&mut self) -> Result<()> {
        let conf = self.dir.join("miniupnpd.conf");
        fs::write(&conf, self.miniupnpd_config())?;
        let log = File::create(self.dir.join("miniupnpd.log"))?;
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &self.gw.name, "miniupnpd", "-d", "-f"])
            .arg(&conf)
            .arg("-P")
            .arg(self.dir.join("miniupnpd.pid"))
            .stdout(log.try_clone()?)
            .stderr(log);
        // SAFETY: the hook makes only syscalls, on static paths (nothing allocated after fork).
        unsafe { command.pre_exec(syslog_to_null) };
        let child = command.spawn().context("starting miniupnpd")?;
        self.miniupnpd = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if self.miniupnpd_answers() {
                return Ok(());
            }
            if let Some(status) = self.miniupnpd.as_mut().unwrap().try_wait()? {
                bail!("miniupnpd exited ({status}): {}", self.miniupnpd_log());
            }
            if Instant::now() > deadline {
                bail!("miniupnpd did not answer on its HTTP or NAT-PMP port within 10 s: {}", self.miniupnpd_log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether every service the configuration turns on answers: UPnP's HTTP port accepts a connection
    /// and NAT-PMP answers an external address request (both from the gateway itself, whose address is
    /// on the LAN, so miniupnpd serves it).
    fn miniupnpd_answers(&self) -> bool {
        let (upnp, natpmp, port) = (self.config.upnp, self.config.natpmp, self.config.http_port);
        // With `ipv6_listening_ip` miniupnpd's HTTP server answers on that address only.
        let http = if self.config.ipv6 && self.config.ipv6_listening_ip {
            SocketAddr::from((GW_LAN_IP6, port))
        } else {
            SocketAddr::from((GW_LAN_IP, port))
        };
        self.gw.run(move || {
            let wait = Duration::from_millis(200);
            (!upnp || TcpStream::connect_timeout(&http, wait).is_ok())
                && (!natpmp || natpmp_external_address(wait).is_some())
        })
    }

    pub fn miniupnpd_log(&self) -> String {
        fs::read_to_string(self.dir.join("miniupnpd.log")).unwrap_or_default()
    }

    /// Stops miniupnpd and forgets its state, like a gateway that lost power: its chains are flushed
    /// and its lease file deleted, so the next [`Lab::start_miniupnpd`] starts with an empty table and a
    /// new epoch. Without a running miniupnpd it only empties the chains, which is harmless. IPv6
    /// pinholes (rules in the `miniupnpd` chain) are lost too.
    pub fn stop_miniupnpd(&mut self) {
        self.terminate_miniupnpd();
        for chain in ["miniupnpd", "prerouting_miniupnpd", "postrouting_miniupnpd"] {
            let _ = self.gw.exec("nft", &["flush", "chain", "inet", "filter", chain]);
        }
        let _ = fs::remove_file(self.dir.join("miniupnpd.leases"));
    }

    /// Empties miniupnpd's chains while it keeps running, as a firewall reload on a router does: every
    /// mapping stops forwarding, miniupnpd is not told, and its epoch goes on counting. IPv6 pinholes
    /// go too (miniupnpd then answers UpdatePinhole/DeletePinhole for their ids with 402).
    pub fn flush_gateway_rules(&self) -> Result<()> {
        for chain in ["miniupnpd", "prerouting_miniupnpd", "postrouting_miniupnpd"] {
            self.gw.exec("nft", &["flush", "chain", "inet", "filter", chain])?;
        }
        Ok(())
    }

    /// Drops the gateway's NAT-PMP/PCP announcements on their way out (multicast lost on Wi-Fi).
    pub fn drop_announcements(&self) -> Result<()> {
        let rules = self.dir.join("drop-announcements.nft");
        fs::write(
            &rules,
            "table ip drop_announcements {\n chain out {\n  type filter hook output priority 0; policy accept;\n  \
             ip daddr 224.0.0.1 udp dport 5350 drop\n }\n}\n",
        )?;
        self.gw.exec("nft", &["-f", rules.to_str().unwrap()])?;
        Ok(())
    }

    /// Makes the gateway silent to NAT-PMP/PCP requests, as a router is while it reboots: requests to
    /// port 5351 from the LAN are dropped on the way in, so no reply and no ICMP port unreachable comes
    /// back. The lab's own readiness probe (from the gateway itself, over lo) still gets through.
    pub fn silence_port_control(&self) -> Result<()> {
        let rules = self.dir.join("silence-port-control.nft");
        fs::write(
            &rules,
            "table ip silence_port_control {\n chain input {\n  type filter hook input priority -10; policy accept;\n  \
             iifname != \"lo\" udp dport 5351 drop\n }\n}\n",
        )?;
        self.gw.exec("nft", &["-f", rules.to_str().unwrap()])?;
        Ok(())
    }

    /// Ends [`Lab::silence_port_control`].
    pub fn unsilence_port_control(&self) -> Result<()> {
        self.gw.exec("nft", &["delete", "table", "ip", "silence_port_control"])?;
        Ok(())
    }

    /// Restarts miniupnpd keeping its state, like a gateway whose daemon was restarted: its rules stay
    /// in nftables and it reloads them from its lease file. The epoch starts again near 0 and, with
    /// NAT-PMP on, it multicasts one PCP ANNOUNCE; UPnP comes back on `config.http_port`. IPv6
    /// pinholes stay (miniupnpd neither removes them when it stops nor reloads them: it reads them back
    /// from nftables, still expiring on time), but its UniqueID counter starts again at 1, so a new
    /// pinhole may get the id of an old one. A restart that loses pinholes is [`Lab::stop_miniupnpd`]
    /// then [`Lab::start_miniupnpd`].
    pub fn restart_miniupnpd(&mut self) -> Result<()> {
        self.terminate_miniupnpd();
        self.start_miniupnpd()
    }

    /// Sends miniupnpd SIGUSR1, its "external address changed" signal: it multicasts one NAT-PMP
    /// external address announcement (to 224.0.0.1 ports 5350 and 5351, still carrying the old epoch)
    /// and one PCP ANNOUNCE (epoch 0), and restarts its epoch at 0 while keeping every mapping. Changing
    /// the WAN interface's addresses does nothing here: the lab fixes the external address with `ext_ip`.
    pub fn announce_address_change(&self) -> Result<()> {
        let child = self.miniupnpd.as_ref().ok_or_else(|| anyhow!("miniupnpd is not running"))?;
        // SAFETY: plain kill(2) on our child (`ip netns exec` runs miniupnpd in its own process).
        if unsafe { libc::kill(child.id() as i32, libc::SIGUSR1) } != 0 {
            bail!("signalling miniupnpd: {}", std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Ends miniupnpd with SIGTERM (SIGKILL after 5 s). miniupnpd 2.3.1 leaves its nftables rules and
    /// its lease file behind when it exits.
    fn terminate_miniupnpd(&mut self) {
        if let Some(mut child) = self.miniupnpd.take() {
            let _ = Command::new("kill").arg(child.id().to_string()).status();
            let pidfile = self.dir.join("miniupnpd.pid");
            if let Ok(pid) = fs::read_to_string(&pidfile) {
                let _ = Command::new("kill").arg(pid.trim()).status();
            }
            let deadline = Instant::now() + Duration::from_secs(5);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
            let _ = fs::remove_file(pidfile);
        }
    }

    pub fn rootdesc_url(&self) -> String {
        format!("http://{GW_LAN_IP}:{}/rootDesc.xml", self.config.http_port)
    }

    /// Runs `upnpc -u <root description> ARGS` from a LAN host (no SSDP wait).
    pub fn upnpc(&self, from: &Netns, args: &[&str]) -> Result<String> {
        let url = self.rootdesc_url();
        let mut all = vec!["-u", url.as_str()];
        all.extend_from_slice(args);
        from.exec("upnpc", &all)
    }

    /// The gateway's port mappings as it really forwards them, whatever protocol made them: the DNAT
    /// rules in its `prerouting_miniupnpd` chain (read with `nft -j`), in rule order. miniupnpd keeps a
    /// mapping's description as raw rule userdata, which `nft` does not show as a comment, so the
    /// description comes from its lease file ("natbinder@...", "NAT-PMP 8080 tcp", "PCP MAP <nonce>"),
    /// or is empty. Without miniupnpd (a fake gateway) the chain is empty and so is the list.
    pub fn gateway_mappings(&self) -> Result<Vec<GatewayMapping>> {
        let rules = self
            .gw
            .exec("nft", &["-j", "list", "chain", "inet", "filter", "prerouting_miniupnpd"])
            .context("listing the gateway's forwarding rules")?;
        let leases = fs::read_to_string(self.dir.join("miniupnpd.leases")).unwrap_or_default();
        parse_nft_mappings(&rules, &leases)
    }

    /// Another LAN host (lan2) maps a port to itself, as a BitTorrent client there would: with upnpc
    /// (permanent) when the lab's gateway speaks UPnP, otherwise with natpmpc (NAT-PMP, 3600 s). Fails
    /// unless the gateway granted exactly that external port (a NAT-PMP gateway that gave another one
    /// is asked to delete it again).
    pub fn lan2_maps(&self, protocol: &str, port: u16) -> Result<()> {
        let p = port.to_string();
        if self.config.upnp {
            let out =
                self.upnpc(&self.lan2, &["-e", "other-host", "-a", &LAN2_IP.to_string(), &p, &p, protocol, "0"])?;
            if !out.contains("is redirected to internal") {
                bail!("upnpc could not map {protocol}/{port} for lan2: {out}");
            }
            return Ok(());
        }
        let protocol = protocol.to_ascii_lowercase();
        let gateway = GW_LAN_IP.to_string();
        let out = fake_pmp::run_natpmpc(&self.lan2, &["-g", &gateway, "-a", &p, &p, &protocol, LAN2_NATPMP_LIFETIME])?;
        // "Mapped public port 6881 protocol UDP to local port 6881 liftime 3600" (sic)
        let granted =
            out.lines().find_map(|l| l.strip_prefix("Mapped public port ")?.split(' ').next()?.parse::<u16>().ok());
        match granted {
            Some(granted) if granted == port => Ok(()),
            Some(granted) => {
                // Not what the test asked for: give it back so that it does not linger in the table.
                let _ = fake_pmp::run_natpmpc(
                    &self.lan2,
                    &["-g", &gateway, "-a", &granted.to_string(), &p, &protocol, "0"],
                );
                bail!("the gateway gave lan2 external port {granted} instead of {protocol}/{port}: {out}")
            }
            None => bail!("natpmpc could not map {protocol}/{port} for lan2: {out}"),
        }
    }

    /// Sends one UDP datagram from a program on `from` (its own address; `source_port` 0 for any) to
    /// `to`, which may be 224.0.0.1: a hostile LAN host forging NAT-PMP/PCP replies or announcements.
    /// The socket uses SO_REUSEADDR/SO_REUSEPORT, so it can send from a port a listener there holds.
    pub fn send_from(&self, from: &Netns, source_port: u16, to: SocketAddrV4, payload: &[u8]) -> Result<()> {
        let payload = payload.to_vec();
        from.run(move || {
            let socket = reusable_udp_socket(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, source_port))?;
            let sent = socket.send_to(&payload, to).with_context(|| format!("sending to {to}"))?;
            if sent != payload.len() {
                bail!("sent {sent} of {} bytes to {to}", payload.len());
            }
            Ok(())
        })
    }

    /// A command that runs in `ns` and, if `in_cgroup`, in the lab's cgroup (watched by natbinder).
    pub fn command(&self, ns: &Netns, in_cgroup: bool, program: impl AsRef<std::ffi::OsStr>) -> Result<Command> {
        command_in(ns, in_cgroup.then_some(&self.cgroup), program)
    }

    /// Spawns `cmd` and keeps it for clean-up; returns its pid.
    pub fn spawn(&mut self, mut cmd: Command) -> Result<u32> {
        let child = cmd.spawn().with_context(|| format!("spawning {cmd:?}"))?;
        let pid = child.id();
        self.children.push(child);
        Ok(pid)
    }

    /// Takes a spawned child back (to wait for it or read its output).
    pub fn take_child(&mut self, pid: u32) -> Option<Child> {
        let i = self.children.iter().position(|c| c.id() == pid)?;
        Some(self.children.swap_remove(i))
    }

    /// Kills every process in `ns` (SIGKILL): programs a test started that outlived their parent.
    pub fn kill_processes_in(&self, ns: &Netns) {
        kill_netns_processes(&ns.name);
    }

    pub fn kill(&mut self, pid: u32, signal: i32) {
        // SAFETY: plain kill(2) on a child we spawned.
        unsafe { libc::kill(pid as i32, signal) };
        if let Some(mut child) = self.take_child(pid) {
            let _ = child.wait();
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.stop_miniupnpd();
        for ns in [&self.lan1, &self.lan2, &self.wan, &self.gw] {
            kill_netns_processes(&ns.name);
        }
        // The cgroup (a field) is emptied and removed when it drops, after the namespaces go.
        for ns in [&self.lan1, &self.lan2, &self.wan, &self.gw] {
            let _ = Command::new("ip").args(["netns", "delete", &ns.name]).stderr(Stdio::null()).status();
        }
        if std::env::var_os("NATBINDER_LAB_KEEP_FILES").is_none() {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// Reads the mappings out of `nft -j list chain inet filter prerouting_miniupnpd`: each rule that
/// matches a protocol and a destination port and DNATs to an address (and port) is one mapping, as
/// miniupnpd writes them (`iif "wan0" @nh,72,8 0x6 th dport 8080 dnat ip to 192.168.77.10:8080`).
/// Descriptions come from miniupnpd's lease file (see [`parse_lease_file`]).
pub fn parse_nft_mappings(nft_json: &str, lease_file: &str) -> Result<Vec<GatewayMapping>> {
    let document: serde_json::Value = serde_json::from_str(nft_json).context("`nft -j` did not print JSON")?;
    let items = document["nftables"].as_array().ok_or_else(|| anyhow!("`nft -j` printed no \"nftables\" list"))?;
    let leases = parse_lease_file(lease_file);
    let mut mappings = Vec::new();
    for rule in items.iter().filter_map(|item| item.get("rule")) {
        let Some(expressions) = rule["expr"].as_array() else { continue };
        let (mut protocol, mut external_port, mut target) = (None, None, None);
        for expression in expressions {
            if let Some(dnat) = expression.get("dnat") {
                let address = dnat["addr"].as_str().and_then(|a| a.parse::<Ipv4Addr>().ok());
                let port = dnat["port"].as_u64().and_then(|p| u16::try_from(p).ok());
                target = address.map(|a| (a, port));
            }
            let Some(matched) = expression.get("match") else { continue };
            if matched["op"] != "==" {
                continue;
            }
            let (left, right) = (&matched["left"], &matched["right"]);
            if let Some(payload) = left.get("payload") {
                let ipv4_protocol_byte = payload["base"] == "nh" && payload["offset"] == 72 && payload["len"] == 8;
                if ipv4_protocol_byte || (payload["protocol"] == "ip" && payload["field"] == "protocol") {
                    protocol = protocol_name(right);
                } else if payload["field"] == "dport" {
                    external_port = right.as_u64().and_then(|p| u16::try_from(p).ok());
                    protocol = protocol.or_else(|| protocol_name(&payload["protocol"]));
                }
            } else if left["meta"]["key"] == "l4proto" {
                protocol = protocol_name(right);
            }
        }
        let (Some(protocol), Some(external_port), Some((internal_client, internal_port))) =
            (protocol, external_port, target)
        else {
            continue;
        };
        let internal_port = internal_port.unwrap_or(external_port);
        let description = leases
            .iter()
            .find(|l| {
                (l.protocol.as_str(), l.external_port, l.internal_client, l.internal_port)
                    == (protocol, external_port, internal_client, internal_port)
            })
            .map(|l| l.description.clone())
            .unwrap_or_default();
        mappings.push(GatewayMapping {
            protocol: protocol.to_string(),
            external_port,
            internal_client,
            internal_port,
            description,
        });
    }
    Ok(mappings)
}

/// "TCP"/"UDP" from an nft JSON value: an IP protocol number (6, 17) or a name ("tcp", "udp").
fn protocol_name(value: &serde_json::Value) -> Option<&'static str> {
    match (value.as_u64(), value.as_str()) {
        (Some(6), _) | (_, Some("tcp")) => Some("TCP"),
        (Some(17), _) | (_, Some("udp")) => Some("UDP"),
        _ => None,
    }
}

/// Parses miniupnpd's lease file: `PROTO:EXTPORT:CLIENT:INTPORT:EXPIRY:DESCRIPTION` lines (EXPIRY in
/// seconds since 1970; older versions wrote none). The description is the rest of the line and may
/// itself hold colons. Lines that do not parse are skipped.
pub fn parse_lease_file(text: &str) -> Vec<GatewayMapping> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.splitn(6, ':').collect();
            let description = match fields.get(4..) {
                Some([expiry, description]) if expiry.parse::<u64>().is_ok() => description.to_string(),
                _ => line.splitn(5, ':').nth(4)?.to_string(),
            };
            let protocol = match fields[0] {
                "TCP" | "UDP" => fields[0].to_string(),
                _ => return None,
            };
            Some(GatewayMapping {
                protocol,
                external_port: fields.get(1)?.parse().ok()?,
                internal_client: fields.get(2)?.parse().ok()?,
                internal_port: fields.get(3)?.parse().ok()?,
                description,
            })
        })
        .collect()
}

/// Parses `upnpc -l` lines such as ` 0 TCP 10001->192.168.77.20:10001 'other-host' '' 0`.
pub fn parse_upnpc_list(out: &str) -> Vec<GatewayMapping> {
    out.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            words.next()?.parse::<u32>().ok()?;
            let protocol = words.next()?.to_string();
            if protocol != "TCP" && protocol != "UDP" {
                return None;
            }
            let (ext, int) = words.next()?.split_once("->")?;
            let (client, int_port) = int.split_once(':')?;
            let description = line.split('\'').nth(1).unwrap_or("").to_string();
            Some(GatewayMapping {
                protocol,
                external_port: ext.parse().ok()?,
                internal_client: client.parse().ok()?,
                internal_port: int_port.parse().ok()?,
                description,
            })
        })
        .collect()
}

/// A UDP socket bound to `address` in the calling thread's namespace, with SO_REUSEADDR and SO_REUSEPORT
/// set before bind (std cannot), so that several sockets may share a port such as 5350.
fn reusable_udp_socket(address: SocketAddrV4) -> Result<UdpSocket> {
    // SAFETY: socket(2) returns a new descriptor that nothing else owns; UdpSocket takes it over (and
    // closes it on every error path below).
    let socket = unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            bail!("creating a UDP socket: {}", std::io::Error::last_os_error());
        }
        UdpSocket::from_raw_fd(fd)
    };
    for option in [libc::SO_REUSEADDR, libc::SO_REUSEPORT] {
        set_int_option(&socket, libc::SOL_SOCKET, option, 1).context("setting SO_REUSEADDR/SO_REUSEPORT")?;
    }
    let sockaddr = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: address.port().to_be(),
        sin_addr: libc::in_addr { s_addr: u32::from(*address.ip()).to_be() },
        sin_zero: [0; 8],
    };
    // SAFETY: bind reads exactly size_of::<sockaddr_in>() bytes of a value that lives across the call.
    let rc = unsafe {
        libc::bind(
            socket.as_raw_fd(),
            (&sockaddr as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        bail!("binding a UDP socket to {address}: {}", std::io::Error::last_os_error());
    }
    Ok(socket)
}

fn set_int_option(socket: &UdpSocket, level: i32, option: i32, value: i32) -> std::io::Result<()> {
    // SAFETY: setsockopt reads exactly size_of::<i32>() bytes from a value that lives across the call.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            option,
            (&value as *const i32).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// IP_MULTICAST_IF, which std does not offer: multicast leaves through the interface with this address
/// (the lab's gateway has no default route, so without it a send to 224.0.0.1 fails).
pub(crate) fn set_multicast_interface(socket: &UdpSocket, interface_address: Ipv4Addr) -> std::io::Result<()> {
    let value = libc::in_addr { s_addr: u32::from(interface_address).to_be() };
    // SAFETY: setsockopt reads exactly size_of::<in_addr>() bytes from a value that lives across the call.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_MULTICAST_IF,
            (&value as *const libc::in_addr).cast(),
            std::mem::size_of::<libc::in_addr>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// A socket in `ns` that hears what a NAT-PMP/PCP client there hears on port 5350: the gateway's
/// multicast announcements to 224.0.0.1:5350 (joined on the interface with `interface_address`, e.g.
/// [`LAN1_IP`]) and unicast datagrams to port 5350. SO_REUSEADDR/SO_REUSEPORT let a daemon there listen
/// too. Blocking; set a read timeout before reading.
pub fn announcement_listener(ns: &Netns, interface_address: Ipv4Addr) -> Result<UdpSocket> {
    ns.run(move || {
        let socket = reusable_udp_socket(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, ANNOUNCE_PORT))?;
        socket
            .join_multicast_v4(&ALL_HOSTS_GROUP, &interface_address)
            .with_context(|| format!("joining {ALL_HOSTS_GROUP} on {interface_address}"))?;
        Ok(socket)
    })
}

/// Asks the gateway for its external address over NAT-PMP (opcode 0) from the calling thread's
/// namespace; None without a well-formed successful answer within `wait`.
fn natpmp_external_address(wait: Duration) -> Option<Ipv4Addr> {
    let socket = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).ok()?;
    socket.connect((GW_LAN_IP, NATPMP_PORT)).ok()?;
    socket.set_read_timeout(Some(wait)).ok()?;
    socket.send(&[0, 0]).ok()?;
    let mut answer = [0u8; 16];
    let n = socket.recv(&mut answer).ok()?;
    (n == 12 && answer[..4] == [0, 128, 0, 0]).then(|| Ipv4Addr::new(answer[8], answer[9], answer[10], answer[11]))
}

/// Result of a connection attempt from the WAN peer.
#[derive(Debug, PartialEq, Eq)]
pub enum Reach {
    /// Connected and the LAN program answered with this text.
    Answered(String),
    Refused,
    TimedOut,
}

impl Reach {
    /// What the LAN program answered, if it was reached.
    pub fn answered(self) -> Option<String> {
        match self {
            Reach::Answered(s) => Some(s),
            _ => None,
        }
    }
}

/// From the WAN peer: opens a TCP connection to the gateway's WAN address and port, sends `probe` and
/// reads the answer (the lab's test programs echo).
pub fn tcp_from_wan(lab: &Lab, port: u16, probe: &str) -> Reach {
    let probe = probe.to_string();
    lab.wan.run(move || tcp_probe(SocketAddr::from((GW_WAN_IP, port)), &probe))
}

/// From the WAN peer: sends a UDP datagram to the gateway's WAN address and port from a fresh source
/// port (a new conntrack flow each time), and waits for the echo.
pub fn udp_from_wan(lab: &Lab, port: u16, probe: &str) -> Reach {
    let probe = probe.to_string();
    lab.wan.run(move || udp_probe(SocketAddr::from((GW_WAN_IP, port)), &probe))
}

/// Connects to `addr` from the calling thread's namespace, sends `probe` and reads the answer.
fn tcp_probe(addr: SocketAddr, probe: &str) -> Reach {
    let mut s = match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return Reach::Refused,
        Err(_) => return Reach::TimedOut,
    };
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    if s.write_all(probe.as_bytes()).is_err() {
        return Reach::Refused;
    }
    let mut buf = [0u8; 512];
    match s.read(&mut buf) {
        Ok(n) if n > 0 => Reach::Answered(String::from_utf8_lossy(&buf[..n]).into_owned()),
        Ok(_) => Reach::Refused,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Reach::Refused,
        Err(_) => Reach::TimedOut,
    }
}

/// Sends `probe` to `addr` from a fresh UDP socket in the calling thread's namespace and waits for the
/// echo.
fn udp_probe(addr: SocketAddr, probe: &str) -> Reach {
    let any: SocketAddr = if addr.is_ipv6() { "[::]:0".parse().unwrap() } else { "0.0.0.0:0".parse().unwrap() };
    let s = std::net::UdpSocket::bind(any).unwrap();
    s.connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(700))).unwrap();
    let mut buf = [0u8; 512];
    let _ = s.send(probe.as_bytes());
    match s.recv(&mut buf) {
        Ok(n) => Reach::Answered(String::from_utf8_lossy(&buf[..n]).into_owned()),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Reach::Refused,
        Err(_) => Reach::TimedOut,
    }
}

/// Polls `f` until it returns Some or `limit` passes (a generous safety net, not a timing assertion).
pub fn wait_for<T>(limit: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_upnpc_listing() {
        let out = "i protocol exPort->inAddr:inPort description remoteHost leaseTime\n \
                    0 TCP 10001->192.168.77.20:10001 'other-host' '' 0\n \
                    1 UDP  8080->192.168.77.10:8080  'natbinder@host python3' '' 3599\n\
                   GetGenericPortMappingEntry() returned 713 (SpecifiedArrayIndexInvalid)\n";
        let m = parse_upnpc_list(out);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].external_port, 10001);
        assert_eq!(m[0].internal_client, LAN2_IP);
        assert_eq!(m[1].protocol, "UDP");
        assert_eq!(m[1].description, "natbinder@host python3");
    }

    /// `nft -j list chain inet filter prerouting_miniupnpd` as nftables 1.0.6 printed it for miniupnpd
    /// 2.3.1's rules (trimmed to two rules), plus a rule of another shape that must be skipped.
    const NFT_JSON: &str = r#"{"nftables": [{"metainfo": {"version": "1.0.6", "json_schema_version": 1}},
        {"chain": {"family": "inet", "table": "filter", "name": "prerouting_miniupnpd", "handle": 4}},
        {"rule": {"family": "inet", "table": "filter", "chain": "prerouting_miniupnpd", "handle": 13, "expr": [
            {"match": {"op": "==", "left": {"meta": {"key": "iif"}}, "right": "wan0"}},
            {"match": {"op": "==", "left": {"payload": {"base": "nh", "offset": 72, "len": 8}}, "right": 6}},
            {"match": {"op": "==", "left": {"payload": {"protocol": "th", "field": "dport"}}, "right": 7001}},
            {"dnat": {"family": "ip", "addr": "192.168.77.10", "port": 7001}}]}},
        {"rule": {"family": "inet", "table": "filter", "chain": "prerouting_miniupnpd", "handle": 17, "expr": [
            {"match": {"op": "==", "left": {"meta": {"key": "iif"}}, "right": "wan0"}},
            {"match": {"op": "==", "left": {"payload": {"base": "nh", "offset": 72, "len": 8}}, "right": 17}},
            {"match": {"op": "==", "left": {"payload": {"protocol": "th", "field": "dport"}}, "right": 7201}},
            {"dnat": {"family": "ip", "addr": "192.168.77.20", "port": 7200}}]}},
        {"rule": {"family": "inet", "table": "filter", "chain": "prerouting_miniupnpd", "handle": 20, "expr": [
            {"match": {"op": "==", "left": {"meta": {"key": "iif"}}, "right": "wan0"}}, {"accept": null}]}}]}"#;

    #[test]
    fn reads_mappings_from_nft_json_with_descriptions_from_the_lease_file() {
        let leases = "TCP:7001:192.168.77.10:7001:1795512774:PCP MAP 04030201080706050c0b0a09\n\
                      UDP:7201:192.168.77.20:7200:0:natbinder@lab: a description: with colons\n\
                      UDP:9999:192.168.77.20:9999:0:a lease without a rule\n";
        let m = parse_nft_mappings(NFT_JSON, leases).unwrap();
        assert_eq!(
            m,
            [
                GatewayMapping {
                    protocol: "TCP".into(),
                    external_port: 7001,
                    internal_client: LAN1_IP,
                    internal_port: 7001,
                    description: "PCP MAP 04030201080706050c0b0a09".into(),
                },
                GatewayMapping {
                    protocol: "UDP".into(),
                    external_port: 7201,
                    internal_client: LAN2_IP,
                    internal_port: 7200,
                    description: "natbinder@lab: a description: with colons".into(),
                },
            ]
        );
        // No lease file (or no line for a rule): the mapping is still there, without a description.
        let m = parse_nft_mappings(NFT_JSON, "").unwrap();
        assert_eq!(m.len(), 2);
        assert!(m.iter().all(|m| m.description.is_empty()));
        assert!(parse_nft_mappings("not json", "").is_err());
    }

    #[test]
    fn parses_lease_lines_with_and_without_expiry() {
        let m = parse_lease_file(
            "TCP:8080:192.168.77.10:8081:1795512774:NAT-PMP 8080 tcp\nUDP:53:192.168.77.20:53:old\nbogus\n",
        );
        assert_eq!(m.len(), 2);
        assert_eq!(
            (m[0].external_port, m[0].internal_port, m[0].description.as_str()),
            (8080, 8081, "NAT-PMP 8080 tcp")
        );
        assert_eq!((m[1].protocol.as_str(), m[1].description.as_str()), ("UDP", "old"));
    }
}
