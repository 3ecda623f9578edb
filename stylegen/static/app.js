// stylegen web page: upload a cover (or click a neighbour), show genres and similar covers.
// No dependencies; talks to the same origin only (POST /classify, POST /similar, GET /api/info).
"use strict";

(() => {
  const $ = (selector) => document.querySelector(selector);
  const TOP_GENRES = 5;

  const els = {
    status: $("#status"),
    info: $("#index-info"),
    drop: $("#drop-zone"),
    file: $("#file-input"),
    preview: $("#query-preview"),
    hint: $("#drop-hint"),
    caption: $("#query-caption"),
    by: $("#by"),
    k: $("#k"),
    verify: $("#verify"),
    bars: $("#genre-bars"),
    levels: $("#levels"),
    grid: $("#similar-grid"),
    explain: $("#explain"),
  };

  let maxUploadBytes = Infinity;
  let lastQuery = null; // {kind: "upload", file} or {kind: "id", id}
  let sequence = 0; // answers to an older query are dropped
  let previewUrl = null;

  function setStatus(state, text) {
    els.status.dataset.state = state;
    els.status.textContent = text;
  }

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function percent(p) {
    return `${(100 * Math.max(0, Math.min(1, Number(p) || 0))).toFixed(1)}%`;
  }

  async function api(path, options) {
    let response;
    try {
      response = await fetch(path, options);
    } catch (err) {
      throw new Error(`cannot reach the server (${err.message})`);
    }
    let body = null;
    try {
      body = await response.json();
    } catch (err) {
      body = null;
    }
    if (!response.ok) {
      const message = body && body.error ? body.error : `${response.status} ${response.statusText}`;
      throw new Error(message);
    }
    return body;
  }

  function postQuery(path, query, params) {
    const form = new FormData();
    if (query.kind === "upload") form.append("image", query.file, query.file.name || "cover");
    else form.append("id", String(query.id));
    for (const [key, value] of Object.entries(params)) form.append(key, String(value));
    return api(path, { method: "POST", body: form });
  }

  function showPreview(query) {
    if (previewUrl) URL.revokeObjectURL(previewUrl);
    previewUrl = null;
    if (query.kind === "upload") {
      previewUrl = URL.createObjectURL(query.file);
      els.preview.src = previewUrl;
      els.preview.alt = query.file.name || "uploaded cover";
    } else {
      els.preview.src = `/covers/${query.id}`;
      els.preview.alt = `cover ${query.id}`;
    }
    els.preview.hidden = false;
    els.drop.classList.add("has-image");
  }

  function genreLabel(item) {
    const path = Array.isArray(item.path) && item.path.length ? item.path : [item.genre];
    return path.join(" › ");
  }

  function bar(className, label, probability) {
    const row = el("div", className);
    row.append(el("span", "bar-label", label));
    const track = el("span", "bar-track");
    const fill = el("span", "bar-fill");
    fill.style.width = percent(probability); // CSSOM, allowed by the page's CSP
    track.append(fill);
    row.append(track, el("span", "bar-value", percent(probability)));
    row.title = `${label}: ${percent(probability)}`;
    return row;
  }

  function renderGenres(result) {
    els.bars.replaceChildren();
    const genres = (result.genres || []).slice(0, TOP_GENRES);
    if (!genres.length) els.bars.append(el("p", "muted empty", "No genre prediction."));
    for (const item of genres) {
      const row = bar("genre-bar", genreLabel(item), item.probability);
      row.dataset.genre = item.genre;
      els.bars.append(row);
    }
    els.levels.replaceChildren();
    const levels = Object.entries(result.levels || {});
    if (levels.length > 1) {
      for (const [level, items] of levels) {
        const box = el("div", "level");
        box.append(el("h3", "", level));
        for (const item of (items || []).slice(0, 3)) {
          box.append(bar("level-bar", item.genre, item.probability));
        }
        els.levels.append(box);
      }
    }
  }

  // explanation: one bar per tap layer (its share of the predicted genre's probability)
  // and the covers that carried the kNN vote, with their weights
  function renderExplain(result) {
    const e = result.explanation;
    els.explain.replaceChildren();
    if (!e) return;
    els.explain.append(el("p", "muted", `${e.genre}: share of each tap layer (leave one out)`));
    for (const t of e.taps || []) {
      const row = bar("tap-bar", t.tap, t.share);
      row.dataset.tap = t.tap;
      row.title = `${t.tap}: without it p(${e.genre}) = ${percent(t.probability_without)}`;
      els.explain.append(row);
    }
    if (e.note) els.explain.append(el("p", "muted", e.note));
    if ((e.voters || []).length) els.explain.append(el("p", "muted", "Voters (kNN weight)"));
    for (const v of (e.voters || []).slice(0, 5)) {
      const row = bar("voter-bar", `#${v.id} ${v.genre}`, v.weight);
      row.dataset.id = String(v.id);
      els.explain.append(row);
    }
  }

  function card(item) {
    const button = el("button", "cover-card");
    button.type = "button";
    button.dataset.id = String(item.id);
    if (item.is_query) button.classList.add("is-query");
    const img = el("img", "thumb");
    img.src = item.thumbnail || `/covers/${item.id}`;
    img.alt = [item.artist, item.album].filter(Boolean).join(" — ") || `cover ${item.id}`;
    img.loading = "lazy";
    img.width = 256;
    img.height = 256;
    const meta = el("span", "card-meta");
    const similarity = el("span", "similarity", Number(item.similarity).toFixed(2));
    similarity.title = "similarity";
    const genres = el("span", "card-genres", (item.genres || []).join(", ") || "—");
    meta.append(similarity, genres);
    const who = el("span", "card-title");
    who.append(el("span", "artist", item.artist || "unknown artist"));
    who.append(el("span", "album", item.album || ""));
    button.append(img, meta, who);
    if (item.is_query) button.append(el("span", "badge", "query"));
    else if (item.verified) {
      button.classList.add("is-copy");
      const badge = el("span", "badge copy", "copy");
      badge.title = describeTransform(item);
      button.append(badge);
    }
    button.addEventListener("click", () => run({ kind: "id", id: item.id }, true));
    return button;
  }

  function describeTransform(item) {
    const t = item.transform || {};
    const parts = [`verified copy: ${item.inliers} matching keypoints`];
    if (t.flip) parts.push("mirrored");
    if (t.scale) parts.push(`scale ${t.scale}`);
    if (t.rotation) parts.push(`rotated ${t.rotation}°`);
    if (t.crop) parts.push(`shows ${Math.round(100 * t.crop.b_in_a)}% of this cover`);
    if (t.perspective > 0.02) parts.push("perspective (a photo?)");
    return parts.join(", ");
  }

  function renderSimilar(result, query) {
    els.grid.replaceChildren(...(result.neighbours || []).map(card));
    els.grid.dataset.query = query.kind === "id" ? `id:${query.id}` : "upload";
    if (!(result.neighbours || []).length) els.grid.append(el("p", "muted", "No neighbours."));
  }

  function describe(query, answer) {
    if (query.kind === "id") {
      const self = (answer.neighbours || []).find((n) => n.is_query && n.id === query.id);
      const who = self ? [self.artist, self.album].filter(Boolean).join(" — ") : "";
      return `Cover #${query.id}${who ? ` · ${who}` : ""}`;
    }
    const q = answer.query || {};
    return `${q.filename || "upload"} · ${q.width}×${q.height}`;
  }

  async function run(query, withGenres) {
    const mine = ++sequence;
    lastQuery = query;
    if (query.kind === "upload" && query.file.size > maxUploadBytes) {
      setStatus("error", `The file is ${query.file.size.toLocaleString()} bytes; the limit is ${maxUploadBytes.toLocaleString()}.`);
      return;
    }
    showPreview(query);
    setStatus("busy", "Looking…");
    const started = performance.now();
    const params = { k: Math.max(1, Number(els.k.value) || 12), by: els.by.value };
    if (els.verify && els.verify.checked) params.verify = "true";
    try {
      const [genres, similar] = await Promise.all([
        withGenres ? postQuery("/classify", query, { top: TOP_GENRES, explain: true }) : null,
        postQuery("/similar", query, params),
      ]);
      if (mine !== sequence) return;
      if (genres) renderGenres(genres);
      if (genres) renderExplain(genres);
      renderSimilar(similar, query);
      els.caption.textContent = describe(query, similar);
      const ms = Math.round(performance.now() - started);
      const top = genres && genres.genres && genres.genres[0];
      const lead = top ? `Looks like ${genreLabel(top)} (${percent(top.probability)}). ` : "";
      setStatus("ok", `${lead}${similar.neighbours.length} similar covers by ${similar.by} in ${ms} ms.`);
    } catch (err) {
      if (mine !== sequence) return;
      setStatus("error", err.message);
    }
  }

  function chooseFile(file) {
    if (file) run({ kind: "upload", file }, true);
  }

  els.file.addEventListener("change", () => {
    chooseFile(els.file.files[0]);
    els.file.value = ""; // choosing the same file again fires "change" again
  });
  els.drop.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") {
      event.preventDefault();
      els.file.click();
    }
  });
  for (const type of ["dragenter", "dragover"]) {
    els.drop.addEventListener(type, (event) => {
      event.preventDefault();
      els.drop.classList.add("dragging");
    });
  }
  for (const type of ["dragleave", "dragend"]) {
    els.drop.addEventListener(type, () => els.drop.classList.remove("dragging"));
  }
  els.drop.addEventListener("drop", (event) => {
    event.preventDefault();
    els.drop.classList.remove("dragging");
    chooseFile(event.dataTransfer && event.dataTransfer.files[0]);
  });
  for (const control of [els.by, els.k, els.verify]) {
    control.addEventListener("change", () => {
      if (lastQuery) run(lastQuery, false);
    });
  }
  $("#controls").addEventListener("submit", (event) => event.preventDefault());

  api("/api/info")
    .then((info) => {
      const parts = [];
      if (info.count !== undefined) parts.push(`${Number(info.count).toLocaleString()} covers`);
      if (info.backbone) parts.push(info.backbone);
      if (Array.isArray(info.parts) && info.parts.length) parts.push(`parts: ${info.parts.join(", ")}`);
      if (Array.isArray(info.genres) && info.genres.length) parts.push(`${info.genres.length} genres`);
      els.info.textContent = parts.join(" · ");
      if (info.limits && info.limits.max_upload_bytes) maxUploadBytes = info.limits.max_upload_bytes;
      setStatus("ready", "Ready: drop a cover or choose a file.");
      const linked = new URLSearchParams(window.location.search).get("id"); // from the map: /?id=N
      if (linked !== null && /^\d+$/.test(linked)) run({ kind: "id", id: Number(linked) }, true);
    })
    .catch((err) => setStatus("error", `Index info unavailable: ${err.message}`));
})();
