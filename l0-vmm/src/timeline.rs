//! A timeline of who ran when (L0, L1, L2), with each L2 exit and each
//! reflection to L1, written as a Chrome trace-event JSON file (Perfetto,
//! `chrome://tracing`) and drawn as a static SVG picture.
//!
//! The model is pure: times are nanosecond offsets from the start of the
//! run. [`TimelineRecorder`] fills it from [`Instant`]s while L0 runs; a
//! recorder only exists when `--timeline` is given, so the exit path pays
//! nothing otherwise.
//!
//! The JSON follows the Trace Event Format: one process ("l0-vmm") with
//! three threads named `L0`, `L1` and `L2` (metadata events `"M"`), one
//! complete event (`"X"`) per run interval, one thread-scoped instant
//! (`"i"`) per L2 exit on the `L2` track, and a flow (`"s"` on `L2`, `"f"`
//! on `L1`, bound to the L2 box that ended and the L1 box that begins)
//! per exit reflected to L1. Timestamps are microseconds with
//! nanosecond fractions. [`Timeline::from_chrome_trace_json`] reads such a
//! file back, so `l0-vmm timeline-svg FILE.json OUT.svg` draws any file
//! `--timeline` wrote ([`timeline_svg_command`]).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::time::Instant;

use serde_json::{json, Value};

/// A track of the timeline: who runs on the (single) physical vCPU thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Track {
    /// L0: KVM exits being handled in userspace (VMX emulation, decide,
    /// prepare_vmcs12, devices).
    L0,
    /// L1's vCPU in `KVM_RUN`.
    L1,
    /// L2's vCPU in `KVM_RUN`.
    L2,
}

impl Track {
    /// All tracks, top to bottom.
    pub const ALL: [Track; 3] = [Track::L0, Track::L1, Track::L2];

    /// The track's name ("L0", "L1", "L2"), also its thread name.
    pub fn name(self) -> &'static str {
        match self {
            Track::L0 => "L0",
            Track::L1 => "L1",
            Track::L2 => "L2",
        }
    }

    /// The thread id used in the trace.
    pub fn tid(self) -> u64 {
        match self {
            Track::L0 => 0,
            Track::L1 => 1,
            Track::L2 => 2,
        }
    }

    fn from_tid(tid: u64) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.tid() == tid)
    }

    fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.name() == name)
    }

    fn color(self) -> &'static str {
        match self {
            Track::L0 => "#9e9e9e",
            Track::L1 => "#4c78a8",
            Track::L2 => "#59a14f",
        }
    }
}

/// One interval in which a level ran.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunInterval {
    /// Who ran.
    pub track: Track,
    /// Start, ns from the start of the run.
    pub start_ns: u64,
    /// End (>= start), ns.
    pub end_ns: u64,
    /// What it did ("L2 runs", "L0: VMRESUME", ...).
    pub label: String,
}

/// Who handled an exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExitHandler {
    /// L0 handled it and resumed the level that exited.
    L0,
    /// Reflected to L1.
    L1,
}

impl ExitHandler {
    fn name(self) -> &'static str {
        match self {
            ExitHandler::L0 => "handled in L0",
            ExitHandler::L1 => "reflected to L1",
        }
    }

    fn from_name(name: &str) -> Option<Self> {
        [ExitHandler::L0, ExitHandler::L1]
            .into_iter()
            .find(|h| h.name() == name)
    }

    fn color(self) -> &'static str {
        match self {
            ExitHandler::L0 => "#f28e2b",
            ExitHandler::L1 => "#e15759",
        }
    }
}

/// One exit of a level (an instant).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExitMark {
    /// The level that exited.
    pub track: Track,
    /// When, ns.
    pub at_ns: u64,
    /// The SDM name of the exit reason ("I/O instruction", "HLT", ...).
    pub reason: String,
    /// Who handled it.
    pub handler: ExitHandler,
    /// The decision's explanation.
    pub explanation: String,
}

/// An arrow from one track to another (an exit reflected from L2 to L1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Arrow {
    /// Source track.
    pub from: Track,
    /// When the arrow leaves it, ns.
    pub from_ns: u64,
    /// Destination track.
    pub to: Track,
    /// When the arrow arrives, ns.
    pub to_ns: u64,
    /// What it carries ("I/O instruction").
    pub label: String,
}

/// The whole picture.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Timeline {
    /// Run intervals, any order.
    pub intervals: Vec<RunInterval>,
    /// Exits, any order.
    pub exits: Vec<ExitMark>,
    /// Arrows, any order.
    pub arrows: Vec<Arrow>,
}

/// Why a timeline file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum TimelineError {
    /// The file is not JSON.
    #[error("timeline file is not valid JSON ({0}): pass a file written by --timeline")]
    Json(#[from] serde_json::Error),
    /// JSON, but not a trace-event file of this tool.
    #[error("not a timeline trace: {0}; pass a file written by --timeline")]
    Format(String),
    /// Reading or writing failed.
    #[error("cannot {action} {path}: {source}")]
    Io {
        /// "read" or "write".
        action: &'static str,
        /// The path.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
}

/// The two ends of a flow read back: ("s" track, time, label), ("f" track, time).
type FlowEnds = (Option<(Track, u64, String)>, Option<(Track, u64)>);

/// Process id used in the trace.
const PID: u64 = 1;

fn us(ns: u64) -> Value {
    // Microseconds with nanosecond fractions; integral values stay
    // integers so the file stays exact and readable.
    if ns.is_multiple_of(1000) {
        json!(ns / 1000)
    } else {
        json!(ns as f64 / 1000.0)
    }
}

fn ns_of(v: Option<&Value>) -> Option<u64> {
    let v = v?;
    if let Some(u) = v.as_u64() {
        return u.checked_mul(1000);
    }
    let f = v.as_f64()?;
    if !(0.0..1.0e13).contains(&f) {
        return None;
    }
    Some((f * 1000.0).round() as u64)
}

impl Timeline {
    /// An empty timeline.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a run interval (end is clamped to at least start).
    pub fn run(&mut self, track: Track, start_ns: u64, end_ns: u64, label: impl Into<String>) {
        self.intervals.push(RunInterval {
            track,
            start_ns,
            end_ns: end_ns.max(start_ns),
            label: label.into(),
        });
    }

    /// Adds an exit.
    pub fn exit(
        &mut self,
        track: Track,
        at_ns: u64,
        reason: impl Into<String>,
        handler: ExitHandler,
        explanation: impl Into<String>,
    ) {
        self.exits.push(ExitMark {
            track,
            at_ns,
            reason: reason.into(),
            handler,
            explanation: explanation.into(),
        });
    }

    /// Adds an arrow.
    pub fn arrow(
        &mut self,
        from: Track,
        from_ns: u64,
        to: Track,
        to_ns: u64,
        label: impl Into<String>,
    ) {
        self.arrows.push(Arrow {
            from,
            from_ns,
            to,
            to_ns: to_ns.max(from_ns),
            label: label.into(),
        });
    }

    /// First and last time of anything in the timeline.
    pub fn span_ns(&self) -> Option<(u64, u64)> {
        let starts = self
            .intervals
            .iter()
            .map(|i| (i.start_ns, i.end_ns))
            .chain(self.exits.iter().map(|e| (e.at_ns, e.at_ns)))
            .chain(self.arrows.iter().map(|a| (a.from_ns, a.to_ns)));
        starts.fold(None, |acc, (a, b)| match acc {
            None => Some((a, b)),
            Some((lo, hi)) => Some((lo.min(a), hi.max(b))),
        })
    }

    /// The Chrome trace-event JSON document.
    pub fn to_chrome_trace(&self) -> Value {
        let mut events = vec![json!({
            "name": "process_name", "ph": "M", "pid": PID,
            "args": { "name": "l0-vmm (nested VMX)" }
        })];
        for t in Track::ALL {
            events.push(json!({
                "name": "thread_name", "ph": "M", "pid": PID, "tid": t.tid(),
                "args": { "name": t.name() }
            }));
            events.push(json!({
                "name": "thread_sort_index", "ph": "M", "pid": PID, "tid": t.tid(),
                "args": { "sort_index": t.tid() }
            }));
        }
        let mut intervals: Vec<&RunInterval> = self.intervals.iter().collect();
        intervals.sort_by_key(|i| (i.start_ns, i.track));
        for i in intervals {
            events.push(json!({
                "name": i.label, "cat": "run", "ph": "X", "pid": PID, "tid": i.track.tid(),
                "ts": us(i.start_ns), "dur": us(i.end_ns - i.start_ns),
            }));
        }
        let mut exits: Vec<&ExitMark> = self.exits.iter().collect();
        exits.sort_by_key(|e| e.at_ns);
        for e in exits {
            events.push(json!({
                "name": e.reason, "cat": "exit", "ph": "i", "s": "t", "pid": PID,
                "tid": e.track.tid(), "ts": us(e.at_ns),
                "args": { "decision": e.handler.name(), "explanation": e.explanation }
            }));
        }
        // Perfetto binds an "s" to the slice open on its track at its ts,
        // and an "f" without "bp" to the next slice that begins on its
        // track: both go 1 ns early so that the L2 box that ended and the
        // L1 box that begins are the ends. `at_ns` keeps the exact times.
        for (id, a) in self.arrows.iter().enumerate() {
            events.push(json!({
                "name": a.label, "cat": "reflect", "ph": "s", "id": id, "pid": PID,
                "tid": a.from.tid(), "ts": us(a.from_ns.saturating_sub(1)),
                "args": { "at_ns": a.from_ns }
            }));
            events.push(json!({
                "name": a.label, "cat": "reflect", "ph": "f", "id": id,
                "pid": PID, "tid": a.to.tid(), "ts": us(a.to_ns.saturating_sub(1)),
                "args": { "at_ns": a.to_ns }
            }));
        }
        json!({
            "traceEvents": events,
            "displayTimeUnit": "ns",
            "otherData": { "producer": "l0-vmm", "tracks": "L0, L1, L2" }
        })
    }

    /// [`Timeline::to_chrome_trace`] as a string (one event per line).
    pub fn to_chrome_trace_json(&self) -> String {
        let doc = self.to_chrome_trace();
        let mut out = String::from("{\"traceEvents\":[\n");
        if let Some(events) = doc["traceEvents"].as_array() {
            for (n, e) in events.iter().enumerate() {
                let sep = if n + 1 == events.len() { "\n" } else { ",\n" };
                out.push_str(&e.to_string());
                out.push_str(sep);
            }
        }
        let _ = write!(
            out,
            "],\n\"displayTimeUnit\":\"ns\",\n\"otherData\":{}}}\n",
            doc["otherData"]
        );
        out
    }

    /// Reads a trace written by [`Timeline::to_chrome_trace_json`] back.
    /// Track ids come from the `thread_name` metadata (so a trace whose
    /// threads are named L0/L1/L2 under other ids reads too); events of
    /// other threads and phases are ignored.
    pub fn from_chrome_trace_json(text: &str) -> Result<Self, TimelineError> {
        let doc: Value = serde_json::from_str(text)?;
        let events = doc
            .get("traceEvents")
            .and_then(Value::as_array)
            .or_else(|| doc.as_array())
            .ok_or_else(|| TimelineError::Format("no \"traceEvents\" array".into()))?;
        let mut tracks: BTreeMap<(u64, u64), Track> = BTreeMap::new();
        for e in events {
            if e["ph"] == "M" && e["name"] == "thread_name" {
                let name = e["args"]["name"].as_str().unwrap_or_default();
                if let (Some(t), Some(pid), Some(tid)) =
                    (Track::from_name(name), e["pid"].as_u64(), e["tid"].as_u64())
                {
                    tracks.insert((pid, tid), t);
                }
            }
        }
        if tracks.is_empty() {
            for t in Track::ALL {
                tracks.insert((PID, t.tid()), t);
            }
        }
        let track_of = |e: &Value| -> Option<Track> {
            let key = (e["pid"].as_u64()?, e["tid"].as_u64()?);
            tracks
                .get(&key)
                .copied()
                .or_else(|| Track::from_tid(key.1).filter(|_| key.0 == PID))
        };
        let mut tl = Timeline::new();
        let mut flows: BTreeMap<String, FlowEnds> = BTreeMap::new();
        for (n, e) in events.iter().enumerate() {
            let bad = |what: &str| TimelineError::Format(format!("event {n}: {what}"));
            let ph = e["ph"].as_str().unwrap_or_default();
            let name = e["name"].as_str().unwrap_or_default().to_string();
            match ph {
                "X" => {
                    let Some(track) = track_of(e) else { continue };
                    let start =
                        ns_of(e.get("ts")).ok_or_else(|| bad("\"X\" without a valid ts"))?;
                    let dur =
                        ns_of(e.get("dur")).ok_or_else(|| bad("\"X\" without a valid dur"))?;
                    tl.run(track, start, start.saturating_add(dur), name);
                }
                "i" | "I" => {
                    let Some(track) = track_of(e) else { continue };
                    let at = ns_of(e.get("ts")).ok_or_else(|| bad("instant without a valid ts"))?;
                    let handler = e["args"]["decision"]
                        .as_str()
                        .and_then(ExitHandler::from_name)
                        .unwrap_or(ExitHandler::L0);
                    let explanation = e["args"]["explanation"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string();
                    tl.exit(track, at, name, handler, explanation);
                }
                "s" | "f" => {
                    let Some(track) = track_of(e) else { continue };
                    let at = e["args"]["at_ns"]
                        .as_u64()
                        .or_else(|| ns_of(e.get("ts")))
                        .ok_or_else(|| bad("flow without a valid ts"))?;
                    let id = e["id"].to_string();
                    let slot = flows.entry(id).or_default();
                    if ph == "s" {
                        slot.0 = Some((track, at, name));
                    } else {
                        slot.1 = Some((track, at));
                    }
                }
                _ => {}
            }
        }
        for (_, flow) in flows {
            if let (Some((from, from_ns, label)), Some((to, to_ns))) = flow {
                tl.arrow(from, from_ns, to, to_ns, label);
            }
        }
        Ok(tl)
    }
}

// ---------------------------------------------------------------------------
// Recording from a live run
// ---------------------------------------------------------------------------

/// Fills a [`Timeline`] while L0 runs. L0's own track is derived: L0 runs
/// whenever neither L1 nor L2 is in `KVM_RUN` (one vCPU thread).
#[derive(Debug)]
pub struct TimelineRecorder {
    origin: Instant,
    timeline: Timeline,
    /// The guest level in `KVM_RUN` and since when.
    running: Option<(Track, u64, String)>,
    /// Since when L0 runs, and what it is doing.
    l0_since: Option<(u64, String)>,
    /// A reflection whose arrow ends when L1 next runs: (left L2 at, label).
    reflecting: Option<(u64, String)>,
}

impl Default for TimelineRecorder {
    fn default() -> Self {
        Self::new()
    }
}

impl TimelineRecorder {
    /// A recorder whose time 0 is now; L0 runs from now.
    pub fn new() -> Self {
        Self::with_origin(Instant::now())
    }

    /// A recorder whose time 0 is `origin`.
    pub fn with_origin(origin: Instant) -> Self {
        Self {
            origin,
            timeline: Timeline::new(),
            running: None,
            l0_since: Some((0, "L0 starts".into())),
            reflecting: None,
        }
    }

    /// ns since the origin.
    pub fn now_ns(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// `track` (L1 or L2) enters `KVM_RUN` now.
    pub fn enter(&mut self, track: Track, label: impl Into<String>) {
        let now = self.now_ns();
        self.enter_at(track, now, label);
    }

    /// [`TimelineRecorder::enter`] at a given time.
    pub fn enter_at(&mut self, track: Track, at_ns: u64, label: impl Into<String>) {
        if let Some((since, what)) = self.l0_since.take() {
            self.timeline.run(Track::L0, since, at_ns, what);
        }
        if let Some((t, since, what)) = self.running.take() {
            self.timeline.run(t, since, at_ns, what);
        }
        if track == Track::L1 {
            if let Some((from_ns, label)) = self.reflecting.take() {
                self.timeline
                    .arrow(Track::L2, from_ns, Track::L1, at_ns, label);
            }
        }
        self.running = Some((track, at_ns, label.into()));
    }

    /// The running level left `KVM_RUN` now; L0 runs, doing `l0_does`.
    pub fn leave(&mut self, l0_does: impl Into<String>) {
        let now = self.now_ns();
        self.leave_at(now, l0_does);
    }

    /// [`TimelineRecorder::leave`] at a given time.
    pub fn leave_at(&mut self, at_ns: u64, l0_does: impl Into<String>) {
        if let Some((t, since, what)) = self.running.take() {
            self.timeline.run(t, since, at_ns, what);
        }
        if self.l0_since.is_none() {
            self.l0_since = Some((at_ns, l0_does.into()));
        }
    }

    /// An exit of L2 decided now: an instant on L2's track; a reflected
    /// exit also starts an arrow that ends when L1 next enters.
    pub fn l2_exit(&mut self, reason: &str, handler: ExitHandler, explanation: &str) {
        let now = self.now_ns();
        self.l2_exit_at(now, reason, handler, explanation);
    }

    /// [`TimelineRecorder::l2_exit`] at a given time. The instant sits
    /// where L2 stopped (the end of its last interval), not where L0
    /// decided, so it lines up with the box.
    pub fn l2_exit_at(
        &mut self,
        at_ns: u64,
        reason: &str,
        handler: ExitHandler,
        explanation: &str,
    ) {
        let stopped = self
            .timeline
            .intervals
            .iter()
            .rev()
            .find(|i| i.track == Track::L2)
            .map_or(at_ns, |i| i.end_ns);
        self.timeline
            .exit(Track::L2, stopped, reason, handler, explanation);
        if handler == ExitHandler::L1 {
            self.reflecting = Some((stopped, reason.to_string()));
        }
    }

    /// Closes the open intervals now and returns the timeline.
    pub fn finish(self) -> Timeline {
        let now = self.now_ns();
        self.finish_at(now)
    }

    /// [`TimelineRecorder::finish`] at a given time.
    pub fn finish_at(mut self, at_ns: u64) -> Timeline {
        if let Some((t, since, what)) = self.running.take() {
            self.timeline.run(t, since, at_ns, what);
        }
        if let Some((since, what)) = self.l0_since.take() {
            self.timeline.run(Track::L0, since, at_ns, what);
        }
        self.timeline
    }

    /// The timeline so far (open intervals not included).
    pub fn timeline(&self) -> &Timeline {
        &self.timeline
    }
}

// ---------------------------------------------------------------------------
// SVG
// ---------------------------------------------------------------------------

/// What part of the timeline to draw, and how wide.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SvgOptions {
    /// Picture width in pixels.
    pub width: f64,
    /// First ns to draw (default: the start of the timeline).
    pub start_ns: Option<u64>,
    /// Last ns to draw (default: its end).
    pub end_ns: Option<u64>,
}

impl Default for SvgOptions {
    fn default() -> Self {
        Self {
            width: 1200.0,
            start_ns: None,
            end_ns: None,
        }
    }
}

fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            // Control characters are not allowed in XML 1.0.
            c if (c as u32) < 0x20 && !matches!(c, '\t' | '\n' | '\r') => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

/// A human time: "1.5 ms", "250 µs", "40 ns".
pub fn format_ns(ns: u64) -> String {
    let trim = |v: f64| {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    };
    if ns >= 1_000_000_000 {
        format!("{} s", trim(ns as f64 / 1e9))
    } else if ns >= 1_000_000 {
        format!("{} ms", trim(ns as f64 / 1e6))
    } else if ns >= 1_000 {
        format!("{} µs", trim(ns as f64 / 1e3))
    } else {
        format!("{ns} ns")
    }
}

/// A 1/2/5 x 10^k step giving about `target` ticks over `span`.
fn tick_step(span: u64, target: u64) -> u64 {
    let raw = (span / target.max(1)).max(1);
    let mut p = 1u64;
    while p.saturating_mul(10) <= raw {
        p *= 10;
    }
    for m in [1, 2, 5, 10] {
        if p.saturating_mul(m) >= raw {
            return p.saturating_mul(m);
        }
    }
    p.saturating_mul(10)
}

/// Draws the timeline: three lanes (L0, L1, L2) with a box per run
/// interval, a tick per exit (orange: L0 handled it, red: reflected), an
/// arrow per reflection, a time axis and a legend. Hovering an element in
/// a browser shows its label (`<title>`).
pub fn render_svg(timeline: &Timeline, options: &SvgOptions) -> String {
    const LEFT: f64 = 70.0;
    const RIGHT: f64 = 20.0;
    const TOP: f64 = 50.0;
    const LANE_H: f64 = 44.0;
    const LANE_GAP: f64 = 26.0;
    let width = options.width.max(LEFT + RIGHT + 100.0);
    let (lo, hi) = timeline.span_ns().unwrap_or((0, 1));
    let start = options.start_ns.unwrap_or(lo);
    let end = options.end_ns.unwrap_or(hi).max(start + 1);
    let plot_w = width - LEFT - RIGHT;
    let x = |ns: u64| {
        LEFT + (ns.saturating_sub(start)).min(end - start) as f64 * plot_w / (end - start) as f64
    };
    let visible = |a: u64, b: u64| b >= start && a <= end;
    let lane_y = |t: Track| TOP + t.tid() as f64 * (LANE_H + LANE_GAP);
    let axis_y = lane_y(Track::L2) + LANE_H + 18.0;
    let legend_y = axis_y + 44.0;
    let height = legend_y + 30.0;

    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<?xml version="1.0" encoding="UTF-8"?>
<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" viewBox="0 0 {width:.0} {height:.0}" font-family="sans-serif" font-size="12">
<defs><marker id="arrowhead" markerWidth="8" markerHeight="8" refX="7" refY="4" orient="auto"><path d="M0,0 L8,4 L0,8 z" fill="{}"/></marker></defs>
<rect x="0" y="0" width="{width:.0}" height="{height:.0}" fill="white"/>"#,
        ExitHandler::L1.color()
    );
    let _ = writeln!(
        s,
        r#"<text x="{LEFT}" y="22" font-size="15" font-weight="bold">Nested VMX timeline: who ran when ({} to {}, {} exits, {} reflected)</text>"#,
        xml_escape(&format_ns(start)),
        xml_escape(&format_ns(end)),
        timeline.exits.len(),
        timeline.arrows.len()
    );
    // Lanes.
    for t in Track::ALL {
        let y = lane_y(t);
        let _ = writeln!(
            s,
            r##"<rect x="{LEFT}" y="{y}" width="{plot_w:.1}" height="{LANE_H}" fill="#f4f4f4" stroke="#cccccc"/>
<text x="{:.0}" y="{:.1}" font-size="16" font-weight="bold" text-anchor="end">{}</text>"##,
            LEFT - 12.0,
            y + LANE_H / 2.0 + 6.0,
            t.name()
        );
    }
    // Run boxes.
    for i in timeline
        .intervals
        .iter()
        .filter(|i| visible(i.start_ns, i.end_ns))
    {
        let (x0, x1) = (x(i.start_ns), x(i.end_ns));
        let y = lane_y(i.track) + 6.0;
        let _ = writeln!(
            s,
            r#"<rect x="{x0:.2}" y="{y:.1}" width="{:.2}" height="{:.1}" fill="{}"><title>{}: {} ({} to {})</title></rect>"#,
            (x1 - x0).max(0.6),
            LANE_H - 12.0,
            i.track.color(),
            i.track.name(),
            xml_escape(&i.label),
            xml_escape(&format_ns(i.start_ns)),
            xml_escape(&format_ns(i.end_ns))
        );
    }
    // Exit ticks.
    for e in timeline.exits.iter().filter(|e| visible(e.at_ns, e.at_ns)) {
        let xe = x(e.at_ns);
        let y = lane_y(e.track);
        let _ = writeln!(
            s,
            r#"<line x1="{xe:.2}" y1="{:.1}" x2="{xe:.2}" y2="{:.1}" stroke="{}" stroke-width="2"><title>{} at {}: {} ({})</title></line>"#,
            y - 4.0,
            y + LANE_H + 4.0,
            e.handler.color(),
            xml_escape(&e.reason),
            xml_escape(&format_ns(e.at_ns)),
            e.handler.name(),
            xml_escape(&e.explanation)
        );
    }
    // Arrows (reflections).
    for a in timeline
        .arrows
        .iter()
        .filter(|a| visible(a.from_ns, a.to_ns))
    {
        let (fy, ty) = if a.from > a.to {
            (lane_y(a.from) - 4.0, lane_y(a.to) + LANE_H + 2.0)
        } else {
            (lane_y(a.from) + LANE_H + 4.0, lane_y(a.to) - 2.0)
        };
        let _ = writeln!(
            s,
            r#"<line x1="{:.2}" y1="{fy:.1}" x2="{:.2}" y2="{ty:.1}" stroke="{}" stroke-width="1.2" marker-end="url(#arrowhead)"><title>{} reflected {} to {}</title></line>"#,
            x(a.from_ns),
            x(a.to_ns),
            ExitHandler::L1.color(),
            xml_escape(&a.label),
            a.from.name(),
            a.to.name()
        );
    }
    // Time axis.
    let step = tick_step(end - start, 8);
    let _ = writeln!(
        s,
        r##"<line x1="{LEFT}" y1="{axis_y:.1}" x2="{:.1}" y2="{axis_y:.1}" stroke="#333333"/>"##,
        LEFT + plot_w
    );
    let mut tick = start.div_ceil(step).saturating_mul(step);
    while tick <= end {
        let xt = x(tick);
        let _ = writeln!(
            s,
            r##"<line x1="{xt:.2}" y1="{axis_y:.1}" x2="{xt:.2}" y2="{:.1}" stroke="#333333"/>
<text x="{xt:.2}" y="{:.1}" text-anchor="middle">{}</text>"##,
            axis_y + 5.0,
            axis_y + 18.0,
            xml_escape(&format_ns(tick))
        );
        tick = match tick.checked_add(step) {
            Some(t) => t,
            None => break,
        };
    }
    // Legend.
    let mut lx = LEFT;
    for t in Track::ALL {
        let _ = writeln!(
            s,
            r#"<rect x="{lx:.0}" y="{:.1}" width="14" height="12" fill="{}"/><text x="{:.0}" y="{legend_y:.1}">{} runs</text>"#,
            legend_y - 10.0,
            t.color(),
            lx + 18.0,
            t.name()
        );
        lx += 90.0;
    }
    for h in [ExitHandler::L0, ExitHandler::L1] {
        let _ = writeln!(
            s,
            r#"<line x1="{:.0}" y1="{:.1}" x2="{:.0}" y2="{:.1}" stroke="{}" stroke-width="2"/><text x="{:.0}" y="{legend_y:.1}">L2 exit {}</text>"#,
            lx + 6.0,
            legend_y - 12.0,
            lx + 6.0,
            legend_y + 2.0,
            h.color(),
            lx + 14.0,
            h.name()
        );
        lx += 170.0;
    }
    let _ = writeln!(
        s,
        r#"<line x1="{lx:.0}" y1="{:.1}" x2="{:.0}" y2="{:.1}" stroke="{}" stroke-width="1.2" marker-end="url(#arrowhead)"/><text x="{:.0}" y="{legend_y:.1}">reflection L2 to L1</text>"#,
        legend_y - 4.0,
        lx + 24.0,
        legend_y - 4.0,
        ExitHandler::L1.color(),
        lx + 30.0
    );
    s.push_str("</svg>\n");
    s
}

/// Reads a timeline JSON file and draws it (`l0-vmm timeline-svg IN OUT`).
pub fn timeline_svg_command(
    input: &Path,
    output: &Path,
    options: &SvgOptions,
) -> Result<(), TimelineError> {
    let text = std::fs::read_to_string(input).map_err(|source| TimelineError::Io {
        action: "read",
        path: input.display().to_string(),
        source,
    })?;
    let tl = Timeline::from_chrome_trace_json(&text)?;
    std::fs::write(output, render_svg(&tl, options)).map_err(|source| TimelineError::Io {
        action: "write",
        path: output.display().to_string(),
        source,
    })
}

/// Writes a timeline as a Chrome trace-event JSON file (`--timeline FILE`).
pub fn write_chrome_trace(timeline: &Timeline, path: &Path) -> Result<(), TimelineError> {
    std::fs::write(path, timeline.to_chrome_trace_json()).map_err(|source| TimelineError::Io {
        action: "write",
        path: path.display().to_string(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// L1 runs, launches L2; L2 exits twice: OUT 0xe9 (L0) then OUT 0x3f8
    /// (reflected); L1 handles it and resumes L2, which halts (reflected).
    fn sample() -> Timeline {
        let mut r = TimelineRecorder::with_origin(Instant::now());
        r.enter_at(Track::L1, 1_000, "L1 runs");
        r.leave_at(5_000, "VMLAUNCH");
        r.enter_at(Track::L2, 7_000, "L2 runs");
        r.leave_at(9_000, "I/O instruction");
        r.l2_exit_at(
            9_500,
            "I/O instruction",
            ExitHandler::L0,
            "L0 keeps port 0xe9",
        );
        r.enter_at(Track::L2, 10_000, "L2 runs");
        r.leave_at(12_000, "I/O instruction");
        r.l2_exit_at(
            12_300,
            "I/O instruction",
            ExitHandler::L1,
            "I/O bitmap A bit for port 0x3f8 is set",
        );
        r.enter_at(Track::L1, 14_000, "L1 runs");
        r.leave_at(18_000, "VMRESUME");
        r.enter_at(Track::L2, 19_000, "L2 runs");
        r.leave_at(20_000, "HLT");
        r.l2_exit_at(20_100, "HLT", ExitHandler::L1, "L1 set \"HLT exiting\"");
        r.enter_at(Track::L1, 21_000, "L1 runs");
        r.finish_at(25_000)
    }

    #[test]
    fn test_recorder_derives_l0_between_guest_runs() {
        let tl = sample();
        let l0: Vec<(u64, u64)> = tl
            .intervals
            .iter()
            .filter(|i| i.track == Track::L0)
            .map(|i| (i.start_ns, i.end_ns))
            .collect();
        assert_eq!(
            l0,
            vec![
                (0, 1_000),
                (5_000, 7_000),
                (9_000, 10_000),
                (12_000, 14_000),
                (18_000, 19_000),
                (20_000, 21_000)
            ]
        );
        // The exits sit where L2 stopped; only reflections have arrows.
        let at: Vec<u64> = tl.exits.iter().map(|e| e.at_ns).collect();
        assert_eq!(at, vec![9_000, 12_000, 20_000]);
        let arrows: Vec<(u64, u64)> = tl.arrows.iter().map(|a| (a.from_ns, a.to_ns)).collect();
        assert_eq!(arrows, vec![(12_000, 14_000), (20_000, 21_000)]);
        assert_eq!(tl.span_ns(), Some((0, 25_000)));
        // No interval overlaps another: one vCPU thread.
        let mut all: Vec<_> = tl
            .intervals
            .iter()
            .map(|i| (i.start_ns, i.end_ns))
            .collect();
        all.sort();
        assert!(all.windows(2).all(|w| w[0].1 <= w[1].0), "{all:?}");
    }

    #[test]
    fn test_chrome_trace_is_valid_json_with_three_named_tracks() {
        let text = sample().to_chrome_trace_json();
        let doc: Value = serde_json::from_str(&text).unwrap();
        let events = doc["traceEvents"].as_array().unwrap();
        let mut names: Vec<(u64, String)> = events
            .iter()
            .filter(|e| e["ph"] == "M" && e["name"] == "thread_name")
            .map(|e| {
                (
                    e["tid"].as_u64().unwrap(),
                    e["args"]["name"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        names.sort();
        assert_eq!(
            names,
            vec![
                (0, "L0".to_string()),
                (1, "L1".to_string()),
                (2, "L2".to_string())
            ]
        );
        let count = |ph: &str| events.iter().filter(|e| e["ph"] == ph).count();
        assert_eq!(count("X"), 6 + 3 + 3);
        assert_eq!(count("i"), 3);
        assert_eq!(count("s"), 2);
        assert_eq!(count("f"), 2);
        // Every "X" has ts and dur in microseconds on one of the tracks.
        for e in events.iter().filter(|e| e["ph"] == "X") {
            assert!(e["ts"].is_number() && e["dur"].is_number(), "{e}");
            assert!(e["tid"].as_u64().unwrap() <= 2);
        }
        let reflected = events
            .iter()
            .find(|e| e["ph"] == "i" && e["ts"] == 12)
            .unwrap();
        assert_eq!(reflected["args"]["decision"], "reflected to L1");
        assert_eq!(reflected["tid"], 2);
        let hlt_flow_end = events
            .iter()
            .find(|e| e["ph"] == "f" && e["id"] == 1)
            .unwrap();
        assert_eq!(hlt_flow_end["tid"], 1);
        assert_eq!(hlt_flow_end["ts"], 20.999);
        assert_eq!(hlt_flow_end["args"]["at_ns"], 21_000);
        assert!(hlt_flow_end.get("bp").is_none());
        assert_eq!(doc["displayTimeUnit"], "ns");
    }

    #[test]
    fn test_fractional_microseconds_round_trip_exactly() {
        let mut tl = Timeline::new();
        tl.run(Track::L2, 1_234_567, 1_240_001, "L2 runs");
        tl.exit(Track::L2, 1_240_001, "HLT", ExitHandler::L1, "x");
        tl.arrow(Track::L2, 1_240_001, Track::L1, 1_250_003, "HLT");
        let back = Timeline::from_chrome_trace_json(&tl.to_chrome_trace_json()).unwrap();
        assert_eq!(back, tl);
    }

    #[test]
    fn test_json_round_trip_gives_the_same_timeline() {
        let tl = sample();
        let back = Timeline::from_chrome_trace_json(&tl.to_chrome_trace_json()).unwrap();
        let sorted = |mut t: Timeline| {
            t.intervals.sort_by_key(|i| (i.start_ns, i.track));
            t.exits.sort_by_key(|e| e.at_ns);
            t
        };
        assert_eq!(sorted(back), sorted(tl));
    }

    #[test]
    fn test_bad_json_is_a_clear_error() {
        let e = Timeline::from_chrome_trace_json("{not json").unwrap_err();
        assert!(e.to_string().starts_with("timeline file is not valid JSON"));
        let e = Timeline::from_chrome_trace_json("{\"foo\":1}").unwrap_err();
        assert_eq!(
            e.to_string(),
            "not a timeline trace: no \"traceEvents\" array; pass a file written by --timeline"
        );
        let e = Timeline::from_chrome_trace_json(
            r#"{"traceEvents":[{"ph":"X","pid":1,"tid":2,"ts":-5,"dur":1,"name":"a"}]}"#,
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("event 0: \"X\" without a valid ts"),
            "{e}"
        );
    }

    /// A minimal well-formedness check: tags nest and close, attributes
    /// are quoted, text has no raw '<' or unescaped '&'.
    fn check_xml(doc: &str) -> Result<Vec<String>, String> {
        let mut stack: Vec<String> = Vec::new();
        let mut seen = Vec::new();
        let mut rest = doc.trim_start();
        if let Some(r) = rest.strip_prefix("<?xml") {
            rest = &r[r.find("?>").ok_or("unterminated declaration")? + 2..];
        }
        let mut root_closed = false;
        while let Some(lt) = rest.find('<') {
            let text = &rest[..lt];
            if let Some(amp) = text.find('&') {
                let ent = &text[amp..];
                if !["&amp;", "&lt;", "&gt;", "&quot;", "&apos;"]
                    .iter()
                    .any(|e| ent.starts_with(e))
                {
                    return Err(format!("bad entity in {text:?}"));
                }
            }
            if root_closed && !text.trim().is_empty() {
                return Err("text after the root element".into());
            }
            let gt = rest[lt..].find('>').ok_or("unterminated tag")? + lt;
            let tag = &rest[lt + 1..gt];
            if tag.contains('<') {
                return Err(format!("'<' inside tag {tag:?}"));
            }
            if !tag.matches('"').count().is_multiple_of(2) {
                return Err(format!("unbalanced quotes in {tag:?}"));
            }
            if let Some(name) = tag.strip_prefix('/') {
                let open = stack
                    .pop()
                    .ok_or(format!("</{name}> without an open tag"))?;
                if open != name.trim() {
                    return Err(format!("<{open}> closed by </{name}>"));
                }
                root_closed = stack.is_empty();
            } else {
                if root_closed {
                    return Err("a second root element".into());
                }
                let name: String = tag
                    .chars()
                    .take_while(|c| !c.is_whitespace() && *c != '/')
                    .collect();
                seen.push(name.clone());
                if !tag.ends_with('/') {
                    stack.push(name);
                }
            }
            rest = &rest[gt + 1..];
        }
        if !stack.is_empty() || !root_closed {
            return Err(format!("unclosed tags {stack:?}"));
        }
        Ok(seen)
    }

    #[test]
    fn test_xml_checker_rejects_broken_documents() {
        assert!(check_xml("<svg><g></g></svg>").is_ok());
        assert!(check_xml("<svg><g></svg>").is_err());
        assert!(check_xml("<svg>a & b</svg>").is_err());
        assert!(check_xml("<svg></svg><svg></svg>").is_err());
        assert!(check_xml("<svg x=\"1></svg>").is_err());
    }

    #[test]
    fn test_svg_is_well_formed_with_three_lanes_and_legend() {
        let svg = render_svg(&sample(), &SvgOptions::default());
        let tags = check_xml(&svg).unwrap();
        assert_eq!(tags[0], "svg");
        for lane in ["L0", "L1", "L2"] {
            assert!(
                svg.contains(&format!("text-anchor=\"end\">{lane}</text>")),
                "lane {lane}"
            );
        }
        // 12 run boxes, 3 exit ticks, 2 reflection arrows.
        assert_eq!(svg.matches("<title>L2: L2 runs").count(), 3);
        assert_eq!(svg.matches("stroke-width=\"2\"><title>").count(), 3);
        assert_eq!(
            svg.matches("marker-end=\"url(#arrowhead)\"><title>")
                .count(),
            2
        );
        assert!(svg.contains("L1 set &quot;HLT exiting&quot;"));
        assert!(svg.contains("reflection L2 to L1"));
        assert!(svg.contains(">10 µs</text>"), "axis ticks");
    }

    #[test]
    fn test_json_to_svg_round_trip_matches_direct_rendering() {
        let tl = sample();
        let dir = std::env::temp_dir().join(format!("l0-timeline-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let json = dir.join("t.json");
        let svg = dir.join("t.svg");
        write_chrome_trace(&tl, &json).unwrap();
        timeline_svg_command(&json, &svg, &SvgOptions::default()).unwrap();
        let from_file = std::fs::read_to_string(&svg).unwrap();
        let back =
            Timeline::from_chrome_trace_json(&std::fs::read_to_string(&json).unwrap()).unwrap();
        assert_eq!(from_file, render_svg(&back, &SvgOptions::default()));
        check_xml(&from_file).unwrap();
        let missing = timeline_svg_command(&dir.join("nope.json"), &svg, &SvgOptions::default())
            .unwrap_err()
            .to_string();
        assert!(missing.starts_with("cannot read "), "{missing}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn test_svg_window_draws_only_what_is_inside() {
        let opts = SvgOptions {
            start_ns: Some(11_000),
            end_ns: Some(15_000),
            ..SvgOptions::default()
        };
        let svg = render_svg(&sample(), &opts);
        check_xml(&svg).unwrap();
        // One exit (12 µs) and one arrow (12 -> 14 µs) fall inside.
        assert_eq!(svg.matches("stroke-width=\"2\"><title>").count(), 1);
        assert_eq!(
            svg.matches("marker-end=\"url(#arrowhead)\"><title>")
                .count(),
            1
        );
    }

    #[test]
    fn test_empty_timeline_renders() {
        let svg = render_svg(&Timeline::new(), &SvgOptions::default());
        check_xml(&svg).unwrap();
        let back =
            Timeline::from_chrome_trace_json(&Timeline::new().to_chrome_trace_json()).unwrap();
        assert_eq!(back, Timeline::new());
    }

    #[test]
    fn test_labels_are_escaped() {
        let mut tl = Timeline::new();
        tl.run(Track::L0, 0, 10, "a<b & \"c\"\u{1}");
        let svg = render_svg(&tl, &SvgOptions::default());
        check_xml(&svg).unwrap();
        assert!(svg.contains("a&lt;b &amp; &quot;c&quot; "));
    }

    #[test]
    fn test_tick_step_and_format() {
        assert_eq!(tick_step(25_000, 8), 5_000);
        assert_eq!(tick_step(7, 8), 1);
        assert_eq!(tick_step(1_000_000_000, 8), 200_000_000);
        assert_eq!(format_ns(1_500_000), "1.5 ms");
        assert_eq!(format_ns(250_000), "250 µs");
        assert_eq!(format_ns(40), "40 ns");
        assert_eq!(format_ns(2_000_000_000), "2 s");
    }
}
