// stylegen map: a zoomable, pannable canvas of the collection's 2-D layout.
// Data comes inline (<script id="map-data" type="application/json">, the standalone file)
// or from GET /api/map (the served page). No dependencies.
"use strict";

(() => {
  const $ = (s) => document.querySelector(s);
  const canvas = $("#map-canvas");
  const ctx = canvas.getContext("2d");
  const card = $("#map-card");
  const thumb = $("#map-thumb").getContext("2d");
  const inline = document.getElementById("map-data");
  const standalone = Boolean(inline);
  if (standalone) document.body.setAttribute("data-standalone", "");

  let data = null;
  let color = "genre";
  let view = { scale: 1, tx: 0, ty: 0 };
  let hovered = -1;
  let grid = null; // spatial buckets of point indexes, in layout coordinates
  const GRID = 64;
  const sheets = [];

  function params() {
    return new URLSearchParams(window.location.search);
  }

  function size() {
    const r = canvas.getBoundingClientRect();
    const dpr = window.devicePixelRatio || 1;
    if (canvas.width !== Math.round(r.width * dpr) || canvas.height !== Math.round(r.height * dpr)) {
      canvas.width = Math.round(r.width * dpr);
      canvas.height = Math.round(r.height * dpr);
    }
    return { w: r.width, h: r.height, dpr };
  }

  // layout [0,1]² -> CSS pixels of the canvas (y up)
  function base() {
    const { w, h } = size();
    const side = Math.min(w, h) * 0.94;
    return { side, ox: (w - side) / 2, oy: (h - side) / 2 };
  }
  function toScreen(x, y) {
    const b = base();
    return [view.tx + (b.ox + x * b.side) * view.scale, view.ty + (b.oy + (1 - y) * b.side) * view.scale];
  }
  function toLayout(sx, sy) {
    const b = base();
    return [((sx - view.tx) / view.scale - b.ox) / b.side, 1 - ((sy - view.ty) / view.scale - b.oy) / b.side];
  }

  function codes() {
    return color === "predicted" && data.predicted ? data.predicted : data.genre;
  }

  function radius() {
    const n = data.x.length;
    const r = n > 20000 ? 1.6 : n > 5000 ? 2.4 : n > 1000 ? 3.2 : 4.5;
    return Math.min(10, r * Math.sqrt(view.scale));
  }

  function draw() {
    if (!data) return;
    const { w, h, dpr } = size();
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, w, h);
    if (data.bins) drawBins();
    const c = codes();
    const r = radius();
    for (let k = 0; k < data.palette.length; k++) {
      ctx.fillStyle = data.palette[k];
      ctx.beginPath();
      for (let i = 0; i < data.x.length; i++) {
        if (c[i] !== k) continue;
        const [sx, sy] = toScreen(data.x[i], data.y[i]);
        if (sx < -r || sy < -r || sx > w + r || sy > h + r) continue;
        ctx.moveTo(sx + r, sy);
        ctx.arc(sx, sy, r, 0, 2 * Math.PI);
      }
      ctx.fill();
    }
    if (hovered >= 0) {
      const [sx, sy] = toScreen(data.x[hovered], data.y[hovered]);
      ctx.strokeStyle = "#ffffff";
      ctx.lineWidth = 2;
      ctx.beginPath();
      ctx.arc(sx, sy, r + 3, 0, 2 * Math.PI);
      ctx.stroke();
    }
  }

  function drawBins() {
    const b = data.bins.size;
    const counts = data.bins.counts;
    let max = 1;
    for (const v of counts) max = Math.max(max, v);
    const [x0, y0] = toScreen(0, 1);
    const [x1, y1] = toScreen(1, 0);
    const cw = (x1 - x0) / b;
    const ch = (y1 - y0) / b;
    for (let row = 0; row < b; row++) {
      for (let col = 0; col < b; col++) {
        const v = counts[row * b + col];
        if (!v) continue;
        ctx.fillStyle = `rgba(200,200,210,${(0.08 + 0.5 * Math.log1p(v) / Math.log1p(max)).toFixed(3)})`;
        ctx.fillRect(x0 + col * cw, y1 - (row + 1) * ch, cw + 0.5, ch + 0.5);
      }
    }
  }

  function buildGrid() {
    grid = new Map();
    for (let i = 0; i < data.x.length; i++) {
      const key = Math.min(GRID - 1, Math.floor(data.x[i] * GRID)) * GRID + Math.min(GRID - 1, Math.floor(data.y[i] * GRID));
      if (!grid.has(key)) grid.set(key, []);
      grid.get(key).push(i);
    }
  }

  function nearest(sx, sy) {
    const [lx, ly] = toLayout(sx, sy);
    const reach = (radius() + 6) / (base().side * view.scale); // in layout units
    let best = -1;
    let bestD = Infinity;
    const c0 = Math.floor((lx - reach) * GRID), c1 = Math.floor((lx + reach) * GRID);
    const r0 = Math.floor((ly - reach) * GRID), r1 = Math.floor((ly + reach) * GRID);
    for (let cx = Math.max(0, c0); cx <= Math.min(GRID - 1, c1); cx++) {
      for (let cy = Math.max(0, r0); cy <= Math.min(GRID - 1, r1); cy++) {
        for (const i of grid.get(cx * GRID + cy) || []) {
          const [px, py] = toScreen(data.x[i], data.y[i]);
          const d = (px - sx) ** 2 + (py - sy) ** 2;
          if (d < bestD) { bestD = d; best = i; }
        }
      }
    }
    return bestD <= (radius() + 6) ** 2 ? best : -1;
  }

  function showCard(i, sx, sy) {
    const names = data.classes;
    $("#map-card-title").textContent = data.title[i] || `cover ${data.id[i]}`;
    $("#map-card-genre").textContent = `genre: ${names[data.genre[i]]}`;
    $("#map-card-pred").textContent = data.predicted ? `predicted: ${names[data.predicted[i]]}` : "";
    card.dataset.id = String(data.id[i]);
    card.dataset.thumb = "pending";
    thumb.fillStyle = "#333";
    thumb.fillRect(0, 0, 96, 96);
    loadThumb(i, (img, sx0, sy0, sw, sh) => {
      if (card.dataset.id !== String(data.id[i])) return;
      thumb.drawImage(img, sx0, sy0, sw, sh, 0, 0, 96, 96);
      card.dataset.thumb = "loaded";
    });
    const wrap = $("#map-wrap").getBoundingClientRect();
    card.hidden = false;
    const left = sx + 14 + card.offsetWidth > wrap.width ? sx - 14 - card.offsetWidth : sx + 14;
    const top = sy + 14 + card.offsetHeight > wrap.height ? sy - 14 - card.offsetHeight : sy + 14;
    card.style.left = `${Math.max(0, left)}px`;
    card.style.top = `${Math.max(0, top)}px`;
  }

  function loadThumb(i, done) {
    const t = data.thumbs;
    if (t && i < t.count) {
      const per = t.cols * t.cols;
      const s = Math.floor(i / per), pos = i % per;
      if (!sheets[s]) { sheets[s] = new Image(); sheets[s].src = t.sheets[s]; }
      const img = sheets[s];
      const go = () => done(img, (pos % t.cols) * t.size, Math.floor(pos / t.cols) * t.size, t.size, t.size);
      if (img.complete && img.naturalWidth) go(); else img.addEventListener("load", go, { once: true });
    } else if (!standalone) {
      const img = new Image();
      img.addEventListener("load", () => done(img, 0, 0, img.naturalWidth, img.naturalHeight), { once: true });
      img.src = `/covers/${data.id[i]}`;
    } else {
      card.dataset.thumb = "none";
    }
  }

  function legend() {
    const c = codes();
    const counts = new Array(data.classes.length).fill(0);
    for (const v of c) counts[v]++;
    const items = data.classes.map((name, k) => {
      const li = document.createElement("li");
      li.dataset.class = name;
      const sw = document.createElement("span");
      sw.className = "swatch";
      sw.style.background = data.palette[k];
      li.append(sw, document.createTextNode(`${name} (${counts[k].toLocaleString()})`));
      return li;
    }).filter((_, k) => counts[k] > 0);
    $("#map-legend").replaceChildren(...items);
  }

  function info() {
    const parts = [`${data.count.toLocaleString()} covers`, `${data.drawn.toLocaleString()} drawn`,
      `layout ${data.method} by ${data.by}`];
    if (data.bins) parts.push("grey: density of all covers");
    $("#map-info").textContent = parts.join(" · ") + " · wheel: zoom, drag: pan, click: similar covers";
  }

  function start(payload) {
    data = payload;
    color = params().get("color") || data.color || "genre";
    const sel = $("#map-color");
    sel.value = color;
    sel.querySelector('option[value="predicted"]').disabled = !data.predicted;
    if (!data.predicted) { color = "genre"; sel.value = "genre"; }
    $("#map-by").value = data.by;
    view = { scale: 1, tx: 0, ty: 0 };
    buildGrid();
    legend();
    info();
    draw();
    canvas.dataset.ready = "1";
  }

  function load() {
    if (standalone) { start(JSON.parse(inline.textContent)); return; }
    canvas.dataset.ready = "";
    $("#map-info").textContent = "Computing the layout (the first time can take a minute)…";
    const by = params().get("by") || $("#map-by").value || "both";
    fetch(`/api/map?by=${encodeURIComponent(by)}`)
      .then((r) => r.json().then((body) => { if (!r.ok) throw new Error(body.error || r.statusText); return body; }))
      .then(start)
      .catch((err) => { $("#map-info").textContent = `Map unavailable: ${err.message}`; });
  }

  let drag = null;
  canvas.addEventListener("mousedown", (e) => { drag = { x: e.clientX, y: e.clientY, moved: false }; });
  window.addEventListener("mouseup", (e) => {
    if (drag && !drag.moved && data) {
      const r = canvas.getBoundingClientRect();
      const i = nearest(e.clientX - r.left, e.clientY - r.top);
      if (i >= 0 && e.target === canvas) {
        const url = `${data.link}${data.id[i]}`;
        if (standalone) window.open(url, "_blank", "noopener"); else window.location.href = url;
      }
    }
    drag = null;
    canvas.classList.remove("dragging");
  });
  canvas.addEventListener("mousemove", (e) => {
    if (!data) return;
    const r = canvas.getBoundingClientRect();
    const sx = e.clientX - r.left, sy = e.clientY - r.top;
    if (drag) {
      const dx = e.clientX - drag.x, dy = e.clientY - drag.y;
      if (drag.moved || dx * dx + dy * dy > 9) {
        drag.moved = true;
        canvas.classList.add("dragging");
        view.tx += dx; view.ty += dy;
        drag.x = e.clientX; drag.y = e.clientY;
        card.hidden = true;
        draw();
        return;
      }
    }
    const i = nearest(sx, sy);
    if (i !== hovered) { hovered = i; draw(); }
    if (i >= 0) showCard(i, sx, sy); else card.hidden = true;
  });
  canvas.addEventListener("mouseleave", () => { hovered = -1; card.hidden = true; draw(); });
  canvas.addEventListener("wheel", (e) => {
    e.preventDefault();
    const r = canvas.getBoundingClientRect();
    const sx = e.clientX - r.left, sy = e.clientY - r.top;
    const f = Math.exp(-e.deltaY * 0.0015);
    const scale = Math.max(0.5, Math.min(200, view.scale * f));
    const k = scale / view.scale;
    view.tx = sx - (sx - view.tx) * k;
    view.ty = sy - (sy - view.ty) * k;
    view.scale = scale;
    draw();
  }, { passive: false });
  $("#map-color").addEventListener("change", (e) => { color = e.target.value; legend(); draw(); });
  $("#map-by").addEventListener("change", (e) => {
    const p = params(); p.set("by", e.target.value);
    history.replaceState(null, "", `?${p}`);
    load();
  });
  $("#map-reset").addEventListener("click", () => { view = { scale: 1, tx: 0, ty: 0 }; draw(); });
  $("#map-controls").addEventListener("submit", (e) => e.preventDefault());
  window.addEventListener("resize", draw);

  // what tests (and curious users) can read
  window.stylegenMap = {
    state: () => ({ ready: Boolean(data), points: data ? data.x.length : 0, color, view: { ...view },
      classes: data ? data.classes : [], palette: data ? data.palette : [] }),
    screenOf: (i) => toScreen(data.x[i], data.y[i]),
    codes: () => codes().slice(),
  };
  load();
})();
