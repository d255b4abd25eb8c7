// vertjax review: the page's logic. Plain JavaScript, no libraries, no build step.
//
// The film is an SVG <image> in original pixels inside one <g> that carries
// the zoom and pan (translate + scale), so a point's SVG coordinates are its
// original-pixel coordinates and a screen delta divided by the scale is an
// image delta. Every edit goes through `change`, which keeps snapshots for
// undo/redo and a timed record of what was done for the review log.
"use strict";

(() => {
  const NAMES = ["T4", "T5", "T6", "T7", "T8", "T9", "T10", "T11", "T12", "L1", "L2", "L3", "L4"];
  const SVG_NS = "http://www.w3.org/2000/svg";
  const RADIUS = 7; // screen pixels, whatever the zoom
  const DRAG_THRESHOLD = 3; // screen pixels before a press becomes a drag
  const GHOST_MIN_CONFIDENCE = 0.1; // weaker guesses of the model are not worth drawing

  const $ = (id) => document.getElementById(id);
  const canvas = $("canvas");
  const view = $("view");
  const film = $("film");

  const state = {
    queue: [],
    filter: "unreviewed",
    rad: null, // the radiograph as GET /api/radiograph returns it
    points: {}, // name -> {x, y, edited}
    selected: null,
    placing: null,
    undo: [], // {before, after, edit, id}
    redo: [],
    savedMarker: null, // id of the undo entry in effect at the last save or load
    loggedDepth: 0, // undo entries already sent to the log
    nextId: 1,
    version: null,
    conflictVersion: null,
    view: { s: 1, tx: 0, ty: 0 },
    drag: null,
    typed: "",
    saving: false,
    imageUrl: null,
  };

  // ---------------------------------------------------------------- helpers

  function element(tag, attrs = {}, text) {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
    if (text !== undefined) el.textContent = text;
    return el;
  }

  function svg(tag, attrs = {}, text) {
    const el = document.createElementNS(SVG_NS, tag);
    for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
    if (text !== undefined) el.textContent = text;
    return el;
  }

  const round2 = (v) => Math.round(v * 100) / 100;
  const clamp = (v, lo, hi) => Math.min(hi, Math.max(lo, v));

  function status(text, kind = "") {
    const el = $("status");
    el.textContent = text;
    el.className = kind;
  }

  async function getJSON(url) {
    const response = await fetch(url, { credentials: "same-origin" });
    const body = await response.json().catch(() => ({ error: response.statusText }));
    if (!response.ok) throw new Error(body.error || response.statusText);
    return body;
  }

  function prediction(name) {
    return state.rad.prediction[NAMES.indexOf(name)];
  }

  // Red (weak) through yellow to green (strong); points the user set are blue.
  function colour(name) {
    const p = state.points[name];
    if (p.edited) return "#4aa3ff";
    const c = prediction(name).confidence;
    const hue = 120 * clamp((c - 0.3) / 0.7, 0, 1);
    return `hsl(${hue}, 85%, 50%)`;
  }

  function describe(name) {
    const p = state.points[name];
    const c = prediction(name).confidence.toFixed(2);
    if (!p) return `${name}: absent (model confidence ${c})`;
    if (p.edited) return `${name}: set by you (model confidence ${c})`;
    return `${name}: confidence ${c}`;
  }

  // ---------------------------------------------------------------- edits

  function snapshot() {
    const points = {};
    for (const [name, p] of Object.entries(state.points)) points[name] = { ...p };
    return { points, participant: $("participant").value, split: $("split").value };
  }

  function restore(snap) {
    state.points = {};
    for (const [name, p] of Object.entries(snap.points)) state.points[name] = { ...p };
    $("participant").value = snap.participant;
    $("split").value = snap.split;
    if (state.selected && !state.points[state.selected]) state.selected = null;
  }

  // Applies `mutate` as one undoable edit described by `edit`.
  function change(edit, mutate, before = snapshot()) {
    mutate();
    edit.time = new Date().toISOString();
    state.undo.push({ before, after: snapshot(), edit, id: state.nextId++ });
    state.redo = [];
    render();
  }

  function dirty() {
    const top = state.undo.length ? state.undo[state.undo.length - 1].id : null;
    return top !== state.savedMarker;
  }

  function undo() {
    const entry = state.undo.pop();
    if (!entry) return;
    restore(entry.before);
    state.redo.push(entry);
    state.loggedDepth = Math.min(state.loggedDepth, state.undo.length);
    render();
  }

  function redo() {
    const entry = state.redo.pop();
    if (!entry) return;
    restore(entry.after);
    state.undo.push(entry);
    render();
  }

  function rename(from, to) {
    if (!state.points[from] || from === to) return;
    change({ action: "rename", from, to }, () => {
      const moved = state.points[from];
      const other = state.points[to];
      state.points[to] = { ...moved, edited: true };
      if (other) state.points[from] = { ...other, edited: true }; // taken: swap the two names
      else delete state.points[from];
      state.selected = to;
    });
  }

  function renameBy(step) {
    const name = state.selected;
    if (!name) return;
    const k = NAMES.indexOf(name) + step;
    if (k >= 0 && k < NAMES.length) rename(name, NAMES[k]);
  }

  function shiftAll(step) {
    const names = NAMES.filter((n) => state.points[n]);
    const outside = names.find((n) => !NAMES[NAMES.indexOf(n) + step]);
    if (!names.length) return;
    if (outside) {
      status(`Cannot shift: ${outside} would leave T4..L4`, "error");
      return;
    }
    change({ action: "shift", by: step }, () => {
      const shifted = {};
      for (const n of names) shifted[NAMES[NAMES.indexOf(n) + step]] = { ...state.points[n], edited: true };
      state.points = shifted;
      if (state.selected) state.selected = NAMES[NAMES.indexOf(state.selected) + step];
    });
  }

  function markAbsent(name) {
    const p = state.points[name];
    if (!p) return;
    change({ action: "remove", vertebra: name, at: [round2(p.x), round2(p.y)] }, () => {
      delete state.points[name];
      if (state.selected === name) state.selected = null;
    });
  }

  function place(name, x, y) {
    const W = state.rad.width;
    const H = state.rad.height;
    x = clamp(x, 0, W);
    y = clamp(y, 0, H);
    const edit = { action: state.points[name] ? "move" : "place", vertebra: name, at: [round2(x), round2(y)] };
    if (state.placing) status(`${name} placed`);
    change(edit, () => {
      state.points[name] = { x, y, edited: true };
      state.selected = name;
      state.placing = null;
    });
  }

  function startPlacing(name) {
    state.placing = name;
    state.selected = null;
    status(`Click on the film to place ${name} (Esc cancels)`);
    render();
  }

  // ---------------------------------------------------------------- view

  function applyView() {
    const { s, tx, ty } = state.view;
    view.setAttribute("transform", `translate(${tx} ${ty}) scale(${s})`);
    renderMarks();
  }

  function fit() {
    if (!state.rad) return;
    const box = canvas.getBoundingClientRect();
    const s = 0.96 * Math.min(box.width / state.rad.width, box.height / state.rad.height);
    state.view = {
      s,
      tx: (box.width - state.rad.width * s) / 2,
      ty: (box.height - state.rad.height * s) / 2,
    };
    applyView();
  }

  function toImage(clientX, clientY) {
    const box = canvas.getBoundingClientRect();
    const { s, tx, ty } = state.view;
    return [(clientX - box.left - tx) / s, (clientY - box.top - ty) / s];
  }

  function setWindowLevel() {
    const level = Number($("level").value);
    const width = Number($("window").value);
    for (const id of ["wl-r", "wl-g", "wl-b"]) {
      $(id).setAttribute("slope", String(1 / width));
      $(id).setAttribute("intercept", String(0.5 - level / width));
    }
  }

  // ---------------------------------------------------------------- render

  function renderMarks() {
    const group = $("points");
    const ghosts = $("ghosts");
    group.replaceChildren();
    ghosts.replaceChildren();
    if (!state.rad) return;
    const s = state.view.s;
    const r = RADIUS / s;
    const label = { x: (RADIUS + 3) / s, y: 4 / s, "font-size": 12 / s, "stroke-width": 3 / s };
    for (const name of NAMES) {
      const guess = prediction(name);
      if (state.points[name] || guess.confidence < GHOST_MIN_CONFIDENCE) continue;
      const g = svg("g", { class: "ghost", "data-name": name, transform: `translate(${guess.x} ${guess.y})` });
      g.append(
        svg("circle", { class: "halo", r: r * 0.8, "stroke-width": 4 / s }),
        svg("circle", { r: r * 0.8, "stroke-width": 2 / s }),
        svg("text", label, name),
      );
      ghosts.append(g);
    }
    for (const name of NAMES) {
      const p = state.points[name];
      if (!p) continue;
      const g = svg("g", {
        class: name === state.selected ? "pt selected" : "pt",
        "data-name": name,
        transform: `translate(${p.x} ${p.y})`,
      });
      g.append(
        svg("circle", { r, fill: colour(name), "stroke-width": (name === state.selected ? 3 : 1.5) / s }),
        svg("text", label, name),
      );
      group.append(g);
    }
  }

  function renderTable() {
    const body = $("vertebrae").tBodies[0];
    body.replaceChildren();
    if (!state.rad) return;
    for (const name of NAMES) {
      const p = state.points[name];
      const row = element("tr", { "data-name": name });
      if (!p) row.classList.add("absent");
      if (name === state.selected) row.classList.add("selected");
      const dot = element("span", { class: "dot" });
      if (p) dot.style.background = colour(name);
      const what = !p ? "absent" : p.edited ? "yours" : prediction(name).confidence.toFixed(2);
      const act = element("td", { class: "act" });
      const button = element("button", { type: "button" }, p ? "absent" : "place");
      button.title = p ? `Mark ${name} absent` : `Click on the film to place ${name}`;
      button.addEventListener("click", (e) => {
        e.stopPropagation();
        if (p) markAbsent(name);
        else startPlacing(name);
      });
      act.append(button);
      const dotCell = element("td");
      dotCell.append(dot);
      row.append(dotCell, element("td", { class: "name" }, name), element("td", {}, what), act);
      row.addEventListener("click", () => {
        if (state.points[name]) {
          state.selected = name;
          state.placing = null;
          render();
        } else startPlacing(name);
      });
      body.append(row);
    }
  }

  function renderControls() {
    const select = $("rename");
    select.disabled = !state.selected;
    select.value = state.selected || "";
    $("absent").disabled = !state.selected;
    $("undo").disabled = !state.undo.length;
    $("redo").disabled = !state.redo.length;
    $("accept").disabled = !state.rad || !state.rad.image || Boolean(state.rad.save_problem) || state.saving;
    canvas.classList.toggle("placing", Boolean(state.placing));
    $("accept").textContent = state.rad && dirty() ? "Accept & save (unsaved edits)" : "Accept & save";
  }

  function render() {
    $("tooltip").hidden = true; // it may describe what the edit just changed
    renderMarks();
    renderTable();
    renderControls();
    renderQueue();
  }

  function filtered() {
    return state.queue.filter(
      (item) =>
        state.filter === "all" ||
        (state.filter === "reviewed") === item.reviewed ||
        (state.rad && item.id === state.rad.id),
    );
  }

  function renderQueue() {
    const list = $("queue");
    list.replaceChildren();
    const rank = new Map(state.queue.map((item, k) => [item.id, k + 1]));
    for (const item of filtered()) {
      const li = element("li", { "data-id": item.id });
      if (state.rad && item.id === state.rad.id) li.classList.add("current");
      const head = element("div", { class: "head" });
      head.append(
        element("span", { class: "rank" }, `#${rank.get(item.id)}`),
        element("span", { class: "name" }, item.image),
        element("span", { class: "score" }, item.score.toFixed(1)),
      );
      if (item.reviewed) head.append(element("span", { class: "badge done" }, "reviewed"));
      if (item.problem) head.append(element("span", { class: "badge bad" }, "problem"));
      li.append(head);
      const why = item.problem
        ? item.problem
        : item.reasons.length
          ? item.reasons.map((r) => `${r.text} (+${r.points.toFixed(1)})`).join("; ")
          : "nothing suspicious";
      li.append(element("div", { class: "why" }, why));
      li.addEventListener("click", () => open(item.id));
      list.append(li);
    }
    const done = state.queue.filter((item) => item.reviewed).length;
    $("summary").textContent = `${state.queue.length} radiographs, ${done} reviewed`;
  }

  function renderProblems(box, problems, title) {
    box.replaceChildren();
    box.hidden = !problems.length;
    if (!problems.length) return;
    box.append(element("strong", {}, title));
    const list = element("ul");
    for (const text of problems) list.append(element("li", {}, text));
    box.append(list);
  }

  function renderRadiograph() {
    const rad = state.rad;
    $("title").textContent = rad.image || rad.image_name;
    const model = rad.model && rad.model.model ? ` · ${rad.model.model}, step ${rad.model.checkpoint_step}` : "";
    $("meta").textContent = `${rad.width} × ${rad.height} px · ${rad.file}${model}`;
    const reasons = $("reasons");
    reasons.replaceChildren();
    for (const r of rad.reasons) reasons.append(element("li", {}, `${r.text} (+${r.points.toFixed(1)})`));
    if (!rad.reasons.length) reasons.append(element("li", { class: "none" }, "Nothing suspicious found."));
    renderProblems($("row-problems"), rad.row_problems, "annotations.csv rows of this image that cannot be read (saving replaces them):");
  }

  // ---------------------------------------------------------------- loading

  function showViewerMessage(text) {
    const box = $("viewer-message");
    box.textContent = text || "";
    box.hidden = !text;
  }

  async function loadImage(rad) {
    if (state.imageUrl) URL.revokeObjectURL(state.imageUrl);
    state.imageUrl = null;
    film.removeAttribute("href");
    film.setAttribute("width", rad.width);
    film.setAttribute("height", rad.height);
    if (rad.problem) {
      showViewerMessage(rad.problem);
      return;
    }
    const response = await fetch(`/api/image/${encodeURIComponent(rad.id)}`, { credentials: "same-origin" });
    if (!response.ok) {
      const body = await response.json().catch(() => ({ error: response.statusText }));
      showViewerMessage(`The image cannot be shown: ${body.error}`);
      return;
    }
    state.imageUrl = URL.createObjectURL(await response.blob());
    if (state.rad === rad) film.setAttribute("href", state.imageUrl);
  }

  function startFrom(rad) {
    state.rad = rad;
    state.points = {};
    const source = rad.saved ? rad.saved.points : rad.prediction.filter((p) => p.present);
    for (const p of source) state.points[p.name] = { x: p.x, y: p.y, edited: Boolean(rad.saved) };
    $("participant").value = rad.participant;
    $("split").value = rad.split;
    state.version = rad.version;
    state.undo = [];
    state.redo = [];
    state.savedMarker = null;
    state.loggedDepth = 0;
    state.selected = null;
    state.placing = null;
    $("conflict").hidden = true;
    renderRadiograph();
  }

  // body[data-loaded] names the radiograph once it is shown with its image (scripts wait on it).
  async function open(id, { force = false } = {}) {
    if (!force && state.rad && dirty() && state.rad.id !== id) {
      if (!window.confirm(`Unsaved edits on ${state.rad.image} will be lost. Leave them?`)) return;
    }
    document.body.dataset.loaded = "";
    let rad;
    try {
      rad = await getJSON(`/api/radiograph/${encodeURIComponent(id)}`);
    } catch (e) {
      status(`Cannot open ${id}: ${e.message}`, "error");
      return;
    }
    showViewerMessage("");
    startFrom(rad);
    fit();
    render();
    if (rad.save_problem) status(`Saving is off: ${rad.save_problem}`, "error");
    else status(rad.saved ? "Reviewed earlier: showing the saved labels" : "Showing the model's prediction");
    await loadImage(rad);
    const current = document.querySelector("#queue li.current");
    if (current) current.scrollIntoView({ block: "nearest" });
    if (state.rad === rad) document.body.dataset.loaded = rad.id;
  }

  function neighbour(step) {
    const list = filtered();
    if (!list.length) return null;
    const order = state.queue.map((item) => item.id);
    const here = state.rad ? order.indexOf(state.rad.id) : -1;
    const candidates = list.filter((item) => (step > 0 ? order.indexOf(item.id) > here : order.indexOf(item.id) < here));
    if (!candidates.length) return null;
    return step > 0 ? candidates[0] : candidates[candidates.length - 1];
  }

  function go(step) {
    const item = neighbour(step);
    if (item) open(item.id);
    else status(step > 0 ? "That was the last one" : "That was the first one");
  }

  async function loadQueue() {
    const body = await getJSON("/api/queue");
    state.queue = body.items;
    renderProblems($("problems"), body.problems, "Problems (the rest works):");
    $("summary").title = `predictions: ${body.predictions}\nannotations: ${body.annotations}`;
    renderQueue();
    return body;
  }

  // ---------------------------------------------------------------- saving

  async function save() {
    const rad = state.rad;
    if (!rad || !rad.image || state.saving) return;
    const points = NAMES.filter((n) => state.points[n]).map((name) => ({
      name,
      x: round2(state.points[name].x),
      y: round2(state.points[name].y),
    }));
    if (!points.length && !window.confirm("No vertebra is marked. Save this radiograph as showing none of T4..L4?")) return;
    const body = {
      points,
      participant: $("participant").value.trim(),
      split: $("split").value,
      edits: state.undo.slice(state.loggedDepth).map((entry) => entry.edit),
    };
    state.saving = true;
    renderControls();
    status("Saving…");
    try {
      const response = await fetch(`/api/radiograph/${encodeURIComponent(rad.id)}`, {
        method: "PUT",
        credentials: "same-origin",
        headers: { "Content-Type": "application/json", "If-Match": `"${state.version}"` },
        body: JSON.stringify(body),
      });
      const reply = await response.json().catch(() => ({ error: response.statusText }));
      if (state.rad !== rad) return;
      if (response.ok) {
        state.version = reply.version;
        state.savedMarker = state.undo.length ? state.undo[state.undo.length - 1].id : null;
        state.loggedDepth = state.undo.length;
        $("conflict").hidden = true;
        status(`Saved ${points.length} point(s) to annotations.csv. N: next radiograph`, "ok");
        loadQueue().catch(() => {}); // other tabs may have saved too
      } else if (response.status === 409) {
        state.conflictVersion = reply.current.version;
        state.conflictCurrent = reply.current;
        $("conflict-text").textContent =
          "This radiograph was saved elsewhere (another tab, or by hand) since you opened it. " +
          "Your edits are still here; nothing was written.";
        $("conflict").hidden = false;
        status("Not saved: conflict", "error");
        loadQueue().catch(() => {});
      } else {
        status(`Not saved: ${reply.error}`, "error");
      }
    } catch (e) {
      status(`Not saved: ${e.message}`, "error");
    } finally {
      state.saving = false;
      render();
    }
  }

  // ---------------------------------------------------------------- pointer

  function markAt(target) {
    const g = target.closest ? target.closest(".pt, .ghost") : null;
    return g ? { kind: g.classList.contains("pt") ? "point" : "ghost", name: g.dataset.name } : null;
  }

  canvas.addEventListener("pointerdown", (e) => {
    if (!state.rad || e.button !== 0) return;
    e.preventDefault();
    canvas.setPointerCapture(e.pointerId);
    const mark = markAt(e.target);
    const base = { startX: e.clientX, startY: e.clientY, moved: false };
    if (mark && mark.kind === "point" && !state.placing) {
      const p = state.points[mark.name];
      state.selected = mark.name;
      state.drag = { ...base, kind: "point", name: mark.name, x0: p.x, y0: p.y, before: snapshot() };
      render();
    } else if (mark && mark.kind === "ghost" && !state.placing) {
      state.drag = { ...base, kind: "ghost", name: mark.name };
    } else {
      state.drag = { ...base, kind: "pan", tx0: state.view.tx, ty0: state.view.ty };
    }
  });

  canvas.addEventListener("pointermove", (e) => {
    const drag = state.drag;
    if (!drag) {
      hover(e);
      return;
    }
    const dx = e.clientX - drag.startX;
    const dy = e.clientY - drag.startY;
    if (!drag.moved && Math.hypot(dx, dy) < DRAG_THRESHOLD) return;
    drag.moved = true;
    if (drag.kind === "point") {
      const p = state.points[drag.name];
      p.x = clamp(drag.x0 + dx / state.view.s, 0, state.rad.width);
      p.y = clamp(drag.y0 + dy / state.view.s, 0, state.rad.height);
      p.edited = true;
      renderMarks();
      hover(e);
    } else if (drag.kind === "pan") {
      canvas.classList.add("panning");
      state.view.tx = drag.tx0 + dx;
      state.view.ty = drag.ty0 + dy;
      applyView();
    }
  });

  canvas.addEventListener("pointerup", (e) => {
    const drag = state.drag;
    state.drag = null;
    canvas.classList.remove("panning");
    if (!drag || !state.rad) return;
    if (drag.kind === "point" && drag.moved) {
      const p = state.points[drag.name];
      const edit = {
        action: "move",
        vertebra: drag.name,
        from: [round2(drag.x0), round2(drag.y0)],
        to: [round2(p.x), round2(p.y)],
      };
      change(edit, () => {}, drag.before);
    } else if (drag.kind === "ghost" && !drag.moved) {
      const guess = prediction(drag.name);
      place(drag.name, guess.x, guess.y);
    } else if (drag.kind === "pan" && !drag.moved) {
      if (state.placing) {
        const [x, y] = toImage(e.clientX, e.clientY);
        place(state.placing, x, y);
      } else if (state.selected) {
        state.selected = null;
        render();
      }
    }
  });

  canvas.addEventListener("pointercancel", () => {
    const drag = state.drag;
    state.drag = null;
    if (drag && drag.kind === "point" && drag.moved) {
      restore(drag.before);
      render();
    }
  });

  canvas.addEventListener("pointerleave", () => {
    $("tooltip").hidden = true;
  });

  function hover(e) {
    const tip = $("tooltip");
    const mark = markAt(e.target);
    const name = state.drag && state.drag.kind === "point" ? state.drag.name : mark && mark.name;
    if (!name || !state.rad) {
      tip.hidden = true;
      return;
    }
    const box = $("viewer").getBoundingClientRect();
    tip.textContent = mark && mark.kind === "ghost" ? `${describe(name)}; click to use it` : describe(name);
    tip.hidden = false;
    // Beside the pointer, on whichever side keeps it inside the viewer.
    const left = e.clientX - box.left + 14;
    const flip = left + tip.offsetWidth > box.width;
    tip.style.left = `${flip ? e.clientX - box.left - 14 - tip.offsetWidth : left}px`;
    tip.style.top = `${e.clientY - box.top + 10}px`;
  }

  canvas.addEventListener(
    "wheel",
    (e) => {
      if (!state.rad) return;
      e.preventDefault();
      const box = canvas.getBoundingClientRect();
      const mx = e.clientX - box.left;
      const my = e.clientY - box.top;
      const { s, tx, ty } = state.view;
      const next = clamp(s * Math.exp(-e.deltaY * 0.0015), 0.02, 40);
      state.view = { s: next, tx: mx - ((mx - tx) * next) / s, ty: my - ((my - ty) * next) / s };
      applyView();
    },
    { passive: false },
  );

  // ---------------------------------------------------------------- keyboard

  // Typed names: "t", "1", "0" makes T10; a name acts as soon as no longer one starts with it.
  function typedName(key) {
    const letter = key.toUpperCase();
    let typed = state.typed + letter;
    if (!NAMES.some((n) => n.startsWith(typed))) typed = NAMES.some((n) => n.startsWith(letter)) ? letter : "";
    state.typed = typed;
    if (!typed) return false;
    const longer = NAMES.filter((n) => n.startsWith(typed) && n !== typed);
    if (NAMES.includes(typed) && !longer.length) {
      state.typed = "";
      if (state.selected) rename(state.selected, typed);
      else if (state.points[typed]) {
        state.selected = typed;
        render();
      } else startPlacing(typed);
    }
    return true;
  }

  document.addEventListener("keydown", (e) => {
    const tag = e.target.tagName;
    if (tag === "INPUT" || tag === "SELECT" || tag === "TEXTAREA") {
      if (e.key === "Escape") e.target.blur();
      return;
    }
    if (tag === "BUTTON" && (e.key === "Enter" || e.key === " ")) return; // the button's own click
    const key = e.key;
    const lower = key.toLowerCase();
    const command = e.ctrlKey || e.metaKey;
    const typed = state.typed; // a name being typed goes on only with the next letter or digit
    state.typed = "";
    let handled = true;
    if (command && lower === "z") (e.shiftKey ? redo : undo)();
    else if (command && lower === "y") redo();
    else if (command && lower === "s") save();
    else if (command || e.altKey) handled = false;
    else if (e.shiftKey && key === "ArrowUp") shiftAll(-1);
    else if (e.shiftKey && key === "ArrowDown") shiftAll(1);
    else if (lower === "n") go(1);
    else if (lower === "p") go(-1);
    else if (key === "Enter") save();
    else if (key === "Delete" || key === "Backspace" || lower === "x") markAbsent(state.selected);
    else if (lower === "r" && state.selected) $("rename").focus();
    else if (key === "+" || key === "=") renameBy(1);
    else if (key === "-") renameBy(-1);
    else if (lower === "f") fit();
    else if (key === "Tab") {
      const names = NAMES.filter((n) => state.points[n]);
      if (names.length) {
        const k = names.indexOf(state.selected);
        state.selected = names[(k + (e.shiftKey ? names.length - 1 : 1)) % names.length];
        render();
      }
    } else if (key === "Escape") {
      state.placing = null;
      state.selected = null;
      status("");
      render();
    } else if (/^[a-z0-9]$/i.test(key)) {
      state.typed = typed;
      handled = typedName(key);
    } else handled = false;
    if (handled) e.preventDefault();
  });

  // ---------------------------------------------------------------- controls

  for (const name of NAMES) $("rename").append(element("option", { value: name }, name));
  $("rename").addEventListener("change", (e) => {
    if (state.selected) rename(state.selected, e.target.value);
    e.target.blur();
  });
  $("absent").addEventListener("click", () => markAbsent(state.selected));
  $("shift-up").addEventListener("click", () => shiftAll(-1));
  $("shift-down").addEventListener("click", () => shiftAll(1));
  $("undo").addEventListener("click", undo);
  $("redo").addEventListener("click", redo);
  $("prev").addEventListener("click", () => go(-1));
  $("next").addEventListener("click", () => go(1));
  $("accept").addEventListener("click", save);
  $("overwrite").addEventListener("click", () => {
    state.version = state.conflictVersion;
    save();
  });
  $("load-theirs").addEventListener("click", () => {
    startFrom(state.conflictCurrent);
    render();
    status("Loaded the saved version");
  });
  for (const id of ["participant", "split"]) {
    let before = null;
    $(id).addEventListener("focus", () => {
      before = snapshot();
    });
    $(id).addEventListener("change", (e) => {
      const from = before ? before[id] : "";
      change({ action: id, from, to: e.target.value }, () => {}, before || snapshot());
      before = snapshot();
    });
  }
  for (const id of ["level", "window"]) $(id).addEventListener("input", setWindowLevel);
  $("wl-reset").addEventListener("click", () => {
    $("level").value = 0.5;
    $("window").value = 1;
    setWindowLevel();
  });
  for (const radio of document.querySelectorAll("input[name=filter]")) {
    radio.addEventListener("change", (e) => {
      state.filter = e.target.value;
      renderQueue();
    });
  }
  window.addEventListener("resize", () => state.rad && applyView());
  window.addEventListener("beforeunload", (e) => {
    if (state.rad && dirty()) e.preventDefault();
  });

  // The token, when the server needs one, now lives in a cookie: keep it out of the address bar.
  if (window.location.search.includes("token=")) window.history.replaceState(null, "", "/");

  loadQueue()
    .then(() => {
      const first = filtered()[0] || state.queue[0];
      if (first) return open(first.id);
      status("No radiograph to review");
    })
    .catch((e) => status(`Cannot load the queue: ${e.message}`, "error"));
})();
