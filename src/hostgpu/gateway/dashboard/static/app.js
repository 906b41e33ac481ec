// hostgpu dashboard: one Alpine component over the gateway's /v1 API.
//
// Runs under Alpine's CSP build (no eval): the template only reads properties and calls the
// methods below, and everything shown is set as text (never as markup), because job names,
// arguments, errors and tracebacks are written by whoever submits jobs.
//
// Live updates: a server-sent event stream (/v1/events, read with fetch so the token goes in
// a header, never in a URL) says when something changed; the page then re-reads what it
// shows. A slower periodic refresh covers changes made through other gateways and tells
// when the gateway stops answering.
"use strict";

(function () {
  const TOKEN_KEY = "hostgpu.token";
  const THEME_KEY = "hostgpu.theme";
  const RANGE_KEY = "hostgpu.range";
  const STATES = ["queued", "leased", "running", "succeeded", "failed", "cancelled"];
  const TERMINAL = ["succeeded", "failed", "cancelled"];
  const PAGE = 50;
  const PREVIEW_BYTES = 4096;
  const REFRESH_STREAMING_MS = 5000;   // backstop while the event stream is up
  const REFRESH_POLLING_MS = 2500;     // no event stream: poll
  const RETRY_OFFLINE_MS = 2000;
  const THROUGHPUT_EVERY_MS = 10000;   // the heaviest read: at most this often
  const MIN_GAP_MS = 1500;             // a busy queue's events: at most one read this often
  const DASH = "—";

  class ApiError extends Error {
    constructor(message, status) { super(message); this.status = status; }
  }

  // Kept out of Alpine's reactive state: chart objects and stream handles must not be
  // wrapped in reactive proxies.
  const local = { charts: {}, stream: null, refreshing: false, again: false, lastAttempt: 0, lastThroughput: 0, listening: false, timer: null };

  function sleep(ms) { return new Promise((resolve) => setTimeout(resolve, ms)); }

  // A palette colour as the charts' canvas needs it. The palette is light-dark() pairs, which
  // only a colour property resolves (a custom property reads back as the light-dark() text),
  // so it is read back through a hidden element that inherits the page's colour scheme.
  function cssVar(name) {
    const probe = document.createElement("span");
    probe.hidden = true;
    probe.style.color = `var(${name}, #888)`;
    document.body.append(probe);
    const colour = getComputedStyle(probe).color;
    probe.remove();
    return colour;
  }

  function fmtDuration(seconds) {
    if (seconds === null || seconds === undefined || !isFinite(seconds)) return DASH;
    const s = Math.max(0, seconds);
    if (s < 0.001) return "<1 ms";
    if (s < 1) return `${Math.round(s * 1000)} ms`;
    if (s < 60) return `${s < 10 ? s.toFixed(1) : Math.round(s)} s`;
    if (s < 3600) return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
    if (s < 86400) return `${Math.floor(s / 3600)} h ${Math.round((s % 3600) / 60)} min`;
    return `${Math.floor(s / 86400)} d ${Math.round((s % 86400) / 3600)} h`;
  }

  function toSeconds(value) {
    // The API gives ISO datetimes for jobs and UNIX seconds for workers.
    if (value === null || value === undefined || value === "") return null;
    if (typeof value === "number") return value;
    const ms = Date.parse(value);
    return isNaN(ms) ? null : ms / 1000;
  }

  function bytesText(n) {
    if (n < 1024) return `${n} B`;
    if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KB`;
    return `${(n / 1024 / 1024).toFixed(1)} MB`;
  }

  function prettyJson(value) {
    if (value === undefined) return "";
    try { return JSON.stringify(value, null, 2); } catch (e) { return String(value); }
  }

  document.addEventListener("alpine:init", () => {
    window.Alpine.data("dashboard", () => ({
      // -- sign-in ------------------------------------------------------------------------
      token: "",
      tokenInput: "",
      me: null,
      signInError: "",
      signingIn: false,

      // -- what is shown ------------------------------------------------------------------
      view: "overview",
      stateList: STATES,
      counts: {},
      total: 0,
      workers: [],
      loads: {},
      queues: [],
      queuedTotal: 0,
      throughput: null,
      jobs: [],
      jobsLoading: false,
      jobsError: "",
      nextCursor: null,
      cursors: [],
      cursor: null,
      filters: { state: "", function: "", device: "", worker: "", q: "" },
      jobId: null,
      job: null,
      jobError: "",
      confirming: null,
      acting: false,
      notice: "",

      // -- liveness -----------------------------------------------------------------------
      online: true,
      streaming: false,
      lastUpdated: null,
      lastError: "",
      now: Date.now() / 1000,
      theme: "auto",
      range: "3600",

      init() {
        this.theme = localStorage.getItem(THEME_KEY) || "auto";
        this.range = localStorage.getItem(RANGE_KEY) || "3600";
        this.applyTheme();
        this.route();
        window.addEventListener("hashchange", () => this.route());
        setInterval(() => this.tick(), 1000);
        const saved = sessionStorage.getItem(TOKEN_KEY);
        if (saved) { this.token = saved; this.start(); }
        this.$nextTick(() => {
          const resize = new ResizeObserver(() => this.sizeCharts());
          resize.observe(this.$refs.throughputChart);
          resize.observe(this.$refs.waitChart);
        });
        window.matchMedia("(prefers-color-scheme: dark)")
          .addEventListener("change", () => this.drawCharts());
      },

      // ================================================================ sign in / out
      signedIn() { return !!this.token && !!this.me; },

      async signIn() {
        const candidate = (this.tokenInput || "").trim();
        if (!candidate) { this.signInError = "Paste a token first."; return; }
        this.signingIn = true;
        this.signInError = "";
        this.token = candidate;
        try {
          await this.start();
          if (this.me) this.tokenInput = "";
        } finally {
          this.signingIn = false;
        }
      },

      async start() {
        try {
          const me = await this.api("GET", "/v1/tokens/self");
          if (!["admin", "submit", "read"].includes(me.scope)) {
            this.signOut(`A ${me.scope} token cannot view the dashboard: sign in with a read, submit or admin token.`);
            return;
          }
          this.me = me;
          sessionStorage.setItem(TOKEN_KEY, this.token);
          this.online = true;
          await this.refresh(true);
          this.listen();
        } catch (e) {
          if (e instanceof ApiError && e.status === 401) {
            this.signOut("The gateway refused this token (invalid, expired or revoked).");
          } else if (e instanceof ApiError) {
            this.signOut(e.message);
          } else {
            // Keep a saved token through a gateway restart: retry until it answers.
            this.me = this.me || null;
            this.signInError = `Cannot reach the gateway: ${e.message}`;
            if (!this.me) { this.token = sessionStorage.getItem(TOKEN_KEY) || ""; }
            if (this.token) setTimeout(() => { if (!this.me && this.token) this.start(); }, RETRY_OFFLINE_MS);
          }
        }
      },

      signOut(message) {
        sessionStorage.removeItem(TOKEN_KEY);
        if (local.stream) local.stream.abort();
        this.token = "";
        this.me = null;
        this.signInError = message || "";
        this.job = null;
        this.jobs = [];
      },

      whoName() { return this.me ? this.me.name : ""; },
      whoScope() { return this.me ? this.me.scope : ""; },
      whoTitle() {
        if (!this.me) return "";
        const until = this.me.expires_at ? `expires ${this.when(this.me.expires_at)}` : "does not expire";
        return `Signed in with token ${this.me.id} (${this.me.scope}); it ${until}`;
      },
      canWrite() { return !!this.me && (this.me.scope === "admin" || this.me.scope === "submit"); },
      isAdmin() { return !!this.me && this.me.scope === "admin"; },

      // ================================================================ HTTP
      async api(method, path, body) {
        const headers = { Authorization: `Bearer ${this.token}` };
        const init = { method, headers, cache: "no-store" };
        if (body !== undefined) { headers["Content-Type"] = "application/json"; init.body = JSON.stringify(body); }
        if (window.AbortSignal && AbortSignal.timeout) init.signal = AbortSignal.timeout(15000);
        const response = await fetch(path, init);
        if (!response.ok) {
          let detail = response.statusText;
          try { detail = (await response.json()).detail || detail; } catch (e) { /* not JSON */ }
          if (typeof detail !== "string") detail = JSON.stringify(detail);
          throw new ApiError(detail, response.status);
        }
        return response.status === 204 ? null : response.json();
      },

      // ================================================================ live updates
      async listen() {
        // One stream at a time; it ends after a minute and is opened again.
        if (local.listening) return;
        local.listening = true;
        try {
          while (this.signedIn()) {
            const controller = new AbortController();
            local.stream = controller;
            try {
              const response = await fetch("/v1/events", {
                headers: { Authorization: `Bearer ${this.token}`, Accept: "text/event-stream" },
                cache: "no-store",
                signal: controller.signal,
              });
              if (response.status === 401) { this.signOut("The gateway no longer accepts this token."); return; }
              if (!response.ok || !response.body) throw new Error(`events: HTTP ${response.status}`);
              this.streaming = true;
              const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
              let buffer = "";
              for (;;) {
                const { value, done } = await reader.read();
                if (done) break;
                buffer += value.replace(/\r\n/g, "\n");
                let end;
                while ((end = buffer.indexOf("\n\n")) >= 0) {
                  const block = buffer.slice(0, end);
                  buffer = buffer.slice(end + 2);
                  if (/^event: ?change$/m.test(block)) this.refreshSoon();
                }
              }
            } catch (e) {
              if (controller.signal.aborted) return;
            } finally {
              this.streaming = false;
            }
            // The stream ended: on time (reconnect now) or because the gateway went away
            // (the refresh finds out and raises the banner).
            this.refresh(false);
            await sleep(this.online ? 300 : RETRY_OFFLINE_MS);
          }
        } finally {
          local.listening = false;
        }
      },

      refreshSoon() {
        // Many viewers and a busy queue must not turn every event into a round of reads.
        if (local.timer) return;
        const wait = Math.max(0, local.lastAttempt + MIN_GAP_MS - Date.now());
        local.timer = setTimeout(() => { local.timer = null; this.refresh(false); }, wait);
      },

      tick() {
        this.now = Date.now() / 1000;
        if (!this.signedIn() || document.visibilityState === "hidden") return;
        const every = !this.online ? RETRY_OFFLINE_MS : this.streaming ? REFRESH_STREAMING_MS : REFRESH_POLLING_MS;
        if (Date.now() - local.lastAttempt >= every) this.refresh(false);
      },

      async refresh(force) {
        if (!this.token) return;
        if (local.refreshing) { local.again = true; return; }
        local.refreshing = true;
        local.lastAttempt = Date.now();
        try {
          const wantThroughput = force || this.view === "overview" &&
            Date.now() - local.lastThroughput >= THROUGHPUT_EVERY_MS;
          const reads = [
            this.api("GET", "/v1/jobs/summary"),
            this.api("GET", "/v1/workers"),
            this.api("GET", "/v1/stats/workers?window=300"),
            this.api("GET", "/v1/stats/queues"),
            this.view === "jobs" ? this.loadJobs() : Promise.resolve(),
            this.view === "job" && this.jobId ? this.loadJob() : Promise.resolve(),
            wantThroughput ? this.api("GET", this.throughputPath()) : Promise.resolve(null),
          ];
          const [summary, workers, loads, queues, , , throughput] = await Promise.all(reads);
          this.counts = summary.counts;
          this.total = summary.total;
          this.workers = workers.workers;
          const byId = {};
          for (const load of loads.workers) byId[load.worker_id] = load;
          this.loads = byId;
          this.queues = queues.queues;
          this.queuedTotal = queues.queued;
          if (throughput) {
            this.throughput = throughput;
            local.lastThroughput = Date.now();
            this.drawCharts();
          }
          this.online = true;
          this.lastError = "";
          this.lastUpdated = Date.now() / 1000;
        } catch (e) {
          if (e instanceof ApiError && e.status === 401) {
            this.signOut("The gateway no longer accepts this token (revoked or expired).");
          } else if (e instanceof ApiError) {
            this.online = true;
            this.notice = e.message;
          } else {
            this.online = false;
            this.lastError = e.message || String(e);
          }
        } finally {
          local.refreshing = false;
          if (local.again) { local.again = false; setTimeout(() => this.refresh(false), 250); }
        }
      },

      liveClass() { return !this.online ? "off" : this.streaming ? "on" : "poll"; },
      liveText() { return !this.online ? "offline" : this.streaming ? "live" : "polling"; },
      liveTitle() {
        if (!this.online) return "The gateway does not answer; retrying every 2 s";
        return this.streaming
          ? "Updates arrive as jobs change (server-sent events)"
          : "Reading every few seconds (the event stream is reconnecting)";
      },
      updatedText() {
        return this.lastUpdated ? `updated ${this.clock(this.lastUpdated)}` : "loading…";
      },
      offlineText() {
        const since = this.lastUpdated ? `What you see is from ${this.clock(this.lastUpdated)}` : "Nothing loaded yet";
        const why = this.lastError ? ` (${this.lastError})` : "";
        return `${since}; retrying every 2 s${why}. Is the gateway running?`;
      },

      // ================================================================ routing
      route() {
        const hash = location.hash.replace(/^#\/?/, "");
        const [path, query] = hash.split("?");
        const parts = path.split("/").filter(Boolean);
        this.confirming = null;
        if (parts[0] === "jobs" && parts[1]) {
          this.view = "job";
          if (this.jobId !== parts[1]) { this.job = null; this.jobError = ""; }
          this.jobId = parts[1];
          if (this.token) this.loadJob();
          return;
        }
        if (parts[0] === "jobs") {
          this.view = "jobs";
          if (query !== undefined) {
            const params = new URLSearchParams(query);
            this.filters = {
              state: params.get("state") || "",
              function: params.get("function") || "",
              device: params.get("device") || "",
              worker: params.get("worker") || "",
              q: params.get("id") || "",
            };
            this.cursors = [];
            this.cursor = null;
          }
          if (this.token) this.loadJobs();
          return;
        }
        this.view = parts[0] === "fleet" ? "fleet" : "overview";
        if (this.view === "overview" && this.token) this.$nextTick(() => this.drawCharts());
      },
      tabClass(name) {
        const active = this.view === name || (name === "jobs" && this.view === "job");
        return active ? "active" : "";
      },

      // ================================================================ overview
      countOf(state) { return this.counts[state] === undefined ? 0 : this.counts[state]; },
      totalText() { return `${this.total} job${this.total === 1 ? "" : "s"} in the store`; },
      queuedText() {
        return this.queuedTotal ? `${this.queuedTotal} job${this.queuedTotal === 1 ? "" : "s"}` : "";
      },
      oldestText(queue) {
        if (queue.oldest_wait_s === null || queue.oldest_wait_s === undefined) {
          return "all waiting out a retry backoff";
        }
        return `oldest waiting ${fmtDuration(queue.oldest_wait_s)}`;
      },
      fnCountText(f) {
        const delayed = f.delayed ? `, ${f.delayed} in retry backoff` : "";
        return `${f.queued} queued${delayed}`;
      },
      whyText(f) {
        return f.waiting ? f.waiting : "runnable: a live worker fits and takes them when it has a free slot";
      },
      segments(text) {
        // `command` spans in reasons and fixes, shown as code (as text, never as markup).
        return String(text || "").split("`").map((part, i) => ({ text: part, code: i % 2 === 1 })).filter((p) => p.text);
      },
      fleetSummary() {
        const live = this.liveWorkers().length;
        const dead = this.deadWorkers().length;
        const running = Object.values(this.loads).reduce((n, l) => n + l.running, 0);
        const parts = [`${live} live worker${live === 1 ? "" : "s"}`, `${running} job${running === 1 ? "" : "s"} active`];
        if (dead) parts.push(`${dead} stopped or lost`);
        return parts.join(" · ");
      },
      deviceKinds() {
        const seen = {};
        for (const w of this.liveWorkers()) {
          for (const d of w.capabilities.devices) {
            const key = `${d.kind}|${d.name}`;
            if (!seen[key]) seen[key] = { key, kind: d.kind, name: d.name, workers: 0 };
            seen[key].workers += 1;
          }
        }
        return Object.values(seen)
          .sort((a, b) => (a.kind === "cpu") - (b.kind === "cpu") || a.name.localeCompare(b.name))
          .map((k) => ({ ...k, countText: `on ${k.workers} worker${k.workers === 1 ? "" : "s"}` }));
      },
      throughputTotals() {
        const t = this.throughput;
        if (!t) return "";
        return `Last ${this.rangeName()}: ${t.succeeded} succeeded, ${t.failed} failed, ${t.cancelled} cancelled.`;
      },
      // window → bucket: about 60 points whatever the range
      bucketOf(range) { return { 900: 15, 3600: 60, 21600: 300, 86400: 900 }[range] || 60; },
      throughputPath() {
        return `/v1/stats/throughput?window=${this.range}&bucket=${this.bucketOf(this.range)}`;
      },
      rangeName() { return { 900: "15 min", 3600: "hour", 21600: "6 hours", 86400: "24 hours" }[this.range] || "hour"; },
      bucketName() {
        const b = this.bucketOf(this.range);
        return b < 60 ? `${b} s` : b === 60 ? "minute" : `${b / 60} min`;
      },
      async changeRange() {
        localStorage.setItem(RANGE_KEY, this.range);
        try {
          this.throughput = await this.api("GET", this.throughputPath());
          local.lastThroughput = Date.now();
          this.drawCharts();
        } catch (e) { this.handleError(e); }
      },

      // -- charts (uPlot) ------------------------------------------------------------------
      chartSeries() {
        const t = this.throughput;
        const xs = [], ok = [], bad = [], avg = [], max = [];
        if (!t) return { xs, ok, bad, avg, max };
        const byStart = {};
        for (const b of t.buckets) byStart[Math.round(b.start)] = b;
        const end = Date.now() / 1000;
        // Complete buckets only: the one under way would read as a dip.
        for (let start = t.since; start + t.bucket_s <= end; start += t.bucket_s) {
          const b = byStart[Math.round(start)];
          xs.push(start);
          const perMinute = 60 / t.bucket_s;
          ok.push(b ? b.succeeded * perMinute : 0);
          bad.push(b ? b.failed * perMinute : 0);
          avg.push(b && b.wait_avg_s !== null ? b.wait_avg_s : null);
          max.push(b && b.wait_max_s !== null ? b.wait_max_s : null);
        }
        return { xs, ok, bad, avg, max };
      },

      drawCharts() {
        if (!window.uPlot || !this.throughput) return;
        const tp = this.$refs.throughputChart, wc = this.$refs.waitChart;
        if (!tp || !wc || tp.clientWidth === 0) return; // hidden: drawn when shown
        const s = this.chartSeries();
        const axis = cssVar("--muted"), grid = cssVar("--line");
        // The units are in each chart's title; the y axis is sized for "750 ms".
        const axes = (fmt) => [
          { stroke: axis, grid: { stroke: grid, width: 1 }, ticks: { stroke: grid } },
          { stroke: axis, grid: { stroke: grid, width: 1 }, ticks: { stroke: grid }, size: 60, values: fmt },
        ];
        const size = (el) => ({ width: Math.max(200, el.clientWidth), height: 200 });
        for (const name of ["throughput", "wait"]) {
          if (local.charts[name]) { local.charts[name].destroy(); delete local.charts[name]; }
        }
        local.charts.throughput = new window.uPlot({
          ...size(tp),
          scales: { x: { time: true }, y: { range: (u, lo, hi) => [0, Math.max(1, hi)] } },
          axes: axes((u, vals) => vals.map((v) => (Number.isInteger(v) ? v : v.toFixed(1)))),
          series: [
            {},
            { label: "succeeded", stroke: cssVar("--succeeded"), fill: cssVar("--succeeded-bg"), width: 1.5, points: { show: false } },
            { label: "failed", stroke: cssVar("--failed"), width: 1.5, points: { show: false } },
          ],
          legend: { live: false },
        }, [s.xs, s.ok, s.bad], tp);
        local.charts.wait = new window.uPlot({
          ...size(wc),
          scales: { x: { time: true }, y: { range: (u, lo, hi) => [0, Math.max(0.01, (hi || 0) * 1.1)] } },
          axes: axes((u, vals) => vals.map((v) => fmtDuration(v))),
          series: [
            {},
            { label: "mean", stroke: cssVar("--running"), width: 1.5, points: { size: 5 } },
            { label: "longest", stroke: cssVar("--queued"), width: 1, dash: [4, 3], points: { size: 5 } },
          ],
          legend: { live: false },
        }, [s.xs, s.avg, s.max], wc);
      },

      sizeCharts() {
        for (const [name, chart] of Object.entries(local.charts)) {
          const el = name === "throughput" ? this.$refs.throughputChart : this.$refs.waitChart;
          if (el && el.clientWidth > 0) chart.setSize({ width: el.clientWidth, height: 200 });
        }
        if (!local.charts.throughput) this.drawCharts();
      },

      // ================================================================ fleet
      liveWorkers() { return this.workers.filter((w) => w.alive); },
      deadWorkers() { return this.workers.filter((w) => !w.alive); },
      deadSummary() {
        const n = this.deadWorkers().length;
        return `${n} stopped or lost worker${n === 1 ? "" : "s"}`;
      },
      hostLine(w) {
        const c = w.capabilities;
        const host = c.hostname && c.hostname !== c.name ? `on ${c.hostname}` : "";
        const version = c.version ? `hostgpu ${c.version}` : "";
        const serves = c.serves === "models" ? "shared machine: model engines only" : "";
        return [host, version, serves, `up since ${this.clock(w.registered_at)}`].filter(Boolean).join(" · ");
      },
      deviceDetail(d) {
        const parts = [];
        if (d.memory_bytes) parts.push(`${(d.memory_bytes / 1024 ** 3).toFixed(d.memory_bytes >= 10 * 1024 ** 3 ? 0 : 1)} GB`);
        if (d.compute_capability) parts.push(`sm ${d.compute_capability}`);
        if (d.index !== null && d.index !== undefined && d.kind === "cuda") parts.push(`cuda:${d.index}`);
        return parts.join(" · ");
      },
      unavailable(w) {
        return Object.entries(w.capabilities.unavailable || {}).map(([kind, reason]) => ({ kind, reason }));
      },
      runningOf(w) { const l = this.loads[w.id]; return l ? l.running : 0; },
      perMinuteOf(w) {
        const l = this.loads[w.id];
        if (!l) return "0";
        return l.per_minute >= 10 ? String(Math.round(l.per_minute)) : l.per_minute.toFixed(1);
      },
      functionCount(w) { return String(Object.keys(w.capabilities.functions || {}).length); },
      loadPct(w) {
        return Math.min(100, Math.round((100 * this.runningOf(w)) / Math.max(1, w.capabilities.concurrency)));
      },
      loadClass(w) { return this.loadPct(w) >= 100 ? "full" : ""; },
      labelList(w) { return Object.entries(w.capabilities.labels || {}).map(([k, v]) => `${k}=${v}`); },
      deviceSummary(w) {
        return w.capabilities.devices.map((d) => (d.kind === "cpu" ? "cpu" : `${d.kind} ${d.name}`)).join(", ") || DASH;
      },
      workerName(id) {
        if (!id) return DASH;
        const w = this.workers.find((x) => x.id === id);
        return w ? w.capabilities.name : id.slice(0, 8);
      },

      // ================================================================ jobs
      jobsQuery() {
        const params = new URLSearchParams({ limit: String(PAGE) });
        const f = this.filters;
        if (f.state) params.set("state", f.state);
        if (f.function.trim()) params.set("function", f.function.trim());
        if (f.device.trim()) params.set("device", f.device.trim());
        if (f.worker) params.set("worker", f.worker);
        if (f.q.trim()) params.set("id_prefix", f.q.trim().toLowerCase());
        if (this.cursor) params.set("cursor", this.cursor);
        return params.toString();
      },
      async loadJobs() {
        const q = this.filters.q.trim();
        if (q && !/^[0-9a-fA-F]{1,32}$/.test(q)) {
          this.jobsError = "Job ids are hexadecimal (0-9, a-f): type the first few characters of one.";
          this.jobs = [];
          this.nextCursor = null;
          return;
        }
        this.jobsLoading = true;
        try {
          const page = await this.api("GET", `/v1/jobs?${this.jobsQuery()}`);
          this.jobs = page.jobs;
          this.nextCursor = page.next_cursor;
          this.jobsError = "";
        } catch (e) {
          if (e instanceof ApiError && e.status !== 401) { this.jobsError = e.message; this.jobs = []; }
          else throw e;
        } finally {
          this.jobsLoading = false;
        }
      },
      applyFilters() {
        this.cursors = [];
        this.cursor = null;
        const params = new URLSearchParams();
        for (const [k, v] of Object.entries(this.filters)) if (v) params.set(k === "q" ? "id" : k, v);
        const hash = `#/jobs${params.toString() ? "?" + params.toString() : ""}`;
        if (location.hash !== hash) history.replaceState(null, "", hash);
        this.loadJobs().catch((e) => this.handleError(e));
      },
      clearFilters() { this.filters = { state: "", function: "", device: "", worker: "", q: "" }; this.applyFilters(); },
      hasFilters() { return Object.values(this.filters).some(Boolean); },
      olderPage() {
        if (!this.nextCursor) return;
        this.cursors.push(this.cursor);
        this.cursor = this.nextCursor;
        this.loadJobs().catch((e) => this.handleError(e));
      },
      newerPage() {
        if (!this.cursors.length) return;
        this.cursor = this.cursors.pop();
        this.loadJobs().catch((e) => this.handleError(e));
      },
      pageText() {
        const first = this.cursors.length * PAGE + 1;
        if (!this.jobs.length) return "";
        return `${first}–${first + this.jobs.length - 1}`;
      },
      noJobsText() { return this.hasFilters() ? "No job matches these filters." : "No jobs yet. Submit one with hostgpu submit, or from Python with f.remote()."; },
      knownFunctions() {
        const names = new Set();
        for (const w of this.workers) for (const f of Object.keys(w.capabilities.functions || {})) names.add(f);
        return [...names].sort();
      },
      knownDevices() {
        const names = new Set(["cpu"]);
        for (const w of this.workers) for (const d of w.capabilities.devices) {
          names.add(d.kind === "cuda" ? `cuda:${d.index || 0}` : d.kind === "mlx" ? "mps" : d.kind);
        }
        return [...names].sort();
      },
      moduleOf(fn) { return fn.split(":")[0]; },
      nameOf(fn) { const i = fn.indexOf(":"); return i < 0 ? fn : fn.slice(i + 1); },
      deviceText(j) {
        // Where it ran (or, before it ran, what it needs); the requirement is in the detail.
        if (!j.device) return `needs ${this.requirementText(j)}`;
        return j.fallback_used ? `${j.device} (cpu fallback)` : j.device;
      },
      requirementText(j) {
        const r = j.requirements || {};
        const parts = [r.gpu || "any"];
        if (r.min_memory_gb) parts.push(`≥${r.min_memory_gb} GB`);
        for (const [k, v] of Object.entries(r.labels || {})) parts.push(`${k}=${v}`);
        return parts.join(" ");
      },
      tookText(j) {
        const t = j.timings || {};
        if (t.run_s !== undefined && t.run_s !== null) return fmtDuration(t.run_s);
        const created = toSeconds(j.created_at), finished = toSeconds(j.finished_at);
        if (finished && created) return fmtDuration(finished - created);
        if (!TERMINAL.includes(j.state) && created) return `${fmtDuration(this.now - created)} so far`;
        return DASH;
      },
      noteText(j) {
        if (j.state === "queued" && j.waiting) return j.waiting;
        if (j.state === "failed" && j.error) return `${j.error.type}: ${j.error.message}`.slice(0, 300);
        return "";
      },

      // ================================================================ job detail
      async loadJob() {
        if (!this.jobId) return;
        const wanted = this.jobId;
        try {
          const job = await this.api("GET", `/v1/jobs/${encodeURIComponent(wanted)}`);
          if (this.jobId === wanted) { this.job = job; this.jobError = ""; }
        } catch (e) {
          if (e instanceof ApiError && e.status !== 401) {
            this.jobError = e.status === 422 ? `“${wanted}” is not a job id.` : e.message;
            this.job = null;
          } else {
            throw e;
          }
        }
      },
      when(value) {
        const s = toSeconds(value);
        if (s === null) return DASH;
        return new Date(s * 1000).toLocaleString();
      },
      clock(value) {
        const s = toSeconds(value);
        return s === null ? DASH : new Date(s * 1000).toLocaleTimeString();
      },
      ago(value) {
        const s = toSeconds(value);
        if (s === null) return DASH;
        const d = this.now - s;
        if (d < 2) return "just now";
        return `${fmtDuration(d).replace(/\.\d s$/, " s")} ago`;
      },
      orDash(v) { return v === null || v === undefined || v === "" ? DASH : String(v); },
      orBlank(v) { return v === null || v === undefined ? "" : String(v); },
      attemptsText(j) {
        const parts = [`${j.attempts} leased`, `${j.failures} failed of ${j.max_retries + 1} allowed`];
        if (j.lost) parts.push(`${j.lost} lost lease${j.lost === 1 ? "" : "s"}`);
        return parts.join(" · ");
      },
      limitsText(j) { return `${j.priority} · ${fmtDuration(j.timeout_s)}`; },
      errorType(j) { return j.error ? `${j.error.type}:` : ""; },
      errorMessage(j) { return j.error ? j.error.message : ""; },
      errorKind(j) { return j.error ? j.error.kind : ""; },
      errorTitle(j) {
        if (j.state === "cancelled") return "Cancelled";
        return j.state === "failed" ? "Error" : "Last error (it will be retried)";
      },
      errorClass(j) { return j.state === "failed" ? "error-card" : "error-card soft"; },
      tracebackOf(j) { return j.error && j.error.traceback ? j.error.traceback : ""; },
      historyOf(j) { return j.history || []; },
      lastOpen(a) {
        // The attempt a finished job ended in, when the store left it open (a cancel).
        return !a.outcome && !!this.job && TERMINAL.includes(this.job.state) && a.attempt === this.job.attempts;
      },
      outcomeOf(a) {
        if (a.outcome) return a.outcome;
        if (this.lastOpen(a)) return this.job.state;
        return a.finished_at ? "finished" : "running";
      },
      attemptTook(a) {
        const start = toSeconds(a.started_at);
        const end = toSeconds(a.finished_at) || (this.lastOpen(a) ? toSeconds(this.job.finished_at) : null);
        if (start === null) return DASH;
        return end === null ? `${fmtDuration(this.now - start)} so far` : fmtDuration(end - start);
      },
      capped(value) {
        const text = prettyJson(value);
        if (text === undefined || text === "") return DASH;
        if (text.length <= PREVIEW_BYTES) return text;
        return `${text.slice(0, PREVIEW_BYTES)}\n… ${bytesText(text.length - PREVIEW_BYTES)} more (hostgpu job ${this.job.id.slice(0, 12)} --json shows all)`;
      },
      sizeNote(value) {
        const text = prettyJson(value) || "";
        return text.length > PREVIEW_BYTES ? `${bytesText(text.length)}, first ${bytesText(PREVIEW_BYTES)} shown` : "";
      },
      argsText(j) {
        if (j.serializer === "pickle") return "(pickled arguments: not shown)";
        if (j.payload === null || j.payload === undefined) return "(no arguments)";
        return this.capped(j.payload);
      },
      argsNote(j) { return j.serializer === "pickle" ? "" : this.sizeNote(j.payload); },

      // -- actions -------------------------------------------------------------------------
      canCancel() { return !!this.job && !TERMINAL.includes(this.job.state) && this.canWrite(); },
      canRerun() { return !!this.job && ["failed", "cancelled"].includes(this.job.state) && this.isAdmin(); },
      canRequeue() { return !!this.job && ["leased", "running"].includes(this.job.state) && this.isAdmin(); },
      actionsAvailable() { return this.canCancel() || this.canRerun() || this.canRequeue(); },
      confirm(action) { this.confirming = action; },
      confirmText() {
        return {
          cancel: "Cancel this job? A running job is stopped at its worker's next heartbeat.",
          rerun: "Run this job again, with its retries reset?",
          requeue: "Take this job back from its worker and queue it again?",
        }[this.confirming] || "";
      },
      async act() {
        const action = this.confirming;
        if (!action || !this.job) return;
        this.acting = true;
        try {
          this.job = await this.api("POST", `/v1/jobs/${this.job.id}/${action}`);
          this.notice = { cancel: "Job cancelled.", rerun: "Job queued again.", requeue: "Job taken back and queued again." }[action];
          await this.loadJob();
        } catch (e) {
          this.handleError(e);
        } finally {
          this.acting = false;
          this.confirming = null;
        }
      },
      handleError(e) {
        if (e instanceof ApiError && e.status === 401) this.signOut("The gateway no longer accepts this token.");
        else if (e instanceof ApiError) this.notice = e.message;
        else { this.online = false; this.lastError = e.message || String(e); }
      },

      // ================================================================ theme
      applyTheme() {
        if (this.theme === "auto") delete document.documentElement.dataset.theme;
        else document.documentElement.dataset.theme = this.theme;
      },
      cycleTheme() {
        this.theme = { auto: "light", light: "dark", dark: "auto" }[this.theme] || "auto";
        localStorage.setItem(THEME_KEY, this.theme);
        this.applyTheme();
        this.$nextTick(() => this.drawCharts());
      },
      themeIcon() { return { auto: "◐", light: "☀", dark: "☾" }[this.theme]; },
      themeTitle() { return "Colour theme: follows the system (auto), light or dark"; },
    }));
  });
})();
