"""The STT stage stub: SpeechToTextService.Transcribe, which hears the stub audio code
(`stubs.audio_code`) and streams speech events and transcripts back."""
