"""The command line: the Typer app, its command classes and shared options, and what it draws
with rich. The top layer: it may import every other package; nothing imports it."""
