//! The lab demo: natbinder's main job, end to end, narrated.
use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    process::{Child, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use natbinder_lab::*;

use crate::workspace_root;

const HTTP_PORT: u16 = 8080;
const UDP_PORT: u16 = 27015;

fn step(text: &str) {
    println!("\n\x1b[1;32m==>\x1b[0m \x1b[1m{text}\x1b[0m");
}

fn say(text: &str) {
    println!("    {text}");
}

/// A child whose output is echoed with a prefix, and kept for searching.
struct Narrated {
    child: Child,
    output: Arc<Mutex<String>>,
}

impl Narrated {
    fn spawn(mut cmd: std::process::Command, prefix: &'static str) -> Result<Self> {
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().with_context(|| format!("starting {prefix}"))?;
        let output = Arc::new(Mutex::new(String::new()));
        for stream in
            [Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>, Box::new(child.stderr.take().unwrap())]
        {
            let output = output.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    println!("    \x1b[2m{prefix} |\x1b[0m {line}");
                    output.lock().unwrap().push_str(&line);
                    output.lock().unwrap().push('\n');
                }
            });
        }
        Ok(Self { child, output })
    }

    fn wait_for_output(&mut self, needle: &str, limit: Duration) -> Result<()> {
        let start = Instant::now();
        while !self.output.lock().unwrap().contains(needle) {
            if let Some(status) = self.child.try_wait()? {
                bail!("process exited ({status}) before printing {needle:?}");
            }
            if start.elapsed() > limit {
                bail!("no {needle:?} within {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }
}

impl Drop for Narrated {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn http_get_from_wan(lab: &Lab) -> Option<String> {
    lab.wan.run(|| {
        let mut s =
            TcpStream::connect_timeout(&SocketAddr::from((GW_WAN_IP, HTTP_PORT)), Duration::from_secs(1)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        s.write_all(format!("GET / HTTP/1.0\r\nHost: {GW_WAN_IP}\r\n\r\n").as_bytes()).ok()?;
        let mut response = String::new();
        let _ = s.read_to_string(&mut response);
        response.lines().next().map(str::to_string).filter(|l| l.starts_with("HTTP/"))
    })
}

fn show_gateway_table(lab: &Lab) -> Result<()> {
    let mappings = lab.gateway_mappings()?;
    if mappings.is_empty() {
        say("gateway's port mappings (its nftables rules): none");
    }
    for m in mappings {
        say(&format!(
            "gateway maps {} {} -> {}:{}  '{}'",
            m.protocol, m.external_port, m.internal_client, m.internal_port, m.description
        ));
    }
    Ok(())
}

/// A port search, as BitTorrent clients do: the first port of FROM..=TO that binds.
const PORT_SEARCH: &str = "\
import socket, sys, time
for port in range(int(sys.argv[1]), int(sys.argv[2]) + 1):
    s = socket.socket()
    started = time.monotonic()
    try:
        s.bind(('0.0.0.0', port))
    except OSError as e:
        print(f'bind 0.0.0.0:{port}: {e}', flush=True)
        continue
    s.listen()
    print(f'listening on 0.0.0.0:{port} (bind() took {(time.monotonic() - started) * 1000:.0f} ms)', flush=True)
    while True:
        conn, peer = s.accept()
        conn.sendall(b'hello from the port search\\n')
        conn.close()
";

/// `natbinder run --wait`: a program natbinder does not watch, searching a port range, skips the port
/// another LAN host holds because its bind() fails with EADDRINUSE, as in the paper.
fn run_wait(lab: &Lab, natbinder: &std::path::Path) -> Result<()> {
    step("Another LAN host (lan2) maps TCP 6881 to itself with upnpc, after natbinder started");
    lab.lan2_maps("TCP", 6881)?;
    show_gateway_table(lab)?;
    step(
        "A port-searching program (6881-6889) on lan1, outside the watched cgroup, started with \
         `natbinder run --wait`: each bind() returns once the gateway has answered",
    );
    let script = lab.dir.join("port-search.py");
    std::fs::write(&script, PORT_SEARCH)?;
    say("$ natbinder run --wait --verbose -- python3 port-search.py 6881 6889");
    let mut cmd = lab.command(&lab.lan1, false, natbinder)?;
    cmd.args(["run", "--wait", "--verbose", "--socket"])
        .arg(lab.dir.join("io.natbinder"))
        .args(["--", "python3"])
        .arg(&script)
        .args(["6881", "6889"]);
    let mut search = Narrated::spawn(cmd, "port search")?;
    search.wait_for_output("listening on", Duration::from_secs(10))?;
    let answer = wait_for(Duration::from_secs(10), || match tcp_from_wan(lab, 6882, "") {
        Reach::Answered(text) => Some(text),
        _ => None,
    })
    .context("the port search's listener never became reachable from the WAN on 6882")?;
    say(&format!("the WAN peer connects to {GW_WAN_IP}:6882 and reads: {:?}", answer.trim()));
    show_gateway_table(lab)?;
    let out =
        std::process::Command::new(natbinder).args(["list", "--socket"]).arg(lab.dir.join("io.natbinder")).output()?;
    say("$ natbinder list");
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        say(&format!("  {line}"));
    }
    search.child.kill()?;
    search.child.wait()?;
    Ok(())
}

pub fn run() -> Result<()> {
    let natbinder = workspace_root().join("target/release/natbinder");
    if !natbinder.exists() {
        bail!("{} is missing: run `cargo xtask demo` (it builds it)", natbinder.display());
    }
    step("Building the lab: two LAN hosts, a NAT gateway running miniupnpd, and a WAN peer (network namespaces)");
    let lab = Lab::start(LabConfig::default())?;
    say(&format!("lan1 {LAN1_IP}, lan2 {LAN2_IP}  --  gateway {GW_LAN_IP} | {GW_WAN_IP}  --  WAN peer {WAN_PEER_IP}"));
    say("The WAN peer has no route into the LAN: it can reach a LAN program only through a port mapping.");

    step("Starting the natbinder daemon on lan1, watching the lab's cgroup");
    let mut cmd = lab.command(&lab.lan1, false, &natbinder)?;
    cmd.args(["daemon", "--cgroup"])
        .arg(&lab.cgroup.path)
        .arg("--state-dir")
        .arg(lab.dir.join("state"))
        .arg("--control-socket")
        .arg(lab.dir.join("io.natbinder"))
        .env("NO_COLOR", "1");
    let mut daemon = Narrated::spawn(cmd, "natbinder")?;
    daemon.wait_for_output("ready:", Duration::from_secs(30))?;

    step(&format!("Before: the WAN peer tries {GW_WAN_IP}:{HTTP_PORT}"));
    match tcp_from_wan(&lab, HTTP_PORT, "") {
        Reach::Refused => say("connection refused: nothing is forwarded"),
        other => say(&format!("{other:?}")),
    }

    step(&format!(
        "Starting unmodified servers on lan1: `python3 -m http.server {HTTP_PORT}` and a Python UDP echo on {UDP_PORT}"
    ));
    let started = Instant::now();
    let mut http = lab.command(&lab.lan1, true, "python3")?;
    http.args(["-u", "-m", "http.server", &HTTP_PORT.to_string(), "--bind", "0.0.0.0"]).current_dir(&lab.dir);
    let mut http = Narrated::spawn(http, "http.server")?;
    let mut udp = lab.command(&lab.lan1, true, "python3")?;
    udp.args([
        "-u",
        "-c",
        &format!(
            "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\ns.bind(('0.0.0.0', {UDP_PORT}))\n\
             print('UDP echo listening on 0.0.0.0:{UDP_PORT}')\nwhile True:\n    data, peer = s.recvfrom(2048)\n    \
             s.sendto(b'echo: ' + data, peer)\n"
        ),
    ]);
    let mut udp = Narrated::spawn(udp, "udp echo")?;

    step(&format!("The WAN peer fetches http://{GW_WAN_IP}:{HTTP_PORT}/ (the gateway's WAN address)"));
    let line = wait_for(Duration::from_secs(10), || http_get_from_wan(&lab))
        .context("the HTTP server never became reachable from the WAN")?;
    say(&format!("answer: {line}   ({} ms after the server started)", started.elapsed().as_millis()));
    let echo = wait_for(Duration::from_secs(10), || match udp_from_wan(&lab, UDP_PORT, "hello from the WAN") {
        Reach::Answered(text) => Some(text),
        _ => None,
    })
    .context("the UDP echo never became reachable from the WAN")?;
    say(&format!("UDP answer: {echo:?}"));
    show_gateway_table(&lab)?;

    step("A `python3 -m http.server` on its default port 8000 stays local: that port is on the deny list");
    let mut files = lab.command(&lab.lan1, true, "python3")?;
    files.args(["-u", "-m", "http.server", "8000", "--bind", "0.0.0.0"]).current_dir(&lab.dir);
    let mut files = Narrated::spawn(files, "http.server 8000")?;
    std::thread::sleep(Duration::from_millis(500));
    match tcp_from_wan(&lab, 8000, "") {
        Reach::Refused => say("the WAN peer's connection to port 8000 is refused: nothing forwards it"),
        other => bail!("port 8000 was forwarded: the WAN peer got {other:?}"),
    }
    step("What natbinder says about it: `natbinder status` and `natbinder list` (anyone may run them)");
    let socket = lab.dir.join("io.natbinder");
    for command in ["status", "list"] {
        let out = std::process::Command::new(&natbinder).args([command, "--socket"]).arg(&socket).output()?;
        if !out.status.success() {
            bail!("natbinder {command} failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        say(&format!("$ natbinder {command}"));
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            say(&format!("  {line}"));
        }
    }
    files.child.kill()?;
    files.child.wait()?;

    step("The HTTP server crashes (SIGKILL) and the UDP echo is stopped (SIGTERM)");
    let killed = Instant::now();
    http.child.kill()?;
    http.child.wait()?;
    // SAFETY: plain kill(2) on our child.
    unsafe { libc::kill(udp.child.id() as i32, libc::SIGTERM) };
    let _ = udp.child.wait();
    wait_for(Duration::from_secs(10), || {
        let m = lab.gateway_mappings().ok()?;
        m.iter().all(|m| m.internal_client != LAN1_IP).then_some(())
    })
    .context("the mappings were not removed after the servers exited")?;
    say(&format!("the gateway dropped both forwardings {} ms after the crash", killed.elapsed().as_millis()));
    show_gateway_table(&lab)?;
    match tcp_from_wan(&lab, HTTP_PORT, "") {
        Reach::Refused => say(&format!("the WAN peer's connection to {GW_WAN_IP}:{HTTP_PORT} is refused again")),
        other => bail!("after the crash the WAN peer still got {other:?}"),
    }

    run_wait(&lab, &natbinder)?;

    step("Stopping natbinder (SIGTERM): it removes whatever it still holds and detaches from the kernel");
    // SAFETY: plain kill(2) on our child.
    unsafe { libc::kill(daemon.child.id() as i32, libc::SIGTERM) };
    let status = daemon.child.wait()?;
    std::thread::sleep(Duration::from_millis(50));
    say(&format!("natbinder exited: {status}"));
    step("Tearing the lab down. Done.");
    drop(lab);
    Ok(())
}
