"""A text-to-speech stage that speaks with espeak-ng (libespeak-ng from the espeakng-loader
wheel): real speech, offline, streamed as it is synthesised, each chunk tagged with the words it
has spoken."""
