"""The Whisper speech-to-text stage: real speech in, through faster-whisper (CTranslate2) with
Silero VAD, behind voice.v1.SpeechToTextService.Transcribe."""
