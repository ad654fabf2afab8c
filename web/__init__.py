"""The WebRTC gateway (`avatard web`): live sessions of the daemon as WebRTC tracks for a
browser page and WHEP players. Needs the `web` extra (aiohttp, aiortc, PyAV); nothing here
is imported by the daemon."""
