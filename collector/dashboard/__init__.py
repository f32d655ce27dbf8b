"""The operations dashboard: three static files served at `/`, no build step.

`app.js` reads the fleet API (`/api/v1/...`) with an operator or owner key. The user
enters it once (it is kept in the browser's localStorage) or passes it as `#key=...` in
the URL fragment. Browsers never send the fragment to the server, so the key stays out
of access logs. Every file is served from this package, and the page loads nothing from
other hosts.
"""

from __future__ import annotations

from importlib import resources

from aiohttp import web

# Files by URL path, with their content types.
FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/style.css": ("style.css", "text/css; charset=utf-8"),
}
# Scripts, styles and API calls from this origin only, and no inline script or style.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
FILE_BODIES = web.AppKey("dashboard_files", dict)


def add_routes(app: web.Application) -> None:
    """Serve the dashboard's files at `/`, `/app.js` and `/style.css`."""
    package = resources.files(__name__)
    app[FILE_BODIES] = {
        path: package.joinpath(name).read_bytes() for path, (name, _) in FILES.items()
    }
    for path in FILES:
        app.router.add_get(path, get_file)


async def get_file(request: web.Request) -> web.Response:
    """Return one dashboard file; the browser revalidates it on every load."""
    _, content_type = FILES[request.path]
    return web.Response(
        body=request.app[FILE_BODIES][request.path],
        headers={
            "Content-Type": content_type,
            "Cache-Control": "no-cache",
            "Content-Security-Policy": CONTENT_SECURITY_POLICY,
            "Referrer-Policy": "no-referrer",
            "X-Content-Type-Options": "nosniff",
        },
    )
