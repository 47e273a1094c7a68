// Reply audio playback through a jitter buffer. Chunks (Float32Array at the context's rate) queue
// up; playback starts once `prebuffer` samples wait (or the turn's audio has all arrived) and
// goes back to buffering on an underrun. "flush" drops everything at once (barge-in: the caller
// must hear nothing the server did not count as heard). Reports what it played to the page.
class JitterPlayer extends AudioWorkletProcessor {
  constructor(options) {
    super();
    this.prebuffer = options.processorOptions.prebufferSamples;
    this.chunks = [];
    this.offset = 0; // into chunks[0]
    this.buffered = 0;
    this.playing = false;
    this.ending = false; // the turn's audio has all arrived: play out what is left
    this.played = 0;
    this.sinceReport = 0;
    this.port.onmessage = (event) => {
      const message = event.data;
      if (message === "flush") {
        const dropped = this.buffered;
        this.chunks = [];
        this.offset = 0;
        this.buffered = 0;
        this.playing = false;
        this.ending = false;
        this.report({ flushed: dropped });
      } else if (message === "end") {
        this.ending = true;
      } else {
        this.chunks.push(message);
        this.buffered += message.length;
        this.ending = false;
      }
    };
  }

  report(extra = {}) {
    this.port.postMessage({ played: this.played, buffered: this.buffered, playing: this.playing, ...extra });
    this.sinceReport = 0;
  }

  process(_inputs, outputs) {
    const out = outputs[0][0];
    if (!this.playing && this.buffered > 0 && (this.buffered >= this.prebuffer || this.ending)) {
      this.playing = true;
      this.report();
    }
    let written = 0;
    while (this.playing && written < out.length && this.chunks.length > 0) {
      const chunk = this.chunks[0];
      const n = Math.min(out.length - written, chunk.length - this.offset);
      out.set(chunk.subarray(this.offset, this.offset + n), written);
      written += n;
      this.offset += n;
      if (this.offset === chunk.length) {
        this.chunks.shift();
        this.offset = 0;
      }
    }
    out.fill(0, written);
    this.played += written;
    this.buffered -= written;
    if (this.playing && this.buffered === 0) {
      this.playing = false; // underrun or the end: buffer again before going on
      this.report();
    }
    for (let c = 1; c < outputs[0].length; c++) outputs[0][c].set(out);
    this.sinceReport += out.length;
    if (this.sinceReport >= sampleRate / 20) this.report();
    return true;
  }
}

registerProcessor("jitter-player", JitterPlayer);
