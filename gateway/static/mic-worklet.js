// Microphone -> 16 kHz PCM16 in 20 ms frames. Runs at the AudioContext's rate (often 48 kHz):
// a windowed-sinc low-pass below the target's Nyquist, then linear interpolation at the target
// rate's sample positions. Each full frame is posted to the page as an ArrayBuffer.
const TAPS = 33;

function lowPass(cutoff) {
  // cutoff in cycles per input sample; Blackman-windowed sinc, unity gain at DC.
  const half = (TAPS - 1) / 2;
  const taps = new Float32Array(TAPS);
  let sum = 0;
  for (let n = 0; n < TAPS; n++) {
    const x = n - half;
    const sinc = x === 0 ? 2 * cutoff : Math.sin(2 * Math.PI * cutoff * x) / (Math.PI * x);
    const window = 0.42 - 0.5 * Math.cos((2 * Math.PI * n) / (TAPS - 1)) + 0.08 * Math.cos((4 * Math.PI * n) / (TAPS - 1));
    taps[n] = sinc * window;
    sum += taps[n];
  }
  return taps.map((t) => t / sum);
}

class MicResampler extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const { targetRate, frameSamples } = options.processorOptions;
    this.step = sampleRate / targetRate; // input samples per output sample
    this.taps = lowPass(Math.min(0.5, (0.45 * targetRate) / sampleRate));
    this.input = new Float32Array(0); // input not consumed yet, with TAPS - 1 samples of history
    this.position = (TAPS - 1) / 2; // next output sample, in input samples from input[0]
    this.frame = new Int16Array(frameSamples);
    this.filled = 0;
  }

  filtered(i) {
    let acc = 0;
    const start = i - (TAPS - 1) / 2;
    for (let k = 0; k < TAPS; k++) acc += this.taps[k] * this.input[start + k];
    return acc;
  }

  process(inputs) {
    const channel = inputs[0][0];
    if (!channel) return true;
    const joined = new Float32Array(this.input.length + channel.length);
    joined.set(this.input);
    joined.set(channel, this.input.length);
    this.input = joined;
    const last = this.input.length - 1 - (TAPS - 1) / 2; // the newest sample the filter can centre on
    while (this.position + 1 <= last) {
      const i = Math.floor(this.position);
      const fraction = this.position - i;
      const value = this.filtered(i) * (1 - fraction) + this.filtered(i + 1) * fraction;
      this.frame[this.filled++] = Math.max(-32768, Math.min(32767, Math.round(value * 32767)));
      if (this.filled === this.frame.length) {
        const frame = this.frame.slice();
        this.port.postMessage(frame.buffer, [frame.buffer]);
        this.filled = 0;
      }
      this.position += this.step;
    }
    const keepFrom = Math.floor(this.position) - (TAPS - 1) / 2;
    this.input = this.input.slice(keepFrom);
    this.position -= keepFrom;
    return true;
  }
}

registerProcessor("mic-resampler", MicResampler);
