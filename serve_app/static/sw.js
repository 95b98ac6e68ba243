// The page's service worker: the page opens with no network, from what it keeps here.
// - The shell (page, scripts, icons, manifest) is kept at install, in a cache named by its version: a redeploy
//   changes this file, the browser installs it at the next visit online, and the old shell is deleted.
// - "Save for offline" (the page) puts ONNX Runtime Web and the phone's model in the "waterbirds-offline" cache.
// - assets/ and model/ URLs name their content: served from a cache when there, never revalidated.
// - The page, offline.json, labels and models: the network first (a few seconds at most), else the copy kept.
// - Uploads (POST) and everything else go to the network untouched.
const SHELL_VERSION = "%SHELL_VERSION%";
const SHELL = %SHELL%;
const SHELL_CACHE = "waterbirds-shell-" + SHELL_VERSION;
const OFFLINE_CACHE = "waterbirds-offline";
const NETWORK_WAIT_MS = 4000;
const SCOPE = new URL(self.registration.scope).pathname;

self.addEventListener("install", (event) => {
  event.waitUntil(caches.open(SHELL_CACHE).then((cache) => cache.addAll(SHELL)).then(() => self.skipWaiting()));
});

self.addEventListener("activate", (event) => {
  event.waitUntil((async () => {
    for (const name of await caches.keys()) {
      if (name.startsWith("waterbirds-shell-") && name !== SHELL_CACHE) await caches.delete(name);
    }
    await self.clients.claim();
  })());
});

// The network's answer, kept for later, unless it takes longer than NETWORK_WAIT_MS; else the copy kept. The page
// itself is kept under the scope's URL whatever its query.
async function networkFirst(request, path) {
  const shell = path === "" || SHELL.includes(path);
  const key = path === "" ? new URL("./", self.registration.scope).href : request;
  const controller = new AbortController();
  const timer = setTimeout(() => controller.abort(), NETWORK_WAIT_MS);
  try {
    const response = await fetch(request, { signal: controller.signal });
    if (response.ok) await (await caches.open(shell ? SHELL_CACHE : OFFLINE_CACHE)).put(key, response.clone());
    return response;
  } catch (error) {
    const kept = await caches.match(key);
    if (kept) return kept;
    throw error;
  } finally {
    clearTimeout(timer);
  }
}

async function cacheFirst(request) {
  return (await caches.match(request)) || fetch(request);
}

self.addEventListener("fetch", (event) => {
  const request = event.request;
  const url = new URL(request.url);
  if (request.method !== "GET" || url.origin !== self.location.origin || !url.pathname.startsWith(SCOPE)) return;
  const path = url.pathname.slice(SCOPE.length);
  if (request.mode === "navigate" || path === "") {
    event.respondWith(networkFirst(request, ""));
  } else if (path.startsWith("assets/") || path.startsWith("model/")) {
    event.respondWith(cacheFirst(request));
  } else if (path === "offline.json" || path === "labels" || path === "models" || path === "manifest.webmanifest") {
    event.respondWith(networkFirst(request, path));
  }
});
