// The duplex page: one conversation with `duplex serve` over the websocket protocol of
// docs/protocol.md. Microphone -> capture worklet (int16 frames at the codec rate) -> PCM or
// Opus (WebCodecs) messages; AUDIO or OPUS_AUDIO messages -> playback worklet (jitter buffer).
// Text from the server is untrusted: it only ever reaches the page as textContent.
"use strict";

const KIND = {
  HELLO: 0x01, AUDIO: 0x02, TEXT: 0x03, STATS: 0x04, ERROR: 0x05, STATE: 0x06, PONG: 0x07,
  EVENT: 0x08, TOKENS: 0x09, OPUS_AUDIO: 0x0a,
  PCM: 0x41, TYPE: 0x43, CONTROL: 0x44, PING: 0x45, OPUS: 0x46,
};
const OP = { SAVE_STATE: 1, LOAD_STATE: 2, RESET: 3 };
// Closes after which trying again can help (docs/protocol.md, "What a client does").
const RETRY_CLOSES = new Set([1001, 1006, 1011, 1013]);
const PREROLL_FRAMES = 3;
const MAX_JITTER_FRAMES = 10;

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const utf8 = new TextEncoder();
const fromUtf8 = new TextDecoder("utf-8", { fatal: false });
const opusInBrowser = typeof AudioEncoder === "function" && typeof AudioDecoder === "function";

// Everything the page knows, in one object: the latency panel reads it, and so do the tests
// (through the DevTools protocol), so they check what a person would see.
const S = {
  running: false, connected: false, status: "not connected", session: null, hello: null,
  wire: null, seq: 0, sent: 0, received: 0, sentAt: new Map(), latency: [], rtt: null,
  server: null, jitter: { depth: 0, underruns: 0, dropped: 0 }, levelIn: 0, levelOut: 0,
  modelText: "", userText: "", typed: [], events: [], errors: [], reconnects: 0,
  statesSaved: 0, lastState: null, bytesSent: 0, bytesReceived: 0, opusFallback: null,
};
window.duplex = S;

let ws = null;
let audio = null; // {ctx, stream, capture, playback}
let encoder = null;
let decoder = null;
let pingTimer = null;
let retryTimer = null;
let backoff = 0.5;
let muted = false;
let audioCtx = null; // made on the Start click: browsers let audio start only from a gesture

function showError(text) {
  const box = $("error");
  box.textContent = text;
  box.hidden = !text;
  if (text) S.errors.push(text);
}

function setStatus(text, kind) {
  S.status = text;
  const el = $("status");
  el.textContent = text;
  el.className = `status ${kind}`;
}

function enable(live) {
  for (const id of ["type-text", "type-send", "save", "load", "mute"]) $(id).disabled = !live;
  $("load-label").classList.toggle("disabled", !live);
}

function wsUrl() {
  const q = new URLSearchParams();
  for (const k of ["token", "seed"]) if (params.has(k)) q.set(k, params.get(k));
  q.set("audio", S.wire);
  return `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/?${q}`;
}

function message(kind, headerBytes, body) {
  const out = new Uint8Array(1 + headerBytes + (body ? body.byteLength : 0));
  out[0] = kind;
  if (body) out.set(new Uint8Array(body.buffer || body, body.byteOffset || 0, body.byteLength), 1 + headerBytes);
  return out;
}

function send(bytes) {
  if (ws && ws.readyState === WebSocket.OPEN && S.connected) {
    ws.send(bytes);
    S.bytesSent += bytes.byteLength;
    return true;
  }
  return false;
}

function frameMessage(kind, seq, body) {
  const m = message(kind, 4, body);
  new DataView(m.buffer).setUint32(1, seq, true);
  return m;
}

// ---- microphone and speaker ----------------------------------------------------------------

async function startAudio(hello, ctx) {
  await ctx.audioWorklet.addModule("/worklets.js");
  const stream = await navigator.mediaDevices.getUserMedia({
    audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: true, channelCount: 1 },
  });
  const source = ctx.createMediaStreamSource(stream);
  const capture = new AudioWorkletNode(ctx, "duplex-capture", {
    numberOfOutputs: 0,
    processorOptions: { targetRate: hello.sample_rate, frameSize: hello.frame_size },
  });
  capture.port.onmessage = (e) => onFrame(e.data.pcm, e.data.level);
  source.connect(capture);
  const playback = new AudioWorkletNode(ctx, "duplex-playback", {
    numberOfInputs: 0,
    outputChannelCount: [1],
    processorOptions: {
      rate: hello.sample_rate, frameSize: hello.frame_size,
      preroll: PREROLL_FRAMES, max: MAX_JITTER_FRAMES,
    },
  });
  playback.port.onmessage = (e) => {
    S.jitter = e.data;
    S.levelOut = e.data.level;
  };
  playback.connect(ctx.destination);
  if (ctx.state !== "running") await ctx.resume();
  audio = { ctx, stream, capture, playback, rate: hello.sample_rate, frameSize: hello.frame_size };
}

function stopAudio() {
  if (!audio) return;
  for (const t of audio.stream.getTracks()) t.stop();
  audio = null;
}

function play(pcm, rate) {
  if (audio) audio.playback.port.postMessage({ pcm, rate }, [pcm.buffer]);
}

// ---- Opus through WebCodecs ----------------------------------------------------------------

async function opusWorks(hello) {
  if (!opusInBrowser) return "this browser has no WebCodecs (it needs a secure context: https or localhost)";
  const enc = await AudioEncoder.isConfigSupported(encoderConfig(hello)).catch(() => null);
  const dec = await AudioDecoder.isConfigSupported(decoderConfig(hello)).catch(() => null);
  if (!enc || !enc.supported || !dec || !dec.supported) return "this browser cannot encode or decode Opus";
  return null;
}

function encoderConfig(hello) {
  const bitrate = (hello.opus && hello.opus.bitrate) || 24000;
  return { codec: "opus", sampleRate: hello.sample_rate, numberOfChannels: 1, bitrate, opus: { frameDuration: 20000 } };
}

function decoderConfig(hello) {
  return { codec: "opus", sampleRate: hello.sample_rate, numberOfChannels: 1 };
}

function startOpus(hello) {
  const frameUs = (1e6 * hello.frame_size) / hello.sample_rate;
  encoder = new AudioEncoder({
    output: (chunk) => {
      const packet = new Uint8Array(chunk.byteLength);
      chunk.copyTo(packet);
      send(frameMessage(KIND.OPUS, Math.round(chunk.timestamp / frameUs), packet));
    },
    error: (e) => showError(`Opus encoder failed: ${e.message}`),
  });
  encoder.configure(encoderConfig(hello));
  decoder = new AudioDecoder({
    output: (data) => {
      const pcm = new Float32Array(data.numberOfFrames);
      data.copyTo(pcm, { planeIndex: 0, format: "f32-planar" });
      play(pcm, data.sampleRate);
      data.close();
    },
    error: (e) => showError(`Opus decoder failed: ${e.message}`),
  });
  decoder.configure(decoderConfig(hello));
}

function stopOpus() {
  for (const c of [encoder, decoder]) if (c && c.state !== "closed") c.close();
  encoder = decoder = null;
}

// ---- frames out ----------------------------------------------------------------------------

function onFrame(pcm, level) {
  S.levelIn = level;
  if (!S.connected || !S.hello) return;
  if (muted) pcm.fill(0);
  const seq = S.seq++;
  S.sentAt.set(seq, performance.now());
  if (S.sentAt.size > 500) S.sentAt.delete(S.sentAt.keys().next().value);
  if (S.wire === "opus" && encoder) {
    const frameUs = (1e6 * S.hello.frame_size) / S.hello.sample_rate;
    const data = new AudioData({
      format: "s16", sampleRate: S.hello.sample_rate, numberOfChannels: 1,
      numberOfFrames: pcm.length, timestamp: seq * frameUs, data: pcm,
    });
    encoder.encode(data);
    data.close();
  } else {
    send(frameMessage(KIND.PCM, seq, pcm));
  }
  S.sent += 1;
}

// ---- messages in ---------------------------------------------------------------------------

function answered(frame) {
  const t = S.sentAt.get(frame);
  if (t !== undefined) {
    S.latency.push(performance.now() - t);
    if (S.latency.length > 200) S.latency.shift();
  }
  for (const k of S.sentAt.keys()) {
    if (k > frame) break;
    S.sentAt.delete(k);
  }
  S.received += 1;
}

function addText(stream, text) {
  const el = $(stream === 0 ? "model-text" : "user-text");
  el.append(document.createTextNode(text));
  el.scrollTop = el.scrollHeight;
  if (stream === 0) S.modelText += text;
  else S.userText += text;
}

function onMessage(buf) {
  const b = new Uint8Array(buf);
  S.bytesReceived += b.byteLength;
  if (!b.length) return;
  const dv = new DataView(buf);
  switch (b[0]) {
    case KIND.HELLO: return onHello(dv.getUint16(1, true), JSON.parse(fromUtf8.decode(b.subarray(3))));
    case KIND.AUDIO: {
      const frame = dv.getUint32(1, true);
      answered(frame);
      const n = (b.length - 5) / 2;
      const pcm = new Float32Array(n);
      for (let i = 0; i < n; i++) pcm[i] = dv.getInt16(5 + 2 * i, true) / 32767;
      play(pcm, S.hello.sample_rate);
      return;
    }
    case KIND.OPUS_AUDIO: {
      const frame = dv.getUint32(1, true);
      answered(frame);
      if (decoder) {
        const frameUs = (1e6 * S.hello.frame_size) / S.hello.sample_rate;
        decoder.decode(new EncodedAudioChunk({ type: "key", timestamp: frame * frameUs, data: b.subarray(5) }));
      }
      return;
    }
    case KIND.TEXT: return addText(b[5], fromUtf8.decode(b.subarray(6)));
    case KIND.STATS: S.server = JSON.parse(fromUtf8.decode(b.subarray(1))); return;
    case KIND.PONG: {
      const sent = Number(dv.getBigUint64(1, true)) / 1000;
      S.rtt = performance.now() - sent;
      return;
    }
    case KIND.ERROR: {
      const code = dv.getUint16(1, true);
      showError(`server: ${fromUtf8.decode(b.subarray(3))} (error ${code})`);
      return;
    }
    case KIND.EVENT: return onEvent(JSON.parse(fromUtf8.decode(b.subarray(1))));
    case KIND.STATE: return onState(b.slice(1));
    default: return; // TOKENS (not asked for) and kinds a later server may add
  }
}

async function onHello(version, hello) {
  if (version !== 1) {
    showError(`the server speaks protocol version ${version}; this page speaks 1`);
    stop();
    return;
  }
  S.hello = hello;
  S.session = hello.session;
  if (S.wire === "opus" && hello.audio !== "opus") {
    showError("the server does not send Opus; reload with PCM");
  }
  try {
    if (!audio) await startAudio(hello, audioCtx);
    else if (audio.rate !== hello.sample_rate || audio.frameSize !== hello.frame_size) {
      throw new Error("after reconnecting, the server has another audio format");
    }
  } catch (e) {
    showError(`microphone or audio failed: ${e.message}`);
    stop();
    return;
  }
  if (S.wire === "opus") startOpus(hello);
  audio.playback.port.postMessage({ reset: true });
  S.sentAt.clear();
  S.connected = true;
  backoff = 0.5;
  setStatus(`live: session ${hello.session}`, "live");
  showError("");
  enable(true);
  $("session").textContent = `model ${hello.model} · codec ${hello.codec} · ${hello.sample_rate} Hz · ${hello.frame_size} samples/frame · session ${hello.session}`;
  pingTimer = setInterval(ping, 1000);
  ping();
}

function onEvent(ev) {
  S.events.push(ev);
  if (ev.event === "typed") {
    S.typed.push(ev);
    const span = document.createElement("span");
    span.className = "typed";
    span.textContent = `⌨ ${ev.text} `;
    $("user-text").append(span);
  } else if (ev.event === "state_loaded") {
    $("state-note").textContent = `state loaded (frame ${ev.frame})`;
  } else if (ev.event === "reset") {
    $("state-note").textContent = "reset";
  }
}

function onState(blob) {
  S.statesSaved += 1;
  S.lastState = blob;
  const url = URL.createObjectURL(new Blob([blob], { type: "application/octet-stream" }));
  const a = document.createElement("a");
  a.href = url;
  a.download = `duplex-${S.session}.dstate`;
  a.click();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
  $("state-note").textContent = `state saved (${(blob.length / 1024).toFixed(0)} KiB)`;
}

function ping() {
  const m = message(KIND.PING, 8, null);
  new DataView(m.buffer).setBigUint64(1, BigInt(Math.round(performance.now() * 1000)), true);
  send(m);
}

// ---- connection ----------------------------------------------------------------------------

async function whyRefused() {
  // The browser's websocket API hides the HTTP status of a refused upgrade: ask /auth, which
  // answers the same token and rate checks as a plain GET.
  const q = params.has("token") ? `?token=${encodeURIComponent(params.get("token"))}` : "";
  try {
    const r = await fetch(`/auth${q}`, { cache: "no-store" });
    if (r.status === 401) return { fatal: true, text: "the server refused the connection: wrong or missing token (open this page as /?token=YOUR_TOKEN)" };
    if (r.status === 429) return { fatal: false, text: "the server refused the connection: too many connections from this address" };
    if (r.ok) return { fatal: false, text: "the server closed the connection" };
    return { fatal: false, text: `the server answered ${r.status}` };
  } catch (e) {
    return { fatal: false, text: "the server cannot be reached" };
  }
}

function connect() {
  retryTimer = null;
  const sock = new WebSocket(wsUrl());
  ws = sock;
  sock.binaryType = "arraybuffer";
  setStatus("connecting…", "idle");
  sock.onmessage = (e) => {
    if (typeof e.data === "string") return; // the protocol has no text frames
    onMessage(e.data);
  };
  sock.onclose = async (e) => {
    if (ws !== sock) return;
    const hadHello = S.connected;
    S.connected = false;
    clearInterval(pingTimer);
    stopOpus();
    enable(false);
    if (!S.running) return;
    let why = { fatal: false, text: `connection lost (${e.code}${e.reason ? `: ${e.reason}` : ""})` };
    if (!hadHello && e.code === 1006) why = await whyRefused();
    else if (!RETRY_CLOSES.has(e.code)) why.fatal = true;
    if (why.fatal) {
      showError(why.text);
      setStatus("refused", "bad");
      stop(false);
      return;
    }
    S.reconnects += 1;
    setStatus(`${why.text}; reconnecting in ${backoff.toFixed(1)} s`, "bad");
    retryTimer = setTimeout(connect, backoff * 1000);
    backoff = Math.min(backoff * 2, 8);
  };
}

async function start() {
  if (S.running) return;
  showError("");
  S.running = true;
  // At the device's rate: some browsers refuse a 16 kHz context; the worklets resample.
  audioCtx = new AudioContext({ latencyHint: "interactive" });
  S.wire = $("wire").value;
  if (S.wire === "opus") {
    const why = await opusWorks({ sample_rate: 16000, frame_size: 320 });
    if (why) {
      S.opusFallback = why;
      S.wire = "pcm";
      $("wire").value = "pcm";
    }
  }
  $("start").disabled = true;
  $("stop").disabled = false;
  $("wire").disabled = true;
  connect();
}

function stop(clearStatus = true) {
  S.running = false;
  S.connected = false;
  if (retryTimer) clearTimeout(retryTimer);
  clearInterval(pingTimer);
  if (ws && ws.readyState <= WebSocket.OPEN) ws.close(1000, "done");
  ws = null;
  stopOpus();
  stopAudio();
  if (audioCtx) audioCtx.close();
  audioCtx = null;
  enable(false);
  $("start").disabled = false;
  $("stop").disabled = true;
  $("wire").disabled = false;
  if (clearStatus) setStatus("not connected", "idle");
}

// ---- controls ------------------------------------------------------------------------------

function typeText(text) {
  const bytes = utf8.encode(text);
  const max = (S.hello && S.hello.max_text_bytes) || 1024;
  if (!bytes.length) return false;
  if (bytes.length > max) {
    showError(`typed text is ${bytes.length} bytes; at most ${max}`);
    return false;
  }
  return send(message(KIND.TYPE, 0, bytes));
}

function loadState(bytes) {
  const b = new Uint8Array(bytes);
  return send(message(KIND.CONTROL, 1, b).fill(OP.LOAD_STATE, 1, 2));
}
S.loadState = loadState;

function p50(xs) {
  if (!xs.length) return null;
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)];
}

function ms(x) {
  return x === null || x === undefined ? "–" : `${x.toFixed(1)} ms`;
}

function render() {
  const lat = p50(S.latency);
  S.latencyP50 = lat;
  $("lat-frame").textContent = ms(lat);
  $("lat-rtt").textContent = ms(S.rtt);
  const srv = S.server;
  const total = srv && srv.engine && srv.engine.stages_ms && srv.engine.stages_ms.total;
  $("lat-server").textContent = srv
    ? `${ms(total ? total.p50 : null)} step · ${ms(srv.server_latency_ms.p50)} in server`
    : "–";
  $("lat-jitter").textContent = `${S.jitter.depth.toFixed(1)} frames · ${S.jitter.underruns} underruns`;
  const dropsIn = srv ? srv.dropped_input_frames : 0;
  const dropsOut = srv ? srv.dropped_output_messages : 0;
  $("lat-drops").textContent = `${dropsIn} in · ${dropsOut} out (server) · ${S.jitter.dropped} late (here)`;
  $("lat-frames").textContent = `${S.sent} / ${S.received}`;
  $("lat-wire").textContent = S.wire
    ? `${S.wire}${S.opusFallback ? ` (${S.opusFallback})` : ""} · ${(S.bytesSent / 1024).toFixed(0)} KiB up · ${(S.bytesReceived / 1024).toFixed(0)} KiB down`
    : "–";
  $("level-in").style.width = `${Math.min(100, 300 * S.levelIn)}%`;
  $("level-out").style.width = `${Math.min(100, 300 * S.levelOut)}%`;
}

function init() {
  if (!opusInBrowser) {
    $("wire").value = "pcm";
    $("wire").querySelector('option[value="opus"]').disabled = true;
  }
  if (params.get("wire") === "pcm" || params.get("wire") === "opus") $("wire").value = params.get("wire");
  $("start").addEventListener("click", start);
  $("stop").addEventListener("click", () => stop());
  $("mute").addEventListener("click", () => {
    muted = !muted;
    $("mute").setAttribute("aria-pressed", String(muted));
    $("mute").textContent = muted ? "Unmute" : "Mute";
  });
  $("type-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const input = $("type-text");
    if (typeText(input.value)) input.value = "";
  });
  $("save").addEventListener("click", () => send(new Uint8Array([KIND.CONTROL, OP.SAVE_STATE])));
  $("load").addEventListener("change", async (e) => {
    const file = e.target.files[0];
    if (file) loadState(await file.arrayBuffer());
    e.target.value = "";
  });
  setInterval(render, 200);
  if (params.get("autostart") === "1") start();
}

init();
