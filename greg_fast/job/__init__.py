"""The ``greg-fast prune`` job: pretrain (or load) -> regularize -> prune -> fine-tune -> evaluate.

Writes to ``out``: ``metrics.jsonl`` (one record per epoch and per trace point), ``summary.json``,
``model.pt`` (``torch.load(..., weights_only=True)``), ``regularization.pt`` (λ and score traces),
``lambda_schedule.png``, ``score_distribution.png``, ``accuracy.png`` and ``checkpoints/`` (the
last two, each written atomically every ``--checkpoint-every`` steps, at every phase change and
after every epoch; ``--resume`` continues from the newest one that loads).

The pieces: :mod:`.settings` (flags, their checks, what a resume must agree on), :mod:`.checkpoints`,
:mod:`.loop` (the epoch loop, distributed set-up, the tracer), :mod:`.run` (the stages) and
:mod:`.report` (summary and table). The public interface: :func:`run`, :class:`Run`,
:func:`check_args`, :func:`stored_settings`, :func:`checkpoints`, :func:`settings_diff`.
"""
from .checkpoints import checkpoints, stored_settings
from .run import Run, run
from .settings import check_args, settings_diff

__all__ = ["Run", "check_args", "checkpoints", "run", "settings_diff", "stored_settings"]
