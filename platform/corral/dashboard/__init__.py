"""The jobs dashboard's static files (package data): `index.html`, `login.html`,
`dashboard.js` and `dashboard.css`, served by `corral.routes.dashboard`. No build step:
plain HTML, one vanilla script (no inline script anywhere: the pages are served with
`script-src 'self'`) and one stylesheet."""
