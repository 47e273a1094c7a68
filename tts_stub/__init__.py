"""The TTS stage stub: TextToSpeechService.Synthesize, which speaks text in the stub audio code
(`stubs.audio_code`) and streams the audio back in chunks tagged with the text they speak."""
