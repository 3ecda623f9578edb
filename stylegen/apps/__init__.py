"""What people run: the CLI, the HTTP service and its page, rendering (contact sheets, maps),
near-duplicates and the music-library tagger. Nothing below imports from here."""
