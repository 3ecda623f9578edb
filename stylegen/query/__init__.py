"""The one query path: :class:`~stylegen.query.engine.Engine` answers genres and neighbours
for a path, bytes, an image or a cover id, and explains its answers."""
