// solarfleet dashboard: renders the collector's fleet API (/api/v1) into #view.
//
// Routes live in the URL fragment: "#/" is the fleet, "#/installations/7" an
// installation, "#/installations/7/2025-12-04" one of its days. A fragment parameter
// "key=..." is stored in localStorage and removed from the address bar. Browsers never
// send the fragment to the server, so the key stays out of its logs.
"use strict";

const KEY_STORAGE = "solarfleet.apiKey";
const REFRESH_MS = 30000;
const STATES = ["online", "sleeping", "offline", "faulted"];
const SVG_NS = "http://www.w3.org/2000/svg";
const ENERGY_DAYS = 14;

const view = document.getElementById("view");
const filters = { text: "", status: "" };
let refreshTimer = null;
let rendering = 0;

// ---- API key ----

function takeKeyFromFragment() {
  const hash = location.hash.replace(/^#/, "");
  const parts = hash.split(/[&?]/);
  const keyPart = parts.find((part) => part.startsWith("key="));
  if (!keyPart) return;
  localStorage.setItem(KEY_STORAGE, decodeURIComponent(keyPart.slice(4)));
  const route = parts.filter((part) => part && !part.startsWith("key=")).join("&");
  history.replaceState(null, "", location.pathname + "#" + (route || "/"));
}

function apiKey() {
  return localStorage.getItem(KEY_STORAGE) || "";
}

function setUpKeyForm() {
  const form = document.getElementById("key-form");
  const input = document.getElementById("key-input");
  input.value = apiKey();
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    localStorage.setItem(KEY_STORAGE, input.value.trim());
    render();
  });
  document.getElementById("key-forget").addEventListener("click", () => {
    localStorage.removeItem(KEY_STORAGE);
    input.value = "";
    render();
  });
}

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function api(path) {
  const response = await fetch(path, {
    headers: { Authorization: "Bearer " + apiKey() },
  });
  let body = null;
  try {
    body = await response.json();
  } catch (err) {
    body = null;
  }
  if (!response.ok) {
    const message = body && body.error ? body.error : response.statusText;
    throw new ApiError(response.status, `${path}: ${response.status} ${message}`);
  }
  return body;
}

// ---- DOM helpers ----

function el(tag, attributes, ...children) {
  const node = document.createElement(tag);
  setAttributes(node, attributes);
  appendChildren(node, children);
  return node;
}

function svg(tag, attributes, ...children) {
  const node = document.createElementNS(SVG_NS, tag);
  setAttributes(node, attributes);
  appendChildren(node, children);
  return node;
}

function setAttributes(node, attributes) {
  for (const [name, value] of Object.entries(attributes || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : String(value));
  }
}

function appendChildren(node, children) {
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : String(child));
  }
}

// A device whose TCP connect is refused is switched off or its port is held, so its
// badge has the offline colour, as the fleet API counts it.
const STATE_COLOURS = { refused: "offline" };

function stateBadge(state) {
  const known = STATES.includes(state) ? state : STATE_COLOURS[state] || "faulted";
  return el("span", { class: `badge state-${known}` }, state || "unknown");
}

// ---- formatting ----

function formatPower(watts) {
  if (watts === null || watts === undefined) return "–";
  if (Math.abs(watts) >= 1e6) return (watts / 1e6).toFixed(2) + " MW";
  if (Math.abs(watts) >= 1e3) return (watts / 1e3).toFixed(2) + " kW";
  return Math.round(watts) + " W";
}

function formatEnergy(wattHours) {
  if (wattHours === null || wattHours === undefined) return "–";
  if (Math.abs(wattHours) >= 1e6) return (wattHours / 1e6).toFixed(2) + " MWh";
  if (Math.abs(wattHours) >= 1e3) return (wattHours / 1e3).toFixed(2) + " kWh";
  return Math.round(wattHours) + " Wh";
}

function formatValue(value, unit) {
  if (value === null || value === undefined) return "–";
  const text = Number.isInteger(value) ? String(value) : value.toPrecision(6);
  return unit ? `${Number(text)} ${unit}` : String(Number(text));
}

function formatTime(ms, timeZone) {
  if (ms === null || ms === undefined) return "never";
  const options = { dateStyle: "medium", timeStyle: "short" };
  if (timeZone) options.timeZone = timeZone;
  return new Intl.DateTimeFormat("en-GB", options).format(new Date(ms));
}

function formatAge(ms) {
  if (ms === null || ms === undefined) return "never";
  const seconds = Math.max(0, Math.round((Date.now() - ms) / 1000));
  if (seconds < 90) return `${seconds} s ago`;
  if (seconds < 5400) return `${Math.round(seconds / 60)} min ago`;
  if (seconds < 172800) return `${Math.round(seconds / 3600)} h ago`;
  return `${Math.round(seconds / 86400)} days ago`;
}

function hourMinute(ms, timeZone) {
  return new Intl.DateTimeFormat("en-GB", {
    hour: "2-digit", minute: "2-digit", hourCycle: "h23", timeZone,
  }).format(new Date(ms));
}

function localDate(ms, timeZone) {
  // en-CA formats a date as YYYY-MM-DD.
  return new Intl.DateTimeFormat("en-CA", {
    year: "numeric", month: "2-digit", day: "2-digit", timeZone,
  }).format(new Date(ms));
}

function addDays(isoDate, days) {
  const date = new Date(isoDate + "T00:00:00Z");
  date.setUTCDate(date.getUTCDate() + days);
  return date.toISOString().slice(0, 10);
}

// The status of an installation from its device counts: its worst device state.
function installationStatus(devices) {
  const counts = devices || {};
  if (counts.faulted) return "faulted";
  if (counts.offline) return "offline";
  if (counts.online) return "online";
  if (counts.sleeping) return "sleeping";
  return "offline";
}

// ---- fleet view ----

async function renderFleet() {
  const [fleet, list, alerts] = await Promise.all([
    api("/api/v1/fleet"),
    api("/api/v1/installations"),
    api("/api/v1/alerts?state=open"),
  ]);
  const names = new Map(list.installations.map((item) => [item.id, item.name]));
  const tableBody = el("tbody");
  const counter = el("span", { class: "count" });
  const section = el("section", {},
    el("h1", {}, "Fleet"),
    missingBanner([...(fleet.missing || []), ...(list.missing || [])]),
    fleetTotals(fleet),
    el("div", { class: "card" },
      fleetFilters(() => fillFleetTable(tableBody, counter, list.installations)),
      el("table", { class: "fleet", id: "fleet-table" },
        el("thead", {}, el("tr", {},
          ["Status", "Installation", "Shard", "Devices", "Power", "Energy today",
            "Last seen", "Alerts"].map((title) => el("th", {}, title)))),
        tableBody),
      counter),
    alertsSection("Open alerts", alerts.alerts, names),
  );
  fillFleetTable(tableBody, counter, list.installations);
  return section;
}

function fleetTotals(fleet) {
  const devices = fleet.devices || {};
  const chips = STATES.map((state) =>
    el("span", { class: `chip state-${state}` }, `${devices[state] || 0} ${state}`));
  return el("div", { class: "totals", id: "fleet-totals" },
    total("Installations", fleet.installations),
    total("Power now", formatPower(fleet.power_w)),
    total("Energy today", formatEnergy(fleet.energy_today_wh)),
    el("div", { class: "total devices" }, el("span", { class: "label" }, "Devices"),
      el("span", { class: "chips" }, chips)),
    total("Open alerts", fleet.open_alerts, fleet.open_alerts ? "alerting" : ""),
  );
}

function total(label, value, extraClass) {
  return el("div", { class: `total ${extraClass || ""}` },
    el("span", { class: "label" }, label),
    el("span", { class: "value" }, value));
}

function fleetFilters(onChange) {
  const text = el("input", {
    type: "search", id: "filter-text", placeholder: "Filter by name, id or shard",
    value: filters.text,
    oninput: (event) => { filters.text = event.target.value; onChange(); },
  });
  const status = el("select", {
    id: "filter-status",
    onchange: (event) => { filters.status = event.target.value; onChange(); },
  }, el("option", { value: "" }, "any status"),
  STATES.map((state) => el("option", { value: state }, state)));
  status.value = filters.status;
  return el("div", { class: "filters" }, text, status);
}

function fillFleetTable(tableBody, counter, installations) {
  const needle = filters.text.trim().toLowerCase();
  const shown = installations.filter((item) => {
    const haystack = `${item.name} ${item.id} ${item.shard}`.toLowerCase();
    if (needle && !haystack.includes(needle)) return false;
    return !filters.status || installationStatus(item.devices) === filters.status;
  });
  tableBody.replaceChildren(...shown.map(fleetRow));
  counter.textContent = `${shown.length} of ${installations.length} installations`;
}

function fleetRow(item) {
  const status = installationStatus(item.devices);
  const devices = item.devices || {};
  const deviceCounts = STATES.filter((state) => devices[state]).map((state) =>
    el("span", { class: `chip state-${state}` }, `${devices[state]} ${state}`));
  return el("tr", { class: `row-${status}`, "data-installation": item.id },
    el("td", {}, stateBadge(status)),
    el("td", {}, el("a", { href: `#/installations/${item.id}` }, item.name)),
    el("td", {}, item.shard),
    el("td", {}, deviceCounts.length ? deviceCounts : "none"),
    el("td", { class: "number" }, formatPower(item.power_w)),
    el("td", { class: "number" }, formatEnergy(item.energy_today_wh)),
    el("td", { title: formatTime(item.last_seen_ms, item.timezone) },
      formatAge(item.last_seen_ms)),
    el("td", { class: item.open_alerts ? "number alerting" : "number" },
      item.open_alerts || 0),
  );
}

function missingBanner(missing) {
  if (!missing.length) return null;
  return el("div", { class: "banner" }, missing.map((entry) =>
    el("p", {}, `${entry.shard} did not answer (${entry.reason}): installations ` +
      `${(entry.installation_ids || []).join(", ")} are left out.`)));
}

function alertsSection(title, alerts, names) {
  const rows = alerts.map((alert) => el("tr", { class: `severity-${alert.severity}` },
    el("td", {}, el("span", { class: `badge severity-${alert.severity}` },
      alert.severity)),
    el("td", {}, el("a", { href: `#/installations/${alert.installation_id}` },
      names.get(alert.installation_id) || `installation ${alert.installation_id}`)),
    el("td", {}, alert.device_id || "–"),
    el("td", {}, alert.kind),
    el("td", {}, alert.message),
    el("td", {}, formatAge(alert.opened_ms)),
  ));
  return el("section", { class: "card", id: "alerts" },
    el("h2", {}, `${title} (${alerts.length})`),
    rows.length
      ? el("table", { class: "alerts" },
        el("thead", {}, el("tr", {}, ["Severity", "Installation", "Device", "Kind",
          "Message", "Opened"].map((name) => el("th", {}, name)))),
        el("tbody", {}, rows))
      : el("p", { class: "quiet" }, "No open alerts."));
}

// ---- installation view ----

async function renderInstallation(id, requestedDate) {
  const installation = await api(`/api/v1/installations/${id}`);
  const timeZone = installation.timezone || "UTC";
  const date = requestedDate || localDate(Date.now(), timeZone);
  const [power, energy, alerts] = await Promise.all([
    api(`/api/v1/installations/${id}/power?date=${date}`),
    api(`/api/v1/installations/${id}/energy/daily?from=` +
      `${addDays(date, 1 - ENERGY_DAYS)}&to=${date}`),
    api(`/api/v1/alerts?state=open&installation_id=${id}`),
  ]);
  const names = new Map([[installation.id, installation.name]]);
  return el("section", {},
    el("p", {}, el("a", { href: "#/" }, "← Fleet")),
    el("h1", {}, installation.name),
    el("p", { class: "meta" },
      `Installation ${installation.id} · ${installation.shard || ""} · ` +
      `time zone ${timeZone} · last seen ${formatTime(installation.last_seen_ms,
        timeZone)}`),
    el("div", { class: "card" },
      el("div", { class: "card-head" },
        el("h2", {}, `AC power on ${date}`),
        el("input", {
          type: "date", id: "day", value: date,
          onchange: (event) => {
            location.hash = `#/installations/${id}/${event.target.value}`;
          },
        })),
      powerChart(power.points, timeZone)),
    el("div", { class: "card" },
      el("h2", {}, `Daily energy, ${ENERGY_DAYS} days to ${date}`),
      energyBars(energy.days, date)),
    devicesSection(installation.devices || [], timeZone),
    alertsSection("Open alerts", alerts.alerts, names),
  );
}

function devicesSection(devices, timeZone) {
  const rows = devices.map((device) => {
    const measures = device.measures || {};
    const dc = (measures.dc_power_w || []).map(formatPower).join(" / ") || "–";
    return el("tr", { "data-device": device.device_id },
      el("td", {}, stateBadge(device.state)),
      el("td", {}, device.name || device.device_id,
        el("div", { class: "quiet" }, [device.manufacturer, device.model]
          .filter(Boolean).join(" "))),
      el("td", {}, device.serial || device.device_id),
      el("td", { class: "number" }, formatPower(measures.ac_power_w)),
      el("td", { class: "number" }, dc),
      el("td", { class: "number" }, formatEnergy(measures.lifetime_energy_wh)),
      el("td", { class: "number" }, formatEnergy(measures.grid_import_wh)),
      el("td", { class: "number" }, formatEnergy(measures.grid_export_wh)),
      el("td", {}, channelsDetails(device.channels || [], timeZone)),
    );
  });
  return el("section", { class: "card", id: "devices" },
    el("h2", {}, `Devices (${devices.length})`),
    el("table", { class: "devices" },
      el("thead", {}, el("tr", {}, ["State", "Device", "Serial", "AC power",
        "DC power", "Lifetime energy", "Grid import", "Grid export", "Channels"]
        .map((name) => el("th", {}, name)))),
      el("tbody", {}, rows)));
}

function channelsDetails(channels, timeZone) {
  if (!channels.length) return "none";
  return el("details", {},
    el("summary", {}, `${channels.length} channels`),
    el("table", { class: "channels" }, el("tbody", {}, channels.map((channel) =>
      el("tr", {},
        el("td", {}, channel.name),
        el("td", { class: "number" }, formatValue(channel.value, channel.unit)),
        el("td", { class: "quiet" }, formatTime(channel.time_ms, timeZone)))))));
}

// ---- charts (inline SVG) ----

const CHART = { width: 860, height: 260, left: 64, right: 16, top: 12, bottom: 28 };

// Format axis ticks from 0 to `top` in the unit that fits `top` (W, kW, MW), with
// as many decimals as the tick step needs.
function tickFormatter(top, unit) {
  let scale = 1;
  let prefix = "";
  if (top >= 1e6) {
    scale = 1e6;
    prefix = "M";
  } else if (top >= 1e3) {
    scale = 1e3;
    prefix = "k";
  }
  const step = top / 4 / scale;
  let decimals = 0;
  const fraction = (digits) => {
    const shifted = step * 10 ** digits;
    return Math.abs(shifted - Math.round(shifted));
  };
  while (decimals < 3 && fraction(decimals) > 1e-9) decimals += 1;
  return (value) => `${(value / scale).toFixed(decimals)} ${prefix}${unit}`;
}

function niceMax(value) {
  if (!(value > 0)) return 1;
  const magnitude = 10 ** Math.floor(Math.log10(value));
  const step = [1, 2, 2.5, 5, 10].find((factor) => factor * magnitude >= value);
  return step * magnitude;
}

function powerChart(points, timeZone) {
  const values = points.filter((point) => point[1] !== null);
  if (!points.length || !values.length) {
    return el("p", { class: "quiet chart-empty" }, "No power readings on this day.");
  }
  const start = points[0][0];
  const end = points[points.length - 1][0] + 300000;
  const top = niceMax(Math.max(...values.map((point) => point[1])));
  const tick = tickFormatter(top, "W");
  const plotWidth = CHART.width - CHART.left - CHART.right;
  const plotHeight = CHART.height - CHART.top - CHART.bottom;
  const x = (ms) => CHART.left + ((ms - start) / (end - start)) * plotWidth;
  const y = (watts) => CHART.top + plotHeight - (Math.max(watts, 0) / top) * plotHeight;

  const chart = svg("svg", {
    viewBox: `0 0 ${CHART.width} ${CHART.height}`, class: "chart", id: "power-chart",
    role: "img", "aria-label": "AC power over the day",
  });
  for (let i = 0; i <= 4; i += 1) {
    const watts = (top * i) / 4;
    chart.append(
      svg("line", { x1: CHART.left, x2: CHART.width - CHART.right, y1: y(watts),
        y2: y(watts), class: "grid" }),
      svg("text", { x: CHART.left - 6, y: y(watts) + 4, class: "axis",
        "text-anchor": "end" }, tick(watts)));
  }
  for (let ms = start; ms <= end; ms += 3 * 3600000) {
    chart.append(svg("text", { x: x(ms), y: CHART.height - 8, class: "axis",
      "text-anchor": "middle" }, hourMinute(ms, timeZone)));
  }
  for (const run of runsOfValues(points)) {
    const line = run.map((point) => `${x(point[0] + 150000)},${y(point[1])}`);
    const baseline = y(0);
    const first = x(run[0][0] + 150000);
    const last = x(run[run.length - 1][0] + 150000);
    chart.append(
      svg("polygon", { points: `${first},${baseline} ${line.join(" ")} ` +
        `${last},${baseline}`, class: "area" }),
      svg("polyline", { points: line.join(" "), class: "line" }));
    // A lone value between gaps has no line to draw, so it gets a dot.
    if (run.length === 1) {
      chart.append(svg("circle", { cx: first, cy: y(run[0][1]), r: 3, class: "dot" }));
    }
  }
  const peak = values.reduce((best, point) => (point[1] > best[1] ? point : best));
  return el("figure", {}, chart, el("figcaption", { class: "quiet" },
    `Peak ${formatPower(peak[1])} at ${hourMinute(peak[0], timeZone)} ` +
    `(${timeZone}), 5-minute averages.`));
}

// Split points into runs without nulls, so that a gap in the data shows as a gap.
function runsOfValues(points) {
  const runs = [];
  let current = [];
  for (const point of points) {
    if (point[1] === null) {
      if (current.length) runs.push(current);
      current = [];
    } else {
      current.push(point);
    }
  }
  if (current.length) runs.push(current);
  return runs;
}

function energyBars(days, selectedDate) {
  if (!days.some((day) => day.energy_wh)) {
    return el("p", { class: "quiet chart-empty" },
      "No energy recorded in these days.");
  }
  const top = niceMax(Math.max(...days.map((day) => day.energy_wh || 0)));
  const tick = tickFormatter(top, "Wh");
  const plotWidth = CHART.width - CHART.left - CHART.right;
  const plotHeight = CHART.height - CHART.top - CHART.bottom;
  const slot = plotWidth / days.length;
  const y = (wh) => CHART.top + plotHeight - (wh / top) * plotHeight;
  const chart = svg("svg", {
    viewBox: `0 0 ${CHART.width} ${CHART.height}`, class: "chart", id: "energy-chart",
    role: "img", "aria-label": "Energy per day",
  });
  for (let i = 0; i <= 4; i += 1) {
    const wh = (top * i) / 4;
    chart.append(
      svg("line", { x1: CHART.left, x2: CHART.width - CHART.right, y1: y(wh),
        y2: y(wh), class: "grid" }),
      svg("text", { x: CHART.left - 6, y: y(wh) + 4, class: "axis",
        "text-anchor": "end" }, tick(wh)));
  }
  days.forEach((day, index) => {
    const left = CHART.left + index * slot + slot * 0.15;
    const label = svg("text", { x: left + slot * 0.35, y: CHART.height - 8,
      class: "axis", "text-anchor": "middle" }, day.date.slice(5));
    chart.append(label);
    if (day.energy_wh === null || day.energy_wh === undefined) return;
    const classes = day.date === selectedDate ? "bar selected" : "bar";
    chart.append(svg("rect", { x: left, y: y(day.energy_wh), width: slot * 0.7,
      height: y(0) - y(day.energy_wh), class: classes },
    svg("title", {}, `${day.date}: ${formatEnergy(day.energy_wh)}`)));
  });
  return chart;
}

// ---- routing ----

const INSTALLATION_ROUTE = /^#\/installations\/(\d+)(?:\/(\d{4}-\d{2}-\d{2}))?/;

function parseRoute() {
  const match = location.hash.match(INSTALLATION_ROUTE);
  if (match) return { name: "installation", id: match[1], date: match[2] || null };
  return { name: "fleet" };
}

async function render() {
  const ticket = ++rendering;
  if (!apiKey()) {
    view.replaceChildren(el("p", { class: "notice" },
      "Enter an API key above (from `solarfleet-collector keys add NAME`), or open ",
      "this page with #key=<key> at the end of its address."));
    return;
  }
  const route = parseRoute();
  let content;
  try {
    content = route.name === "installation"
      ? await renderInstallation(route.id, route.date)
      : await renderFleet();
  } catch (err) {
    content = errorNotice(err);
  }
  // A slower render that started earlier must not replace a newer one.
  if (ticket !== rendering) return;
  const focus = focusedField();
  view.replaceChildren(content);
  restoreFocus(focus);
  document.getElementById("updated").textContent =
    `Updated ${formatTime(Date.now())}.`;
}

// The refresh replaces the whole view, so the field being typed in (a filter box, the
// date) is found again by its id and gets back its focus and caret.
function focusedField() {
  const field = document.activeElement;
  if (!field || !field.id || !view.contains(field)) return null;
  const caret = typeof field.selectionStart === "number"
    ? [field.selectionStart, field.selectionEnd, field.selectionDirection]
    : null;
  return { id: field.id, caret };
}

function restoreFocus(focus) {
  if (!focus) return;
  const field = document.getElementById(focus.id);
  if (!field || !view.contains(field)) return;
  field.focus({ preventScroll: true });
  // An input of type date has no caret (selectionStart is null), only focus.
  if (focus.caret) field.setSelectionRange(...focus.caret);
}

function errorNotice(err) {
  if (err instanceof ApiError && err.status === 401) {
    return el("p", { class: "notice error" },
      "The API key was not accepted (unknown or revoked): enter a valid key above.");
  }
  if (err instanceof ApiError && err.status === 403) {
    return el("p", { class: "notice error" },
      "This key may not see that installation. ", el("a", { href: "#/" }, "Fleet"));
  }
  return el("p", { class: "notice error" }, `Loading failed: ${err.message}`);
}

function start() {
  takeKeyFromFragment();
  setUpKeyForm();
  window.addEventListener("hashchange", () => {
    takeKeyFromFragment();
    document.getElementById("key-input").value = apiKey();
    render();
  });
  render();
  clearInterval(refreshTimer);
  refreshTimer = setInterval(render, REFRESH_MS);
}

start();
