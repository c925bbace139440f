"""``python -m tracer``: the anontrace command (tracer.commands.cli)."""
from tracer.commands.cli import main

main()
