// The map pages (web/pages.py). Plain script, no build step; Leaflet and leaflet-geoman are vendored
// (scripts/vendor-web). Anything that came from a user or a model is put into the page with textContent,
// never as HTML: popups get DOM nodes, not strings.
"use strict";

(function () {
  const body = document.body;
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  // The change-overlay tints of the thumbnails (workers/render.py CLASS_COLOURS), so regions on the map
  // and pixels in the overlay image share a colour.
  const CLASS_COLOURS = {
    water_change: "#1e78ff", new_built_up_or_bare: "#ff8c00", vegetation_loss: "#e61e1e",
    vegetation_gain: "#28dc3c",
  };

  function pageData() {
    const node = document.getElementById("page-data");
    return node ? JSON.parse(node.textContent) : null;
  }

  function el(tag, text, attrs) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    return node;
  }

  function makeMap(id) {
    const node = document.getElementById(id);
    if (!node || !window.L) return null;
    const map = L.map(node, { zoomSnap: 0.25 });
    const url = body.dataset.basemapUrl;
    if (url) {
      L.tileLayer(url, { maxZoom: 19, attribution: body.dataset.basemapAttribution || "" }).addTo(map);
    }
    map.setView([20, 0], 2);
    return map;
  }

  function fit(map, layer) {
    const bounds = layer.getBounds();
    if (bounds.isValid()) map.fitBounds(bounds, { padding: [20, 20], maxZoom: 16 });
  }

  // The API's refusal message ({"detail": "..."}) or the status line.
  async function apiError(response) {
    try {
      const data = await response.json();
      if (typeof data.detail === "string") return data.detail;
      if (Array.isArray(data.detail)) return data.detail.map((d) => d.msg).join("; ");
    } catch (_) { /* not JSON */ }
    return `${response.status} ${response.statusText}`;
  }

  async function api(method, url, payload) {
    const response = await fetch(url, {
      method, credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf, Accept: "application/json" },
      body: payload === undefined ? undefined : JSON.stringify(payload),
    });
    if (!response.ok) throw new Error(await apiError(response));
    return response.status === 204 ? null : response.json();
  }

  function showError(id, message) {
    const node = document.getElementById(id);
    node.textContent = message;
    node.hidden = !message;
  }

  function recipients(text) {
    return text.split(/[\n,;]+/).map((s) => s.trim()).filter(Boolean);
  }

  function numberField(form, name) {
    const value = form.elements[name].value.trim();
    return value === "" ? undefined : Number(value);
  }

  // ``own`` with each of ``fill``'s set values (not undefined, not an empty list) where ``own`` has none.
  function fillUnset(own, fill) {
    const props = { ...(own || {}) };
    for (const [key, value] of Object.entries(fill)) {
      const empty = value === undefined || (Array.isArray(value) && value.length === 0);
      if (!empty && (props[key] === undefined || props[key] === null)) props[key] = value;
    }
    return props;
  }

  // --- / : the areas, drawing and upload ---------------------------------------------------------------
  function indexPage() {
    const areas = pageData();
    const map = makeMap("map");
    const layer = L.geoJSON(areas, { style: { color: "#2563eb", weight: 2, fillOpacity: 0.1 } }).addTo(map);
    layer.eachLayer((shape) => {
      const f = shape.feature;
      const box = el("div");
      box.appendChild(el("a", f.properties.name, { href: `/areas/${Number(f.id)}` }));
      box.appendChild(el("div", `${f.properties.status} · ${f.properties.area_km2.toFixed(2)} km²`));
      shape.bindPopup(box);
    });
    fit(map, layer);

    const form = document.getElementById("new-area");
    const status = document.getElementById("geometry-status");
    let drawn = null; // the geoman layer, or the uploaded GeoJSON object
    let uploaded = null;
    map.pm.addControls({
      position: "topleft", drawMarker: false, drawCircleMarker: false, drawPolyline: false, drawCircle: false,
      drawText: false, cutPolygon: false, rotateMode: false, drawRectangle: true, drawPolygon: true,
    });
    map.on("pm:create", (e) => {
      if (drawn) map.removeLayer(drawn);
      drawn = e.layer;
      uploaded = null;
      form.elements.file.value = "";
      status.textContent = "Shape drawn on the map (drag its corners in edit mode to change it).";
      form.dataset.geometry = "drawn";
    });
    form.elements.file.addEventListener("change", async () => {
      const file = form.elements.file.files[0];
      if (!file) return;
      try {
        uploaded = JSON.parse(await file.text());
      } catch (err) {
        uploaded = null;
        showError("new-area-error", `${file.name} is not JSON: ${err.message}`);
        return;
      }
      if (drawn) map.removeLayer(drawn);
      drawn = L.geoJSON(uploaded, { style: { color: "#9333ea" } }).addTo(map);
      fit(map, drawn);
      showError("new-area-error", "");
      status.textContent = `Shape from ${file.name}.`;
      form.dataset.geometry = "uploaded";
      const props = uploaded.properties || {};
      if (!form.elements.name.value && typeof props.name === "string") form.elements.name.value = props.name;
    });
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      showError("new-area-error", "");
      if (!drawn) {
        showError("new-area-error", "Draw a shape on the map or choose a GeoJSON file first.");
        return;
      }
      const props = {
        max_cloud_cover: numberField(form, "max_cloud_cover"),
        min_clear_fraction: numberField(form, "min_clear_fraction"),
        recipients: recipients(form.elements.recipients.value),
      };
      const name = form.elements.name.value.trim();
      let payload;
      if (uploaded) {
        // A feature's own properties win: the form's thresholds and recipients fill only what a feature
        // leaves unset (absent or null), so a file's recipients are not replaced by an empty textarea.
        payload = uploaded;
        const features = uploaded.type === "FeatureCollection" ? uploaded.features
          : uploaded.type === "Feature" ? [uploaded] : null;
        if (features) {
          for (const f of features) f.properties = fillUnset(f.properties, props);
        } else {
          payload = { type: "Feature", properties: props, geometry: uploaded };
        }
      } else {
        payload = { type: "Feature", properties: props, geometry: drawn.toGeoJSON().geometry };
      }
      const url = "/api/areas" + (name ? `?name=${encodeURIComponent(name)}` : "");
      try {
        const created = await api("POST", url, payload);
        const added = created.features.map((f) => `added=${Number(f.id)}`).join("&");
        window.location.assign(`/?${added}`);
      } catch (err) {
        showError("new-area-error", err.message);
      }
    });
  }

  // --- /areas/{id} -------------------------------------------------------------------------------------
  // The area's outline as one GeoJSON geometry (a MultiPolygon area stays one Leaflet layer).
  function outlineGeometry(layer) {
    const geoms = [];
    layer.eachLayer((l) => geoms.push(l.toGeoJSON().geometry));
    if (geoms.length === 1) return geoms[0];
    return { type: "MultiPolygon", coordinates: geoms.flatMap((g) => (g.type === "Polygon" ? [g.coordinates] : g.coordinates)) };
  }

  function areaPage() {
    const area = pageData();
    const map = makeMap("map");
    const outline = L.geoJSON(area, { style: { color: "#2563eb", weight: 2, fillOpacity: 0.1 } }).addTo(map);
    fit(map, outline);
    const form = document.getElementById("area-settings");
    const id = Number(form.dataset.areaId);

    const editShape = document.getElementById("edit-shape");
    const saveShape = document.getElementById("save-shape");
    const shapeStatus = document.getElementById("shape-status");
    let editing = false;
    editShape.addEventListener("click", () => {
      editing = !editing;
      outline.eachLayer((l) => (editing ? l.pm.enable({ allowSelfIntersection: false }) : l.pm.disable()));
      editShape.textContent = editing ? "Stop editing" : "Edit shape";
      shapeStatus.textContent = editing ? "Drag the corners; the midpoints add corners." : "";
    });
    outline.eachLayer((l) => l.on("pm:edit", () => {
      saveShape.hidden = false;
      shapeStatus.textContent = "Shape changed, not saved yet.";
    }));
    document.getElementById("shape-form").addEventListener("submit", async (event) => {
      event.preventDefault();
      try {
        await api("PATCH", `/api/areas/${id}`, { geometry: outlineGeometry(outline) });
        window.location.reload();
      } catch (err) {
        shapeStatus.textContent = err.message;
      }
    });
    document.getElementById("delete-area").addEventListener("click", async () => {
      if (!window.confirm("Delete this area with its acquisitions, analyses and findings?")) return;
      try {
        await api("DELETE", `/api/areas/${id}`);
        window.location.assign("/");
      } catch (err) {
        showError("settings-error", err.message);
      }
    });
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      showError("settings-error", "");
      document.getElementById("settings-saved").hidden = true;
      try {
        await api("PATCH", `/api/areas/${id}`, {
          max_cloud_cover: numberField(form, "max_cloud_cover"),
          min_clear_fraction: numberField(form, "min_clear_fraction"),
        });
        await api("PUT", `/api/areas/${id}/recipients`, { recipients: recipients(form.elements.recipients.value) });
        document.getElementById("settings-saved").hidden = false;
      } catch (err) {
        showError("settings-error", err.message);
      }
    });
    const toggle = document.getElementById("pause-resume");
    toggle.addEventListener("click", async () => {
      try {
        await api("POST", `/api/areas/${id}/${toggle.dataset.action}`);
        window.location.reload();
      } catch (err) {
        showError("settings-error", err.message);
      }
    });
  }

  // --- /analyses/{id}: the swipe and the regions -------------------------------------------------------
  function setupSwipe(onSplit) {
    const swipe = document.getElementById("swipe");
    if (!swipe) return;
    const range = document.getElementById("swipe-range");
    const clip = swipe.querySelector(".before-clip");
    const handle = swipe.querySelector(".handle");
    function setSplit(percent) {
      const p = Math.max(0, Math.min(100, percent));
      // The before image shows left of the split, the after image right of it.
      clip.style.clipPath = `inset(0 ${100 - p}% 0 0)`;
      handle.style.left = `${p}%`;
      swipe.dataset.split = p.toFixed(1);
      range.value = String(Math.round(p));
      if (onSplit) onSplit(p);
    }
    function fromPointer(event) {
      const box = swipe.getBoundingClientRect();
      setSplit(((event.clientX - box.left) / box.width) * 100);
    }
    swipe.addEventListener("pointerdown", (event) => {
      swipe.setPointerCapture(event.pointerId);
      swipe.classList.add("dragging");
      fromPointer(event);
    });
    swipe.addEventListener("pointermove", (event) => {
      if (swipe.classList.contains("dragging")) fromPointer(event);
    });
    const stop = () => swipe.classList.remove("dragging");
    swipe.addEventListener("pointerup", stop);
    swipe.addEventListener("pointercancel", stop);
    range.addEventListener("input", () => setSplit(Number(range.value)));
    const overlay = document.getElementById("show-overlay");
    if (overlay) {
      overlay.addEventListener("change", () => {
        swipe.querySelector("img.overlay").hidden = !overlay.checked;
      });
    }
    setSplit(50);
  }

  function analysisPage() {
    const data = pageData();
    const map = makeMap("map");
    // The before/after chips on the map where they lie (warped to Web Mercator by the server, so the
    // overlay's rectangle is exact), under the vectors; the swipe shows the before left of its split.
    const placed = data.placed || {};
    let beforeChip = null;
    if (placed.before && placed.after) {
      L.imageOverlay(placed.after.url, placed.after.bounds, { className: "placed-after" }).addTo(map);
      beforeChip = L.imageOverlay(placed.before.url, placed.before.bounds, { className: "placed-before" }).addTo(map);
    }
    window.unirs.map = map; // the page's map, for whoever scripts the page (the browser test places by it)
    setupSwipe((p) => {
      if (beforeChip && beforeChip.getElement()) beforeChip.getElement().style.clipPath = `inset(0 ${100 - p}% 0 0)`;
    });
    const outline = L.geoJSON(data.area, { style: { color: "#2563eb", weight: 2, fill: false } }).addTo(map);
    const regions = L.geoJSON({ type: "FeatureCollection", features: data.regions }, {
      style: (f) => ({ color: CLASS_COLOURS[f.properties.change_class] || "#6b7280", weight: 2, fillOpacity: 0.45 }),
      onEachFeature: (f, shape) => {
        const box = el("div");
        box.appendChild(el("strong", `${f.properties.change_class.replace(/_/g, " ")}: ` +
          `${(f.properties.hectares || 0).toFixed(2)} ha`));
        if (f.properties.caption) box.appendChild(el("div", f.properties.caption));
        shape.bindPopup(box);
      },
    }).addTo(map);
    fit(map, data.regions.length ? regions : outline);
  }

  const pages = { index: indexPage, area: areaPage, analysis: analysisPage };
  document.addEventListener("DOMContentLoaded", () => {
    const run = pages[body.dataset.page];
    if (run) run();
  });
  window.unirs = { CLASS_COLOURS };
})();
