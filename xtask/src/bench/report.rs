//! BENCHMARKS.md and benchmarks.svg: what `cargo xtask bench` measured, each figure beside the
//! baseline measured in the same run, with the machine and the command that reproduces it.
use std::{fmt::Write as _, path::Path};

use anyhow::{Context, Result};

use super::{burst::BurstRow, overhead::OverheadRow, scale::ScaleRow, stats::Samples};

/// One latency distribution, in ms.
pub struct Series {
    pub label: String,
    pub samples: Samples,
    /// Drawn in the plot (the headline distributions); the others are table rows only.
    pub plotted: bool,
}

/// The latency figures of one protocol.
pub struct LatencyPanel {
    pub protocol: String,
    pub series: Vec<Series>,
    /// (goal as measured, met).
    pub goals: Vec<(String, bool)>,
    pub notes: Vec<String>,
}

#[derive(Default)]
pub struct Report {
    /// (what, value) lines about the machine and the software measured.
    pub machine: Vec<(String, String)>,
    pub command: String,
    pub took_seconds: f64,
    pub overhead: Vec<OverheadRow>,
    pub latency: Vec<LatencyPanel>,
    pub bursts: Vec<BurstRow>,
    /// One reconcile pass at scale, per way of reading the gateway's table.
    pub scale: Vec<ScaleRow>,
    /// The daemon's binary as built and stripped as packaged (bytes).
    pub binary: Option<(u64, u64)>,
    /// Further sections, already in Markdown: (title, body).
    pub sections: Vec<(String, String)>,
}

/// Why a path missed its goal, from the run's own figures.
fn overhead_bound(row: &OverheadRow) -> String {
    let none = row.baseline_ns.median();
    let program =
        |hook: &str| row.programs.iter().find(|(name, _, _)| name == hook).map_or(0.0, |(_, ns, per_op)| ns * per_op);
    if !row.forwarded {
        return format!(
            "the empty programs alone cost {:.3}x here: the kernel's cgroup BPF machinery; natbinder's programs \
             add {:+.3} to that.",
            row.empty_ratios.median(),
            row.ratios.median() - row.empty_ratios.median()
        );
    }
    let (bind4, post_bind, release) = (program("bind4"), program("post_bind"), program("sock_release"));
    let extra = row.watched_ns.median() - none;
    format!(
        "of the {extra:.0} ns natbinder adds to each bind and close, the record each of them sends to the daemon, \
         with the lookups it needs (post_bind {post_bind:.0} ns, sock_release {release:.0} ns), is {:.0}% of the \
         loop by itself: more than the goal's 5% for any program that reports every bind and release. bind4 \
         ({bind4:.0} ns: creating the socket's storage that carries the asked-for port to post_bind) is what is \
         left to win; the other {:.0} ns are outside the programs (the storage freed after the socket, the ring \
         buffer's wake-ups, the daemon reading on the same two CPUs).",
        100.0 * (post_bind + release) / none,
        (extra - bind4 - post_bind - release).max(0.0)
    )
}

fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "**missed**"
    }
}

impl Report {
    pub fn markdown(&self) -> String {
        let mut md = String::new();
        let _ = writeln!(md, "# natbinder benchmarks\n");
        let _ = writeln!(
            md,
            "Written by `{}` ({:.0} s). Every figure stands beside a baseline measured in the same run, on the \
             same machine: natbinder is judged by ratios and differences, not by absolute times, which move \
             from run to run. The plot of the latency distributions is [benchmarks.svg](benchmarks.svg).\n",
            self.command, self.took_seconds
        );
        let _ = writeln!(md, "| machine | |\n|---|---|");
        for (what, value) in &self.machine {
            let _ = writeln!(md, "| {what} | {value} |");
        }
        if !self.overhead.is_empty() {
            let _ = writeln!(md, "\n## bind(), connect() and close() with the hooks attached\n");
            let _ = writeln!(
                md,
                "The same loop of a test program in three sibling cgroups: one without programs, one with \
                 programs that do nothing (`return 1`) at natbinder's five hooks, and the watched one (natbinder's \
                 programs, the daemon running), in interleaved rounds whose order turns. ns per operation are the \
                 medians of the rounds; a ratio is the median of each round's ratio to the run without programs, \
                 with its interquartile range. The empty programs are the floor under any program at these hooks: \
                 the kernel's cgroup BPF machinery. Forwarded paths wait for the daemon to be idle after each \
                 watched run, so its work never lands on another run. The last column is the kernel's own \
                 accounting of natbinder's programs in one more run (BPF_ENABLE_STATS; each figure includes the \
                 two clock reads the accounting adds).\n"
            );
            let _ = writeln!(
                md,
                "| path | rounds | none (ns) | empty programs (ns) | natbinder (ns) | empty: ratio | natbinder: ratio | IQR | goal | | natbinder's programs (ns per run) |"
            );
            let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|---|---|");
            for row in &self.overhead {
                let ratio = row.ratios.median();
                let _ = writeln!(
                    md,
                    "| {} | {} | {:.0} | {:.0} | {:.0} | {:.3}x | {:.3}x | {:.3}-{:.3} | <= {:.2}x | {} | {} |",
                    row.path,
                    row.rounds,
                    row.baseline_ns.median(),
                    row.empty_ns.median(),
                    row.watched_ns.median(),
                    row.empty_ratios.median(),
                    ratio,
                    row.ratios.percentile(0.25),
                    row.ratios.percentile(0.75),
                    row.goal(),
                    verdict(ratio <= row.goal()),
                    row.programs
                        .iter()
                        .map(|(hook, ns, per_op)| if (per_op - 1.0).abs() < 0.05 {
                            format!("{hook} {ns:.0}")
                        } else {
                            format!("{hook} {ns:.0} x{per_op:.2}")
                        })
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            let _ = writeln!(md);
            for row in self.overhead.iter().filter(|row| row.ratios.median() > row.goal()) {
                let _ = writeln!(md, "- {}: what bounds it: {}", row.path, overhead_bound(row));
            }
        }
        for panel in &self.latency {
            let _ = writeln!(md, "\n## Latency over {}\n", panel.protocol);
            let _ = writeln!(md, "| what (ms) | n | p50 | p90 | p99 | max |\n|---|---|---|---|---|---|");
            for s in &panel.series {
                let _ = writeln!(
                    md,
                    "| {} | {} | {:.1} | {:.1} | {:.1} | {:.1} |",
                    s.label,
                    s.samples.len(),
                    s.samples.median(),
                    s.samples.percentile(0.9),
                    s.samples.percentile(0.99),
                    s.samples.max()
                );
            }
            if !panel.goals.is_empty() {
                let _ = writeln!(md);
            }
            for (goal, met) in &panel.goals {
                let _ = writeln!(md, "- {goal}: {}", verdict(*met));
            }
            for note in &panel.notes {
                let _ = writeln!(md, "\n{note}");
            }
        }
        if !self.bursts.is_empty() {
            let _ = writeln!(md, "\n## Bursts of listeners (UPnP IGD)\n");
            let _ = writeln!(
                md,
                "One program opens N TCP listeners on 0.0.0.0 at once, waits until all are forwarded, and closes \
                 them. Times run from its last bind() (or its close()) to the daemon's last `mapped` (or `removed`) \
                 outcome. Requests are what miniupnpd logged from this host. The floor is the gateway's own time for \
                 the same N adds, then N deletes, by a bare client in a row, taken before the burst (ports in order) \
                 and after it (in the daemon's order): the gateway's speed drifts within a run, so the two are shown \
                 and their mean is the floor. Then the same burst, closed as soon as it \
                 is bound: sockets released before their add must cost no request.\n"
            );
            let _ = writeln!(
                md,
                "| gateway | listeners | all forwarded (ms) | floor: N adds, mean (before / after) (ms) | ratio | clean (ms) | floor: N deletes, mean (before / after) (ms) | ratio | requests per mapping (open + closed) | events lost | closed at once: mapped, requests |"
            );
            let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|---|---|");
            for b in &self.bursts {
                let n = b.listeners as f64;
                let _ = writeln!(
                    md,
                    "| {} | {} | {:.0} | {:.0} ({:.0} / {:.0}) | {:.2}x | {:.0} | {:.0} ({:.0} / {:.0}) | {:.2}x | {:.2} + {:.2} | {} | {}, {} |",
                    b.gateway,
                    b.listeners,
                    b.to_forwarded_ms,
                    b.floor_adds_ms,
                    b.floor_before_ms.0,
                    b.floor_after_ms.0,
                    b.to_forwarded_ms / b.floor_adds_ms,
                    b.to_clean_ms,
                    b.floor_deletes_ms,
                    b.floor_before_ms.1,
                    b.floor_after_ms.1,
                    b.to_clean_ms / b.floor_deletes_ms,
                    b.requests_open as f64 / n,
                    b.requests_closed as f64 / n,
                    b.lost_events,
                    b.closed_at_once_mapped,
                    b.closed_at_once_requests
                );
            }
            for b in &self.bursts {
                let exact = b.requests_open == b.listeners as usize && b.requests_closed == b.listeners as usize;
                let free = b.closed_at_once_requests == 2 * b.closed_at_once_mapped;
                let within = b.to_forwarded_ms + b.to_clean_ms <= 1.1 * (b.floor_adds_ms + b.floor_deletes_ms);
                let _ = writeln!(
                    md,
                    "- {} listeners on {}: exactly one add and one delete per mapping: {}; a socket released before its add \
                     costs none: {}; total within 1.1x the gateway's own service time: {}",
                    b.listeners,
                    b.gateway,
                    verdict(exact),
                    verdict(free),
                    verdict(within)
                );
                if !within && b.cpu_ms > 0.0 {
                    let n = f64::from(b.listeners);
                    let _ = writeln!(
                        md,
                        "  - What bounds it: the gateway serves an add in {:.2} ms; natbinder takes {:.2} ms more per \
                         mapping, and the daemon spent {:.2} ms of CPU per mapping while forwarding ({:.0}% of the \
                         gateway's time). It sends one request at a time, so its own work per request (one TCP \
                         connection per request, as the gateway closes each, the answer's XML, the bind's process \
                         details) adds to the gateway's instead of overlapping it; on these two CPUs the gateway, \
                         the program and the daemon also wait for each other.",
                        b.floor_adds_ms / n,
                        (b.to_forwarded_ms - b.floor_adds_ms) / n,
                        b.cpu_ms / n,
                        100.0 * b.cpu_ms / b.floor_adds_ms
                    );
                }
            }
        }
        let footprint: Vec<&BurstRow> = self.bursts.iter().filter(|b| b.peak_rss_kib > 0).collect();
        if !footprint.is_empty() || self.binary.is_some() {
            let _ = writeln!(md, "\n## Footprint\n");
            let _ = writeln!(md, "| what | figure | goal |\n|---|---|---|");
            for b in &footprint {
                let _ = writeln!(
                    md,
                    "| forwarding {} listeners at once ({}): peak RSS, CPU time | {:.1} MiB, {:.0} ms | |",
                    b.listeners,
                    b.gateway,
                    b.peak_rss_kib as f64 / 1024.0,
                    b.cpu_ms
                );
                if let Some(idle) = &b.idle {
                    let _ = writeln!(
                        md,
                        "| idle for {} s with {} mappings: RSS | {:.1} MiB | <= 15 MiB: {} |",
                        idle.seconds,
                        b.listeners,
                        idle.rss_kib as f64 / 1024.0,
                        verdict(idle.rss_kib <= 15 * 1024)
                    );
                    let _ = writeln!(
                        md,
                        "| idle for {} s with {} mappings: CPU time, wake-ups (context switches of all threads), requests to the gateway (the periodic check's) | {:.0} ms, {}, {} | only lease and reconcile timers |",
                        idle.seconds, b.listeners, idle.cpu_ms, idle.wakeups, idle.requests
                    );
                }
            }
            if let Some((built, stripped)) = self.binary {
                let _ = writeln!(
                    md,
                    "| the daemon's binary, as built / stripped as packaged | {:.1} MiB / {:.1} MiB | |",
                    built as f64 / 1048576.0,
                    stripped as f64 / 1048576.0
                );
            }
        }
        if let Some(first) = self.scale.first() {
            let _ =
                writeln!(md, "\n## One reconcile pass with {} mappings (UPnP IGD)\n", thousands(first.mappings.into()));
            let _ = writeln!(
                md,
                "The periodic check of the gateway's table (`reconcile/audit.rs`), asked for with SIGHUP while one \
                 program holds {} forwarded listeners, on the fake IGD (which answers at once; miniupnpd's adds slow down \
                 as its table grows). A pass is timed where the gateway stamps each request as it arrives: from the pass's \
                 first request to the one the check sends once the table is read and the findings recorded \
                 (GetExternalIPAddress). The floor is the same requests, as the gateway recorded them, sent again from \
                 the same host by a bare client in a row, each on a new connection as the daemon does. Medians of {} \
                 passes, each followed by its floor. The daemon's CPU time runs from SIGHUP until it is idle again, \
                 and so includes the resync of its sockets that SIGHUP also asks for.\n",
                thousands(first.mappings.into()),
                first.pass_ms.len()
            );
            let _ = writeln!(
                md,
                "| how the daemon reads the table | requests per pass | pass (ms) | min-max | floor: the same requests (ms) | ratio | per request: pass / floor (ms) | daemon CPU (ms) |"
            );
            let _ = writeln!(md, "|---|---|---|---|---|---|---|---|");
            for row in &self.scale {
                let requests = row.total_requests().max(1) as f64;
                let _ = writeln!(
                    md,
                    "| {} | {} ({}) | {:.1} | {:.1}-{:.1} | {:.1} | {:.2}x | {:.3} / {:.3} | {:.0} |",
                    row.reading,
                    row.total_requests(),
                    row.requests.iter().map(|(action, n)| format!("{n} {action}")).collect::<Vec<_>>().join(", "),
                    row.pass_ms.median(),
                    row.pass_ms.percentile(0.0),
                    row.pass_ms.max(),
                    row.floor_ms.median(),
                    row.pass_ms.median() / row.floor_ms.median(),
                    row.pass_ms.median() / requests,
                    row.floor_ms.median() / requests,
                    row.cpu_ms.median()
                );
            }
            if let (Some(listed), Some(checked)) = (self.scale.first(), self.scale.last()) {
                let _ = writeln!(
                    md,
                    "\nReading the table in one call takes {} requests and {:.1} ms a pass; checking each mapping takes {} \
                     requests and {:.1} ms ({:.0}x as long).",
                    listed.total_requests(),
                    listed.pass_ms.median(),
                    checked.total_requests(),
                    checked.pass_ms.median(),
                    checked.pass_ms.median() / listed.pass_ms.median()
                );
            }
        }
        for (title, body) in &self.sections {
            let _ = writeln!(md, "\n## {title}\n\n{}", body.trim_end());
        }
        md
    }

    /// Box plots on a log scale, a panel per protocol: the box spans p25-p75, the whiskers p5-p95, the
    /// bar is the median, and every sample is a dot.
    pub fn svg(&self) -> String {
        const WIDTH: f64 = 960.0;
        const LEFT: f64 = 330.0;
        const RIGHT: f64 = 30.0;
        const ROW: f64 = 30.0;
        const PANEL_HEAD: f64 = 34.0;
        let panels: Vec<(&LatencyPanel, Vec<&Series>)> = self
            .latency
            .iter()
            .map(|p| (p, p.series.iter().filter(|s| s.plotted && !s.samples.is_empty()).collect::<Vec<_>>()))
            .filter(|(_, s)| !s.is_empty())
            .collect();
        let all = panels.iter().flat_map(|(_, s)| s.iter().flat_map(|s| s.samples.values().iter().copied()));
        let (lo, hi) = all.fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(v), hi.max(v)));
        let (lo, hi) = if lo > hi { (1.0, 10.0) } else { (lo.max(0.01), hi.max(lo * 2.0)) };
        let (decade_lo, decade_hi) = (lo.log10().floor(), hi.log10().ceil());
        let x = |ms: f64| LEFT + (ms.max(lo).log10() - decade_lo) / (decade_hi - decade_lo) * (WIDTH - LEFT - RIGHT);
        let height = 60.0 + panels.iter().map(|(_, s)| PANEL_HEAD + ROW * s.len() as f64).sum::<f64>() + 40.0;
        let mut svg = String::new();
        let _ = writeln!(
            svg,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" font-family="sans-serif" font-size="13">"#
        );
        let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
        let _ = writeln!(
            svg,
            r#"<text x="{LEFT}" y="24" font-size="15" font-weight="bold">From bind() to reachable with natbinder, against the gateway's bare add and the users' tools (ms, log scale)</text>"#
        );
        // Grid: 1, 2, 5 of each decade.
        let bottom = height - 40.0;
        let mut decade = decade_lo;
        while decade <= decade_hi {
            for m in [1.0, 2.0, 5.0] {
                let v = 10f64.powf(decade) * m;
                if v < 10f64.powf(decade_lo) || v > 10f64.powf(decade_hi) {
                    continue;
                }
                let gx = x(v);
                let _ = writeln!(
                    svg,
                    r##"<line x1="{gx:.1}" y1="40" x2="{gx:.1}" y2="{bottom}" stroke="#ddd"/><text x="{gx:.1}" y="{:.1}" text-anchor="middle" fill="#555">{}</text>"##,
                    bottom + 18.0,
                    fmt_ms(v)
                );
            }
            decade += 1.0;
        }
        let colors = ["#1f6fb4", "#7a7a7a", "#d9822b", "#3a9a48", "#9a3a8f"];
        let mut y = 50.0;
        for (panel, series) in &panels {
            let _ = writeln!(svg, r#"<text x="10" y="{:.1}" font-weight="bold">{}</text>"#, y + 18.0, panel.protocol);
            y += PANEL_HEAD;
            for (i, s) in series.iter().enumerate() {
                let color = colors[i % colors.len()];
                let mid = y + ROW / 2.0;
                let _ = writeln!(
                    svg,
                    r#"<text x="20" y="{:.1}" fill="{color}">{} (p50 {})</text>"#,
                    mid + 4.0,
                    s.label,
                    fmt_ms(s.samples.median())
                );
                for (k, v) in s.samples.values().iter().enumerate() {
                    // A fixed spread of dots across the row, so the plot is the same for the same data.
                    let jitter = ((k * 7919) % 17) as f64 / 16.0 - 0.5;
                    let _ = write!(
                        svg,
                        r#"<circle cx="{:.1}" cy="{:.1}" r="1.6" fill="{color}" fill-opacity="0.35"/>"#,
                        x(*v),
                        mid + jitter * (ROW - 10.0)
                    );
                }
                let (p5, p25, p50, p75, p95) = (
                    s.samples.percentile(0.05),
                    s.samples.percentile(0.25),
                    s.samples.median(),
                    s.samples.percentile(0.75),
                    s.samples.percentile(0.95),
                );
                let _ = writeln!(
                    svg,
                    "\n<line x1=\"{:.1}\" y1=\"{mid:.1}\" x2=\"{:.1}\" y2=\"{mid:.1}\" stroke=\"{color}\"/>\
                     <rect x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"none\" stroke=\"{color}\" stroke-width=\"1.5\"/>\
                     <line x1=\"{:.1}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"{color}\" stroke-width=\"3\"/>",
                    x(p5),
                    x(p95),
                    x(p25),
                    mid - 8.0,
                    (x(p75) - x(p25)).max(1.0),
                    16.0,
                    x(p50),
                    mid - 10.0,
                    x(p50),
                    mid + 10.0
                );
                y += ROW;
            }
        }
        let _ = writeln!(
            svg,
            r##"<text x="{LEFT}" y="{:.1}" fill="#555" font-size="11">box: p25-p75, bar: median, whiskers: p5-p95, dots: every sample</text>"##,
            height - 6.0
        );
        let _ = writeln!(svg, "</svg>");
        svg
    }

    pub fn write(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let md = dir.join("BENCHMARKS.md");
        std::fs::write(&md, self.markdown()).with_context(|| format!("writing {}", md.display()))?;
        let svg = dir.join("benchmarks.svg");
        std::fs::write(&svg, self.svg()).with_context(|| format!("writing {}", svg.display()))?;
        println!("wrote {} and {}", md.display(), svg.display());
        Ok(())
    }
}

/// 1000 as "1,000".
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn fmt_ms(v: f64) -> String {
    if v >= 1000.0 {
        format!("{} s", trim(v / 1000.0))
    } else {
        format!("{} ms", trim(v))
    }
}

fn trim(v: f64) -> String {
    if v >= 10.0 || (v - v.round()).abs() < 1e-9 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> Report {
        Report {
            machine: vec![("kernel".into(), "6.18".into())],
            command: "cargo xtask bench".into(),
            latency: vec![LatencyPanel {
                protocol: "UPnP IGD".into(),
                series: vec![
                    Series { label: "natbinder".into(), samples: Samples::new(vec![9.0, 10.0, 12.0]), plotted: true },
                    Series { label: "floor".into(), samples: Samples::new(vec![8.0, 9.5, 11.0]), plotted: true },
                    Series { label: "table only".into(), samples: Samples::new(vec![1.0]), plotted: false },
                ],
                goals: vec![("p50 10.0 ms vs. 9.5 ms + 1 ms".into(), true)],
                notes: vec![],
            }],
            ..Report::default()
        }
    }

    #[test]
    fn the_markdown_holds_every_series_and_the_machine() {
        let md = report().markdown();
        assert!(md.contains("| kernel | 6.18 |"));
        assert!(md.contains("| natbinder | 3 | 10.0 |"), "{md}");
        assert!(md.contains("| table only | 1 |"));
    }

    #[test]
    fn a_scale_row_shows_its_requests_by_action_and_its_ratio_to_the_floor() {
        let row = |reading, requests: Vec<(String, usize)>, pass: f64| ScaleRow {
            reading,
            mappings: 1000,
            requests,
            pass_ms: Samples::new(vec![pass]),
            floor_ms: Samples::new(vec![pass / 2.0]),
            cpu_ms: Samples::new(vec![10.0]),
        };
        let md = Report {
            scale: vec![
                row("in one call", vec![("GetListOfPortMappings".into(), 2)], 10.0),
                row(
                    "entry by entry",
                    vec![("GetGenericPortMappingEntry".into(), 1), ("GetSpecificPortMappingEntry".into(), 1000)],
                    500.0,
                ),
            ],
            ..Report::default()
        }
        .markdown();
        assert!(md.contains("## One reconcile pass with 1,000 mappings"), "{md}");
        assert_eq!(
            (thousands(999), thousands(1000), thousands(1234567)),
            ("999".into(), "1,000".into(), "1,234,567".into())
        );
        assert!(md.contains("| in one call | 2 (2 GetListOfPortMappings) | 10.0 | 10.0-10.0 | 5.0 | 2.00x |"), "{md}");
        assert!(md.contains("| 1001 (1 GetGenericPortMappingEntry, 1000 GetSpecificPortMappingEntry) |"), "{md}");
        assert!(md.contains("takes 1001 requests and 500.0 ms (50x as long)"), "{md}");
    }

    #[test]
    fn the_plot_draws_plotted_series_only_and_is_well_formed() {
        let svg = report().svg();
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("natbinder (p50 10 ms)") && svg.contains("floor (p50 9.5 ms)"), "{svg}");
        assert!(!svg.contains("table only"));
        assert_eq!(svg.matches("<circle").count(), 6);
    }
}
