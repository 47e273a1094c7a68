"""A text-to-speech stage that speaks with a Piper neural voice (VITS, run with onnxruntime):
espeak-ng phonemes from the libespeak-ng binding, audio per sentence, each chunk tagged with the
words it has spoken (the model's own phoneme durations say where each word ends)."""
