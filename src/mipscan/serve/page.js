// Fills the user list, then shows one user's approximate and exact top-10 (titles only
// through textContent: nothing from the server is parsed as HTML).
const select = document.getElementById("user");
const status = document.getElementById("status");

async function getJSON(url) {
  const r = await fetch(url);
  const body = await r.json();
  if (!r.ok) throw new Error(body.error || r.statusText);
  return body;
}

async function show(user) {
  status.textContent = "searching…";
  const r = await getJSON(`/page/recommend?user=${encodeURIComponent(user)}&k=10`);
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
  status.textContent = `user ${r.user}: ${[...approx].filter((i) => exact.has(i)).length}/${r.k} in common`;
  status.dataset.done = "1";
}

(async () => {
  try {
    const { users } = await getJSON("/page/users");
    for (const u of users) select.add(new Option(`user ${u}`, u));
    const wanted = new URLSearchParams(location.search).get("user");
    if (wanted !== null) select.value = wanted;
    select.onchange = () => show(select.value).catch((e) => { status.textContent = e.message; });
    await show(select.value);
  } catch (e) {
    status.textContent = `error: ${e.message}`;
  }
})();
