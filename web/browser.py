"""A headless Chromium driven over the DevTools protocol (a websocket, aiohttp's client):
what `avatard bench web` and the browser tests use to watch the demo page as a user's
browser would. Only what they need: start, open a page, evaluate script, screenshot, close.

Ownership: `Chromium` owns its process and a temporary profile folder; `close()` asks the
browser to exit, waits (bounded), kills it if it must and removes the folder. Every wait
has a timeout and says what it waited for.

Flags (checked with Debian's chromium): `--allow-loopback-in-peer-connection` and
`--disable-features=WebRtcHideLocalIpsWithMdns` let WebRTC use 127.0.0.1 as a plain
candidate; `--autoplay-policy=no-user-gesture-required` plays the video without a click;
`--use-fake-device-for-media-stream` and `--use-fake-ui-for-media-stream` give
`getUserMedia` a synthetic microphone (a beep) without a permission prompt.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import re
import shutil
import tempfile
from collections import deque
from pathlib import Path
from typing import Any

import aiohttp

CHROMIUM_CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "chrome")
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-gpu",
    "--disable-extensions",
    "--disable-background-networking",
    "--allow-loopback-in-peer-connection",
    "--disable-features=WebRtcHideLocalIpsWithMdns",
    "--autoplay-policy=no-user-gesture-required",
    "--use-fake-ui-for-media-stream",
    "--use-fake-device-for-media-stream",
    "--window-size=600,860",
)
START_TIMEOUT_S = 60.0  # a cold start of chromium on a busy 2-core machine takes seconds
CALL_TIMEOUT_S = 30.0


class BrowserError(RuntimeError):
    """The browser failed, a script threw, or a wait ran out (the message says which)."""


def find_chromium() -> str | None:
    """Path of a Chromium binary: $AVATARD_CHROMIUM, else the first of
    `CHROMIUM_CANDIDATES` on PATH; None when there is none."""
    given = os.environ.get("AVATARD_CHROMIUM")
    if given:
        return given
    for name in CHROMIUM_CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


class Chromium:
    """A running headless Chromium. `await Chromium.start()`, then `new_page(url)`."""

    def __init__(self) -> None:
        self.proc: asyncio.subprocess.Process | None = None
        self._profile = ""
        self._http: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict]] = {}
        self._reader: asyncio.Task | None = None
        self._stderr: deque[str] = deque(maxlen=40)
        self._stderr_task: asyncio.Task | None = None

    @classmethod
    async def start(cls, binary: str | None = None, extra_flags: tuple[str, ...] = ()) -> Chromium:
        """Start the browser and connect to its DevTools websocket. Raises `BrowserError`
        when no binary is found or it does not answer within `START_TIMEOUT_S`."""
        binary = binary or find_chromium()
        if binary is None:
            raise BrowserError(
                "no Chromium found (install Debian's `chromium` package, or "
                "set AVATARD_CHROMIUM to a Chrome or Chromium binary)"
            )
        self = cls()
        self._profile = tempfile.mkdtemp(prefix="avatard-chromium-")
        try:
            self.proc = await asyncio.create_subprocess_exec(
                binary,
                *CHROMIUM_FLAGS,
                *extra_flags,
                f"--user-data-dir={self._profile}",
                "--remote-debugging-port=0",
                "about:blank",
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
            )
            url = await asyncio.wait_for(self._devtools_url(), START_TIMEOUT_S)
            self._stderr_task = asyncio.create_task(self._drain_stderr())
            self._http = aiohttp.ClientSession()
            self._ws = await self._http.ws_connect(url, max_msg_size=0)
            self._reader = asyncio.create_task(self._read())
        except TimeoutError:
            await self.close()
            raise BrowserError(
                f"{binary} printed no DevTools address within "
                f"{START_TIMEOUT_S:.0f} s; its last output: "
                f"{' | '.join(self._stderr)}"
            ) from None
        except BaseException:
            await self.close()
            raise
        return self

    async def _devtools_url(self) -> str:
        assert self.proc is not None and self.proc.stderr is not None
        while True:
            line = await self.proc.stderr.readline()
            if not line:
                raise BrowserError("chromium exited at start: " + " | ".join(self._stderr))
            text = line.decode(errors="replace").strip()
            self._stderr.append(text)
            found = re.search(r"DevTools listening on (ws://\S+)", text)
            if found:
                return found.group(1)

    async def _drain_stderr(self) -> None:
        # The pipe must be read, or a chatty browser blocks on a full pipe.
        assert self.proc is not None and self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            self._stderr.append(line.decode(errors="replace").rstrip())

    async def _read(self) -> None:
        assert self._ws is not None
        async for message in self._ws:
            if message.type != aiohttp.WSMsgType.TEXT:
                break
            data = json.loads(message.data)
            future = self._pending.pop(data.get("id", -1), None)
            if future is not None and not future.done():
                future.set_result(data)
        for future in self._pending.values():
            if not future.done():
                future.set_exception(BrowserError("the DevTools connection closed"))

    async def call(
        self,
        method: str,
        params: dict | None = None,
        session_id: str | None = None,
        timeout_s: float = CALL_TIMEOUT_S,
    ) -> dict:
        """One DevTools command; returns its `result`. Raises `BrowserError` on an error
        reply or after `timeout_s` without one."""
        if self._ws is None:
            raise BrowserError("the browser is not connected")
        msg_id = next(self._ids)
        future: asyncio.Future[dict] = asyncio.get_running_loop().create_future()
        self._pending[msg_id] = future
        message: dict[str, Any] = {"id": msg_id, "method": method, "params": params or {}}
        if session_id:
            message["sessionId"] = session_id
        await self._ws.send_str(json.dumps(message))
        try:
            reply = await asyncio.wait_for(future, timeout_s)
        except TimeoutError:
            self._pending.pop(msg_id, None)
            raise BrowserError(f"DevTools {method} got no reply within {timeout_s:.0f} s") from None
        if "error" in reply:
            raise BrowserError(f"DevTools {method}: {reply['error']}")
        return reply.get("result", {})

    async def new_page(self, url: str) -> Page:
        """A new tab showing `url` (returns once the navigation was started)."""
        target = await self.call("Target.createTarget", {"url": "about:blank"})
        attached = await self.call(
            "Target.attachToTarget", {"targetId": target["targetId"], "flatten": True}
        )
        page = Page(self, target["targetId"], attached["sessionId"])
        await page.call("Page.enable")
        await page.call("Page.navigate", {"url": url})
        return page

    async def close(self) -> None:
        """Ask the browser to exit, then make sure it has; remove its profile."""
        if self._ws is not None and not self._ws.closed:
            try:
                await self.call("Browser.close", timeout_s=5.0)
            except (BrowserError, ConnectionError):
                pass
        if self._reader is not None:
            self._reader.cancel()
        if self._ws is not None:
            await self._ws.close()
        if self._http is not None:
            await self._http.close()
        if self.proc is not None and self.proc.returncode is None:
            try:
                await asyncio.wait_for(self.proc.wait(), 10.0)
            except TimeoutError:
                self.proc.kill()
                await asyncio.wait_for(self.proc.wait(), 10.0)
        if self._stderr_task is not None:
            self._stderr_task.cancel()
        if self._profile:
            shutil.rmtree(self._profile, ignore_errors=True)

    async def __aenter__(self) -> Chromium:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class Page:
    """One tab of a `Chromium`."""

    def __init__(self, browser: Chromium, target_id: str, session_id: str) -> None:
        self.browser = browser
        self.target_id = target_id
        self.session_id = session_id

    async def call(
        self, method: str, params: dict | None = None, timeout_s: float = CALL_TIMEOUT_S
    ) -> dict:
        return await self.browser.call(method, params, self.session_id, timeout_s)

    async def evaluate(self, expression: str, timeout_s: float = CALL_TIMEOUT_S) -> Any:
        """The JSON value of `expression` (awaited when it is a promise). Raises
        `BrowserError` with the script's exception text when it throws."""
        result = await self.call(
            "Runtime.evaluate",
            {"expression": expression, "awaitPromise": True, "returnByValue": True},
            timeout_s=timeout_s,
        )
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise BrowserError(f"script failed: {text}")
        return result.get("result", {}).get("value")

    async def wait_for(
        self, expression: str, timeout_s: float, what: str, poll_s: float = 0.2
    ) -> Any:
        """Evaluate `expression` until it is truthy; returns its value. Raises
        `BrowserError` naming `what` after `timeout_s`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            value = await self.evaluate(expression)
            if value:
                return value
            if loop.time() > deadline:
                raise BrowserError(
                    f"the page showed no {what} within {timeout_s:.0f} s "
                    f"(last value of `{expression}`: {value!r})"
                )
            await asyncio.sleep(poll_s)

    async def screenshot(self, path: Path, scale: float = 1.0) -> None:
        """A PNG of the page's viewport, scaled by `scale`."""
        metrics = await self.call("Page.getLayoutMetrics")
        view = metrics["cssLayoutViewport"]
        result = await self.call(
            "Page.captureScreenshot",
            {
                "format": "png",
                "clip": {
                    "x": 0,
                    "y": 0,
                    "width": view["clientWidth"],
                    "height": view["clientHeight"],
                    "scale": scale,
                },
            },
        )
        Path(path).write_bytes(base64.b64decode(result["data"]))

    async def close(self) -> None:
        """Close the tab (its peer connections close with it)."""
        await self.browser.call("Target.closeTarget", {"targetId": self.target_id})
