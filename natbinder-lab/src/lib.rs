//! A NAT lab in network namespaces, shared by natbinder's tests and its demo.
//!
//! ```text
//!   lan1 (192.168.77.10) ─┐                         ┌─ wan peer (172.31.77.100)
//!                         ├─ br0 ─ gw ─ wan0 ───────┘
//!   lan2 (192.168.77.20) ─┘   192.168.77.1   172.31.77.1
//! ```
//! The gateway forwards, masquerades LAN->WAN with nftables and runs the distribution's miniupnpd
//! (UPnP IGD, optionally NAT-PMP/PCP) on br0. The WAN peer has no route to the LAN: it reaches a LAN
//! program only through a port mapping on the gateway's WAN address, exactly as the internet would.
//!
//! Everything the lab creates (namespaces, a cgroup, processes, files) is removed when the [`Lab`] is
//! dropped, also when a test panics; labs left behind by a killed run are removed by the next one.
//! All traffic stays inside these namespaces.
use std::{
    fs::{self, File, OpenOptions},
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};

pub mod fake_igd;

pub const GW_LAN_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 1);
pub const LAN1_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 10);
pub const LAN2_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 20);
pub const GW_WAN_IP: Ipv4Addr = Ipv4Addr::new(172, 31, 77, 1);
pub const WAN_PEER_IP: Ipv4Addr = Ipv4Addr::new(172, 31, 77, 100);
/// miniupnpd refuses private WAN addresses; it is given this public-looking placeholder as its external
/// address instead. Its DNAT rules match the WAN interface, so peers use GW_WAN_IP. Nothing is ever sent
/// to the placeholder.
pub const EXTERNAL_IP_PLACEHOLDER: Ipv4Addr = Ipv4Addr::new(11, 77, 77, 77);

const NETNS_PREFIX: &str = "nbl-";
const CGROUP_PREFIX: &str = "natbinder-lab-";

static LAB_SEQ: AtomicU32 = AtomicU32::new(0);

#[derive(Clone, Debug)]
pub struct LabConfig {
    pub upnp: bool,
    pub natpmp: bool,
    /// miniupnpd's HTTP port; clients find it over SSDP, so tests may change it across restarts.
    pub http_port: u16,
    /// Whether [`Lab::start`] starts miniupnpd. Off for tests that put a [`fake_igd::FakeIgd`] on the
    /// gateway instead; the network and nftables are the same either way.
    pub miniupnpd: bool,
}

impl Default for LabConfig {
    fn default() -> Self {
        Self { upnp: true, natpmp: false, http_port: 5555, miniupnpd: true }
    }
}

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

/// A gateway mapping as an independent client (miniupnpc's `upnpc -l`) reports it.
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
        run_ip_batch(
            Some(gw),
            &format!(
                "link set lan1 master br0\nlink set lan2 master br0\n\
                 addr add {GW_LAN_IP}/24 dev br0\naddr add {GW_WAN_IP}/24 dev wan0\n\
                 link set lo up\nlink set br0 up\nlink set lan1 up\nlink set lan2 up\nlink set wan0 up\n"
            ),
        )?;
        for (ns, ip, route) in [(lan1, LAN1_IP, true), (lan2, LAN2_IP, true), (wan, WAN_PEER_IP, false)] {
            let mut cmds = format!("addr add {ip}/24 dev eth0\nlink set lo up\nlink set eth0 up\n");
            if route {
                cmds.push_str(&format!("route add default via {GW_LAN_IP}\n"));
            }
            run_ip_batch(Some(ns), &cmds)?;
        }
        self.gw.exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
        let rules = self.dir.join("gateway.nft");
        fs::write(
            &rules,
            r#"table inet filter {
    chain forward {
        type filter hook forward priority 0; policy drop;
        ct state established,related accept
        iifname "br0" oifname "wan0" accept
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
        oifname "wan0" masquerade
    }
    chain postrouting_miniupnpd {
    }
}
"#,
        )?;
        self.gw.exec("nft", &["-f", rules.to_str().unwrap()])?;
        Ok(())
    }

    /// `ipv6_disable=yes`: with IPv6 on, miniupnpd 2.3's nftables backend scans every rule for expired
    /// pinholes on each request, which made each SOAP call several milliseconds slower per mapping held.
    fn miniupnpd_config(&self) -> String {
        let yn = |b: bool| if b { "yes" } else { "no" };
        format!(
            "ext_ifname=wan0\next_ip={EXTERNAL_IP_PLACEHOLDER}\nlistening_ip=br0\nhttp_port={}\n\
             enable_upnp={}\nenable_natpmp={}\nsecure_mode=yes\nsystem_uptime=no\n\
             lease_file={}\nuuid=3d3cec3a-8cf0-11e0-98ee-001a6bd2d07b\nnotify_interval=60\n\
             clean_ruleset_interval=600\nipv6_disable=yes\n\
             allow 1024-65535 192.168.77.0/24 1024-65535\ndeny 0-65535 0.0.0.0/0 0-65535\n",
            self.config.http_port,
            yn(self.config.upnp),
            yn(self.config.natpmp),
            self.dir.join("miniupnpd.leases").display()
        )
    }

    /// Starts miniupnpd in the gateway and waits until its HTTP server answers. Also works in a lab
    /// started with `miniupnpd: false`: an explicit call means the test wants it now.
    pub fn start_miniupnpd(&mut self) -> Result<()> {
        let conf = self.dir.join("miniupnpd.conf");
        fs::write(&conf, self.miniupnpd_config())?;
        let log = File::create(self.dir.join("miniupnpd.log"))?;
        let child = Command::new("ip")
            .args(["netns", "exec", &self.gw.name, "miniupnpd", "-d", "-f"])
            .arg(&conf)
            .arg("-P")
            .arg(self.dir.join("miniupnpd.pid"))
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting miniupnpd")?;
        self.miniupnpd = Some(child);
        if !self.config.upnp {
            std::thread::sleep(Duration::from_millis(300));
            return Ok(());
        }
        let port = self.config.http_port;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let up = self.gw.run(move || {
                TcpStream::connect_timeout(&SocketAddr::from((GW_LAN_IP, port)), Duration::from_millis(200)).is_ok()
            });
            if up {
                return Ok(());
            }
            if let Some(status) = self.miniupnpd.as_mut().unwrap().try_wait()? {
                bail!("miniupnpd exited ({status}): {}", self.miniupnpd_log());
            }
            if Instant::now() > deadline {
                bail!("miniupnpd did not open its HTTP port within 10 s: {}", self.miniupnpd_log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn miniupnpd_log(&self) -> String {
        fs::read_to_string(self.dir.join("miniupnpd.log")).unwrap_or_default()
    }

    /// Stops miniupnpd and forgets its state, like a gateway that lost power. Without a running
    /// miniupnpd it only empties the chains, which is harmless.
    pub fn stop_miniupnpd(&mut self) {
        if let Some(mut child) = self.miniupnpd.take() {
            // miniupnpd removes its rules on SIGTERM; a reboot-like stop flushes anyway below.
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
        }
        for chain in ["miniupnpd", "prerouting_miniupnpd", "postrouting_miniupnpd"] {
            let _ = self.gw.exec("nft", &["flush", "chain", "inet", "filter", chain]);
        }
        let _ = fs::remove_file(self.dir.join("miniupnpd.leases"));
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

    /// The gateway's port mappings, read by miniupnpc from the second LAN host: an independent view.
    pub fn gateway_mappings(&self) -> Result<Vec<GatewayMapping>> {
        let out = self.upnpc(&self.lan2, &["-l"])?;
        Ok(parse_upnpc_list(&out))
    }

    /// Another LAN host (lan2) maps a port to itself, as a BitTorrent client there would.
    pub fn lan2_maps(&self, protocol: &str, port: u16) -> Result<()> {
        let p = port.to_string();
        let out = self.upnpc(&self.lan2, &["-e", "other-host", "-a", &LAN2_IP.to_string(), &p, &p, protocol, "0"])?;
        if !out.contains("is redirected to internal") {
            bail!("upnpc could not map {protocol}/{port} for lan2: {out}");
        }
        Ok(())
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

/// Result of a connection attempt from the WAN peer.
#[derive(Debug, PartialEq, Eq)]
pub enum Reach {
    /// Connected and the LAN program answered with this text.
    Answered(String),
    Refused,
    TimedOut,
}

/// From the WAN peer: opens a TCP connection to the gateway's WAN address and port, sends `probe` and
/// reads the answer (the lab's test programs echo).
pub fn tcp_from_wan(lab: &Lab, port: u16, probe: &str) -> Reach {
    let probe = probe.to_string();
    lab.wan.run(move || {
        let addr = SocketAddr::from((GW_WAN_IP, port));
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
    })
}

/// From the WAN peer: sends a UDP datagram to the gateway's WAN address and port from a fresh source
/// port (a new conntrack flow each time), and waits for the echo.
pub fn udp_from_wan(lab: &Lab, port: u16, probe: &str) -> Reach {
    let probe = probe.to_string();
    lab.wan.run(move || {
        let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        s.connect(SocketAddr::from((GW_WAN_IP, port))).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(700))).unwrap();
        let mut buf = [0u8; 512];
        let _ = s.send(probe.as_bytes());
        match s.recv(&mut buf) {
            Ok(n) => Reach::Answered(String::from_utf8_lossy(&buf[..n]).into_owned()),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Reach::Refused,
            Err(_) => Reach::TimedOut,
        }
    })
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
}
