// The enrollment link's page (GET /v1/enroll/<token>): the server found the link
// live; "Enroll this phone" enrolls this browser, then the app opens.

import { describe, settings } from './api.js';
import { enrollThisBrowser, enrolledWords, showHomeScreenSteps } from './enrollment.js';

const OPEN_APP_AFTER_MS = 3000;

const token = decodeURIComponent(window.location.pathname.split('/').pop());
const button = document.getElementById('enroll');
const progress = document.getElementById('progress');
const say = (text, kind = '') => {
  progress.textContent = text;
  progress.className = `result ${kind}`;
};

let vapidKey = null;

button.addEventListener('click', async () => {
  button.disabled = true;
  try {
    const enrolled = await enrollThisBrowser(token, say, vapidKey);
    say(enrolledWords(enrolled), 'ok');
    button.hidden = true;
    const next = document.getElementById('continue');
    next.hidden = false;
    next.querySelector('a').focus();
    setTimeout(() => window.location.replace('/app/'), OPEN_APP_AFTER_MS);
  } catch (error) {
    say(describe(error, 'link'), 'error');
    button.disabled = false;
  }
});

const copy = document.getElementById('copy-link');
copy.addEventListener('click', async () => {
  const result = document.getElementById('copy-result');
  try {
    await navigator.clipboard.writeText(window.location.href);
    result.textContent = 'Copied.';
  } catch (error) {
    result.textContent = 'Copy the address from Safari’s address bar instead.';
  }
});

// Ready once the server said whether it sends notifications.
button.disabled = true;
settings().then((s) => {
  vapidKey = s.vapid_public_key;
  showHomeScreenSteps(vapidKey);
}, () => {}).finally(() => { button.disabled = false; });
