// Audio worklets of the duplex page: capture (microphone -> int16 frames at the codec rate)
// and playback (frames -> speaker through a jitter buffer). Both run on the audio thread, so
// neither ever waits on the network or the page's main thread.

// A windowed-sinc low-pass: before going down to the codec rate, what would fold back above
// its Nyquist frequency is removed (a real microphone at 48 kHz has plenty up there).
function lowpass(cutoff, taps) {
  const h = new Float32Array(taps);
  const m = (taps - 1) / 2;
  let sum = 0;
  for (let i = 0; i < taps; i++) {
    const x = i - m;
    const sinc = x === 0 ? 2 * cutoff : Math.sin(2 * Math.PI * cutoff * x) / (Math.PI * x);
    const w = 0.42 - 0.5 * Math.cos((2 * Math.PI * i) / (taps - 1)) + 0.08 * Math.cos((4 * Math.PI * i) / (taps - 1));
    h[i] = sinc * w;
    sum += h[i];
  }
  for (let i = 0; i < taps; i++) h[i] /= sum;
  return h;
}

// Microphone at the context's rate in; one message per codec frame out:
// {pcm: Int16Array(frameSize), level: rms in [0, 1]}. The context runs at the device's rate
// (some browsers refuse a 16 kHz AudioContext), so resampling happens here, in the worklet.
class CaptureProcessor extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const o = options.processorOptions;
    this.target = o.targetRate;
    this.frameSize = o.frameSize;
    this.step = sampleRate / this.target; // input samples per output sample
    this.fir = this.step > 1 ? lowpass((0.45 * this.target) / sampleRate, 63) : new Float32Array([1]);
    this.hist = new Float32Array(this.fir.length); // the last inputs, newest at the end
    this.filtered = [0, 0]; // the last two filtered inputs, for interpolation
    this.pos = 0; // where the next output sample falls, in input samples after filtered[0]
    this.frame = new Int16Array(this.frameSize);
    this.n = 0;
    this.energy = 0;
    this.muted = false;
    this.port.onmessage = (e) => {
      if ("muted" in e.data) this.muted = e.data.muted;
    };
  }

  push(x) {
    // One input sample through the FIR, then every output sample that falls before it.
    const h = this.hist;
    h.copyWithin(0, 1);
    h[h.length - 1] = x;
    let y = 0;
    for (let i = 0; i < h.length; i++) y += h[i] * this.fir[i];
    this.filtered[0] = this.filtered[1];
    this.filtered[1] = y;
    while (this.pos <= 1) {
      const v = this.filtered[0] + (this.filtered[1] - this.filtered[0]) * this.pos;
      this.emit(this.muted ? 0 : v);
      this.pos += this.step;
    }
    this.pos -= 1;
  }

  emit(v) {
    const s = Math.max(-1, Math.min(1, v));
    this.frame[this.n++] = Math.round(s * 32767);
    this.energy += s * s;
    if (this.n === this.frameSize) {
      const level = Math.sqrt(this.energy / this.frameSize);
      this.port.postMessage({ pcm: this.frame, level }, [this.frame.buffer]);
      this.frame = new Int16Array(this.frameSize);
      this.n = 0;
      this.energy = 0;
    }
  }

  process(inputs) {
    const ch = inputs[0] && inputs[0][0];
    if (ch) for (let i = 0; i < ch.length; i++) this.push(ch[i]);
    return true;
  }
}

// Frames of the model's audio in ({pcm: Float32Array, rate}), the speaker out. A jitter buffer:
// it waits for `preroll` frames before it starts, drops the oldest audio when more than `max`
// frames wait (late audio is worse than lost audio in a conversation), and on an underrun fades
// out instead of clicking, then waits for the pre-roll again. Every ~100 ms it reports
// {depth (frames), underruns, dropped (frames), level}.
class PlaybackProcessor extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const o = options.processorOptions;
    this.codecRate = o.rate;
    this.frameSize = o.frameSize;
    this.preroll = o.preroll;
    this.max = o.max;
    this.setRate(o.rate);
    this.queue = []; // Float32Array chunks at this.rate
    this.head = 0; // read position in queue[0]
    this.queued = 0; // samples waiting
    this.a = 0; // the two source samples around the read position
    this.b = 0;
    this.pos = 0; // the read position between a (0) and b (1)
    this.playing = false;
    this.gain = 0;
    this.underruns = 0;
    this.dropped = 0;
    this.blocks = 0;
    this.energy = 0;
    this.count = 0;
    this.port.onmessage = (e) => this.receive(e.data);
  }

  setRate(rate) {
    // Opus decoders may hand back 48 kHz whatever the codec rate: follow what arrives.
    this.rate = rate;
    this.frameLen = (this.frameSize * rate) / this.codecRate; // one frame, in source samples
    this.step = rate / sampleRate; // source samples per output sample
  }

  receive(d) {
    if (d.reset) {
      this.queue = [];
      this.head = 0;
      this.queued = 0;
      this.playing = false;
      return;
    }
    if (d.rate !== this.rate) this.setRate(d.rate);
    this.queue.push(d.pcm);
    this.queued += d.pcm.length;
    while (this.queued > this.max * this.frameLen && this.queue.length > 1) {
      const old = this.queue.shift();
      this.queued -= old.length - this.head;
      this.head = 0;
      this.dropped += 1;
    }
  }

  next() {
    // The next source sample, or null when the buffer is empty.
    while (this.queue.length && this.head >= this.queue[0].length) {
      this.queue.shift();
      this.head = 0;
    }
    if (!this.queue.length) return null;
    this.queued -= 1;
    return this.queue[0][this.head++];
  }

  process(_inputs, outputs) {
    const out = outputs[0][0];
    if (!this.playing && this.queued >= this.preroll * this.frameLen) this.playing = true;
    for (let i = 0; i < out.length; i++) {
      if (this.playing) {
        this.pos += this.step;
        while (this.pos >= 1) {
          const s = this.next();
          if (s === null) {
            this.playing = false;
            this.underruns += 1;
            this.pos = 0;
            break;
          }
          this.a = this.b;
          this.b = s;
          this.pos -= 1;
        }
      }
      // Fade in when playing, out on an underrun (about 5 ms either way): no clicks.
      this.gain += ((this.playing ? 1 : 0) - this.gain) * Math.min(1, 200 / sampleRate);
      const v = (this.a + (this.b - this.a) * this.pos) * this.gain;
      out[i] = v;
      this.energy += v * v;
      this.count += 1;
    }
    for (let c = 1; c < outputs[0].length; c++) outputs[0][c].set(out);
    if (++this.blocks % 32 === 0) {
      this.port.postMessage({
        depth: this.queued / this.frameLen,
        underruns: this.underruns,
        dropped: this.dropped,
        level: Math.sqrt(this.energy / Math.max(1, this.count)),
      });
      this.energy = 0;
      this.count = 0;
    }
    return true;
  }
}

registerProcessor("duplex-capture", CaptureProcessor);
registerProcessor("duplex-playback", PlaybackProcessor);
