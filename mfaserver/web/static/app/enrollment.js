// Enrolling this browser: a key, a Web Push subscription if the server wakes
// devices that way, the signed POST, the device kept in IndexedDB.
// Used by the enrollment link's page and by "Add an account" on /app/.

import { enroll } from './api.js';
import { b64urlDecode, b64urlEncode, createKey } from './protocol.js';
import { saveDevice } from './store.js';

const SUBSCRIBE_SECONDS = 15;      // a browser without a push service may never answer

/** On iOS, Web Push works only in an app added to the Home Screen. */
export function needsHomeScreen() {
  const ios = /iPad|iPhone|iPod/.test(navigator.userAgent)
    || (navigator.platform === 'MacIntel' && navigator.maxTouchPoints > 1);
  const standalone = navigator.standalone === true
    || window.matchMedia('(display-mode: standalone)').matches;
  return ios && !standalone;
}

/** The service worker's registration (scope /app/), once its worker is active. */
export async function registerWorker() {
  const registration = await navigator.serviceWorker.register('/app/sw.js', { scope: '/app/' });
  const worker = registration.installing || registration.waiting;
  if (!registration.active && worker) {
    await new Promise((resolve, reject) => {
      const check = () => {
        if (worker.state === 'activated') resolve();
        if (worker.state === 'redundant') reject(new Error('the service worker failed'));
      };
      worker.addEventListener('statechange', check);
      check();
    });
  }
  return registration;
}

function timeout(promise, seconds) {
  return Promise.race([promise, new Promise((resolve, reject) => setTimeout(
    () => reject(new Error('no answer from the push service')), seconds * 1000))]);
}

/** {notify} for the enrollment, or {why} there is none. */
async function subscribe(vapidKey) {
  if (!('serviceWorker' in navigator) || !('PushManager' in window)
      || !('Notification' in window)) {
    return { why: needsHomeScreen()
      ? 'Safari can notify you only from the Home Screen (see below).'
      : 'This browser cannot show notifications.' };
  }
  const permission = await Notification.requestPermission();
  if (permission !== 'granted') return { why: 'Notifications are not allowed.' };
  try {
    const { pushManager } = await registerWorker();
    const options = { userVisibleOnly: true, applicationServerKey: b64urlDecode(vapidKey) };
    let subscription;
    try {
      subscription = await timeout(pushManager.subscribe(options), SUBSCRIBE_SECONDS);
    } catch (error) {
      // One subscription serves every account here; one for an old server key must go.
      const old = error.name === 'InvalidStateError' && await pushManager.getSubscription();
      if (!old) throw error;
      await old.unsubscribe();
      subscription = await timeout(pushManager.subscribe(options), SUBSCRIBE_SECONDS);
    }
    return { notify: { type: 'webpush', url: subscription.endpoint, keys: {
      p256dh: b64urlEncode(new Uint8Array(subscription.getKey('p256dh'))),
      auth: b64urlEncode(new Uint8Array(subscription.getKey('auth'))),
    } } };
  } catch (error) {
    return { why: `This browser could not subscribe to notifications (${error.message}).` };
  }
}

/** Enroll this browser with the token; {user, notified, why}. `say(text)` reports progress;
 * `vapidKey` is the server's Web Push key (settings.json, fetched before the click: the
 * notification prompt must follow the click closely); `kind` forces a key type.
 * Throws an ApiError (see describe) if the server refuses. */
export async function enrollThisBrowser(token, say, vapidKey, kind) {
  if (vapidKey) say('Setting up notifications…');
  let { notify, why } = vapidKey ? await subscribe(vapidKey)
    : { why: 'This server does not send notifications.' };
  say('Making a key and enrolling…');
  const key = await createKey(kind);
  let result;
  try {
    result = await enroll(token, key, notify);
  } catch (error) {
    if (!notify || error.status !== 400) throw error;
    // A server that cannot take this browser's subscription: enroll without it.
    [notify, why] = [null, 'The server did not accept this browser’s notifications.'];
    result = await enroll(token, key, null);
  }
  await saveDevice({ id: result.device_id, user: result.user, kind: key.kind,
    privateKey: key.privateKey, publicKey: key.publicKey, notify: notify ? 'webpush' : null,
    enrolled: Date.now() });
  // Ask the browser not to clear the key when space runs short (best effort).
  if (navigator.storage && navigator.storage.persist) navigator.storage.persist().catch(() => {});
  return { user: result.user, notified: Boolean(notify), why };
}

/** What the enrolled page says: enrolled for whom, and how sign-ins reach this phone. */
export function enrolledWords({ user, notified, why }) {
  const how = notified ? 'This phone will be notified of sign-ins.'
    : `${why} Keep the authenticator open to see sign-ins.`;
  return `This phone is now enrolled for ${user}. ${how}`;
}

/** Show the Home Screen steps where notifications need them. */
export function showHomeScreenSteps(vapidKey) {
  const section = document.getElementById('home-screen');
  if (section && vapidKey && needsHomeScreen()) section.hidden = false;
}
