"""`python -m rcpu_lite` is the rcpu-lite command (so `torchrun -m rcpu_lite prune ...` works)."""

from rcpu_lite.cli import app

app(prog_name="rcpu-lite")
