// The voicepipe page: microphone -> WebSocket -> orchestrator, and the agent's reply back.
// The protocol is in README.md ("The WebSocket protocol").
const INPUT_RATE = 16000;
const FRAME_SAMPLES = 320; // 20 ms at 16 kHz
const OUTPUT_RATE = 48000; // reply audio, played at the AudioContext's rate
const PREBUFFER_MS = 80;
const RECONNECT_FIRST_MS = 1000;
const RECONNECT_MAX_MS = 10000;
const CLOSE_WORDS = {
  1001: "the gateway is shutting down",
  1006: "the connection dropped",
  1009: "a message was too big",
  4003: "the server rejected what the page sent",
  4004: "the server timed out",
  4007: "this page may not connect",
  4008: "the server is too busy",
  4014: "the voice service is unavailable",
  4016: "the token was refused",
};
const WATERFALL = [
  ["stt", "stt_finalization_ms", "STT final"],
  ["llm", "llm_time_to_first_sentence_ms", "LLM first sentence"],
  ["tts", "tts_time_to_first_audio_ms", "TTS first audio"],
  ["orchestrator", "orchestrator_added_ms", "orchestrator"],
];

const $ = (id) => document.getElementById(id);
// What the page has done, for anyone watching (the browser tests read it).
const stats = {
  connects: 0, // sockets opened
  sessions: 0, // conversations started on them
  micFrames: 0, // 20 ms frames captured from the microphone
  received: 0, // reply audio samples received
  played: 0, // of those, samples played
  playing: false,
  flushed: 0, // samples dropped unplayed at an interruption or a disconnect
  playedAtFlush: 0, // what had been played by the last drop
  receivedAtFlush: 0,
  discarded: 0, // samples of an interrupted reply that arrived after the interruption
  completed: 0, // turns
  interrupted: 0,
  bargeIns: 0, // barge_in messages sent (push to talk pressed while the agent spoke)
  replyMs: 0, // reply audio of the completed turns, as the server counted it
};
window.voicepipe = { stats };

let context = null;
let player = null;
let socket = null;
let live = false; // the session has started: frames may go out
let reconnectMs = RECONNECT_FIRST_MS;
let reconnectTimer = null;
let pushToTalk = false;
let talking = false;
const agentLines = new Map();
const openTurns = new Set(); // started, not yet completed, interrupted or failed
let discarding = false; // the caller barged in: reply audio is dropped until the next turn starts
const silence = new Int16Array(FRAME_SAMPLES).buffer;

function setStatus(state, text) {
  const status = $("status");
  status.dataset.state = state;
  status.textContent = text;
}

function showError(text) {
  const error = $("error");
  error.hidden = !text;
  error.textContent = text || "";
}

function line(kind, who, text) {
  const item = document.createElement("li");
  item.className = kind;
  const label = document.createElement("span");
  label.className = "who";
  label.textContent = who;
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  item.append(label, body);
  $("log").append(item);
  item.scrollIntoView({ block: "nearest" });
  return item;
}

function agentLine(turnId) {
  if (!agentLines.has(turnId)) agentLines.set(turnId, line("agent", "Agent", ""));
  return agentLines.get(turnId);
}

// Every turn's bar is drawn on one time scale: the longest time to first audio so far.
const waterfallRows = [];

function scaleWaterfall() {
  const longest = Math.max(...waterfallRows.map(([latency]) => latency.time_to_first_audio_ms));
  for (const [latency, bar] of waterfallRows) {
    WATERFALL.forEach(([, key], i) => {
      bar.children[i].style.width = `${longest > 0 ? (100 * Math.max(0, latency[key])) / longest : 0}%`;
    });
  }
}

function addWaterfall(event) {
  const latency = event.latency;
  const total = latency.time_to_first_audio_ms;
  const item = document.createElement("li");
  item.dataset.turn = event.turn_id;
  const caption = document.createElement("div");
  caption.className = "caption";
  caption.textContent = `Turn ${event.turn_id}: first audio after ${total.toFixed(0)} ms (` +
    WATERFALL.map(([, key, name]) => `${name} ${latency[key].toFixed(0)}`).join(", ") + ")";
  const bar = document.createElement("div");
  bar.className = "bar";
  for (const [css, key, name] of WATERFALL) {
    const part = document.createElement("span");
    part.className = css;
    part.title = `${name}: ${latency[key].toFixed(1)} ms`;
    bar.append(part);
  }
  item.append(caption, bar);
  $("waterfall").append(item);
  waterfallRows.push([latency, bar]);
  scaleWaterfall();
}

function onEvent(event) {
  switch (event.type) {
    case "session_started":
      live = true;
      stats.sessions += 1;
      reconnectMs = RECONNECT_FIRST_MS;
      showError("");
      setStatus("listening", pushToTalk ? "Connected: hold the button to talk" : "Listening…");
      break;
    case "transcript":
      $("interim").textContent = event.final ? "" : event.text;
      if (event.final) line("user", "You", event.text);
      break;
    case "turn_started":
      openTurns.add(event.turn_id);
      discarding = false;
      agentLine(event.turn_id);
      break;
    case "agent_text":
      agentLine(event.turn_id).querySelector(".text").textContent += event.text;
      break;
    case "turn_completed":
      openTurns.delete(event.turn_id);
      stats.completed += 1;
      stats.replyMs += event.reply_audio_ms;
      agentLine(event.turn_id).querySelector(".text").textContent = event.agent_text;
      player.port.postMessage("end");
      addWaterfall(event);
      break;
    case "interrupted": {
      openTurns.delete(event.turn_id);
      player.port.postMessage("flush");
      stats.interrupted += 1;
      const item = agentLine(event.turn_id);
      item.classList.add("interrupted");
      item.querySelector(".text").textContent = event.heard_text;
      break;
    }
    case "error": {
      const where = event.stage === "unspecified" ? "" : `${event.stage.toUpperCase()} `;
      showError(`${where}error (${event.code}): ${event.message}`);
      if (event.turn_id) {
        openTurns.delete(event.turn_id);
        agentLine(event.turn_id).classList.add("failed");
      }
      break;
    }
  }
}

function onAudio(data) {
  const pcm = new Int16Array(data);
  if (discarding) {
    stats.discarded += pcm.length;
    return;
  }
  const samples = new Float32Array(pcm.length);
  for (let i = 0; i < pcm.length; i++) samples[i] = pcm[i] / 32768;
  stats.received += samples.length;
  player.port.postMessage(samples, [samples.buffer]);
}

function connect() {
  reconnectTimer = null;
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  socket = new WebSocket(`${scheme}://${location.host}/ws`);
  socket.binaryType = "arraybuffer";
  setStatus("connecting", "Connecting…");
  socket.onopen = () => {
    stats.connects += 1;
    socket.send(JSON.stringify({
      type: "config",
      input_sample_rate: INPUT_RATE,
      output_sample_rate: OUTPUT_RATE,
      token: $("token").value,
    }));
  };
  socket.onmessage = (message) => {
    if (typeof message.data === "string") onEvent(JSON.parse(message.data));
    else onAudio(message.data);
  };
  socket.onclose = (close) => {
    live = false;
    socket = null;
    openTurns.clear();
    discarding = false;
    player.port.postMessage("flush");
    const why = close.reason || CLOSE_WORDS[close.code] || "the connection closed";
    showError(`Disconnected: ${why} (code ${close.code}).`);
    setStatus("reconnecting", `Reconnecting in ${(reconnectMs / 1000).toFixed(0)} s…`);
    reconnectTimer = setTimeout(connect, reconnectMs);
    reconnectMs = Math.min(2 * reconnectMs, RECONNECT_MAX_MS);
  };
}

function sendFrame(frame) {
  stats.micFrames += 1;
  if (!live || socket === null || socket.readyState !== WebSocket.OPEN) return;
  // Push to talk: silence while the button is up, so the server still hears the pause.
  socket.send(pushToTalk && !talking ? silence : frame);
}

async function start() {
  $("start").disabled = true;
  setStatus("connecting", "Opening the microphone…");
  try {
    // 48 kHz whatever the device's rate (the browser converts): the most a config may ask for.
    context = new AudioContext({ latencyHint: "interactive", sampleRate: OUTPUT_RATE });
    window.voicepipe.sampleRate = context.sampleRate;
    await context.audioWorklet.addModule("/static/mic-worklet.js");
    await context.audioWorklet.addModule("/static/player-worklet.js");
    const stream = await navigator.mediaDevices.getUserMedia({
      audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: true, channelCount: 1 },
    });
    const mic = new AudioWorkletNode(context, "mic-resampler", {
      numberOfOutputs: 0,
      processorOptions: { targetRate: INPUT_RATE, frameSamples: FRAME_SAMPLES },
    });
    mic.port.onmessage = (message) => sendFrame(message.data);
    context.createMediaStreamSource(stream).connect(mic);
    player = new AudioWorkletNode(context, "jitter-player", {
      outputChannelCount: [1],
      processorOptions: { prebufferSamples: Math.round((context.sampleRate * PREBUFFER_MS) / 1000) },
    });
    player.port.onmessage = (message) => {
      const report = message.data;
      stats.played = report.played;
      stats.playing = report.playing;
      if (report.flushed !== undefined) {
        stats.flushed += report.flushed;
        stats.playedAtFlush = report.played;
        stats.receivedAtFlush = stats.received;
      }
      $("played").textContent = (report.played / context.sampleRate).toFixed(2);
      if (live) {
        if (report.playing) setStatus("speaking", "Agent speaking…");
        else setStatus("listening", pushToTalk ? "Connected: hold the button to talk" : "Listening…");
      }
    };
    player.connect(context.destination);
    await context.resume();
  } catch (error) {
    setStatus("error", "No microphone");
    showError(`The microphone could not be opened: ${error.message}`);
    $("start").disabled = false;
    return;
  }
  connect();
}

function setTalking(value) {
  talking = value;
  $("ptt").classList.toggle("held", value);
}

// Push to talk pressed while the agent speaks (or prepares to): the caller interrupts. The
// server stops the reply and answers `interrupted`; the page stops playing at once and drops
// the reply's audio still on its way.
function bargeIn() {
  if (!live || (openTurns.size === 0 && !stats.playing)) return;
  socket.send(JSON.stringify({ type: "barge_in" }));
  stats.bargeIns += 1;
  discarding = true;
  player.port.postMessage("flush");
}

$("start").addEventListener("click", start);
$("ptt-mode").addEventListener("change", (event) => {
  pushToTalk = event.target.checked;
  $("ptt").disabled = !pushToTalk;
  setTalking(false);
});
$("ptt").addEventListener("pointerdown", () => {
  bargeIn();
  setTalking(true);
});
for (const up of ["pointerup", "pointerleave"]) $("ptt").addEventListener(up, () => setTalking(false));
$("text-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("text").value.trim();
  if (!text || !live) return;
  socket.send(JSON.stringify({ type: "text", text }));
  line("user", "You (typed)", text);
  $("text").value = "";
});
