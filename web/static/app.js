// The avatard demo page: one live session per connection, watched over WebRTC.
// The gateway's HTTP API (docs/web.md) opens the session with the SDP offer; text, talk
// and interrupt go to /api/sessions/<id>/...; the overlay shows what getStats says about
// the received video plus the gateway's own counters. `window.avatard` exposes the same
// actions to scripts (the browser test drives the page through it).
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const video = $("video");
  const overlay = $("overlay");
  const statusLine = $("status");

  // Credentials: a signed URL (?exp=..&sig=..) is passed on with every API call; a token
  // in the fragment (#token=..) is sent as a bearer header (fragments never reach a server).
  const page = new URLSearchParams(location.search);
  const signed = page.get("exp") && page.get("sig")
    ? `exp=${encodeURIComponent(page.get("exp"))}&sig=${encodeURIComponent(page.get("sig"))}` : "";
  const token = new URLSearchParams(location.hash.slice(1)).get("token");

  const state = {
    pc: null, sessionId: null, viewerId: null, avatarId: null, talking: false,
    connecting: false, connectedAt: null, firstFrameMs: null, stats: {}, gateway: {},
    error: null,
  };

  function withAuth(path) {
    if (!signed) return path;
    return path + (path.includes("?") ? "&" : "?") + signed;
  }

  async function api(path, options = {}) {
    const headers = { ...(options.headers || {}) };
    if (token) headers.Authorization = `Bearer ${token}`;
    const reply = await fetch(withAuth(path), { ...options, headers });
    const body = await reply.text();
    let data = null;
    try { data = body ? JSON.parse(body) : {}; } catch (e) { data = { message: body }; }
    if (!reply.ok) throw new Error(`${reply.status}: ${data.message || body}`);
    return data;
  }

  function postJSON(path, value) {
    return api(path, { method: "POST", headers: { "Content-Type": "application/json" },
                       body: JSON.stringify(value) });
  }

  function say(text) { statusLine.textContent = text; }

  function iceGatheringDone(pc, timeoutMs) {
    // The gateway does not trickle: the offer goes out with every candidate in it.
    return new Promise((resolve) => {
      if (pc.iceGatheringState === "complete") return resolve();
      const timer = setTimeout(resolve, timeoutMs);
      pc.addEventListener("icegatheringstatechange", () => {
        if (pc.iceGatheringState === "complete") { clearTimeout(timer); resolve(); }
      });
    });
  }

  // `watch`: the id of a running session to watch (as one more viewer) instead of opening
  // a new one; the page's ?watch=<id> does the same. A watcher sends no microphone.
  async function connect({ watch = page.get("watch") } = {}) {
    if (state.pc || state.connecting) return;
    state.connecting = true;
    state.error = null;
    say("connecting...");
    try {
      const config = await api("/api/config");
      const pc = new RTCPeerConnection({ iceServers: config.ice_servers });
      state.pc = pc;
      const videoTransceiver = pc.addTransceiver("video", { direction: "recvonly" });
      const wanted = config.codec === "h264" ? "video/H264" : "video/VP8";
      const codecs = RTCRtpReceiver.getCapabilities("video").codecs
        .filter((c) => c.mimeType === wanted || c.mimeType === "video/rtx");
      if (videoTransceiver.setCodecPreferences && codecs.length) {
        videoTransceiver.setCodecPreferences(codecs);
      }
      // sendrecv: the microphone can be put on this transceiver later without renegotiating.
      state.audioTransceiver = pc.addTransceiver("audio", { direction: "sendrecv" });
      const stream = new MediaStream();
      pc.addEventListener("track", (event) => {
        stream.addTrack(event.track);
        video.srcObject = stream;
      });
      pc.addEventListener("connectionstatechange", () => {
        if (["failed", "closed"].includes(pc.connectionState)) disconnect(`connection ${pc.connectionState}`);
      });
      state.connectedAt = performance.now();
      state.firstFrameMs = null;
      watchFirstFrame();
      await pc.setLocalDescription(await pc.createOffer());
      await iceGatheringDone(pc, 5000);
      const answer = await postJSON("/api/offer", {
        sdp: pc.localDescription.sdp, type: "offer", avatar_id: state.avatarId || "",
        ...(watch ? { session_id: watch } : {}) });
      state.watching = Boolean(watch);
      state.sessionId = answer.session_id;
      state.viewerId = answer.viewer_id;
      await pc.setRemoteDescription({ type: "answer", sdp: answer.sdp });
      setButtons(true, state.watching);
      say(`${state.watching ? "watching " : ""}session ${state.sessionId}`);
    } catch (error) {
      state.error = String(error);
      say(`could not connect: ${error}`);
      disconnect("error");
    } finally {
      state.connecting = false;
    }
  }

  function watchFirstFrame() {
    const started = state.connectedAt;
    const seen = () => {
      if (state.connectedAt === started && state.firstFrameMs === null) {
        state.firstFrameMs = performance.now() - started;
      }
    };
    if (video.requestVideoFrameCallback) video.requestVideoFrameCallback(seen);
    else video.addEventListener("loadeddata", seen, { once: true });
  }

  function disconnect(why) {
    const pc = state.pc;
    if (!pc) return;
    const sessionId = state.watching ? null : state.sessionId;  // a watcher closes only itself
    state.pc = null;
    state.sessionId = null;
    state.talking = false;
    if (sessionId) {
      // The session ends with the peer connection anyway; closing it says so at once.
      api(`/api/sessions/${sessionId}/close`, { method: "POST" }).catch(() => {});
    }
    pc.close();
    setButtons(false);
    if (why !== "error") say(`disconnected (${why})`);
  }

  async function sendText(text, final = true) {
    if (!state.sessionId) throw new Error("not connected");
    return postJSON(`/api/sessions/${state.sessionId}/text`, { text, final });
  }

  async function interrupt() {
    if (!state.sessionId) throw new Error("not connected");
    if (state.talking) await talk(false);
    return api(`/api/sessions/${state.sessionId}/interrupt`, { method: "POST" });
  }

  async function talk(on) {
    if (!state.sessionId) throw new Error("not connected");
    if (on) {
      if (!state.microphone) {
        const media = await navigator.mediaDevices.getUserMedia({ audio: true });
        state.microphone = media.getAudioTracks()[0];
      }
      state.microphone.enabled = true;
      await state.audioTransceiver.sender.replaceTrack(state.microphone);
    } else if (state.microphone) {
      state.microphone.enabled = false;
    }
    state.talking = on;
    $("talk").classList.toggle("on", on);
    $("talk").textContent = on ? "Stop talking" : "Talk";
    return postJSON(`/api/sessions/${state.sessionId}/talk`, { on });
  }

  async function uploadPortrait(file) {
    const reply = await api("/api/avatars", {
      method: "POST", headers: { "Content-Type": file.type || "application/octet-stream" },
      body: file });
    state.avatarId = reply.avatar_id;
    say(`portrait registered (${reply.avatar_id}); the next session uses it`);
    return reply.avatar_id;
  }

  function setButtons(connected, watching = false) {
    $("connect").textContent = connected ? "Disconnect" : "Connect";
    for (const id of ["talk", "interrupt", "send"]) $(id).disabled = !connected || watching;
    $("talk").classList.remove("on");
    $("talk").textContent = "Talk";
  }

  async function readStats() {
    const pc = state.pc;
    if (!pc) { overlay.textContent = "not connected"; return; }
    const report = await pc.getStats();
    const out = {};
    const codecs = {};
    report.forEach((s) => { if (s.type === "codec") codecs[s.id] = s.mimeType; });
    report.forEach((s) => {
      if (s.type !== "inbound-rtp") return;
      if (s.kind === "video") {
        Object.assign(out, {
          fps: s.framesPerSecond || 0, framesReceived: s.framesReceived || 0,
          framesDecoded: s.framesDecoded || 0, framesDropped: s.framesDropped || 0,
          width: s.frameWidth || 0, height: s.frameHeight || 0,
          videoCodec: codecs[s.codecId] || "",
          jitterBufferMs: s.jitterBufferEmittedCount
            ? (1000 * s.jitterBufferDelay) / s.jitterBufferEmittedCount : 0,
        });
      } else if (s.kind === "audio") {
        Object.assign(out, {
          audioPackets: s.packetsReceived || 0, audioCodec: codecs[s.codecId] || "",
          audioLevel: s.audioLevel || 0, totalAudioEnergy: s.totalAudioEnergy || 0,
        });
      }
    });
    state.stats = out;
    if (state.sessionId) {
      try { state.gateway = await api(`/api/sessions/${state.sessionId}/stats`); } catch (e) {}
    }
    const gw = state.gateway || {};
    const mine = (gw.viewers || {})[state.viewerId] || {};
    const latency = (gw.speech_to_frame_ms || []).slice(-1)[0];
    overlay.textContent = [
      `${out.fps || 0} fps  ${out.width || 0}x${out.height || 0}  ${(out.videoCodec || "").replace("video/", "")}`,
      `dropped: ${out.framesDropped || 0} browser, ${mine.video_dropped || 0} gateway, ${gw.frames_missing || 0} daemon`,
      `speech->frame: ${latency === undefined ? "-" : latency.toFixed(0) + " ms"} + ${(out.jitterBufferMs || 0).toFixed(0)} ms buffer`,
      `first frame: ${state.firstFrameMs === null ? "-" : state.firstFrameMs.toFixed(0) + " ms"}`,
    ].join("\n");
  }

  $("connect").addEventListener("click", () => (state.pc ? disconnect("by you") : connect()));
  $("talk").addEventListener("click", () => talk(!state.talking).catch((e) => say(String(e))));
  $("interrupt").addEventListener("click", () => interrupt().catch((e) => say(String(e))));
  $("say").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("text").value.trim();
    if (!text) return;
    sendText(text).then(() => { $("text").value = ""; }).catch((e) => say(String(e)));
  });
  $("portrait").addEventListener("change", () => {
    const file = $("portrait").files[0];
    if (file) uploadPortrait(file).catch((e) => say(`portrait refused: ${e}`));
  });
  window.addEventListener("pagehide", () => {
    if (state.sessionId && !state.watching && !token) {  // a beacon cannot carry a bearer header
      navigator.sendBeacon(withAuth(`/api/sessions/${state.sessionId}/close`));
    }
  });
  setInterval(() => { readStats().catch(() => {}); }, 1000);

  window.avatard = { state, connect, disconnect, sendText, interrupt, talk, uploadPortrait, readStats };
})();
