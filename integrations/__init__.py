"""avatard.integrations: thin adapters between avatard live sessions and the voice-agent
frameworks people build on (docs/integrations.md).

- `livekit_avatar`: a LiveKit Agents `VideoGenerator` backed by a live session, and the
  room runner behind `avatard livekit` (extra `livekit`).
- `pipecat_video`: a Pipecat video service frame processor (extra `pipecat`).

Each adapter is a client of the daemon (`AsyncClient`) and owns nothing in it but its
live session. Import the module of the framework you use; this package imports neither.
"""
