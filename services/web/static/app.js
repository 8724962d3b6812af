// The visual search page: calls the edge's JSON API (/api/...) and renders the answers.
"use strict";

const RESULTS_K = 12;
const SIMILAR_K = 8;
const state = { photo: null, liked: new Set(), skipped: new Set(), titles: new Map() };
const $ = (id) => document.getElementById(id);

// ------------------------------------------------------------------ talking to the edge

class ApiError extends Error {
  constructor(message, status) { super(message); this.status = status; }
}

async function api(path, options = {}) {
  let response;
  try {
    response = await fetch(path, options);
  } catch (err) {
    throw new ApiError("The page cannot reach the server. Check your connection and try again.", 0);
  }
  let body = null;
  try { body = await response.json(); } catch (err) { body = null; }
  if (!response.ok) {
    let detail = body && body.detail;
    if (Array.isArray(detail)) {   // FastAPI's own validation errors
      detail = detail.map((d) => `${(d.loc || []).slice(1).join(".")}: ${d.msg}`).join("; ");
    }
    throw new ApiError(detail || `The server answered ${response.status}.`, response.status);
  }
  return body;
}

function filterParams(params = new URLSearchParams()) {
  const category = $("category").value;
  const min = $("min-price").value.trim();
  const max = $("max-price").value.trim();
  if (category) params.set("main_category", category);
  if (min !== "") params.set("min_price", min);
  if (max !== "") params.set("max_price", max);
  // an index shard that is down leaves its listings out (named in the answer's notice) rather
  // than failing the whole search
  params.set("allow_partial_results", "true");
  return params;
}

function filterBody() {
  const min = $("min-price").value.trim();
  const max = $("max-price").value.trim();
  return { main_category: $("category").value,
           min_price: min === "" ? null : Number(min), max_price: max === "" ? null : Number(max) };
}

// ------------------------------------------------------------------ messages

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

function showStatus(message) {
  $("status").textContent = message;
  $("status").hidden = !message;
}

// ------------------------------------------------------------------ rendering

function formatPrice(listing) {
  if (listing.price === null || listing.price === undefined) return "price not given";
  try {
    return new Intl.NumberFormat("en-GB", { style: "currency", currency: listing.currency || "GBP" })
      .format(listing.price);
  } catch (err) {
    return `${listing.price} ${listing.currency}`;
  }
}

function photoElement(url, alt) {
  const img = document.createElement("img");
  img.alt = alt;
  img.decoding = "async";
  if (url) img.src = url;
  img.addEventListener("error", () => {
    img.classList.add("missing");
    img.alt = `${alt} (photo not available)`;
  });
  return img;
}

function card(result) {
  const listing = result.listing;
  state.titles.set(listing.id, listing.title);
  const item = document.createElement("li");
  item.className = "card";
  item.dataset.listingId = listing.id;

  const open = document.createElement("button");
  open.type = "button";
  open.className = "open";
  open.setAttribute("aria-label", `Details of ${listing.title}`);
  open.append(photoElement(result.image_url, listing.title));
  const text = document.createElement("div");
  text.className = "text";
  const title = document.createElement("div");
  title.className = "title";
  title.textContent = listing.title;
  const price = document.createElement("div");
  price.className = "price";
  price.textContent = formatPrice(listing);
  const location = document.createElement("div");
  location.className = "meta location";
  location.textContent = listing.location || "location not given";
  const score = document.createElement("div");
  score.className = "meta score";
  score.textContent = `score ${result.score.toFixed(3)} · ${listing.main_category}`;
  text.append(title, price, location, score);
  open.append(text);
  open.addEventListener("click", () => openDetails(listing.id));

  const actions = document.createElement("div");
  actions.className = "actions";
  const like = document.createElement("button");
  like.type = "button";
  like.className = "like";
  like.textContent = "Like";
  like.setAttribute("aria-label", `Like ${listing.title}`);
  like.setAttribute("aria-pressed", String(state.liked.has(listing.id)));
  like.addEventListener("click", () => feedback(listing.id, "liked"));
  const skip = document.createElement("button");
  skip.type = "button";
  skip.className = "skip secondary";
  skip.textContent = "Skip";
  skip.setAttribute("aria-label", `Skip ${listing.title}`);
  skip.setAttribute("aria-pressed", String(state.skipped.has(listing.id)));
  skip.addEventListener("click", () => feedback(listing.id, "skipped"));
  actions.append(like, skip);
  item.append(open, actions);
  return item;
}

function renderResults(listElement, summaryElement, answer, what) {
  const results = answer.results;
  listElement.replaceChildren(...results.map(card));
  const summary = results.length
    ? `${results.length} listing${results.length === 1 ? "" : "s"} ${what}.`
    : `No listings ${what}; try fewer filters.`;
  // missing index shards, in words (answer.notice is empty when the results are complete)
  summaryElement.textContent = answer.notice ? `${summary} ${answer.notice}` : summary;
  summaryElement.classList.toggle("partial", Boolean(answer.notice));
}

function renderPrediction(classification) {
  const [best] = classification.categories;
  $("prediction-panel").hidden = false;
  $("predicted-category").textContent =
    `${best.category} (${(best.probability * 100).toFixed(1)}%)`;
  $("prediction").replaceChildren(...classification.categories.map((c) => {
    const li = document.createElement("li");
    const name = document.createElement("span");
    name.textContent = c.category;
    const meter = document.createElement("meter");
    meter.min = 0; meter.max = 1; meter.value = c.probability;
    meter.setAttribute("aria-label", `Probability of ${c.category}`);
    const percent = document.createElement("span");
    percent.textContent = `${(c.probability * 100).toFixed(1)}%`;
    li.append(name, meter, percent);
    return li;
  }));
}

function syncFeedbackButtons() {
  document.querySelectorAll(".card").forEach((item) => {
    const id = item.dataset.listingId;
    item.querySelector(".like").setAttribute("aria-pressed", String(state.liked.has(id)));
    item.querySelector(".skip").setAttribute("aria-pressed", String(state.skipped.has(id)));
  });
}

// ------------------------------------------------------------------ actions

async function search() {
  clearError();
  const text = $("query").value.trim();
  if (!state.photo && !text) {
    showError("Add a photo or type a text query first.");
    return;
  }
  const params = filterParams(new URLSearchParams({ k: String(RESULTS_K) }));
  $("results-summary").textContent = "Searching…";
  try {
    let answer;
    let what;
    if (state.photo && text) {
      const form = new FormData();
      form.append("image", state.photo);
      form.append("text", text);
      form.append("text_weight", $("text-weight").value);
      answer = await api(`/api/search?${params}`, { method: "POST", body: form });
      what = `matching the photo and “${text}” (text weight ${$("text-weight").value})`;
    } else if (state.photo) {
      const form = new FormData();
      form.append("image", state.photo);
      answer = await api(`/api/search/image?${params}`, { method: "POST", body: form });
      what = "that look like the photo";
    } else {
      params.set("q", text);
      answer = await api(`/api/search/text?${params}`);
      what = `matching “${text}”`;
    }
    renderResults($("results"), $("results-summary"), answer, what);
  } catch (err) {
    $("results-summary").textContent = "The search failed.";
    showError(err.message);
  }
}

async function classify() {
  const form = new FormData();
  form.append("image", state.photo);
  try {
    renderPrediction(await api("/api/classify?top_k=5", { method: "POST", body: form }));
  } catch (err) {
    $("prediction-panel").hidden = true;
    throw err;
  }
}

async function usePhoto(file) {
  if (!file) return;
  clearError();
  state.photo = file;
  const preview = $("preview");
  if (preview.src) URL.revokeObjectURL(preview.src);
  preview.src = URL.createObjectURL(file);
  preview.alt = `Your photo: ${file.name}`;
  preview.hidden = false;
  $("clear-photo").hidden = false;
  try {
    await classify();
  } catch (err) {
    // the gateway's reason is on the page; searching the same photo would only repeat it
    showError(`This photo could not be used: ${err.message}`);
    clearPhoto();
    $("results").replaceChildren();
    $("results-summary").textContent = "The photo could not be searched.";
    return;
  }
  await search();
}

function clearPhoto() {
  state.photo = null;
  $("preview").hidden = true;
  $("preview").removeAttribute("src");
  $("clear-photo").hidden = true;
  $("prediction-panel").hidden = true;
  $("photo").value = "";
  $("camera").value = "";
}

async function feedback(listingId, kind) {
  const [mine, other] = kind === "liked" ? [state.liked, state.skipped] : [state.skipped, state.liked];
  if (mine.has(listingId)) mine.delete(listingId); else { mine.add(listingId); other.delete(listingId); }
  syncFeedbackButtons();
  await recommend();
}

async function recommend() {
  const panel = $("recommendations-panel");
  if (state.liked.size === 0) {
    panel.hidden = true;
    $("recommendations").replaceChildren();
    return;
  }
  clearError();
  panel.hidden = false;
  $("recommendations-summary").textContent = "Finding recommendations…";
  try {
    const answer = await api("/api/recommend", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ liked: [...state.liked], skipped: [...state.skipped], k: RESULTS_K,
                             filter: filterBody(), allow_partial_results: true }),
    });
    const names = [...state.liked].map((id) => `“${state.titles.get(id) || id}”`).join(", ");
    renderResults($("recommendations"), $("recommendations-summary"), answer,
                  `like ${names}`);
  } catch (err) {
    $("recommendations-summary").textContent = "No recommendations.";
    showError(err.message);
  }
}

async function openDetails(listingId) {
  clearError();
  const dialog = $("details");
  try {
    const listing = await api(`/api/listings/${encodeURIComponent(listingId)}`);
    $("details-title").textContent = listing.title;
    $("details-photos").replaceChildren(...listing.image_urls.map(
      (url, i) => photoElement(url, `${listing.title}, photo ${i + 1}`)));
    const facts = [["Price", formatPrice(listing)], ["Location", listing.location || "not given"],
                   ["Category", listing.category || listing.main_category]];
    $("details-facts").replaceChildren(...facts.flatMap(([name, value]) => {
      const dt = document.createElement("dt"); dt.textContent = name;
      const dd = document.createElement("dd"); dd.textContent = value;
      return [dt, dd];
    }));
    $("details-description").textContent = listing.description;
    $("similar").replaceChildren();
    $("similar-summary").textContent = "Finding similar listings…";
    if (!dialog.open) dialog.showModal();
    const params = filterParams(new URLSearchParams({ k: String(SIMILAR_K) }));
    try {
      const similar = await api(`/api/listings/${encodeURIComponent(listingId)}/similar?${params}`);
      renderResults($("similar"), $("similar-summary"), similar,
                    `look like “${listing.title}”`);
    } catch (err) {
      $("similar-summary").textContent = `No similar listings: ${err.message}`;
    }
  } catch (err) {
    showError(err.message);
  }
}

async function loadCategories() {
  try {
    const answer = await api("/api/categories");
    const select = $("category");
    for (const name of answer.categories) {
      const option = document.createElement("option");
      option.value = name; option.textContent = name;
      select.append(option);
    }
  } catch (err) {
    // the status line already says when the service is down
  }
}

async function checkHealth() {
  try {
    const health = await api("/api/health");
    showStatus(health.ready ? "" : "The search service is not available right now " +
               `(gateway: ${health.gateway}). The page works again as soon as it is back.`);
    return health.ready;
  } catch (err) {
    showStatus(err.message);
    return false;
  }
}

// ------------------------------------------------------------------ wiring

function wire() {
  const zone = $("dropzone");
  ["dragenter", "dragover"].forEach((name) => zone.addEventListener(name, (event) => {
    event.preventDefault(); zone.classList.add("over");
  }));
  ["dragleave", "drop"].forEach((name) => zone.addEventListener(name, (event) => {
    event.preventDefault(); zone.classList.remove("over");
  }));
  zone.addEventListener("drop", (event) => usePhoto(event.dataTransfer.files[0]));
  zone.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") { event.preventDefault(); $("photo").click(); }
  });
  $("photo").addEventListener("change", (event) => usePhoto(event.target.files[0]));
  $("camera").addEventListener("change", (event) => usePhoto(event.target.files[0]));
  $("clear-photo").addEventListener("click", clearPhoto);
  $("text-weight").addEventListener("input", (event) => {
    $("text-weight-value").textContent = event.target.value;
  });
  $("text-form").addEventListener("submit", (event) => { event.preventDefault(); search(); });
  $("close-details").addEventListener("click", () => $("details").close());
}

document.addEventListener("DOMContentLoaded", async () => {
  wire();
  if (await checkHealth()) await loadCategories();
});
