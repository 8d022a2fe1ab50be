"use strict";
// The live feed page. Every string from the server is producer data and untrusted: the DOM is
// built with createElement and textContent only (never innerHTML), ids are percent-encoded
// whole in every URL, and the page's Content-Security-Policy admits no inline script.

const POLL_MS = 1500;
const STATUS_MS = 2000;
const THUMB = 256;
const WHY = { interaction: "after an interaction", fresh_item: "fresh item", request: "ranked on request" };

const byId = (id) => document.getElementById(id);
const enc = (id) => encodeURIComponent(id);
const why = (trigger) => WHY[trigger] || String(trigger);
const when = (ts) => new Date(ts * 1000).toLocaleString();

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

async function getJson(url) {
  const response = await fetch(url, { cache: "no-store", headers: { Accept: "application/json" } });
  const body = response.headers.get("Content-Type")?.startsWith("application/json") ? await response.json() : null;
  return { status: response.status, body };
}

function picture(item, size) {
  const frame = el("div", "pic");
  if (!item.has_image) {
    frame.classList.add("noimg");
    return frame;
  }
  const img = el("img");
  img.alt = item.title || item.item_id;
  img.addEventListener("error", () => frame.classList.add("noimg"));
  img.src = "/ui/images/" + enc(item.item_id) + "?size=" + size;
  frame.append(img);
  return frame;
}

function card(item, lines) {
  const node = el("a", "card");
  node.href = "/ui/items/" + enc(item.item_id);
  node.dataset.itemId = item.item_id;
  node.append(picture(item, THUMB), el("div", "title", item.title || item.item_id));
  for (const line of lines) node.append(el("div", "meta", line));
  return node;
}

function note(text) {
  byId("note").textContent = text;
}

// --- status strip -----------------------------------------------------------------------
async function pollStatus() {
  try {
    const { status, body } = await getJson("/ui/api/status");
    if (status === 200) {
      const show = (value) => (value === null || value === undefined ? "–" : String(value));
      byId("st-rate").textContent = show(body.events_per_s);
      byId("st-lag").textContent = show(body.lag);
      byId("st-items").textContent = show(body.items_indexed);
    }
  } catch (err) {
    byId("st-rate").textContent = "offline";
  }
  setTimeout(pollStatus, STATUS_MS);
}

// --- index: recently pushed users -------------------------------------------------------
async function pollUsers() {
  const query = byId("find").value.trim();
  try {
    const { status, body } = await getJson("/ui/api/users?q=" + enc(query));
    if (status === 200) {
      const rows = body.users.map((user) => {
        const row = el("li");
        const link = el("a", "", user.user_id);
        link.href = "/ui/users/" + enc(user.user_id);
        row.append(link, el("span", "why", why(user.trigger) + " · " + when(user.generated_at)));
        return row;
      });
      if (!rows.length) rows.push(el("li", "hint", "No recommendations pushed yet: send some interactions."));
      byId("users").replaceChildren(...rows);
    }
  } catch (err) {
    // the next poll retries
  }
}

function initIndex() {
  byId("find").addEventListener("input", pollUsers);
  const loop = async () => {
    await pollUsers();
    setTimeout(loop, STATUS_MS);
  };
  loop();
}

// --- a user's page: recommendations and history, live ----------------------------------
function initUser(userId) {
  let version = "";
  const reasons = new Map(); // item_id -> trigger of the push that brought it into the list

  function draw(data) {
    const first = reasons.size === 0;
    const current = new Set(data.recs.items.map((item) => item.item_id));
    for (const id of [...reasons.keys()]) if (!current.has(id)) reasons.delete(id);
    const recs = data.recs.items.map((item) => {
      const added = !reasons.has(item.item_id);
      if (added) reasons.set(item.item_id, data.recs.trigger);
      const node = card(item, ["score " + item.score.toFixed(3), "why: " + why(reasons.get(item.item_id))]);
      if (added && !first) node.classList.add("new");
      return node;
    });
    byId("recs").replaceChildren(...recs);
    byId("trigger").textContent = why(data.recs.trigger) + " · " + new Date(data.recs.generated_at * 1000).toLocaleTimeString();
    byId("history").replaceChildren(...data.recent.map((item) => card(item, [item.event + " · " + when(item.ts)])));
    byId("count").textContent = data.interactions + " in all";
    note("");
  }

  async function poll() {
    try {
      const { status, body } = await getJson("/ui/api/users/" + enc(userId) + "?since=" + enc(version));
      if (status === 200 && !body.unchanged) {
        version = body.version;
        draw(body);
      } else if (status === 404) {
        note("No interactions from this user yet. The page updates when they arrive.");
      } else if (status !== 200) {
        note("The stream processor is not ready (HTTP " + status + "); retrying.");
      }
    } catch (err) {
      note("Connection lost; retrying.");
    }
    setTimeout(poll, POLL_MS);
  }
  poll();
}

// --- an item and its nearest items -------------------------------------------------------
async function initItem(itemId) {
  try {
    const { status, body } = await getJson("/ui/api/items/" + enc(itemId));
    if (status !== 200) {
      note("Unknown item (not embedded yet?).");
      return;
    }
    byId("picture").replaceWith(picture(body, 512));
    byId("title").textContent = body.title || body.item_id;
    byId("category").textContent = body.category;
    byId("nearest").replaceChildren(...body.nearest.map((item) => card(item, ["cosine " + item.score.toFixed(3)])));
  } catch (err) {
    note("Connection lost; reload to retry.");
  }
}

document.addEventListener("DOMContentLoaded", () => {
  const { page, id } = document.body.dataset;
  pollStatus();
  if (page === "index") initIndex();
  else if (page === "user") initUser(id);
  else if (page === "item") initItem(id);
});
