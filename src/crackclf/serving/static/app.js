// crackclf web page: pick or drop one photo -> POST analyze -> verdict, probability and crack-map overlay.
// Plain browser JavaScript, no build step. URLs are relative so the page also works behind a path prefix.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const input = $("file"), dropzone = $("dropzone"), errorBox = $("error"), status = $("status");
  const result = $("result"), verdict = $("verdict"), details = $("details");
  const preview = $("preview"), overlay = $("overlay");
  let limits = null;       // from GET model: max_upload_bytes, formats, ...
  let requestNumber = 0;   // only the answer to the latest request is shown
  let previewUrl = null;

  const percent = (p) => `${(100 * p).toFixed(1)} %`;
  const megabytes = (n) => `${(n / 1048576).toFixed(n < 1048576 ? 2 : 0)} MB`;

  function showError(message) {
    errorBox.textContent = message;
    errorBox.hidden = false;
    status.textContent = "";
  }

  function clearError() {
    errorBox.hidden = true;
    errorBox.textContent = "";
  }

  async function loadModel() {
    try {
      const response = await fetch("model");
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      const model = await response.json();
      limits = model.limits;
      $("model-info").textContent = `Model: ${model.name} (${model.backbone}, ${model.image_size} px input, ` +
        `decision threshold ${percent(model.threshold)}${model.run_id ? `, MLflow run ${model.run_id}` : ""}).`;
      $("limits-text").textContent = `Up to ${megabytes(limits.max_upload_bytes)}; ` +
        `${limits.formats.filter((f) => f !== "MPO").join(", ")}.`;  // MPO is a kind of JPEG
    } catch (error) {
      $("model-info").textContent = "Model information is unavailable (is the server running?).";
    }
  }

  async function errorMessage(response) {
    let detail = "";
    try {
      const body = await response.json();
      detail = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
    } catch (error) {
      detail = response.statusText;
    }
    if (response.status === 503) {
      const wait = response.headers.get("Retry-After") || "a few";
      return `The server is busy. Please try again in ${wait} s. (${detail})`;
    }
    return `The photo could not be analysed: ${detail || `HTTP ${response.status}`}`;
  }

  function showResult(file, body) {
    const v = body.verdict, s = body.summary;
    verdict.textContent = v.is_crack ? "Crack detected" : "No crack detected";
    verdict.className = `verdict ${v.is_crack ? "crack" : "no-crack"}`;
    verdict.dataset.label = v.label;
    const probability = `Crack probability ${percent(v.probability)} (threshold ${percent(v.threshold)}).`;
    details.textContent = s.tiles > 1
      ? `${probability} ${s.cracked_tiles} of ${s.tiles} windows of ${s.window} px are cracked, covering ` +
        `${percent(s.cracked_area_fraction)} of the photo.`
      : probability;
    overlay.alt = `Crack map of ${file.name}: ${s.cracked_tiles} of ${s.tiles} windows outlined as cracked.`;
    overlay.src = body.overlay;
    result.hidden = false;
    status.classList.add("visually-hidden");  // still announced by screen readers; the result shows it on screen
    status.textContent = `${verdict.textContent}. ${probability}`;
  }

  async function analyze(file) {
    clearError();
    const number = ++requestNumber;
    if (limits && file.size > limits.max_upload_bytes) {
      showError(`${file.name} is ${megabytes(file.size)}; the server accepts up to ` +
        `${megabytes(limits.max_upload_bytes)}. Please choose a smaller photo.`);
      return;
    }
    if (file.size === 0) {
      showError(`${file.name} is empty (0 bytes). Please choose another file.`);
      return;
    }
    if (previewUrl) URL.revokeObjectURL(previewUrl);
    previewUrl = URL.createObjectURL(file);
    preview.src = previewUrl;
    preview.alt = `Your photo ${file.name}`;
    overlay.removeAttribute("src");
    verdict.textContent = "";
    details.textContent = "";
    result.hidden = true;
    result.setAttribute("aria-busy", "true");
    status.classList.remove("visually-hidden");
    status.textContent = `Analysing ${file.name}…`;

    const form = new FormData();
    form.append("file", file, file.name);
    try {
      const response = await fetch("analyze?tiles=false", { method: "POST", body: form });
      if (number !== requestNumber) return;  // a newer photo was chosen meanwhile
      if (!response.ok) {
        showError(await errorMessage(response));
        return;
      }
      showResult(file, await response.json());
    } catch (error) {
      if (number === requestNumber) showError(`The server could not be reached (${error.message}).`);
    } finally {
      if (number === requestNumber) result.removeAttribute("aria-busy");
    }
  }

  input.addEventListener("change", () => {
    if (input.files.length) analyze(input.files[0]);
  });

  // Drag and drop: the whole page accepts a drop (so a near miss does not navigate away to the file).
  ["dragenter", "dragover"].forEach((type) => document.addEventListener(type, (event) => {
    event.preventDefault();
    dropzone.classList.add("dragover");
  }));
  ["dragleave", "dragend"].forEach((type) => document.addEventListener(type, (event) => {
    if (event.target === document.documentElement || event.target === dropzone) {
      dropzone.classList.remove("dragover");
    }
  }));
  document.addEventListener("drop", (event) => {
    event.preventDefault();
    dropzone.classList.remove("dragover");
    const files = event.dataTransfer ? event.dataTransfer.files : [];
    if (!files.length) {
      showError("Nothing to analyse: drop an image file.");
      return;
    }
    analyze(files[0]);
    if (files.length > 1) status.textContent += ` (only the first of ${files.length} files is analysed)`;
  });

  loadModel();
})();
