"""The prune run: run.py orchestrates, loop.py moves layers, step.py prunes one, strategies.py refine."""

from rcpu_lite.prune.loop import Interrupted
from rcpu_lite.prune.run import prune

__all__ = ["Interrupted", "prune"]
