//! An ordinary network program for the lab, with no knowledge of natbinder: it binds the way servers
//! do and echoes what it receives, prefixed with its name, so a WAN peer can tell who answered.
//!
//! natbinder-testapp tcp-echo ADDR [--close-on-stdin] [--v6only] [--reuseport]
//! natbinder-testapp udp-echo ADDR [--close-on-stdin]
//! natbinder-testapp first-free FROM TO      (rTorrent-style: listen on the first port that binds; after
//!                                            "bound PORT" prints "refused PORT ERRNO" for each port
//!                                            whose bind failed, then "searched")
//! natbinder-testapp threads N FROM          (N threads bind TCP 0.0.0.0:FROM.. at the same moment;
//!                                            prints "bound FROM" once all are bound, then
//!                                            "took MAX_NS", the longest bind(); echoes on each)
//! natbinder-testapp burst N FROM KEEP [--keep-last]
//!                                           (N UDP sockets on 0.0.0.0:FROM.., then closes all but the
//!                                            first KEEP, or the last; prints "bound FROM" then "kept KEEP")
//! natbinder-testapp bind-loop N [ADDR]      (benchmark: N x socket+bind(ADDR)+close, prints ns each)
//! natbinder-testapp connect-loop N          (benchmark: N x a UDP client's socket+connect+close to a
//!                                            socket of its own on 127.0.0.1, prints ns each)
//! natbinder-testapp bind-ports ROUNDS FROM COUNT
//!                                           (benchmark, a storm: each round binds UDP 0.0.0.0:FROM..
//!                                            +COUNT, all open at once, then closes them; prints ns per
//!                                            socket+bind+close)
//! natbinder-testapp hold N FROM            (a burst: listens on TCP 0.0.0.0:FROM..+N, prints "bound FROM";
//!                                            at a line on stdin closes them all and prints "closed")
//! natbinder-testapp churn FROM N            (a port search or restart loop: listens on TCP 0.0.0.0:FROM,
//!                                            and at each line on stdin closes it and at once listens
//!                                            on the next port; prints "bound PORT" each time)
//!
//! tcp-echo --timed prints "took NS" (how long bind() took) after "bound PORT".
//! --stamp (tcp-echo, churn, hold): after "bound PORT" and after "closed", prints "at NS",
//! CLOCK_MONOTONIC read as bind() or close() was called (hold: as the last bind() returned, as the
//! first close() was called), for benchmarks that time what follows from the other side: the
//! syscall, and whatever preempts the program in it, count.
//!
//! Once bound it prints "bound PORT" on stdout. --close-on-stdin closes the socket (but keeps running)
//! when a line arrives on stdin and then prints "closed".
use std::{
    io::{BufRead, Read, Write},
    net::{SocketAddr, TcpListener, UdpSocket},
    process::exit,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

/// Whether --stamp was given.
static STAMP: AtomicBool = AtomicBool::new(false);

/// CLOCK_MONOTONIC in ns, the clock the benchmark reads too.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid timespec to write into.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn announce(line: String) {
    let mut out = std::io::stdout();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn wait_for_stdin_line() {
    let mut line = String::new();
    let _ = std::io::stdin().lock().read_line(&mut line);
}

/// Announces "bound PORT" and then each of `more`, and echoes.
fn serve_tcp_after(listener: TcpListener, name: String, close_on_stdin: bool, more: &[String]) -> ! {
    announce(format!("bound {}", listener.local_addr().unwrap().port()));
    for line in more {
        announce(line.clone());
    }
    let open = Arc::new(AtomicBool::new(true));
    if close_on_stdin {
        listener.set_nonblocking(true).unwrap();
    }
    let flag = open.clone();
    if close_on_stdin {
        std::thread::spawn(move || {
            wait_for_stdin_line();
            flag.store(false, Ordering::SeqCst);
        });
    }
    while open.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((mut s, _)) => {
                let name = name.clone();
                std::thread::spawn(move || {
                    s.set_nonblocking(false).unwrap();
                    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                    let mut buf = [0u8; 512];
                    if let Ok(n) = s.read(&mut buf) {
                        let _ = s.write_all(format!("{name}:{}", String::from_utf8_lossy(&buf[..n])).as_bytes());
                    }
                });
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => {
                eprintln!("accept: {e}");
                exit(1);
            }
        }
    }
    let closed_at = monotonic_ns();
    drop(listener);
    announce("closed".into());
    if STAMP.load(Ordering::SeqCst) {
        announce(format!("at {closed_at}"));
    }
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Answers each TCP connection's first message with "NAME:message", for as long as the process lives.
fn serve_tcp_quietly(listener: TcpListener, name: String) -> ! {
    loop {
        if let Ok((mut s, _)) = listener.accept() {
            let name = name.clone();
            std::thread::spawn(move || {
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let mut buf = [0u8; 512];
                if let Ok(n) = s.read(&mut buf) {
                    let _ = s.write_all(format!("{name}:{}", String::from_utf8_lossy(&buf[..n])).as_bytes());
                }
            });
        }
    }
}

/// Answers every datagram with "NAME:payload", for as long as the process lives.
fn echo_udp_forever(socket: UdpSocket, name: String) {
    let mut buf = [0u8; 512];
    while let Ok((n, peer)) = socket.recv_from(&mut buf) {
        let _ = socket.send_to(format!("{name}:{}", String::from_utf8_lossy(&buf[..n])).as_bytes(), peer);
    }
}

fn serve_udp(socket: UdpSocket, name: String, close_on_stdin: bool) -> ! {
    announce(format!("bound {}", socket.local_addr().unwrap().port()));
    if close_on_stdin {
        socket.set_read_timeout(Some(Duration::from_millis(5))).unwrap();
    }
    let open = Arc::new(AtomicBool::new(true));
    if close_on_stdin {
        let flag = open.clone();
        std::thread::spawn(move || {
            wait_for_stdin_line();
            flag.store(false, Ordering::SeqCst);
        });
    }
    let mut buf = [0u8; 512];
    while open.load(Ordering::SeqCst) {
        match socket.recv_from(&mut buf) {
            Ok((n, peer)) => {
                let _ = socket.send_to(format!("{name}:{}", String::from_utf8_lossy(&buf[..n])).as_bytes(), peer);
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(e) => eprintln!("recv: {e}"),
        }
    }
    drop(socket);
    announce("closed".into());
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// A TCP listener with socket options std cannot set before bind: IPV6_V6ONLY and SO_REUSEPORT.
fn bind_with_options(addr: SocketAddr, v6only: bool, reuseport: bool) -> std::io::Result<TcpListener> {
    use std::os::fd::FromRawFd;
    // SAFETY: plain socket calls on a descriptor we own until TcpListener takes it.
    unsafe {
        let family = if addr.is_ipv6() { libc::AF_INET6 } else { libc::AF_INET };
        let fd = libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let listener = TcpListener::from_raw_fd(fd);
        let one: libc::c_int = 1;
        let size = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        let set = |level, name| {
            if libc::setsockopt(fd, level, name, (&one as *const libc::c_int).cast(), size) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        };
        if v6only {
            set(libc::IPPROTO_IPV6, libc::IPV6_V6ONLY)?;
        }
        if reuseport {
            set(libc::SOL_SOCKET, libc::SO_REUSEPORT)?;
        }
        let rc = match addr {
            SocketAddr::V6(v6) => {
                let mut sa: libc::sockaddr_in6 = std::mem::zeroed();
                sa.sin6_family = libc::AF_INET6 as libc::sa_family_t;
                sa.sin6_port = v6.port().to_be();
                sa.sin6_addr.s6_addr = v6.ip().octets();
                libc::bind(
                    fd,
                    (&sa as *const libc::sockaddr_in6).cast(),
                    std::mem::size_of::<libc::sockaddr_in6>() as u32,
                )
            }
            SocketAddr::V4(v4) => {
                let mut sa: libc::sockaddr_in = std::mem::zeroed();
                sa.sin_family = libc::AF_INET as libc::sa_family_t;
                sa.sin_port = v4.port().to_be();
                sa.sin_addr.s_addr = u32::from(*v4.ip()).to_be();
                libc::bind(
                    fd,
                    (&sa as *const libc::sockaddr_in).cast(),
                    std::mem::size_of::<libc::sockaddr_in>() as u32,
                )
            }
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if libc::listen(fd, 128) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(listener)
    }
}

fn usage() -> ! {
    eprintln!("usage: natbinder-testapp tcp-echo|udp-echo ADDR [--close-on-stdin] | first-free FROM TO");
    exit(2)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let name = std::env::var("TESTAPP_NAME").unwrap_or_else(|_| "testapp".into());
    let close = args.iter().any(|a| a == "--close-on-stdin");
    STAMP.store(args.iter().any(|a| a == "--stamp"), Ordering::SeqCst);
    match args.first().map(String::as_str) {
        Some("tcp-echo") => {
            let addr: SocketAddr = args.get(1).and_then(|a| a.parse().ok()).unwrap_or_else(|| usage());
            let v6only = args.iter().any(|a| a == "--v6only");
            let reuseport = args.iter().any(|a| a == "--reuseport");
            let bound_at = monotonic_ns();
            let started = std::time::Instant::now();
            let bound =
                if v6only || reuseport { bind_with_options(addr, v6only, reuseport) } else { TcpListener::bind(addr) };
            let took = started.elapsed();
            let mut timed = if args.iter().any(|a| a == "--timed") {
                vec![format!("took {}", took.as_nanos())]
            } else {
                Vec::new()
            };
            if STAMP.load(Ordering::SeqCst) {
                timed.push(format!("at {bound_at}"));
            }
            match bound {
                Ok(l) => serve_tcp_after(l, name, close, &timed),
                Err(e) => {
                    eprintln!("bind {addr}: {e}");
                    exit(1)
                }
            }
        }
        Some("udp-echo") => {
            let addr: SocketAddr = args.get(1).and_then(|a| a.parse().ok()).unwrap_or_else(|| usage());
            match UdpSocket::bind(addr) {
                Ok(s) => serve_udp(s, name, close),
                Err(e) => {
                    eprintln!("bind {addr}: {e}");
                    exit(1)
                }
            }
        }
        Some("first-free") => {
            let from: u16 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or_else(|| usage());
            let to: u16 = args.get(2).and_then(|a| a.parse().ok()).unwrap_or_else(|| usage());
            let mut last = None;
            let mut refused = Vec::new();
            for port in from..=to {
                match TcpListener::bind(("0.0.0.0", port)) {
                    Ok(l) => {
                        refused.push("searched".to_string());
                        serve_tcp_after(l, name, false, &refused)
                    }
                    Err(e) => {
                        refused.push(format!("refused {port} {}", e.raw_os_error().unwrap_or(0)));
                        last = Some(e)
                    }
                }
            }
            eprintln!("no free port in {from}-{to}: {}", last.map_or("empty range".into(), |e| e.to_string()));
            exit(1)
        }
        Some("threads") => {
            let n: u16 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or_else(|| usage());
            let from: u16 = args.get(2).and_then(|a| a.parse().ok()).unwrap_or_else(|| usage());
            let start = Arc::new(std::sync::Barrier::new(n as usize));
            let binders: Vec<_> = (0..n)
                .map(|i| {
                    let start = start.clone();
                    std::thread::spawn(move || {
                        start.wait();
                        let began = std::time::Instant::now();
                        let bound = TcpListener::bind(("0.0.0.0", from + i));
                        (bound, began.elapsed())
                    })
                })
                .collect();
            let mut longest = Duration::ZERO;
            let mut listeners = Vec::new();
            for (i, binder) in binders.into_iter().enumerate() {
                let (bound, took) = binder.join().unwrap();
                longest = longest.max(took);
                match bound {
                    Ok(l) => listeners.push(l),
                    Err(e) => {
                        eprintln!("bind 0.0.0.0:{}: {e}", from + i as u16);
                        exit(1)
                    }
                }
            }
            announce(format!("bound {from}"));
            announce(format!("took {}", longest.as_nanos()));
            let last = listeners.pop().unwrap_or_else(|| usage());
            for listener in listeners {
                let name = name.clone();
                std::thread::spawn(move || serve_tcp_quietly(listener, name));
            }
            serve_tcp_quietly(last, name)
        }
        Some("burst") => {
            let n: u16 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or_else(|| usage());
            let from: u16 = args.get(2).and_then(|a| a.parse().ok()).unwrap_or_else(|| usage());
            let keep: usize = args.get(3).and_then(|a| a.parse().ok()).unwrap_or_else(|| usage());
            let mut sockets = Vec::new();
            for port in from..from + n {
                match UdpSocket::bind(("0.0.0.0", port)) {
                    Ok(s) => sockets.push(s),
                    Err(e) => {
                        eprintln!("bind 0.0.0.0:{port}: {e}");
                        exit(1)
                    }
                }
            }
            announce(format!("bound {from}"));
            if args.iter().any(|a| a == "--keep-last") {
                sockets.drain(..sockets.len().saturating_sub(keep));
            } else {
                sockets.truncate(keep);
            }
            // The kept sockets answer like udp-echo, so a test can tell they are reachable.
            for socket in sockets {
                let name = name.clone();
                std::thread::spawn(move || echo_udp_forever(socket, name));
            }
            announce(format!("kept {keep}"));
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
        Some("hold") => {
            let n: u16 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or_else(|| usage());
            let from: u16 = args.get(2).and_then(|a| a.parse().ok()).unwrap_or_else(|| usage());
            let mut listeners = Vec::with_capacity(n as usize);
            for port in from..from.saturating_add(n) {
                match TcpListener::bind(("0.0.0.0", port)) {
                    Ok(l) => listeners.push(l),
                    Err(e) => {
                        eprintln!("bind 0.0.0.0:{port}: {e}");
                        exit(1)
                    }
                }
            }
            let bound_at = monotonic_ns();
            announce(format!("bound {from}"));
            if STAMP.load(Ordering::SeqCst) {
                announce(format!("at {bound_at}"));
            }
            wait_for_stdin_line();
            let closed_at = monotonic_ns();
            drop(listeners);
            announce("closed".into());
            if STAMP.load(Ordering::SeqCst) {
                announce(format!("at {closed_at}"));
            }
            wait_for_stdin_line();
            exit(0)
        }
        Some("churn") => {
            let from: u16 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or_else(|| usage());
            let n: u16 = args.get(2).and_then(|a| a.parse().ok()).unwrap_or_else(|| usage());
            let mut listener: Option<TcpListener> = None;
            for port in from..from.saturating_add(n) {
                // Closing one port and binding the next back to back, as a port search or a restart does.
                drop(listener.take());
                let bound_at = monotonic_ns();
                match TcpListener::bind(("0.0.0.0", port)) {
                    Ok(l) => listener = Some(l),
                    Err(e) => {
                        eprintln!("bind 0.0.0.0:{port}: {e}");
                        exit(1)
                    }
                }
                announce(format!("bound {port}"));
                if STAMP.load(Ordering::SeqCst) {
                    announce(format!("at {bound_at}"));
                }
                wait_for_stdin_line();
            }
            exit(0)
        }
        Some("bind-loop") => {
            let n: u32 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or_else(|| usage());
            let addr: SocketAddr =
                args.get(2).map_or("0.0.0.0:40000", String::as_str).parse().unwrap_or_else(|_| usage());
            let start = std::time::Instant::now();
            for _ in 0..n {
                match UdpSocket::bind(addr) {
                    Ok(s) => drop(s),
                    Err(e) => {
                        eprintln!("bind {addr}: {e}");
                        exit(1)
                    }
                }
            }
            announce(format!("{:.1}", start.elapsed().as_nanos() as f64 / n as f64));
            exit(0)
        }
        Some("connect-loop") => {
            // A client's socket's whole life without the network's timing in it: UDP, whose connect()
            // only sets the peer, to a socket of its own on 127.0.0.1. The hooks see what they see of
            // any client: the release of every socket.
            let n: u32 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or_else(|| usage());
            let listener = UdpSocket::bind("127.0.0.1:0").unwrap_or_else(|e| {
                eprintln!("bind 127.0.0.1: {e}");
                exit(1)
            });
            let addr = listener.local_addr().unwrap();
            let start = std::time::Instant::now();
            for _ in 0..n {
                let client = UdpSocket::bind("0.0.0.0:0").and_then(|s| s.connect(addr).map(|()| s));
                match client {
                    Ok(s) => drop(s),
                    Err(e) => {
                        eprintln!("connect {addr}: {e}");
                        exit(1)
                    }
                }
            }
            announce(format!("{:.1}", start.elapsed().as_nanos() as f64 / n as f64));
            exit(0)
        }
        Some("bind-ports") => {
            let rounds: u32 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or_else(|| usage());
            let from: u16 = args.get(2).and_then(|a| a.parse().ok()).unwrap_or_else(|| usage());
            let count: u16 = args.get(3).and_then(|a| a.parse().ok()).unwrap_or_else(|| usage());
            let mut sockets = Vec::with_capacity(count as usize);
            let start = std::time::Instant::now();
            for _ in 0..rounds {
                for port in from..from.saturating_add(count) {
                    match UdpSocket::bind(("0.0.0.0", port)) {
                        Ok(s) => sockets.push(s),
                        Err(e) => {
                            eprintln!("bind 0.0.0.0:{port}: {e}");
                            exit(1)
                        }
                    }
                }
                sockets.clear();
            }
            let each = start.elapsed().as_nanos() as f64 / (rounds as f64 * count as f64);
            announce(format!("{each:.1}"));
            exit(0)
        }
        _ => usage(),
    }
}
