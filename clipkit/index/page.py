"""The search page served at ``/``: one HTML document, inline CSS and JS, no external assets.

Results are built with ``textContent`` / element properties only (never ``innerHTML``), so a
caption or key cannot inject markup. ``__MAX_K__`` is replaced by the server's limit.
"""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>clipkit search</title>
<style>
  body { font: 15px system-ui, sans-serif; margin: 1.5rem; color: #222; }
  form { display: flex; gap: .5rem; flex-wrap: wrap; align-items: center; }
  #q { flex: 1 1 20rem; padding: .45rem; font-size: 1rem; }
  #k { width: 4.5rem; padding: .4rem; }
  #status { margin: .8rem 0; color: #555; min-height: 1.2em; }
  #status.error { color: #b00020; }
  #results { display: grid; grid-template-columns: repeat(auto-fill, minmax(160px, 1fr)); gap: 1rem; }
  figure.hit { margin: 0; padding: .5rem; border: 1px solid #ddd; border-radius: 6px; cursor: pointer; }
  figure.hit img { width: 100%; aspect-ratio: 1; object-fit: contain; background: #f6f6f6; }
  figure.hit figcaption { font-size: .85rem; margin-top: .3rem; overflow-wrap: anywhere; }
  figure.hit .score { font-size: .75rem; color: #777; }
</style>
</head>
<body>
<h1>clipkit search</h1>
<form id="search-form">
  <input id="q" name="q" type="search" placeholder="describe an image" autocomplete="off" autofocus>
  <label>k <input id="k" type="number" min="1" max="__MAX_K__" value="12"></label>
  <button id="go" type="submit">Search</button>
  <label>or an image: <input id="file" type="file" accept="image/*"></label>
</form>
<div id="status"></div>
<div id="results"></div>
<script>
"use strict";
const form = document.getElementById("search-form"), q = document.getElementById("q");
const kInput = document.getElementById("k"), file = document.getElementById("file");
const statusBox = document.getElementById("status"), results = document.getElementById("results");

function say(text, isError) {
  statusBox.textContent = text;
  statusBox.className = isError ? "error" : "";
}

function card(row) {
  const fig = document.createElement("figure");
  fig.className = "hit";
  fig.dataset.key = row.key;
  fig.title = "more like this";
  const img = document.createElement("img");
  if (row.image) img.src = row.image;
  img.alt = row.caption || row.key;
  const cap = document.createElement("figcaption");
  cap.textContent = row.caption || row.key;
  const score = document.createElement("div");
  score.className = "score";
  score.textContent = "score " + row.score.toFixed(3);
  fig.append(img, cap, score);
  fig.addEventListener("click", () =>
    run("/api/neighbours?key=" + encodeURIComponent(row.key) + "&k=" + encodeURIComponent(kInput.value)));
  return fig;
}

async function run(url, options) {
  say("searching...", false);
  let body;
  try {
    const response = await fetch(url, options);
    body = await response.json();
    if (!response.ok) { results.replaceChildren(); say(body.error || response.statusText, true); return; }
  } catch (err) { results.replaceChildren(); say("request failed: " + err, true); return; }
  results.replaceChildren(...body.results.map(card));
  say(body.results.length + " results in " + body.took_ms + " ms", false);
}

form.addEventListener("submit", (event) => {
  event.preventDefault();
  run("/api/search?q=" + encodeURIComponent(q.value) + "&k=" + encodeURIComponent(kInput.value));
});
file.addEventListener("change", () => {
  const f = file.files[0];
  if (f) run("/api/search/image?k=" + encodeURIComponent(kInput.value),
             {method: "POST", body: f, headers: {"Content-Type": f.type || "application/octet-stream"}});
});
</script>
</body>
</html>
"""
