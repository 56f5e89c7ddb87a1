// The web authenticator's service worker (scope /app/). It keeps the app shell,
// so the page opens after a reload, a restart or without a network, and it
// shows Web Push wake-ups. It never caches an API answer: only the files below.

const VERSION = '__SHELL_VERSION__';    // written by the server: changes with any of them
const CACHE = `mfaserver-app-${VERSION}`;
const SHELL = ['/app/', '/app/app.js', '/app/api.js', '/app/enrollment.js', '/app/protocol.js',
  '/app/store.js', '/app/app.css', '/assets/style.css', '/app/manifest.webmanifest',
  '/app/icon-192.png'];

self.addEventListener('install', (event) => {
  event.waitUntil(caches.open(CACHE)
    .then((cache) => cache.addAll(SHELL.map((url) => new Request(url, { cache: 'reload' }))))
    .then(() => self.skipWaiting()));
});

self.addEventListener('activate', (event) => {
  event.waitUntil(caches.keys()
    .then((names) => Promise.all(names
      .filter((name) => name.startsWith('mfaserver-app-') && name !== CACHE)
      .map((name) => caches.delete(name))))
    .then(() => self.clients.claim()));
});

self.addEventListener('fetch', (event) => {
  const url = new URL(event.request.url);
  if (event.request.method !== 'GET' || url.origin !== self.location.origin
      || !SHELL.includes(url.pathname)) {
    return;     // to the network, as if there were no worker
  }
  event.respondWith(caches.open(CACHE)
    .then((cache) => cache.match(url.pathname))
    .then((hit) => hit || fetch(event.request)));
});

// A wake-up is only a hint (it is not signed): whatever it carries, say no more
// than this. The page then polls, signed, to learn what the sign-in is.
self.addEventListener('push', (event) => {
  event.waitUntil(self.registration.showNotification('A sign-in needs you', {
    tag: 'mfaserver-sign-in', renotify: true, icon: '/app/icon-192.png',
  }));
});

self.addEventListener('notificationclick', (event) => {
  event.notification.close();
  event.waitUntil(self.clients.matchAll({ type: 'window', includeUncontrolled: true })
    .then((windows) => {
      const open = windows.find((w) => new URL(w.url).pathname.startsWith('/app/'));
      return open ? open.focus() : self.clients.openWindow('/app/');
    }));
});
