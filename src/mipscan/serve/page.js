// Fills the user list, then shows one user's approximate and exact top-10 (titles only
// through textContent: nothing from the server is parsed as HTML). The checkbox asks the
// server to exclude the movies the user rated (a filtered search: excluded=...).
const select = document.getElementById("user");
const exclude = document.getElementById("exclude");
const status = document.getElementById("status");

async function getJSON(url) {
  const r = await fetch(url);
  const body = await r.json();
  if (!r.ok) throw new Error(body.error || r.statusText);
  return body;
}

async function show() {
  status.textContent = "searching…";
  delete status.dataset.done;
  const user = encodeURIComponent(select.value);
  const r = await getJSON(`/page/recommend?user=${user}&k=10&exclude_rated=${exclude.checked ? 1 : 0}`);
  const exact = new Set(r.exact.map((x) => x.id));
  const approx = new Set(r.approximate.map((x) => x.id));
  for (const [name, items, other] of [["approximate", r.approximate, exact],
                                      ["exact", r.exact, approx]]) {
    const ol = document.getElementById(name);
    ol.replaceChildren(...items.map((x) => {
      const li = document.createElement("li");
      li.textContent = x.title;
      if (other.has(x.id)) li.className = "both";
      return li;
    }));
  }
  const rated = r.exclude_rated ? ", rated movies excluded" : "";
  status.textContent = `user ${r.user}: ${[...approx].filter((i) => exact.has(i)).length}/${r.k} in common${rated}`;
  status.dataset.excludeRated = r.exclude_rated ? "1" : "0";
  status.dataset.done = "1";
}

function report(e) { status.textContent = `error: ${e.message}`; }

(async () => {
  try {
    const { users, rated } = await getJSON("/page/users");
    for (const u of users) select.add(new Option(`user ${u}`, u));
    exclude.disabled = !rated;
    const params = new URLSearchParams(location.search);
    if (params.get("user") !== null) select.value = params.get("user");
    select.onchange = () => show().catch(report);
    exclude.onchange = () => show().catch(report);
    await show();
    // ?exclude=1 ticks the box as a click would (its change handler searches again):
    // what the page's test drives in headless Chromium.
    if (params.get("exclude") === "1" && !exclude.disabled) exclude.click();
  } catch (e) {
    report(e);
  }
})();
