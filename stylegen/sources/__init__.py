"""Inputs: list a SOURCE (folder, CSV manifest, music library), decode images and audio
files' cover art, read labels, taxonomies and numeric tables."""
